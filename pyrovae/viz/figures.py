"""Generic figures: training curves, image grids, latent plots.

Every function writes one PNG and returns its path. Matplotlib runs on the
Agg backend, so no display is needed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional, Sequence, Tuple, Union

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

from pyrovae.files import atomic_path  # noqa: E402

PathLike = Union[str, Path]


def save_figure(fig: "plt.Figure", path: PathLike) -> Path:
    """Write ``fig`` to ``path`` atomically (creating its folder), close it,
    return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=110, bbox_inches="tight", format=path.suffix.lstrip(".") or "png")
    finally:
        plt.close(fig)
    return path


def loss_curves(history: pd.DataFrame, path: PathLike) -> Path:
    """Train and held-out ELBO per epoch, and the held-out ELBO split into its
    reconstruction term and its KL term."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    ax = axes[0]
    ax.plot(history["epoch"], history["train_elbo"], "o-", label="train ELBO")
    if history["test_elbo"].notna().any():
        ax.plot(history["epoch"], history["test_elbo"], "s-", label="held-out ELBO")
    ax.set_xlabel("epoch")
    ax.set_ylabel("nats per data point")
    ax.legend()
    ax.set_title("ELBO")
    ax = axes[1]
    if history["test_recon"].notna().any():
        ax.plot(history["epoch"], -history["test_recon"], "o-", label="-E_q log p(x|z)")
        ax.set_ylabel("reconstruction (nats)")
        ax2 = ax.twinx()
        ax2.plot(history["epoch"], history["test_kl"], "s-", color="C3", label="KL(q || p)")
        ax2.set_ylabel("KL (nats)", color="C3")
        ax.legend(loc="upper left")
        ax2.legend(loc="upper right")
    ax.set_xlabel("epoch")
    ax.set_title("held-out terms")
    fig.tight_layout()
    return save_figure(fig, path)


def image_grid(
    images: torch.Tensor,
    path: PathLike,
    image_shape: Tuple[int, ...] = (1, 28, 28),
    ncol: int = 10,
    title: Optional[str] = None,
    row_labels: Optional[Sequence[str]] = None,
) -> Path:
    """Tile flattened images (N, C*H*W) into one picture."""
    c, h, w = image_shape
    imgs = images.detach().cpu().reshape(-1, c, h, w).clamp(0, 1).numpy()
    n = len(imgs)
    nrow = -(-n // ncol)
    canvas = np.ones((nrow * (h + 2), ncol * (w + 2), c))
    for i, img in enumerate(imgs):
        r, q = divmod(i, ncol)
        canvas[r * (h + 2) + 1 : r * (h + 2) + 1 + h, q * (w + 2) + 1 : q * (w + 2) + 1 + w] = (
            img.transpose(1, 2, 0)
        )
    fig, ax = plt.subplots(figsize=(ncol * 0.6 + 0.6, nrow * 0.6 + 0.4))
    ax.imshow(canvas.squeeze(-1) if c == 1 else canvas, cmap="gray", vmin=0, vmax=1)
    ax.set_xticks([])
    if row_labels:
        ax.set_yticks([(h + 2) * (i + 0.5) for i in range(len(row_labels))], row_labels)
    else:
        ax.set_yticks([])
    if title:
        ax.set_title(title)
    return save_figure(fig, path)


def reconstructions(
    x: torch.Tensor, x_rec: torch.Tensor, path: PathLike, image_shape=(1, 28, 28), n: int = 10
) -> Path:
    """Test images (odd rows) above their reconstructions (even rows)."""
    rows = []
    for start in range(0, min(n * 2, len(x)), n):
        rows += [x[start : start + n], x_rec[start : start + n]]
    return image_grid(
        torch.cat(rows), path, image_shape, ncol=n, title="data / reconstruction",
        row_labels=["data", "recon"] * (len(rows) // 2),
    )


def latent_scatter(z: torch.Tensor, labels: Optional[torch.Tensor], path: PathLike) -> Path:
    """Posterior means of 2-D latents, coloured by label."""
    z = z.detach().cpu().numpy()
    fig, ax = plt.subplots(figsize=(6, 5.4))
    if labels is None:
        ax.scatter(z[:, 0], z[:, 1], s=3, alpha=0.6)
    else:
        sc = ax.scatter(z[:, 0], z[:, 1], c=labels.cpu().numpy(), cmap="tab10", s=3, alpha=0.7)
        fig.colorbar(sc, ax=ax, label="label")
    ax.set_xlabel("z[0]")
    ax.set_ylabel("z[1]")
    ax.set_title("latent means of held-out data")
    return save_figure(fig, path)


def manifold(decode, path: PathLike, image_shape=(1, 28, 28), n: int = 15, span: float = 2.5) -> Path:
    """Decoded means over an n x n grid of z in [-span, span]^2 (2-D latents)."""
    grid = torch.linspace(-span, span, n)
    zz = torch.stack(torch.meshgrid(grid.flip(0), grid, indexing="ij"), -1).reshape(-1, 2)
    with torch.no_grad():
        images = decode(zz)
    return image_grid(images, path, image_shape, ncol=n, title="decoded latent grid")


def latent_traversals(
    decode: Callable[[torch.Tensor], torch.Tensor],
    code: torch.Tensor,
    units: Sequence[int],
    values: torch.Tensor,
    path: PathLike,
    image_shape: Tuple[int, ...] = (1, 28, 28),
    row_labels: Optional[Sequence[str]] = None,
) -> Path:
    """One row per unit u of ``units``: the decoded means of ``code`` (K,)
    with coordinate u set to each of ``values[i]`` (shape (len(units),
    steps)), every other coordinate held."""
    code = code.detach().reshape(-1)
    values = torch.as_tensor(values, dtype=code.dtype, device=code.device)
    if values.dim() != 2 or values.shape[0] != len(units):
        raise ValueError(f"values must have shape (len(units), steps) = ({len(units)}, steps), "
                         f"got {tuple(values.shape)}")
    steps = values.shape[1]
    z = code.repeat(len(units) * steps, 1).reshape(len(units), steps, -1)
    for row, unit in enumerate(units):
        z[row, :, unit] = values[row]
    with torch.no_grad():
        images = decode(z.reshape(len(units) * steps, -1))
    labels = list(row_labels) if row_labels is not None else [f"z[{u}]" for u in units]
    return image_grid(images, path, image_shape, ncol=steps, row_labels=labels,
                      title="latent traversals: one unit varied, the others held")


def interpolations(
    decode: Callable[[torch.Tensor], torch.Tensor],
    start: torch.Tensor,
    end: torch.Tensor,
    path: PathLike,
    image_shape: Tuple[int, ...] = (1, 28, 28),
    steps: int = 10,
    x_start: Optional[torch.Tensor] = None,
    x_end: Optional[torch.Tensor] = None,
) -> Path:
    """One row per pair of codes (``start``, ``end``: (P, K)): the decoded
    means along the straight line z = (1 - t) start + t end, t in [0, 1],
    between the data images ``x_start`` and ``x_end`` when given."""
    if start.shape != end.shape or start.dim() != 2:
        raise ValueError(f"start and end must be codes of the same shape (P, K), got "
                         f"{tuple(start.shape)} and {tuple(end.shape)}")
    t = torch.linspace(0, 1, steps, dtype=start.dtype, device=start.device)[None, :, None]
    z = (1 - t) * start[:, None, :] + t * end[:, None, :]
    with torch.no_grad():
        decoded = decode(z.reshape(-1, start.shape[1])).reshape(start.shape[0], steps, -1)
    rows = [decoded]
    if x_start is not None and x_end is not None:
        rows = [x_start.reshape(start.shape[0], 1, -1).to(decoded), decoded,
                x_end.reshape(start.shape[0], 1, -1).to(decoded)]
    images = torch.cat(rows, 1)
    return image_grid(images.reshape(-1, images.shape[-1]), path, image_shape,
                      ncol=images.shape[1], title="interpolations between held-out images "
                      "(linear in z)")


def kl_per_dimension(dims: pd.DataFrame, path: PathLike, threshold: float = 0.01) -> Path:
    """Bar plots of a latent-statistics table (the ``dims`` frame of
    :func:`pyrovae.infer.latent_stats`): the KL to the prior per dimension
    (top) and the activity on a log scale with the threshold (bottom); active
    units are coloured, inactive ones grey. Dimensions of every site are laid
    side by side."""
    labels = [f"{s}[{d}]" if dims["site"].nunique() > 1 else str(d)
              for s, d in zip(dims["site"], dims["dim"])]
    colors = ["C0" if a else "0.7" for a in dims["active"]]
    pos = np.arange(len(dims))
    fig, (ax_kl, ax_act) = plt.subplots(2, 1, figsize=(max(5.0, 0.22 * len(dims) + 1.5), 5.2),
                                        sharex=True)
    kl = dims["kl"].to_numpy(dtype=float)
    if np.isfinite(kl).any():
        ax_kl.bar(pos, np.nan_to_num(kl), color=colors)
    else:
        ax_kl.text(0.5, 0.5, "no per-dimension KL (q or p does not factorize)",
                   ha="center", va="center", transform=ax_kl.transAxes)
    ax_kl.set_ylabel("KL(q || p) (nats)")
    n_active = int(dims["active"].sum())
    ax_kl.set_title(f"KL per dimension; {n_active} of {len(dims)} units active "
                    f"(activity > {threshold:g})")
    activity = dims["activity"].to_numpy(dtype=float)
    floor = max(threshold * 1e-3, 1e-8)
    ax_act.bar(pos, np.clip(activity, floor, None), color=colors)
    ax_act.axhline(threshold, color="C3", linestyle="--", linewidth=1, label="threshold")
    ax_act.set_yscale("log")
    ax_act.set_ylabel("activity Cov_x(E_q[z])")
    ax_act.legend(loc="best", fontsize=8)
    step = max(1, len(dims) // 40)
    ax_act.set_xticks(pos[::step], labels[::step], rotation=90 if len(dims) > 20 else 0,
                      fontsize=7)
    ax_act.set_xlabel("latent dimension")
    fig.tight_layout()
    return save_figure(fig, path)
