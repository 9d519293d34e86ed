"""Figures for factor analysis and probabilistic PCA: the loadings as a heatmap
(varimax-rotated for readability; the likelihood does not depend on the
rotation) next to the noise variances, and the EM log-likelihood curve when
the model was fitted by EM."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np
import torch

from pyrovae.data.tabular import BFI_ITEMS
from pyrovae.maths.linear import varimax
from pyrovae.viz.registry import FIGURES
from pyrovae.viz.figures import PathLike, plt, save_figure


def _feature_names(data, d: int) -> List[str]:
    for attr in ("columns", "feature_names"):
        names = getattr(data, attr, None)
        if names is not None and len(names) == d:
            return [str(n) for n in names]
    if getattr(data, "name", "") == "bfi" and d == len(BFI_ITEMS):
        return list(BFI_ITEMS)
    return [f"x{i}" for i in range(d)]


def loadings_heatmap(
    weight: torch.Tensor,
    noise: torch.Tensor,
    path: PathLike,
    feature_names: Optional[Sequence[str]] = None,
    rotation: Optional[str] = "varimax",
    title: str = "loadings",
) -> Path:
    """Heatmap of W (rows: data dimensions, columns: factors) and a bar chart
    of the noise variances psi_d, which for standardized data are the
    uniquenesses (the share of each variable's variance no factor explains)."""
    w = weight.detach().double().cpu()
    if rotation == "varimax":
        w = varimax(w)[0]
    elif rotation is not None:
        raise ValueError(f"rotation must be 'varimax' or None, got {rotation!r}")
    w = w.numpy()
    psi = noise.detach().double().cpu().numpy()
    d, k = w.shape
    names = list(feature_names) if feature_names is not None else [f"x{i}" for i in range(d)]
    height = max(3.0, 0.28 * d + 1.2)
    fig, (ax, ax_psi) = plt.subplots(
        1, 2, figsize=(2.2 + 0.6 * k + 2.5, height), gridspec_kw={"width_ratios": [max(k, 1), 2]},
        sharey=True,
    )
    bound = float(np.abs(w).max()) or 1.0
    image = ax.imshow(w, cmap="RdBu_r", vmin=-bound, vmax=bound, aspect="auto")
    if d * k <= 400:  # annotate when the cells are large enough to read
        for i in range(d):
            for j in range(k):
                ax.text(j, i, f"{w[i, j]:.2f}", ha="center", va="center", fontsize=7)
    ax.set_xticks(range(k), [f"F{j + 1}" for j in range(k)])
    ax.set_yticks(range(d), names, fontsize=7 if d > 20 else 9)
    ax.set_title(f"{title}" + (" (varimax)" if rotation else ""))
    fig.colorbar(image, ax=ax, fraction=0.05, pad=0.02)
    ax_psi.barh(range(d), psi, color="C1")
    ax_psi.set_xlabel("noise variance psi")
    ax_psi.set_title("noise")
    fig.tight_layout()
    return save_figure(fig, path)


def em_curve(history, path: PathLike) -> Path:
    """Log-likelihood per data point against EM iteration."""
    fig, ax = plt.subplots(figsize=(5, 3.4))
    ax.plot(history["iteration"], history["log_likelihood"], "o-", ms=3)
    ax.set_xlabel("EM iteration")
    ax.set_ylabel("log-likelihood (nats per data point)")
    ax.set_title("EM")
    fig.tight_layout()
    return save_figure(fig, path)


@FIGURES.register("fa")
@FIGURES.register("ppca")
def linear_figures(model, train, test, out_dir: Path, seed: int = 0) -> List[Path]:
    """Loadings heatmap with noise variances, and the EM curve if fitted by EM."""
    out_dir = Path(out_dir)
    names = _feature_names(train, model.x_dim)
    paths = [loadings_heatmap(model.loadings, model.noise_variance, out_dir / "loadings.png", names)]
    result = getattr(model, "em_result_", None)
    if result is not None and len(result.history) > 1:
        paths.append(em_curve(result.history, out_dir / "em_log_likelihood.png"))
    return paths


@FIGURES.register("bayes-fa")
def bayesian_linear_figures(model, train, test, out_dir: Path, seed: int = 0) -> List[Path]:
    """Loadings heatmap of the guide's median loadings and noise variances."""
    med = model.posterior_median()
    names = _feature_names(train, model.x_dim)
    return [loadings_heatmap(med["weight"], med["noise"], Path(out_dir) / "loadings.png", names,
                             title="posterior median loadings")]
