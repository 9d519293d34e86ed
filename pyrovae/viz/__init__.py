"""Figures written to files: image grids, latent plots, curves.

``FIGURES`` maps a model family (its ``MODELS`` name) to a function
``figures(model, train, test, out_dir) -> list[Path]`` that writes the figures
specific to that family; ``pyrovae train`` calls it after the generic ones.
"""

from pyrovae.viz.registry import FIGURES
from pyrovae.viz import figures
from pyrovae.viz import vae  # noqa: F401  (registers the VAE figure sets)
from pyrovae.viz import mixture  # noqa: F401  (registers the mixture figure sets)
from pyrovae.viz import linear  # noqa: F401  (registers the FA/PPCA figure sets)

__all__ = ["FIGURES", "figures"]
