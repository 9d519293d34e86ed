"""Linear-Gaussian latent-variable models: factor analysis and probabilistic PCA.

Generative process, for each data point n (x_n in R^D, z_n in R^K):

.. math::

    z_n \\sim \\mathcal{N}(0, I_K), \\qquad
    x_n \\mid z_n \\sim \\mathcal{N}(W z_n + \\mu, \\Psi),

with loadings W (D x K), mean mu and diagonal noise covariance
Psi = diag(psi_1..psi_D) (factor analysis [1]) or Psi = sigma^2 I (probabilistic
PCA [2]). Integrating z out gives the marginal

.. math::  p(x) = \\mathcal{N}(x; \\mu, C), \\qquad C = W W^\\top + \\Psi,

and the exact posterior

.. math::

    p(z \\mid x) = \\mathcal{N}(M^{-1} W^\\top \\Psi^{-1} (x - \\mu), M^{-1}),
    \\qquad M = I_K + W^\\top \\Psi^{-1} W,

whose mean is the (Thomson/Bartlett regression) factor score. Both are computed
through the K x K matrix M only: the matrix determinant lemma gives
log det C = log det M + sum_d log psi_d and Woodbury's identity gives
C^{-1} = Psi^{-1} - Psi^{-1} W M^{-1} W^T Psi^{-1}, so no D x D matrix is ever
formed or inverted. These closed forms live in :mod:`pyrovae.maths.linear`,
beneath both this module and the EM of :mod:`pyrovae.infer.em`.

The exact posterior lies in the family of the amortized linear-Gaussian guide
(``pyrovae.guides.linear``), so SVI with that guide can make the ELBO tight;
``encoder="mlp"`` swaps in a nonlinear diagonal-Normal encoder instead.
:class:`BayesianFactorAnalysis` puts priors on W, mu and Psi, integrates z out
analytically, and fits a mean-field (or full-rank) Gaussian guide over the
global parameters.

References

[1] D. B. Rubin and D. T. Thayer, "EM algorithms for ML factor analysis",
    Psychometrika 47(1), 1982.
[2] M. E. Tipping and C. M. Bishop, "Probabilistic principal component
    analysis", J. R. Statist. Soc. B 61(3), 1999.
[3] Z. Ghahramani and G. E. Hinton, "The EM algorithm for mixtures of factor
    analyzers", Technical Report CRG-TR-96-1, University of Toronto, 1996.
[4] H. F. Kaiser, "The varimax criterion for analytic rotation in factor
    analysis", Psychometrika 23(3), 1958.
"""

from __future__ import annotations

from typing import Any, Dict, Optional

import pyro
import pyro.distributions as dist
import torch
from torch import nn

from pyrovae.guides import GUIDES, encoder_distribution
from pyrovae.infer.em import fit_linear_gaussian_em
from pyrovae.maths.linear import (
    LinearGaussianParams,
    linear_gaussian_log_prob,
    linear_gaussian_posterior,
    posterior_map,
    ppca_closed_form,
    varimax,
)
from pyrovae.models.base import LatentModel
from pyrovae.models.registry import MODELS

NOISE = ("diagonal", "isotropic")


# -- the parameter module ----------------------------------------------------------
class LinearGaussianDecoder(nn.Module):
    """Holds mu, W and the noise variances of p(x | z) = N(W z + mu, Psi).

    The noise is stored as log-variance (one per dimension, or a single one for
    isotropic noise), which keeps it positive without clipping and makes the
    closed-form updates of EM exact to write back.
    """

    def __init__(self, x_dim: int, z_dim: int, noise: str = "diagonal", init_scale: float = 0.1) -> None:
        super().__init__()
        if noise not in NOISE:
            raise ValueError(f"noise must be one of {NOISE}, got {noise!r}")
        self.isotropic = noise == "isotropic"
        self.loc = nn.Parameter(torch.zeros(x_dim))
        # Small random loadings: W = 0 is a saddle point of the likelihood.
        self.weight = nn.Parameter(init_scale * torch.randn(x_dim, z_dim))
        self.log_noise = nn.Parameter(torch.zeros(1 if self.isotropic else x_dim))

    def noise(self) -> torch.Tensor:
        """The diagonal of Psi, shape (D,)."""
        return self.log_noise.exp().expand(self.loc.shape[-1])

    def params(self) -> LinearGaussianParams:
        return LinearGaussianParams(self.loc, self.weight, self.noise())

    @torch.no_grad()
    def set_params(self, params: LinearGaussianParams) -> None:
        """Write values in place: Pyro's parameter store keeps references to
        these very ``nn.Parameter`` objects, so they must never be replaced."""
        self.loc.copy_(params.loc)
        self.weight.copy_(params.weight)
        noise = params.noise.clamp_min(torch.finfo(params.noise.dtype).tiny)
        if self.isotropic:
            if not torch.allclose(noise, noise[:1].expand_as(noise)):
                raise ValueError("isotropic noise needs equal noise variances in every dimension")
            self.log_noise.copy_(noise[:1].log())
        else:
            self.log_noise.copy_(noise.log())

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return z @ self.weight.T + self.loc


