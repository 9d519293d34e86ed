"""pyrovae: latent-variable generative models on Pyro.

Models are Pyro programs, encoders are amortized guides, and any Pyro ELBO
trains them with SVI.
"""

from pyrovae.data import ArrayDataset, DATASETS, load_dataset
from pyrovae.guides import GUIDES
from pyrovae.infer import (
    ELBOS,
    IWAE,
    STL_ELBO,
    BetaELBO,
    Evaluation,
    FitConfig,
    FitResult,
    evaluate,
    fit,
    gradient_stats,
    make_objective,
)
from pyrovae.models import MODELS, VAE, ConvVAE, LadderVAE, LatentModel
from pyrovae.models.mixture import BayesianGaussianMixture, GaussianMixture
from pyrovae.models.linear import PPCA, BayesianFactorAnalysis, FactorAnalysis
from pyrovae.guides.meanfield import FullRank, MeanField
from pyrovae.infer.em import EMResult
from pyrovae.infer.posterior import to_inference_data
from pyrovae.bench import compare_results, load_suite, run_suite
from pyrovae.pipeline import EvalSettings, RunResult, RunSpec, build_model, load_run, read_spec, run
from pyrovae.seeding import seeded
from pyrovae.version import __version__

__all__ = [
    "EvalSettings",
    "RunResult",
    "RunSpec",
    "build_model",
    "load_run",
    "read_spec",
    "run",
    "seeded",
    "ArrayDataset",
    "BetaELBO",
    "IWAE",
    "STL_ELBO",
    "gradient_stats",
    "BayesianFactorAnalysis",
    "BayesianGaussianMixture",
    "DATASETS",
    "ELBOS",
    "EMResult",
    "Evaluation",
    "FactorAnalysis",
    "FitConfig",
    "FitResult",
    "FullRank",
    "GUIDES",
    "GaussianMixture",
    "LatentModel",
    "MODELS",
    "MeanField",
    "PPCA",
    "VAE",
    "ConvVAE",
    "LadderVAE",
    "compare_results",
    "evaluate",
    "fit",
    "load_dataset",
    "load_suite",
    "make_objective",
    "run_suite",
    "to_inference_data",
]
