"""pyrovae: latent-variable generative models on Pyro.

Models are Pyro programs, encoders are amortized guides, and any Pyro ELBO
trains them with SVI.
"""

from pyrovae.data import ArrayDataset, DATASETS, load_dataset
from pyrovae.guides import GUIDES
from pyrovae.infer import ELBOS, Evaluation, FitConfig, FitResult, evaluate, fit, make_objective
from pyrovae.models import MODELS, VAE, LatentModel
from pyrovae.models.mixture import BayesianGaussianMixture, GaussianMixture

__version__ = "0.1.0"

__all__ = [
    "ArrayDataset",
    "BayesianGaussianMixture",
    "DATASETS",
    "ELBOS",
    "Evaluation",
    "FitConfig",
    "FitResult",
    "GUIDES",
    "GaussianMixture",
    "LatentModel",
    "MODELS",
    "VAE",
    "evaluate",
    "fit",
    "load_dataset",
    "make_objective",
]
