"""Objectives, training and evaluation."""

from pyrovae.infer.objectives import ELBOS, make_objective
from pyrovae.infer.fit import FitConfig, FitResult, fit
from pyrovae.infer.evaluate import Evaluation, evaluate, log_importance_weights

__all__ = [
    "ELBOS",
    "make_objective",
    "FitConfig",
    "FitResult",
    "fit",
    "Evaluation",
    "evaluate",
    "log_importance_weights",
]