# -- the models --------------------------------------------------------------------
@MODELS.register("fa")
class FactorAnalysis(LatentModel):
    """Factor analysis: z ~ N(0, I_K), x | z ~ N(W z + mu, diag(psi)).

    Args:
        x_dim: data dimension D.
        z_dim: number of factors K.
        encoder: name in ``pyrovae.guides.GUIDES`` of the amortized guide
            q(z | x): ``"linear"`` (default; the exact posterior is in its
            family) or ``"mlp"`` (nonlinear, diagonal covariance).
        encoder_options: keyword arguments for the encoder (for ``"mlp"``:
            ``hidden``, ``activation``).
        init_scale: standard deviation of the random initial loadings.

    Exact methods: :meth:`log_marginal`, :meth:`posterior`, :meth:`sample`;
    :meth:`fit_em` runs the classical EM algorithm and :meth:`init_from_data`
    a PCA initialization.
    """

    noise_kind = "diagonal"

    def __init__(
        self,
        x_dim: int,
        z_dim: int = 2,
        encoder: str = "linear",
        encoder_options: Optional[Dict[str, Any]] = None,
        init_scale: float = 0.1,
    ) -> None:
        super().__init__()
        if x_dim < 1 or z_dim < 1:
            raise ValueError(f"x_dim and z_dim must be positive; got x_dim={x_dim}, z_dim={z_dim}")
        if z_dim >= x_dim:
            raise ValueError(
                f"z_dim must be smaller than x_dim (got z_dim={z_dim}, x_dim={x_dim}): with "
                "as many factors as dimensions the noise variances are not identifiable"
            )
        encoder_options = dict(encoder_options or {})
        self._config = dict(
            x_dim=x_dim, z_dim=z_dim, encoder=encoder, encoder_options=encoder_options,
            init_scale=init_scale,
        )
        self.x_dim, self.z_dim = x_dim, z_dim
        self.decoder = LinearGaussianDecoder(x_dim, z_dim, self.noise_kind, init_scale)
        self.encoder = GUIDES.get_checked(encoder)(x_dim, z_dim, **encoder_options)
        self.em_result_: Optional[Any] = None

    # -- the two Pyro programs -------------------------------------------------
    def model(self, x: torch.Tensor) -> None:
        self.register("decoder", self.decoder)
        with pyro.plate("data", x.shape[0]):
            prior = dist.Normal(x.new_zeros(self.z_dim), 1.0).to_event(1)
            z = pyro.sample("z", prior)
            scale = self.decoder.noise().sqrt()
            pyro.sample("x", dist.Normal(self.decoder(z), scale).to_event(1), obs=x)

    def guide(self, x: torch.Tensor) -> None:
        """Amortized guide: a full-covariance Normal when the encoder's
        ``scale_kind`` is ``"tril"`` (it returns a Cholesky factor, shared or
        per point), a diagonal Normal otherwise."""
        self.register("encoder", self.encoder)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", encoder_distribution(self.encoder, x))

    def exact_guide(self, x: torch.Tensor) -> None:
        """Guide that samples from the exact posterior p(z | x). With it the
        ELBO equals log p(x) for every draw (zero-variance estimator)."""
        self.register("decoder", self.decoder)
        p = self.params()
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", linear_gaussian_posterior(x, p.loc, p.weight, p.noise))

    # -- exact quantities ----------------------------------------------------------
    def params(self) -> LinearGaussianParams:
        return self.decoder.params()

    @property
    def loadings(self) -> torch.Tensor:
        """W (D x K), detached."""
        return self.decoder.weight.detach()

    def rotated_loadings(self, rotation: Optional[str] = "varimax") -> torch.Tensor:
        """Loadings after ``rotation`` (``"varimax"`` or ``None``); any
        orthogonal rotation leaves the likelihood unchanged."""
        if rotation is None:
            return self.loadings
        if rotation != "varimax":
            raise ValueError(f"rotation must be 'varimax' or None, got {rotation!r}")
        return varimax(self.loadings)[0]

    @property
    def noise_variance(self) -> torch.Tensor:
        """The diagonal of Psi (D,), detached."""
        return self.decoder.noise().detach()

    def log_marginal(self, x: torch.Tensor) -> torch.Tensor:
        """Exact log p(x_n) = log N(x_n; mu, W W^T + Psi), shape (N,)."""
        x = self.as_data(x)
        p = self.params()
        return self.finite_result(linear_gaussian_log_prob(x, p.loc, p.weight, p.noise), x,
                                  "log_marginal")

    def posterior(self, x: torch.Tensor) -> dist.MultivariateNormal:
        """Exact p(z | x), a MultivariateNormal with batch shape (N,)."""
        x = self.as_data(x)
        p = self.params()
        with torch.no_grad():  # the mean, checked before the distribution validates it
            a, b, _ = posterior_map(p.loc, p.weight, p.noise)
            self.finite_result(x @ a.T + b, x, "posterior")
        return linear_gaussian_posterior(x, p.loc, p.weight, p.noise)

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Factor scores E[z | x] under the exact posterior, shape (N, K)."""
        return self.posterior(x).mean

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """E[x | z = E[z | x]] = W E[z | x] + mu."""
        return self.decoder(self.encode(x))

    @torch.no_grad()
    def sample(self, n: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Draws x ~ p(x) (noise included), shape (n, D)."""
        p = self.params()
        kw = dict(generator=generator, dtype=p.weight.dtype, device=p.weight.device)
        z = torch.randn(n, self.z_dim, **kw)
        eps = torch.randn(n, self.x_dim, **kw)
        return z @ p.weight.T + p.loc + eps * p.noise.sqrt()

    def check_data(self, x: torch.Tensor) -> None:
        """Raise a clear error for data the likelihood cannot score."""
        x = self.as_data(x)  # converts and checks the columns
        if not bool(torch.isfinite(x).all()):
            raise ValueError("the data has NaN or infinite values; drop or impute those rows first")

    # -- classical fitting ----------------------------------------------------------
    @torch.no_grad()
    def init_from_data(self, x: torch.Tensor) -> "FactorAnalysis":
        """PCA initialization: the maximum-likelihood PPCA solution, with the
        factor-analysis noise set to the variance the loadings leave
        unexplained in each dimension. A linear-Gaussian encoder is set to
        the exact posterior of these parameters, so SVI starts with a tight
        ELBO."""
        x = self.as_data(x)
        self.check_data(x)
        p = ppca_closed_form(x, self.z_dim)
        if not self.decoder.isotropic:
            var = x.var(0, unbiased=False)
            floor = 1e-3 * var.clamp_min(torch.finfo(x.dtype).tiny)
            p.noise = torch.maximum(var - p.weight.pow(2).sum(-1), floor)
        self.decoder.set_params(p)
        self.sync_encoder()
        return self

    @torch.no_grad()
    def sync_encoder(self) -> bool:
        """Set a linear-Gaussian encoder to the exact posterior of the current
        parameters; returns False (and does nothing) for other encoders."""
        set_posterior = getattr(self.encoder, "set_posterior", None)
        if set_posterior is None:
            return False
        p = self.params()
        set_posterior(*posterior_map(p.loc, p.weight, p.noise))
        return True

    def fit_em(
        self,
        x: torch.Tensor,
        max_iter: int = 1000,
        tol: float = 1e-6,
        init: str = "pca",
        seed: int = 0,
        min_noise: float = 1e-9,
    ):
        """Fit by expectation-maximization (see :func:`pyrovae.infer.em.fit_linear_gaussian_em`).

        Args:
            x: data, shape (N, D).
            max_iter: most EM iterations.
            tol: stop when the mean log-likelihood per data point rises by
                less than ``tol`` nats in one iteration.
            init: ``"pca"`` (the PCA initialization of :meth:`init_from_data`),
                ``"random"`` (random loadings drawn with ``seed``) or
                ``"current"`` (start from the present parameters).
            seed: seeds ``init="random"``.
            min_noise: floor on the noise variances (Heywood cases).

        Returns:
            :class:`pyrovae.infer.em.EMResult`; the fitted parameters are
            written into the model (and the linear encoder, if any, is set to
            their exact posterior).
        """
        if init not in ("pca", "random", "current"):
            raise ValueError(f"init must be 'pca', 'random' or 'current', got {init!r}")
        # EM runs in float64 whatever the model's dtype (see below), so the
        # data is taken in float64 too rather than rounded to the model's.
        x = self.as_data(x, dtype=torch.float64)
        self.check_data(x)
        dtype = self.decoder.weight.dtype
        start: Any = init
        if init == "current":
            p = self.params()
            start = _to_double(LinearGaussianParams(p.loc.detach(), p.weight.detach(), p.noise.detach()))
        # EM runs in float64 whatever the model's dtype: the monotonicity of the
        # log-likelihood is only visible above float32 rounding.
        params, result = fit_linear_gaussian_em(
            x, self.z_dim, isotropic=self.decoder.isotropic, max_iter=max_iter,
            tol=tol, init=start, seed=seed, min_noise=min_noise,
        )
        self.decoder.set_params(LinearGaussianParams(
            params.loc.to(dtype), params.weight.to(dtype), params.noise.to(dtype)
        ))
        self.sync_encoder()
        self.em_result_ = result
        return result


