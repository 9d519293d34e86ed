"""Objectives, training and evaluation."""

from pyrovae.infer.objectives import ELBOS, make_objective
# pyrovae's own objectives register themselves in ELBOS when imported: this
# package's import is what puts them there.
from pyrovae.infer.iwae import IWAE, STL_ELBO
from pyrovae.infer.beta import BetaELBO
from pyrovae.infer.fit import FitConfig, FitResult, fit
# The multi-process training loop registers itself in fit.PARALLEL_ENGINES
# (without importing Lightning, which it loads only when used).
from pyrovae.infer import distributed  # noqa: F401
from pyrovae.infer.evaluate import Evaluation, evaluate, log_importance_weights
from pyrovae.infer.diagnostics import gradient_stats
from pyrovae.infer.latents import (InferenceGap, LatentStats, active_units, inference_gap,
                                   latent_stats)

__all__ = [
    "ELBOS",
    "make_objective",
    "FitConfig",
    "FitResult",
    "fit",
    "Evaluation",
    "evaluate",
    "log_importance_weights",
    "IWAE",
    "STL_ELBO",
    "BetaELBO",
    "gradient_stats",
    "LatentStats",
    "latent_stats",
    "active_units",
    "InferenceGap",
    "inference_gap",
]
