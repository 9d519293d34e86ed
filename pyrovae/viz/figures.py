"""Generic figures: training curves, image grids, latent plots.

Every function writes one PNG and returns its path. Matplotlib runs on the
Agg backend, so no display is needed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence, Tuple, Union

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
