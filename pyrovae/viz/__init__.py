"""Figures written to files: image grids, latent plots, curves.

``FIGURES`` maps a model family (its ``MODELS`` name) to a function
``figures(model, train, test, out_dir) -> list[Path]`` that writes the figures
specific to that family; ``pyrovae train`` calls it after the generic ones.
"""

from pyrovae.registry import Registry

FIGURES = Registry("figure set")

from pyrovae.viz import figures, vae  # noqa: E402,F401  (registers figure sets)
from pyrovae.viz import mixture  # noqa: E402,F401  (registers the mixture figure sets)
from pyrovae.viz import linear  # noqa: E402,F401  (registers the FA/PPCA figure sets)

__all__ = ["FIGURES", "figures"]