def _to_double(p: LinearGaussianParams) -> LinearGaussianParams:
    return LinearGaussianParams(p.loc.double(), p.weight.double(), p.noise.double())


@MODELS.register("ppca")
class PPCA(FactorAnalysis):
    """Probabilistic PCA: factor analysis with isotropic noise Psi = sigma^2 I.

    Same arguments as :class:`FactorAnalysis`. :meth:`fit_closed_form` gives
    the maximum-likelihood solution of Tipping and Bishop [2] directly;
    :meth:`fit_em` reaches the same likelihood iteratively.
    """

    noise_kind = "isotropic"

    @property
    def sigma2(self) -> torch.Tensor:
        """The isotropic noise variance sigma^2 (a scalar tensor)."""
        return self.decoder.log_noise.detach().exp()[0]

    @torch.no_grad()
    def fit_closed_form(self, x: torch.Tensor) -> "PPCA":
        """Set the maximum-likelihood parameters by eigendecomposition."""
        x = self.as_data(x, dtype=torch.float64)
        self.check_data(x)
        dtype = self.decoder.weight.dtype
        p = ppca_closed_form(x, self.z_dim)
        self.decoder.set_params(LinearGaussianParams(p.loc.to(dtype), p.weight.to(dtype), p.noise.to(dtype)))
        self.sync_encoder()
        return self


