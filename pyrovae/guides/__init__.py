"""Approximate posteriors q(z | x) and the ``GUIDES`` registry.

Each entry builds an encoder network ``build(x_dim, z_dim, **options)`` whose
forward pass returns the parameters of q(z | x). :class:`IAF` is a flow a
model puts on top of an encoder's Gaussian (its ``context_dim`` output).
"""

from pyrovae.guides.registry import GUIDES
# Each file registers its encoders in GUIDES when imported.
from pyrovae.guides.encoder import (
    AmortizedEncoder,
    ConvEncoder,
    DiagNormalEncoder,
    GaussianEncoder,
    encoder_distribution,
    gaussian_distribution,
)
from pyrovae.guides.iaf import IAF
from pyrovae.guides.linear import LinearGaussianEncoder
from pyrovae.guides.meanfield import FullRank, MeanField

__all__ = ["GUIDES", "AmortizedEncoder", "GaussianEncoder", "DiagNormalEncoder", "ConvEncoder", "IAF", "encoder_distribution", "gaussian_distribution", "LinearGaussianEncoder", "MeanField", "FullRank"]
