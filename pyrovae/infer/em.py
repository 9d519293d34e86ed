"""Expectation-maximization for the linear-Gaussian family (factor analysis and
probabilistic PCA), and the result record every pyrovae EM returns.

Model: z ~ N(0, I_K), x | z ~ N(W z + mu, Psi), Psi diagonal (factor analysis)
or sigma^2 I (probabilistic PCA). The maximum-likelihood mu is the sample mean,
so EM works on the sample covariance S = (1/N) sum_n (x_n - mu)(x_n - mu)^T and
one iteration costs O(D^2 K) whatever N is [1, 2, 3].

E-step, with M = I + W^T Psi^{-1} W, G = M^{-1} and beta = G W^T Psi^{-1}:

.. math::

    E[z_n \\mid x_n] = \\beta (x_n - \\mu), \\qquad
    E[z_n z_n^\\top \\mid x_n] = G + \\beta (x_n - \\mu)(x_n - \\mu)^\\top \\beta^\\top,

so the averaged sufficient statistics are (1/N) sum E[z] (x - mu)^T = beta S
and (1/N) sum E[z z^T] = G + beta S beta^T.

M-step:

.. math::

    W_{new} = S \\beta^\\top (G + \\beta S \\beta^\\top)^{-1}, \\qquad
    \\Psi_{new} = \\mathrm{diag}(S - W_{new} \\beta S), \\qquad
    \\sigma^2_{new} = \\tfrac{1}{D} \\mathrm{tr}(S - W_{new} \\beta S).

Each iteration maximizes the expected complete-data log-likelihood, so the
log-likelihood never decreases. Noise variances are floored at ``min_noise``
(a Heywood case drives some psi_d to zero); the floored value is still the
constrained maximizer of the M-step, so monotonicity holds.

The log-likelihood per data point is computed from a square root U of S
(U U^T = S, from its eigendecomposition) with the matrix determinant lemma and
the same sum-of-squares form as
:func:`pyrovae.maths.linear.linear_gaussian_log_prob`:

.. math::

    \\tfrac{1}{N} \\log p(X) = -\\tfrac12 \\big[ D \\log 2\\pi + \\log\\det M
    + \\textstyle\\sum_d \\log \\psi_d
    + \\| \\Psi^{-1/2} (U - W \\beta U) \\|_F^2 + \\| \\beta U \\|_F^2 \\big],

which, unlike tr(Psi^{-1} S) - tr(G W^T Psi^{-1} S Psi^{-1} W), does not
cancel catastrophically when some psi_d are tiny.

References

[1] D. B. Rubin and D. T. Thayer, "EM algorithms for ML factor analysis",
    Psychometrika 47(1), 1982.
[2] Z. Ghahramani and G. E. Hinton, "The EM algorithm for mixtures of factor
    analyzers", Technical Report CRG-TR-96-1, University of Toronto, 1996.
[3] M. E. Tipping and C. M. Bishop, "Probabilistic principal component
    analysis", J. R. Statist. Soc. B 61(3), 1999 (section 3.2).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Tuple, Union

import pandas as pd
import torch

from pyrovae.maths.linear import LinearGaussianParams, ppca_closed_form


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


def covariance_root(cov: torch.Tensor) -> torch.Tensor:
    """U with U U^T = ``cov`` (symmetric positive semi-definite), from its
    eigendecomposition; tiny negative eigenvalues from rounding become 0."""
    evals, evecs = torch.linalg.eigh(cov)
    return evecs * evals.clamp_min(0.0).sqrt()


def log_likelihood_from_root(
    root: torch.Tensor, weight: torch.Tensor, noise: torch.Tensor
) -> torch.Tensor:
    """Mean log-likelihood per data point of N(mu, W W^T + diag(noise)) for data
    whose second moment about mu is S = ``root @ root.T`` (the sample
    covariance when mu is the sample mean). A scalar tensor."""
    d = root.shape[0]
    w_over_psi = weight / noise.unsqueeze(-1)
    m = weight.T @ w_over_psi + torch.eye(weight.shape[-1], dtype=root.dtype, device=root.device)
    chol = torch.linalg.cholesky(m)
    z_bar = torch.cholesky_solve(w_over_psi.T @ root, chol)  # beta U
    resid = root - weight @ z_bar
    quad = (resid.pow(2) / noise.unsqueeze(-1)).sum() + z_bar.pow(2).sum()
    log_det = 2.0 * torch.diagonal(chol).log().sum() + noise.log().sum()
    return -0.5 * (d * math.log(2 * math.pi) + log_det + quad)


def log_likelihood_from_moments(
    cov: torch.Tensor, weight: torch.Tensor, noise: torch.Tensor
) -> torch.Tensor:
    """:func:`log_likelihood_from_root` for S = ``cov`` given directly."""
    return log_likelihood_from_root(covariance_root(cov), weight, noise)


def _initial_params(
    x: torch.Tensor, cov: torch.Tensor, z_dim: int, isotropic: bool, init: str,
    seed: int, min_noise: float,
) -> LinearGaussianParams:
    d = x.shape[-1]
    var = torch.diagonal(cov)
    if init == "pca":
        p = ppca_closed_form(x, z_dim)
        if not isotropic:
            p.noise = torch.maximum(var - p.weight.pow(2).sum(-1), 1e-3 * var)
        return p
    if init == "random":
        gen = torch.Generator(device=x.device).manual_seed(seed)
        weight = torch.randn(d, z_dim, generator=gen, dtype=x.dtype, device=x.device)
        weight = weight * (var.mean() / z_dim).sqrt()
        noise = var.clone() if not isotropic else var.mean().expand(d).clone()
        return LinearGaussianParams(x.mean(0), weight, noise.clamp_min(min_noise))
    raise ValueError(f"init must be 'pca', 'random' or LinearGaussianParams, got {init!r}")


def fit_linear_gaussian_em(
    x: torch.Tensor,
    z_dim: int,
    *,
    isotropic: bool = False,
    max_iter: int = 1000,
    tol: float = 1e-6,
    init: Union[str, LinearGaussianParams] = "pca",
    seed: int = 0,
    min_noise: float = 1e-9,
) -> Tuple[LinearGaussianParams, EMResult]:
    """Maximum-likelihood factor analysis (or PPCA with ``isotropic=True``) by EM.

    Args:
        x: data, shape (N, D); use float64 to see monotonicity beyond float32
            rounding.
        z_dim: number of factors K (1 <= K < D).
        isotropic: Psi = sigma^2 I (probabilistic PCA) instead of diagonal.
        max_iter: most iterations.
        tol: stop once one iteration raises the mean log-likelihood per data
            point by less than ``tol`` nats.
        init: ``"pca"`` (PPCA closed form; for factor analysis the noise is the
            variance left unexplained per dimension), ``"random"`` (Gaussian
            loadings drawn with ``seed``, noise = data variance), or explicit
            :class:`~pyrovae.maths.linear.LinearGaussianParams` (its ``loc``
            is ignored: the maximum-likelihood mean is the sample mean).
        seed: seeds ``init="random"``.
        min_noise: floor on the noise variances.

    Returns:
        ``(params, result)``: the fitted parameters and an :class:`EMResult`
        whose history has columns ``iteration`` (0 is the initialization),
        ``log_likelihood`` (per data point, nats) and ``change``.
    """
    if x.dim() != 2:
        raise ValueError(f"x must have shape (N, D), got {tuple(x.shape)}")
    n, d = x.shape
    if not 1 <= z_dim < d:
        raise ValueError(f"need 1 <= z_dim < D; got z_dim={z_dim}, D={d}")
    if n < 2:
        raise ValueError(f"EM needs at least 2 data points, got {n}")
    if max_iter < 1:
        raise ValueError(f"max_iter must be >= 1, got {max_iter}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError("x has NaN or infinite values; drop or impute those rows first")
    loc = x.mean(0)
    r = x - loc
    cov = r.T @ r / n
    if isinstance(init, LinearGaussianParams):
        weight = init.weight.to(x).clone()
        noise = init.noise.to(x).clone()
        if isotropic:
            noise = noise.mean().expand(d).clone()
    else:
        p = _initial_params(x, cov, z_dim, isotropic, init, seed, min_noise)
        weight, noise = p.weight, p.noise
    if weight.shape != (d, z_dim) or noise.shape != (d,):
        raise ValueError(
            f"init has weight {tuple(weight.shape)} and noise {tuple(noise.shape)}; "
            f"expected ({d}, {z_dim}) and ({d},)"
        )
    noise = noise.clamp_min(min_noise)
    eye = torch.eye(z_dim, dtype=x.dtype, device=x.device)
    root = covariance_root(cov)
    ll = log_likelihood_from_root(root, weight, noise).item()
    rows = [{"iteration": 0, "log_likelihood": ll, "change": float("nan")}]
    converged = False
    it = 0
    for it in range(1, max_iter + 1):
        # E-step: posterior covariance G and the map beta from x - mu to E[z | x]
        w_over_psi = weight / noise.unsqueeze(-1)
        g = torch.cholesky_inverse(torch.linalg.cholesky(eye + weight.T @ w_over_psi))
        beta = g @ w_over_psi.T
        s_beta = cov @ beta.T  # (1/N) sum (x - mu) E[z]^T
        ezz = g + beta @ s_beta  # (1/N) sum E[z z^T]
        # M-step
        weight = torch.linalg.solve(ezz, s_beta.T).T
        noise = torch.diagonal(cov) - (weight * s_beta).sum(-1)
        if isotropic:
            noise = noise.mean().expand(d)
        noise = noise.clamp_min(min_noise)
        new_ll = log_likelihood_from_root(root, weight, noise).item()
        rows.append({"iteration": it, "log_likelihood": new_ll, "change": new_ll - ll})
        done = new_ll - ll < tol
        ll = new_ll
        if done:
            converged = True
            break
    params = LinearGaussianParams(loc, weight, noise.clone())
    return params, EMResult(history=pd.DataFrame(rows), converged=converged, n_iter=it)
