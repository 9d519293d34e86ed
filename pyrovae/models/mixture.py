"""Gaussian mixtures: maximum likelihood (EM or SVI with the assignment
enumerated) and a Bayesian mixture fitted by mean-field variational inference.

Generative process of :class:`GaussianMixture`, for each data point n:

.. math::

    z_n \\sim \\mathrm{Categorical}(\\pi), \\qquad
    x_n \\mid z_n = k \\sim \\mathcal{N}(\\mu_k, \\Sigma_k),

with :math:`\\Sigma_k` full or diagonal, so that
:math:`\\log p(x_n) = \\operatorname{logsumexp}_k [\\log \\pi_k +
\\log \\mathcal{N}(x_n \\mid \\mu_k, \\Sigma_k)]` exactly. The parameters are
point estimates. They are fitted by EM [1] (:meth:`GaussianMixture.fit_em`), or
by SVI with ``TraceEnum_ELBO``. For SVI the model marks :math:`z_n` for parallel
enumeration and the guide is empty, so the ELBO is the exact log-likelihood [2].

:class:`BayesianGaussianMixture` puts priors on the parameters [3]:

.. math::

    \\pi \\sim \\mathrm{Dirichlet}(\\alpha 1_K), \\quad
    \\mu_{kd} \\sim \\mathcal{N}(m_0, s_0^2), \\quad
    \\sigma_{kd} \\sim \\mathrm{LogNormal}(a_0, b_0^2), \\quad
    L_k \\sim \\mathrm{LKJCholesky}(D, \\eta) \\ \\text{(full only)},

    \\Sigma_k = \\mathrm{diag}(\\sigma_k) L_k L_k^\\top \\mathrm{diag}(\\sigma_k)
    \\ \\text{(diagonal: } \\mathrm{diag}(\\sigma_k^2)\\text{)},

    \\log p(x_n \\mid \\pi, \\mu, \\Sigma) = \\operatorname{logsumexp}_k
    [\\log \\pi_k + \\log \\mathcal{N}(x_n \\mid \\mu_k, \\Sigma_k)].

The assignments are summed out in the model itself, so plain ``Trace_ELBO``
and ``TraceMeanField_ELBO`` train it without enumeration. The guide is
mean-field over the globals: a Dirichlet for :math:`\\pi`, Normals for the
means, LogNormals for the scales and, for full covariances, a Normal pushed
through the correlation-Cholesky bijection [4] for each :math:`L_k`.

Both classes start from k-means++ seeding refined by k-means (see
:mod:`pyrovae.maths.mixture`). The seeding avoids the known failure of
mixtures started at random, where one component takes almost all points and
the others starve. :meth:`initialize` does this explicitly; otherwise the first
call of ``model`` or ``guide`` initializes from the data it sees (the first
batch), unless ``init="random"``.

References

[1] A. P. Dempster, N. M. Laird and D. B. Rubin, "Maximum Likelihood from
    Incomplete Data via the EM Algorithm", JRSS B 39(1), 1977.
[2] F. Obermeyer, E. Bingham, M. Jankowiak, J. Chiu, N. Pradhan, A. Rush and
    N. Goodman, "Tensor Variable Elimination for Plated Factor Graphs",
    ICML 2019.
[3] C. M. Bishop, "Pattern Recognition and Machine Learning", Springer 2006,
    sections 9.2 and 10.2.
[4] D. Lewandowski, D. Kurowicka and H. Joe, "Generating random correlation
    matrices based on vines and extended onion method", J. Multivariate
    Analysis 100(9), 2009.
"""

from __future__ import annotations

import itertools
import math
from typing import Dict, List, Optional, Tuple, Union

import pyro
import pyro.distributions as dist
import torch
from torch import nn
from torch.distributions.transforms import CorrCholeskyTransform, LowerCholeskyTransform

from pyrovae.infer.em import EMResult
from pyrovae.infer.em_mixture import MixtureEM, fit_mixture_em
from pyrovae.maths.mixture import COVARIANCES, INITS, MixtureParameters, initial_parameters
from pyrovae.models.base import LatentModel
from pyrovae.models.registry import MODELS

MIXTURE_INITS = INITS + ("random",)


