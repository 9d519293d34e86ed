"""Generative models p(x, z), one file per family, and the ``MODELS`` registry.

Each registry entry is a callable ``build(x_dim, **options) -> LatentModel``.
"""

from pyrovae.models.registry import MODELS
from pyrovae.models.base import (
    CAPABILITIES,
    Capability,
    LatentModel,
    capability,
    default_elbo,
    num_data,
)
# Each family's file registers its models in MODELS when imported.
from pyrovae.models.vae import VAE, VAEBase, VampPrior
from pyrovae.models.conv import ConvVAE
from pyrovae.models.ladder import LadderVAE
from pyrovae.models.linear import PPCA, BayesianFactorAnalysis, FactorAnalysis
from pyrovae.models.mixture import BayesianGaussianMixture, GaussianMixture

__all__ = ["MODELS", "LatentModel", "CAPABILITIES", "Capability", "capability", "default_elbo", "num_data", "VAE", "VAEBase", "VampPrior", "ConvVAE", "LadderVAE", "FactorAnalysis", "PPCA", "BayesianFactorAnalysis", "GaussianMixture", "BayesianGaussianMixture"]
