"""Generative models p(x, z), one file per family, and the ``MODELS`` registry.

Each registry entry is a callable ``build(x_dim, **options) -> LatentModel``.
"""

from pyrovae.registry import Registry

MODELS = Registry("model")

from pyrovae.models.base import LatentModel  # noqa: E402
from pyrovae.models.vae import VAE  # noqa: E402
from pyrovae.models.linear import PPCA, BayesianFactorAnalysis, FactorAnalysis  # noqa: E402
from pyrovae.models.mixture import BayesianGaussianMixture, GaussianMixture  # noqa: E402

__all__ = ["MODELS", "LatentModel", "VAE", "FactorAnalysis", "PPCA", "BayesianFactorAnalysis", "GaussianMixture", "BayesianGaussianMixture"]
