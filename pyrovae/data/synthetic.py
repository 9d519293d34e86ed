"""Synthetic data sets drawn from models with known parameters, so that tests
and benchmarks can check recovery of the ground truth.

Each generator draws its parameters from a ``torch.Generator`` seeded by
``seed`` and the train and test points from two further streams derived from
the same seed, so both splits share the parameters and never share points.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np
import torch

from pyrovae.data.core import ArrayDataset
from pyrovae.data.registry import DATASETS

_STREAMS = {"params": 0, "train": 1, "test": 2}


def _generator(seed: int, stream: str) -> torch.Generator:
    state = np.random.SeedSequence([int(seed), _STREAMS[stream]]).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


@dataclass
class GMMTruth:
    """Parameters of a Gaussian mixture with known ground truth.

    Attributes:
        weights: mixing proportions, shape (K,).
        means: component means, shape (K, D).
        covariances: covariance matrices, shape (K, D, D) (diagonal ones when
            drawn with ``covariance="diag"``).
    """

    weights: torch.Tensor
    means: torch.Tensor
    covariances: torch.Tensor

    def log_likelihood(self, x: torch.Tensor) -> torch.Tensor:
        """Exact log p(x_n) under the true mixture, shape (N,)."""
        comp = torch.distributions.MultivariateNormal(self.means, self.covariances)
        return torch.logsumexp(comp.log_prob(x.unsqueeze(-2)) + self.weights.log(), -1)

    def sample(self, n: int, generator: Optional[torch.Generator] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """``n`` points and the components they came from."""
        z = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        eps = torch.randn(n, self.means.shape[1], generator=generator, dtype=self.means.dtype)
        chol = torch.linalg.cholesky(self.covariances)
        return self.means[z] + (chol[z] @ eps.unsqueeze(-1)).squeeze(-1), z


def gmm_truth(
    K: int = 3,
    x_dim: int = 2,
    covariance: str = "full",
    separation: float = 4.0,
    seed: int = 0,
) -> GMMTruth:
    """Draw mixture parameters with well-separated components.

    Weights ~ Dirichlet(5, ..., 5). Component standard deviations along the
    principal axes are uniform in [0.3, 1]; for ``"full"`` the axes are a
    uniformly random rotation, for ``"diag"`` the coordinate axes. Means are
    drawn from N(0, (separation * K^(1/D) / 2)^2 I), redrawn until every pair
    is at least ``separation`` apart, so with the default 4 the clusters are
    at least four largest standard deviations apart.
    """
    if covariance not in ("full", "diag"):
        raise ValueError(f"covariance must be 'full' or 'diag', got {covariance!r}")
    if K < 1 or x_dim < 1 or separation < 0:
        raise ValueError(f"need K >= 1, x_dim >= 1 and separation >= 0; got {K}, {x_dim}, {separation}")
    gen = _generator(seed, "params")
    dtype = torch.float64
    # torch's Dirichlet and Gamma samplers take no generator: normalized Gamma
    # draws from a numpy stream seeded through ``gen`` depend on ``seed`` only.
    gammas = torch.tensor(
        np.random.default_rng(int(torch.randint(2**62, (1,), generator=gen))).gamma(5.0, size=K),
        dtype=dtype,
    )
    weights = gammas / gammas.sum()
    spread = separation * K ** (1.0 / x_dim) / 2.0
    for _ in range(10_000):
        means = spread * torch.randn(K, x_dim, generator=gen, dtype=dtype)
        gaps = torch.cdist(means, means).masked_fill(torch.eye(K, dtype=torch.bool), math.inf)
        if K == 1 or bool(gaps.min() >= separation):
            break
    else:  # pragma: no cover - only for absurd separations
        raise ValueError(f"could not place {K} means {separation} apart; lower separation")
    sd = 0.3 + 0.7 * torch.rand(K, x_dim, generator=gen, dtype=dtype)
    if covariance == "diag":
        covariances = torch.diag_embed(sd.pow(2))
    else:
        q, r = torch.linalg.qr(torch.randn(K, x_dim, x_dim, generator=gen, dtype=dtype))
        # Sign fix makes the rotation Haar-distributed.
        q = q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1)).unsqueeze(-2)
        covariances = q @ torch.diag_embed(sd.pow(2)) @ q.transpose(-1, -2)
        covariances = 0.5 * (covariances + covariances.transpose(-1, -2))
    return GMMTruth(weights, means, covariances)


@DATASETS.register("synthetic-gmm")
def synthetic_gmm(
    split: str = "train",
    root: Optional[str] = None,
    n: Optional[int] = None,
    K: int = 3,
    x_dim: int = 2,
    covariance: str = "full",
    separation: float = 4.0,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> ArrayDataset:
    """Points from the Gaussian mixture :func:`gmm_truth` (same arguments),
    with their component labels as ``y``; ``gmm_truth(K, x_dim, covariance,
    separation, seed)`` returns the parameters they were drawn from. The data
    are not standardized, so the truth applies as is.

    Args:
        split: ``"train"`` (default 1000 points) or ``"test"`` (default 500).
        root: unused (nothing is read from disk).
        n: number of points in the split.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    n = (1000 if split == "train" else 500) if n is None else n
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    truth = gmm_truth(K, x_dim, covariance, separation, seed)
    x, z = truth.sample(n, _generator(seed, split))
    return ArrayDataset(x.to(torch.float32).to(device), z.to(device), name="synthetic-gmm")