def _check_options(K: int, x_dim: int, covariance: str, init: str) -> None:
    if not isinstance(K, int) or K < 1:
        raise ValueError(f"K (the number of components) must be a positive integer, got {K!r}")
    if not isinstance(x_dim, int) or x_dim < 1:
        raise ValueError(f"x_dim must be a positive integer, got {x_dim!r}")
    if covariance not in COVARIANCES:
        raise ValueError(f"covariance must be one of {COVARIANCES}, got {covariance!r}")
    if init not in MIXTURE_INITS:
        raise ValueError(f"init must be one of {MIXTURE_INITS}, got {init!r}")


class _MixtureMethods(LatentModel):
    """What both mixtures derive from their (point or plug-in) parameters."""

    K: int
    x_dim: int
    covariance: str
    init: str
    seed: int

    def mixture_parameters(self) -> MixtureParameters:  # pragma: no cover - abstract
        raise NotImplementedError

    def set_parameters(self, params: MixtureParameters, num_data: Optional[int] = None) -> None:
        raise NotImplementedError  # pragma: no cover - abstract

    def _check_fits(self, params: MixtureParameters) -> None:
        if params.covariance != self.covariance or tuple(params.means.shape) != (self.K, self.x_dim):
            raise ValueError(
                f"parameters for {params.n_components} {params.covariance} components of "
                f"dimension {params.means.shape[1]} do not fit this mixture "
                f"(K={self.K}, x_dim={self.x_dim}, {self.covariance})"
            )

    # -- initialization ------------------------------------------------------------
    @torch.no_grad()
    def initialize(self, x: torch.Tensor, seed: Optional[int] = None, n_init: int = 1) -> None:
        """Set the parameters from k-means++ seeding, refined by k-means unless
        ``init="kmeans++"`` (so also for ``init="random"``, which only skips
        the automatic initialization): of ``n_init`` seedings the one whose
        parameters give the highest log-likelihood of ``x`` is used. ``seed``
        defaults to the constructor's."""
        x = self.as_data(x, dtype=torch.float64)  # the seeding computes in float64
        self.check_data(x)
        if n_init < 1:
            raise ValueError(f"n_init must be >= 1, got {n_init}")
        if x.shape[0] < self.K:
            raise ValueError(f"initialization needs at least K={self.K} points, got {x.shape[0]}")
        gen = torch.Generator().manual_seed(self.seed if seed is None else seed)
        method = "kmeans" if self.init == "random" else self.init
        x64 = x.detach().cpu()
        best, best_ll = None, -math.inf
        for _ in range(n_init):
            params = initial_parameters(x64, self.K, self.covariance, init=method, generator=gen)
            ll = params.log_likelihood(x64).mean().item()
            if best is None or ll > best_ll:
                best, best_ll = params, ll
        self.set_parameters(best, num_data=x.shape[0])

    def _maybe_initialize(self, x: torch.Tensor) -> None:
        if self.init != "random" and not bool(self.initialized):
            if x.shape[0] < self.K:
                raise ValueError(
                    f"this {type(self).__name__} is not initialized and initializes itself from "
                    f"the first batch it sees, which has {x.shape[0]} points, fewer than its "
                    f"K={self.K} components: give it at least {self.K} points (a larger batch "
                    "or training set), or call initialize(x) or fit it before evaluating"
                )
            self.initialize(x)

    # -- predictions -----------------------------------------------------------
    def check_data(self, x: torch.Tensor) -> None:
        """Raise a clear error for data the mixture cannot score."""
        x = self.as_data(x)  # converts and checks the columns
        if not bool(torch.isfinite(x).all()):
            raise ValueError("the data has NaN or infinite values; drop or impute them first")

    @torch.no_grad()
    def predict_proba(self, x: torch.Tensor) -> torch.Tensor:
        """Responsibilities p(z_n = k | x_n), shape (N, K); rows sum to 1."""
        x = self.as_data(x)
        self.check_data(x)
        params = self.mixture_parameters()
        return self.finite_result(params.responsibilities(x.to(params.means.dtype)).to(x.dtype),
                                  x, "predict_proba")

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Most probable component of each point, shape (N,)."""
        return self.predict_proba(x).argmax(-1)

    def posterior(self, x: torch.Tensor) -> dist.Categorical:
        """p(z | x) as a batch of N categorical distributions."""
        return dist.Categorical(probs=self.predict_proba(x))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """The responsibilities: the posterior over the assignment."""
        return self.predict_proba(x)

    @torch.no_grad()
    def sample(
        self, n: int, generator: Optional[torch.Generator] = None, return_labels: bool = False
    ) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
        """``n`` draws x ~ p(x), shape (n, D); with ``return_labels`` also the
        components z they came from, shape (n,)."""
        params = self.mixture_parameters()
        device = params.means.device
        where = device if generator is None else generator.device  # draw where the generator is
        z = torch.multinomial(params.weights.to(where), n, replacement=True, generator=generator).to(device)
        eps = torch.randn(n, self.x_dim, generator=generator, dtype=params.means.dtype, device=where).to(device)
        if params.covariance == "diag":
            x = params.means[z] + params.covariances[z].sqrt() * eps
        else:
            chol = torch.linalg.cholesky(params.covariances)
            x = params.means[z] + (chol[z] @ eps.unsqueeze(-1)).squeeze(-1)
        dtype = next(self.parameters()).dtype
        return (x.to(dtype), z) if return_labels else x.to(dtype)

    # -- parameters (sklearn's fitted-attribute layout) -----------------------------
    @property
    def weights(self) -> torch.Tensor:
        """Mixing proportions, shape (K,)."""
        return self.mixture_parameters().weights

    @property
    def means(self) -> torch.Tensor:
        """Component means, shape (K, D)."""
        return self.mixture_parameters().means

    @property
    def covariances(self) -> torch.Tensor:
        """(K, D, D) for full covariances, the variances (K, D) for diagonal ones."""
        return self.mixture_parameters().covariances

    @property
    def covariance_matrices(self) -> torch.Tensor:
        """Covariance matrices, shape (K, D, D), for either layout."""
        return self.mixture_parameters().dense_covariances()


class _PointParameters(nn.Module):
    """Unconstrained maximum-likelihood parameters: softmax logits, means and
    log-scales (diagonal) or an unconstrained matrix mapped to a Cholesky
    factor by ``LowerCholeskyTransform`` (lower triangle kept, diagonal
    exponentiated)."""

    def __init__(self, K: int, x_dim: int, covariance: str, generator: torch.Generator) -> None:
        super().__init__()
        self.covariance = covariance
        self.logits = nn.Parameter(torch.zeros(K))
        self.loc = nn.Parameter(torch.randn(K, x_dim, generator=generator))
        shape = (K, x_dim) if covariance == "diag" else (K, x_dim, x_dim)
        self.raw_scale = nn.Parameter(torch.zeros(shape))

    def constrained(self) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(weights (K,), means (K, D), scales (K, D) or Cholesky factors (K, D, D))."""
        weights = torch.softmax(self.logits, -1)
        if self.covariance == "diag":
            return weights, self.loc, self.raw_scale.exp()
        return weights, self.loc, LowerCholeskyTransform()(self.raw_scale)


