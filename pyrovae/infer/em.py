"""Expectation-maximization for the linear-Gaussian family (factor analysis and
probabilistic PCA), and the result record every pyrovae EM returns.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd


@dataclass
class EMResult:
    """What an EM run returns.

    Attributes:
        history: one row per iteration; at least the columns ``iteration`` and
            ``log_likelihood`` (mean log-likelihood per data point, in nats,
            of the parameters *after* that iteration's M-step).
        converged: whether the stopping tolerance was reached before
            ``max_iter``.
        n_iter: number of iterations run.
    """

    history: pd.DataFrame
    converged: bool
    n_iter: int
