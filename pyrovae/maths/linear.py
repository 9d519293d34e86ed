"""Closed forms of the linear-Gaussian family (factor analysis, probabilistic PCA).

For z ~ N(0, I_K) and x | z ~ N(W z + mu, Psi) with Psi = diag(psi) diagonal,
the marginal is

.. math::  p(x) = \\mathcal{N}(x; \\mu, C), \\qquad C = W W^\\top + \\Psi,

and the exact posterior is

.. math::

    p(z \\mid x) = \\mathcal{N}(M^{-1} W^\\top \\Psi^{-1} (x - \\mu), M^{-1}),
    \\qquad M = I_K + W^\\top \\Psi^{-1} W.

Everything here goes through the K x K capacitance matrix M only: the matrix
determinant lemma gives log det C = log det M + sum_d log psi_d and Woodbury's
identity C^{-1} = Psi^{-1} - Psi^{-1} W M^{-1} W^T Psi^{-1}, so no D x D matrix
is ever formed or inverted. The functions take plain tensors (or a
:class:`LinearGaussianParams`); the Pyro models of
:mod:`pyrovae.models.linear` and the EM of :mod:`pyrovae.infer.em` both use
them.

References

[1] M. E. Tipping and C. M. Bishop, "Probabilistic principal component
    analysis", J. R. Statist. Soc. B 61(3), 1999.
[2] H. F. Kaiser, "The varimax criterion for analytic rotation in factor
    analysis", Psychometrika 23(3), 1958.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Tuple

import pyro.distributions as dist
import torch


@dataclass
class LinearGaussianParams:
    """Parameters of x = W z + mu + eps, eps ~ N(0, diag(noise)).

    Attributes:
        loc: mu, shape (D,).
        weight: W, shape (D, K).
        noise: the diagonal of Psi (variances), shape (D,).
    """

    loc: torch.Tensor
    weight: torch.Tensor
    noise: torch.Tensor

    def covariance(self) -> torch.Tensor:
        """The dense marginal covariance W W^T + Psi (D x D), for checks and plots."""
        return self.weight @ self.weight.T + torch.diag(self.noise)


def _capacitance_cholesky(weight: torch.Tensor, noise: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Cholesky factor L of M = I + W^T Psi^{-1} W, and Psi^{-1} W."""
    w_over_psi = weight / noise.unsqueeze(-1)
    m = weight.T @ w_over_psi
    m = m + torch.eye(m.shape[-1], dtype=m.dtype, device=m.device)
    return torch.linalg.cholesky(m), w_over_psi


def linear_gaussian_log_prob(
    x: torch.Tensor, loc: torch.Tensor, weight: torch.Tensor, noise: torch.Tensor
) -> torch.Tensor:
    r"""log N(x; loc, W W^T + diag(noise)) per row of ``x``, shape (N,).

    Uses the matrix determinant lemma for log det C and, for the quadratic
    form, the identity

    .. math::

        r^\top C^{-1} r = \min_z\, (r - W z)^\top \Psi^{-1} (r - W z) + z^\top z
        = (r - W \bar z)^\top \Psi^{-1} (r - W \bar z) + \bar z^\top \bar z,

    with r = x - mu and z-bar = E[z | x] the posterior mean. It is a sum of
    non-negative terms, unlike the textbook Woodbury form
    r^T Psi^{-1} r - |L^{-1} W^T Psi^{-1} r|^2, which cancels catastrophically
    when some noise variances are tiny; and since z-bar is a minimizer,
    rounding errors in it enter only to second order. Cost O(N D K + D K^2),
    with only a K x K Cholesky factor.
    """
    d = x.shape[-1]
    chol, w_over_psi = _capacitance_cholesky(weight, noise)
    r = x - loc
    z_bar = torch.cholesky_solve((r @ w_over_psi).unsqueeze(-1), chol).squeeze(-1)
    resid = r - z_bar @ weight.T
    maha = (resid * resid / noise).sum(-1) + z_bar.pow(2).sum(-1)
    log_det = 2.0 * torch.diagonal(chol).log().sum() + noise.log().sum()
    return -0.5 * (d * math.log(2 * math.pi) + log_det + maha)