# -- factor analysis and probabilistic PCA -------------------------------------------
@dataclass
class LinearGaussianTruth:
    """Parameters of x = W z + mu + eps, z ~ N(0, I_K), eps ~ N(0, diag(noise)).

    Attributes:
        loc: mu, shape (D,).
        weight: W, shape (D, K).
        noise: the noise variances (diagonal of Psi), shape (D,); all equal
            for probabilistic PCA.
    """

    loc: torch.Tensor
    weight: torch.Tensor
    noise: torch.Tensor

    def covariance(self) -> torch.Tensor:
        """The marginal covariance W W^T + Psi, which (unlike W, identified
        only up to rotation) recovery tests can compare directly."""
        return self.weight @ self.weight.T + torch.diag(self.noise)

    def log_likelihood(self, x: torch.Tensor) -> torch.Tensor:
        """Exact log p(x_n) = log N(x_n; mu, W W^T + Psi), shape (N,)."""
        mvn = torch.distributions.MultivariateNormal(self.loc, self.covariance())
        return mvn.log_prob(x.to(self.loc.dtype))

    def sample(self, n: int, generator: Optional[torch.Generator] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """``n`` points and the factors z they were generated from."""
        d, k = self.weight.shape
        z = torch.randn(n, k, generator=generator, dtype=self.weight.dtype)
        eps = torch.randn(n, d, generator=generator, dtype=self.weight.dtype)
        return z @ self.weight.T + self.loc + eps * self.noise.sqrt(), z


def linear_gaussian_truth(
    x_dim: int = 10,
    z_dim: int = 3,
    noise: str = "diagonal",
    noise_range: Tuple[float, float] = (0.1, 0.5),
    seed: int = 0,
) -> LinearGaussianTruth:
    """Draw factor-analysis (``noise="diagonal"``) or PPCA (``"isotropic"``) parameters.

    Loadings W_dk ~ N(0, 1), means mu_d ~ N(0, 1). Noise variances are
    uniform on ``noise_range`` per dimension (factor analysis), or one value
    uniform on that range shared by all dimensions (PPCA). Everything is
    float64 and depends only on the arguments.
    """
    if noise not in ("diagonal", "isotropic"):
        raise ValueError(f"noise must be 'diagonal' or 'isotropic', got {noise!r}")
    if not 1 <= z_dim < x_dim:
        raise ValueError(f"need 1 <= z_dim < x_dim; got z_dim={z_dim}, x_dim={x_dim}")
    low, high = noise_range
    if not 0 < low <= high:
        raise ValueError(f"noise_range must satisfy 0 < low <= high, got {noise_range}")
    gen = _generator(seed, "params")
    dtype = torch.float64
    weight = torch.randn(x_dim, z_dim, generator=gen, dtype=dtype)
    loc = torch.randn(x_dim, generator=gen, dtype=dtype)
    u = torch.rand(x_dim if noise == "diagonal" else 1, generator=gen, dtype=dtype)
    variances = (low + (high - low) * u).expand(x_dim).clone()
    return LinearGaussianTruth(loc, weight, variances)


def _linear_gaussian_split(
    noise: str, name: str, split: str, n: Optional[int], x_dim: int, z_dim: int,
    noise_range: Tuple[float, float], seed: int, device: str | torch.device,
) -> ArrayDataset:
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    n = (1000 if split == "train" else 500) if n is None else n
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    truth = linear_gaussian_truth(x_dim, z_dim, noise, tuple(noise_range), seed)
    x, _ = truth.sample(n, _generator(seed, split))
    return ArrayDataset(x.to(torch.float32).to(device), name=name)


@DATASETS.register("synthetic-fa")
def synthetic_fa(
    split: str = "train",
    root: Optional[str] = None,
    n: Optional[int] = None,
    x_dim: int = 10,
    z_dim: int = 3,
    noise_range: Tuple[float, float] = (0.1, 0.5),
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> ArrayDataset:
    """Points from a factor-analysis model; ``linear_gaussian_truth(x_dim,
    z_dim, "diagonal", noise_range, seed)`` returns its parameters. Not
    standardized, so the truth applies as is.

    Args:
        split: ``"train"`` (default 1000 points) or ``"test"`` (default 500).
        root: unused (nothing is read from disk).
        n: number of points in the split.
    """
    return _linear_gaussian_split(
        "diagonal", "synthetic-fa", split, n, x_dim, z_dim, noise_range, seed, device
    )


@DATASETS.register("synthetic-ppca")
def synthetic_ppca(
    split: str = "train",
    root: Optional[str] = None,
    n: Optional[int] = None,
    x_dim: int = 10,
    z_dim: int = 3,
    noise_range: Tuple[float, float] = (0.1, 0.5),
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> ArrayDataset:
    """Points from a probabilistic-PCA model (one noise variance);
    ``linear_gaussian_truth(x_dim, z_dim, "isotropic", noise_range, seed)``
    returns its parameters. Same arguments as :func:`synthetic_fa`."""
    return _linear_gaussian_split(
        "isotropic", "synthetic-ppca", split, n, x_dim, z_dim, noise_range, seed, device
    )