@MODELS.register("gmm")
def gmm(x_dim: int, K: Optional[int] = None, z_dim: Optional[int] = None, **options) -> "GaussianMixture":
    """Build a :class:`GaussianMixture`. The latent variable of a mixture is
    the assignment, so ``z_dim`` (the CLI's ``--z-dim``) is accepted as the
    number of components K when K is not given (default 2)."""
    return GaussianMixture(_components(K, z_dim), x_dim, **options)


def _components(K: Optional[int], z_dim: Optional[int]) -> int:
    if K is not None and z_dim is not None and K != z_dim:
        raise ValueError(f"K={K} and z_dim={z_dim} disagree; a mixture's z_dim is its K")
    return K if K is not None else (z_dim if z_dim is not None else 2)


class GaussianMixture(_MixtureMethods):
    """Gaussian mixture with point-estimated parameters (see the module
    docstring for the generative process).

    Train it by EM (:meth:`fit_em`) or by SVI with ``TraceEnum_ELBO``
    (``max_plate_nesting=1``); the guide is empty because the only latent
    variable, the assignment ``z``, is enumerated in the model. Other ELBOs
    would sample ``z`` from the prior instead and are not suitable.

    Args:
        K: number of components.
        x_dim: data dimension D.
        covariance: ``"full"`` or ``"diag"``.
        init: ``"kmeans"`` (k-means++ seeding refined by k-means),
            ``"kmeans++"`` (seeding alone) or ``"random"`` (means drawn from
            N(0, I), unit covariances, equal weights: no data-dependent start).
        seed: seeds the random start and the seeding.
    """

    #: The assignment is enumerated out, so this objective gives exact gradients
    #: of the marginal likelihood; ``pyrovae train gmm`` uses it by default.
    default_elbo = "TraceEnum_ELBO"

    def __init__(
        self, K: int, x_dim: int, covariance: str = "full", init: str = "kmeans", seed: int = 0
    ) -> None:
        super().__init__()
        _check_options(K, x_dim, covariance, init)
        self._config = dict(K=K, x_dim=x_dim, covariance=covariance, init=init, seed=seed)
        self.K, self.x_dim, self.covariance, self.init, self.seed = K, x_dim, covariance, init, seed
        self.mixture = _PointParameters(K, x_dim, covariance, torch.Generator().manual_seed(seed))
        # A buffer, so that a model restored from a checkpoint is not re-seeded.
        self.register_buffer("initialized", torch.tensor(False))
        self.em_fit: Optional[MixtureEM] = None

    # -- the two Pyro programs -------------------------------------------------
    def model(self, x: torch.Tensor) -> None:
        self._maybe_initialize(x)
        self.register("mixture", self.mixture)
        weights, loc, scale = self.mixture.constrained()
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Categorical(weights), infer={"enumerate": "parallel"})
            pyro.sample("x", self._component(loc[z], scale[z]), obs=x)

    def guide(self, x: torch.Tensor) -> None:
        """Empty: the assignment is summed out by enumeration in the model."""

    # -- exact quantities ------------------------------------------------------
    def _component(self, loc: torch.Tensor, scale: torch.Tensor) -> dist.Distribution:
        if self.covariance == "diag":
            return dist.Normal(loc, scale).to_event(1)
        return dist.MultivariateNormal(loc, scale_tril=scale)

    def log_marginal(self, x: torch.Tensor) -> torch.Tensor:
        """Exact log p(x_n) = logsumexp_k [log pi_k + log N(x_n | mu_k, Sigma_k)], shape (N,)."""
        x = self.as_data(x)
        self.check_data(x)
        weights, loc, scale = self.mixture.constrained()
        log_joint = self._component(loc, scale).log_prob(x.unsqueeze(-2)) + weights.log()
        return self.finite_result(torch.logsumexp(log_joint, -1), x, "log_marginal")

    def mixture_parameters(self) -> MixtureParameters:
        with torch.no_grad():
            weights, loc, scale = self.mixture.constrained()
            cov = scale.pow(2) if self.covariance == "diag" else scale @ scale.transpose(-1, -2)
            return MixtureParameters(weights.clone(), loc.clone(), cov, self.covariance)

    @torch.no_grad()
    def set_parameters(self, params: MixtureParameters, num_data: Optional[int] = None) -> None:
        """Copy ``params`` (any dtype) into the module; marks the model initialized."""
        self._check_fits(params)
        m = self.mixture
        # The clamp keeps log-weights finite when EM empties a component.
        m.logits.copy_(params.weights.clamp_min(1e-300).log().to(m.logits))
        m.loc.copy_(params.means.to(m.loc))
        if self.covariance == "diag":
            m.raw_scale.copy_((0.5 * params.covariances.log()).to(m.raw_scale))
        else:
            chol = torch.linalg.cholesky(params.covariances.double())
            m.raw_scale.copy_(LowerCholeskyTransform().inv(chol).to(m.raw_scale))
        self.initialized.fill_(True)

    def fit_em(
        self,
        x: torch.Tensor,
        max_iter: int = 500,
        tol: float = 1e-6,
        n_init: int = 5,
        seed: Optional[int] = None,
        reg_covar: float = 1e-6,
        init_params: Optional[MixtureParameters] = None,
    ) -> EMResult:
        """Fit by EM (best of ``n_init`` k-means++-seeded runs) and keep the
        result; see :func:`pyrovae.infer.em_mixture.fit_mixture_em`. ``seed``
        defaults to the constructor's. The full record, with one row per
        restart, is kept as ``self.em_fit``."""
        x = self.as_data(x, dtype=torch.float64)  # EM computes in float64
        self.check_data(x)
        method = "kmeans" if self.init == "random" else self.init
        self.em_fit = fit_mixture_em(
            x, self.K, self.covariance, max_iter=max_iter, tol=tol, n_init=n_init,
            seed=self.seed if seed is None else seed, reg_covar=reg_covar, init=method,
            init_params=init_params,
        )
        self.set_parameters(self.em_fit.params)
        return self.em_fit.result