def linear_gaussian_posterior(
    x: torch.Tensor, loc: torch.Tensor, weight: torch.Tensor, noise: torch.Tensor
) -> dist.MultivariateNormal:
    """Exact p(z | x) = N(M^{-1} W^T Psi^{-1} (x - mu), M^{-1}), batch shape (N,)."""
    chol, w_over_psi = _capacitance_cholesky(weight, noise)
    cov = torch.cholesky_inverse(chol)
    mean = (x - loc) @ w_over_psi @ cov  # cov is symmetric, so this is (M^{-1} W^T Psi^{-1} r)^T
    return dist.MultivariateNormal(mean, scale_tril=torch.linalg.cholesky(cov))


def posterior_map(
    loc: torch.Tensor, weight: torch.Tensor, noise: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The exact posterior as an affine map: E[z | x] = A x + b, Cov = S S^T.

    Returns ``(A, b, S)`` with A (K, D), b (K,), S (K, K) lower triangular;
    these are the parameters at which the linear-Gaussian guide is exact.
    """
    chol, w_over_psi = _capacitance_cholesky(weight, noise)
    cov = torch.cholesky_inverse(chol)
    a = cov @ w_over_psi.T
    return a, -(a @ loc), torch.linalg.cholesky(cov)


def ppca_closed_form(x: torch.Tensor, z_dim: int) -> LinearGaussianParams:
    """Maximum-likelihood probabilistic PCA (Tipping and Bishop [1], eq. 7-8).

    With sample mean mu, sample covariance S = (1/N) sum (x - mu)(x - mu)^T
    (maximum-likelihood normalization) and eigenpairs lambda_1 >= ... >= lambda_D,
    U of S: sigma^2 = mean(lambda_{K+1..D}) and W = U_K (Lambda_K - sigma^2 I)^{1/2}
    (the rotation R = I). The loadings are unique only up to W -> W R.
    """
    n, d = x.shape
    if not 1 <= z_dim < d:
        raise ValueError(f"PPCA needs 1 <= z_dim < x_dim; got z_dim={z_dim}, x_dim={d}")
    loc = x.mean(0)
    r = x - loc
    cov = r.T @ r / n
    evals, evecs = torch.linalg.eigh(cov)
    evals, evecs = evals.flip(0), evecs.flip(1)
    sigma2 = evals[z_dim:].mean().clamp_min(torch.finfo(x.dtype).tiny)
    weight = evecs[:, :z_dim] * (evals[:z_dim] - sigma2).clamp_min(0.0).sqrt()
    return LinearGaussianParams(loc, weight, sigma2.expand(d).clone())


def varimax(
    weight: torch.Tensor, max_iter: int = 500, tol: float = 1e-10
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Varimax rotation of loadings (Kaiser [2]).

    Finds the orthogonal R maximizing the variance of the squared loadings
    within each factor, which pushes every loading towards 0 or a large
    magnitude ("simple structure") and makes factors easier to read. The
    likelihood is unchanged, since (W R)(W R)^T = W W^T. Uses the SVD
    iteration for the orthomax criterion. Each rotated factor is signed so
    that its largest loading is positive.

    Returns:
        ``(weight @ R, R)``.
    """
    d, k = weight.shape
    rot = torch.eye(k, dtype=weight.dtype, device=weight.device)
    if k == 1:
        return weight.clone(), rot
    objective = 0.0
    for _ in range(max_iter):
        lam = weight @ rot
        target = lam.pow(3) - lam * lam.pow(2).mean(0)
        u, s, vh = torch.linalg.svd(weight.T @ target)
        rot = u @ vh
        previous, objective = objective, s.sum().item()
        if previous and objective < previous * (1 + tol):
            break
    rotated = weight @ rot
    idx = rotated.abs().argmax(0)
    signs = torch.sign(rotated[idx, torch.arange(k)])
    signs[signs == 0] = 1
    return rotated * signs, rot * signs
