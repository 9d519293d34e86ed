"""Approximate posteriors q(z | x) and the ``GUIDES`` registry.

Each entry builds an encoder network ``build(x_dim, z_dim, **options)`` whose
forward pass returns the parameters of q(z | x).
"""

from pyrovae.guides.registry import GUIDES
# Each file registers its encoders in GUIDES when imported.
from pyrovae.guides.encoder import AmortizedEncoder, DiagNormalEncoder, encoder_distribution
from pyrovae.guides.linear import LinearGaussianEncoder
from pyrovae.guides.meanfield import FullRank, MeanField

__all__ = ["GUIDES", "AmortizedEncoder", "DiagNormalEncoder", "encoder_distribution", "LinearGaussianEncoder", "MeanField", "FullRank"]