class _MeanFieldParameters(nn.Module):
    """Variational parameters of the Bayesian mixture's mean-field guide."""

    def __init__(self, K: int, x_dim: int, covariance: str, generator: torch.Generator) -> None:
        super().__init__()
        self.log_concentration = nn.Parameter(torch.zeros(K))
        self.loc_loc = nn.Parameter(torch.randn(K, x_dim, generator=generator))
        self.loc_log_scale = nn.Parameter(torch.full((K, x_dim), math.log(0.1)))
        self.scale_loc = nn.Parameter(torch.zeros(K, x_dim))
        self.scale_log_scale = nn.Parameter(torch.full((K, x_dim), math.log(0.1)))
        if covariance == "full" and x_dim > 1:
            n_corr = x_dim * (x_dim - 1) // 2
            self.corr_loc = nn.Parameter(torch.zeros(K, n_corr))
            self.corr_log_scale = nn.Parameter(torch.full((K, n_corr), math.log(0.1)))


@MODELS.register("bayes-gmm")
def bayes_gmm(
    x_dim: int, K: Optional[int] = None, z_dim: Optional[int] = None, **options
) -> "BayesianGaussianMixture":
    """Build a :class:`BayesianGaussianMixture`; ``z_dim`` is accepted as K
    (see :func:`gmm`)."""
    return BayesianGaussianMixture(_components(K, z_dim), x_dim, **options)


