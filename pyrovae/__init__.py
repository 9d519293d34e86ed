"""pyrovae: latent-variable generative models on Pyro.

Models are Pyro programs, encoders are amortized guides, and any Pyro ELBO
trains them with SVI.
"""

from pyrovae.data import ArrayDataset, DATASETS, load_dataset
from pyrovae.guides import GUIDES
from pyrovae.infer import ELBOS, Evaluation, FitConfig, FitResult, evaluate, fit, make_objective
from pyrovae.models import MODELS, VAE, LatentModel

__version__ = "0.1.0"

__all__ = [
    "ArrayDataset",
    "DATASETS",
    "ELBOS",
    "Evaluation",
    "FitConfig",
    "FitResult",
    "GUIDES",
    "LatentModel",
    "MODELS",
    "VAE",
    "evaluate",
    "fit",
    "load_dataset",
    "make_objective",
]