@MODELS.register("bayes-fa")
class BayesianFactorAnalysis(LatentModel):
    """Factor analysis with priors on its parameters, z integrated out.

    Generative process:

    .. math::

        W_{dk} \\sim \\mathcal{N}(0, s_W^2), \\quad
        \\mu_d \\sim \\mathcal{N}(0, s_\\mu^2), \\quad
        \\psi_d \\sim \\mathrm{InverseGamma}(a, b), \\quad
        x_n \\mid W, \\mu, \\Psi \\sim \\mathcal{N}(\\mu, W W^\\top + \\Psi).

    The local factors z_n are marginalized analytically (the marginal is the
    ``LowRankMultivariateNormal`` with cov_factor W and cov_diag psi), so the
    only latent variables are the global ``weight``, ``loc`` and ``noise``
    sites. The guide is :class:`pyrovae.guides.meanfield.MeanField` (a
    diagonal Normal in unconstrained space) or, with ``guide="fullrank"``,
    :class:`pyrovae.guides.meanfield.FullRank`. Marginalizing z keeps the
    gradient estimator's variance down to that of the globals and makes every
    Pyro ELBO (including ``TraceMeanField_ELBO``) applicable.

    Args:
        x_dim, z_dim: data dimension D and number of factors K.
        num_data: size N of the full training set. Set it when training on
            mini-batches: the likelihood of a batch of B points is then scaled
            by N / B so the ELBO stays an unbiased estimate for the whole data
            set (and ``fit`` reports it per data point). ``None`` treats each
            batch as the whole data set.
        weight_scale: prior standard deviation s_W of each loading.
        loc_scale: prior standard deviation s_mu of each mean.
        noise_concentration, noise_rate: a and b of the inverse-gamma prior
            on each noise variance (the default a = 2, b = 1 has mean 1 and
            mode 1/3, suitable for standardized data).
        guide: ``"meanfield"`` or ``"fullrank"``.
        init_scale: initial standard deviation of the guide in unconstrained space.
        seed: seeds the random initial locations of the guide.
    """

    GUIDE_KINDS = ("meanfield", "fullrank")

    def __init__(
        self,
        x_dim: int,
        z_dim: int = 2,
        num_data: Optional[int] = None,
        weight_scale: float = 1.0,
        loc_scale: float = 10.0,
        noise_concentration: float = 2.0,
        noise_rate: float = 1.0,
        guide: str = "meanfield",
        init_scale: float = 0.05,
        seed: int = 0,
    ) -> None:
        super().__init__()
        from pyrovae.guides.meanfield import FullRank, MeanField

        if guide not in self.GUIDE_KINDS:
            raise ValueError(f"guide must be one of {self.GUIDE_KINDS}, got {guide!r}")
        if not 1 <= z_dim < x_dim:
            raise ValueError(f"need 1 <= z_dim < x_dim; got z_dim={z_dim}, x_dim={x_dim}")
        if num_data is not None and num_data < 1:
            raise ValueError(f"num_data must be a positive integer or None, got {num_data}")
        for name, value in (("weight_scale", weight_scale), ("loc_scale", loc_scale),
                            ("noise_concentration", noise_concentration), ("noise_rate", noise_rate)):
            if not value > 0:
                raise ValueError(f"{name} must be positive, got {value}")
        self._config = dict(
            x_dim=x_dim, z_dim=z_dim, num_data=num_data, weight_scale=weight_scale,
            loc_scale=loc_scale, noise_concentration=noise_concentration,
            noise_rate=noise_rate, guide=guide, init_scale=init_scale, seed=seed,
        )
        self.x_dim, self.z_dim, self.num_data = x_dim, z_dim, num_data
        # Prior hyperparameters as buffers so .double() / .to(device) move them.
        self.register_buffer("weight_scale", torch.tensor(float(weight_scale)))
        self.register_buffer("loc_scale", torch.tensor(float(loc_scale)))
        self.register_buffer("noise_concentration", torch.tensor(float(noise_concentration)))
        self.register_buffer("noise_rate", torch.tensor(float(noise_rate)))
        family = MeanField if guide == "meanfield" else FullRank
        self.global_guide = family(self.model, init_scale=init_scale)
        # The globals do not depend on x, so one dummy row sets the guide up.
        self.global_guide.setup(torch.zeros(1, x_dim), seed=seed)

    def model(self, x: torch.Tensor) -> None:
        d, k = self.x_dim, self.z_dim
        weight = pyro.sample(
            "weight", dist.Normal(self.weight_scale.new_zeros(d, k), self.weight_scale).to_event(2)
        )
        loc = pyro.sample("loc", dist.Normal(self.loc_scale.new_zeros(d), self.loc_scale).to_event(1))
        noise = pyro.sample(
            "noise",
            dist.InverseGamma(self.noise_concentration.expand(d), self.noise_rate.expand(d)).to_event(1),
        )
        n = x.shape[0]
        size = n if self.num_data is None else self.num_data
        # A subsample index tensor makes the plate scale the batch by size / n.
        with pyro.plate("data", size, subsample=torch.arange(n, device=x.device)):
            pyro.sample("x", dist.LowRankMultivariateNormal(loc, weight, noise), obs=x)

    def guide(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        return self.global_guide(x)

    @torch.no_grad()
    def init_from_data(self, x: torch.Tensor) -> "BayesianFactorAnalysis":
        """Centre the guide on the PCA initialization of factor analysis
        (:meth:`FactorAnalysis.init_from_data`): random prior-median loadings
        and a loc far from the data mean otherwise take many steps to leave."""
        x = self.as_data(x)
        self.check_data(x)
        fa = FactorAnalysis(self.x_dim, self.z_dim).to(dtype=x.dtype, device=x.device).init_from_data(x)
        p = fa.params()
        self.global_guide.set_median({"weight": p.weight, "loc": p.loc, "noise": p.noise})
        return self

    @torch.no_grad()
    def posterior_median(self) -> Dict[str, torch.Tensor]:
        """The guide's median of each global site (constrained space)."""
        return self.global_guide.median()

    @torch.no_grad()
    def sample(self, n: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """``n`` draws x ~ N(mu, W W^T + Psi) of the plug-in model at the
        guide's median parameters (:meth:`posterior_median`), shape (n, D)."""
        med = self.posterior_median()
        weight, loc, noise = med["weight"], med["loc"], med["noise"]
        where = loc.device if generator is None else generator.device
        kw = dict(generator=generator, dtype=loc.dtype, device=where)
        z = torch.randn(n, self.z_dim, **kw).to(loc.device)
        eps = torch.randn(n, self.x_dim, **kw).to(loc.device)
        return z @ weight.T + loc + eps * noise.sqrt()

    def check_data(self, x: torch.Tensor) -> None:
        """Raise a clear error for data the likelihood cannot score."""
        x = self.as_data(x)  # converts and checks the columns
        if not bool(torch.isfinite(x).all()):
            raise ValueError("the data has NaN or infinite values; drop or impute those rows first")
