"""Expectation-maximization for Gaussian mixtures, with k-means++ seeding and
restarts.

The model is

.. math::

    p(x) = \\sum_{k=1}^K \\pi_k \\, \\mathcal{N}(x \\mid \\mu_k, \\Sigma_k),

with full or diagonal covariances. One EM iteration [1, 2] is

* E-step: responsibilities
  :math:`r_{nk} = \\pi_k \\mathcal{N}(x_n \\mid \\mu_k, \\Sigma_k) / p(x_n)`;
* M-step: with :math:`N_k = \\sum_n r_{nk}`,
  :math:`\\pi_k = N_k / N`, :math:`\\mu_k = \\sum_n r_{nk} x_n / N_k` and
  :math:`\\Sigma_k = \\sum_n r_{nk} (x_n - \\mu_k)(x_n - \\mu_k)^\\top / N_k
  + \\epsilon I` (only the diagonal for ``"diag"``).

With :math:`\\epsilon` = ``reg_covar`` = 0 the mean log-likelihood
:math:`\\frac1N \\sum_n \\log p(x_n)` never decreases from one iteration to the
next [1]. A small :math:`\\epsilon > 0` (scikit-learn's default, 1e-6) keeps
covariances invertible when a component shrinks onto a few points; it perturbs
monotonicity by at most about :math:`\\epsilon` per step.

The likelihood is unbounded and multimodal, and EM only finds a local
maximum. A bad start can leave one component with almost all points. Each run
therefore starts from k-means++ seeding [3] (greedy variant with
:math:`2 + \\lfloor \\ln K \\rfloor` candidates per centre, as in
scikit-learn), optionally refined by Lloyd's k-means iterations. It then takes
the M-step from the hard assignment to the nearest centre. ``n_init`` runs are
made from independent seedings and the one with the highest final
log-likelihood is kept.

All arithmetic is in float64. The closed forms (the parameter container,
component densities, responsibilities, the M-step and the seeding) are in
:mod:`pyrovae.maths.mixture`; this module runs the iterations and restarts.

References

[1] A. P. Dempster, N. M. Laird and D. B. Rubin, "Maximum Likelihood from
    Incomplete Data via the EM Algorithm", JRSS B 39(1), 1977.
[2] C. M. Bishop, "Pattern Recognition and Machine Learning", Springer 2006,
    section 9.2.2.
[3] D. Arthur and S. Vassilvitskii, "k-means++: The Advantages of Careful
    Seeding", SODA 2007.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import pandas as pd
import torch

from pyrovae.infer.em import EMResult
from pyrovae.maths.mixture import (
    MixtureParameters,
    check_covariance,
    initial_parameters,
    m_step,
)


@dataclass
class MixtureEM:
    """What :func:`fit_mixture_em` returns.

    Attributes:
        params: the kept run's parameters (float64).
        result: its :class:`~pyrovae.infer.em.EMResult`: ``history`` has one row
            per iteration with ``iteration`` and ``log_likelihood`` (mean
            log-likelihood per training point after that iteration's M-step).
        restarts: one row per run: ``init``, ``log_likelihood`` (final),
            ``n_iter``, ``converged``, ``kept``.
        log_likelihood: the kept run's final mean training log-likelihood.
    """

    params: MixtureParameters
    result: EMResult
    restarts: pd.DataFrame
    log_likelihood: float


def _run(
    x: torch.Tensor, params: MixtureParameters, max_iter: int, tol: float, reg_covar: float
) -> tuple[MixtureParameters, EMResult, float]:
    log_joint = params.log_joint(x)
    ll_n = torch.logsumexp(log_joint, -1)
    previous = current = ll_n.mean().item()
    rows: List[dict] = []
    converged = False
    for iteration in range(1, max_iter + 1):
        resp = torch.exp(log_joint - ll_n[:, None])
        params = m_step(x, resp, params.covariance, reg_covar)
        log_joint = params.log_joint(x)
        ll_n = torch.logsumexp(log_joint, -1)
        current = ll_n.mean().item()
        rows.append({"iteration": iteration, "log_likelihood": current})
        if abs(current - previous) < tol:
            converged = True
            break
        previous = current
    history = pd.DataFrame(rows, columns=["iteration", "log_likelihood"])
    return params, EMResult(history=history, converged=converged, n_iter=len(rows)), current


def fit_mixture_em(
    x: torch.Tensor,
    n_components: int,
    covariance: str = "full",
    *,
    max_iter: int = 500,
    tol: float = 1e-6,
    n_init: int = 5,
    seed: int = 0,
    reg_covar: float = 1e-6,
    init: str = "kmeans",
    init_params: Optional[MixtureParameters] = None,
) -> MixtureEM:
    """Maximum-likelihood Gaussian mixture by EM, best of ``n_init`` runs.

    Args:
        x: data, shape (N, D).
        n_components: K.
        covariance: ``"full"`` or ``"diag"``.
        max_iter: iterations per run at most.
        tol: a run stops when the mean log-likelihood per data point changes by
            less than ``tol`` nats in one iteration.
        n_init: runs from independent k-means++ seedings; the highest final
            log-likelihood is kept.
        seed: seeds the seedings (a private ``torch.Generator``; global RNG
            state is untouched).
        reg_covar: added to every covariance diagonal in the M-step.
        init: ``"kmeans"`` (seeding refined by Lloyd's iterations, as
            scikit-learn) or ``"kmeans++"`` (seeding alone).
        init_params: start one run from these parameters instead (``n_init``
            and ``init`` are then ignored).
    """
    check_covariance(covariance)
    if x.dim() != 2:
        raise ValueError(f"x must have shape (N, D), got {tuple(x.shape)}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError("x has NaN or infinite values; drop or impute them before EM")
    if max_iter < 1 or n_init < 1 or tol < 0 or reg_covar < 0:
        raise ValueError(
            f"need max_iter >= 1, n_init >= 1, tol >= 0 and reg_covar >= 0; got "
            f"max_iter={max_iter}, n_init={n_init}, tol={tol}, reg_covar={reg_covar}"
        )
    x = x.detach().to(torch.float64)
    if init_params is not None:
        if init_params.covariance != covariance or init_params.n_components != n_components:
            raise ValueError(
                f"init_params has {init_params.n_components} {init_params.covariance} "
                f"components but the fit asks for {n_components} {covariance} ones"
            )
        starts = [init_params.to(torch.float64)]
    else:
        gen = torch.Generator().manual_seed(seed)
        starts = [
            initial_parameters(x, n_components, covariance, init=init, reg_covar=reg_covar,
                               generator=gen)
            for _ in range(n_init)
        ]
    best = None
    summary = []
    for i, start in enumerate(starts):
        params, result, ll = _run(x, start, max_iter, tol, reg_covar)
        summary.append({"init": i, "log_likelihood": ll, "n_iter": result.n_iter,
                        "converged": result.converged})
        if best is None or ll > best[2]:
            best = (params, result, ll, i)
    params, result, ll, kept = best
    restarts = pd.DataFrame(summary)
    restarts["kept"] = restarts["init"] == kept
    return MixtureEM(params=params, result=result, restarts=restarts, log_likelihood=ll)
