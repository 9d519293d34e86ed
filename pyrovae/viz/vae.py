"""Figures for image models with an encoder and a decoder."""

from __future__ import annotations

from pathlib import Path
from typing import List

import torch

from pyrovae.viz.registry import FIGURES
from pyrovae.viz.figures import image_grid, latent_scatter, manifold, reconstructions


@FIGURES.register("vae")
def vae_figures(model, train, test, out_dir: Path, seed: int = 0) -> List[Path]:
    """Reconstructions, decoded prior samples (the means of p(x | z)) and, for
    2-D latents, the latent means of held-out data and the decoded manifold."""
    out_dir = Path(out_dir)
    shape = test.image_shape
    paths: List[Path] = []
    x = test.fixed(seed)[:1000]
    gen = torch.Generator().manual_seed(seed)
    if shape is not None:
        paths.append(reconstructions(x[:20], model.reconstruct(x[:20]), out_dir / "reconstructions.png", shape))
        # Means of p(x | z) read better as images than Bernoulli draws do.
        paths.append(image_grid(model.sample_mean(100, generator=gen), out_dir / "samples.png", shape,
                                title="means of p(x | z), z from the prior"))
    if model.z_dim == 2:
        y = None if test.y is None else test.y[:1000]
        paths.append(latent_scatter(model.encode(x), y, out_dir / "latent.png"))
        if shape is not None:
            paths.append(manifold(model.decode, out_dir / "manifold.png", shape))
    return paths
