"""Figures for Gaussian mixtures: points coloured by their most probable
component, with each component's 1- and 2-sigma ellipses.

Data of more than two dimensions is projected on its first two principal axes
(of the training data). A component N(mu, Sigma) then projects to
N(W^T (mu - m), W^T Sigma W), with W the two axes and m the data mean, so the
ellipses drawn are exactly the projected components. One-dimensional data is
shown as a histogram with the mixture density and its weighted components.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import List, Optional

import numpy as np
import torch
from matplotlib.patches import Ellipse

from pyrovae.viz.registry import FIGURES
from pyrovae.viz.figures import PathLike, plt, save_figure

MAX_POINTS = 5000  # points drawn at most; more only hide each other


def principal_axes(x: torch.Tensor, k: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """Data mean (D,) and the first ``k`` principal axes as columns (D, k)."""
    mean = x.mean(0)
    _, _, vh = torch.linalg.svd(x - mean, full_matrices=False)
    return mean, vh[:k].T


def _ellipse(ax, mean: np.ndarray, cov: np.ndarray, radius: float, color: str, style: str) -> None:
    values, vectors = np.linalg.eigh(cov)
    values = np.clip(values, 0.0, None)
    angle = math.degrees(math.atan2(vectors[1, 1], vectors[0, 1]))
    width, height = 2 * radius * np.sqrt(values[1]), 2 * radius * np.sqrt(values[0])
    ax.add_patch(Ellipse(mean, width, height, angle=angle, fill=False, edgecolor=color,
                         linestyle=style, linewidth=1.6))


def mixture_scatter(
    x: torch.Tensor,
    labels: torch.Tensor,
    weights: torch.Tensor,
    means: torch.Tensor,
    covariances: torch.Tensor,
    path: PathLike,
    title: str = "",
    feature_names: Optional[List[str]] = None,
    projection_data: Optional[torch.Tensor] = None,
) -> Path:
    """Scatter of ``x`` (N, D) coloured by ``labels``, with 1-sigma (solid)
    and 2-sigma (dashed) ellipses of each component (``covariances`` dense,
    (K, D, D)); D > 2 is projected on the principal axes of
    ``projection_data`` (default ``x``)."""
    x = x.detach().double().cpu()[:MAX_POINTS]
    labels = labels.cpu()[:MAX_POINTS]
    weights, means, covs = (t.detach().double().cpu() for t in (weights, means, covariances))
    d = x.shape[1]
    fig, ax = plt.subplots(figsize=(5.6, 4.8))
    if d == 1:
        grid = torch.linspace(float(x.min()) - 1.0, float(x.max()) + 1.0, 400, dtype=torch.float64)
        sd = covs[:, 0, 0].sqrt()
        comp = torch.distributions.Normal(means[:, 0], sd).log_prob(grid[:, None]).exp() * weights
        ax.hist(x[:, 0].numpy(), bins=40, density=True, color="0.8", label="data")
        for k in range(comp.shape[1]):
            ax.plot(grid, comp[:, k], color=f"C{k}", label=f"component {k} (w={weights[k]:.2f})")
        ax.plot(grid, comp.sum(1), color="k", linewidth=1.5, label="mixture")
        ax.set_xlabel(feature_names[0] if feature_names else "x")
        ax.set_ylabel("density")
    else:
        if d == 2:
            xy, mu, cv = x, means, covs
            names = feature_names or ["x1", "x2"]
        else:
            center, axes = principal_axes(
                x if projection_data is None else projection_data.detach().double().cpu()
            )
            xy = (x - center) @ axes
            mu = (means - center) @ axes
            cv = axes.T @ covs @ axes
            names = ["principal axis 1", "principal axis 2"]
        colors = [f"C{int(k) % 10}" for k in labels]
        ax.scatter(xy[:, 0], xy[:, 1], c=colors, s=9, alpha=0.55, linewidths=0)
        for k in range(means.shape[0]):
            color = f"C{k % 10}"
            _ellipse(ax, mu[k].numpy(), cv[k].numpy(), 1.0, color, "-")
            _ellipse(ax, mu[k].numpy(), cv[k].numpy(), 2.0, color, "--")
            ax.plot(mu[k, 0], mu[k, 1], marker="X", color=color, markeredgecolor="k", markersize=9,
                    label=f"component {k} (w={weights[k]:.2f})")
        ax.set_xlabel(names[0])
        ax.set_ylabel(names[1])
        ax.autoscale_view()
    ax.legend(fontsize=7, loc="best")
    ax.set_title(title or "mixture components (1 and 2 sigma)")
    fig.tight_layout()
    return save_figure(fig, path)


@FIGURES.register("gmm")
@FIGURES.register("bayes-gmm")
def mixture_figures(model, train, test, out_dir: PathLike, seed: int = 0) -> List[Path]:
    """``components.png``: training points coloured by ``model.predict`` with
    the components' 1- and 2-sigma ellipses (plug-in parameters for the
    Bayesian mixture)."""
    x = train.fixed(seed)
    params = model.mixture_parameters()
    kind = "Bayesian mixture, posterior means" if hasattr(model, "posterior_means") else "mixture"
    title = f"{kind}: K={model.K}, {model.covariance} covariance"
    if train.dim > 2:
        title += " (first two principal axes)"
    path = mixture_scatter(
        x, model.predict(x), params.weights, params.means, params.dense_covariances(),
        Path(out_dir) / "components.png", title=title,
    )
    return [path]
