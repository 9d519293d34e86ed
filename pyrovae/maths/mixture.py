"""Closed forms of the Gaussian mixture family, on plain tensors.

.. math::

    p(x) = \\sum_{k=1}^K \\pi_k \\, \\mathcal{N}(x \\mid \\mu_k, \\Sigma_k),

with full or diagonal covariances: the parameter container
(:class:`MixtureParameters`, with the exact log-likelihood and the
responsibilities p(z_n = k | x_n)), the component log-densities through
Cholesky factors, the maximum-likelihood parameters given responsibilities
(the M-step of EM [1]), and the starting points: k-means++ seeding [2] (greedy
variant with :math:`2 + \\lfloor \\ln K \\rfloor` candidates per centre, as
in scikit-learn), Lloyd's k-means and the M-step from the hard assignment.

The mixture models (:mod:`pyrovae.models.mixture`) and the EM loop
(:mod:`pyrovae.infer.em_mixture`) both import this module.

References

[1] C. M. Bishop, "Pattern Recognition and Machine Learning", Springer 2006,
    section 9.2.2.
[2] D. Arthur and S. Vassilvitskii, "k-means++: The Advantages of Careful
    Seeding", SODA 2007.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

COVARIANCES = ("full", "diag")
INITS = ("kmeans", "kmeans++")


@dataclass
class MixtureParameters:
    """Parameters of a Gaussian mixture.

    Attributes:
        weights: mixing proportions, shape (K,), summing to 1.
        means: component means, shape (K, D).
        covariances: shape (K, D, D) for ``"full"``; the variances, shape
            (K, D), for ``"diag"`` (scikit-learn's layout).
        covariance: ``"full"`` or ``"diag"``.
    """

    weights: torch.Tensor
    means: torch.Tensor
    covariances: torch.Tensor
    covariance: str = "full"

    def __post_init__(self) -> None:
        check_covariance(self.covariance)
        k, d = self.means.shape
        expected = (k, d, d) if self.covariance == "full" else (k, d)
        if tuple(self.weights.shape) != (k,) or tuple(self.covariances.shape) != expected:
            raise ValueError(
                f"inconsistent mixture parameters: means {tuple(self.means.shape)} needs "
                f"weights ({k},) and {self.covariance} covariances {expected}; got "
                f"{tuple(self.weights.shape)} and {tuple(self.covariances.shape)}"
            )

    @property
    def n_components(self) -> int:
        return self.means.shape[0]

    def to(self, dtype: torch.dtype) -> "MixtureParameters":
        return MixtureParameters(
            self.weights.to(dtype), self.means.to(dtype), self.covariances.to(dtype),
            self.covariance,
        )

    def dense_covariances(self) -> torch.Tensor:
        """Covariance matrices, shape (K, D, D), for either layout."""
        if self.covariance == "full":
            return self.covariances
        return torch.diag_embed(self.covariances)

    def log_joint(self, x: torch.Tensor) -> torch.Tensor:
        """log pi_k + log N(x_n | mu_k, Sigma_k), shape (N, K)."""
        return component_log_density(x, self.means, self.covariances, self.covariance) + \
            self.weights.log()

    def log_likelihood(self, x: torch.Tensor) -> torch.Tensor:
        """Exact log p(x_n), shape (N,)."""
        return torch.logsumexp(self.log_joint(x), dim=-1)

    def responsibilities(self, x: torch.Tensor) -> torch.Tensor:
        """p(z_n = k | x_n), shape (N, K)."""
        return torch.softmax(self.log_joint(x), dim=-1)


def check_covariance(covariance: str) -> None:
    """Raise ``ValueError`` unless ``covariance`` is one of :data:`COVARIANCES`."""
    if covariance not in COVARIANCES:
        raise ValueError(f"covariance must be one of {COVARIANCES}, got {covariance!r}")


def component_log_density(
    x: torch.Tensor, means: torch.Tensor, covariances: torch.Tensor, covariance: str
) -> torch.Tensor:
    """log N(x_n | mu_k, Sigma_k), shape (N, K), through Cholesky factors."""
    d = x.shape[-1]
    diff = x.unsqueeze(0) - means.unsqueeze(1)  # (K, N, D)
    if covariance == "diag":
        maha = (diff.pow(2) / covariances.unsqueeze(1)).sum(-1)
        log_det = covariances.log().sum(-1, keepdim=True)
    else:
        chol, info = torch.linalg.cholesky_ex(covariances)
        if bool((info != 0).any()):
            raise ValueError(
                "a mixture component's covariance is not positive definite (a component "
                "collapsed onto too few points); use reg_covar > 0 or fewer components"
            )
        white = torch.linalg.solve_triangular(chol, diff.transpose(-1, -2), upper=False)
        maha = white.pow(2).sum(-2)
        log_det = 2.0 * torch.diagonal(chol, dim1=-2, dim2=-1).log().sum(-1, keepdim=True)
    return (-0.5 * (d * math.log(2 * math.pi) + log_det + maha)).T


def kmeans_plusplus(
    x: torch.Tensor, n_components: int, generator: Optional[torch.Generator] = None
) -> torch.Tensor:
    """Indices of ``n_components`` seeds chosen by greedy k-means++ [2].

    The first seed is uniform over the points; each further one is the best,
    by total squared distance to the nearest seed, of 2 + floor(ln K)
    candidates drawn with probability proportional to the squared distance to
    the seeds so far.
    """
    n = x.shape[0]
    if not 1 <= n_components <= n:
        raise ValueError(f"need 1 <= n_components <= number of points ({n}), got {n_components}")
    trials = 2 + int(math.log(n_components))
    first = int(torch.randint(n, (1,), generator=generator))
    chosen = [first]
    closest = (x - x[first]).pow(2).sum(-1)
    for _ in range(1, n_components):
        total = closest.sum()
        if total <= 0:  # every point sits on a seed: pick any unused point
            unused = torch.ones(n, dtype=torch.bool)
            unused[chosen] = False
            chosen.append(int(unused.nonzero()[0]))
            continue
        candidates = torch.multinomial(closest / total, trials, replacement=True, generator=generator)
        dist_c = torch.cdist(x[candidates], x).pow(2)  # (trials, N)
        potentials = torch.minimum(closest, dist_c).sum(-1)
        best = int(potentials.argmin())
        chosen.append(int(candidates[best]))
        closest = torch.minimum(closest, dist_c[best])
    return torch.tensor(chosen, dtype=torch.long)


def kmeans(x: torch.Tensor, centers: torch.Tensor, max_iter: int = 100) -> torch.Tensor:
    """Lloyd's iterations from ``centers``; returns the hard assignments (N,).
    A centre that loses all its points stays where it was."""
    labels = torch.cdist(x, centers).argmin(-1)
    for _ in range(max_iter):
        onehot = torch.nn.functional.one_hot(labels, centers.shape[0]).to(x.dtype)
        counts = onehot.sum(0)
        sums = onehot.T @ x
        nonempty = counts > 0
        centers = torch.where(nonempty[:, None], sums / counts.clamp_min(1)[:, None], centers)
        new = torch.cdist(x, centers).argmin(-1)
        if torch.equal(new, labels):
            break
        labels = new
    return labels


def m_step(
    x: torch.Tensor, resp: torch.Tensor, covariance: str, reg_covar: float = 1e-6
) -> MixtureParameters:
    """Maximum-likelihood parameters given responsibilities ``resp`` (N, K)."""
    # The tiny offset keeps an empty component's mean finite, as in scikit-learn.
    nk = resp.sum(0) + 10 * torch.finfo(resp.dtype).eps
    means = (resp.T @ x) / nk[:, None]
    diff = x.unsqueeze(0) - means.unsqueeze(1)  # (K, N, D)
    if covariance == "diag":
        cov = torch.einsum("nk,knd->kd", resp, diff.pow(2)) / nk[:, None] + reg_covar
    else:
        cov = torch.einsum("nk,knd,kne->kde", resp, diff, diff) / nk[:, None, None]
        cov = 0.5 * (cov + cov.transpose(-1, -2))
        cov = cov + reg_covar * torch.eye(x.shape[1], dtype=x.dtype)
    return MixtureParameters(nk / x.shape[0], means, cov, covariance)


def initial_parameters(
    x: torch.Tensor,
    n_components: int,
    covariance: str = "full",
    *,
    init: str = "kmeans",
    reg_covar: float = 1e-6,
    generator: Optional[torch.Generator] = None,
) -> MixtureParameters:
    """Starting point for EM or SVI: k-means++ seeds (refined by Lloyd's
    iterations when ``init="kmeans"``), then the M-step from the hard
    assignment of every point to its nearest centre."""
    check_covariance(covariance)
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    x = x.detach().to(torch.float64)
    seeds = x[kmeans_plusplus(x, n_components, generator)]
    if init == "kmeans":
        labels = kmeans(x, seeds)
    else:
        labels = torch.cdist(x, seeds).argmin(-1)
    resp = torch.nn.functional.one_hot(labels, n_components).to(x.dtype)
    return m_step(x, resp, covariance, reg_covar)
