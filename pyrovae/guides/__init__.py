"""Approximate posteriors q(z | x) and the ``GUIDES`` registry.

Each entry builds an encoder network ``build(x_dim, z_dim, **options)`` whose
forward pass returns the parameters of q(z | x).
"""

from pyrovae.registry import Registry

GUIDES = Registry("guide")

from pyrovae.guides.encoder import DiagNormalEncoder, encoder_distribution  # noqa: E402
from pyrovae.guides.linear import LinearGaussianEncoder  # noqa: E402
from pyrovae.guides.meanfield import FullRank, MeanField  # noqa: E402

__all__ = ["GUIDES", "DiagNormalEncoder", "encoder_distribution", "LinearGaussianEncoder", "MeanField", "FullRank"]