class BayesianGaussianMixture(_MixtureMethods):
    """Bayesian Gaussian mixture with a mean-field guide over the globals (see
    the module docstring for the priors).

    The model sums the assignments out with logsumexp, so ``Trace_ELBO``,
    ``TraceMeanField_ELBO`` (analytic KL for the Dirichlet, Normal and
    LogNormal sites; a sampled term for the LKJ site) and any other ELBO train
    it. Predictions (``predict_proba``, ``predict``, ``sample``, the
    ``weights``/``means``/``covariances`` properties) use the plug-in
    parameters of :meth:`mixture_parameters`.

    Args:
        K: number of components.
        x_dim: data dimension D.
        covariance: ``"full"`` (scales and an LKJ correlation per component)
            or ``"diag"``.
        num_data: size of the whole training set when training on
            mini-batches: the likelihood of a batch is then scaled by
            ``num_data / batch size`` so the prior keeps its weight. ``None``
            treats every batch as the whole data set (full-batch training).
        concentration: alpha of the symmetric Dirichlet prior on the weights.
        loc_prior_loc, loc_prior_scale: m_0 and s_0 of the Normal prior on
            every mean coordinate (defaults suit standardized data).
        scale_prior_loc, scale_prior_scale: a_0 and b_0 of the LogNormal prior
            on every component standard deviation.
        lkj_concentration: eta of the LKJ prior (1 is uniform over
            correlation matrices; larger favours weaker correlations).
        init, seed: as for :class:`GaussianMixture`.
    """

    def __init__(
        self,
        K: int,
        x_dim: int,
        covariance: str = "diag",
        num_data: Optional[int] = None,
        concentration: float = 1.0,
        loc_prior_loc: float = 0.0,
        loc_prior_scale: float = 5.0,
        scale_prior_loc: float = 0.0,
        scale_prior_scale: float = 1.0,
        lkj_concentration: float = 1.0,
        init: str = "kmeans",
        seed: int = 0,
    ) -> None:
        super().__init__()
        _check_options(K, x_dim, covariance, init)
        positive = dict(concentration=concentration, loc_prior_scale=loc_prior_scale,
                        scale_prior_scale=scale_prior_scale, lkj_concentration=lkj_concentration)
        for name, value in positive.items():
            if not value > 0:
                raise ValueError(f"{name} must be > 0, got {value!r}")
        if num_data is not None and num_data < 1:
            raise ValueError(f"num_data must be a positive integer or None, got {num_data!r}")
        self._config = dict(
            K=K, x_dim=x_dim, covariance=covariance, num_data=num_data,
            loc_prior_loc=loc_prior_loc, scale_prior_loc=scale_prior_loc, init=init, seed=seed,
            **positive,
        )
        self.K, self.x_dim, self.covariance, self.init, self.seed = K, x_dim, covariance, init, seed
        self.num_data = num_data
        self.concentration, self.lkj_concentration = float(concentration), float(lkj_concentration)
        self.loc_prior = (float(loc_prior_loc), float(loc_prior_scale))
        self.scale_prior = (float(scale_prior_loc), float(scale_prior_scale))
        self.has_corr = covariance == "full" and x_dim > 1
        self.variational = _MeanFieldParameters(
            K, x_dim, covariance, torch.Generator().manual_seed(seed)
        )
        self.register_buffer("initialized", torch.tensor(False))

    # -- the two Pyro programs -------------------------------------------------
    def _data_plate(self, x: torch.Tensor) -> pyro.plate:
        if self.num_data is None:
            return pyro.plate("data", x.shape[0])
        return pyro.plate("data", self.num_data, subsample=torch.arange(x.shape[0], device=x.device))

    def model(self, x: torch.Tensor) -> None:
        self._maybe_initialize(x)
        K, D = self.K, self.x_dim
        weights = pyro.sample("weights", dist.Dirichlet(x.new_full((K,), self.concentration)))
        with pyro.plate("components", K):
            loc = pyro.sample(
                "loc", dist.Normal(x.new_full((D,), self.loc_prior[0]), self.loc_prior[1]).to_event(1)
            )
            scale = pyro.sample(
                "scale",
                dist.LogNormal(x.new_full((D,), self.scale_prior[0]), self.scale_prior[1]).to_event(1),
            )
            corr = None
            if self.has_corr:
                corr = pyro.sample("corr", dist.LKJCholesky(D, x.new_tensor(self.lkj_concentration)))
        # Components get batch shape (..., 1, K) so that the data (N, 1, D)
        # broadcasts against them, also under vectorized particles.
        if corr is None:
            component = dist.Normal(loc.unsqueeze(-3), scale.unsqueeze(-3)).to_event(1)
        else:
            tril = scale.unsqueeze(-1) * corr
            component = dist.MultivariateNormal(loc.unsqueeze(-3), scale_tril=tril.unsqueeze(-4))
        with self._data_plate(x):
            log_joint = component.log_prob(x.unsqueeze(-2)) + weights.log().unsqueeze(-2)
            pyro.factor("x", torch.logsumexp(log_joint, -1))

    def guide(self, x: torch.Tensor) -> None:
        self._maybe_initialize(x)
        self.register("variational", self.variational)
        v = self.variational
        pyro.sample("weights", dist.Dirichlet(v.log_concentration.exp()))
        with pyro.plate("components", self.K):
            pyro.sample("loc", dist.Normal(v.loc_loc, v.loc_log_scale.exp()).to_event(1))
            pyro.sample("scale", dist.LogNormal(v.scale_loc, v.scale_log_scale.exp()).to_event(1))
            if self.has_corr:
                base = dist.Normal(v.corr_loc, v.corr_log_scale.exp()).to_event(1)
                pyro.sample("corr", dist.TransformedDistribution(base, [CorrCholeskyTransform()]))

    # -- posterior summaries ---------------------------------------------------
    @torch.no_grad()
    def posterior_means(self) -> Dict[str, torch.Tensor]:
        """Posterior means under the guide: ``weights`` (K,), ``loc`` (K, D),
        ``scale`` (K, D); and ``corr`` (K, D, D), the correlation matrix at the
        median of its guide factor (its mean has no closed form)."""
        v = self.variational
        conc = v.log_concentration.exp()
        scale = (v.scale_loc + 0.5 * (2 * v.scale_log_scale).exp()).exp()
        out = {"weights": conc / conc.sum(), "loc": v.loc_loc.clone(), "scale": scale}
        if self.has_corr:
            chol = CorrCholeskyTransform()(v.corr_loc)
            out["corr"] = chol @ chol.transpose(-1, -2)
        elif self.covariance == "full":
            out["corr"] = torch.ones(self.K, 1, 1, dtype=scale.dtype, device=scale.device)
        return out

    def mixture_parameters(self) -> MixtureParameters:
        """Plug-in parameters: posterior-mean weights, means and scales, and
        Sigma_k = diag(s_k) C_k diag(s_k) with the correlation C_k of
        :meth:`posterior_means`."""
        post = self.posterior_means()
        s = post["scale"]
        if self.covariance == "diag":
            cov = s.pow(2)
        else:
            cov = s.unsqueeze(-1) * post["corr"] * s.unsqueeze(-2)
        return MixtureParameters(post["weights"], post["loc"], cov, self.covariance)

    @torch.no_grad()
    def set_parameters(self, params: MixtureParameters, num_data: Optional[int] = None) -> None:
        """Centre the guide on ``params``: Dirichlet concentration
        alpha + num_data * weights, means and log-scales at the given values,
        correlation factor at the given correlation; guide spreads reset to 0.1.
        Marks the model initialized."""
        self._check_fits(params)
        v = self.variational
        n = self.num_data or num_data or 1
        v.log_concentration.copy_((self.concentration + n * params.weights).log().to(v.log_concentration))
        v.loc_loc.copy_(params.means.to(v.loc_loc))
        cov = params.dense_covariances().double()
        sd = torch.diagonal(cov, dim1=-2, dim2=-1).sqrt()
        v.scale_loc.copy_(sd.log().to(v.scale_loc))
        for p in (v.loc_log_scale, v.scale_log_scale):
            p.fill_(math.log(0.1))
        if self.has_corr:
            corr = cov / (sd.unsqueeze(-1) * sd.unsqueeze(-2))
            chol = torch.linalg.cholesky(corr)
            v.corr_loc.copy_(CorrCholeskyTransform().inv(chol).to(v.corr_loc))
            v.corr_log_scale.fill_(math.log(0.1))
        self.initialized.fill_(True)

    @torch.no_grad()
    def log_predictive(
        self, x: torch.Tensor, num_samples: int = 100, generator: Optional[torch.Generator] = None
    ) -> torch.Tensor:
        """Monte Carlo posterior predictive density under the guide,
        log (1/S) sum_s p(x_n | theta_s) with theta_s ~ q, shape (N,)."""
        x = self.as_data(x)
        self.check_data(x)
        if generator is not None:
            seed = int(torch.randint(2**62, (1,), generator=generator))
        else:
            seed = int(torch.randint(2**62, (1,)))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            total = []
            for _ in range(num_samples):
                trace = pyro.poutine.trace(self.guide).get_trace(x)
                theta = {name: site["value"] for name, site in trace.nodes.items()
                         if site["type"] == "sample"}
                total.append(self._log_likelihood_given(x, theta))
        return torch.logsumexp(torch.stack(total), 0) - math.log(num_samples)

    def _log_likelihood_given(self, x: torch.Tensor, theta: Dict[str, torch.Tensor]) -> torch.Tensor:
        loc, scale = theta["loc"], theta["scale"]
        if self.has_corr:
            component = dist.MultivariateNormal(loc, scale_tril=scale.unsqueeze(-1) * theta["corr"])
        else:
            component = dist.Normal(loc, scale).to_event(1)
        return torch.logsumexp(component.log_prob(x.unsqueeze(-2)) + theta["weights"].log(), -1)


def match_components(true_means: torch.Tensor, means: torch.Tensor) -> List[int]:
    """The label permutation ``p`` (``means[p[k]]`` estimates component ``k``)
    with the least total distance between matched means, for comparing a
    fitted mixture with a known one up to relabelling. Tries every
    permutation, so it is meant for small K (at most about 8)."""
    if true_means.shape != means.shape:
        raise ValueError(f"mean shapes differ: {tuple(true_means.shape)} vs {tuple(means.shape)}")
    cost = torch.cdist(true_means.double(), means.double())
    K = len(true_means)
    best = min(itertools.permutations(range(K)),
               key=lambda p: float(sum(cost[k, p[k]] for k in range(K))))
    return list(best)

