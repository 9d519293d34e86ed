"""Figures for image models with an encoder and a decoder: the VAE families
(flat, convolutional, ladder), all read through ``model.encode``,
``model.decode`` and ``model.z_dim`` (for a ladder VAE these act on its top
layer)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import torch

from pyrovae.infer.latents import LatentStats, latent_stats
from pyrovae.viz.registry import FIGURES
from pyrovae.viz.figures import (image_grid, interpolations, kl_per_dimension, latent_scatter,
                                 latent_traversals, manifold, reconstructions)

#: Units shown in the traversal figure, the most active first.
TRAVERSAL_UNITS = 8
#: Points of each traversal, from -SPAN to +SPAN standard deviations.
TRAVERSAL_STEPS, SPAN = 9, 3.0
#: Pairs of held-out images interpolated between.
INTERPOLATION_PAIRS = 5


@FIGURES.register("vae")
@FIGURES.register("conv-vae")
@FIGURES.register("ladder-vae")
def vae_figures(model, train, test, out_dir: Path, seed: int = 0,
                latents: Optional[LatentStats] = None) -> List[Path]:
    """Reconstructions, decoded prior samples (the means of p(x | z)), latent
    traversals of the most active units, interpolations between held-out
    images, the KL per latent dimension with the active units marked and, for
    2-D latents, the latent means of held-out data and the decoded manifold.

    ``latents``: the latent statistics of the held-out data when already
    computed (the run pipeline passes its own); else they are computed here
    on the first 1000 held-out points.
    """
    out_dir = Path(out_dir)
    shape = test.image_shape
    paths: List[Path] = []
    x = test.fixed(seed)[:1000]
    gen = torch.Generator().manual_seed(seed)
    codes = model.encode(x)
    if shape is not None:
        paths.append(reconstructions(x[:20], model.reconstruct(x[:20]), out_dir / "reconstructions.png", shape))
        # Means of p(x | z) read better as images than Bernoulli draws do.
        paths.append(image_grid(model.sample_mean(100, generator=gen), out_dir / "samples.png", shape,
                                title="means of p(x | z), z from the prior"))
        paths.append(_traversals(model, codes, out_dir / "traversals.png", shape))
        pairs = min(INTERPOLATION_PAIRS, len(x) // 2)
        if pairs:
            paths.append(interpolations(
                model.decode, codes[0:2 * pairs:2], codes[1:2 * pairs:2],
                out_dir / "interpolations.png", shape, x_start=x[0:2 * pairs:2],
                x_end=x[1:2 * pairs:2]))
    if latents is None and len(x) >= 2:
        latents = latent_stats(model, x, seed=seed)
    if latents is not None:
        paths.append(kl_per_dimension(latents.dims, out_dir / "kl_per_dimension.png",
                                      latents.threshold))
    if model.z_dim == 2:
        y = None if test.y is None else test.y[:1000]
        paths.append(latent_scatter(codes, y, out_dir / "latent.png"))
        if shape is not None:
            paths.append(manifold(model.decode, out_dir / "manifold.png", shape))
    return paths


def _traversals(model, codes: torch.Tensor, path: Path, shape) -> Path:
    """Traversals around the first held-out image's code, over the units
    whose codes vary most across held-out data (their activity, as defined in
    :mod:`pyrovae.infer.latents`, since ``encode`` gives E_q[z | x]), each
    over its mean +- SPAN standard deviations."""
    spread = codes.var(0) if len(codes) > 1 else torch.ones_like(codes[0])
    units = torch.argsort(spread, descending=True)[:TRAVERSAL_UNITS].tolist()
    center = codes.mean(0)
    sd = spread.clamp_min(0).sqrt()
    grid = torch.linspace(-SPAN, SPAN, TRAVERSAL_STEPS, dtype=codes.dtype, device=codes.device)
    values = torch.stack([center[u] + sd[u] * grid for u in units])
    labels = [f"z[{u}] A={spread[u].item():.2g}" for u in units]
    return latent_traversals(model.decode, codes[0], units, values, path, shape, labels)
