"""scikit-learn estimators over pyrovae's factor analysis, probabilistic PCA and
Gaussian mixtures.

Each class is a thin adapter: its constructor only stores its arguments
(scikit-learn's convention), ``fit`` validates them, builds the pyrovae model
(kept as ``model_``) and fits it by EM (``method="em"``, the default of the
maximum-likelihood models) or by SVI through :func:`pyrovae.fit`
(``method="svi"``); every other method reads the fitted model.

=================================  ==========================================  =========================
estimator                          pyrovae model                               ``score_samples(X)``
=================================  ==========================================  =========================
:class:`FactorAnalysisEstimator`   :class:`~pyrovae.FactorAnalysis`            exact log p(x_n)
:class:`PPCAEstimator`             :class:`~pyrovae.PPCA`                      exact log p(x_n)
:class:`GaussianMixtureEstimator`  :class:`~pyrovae.GaussianMixture`           exact log p(x_n)
:class:`BayesianGaussianMixtureEstimator`  :class:`~pyrovae.BayesianGaussianMixture`  posterior predictive
=================================  ==========================================  =========================

``score(X)`` is the mean of ``score_samples(X)``, the held-out log-likelihood
per data point in nats, so :class:`~sklearn.model_selection.GridSearchCV`
with its default scoring selects the model that predicts new data best.
For the Bayesian mixture it is the Monte Carlo posterior predictive density
log (1/S) sum_s p(x_n | theta_s), theta_s ~ q, drawn with the fixed seed
:data:`PREDICTIVE_SEED` so that repeated calls, and calls on subsets or
permutations of the rows, give the same numbers.

Data in: X goes through scikit-learn's ``validate_data`` (feature count and
names, NaN/inf, sparse and complex input, too few samples: scikit-learn's own
messages) and then pyrovae's one data rule,
:func:`pyrovae.data.core.as_tensor`, which every model method applies.

Randomness: ``random_state`` (an int, ``None`` or a
``numpy.random.RandomState``) is turned into one integer seed per ``fit``
(an int is used as it is, so ``random_state=0`` is pyrovae's ``seed=0``; ``None``
and a ``RandomState`` draw one). That seed is the model's ``seed`` argument,
the seed of EM restarts and of :func:`pyrovae.fit`, and the model is built
inside :func:`pyrovae.seeded`; nothing seeds global state. ``sample`` draws
from a generator seeded the same way, so with an int ``random_state`` it
returns the same draws on every call, as scikit-learn's ``GaussianMixture``.

scikit-learn is an optional dependency (``pip install pyrovae[sklearn]``):
this module is the only one that imports it, and ``import pyrovae`` does not
import this module.

References

[1] G. Schwarz, "Estimating the dimension of a model", Annals of Statistics
    6(2), 1978 (BIC).
[2] H. Akaike, "A new look at the statistical model identification", IEEE
    Transactions on Automatic Control 19(6), 1974 (AIC).
[3] T. P. Minka, "Automatic choice of dimensionality for PCA", NIPS 2000
    (the parameter count of probabilistic PCA).
"""

from __future__ import annotations

import contextlib
import math
import numbers
import warnings
from typing import Any, Callable, Dict, Iterator, Tuple

import numpy as np
import pyro
import torch

try:
    from sklearn.base import (
        BaseEstimator,
        ClassNamePrefixFeaturesOutMixin,
        ClusterMixin,
        DensityMixin,
        TransformerMixin,
    )
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.utils import check_random_state
    from sklearn.utils.validation import check_is_fitted
except ImportError:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "pyrovae.estimators needs scikit-learn, which is not installed; install it with "
        "`pip install pyrovae[sklearn]` (or `pip install scikit-learn`)"
    ) from None

try:  # scikit-learn >= 1.6
    from sklearn.utils.validation import validate_data as _validate_data
except ImportError:  # pragma: no cover - scikit-learn 1.3 to 1.5
    _validate_data = None

from pyrovae.infer.fit import fit as fit_svi
from pyrovae.models.linear import PPCA, FactorAnalysis
from pyrovae.models.mixture import BayesianGaussianMixture, GaussianMixture
from pyrovae.seeding import seeded

__all__ = [
    "PREDICTIVE_SEED",
    "BayesianGaussianMixtureEstimator",
    "FactorAnalysisEstimator",
    "GaussianMixtureEstimator",
    "PPCAEstimator",
]

#: Seed of the draws theta_s ~ q behind the Bayesian mixture's ``score_samples``.
PREDICTIVE_SEED = 0

_DTYPES = {np.dtype(np.float64): torch.float64, np.dtype(np.float32): torch.float32}
_COVARIANCE_TYPES = ("full", "diag")
_MIXTURE_INITS = ("kmeans", "kmeans++")


# -- shared helpers -----------------------------------------------------------------
def _integer(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


#: How each constructor argument is checked at ``fit``: (test, what it must be).
_RULES: Dict[str, Tuple[Callable[[Any], bool], str]] = {
    "n_components": (lambda v: _integer(v) and v >= 1, "an integer >= 1"),
    "tol": (lambda v: _real(v) and v >= 0, "a number >= 0"),
    "max_iter": (lambda v: _integer(v) and v >= 1, "an integer >= 1"),
    "n_init": (lambda v: _integer(v) and v >= 1, "an integer >= 1"),
    "learning_rate": (lambda v: _real(v) and v > 0, "a number > 0"),
    "batch_size": (lambda v: v is None or (_integer(v) and v >= 1), "None or an integer >= 1"),
    "reg_covar": (lambda v: _real(v) and v >= 0, "a number >= 0"),
    "min_noise": (lambda v: _real(v) and v > 0, "a number > 0"),
    "predictive_samples": (lambda v: _integer(v) and v >= 1, "an integer >= 1"),
    "covariance_type": (lambda v: v in _COVARIANCE_TYPES, f"one of {_COVARIANCE_TYPES}"),
    "random_state": (
        lambda v: v is None or _integer(v) or isinstance(v, np.random.RandomState),
        "None, an integer or a numpy.random.RandomState",
    ),
    "dtype": (lambda v: _torch_dtype_or_none(v) is not None, "'float64' or 'float32'"),
}
_RULES.update(dict.fromkeys(
    ("concentration", "loc_prior_scale", "scale_prior_scale", "lkj_concentration"),
    (lambda v: _real(v) and v > 0, "a number > 0"),
))
_RULES.update(dict.fromkeys(
    ("loc_prior_loc", "scale_prior_loc"), (lambda v: _real(v) and math.isfinite(v), "a finite number"),
))


def _torch_dtype_or_none(value: Any) -> torch.dtype | None:
    try:
        return _DTYPES.get(np.dtype(value))
    except TypeError:
        return None


def _numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()


@contextlib.contextmanager
def _param_store_released(module: torch.nn.Module) -> Iterator[None]:
    """Drop the parameter-store entries a block that runs ``module``'s Pyro
    programs adds. Pyro's global store only holds references to the module's
    own parameters, so forgetting them loses nothing, and a grid search that
    fits hundreds of models does not keep every one alive. The store also
    tags each parameter it hands out with a weak reference
    (``.unconstrained``), which cannot be pickled; it is removed as Pyro's
    own ``ParamStoreDict.get_state`` does, so a fitted estimator pickles."""
    store = pyro.get_param_store()
    before = set(store.keys())
    try:
        yield
    finally:
        for name in set(store.keys()) - before:
            del store[name]
        for param in module.parameters():
            param.__dict__.pop("unconstrained", None)


class _PyroEstimator(BaseEstimator):
    """What every estimator here shares: argument checks, the seed, data
    validation and the SVI call."""

    _methods: Tuple[str, ...] = ("em", "svi")
    _choices: Dict[str, Tuple[str, ...]] = {}

    # -- arguments ---------------------------------------------------------------
    def _check_params(self) -> None:
        params = self.get_params(deep=False)
        if params["method"] not in self._methods:
            raise ValueError(
                f"method must be one of {self._methods} for {type(self).__name__}, "
                f"got {params['method']!r}"
            )
        for name, options in self._choices.items():
            if params[name] not in options:
                raise ValueError(f"{name} must be one of {options}, got {params[name]!r}")
        for name, value in params.items():
            rule = _RULES.get(name)
            if rule is not None and not rule[0](value):
                raise ValueError(f"{name} must be {rule[1]}, got {value!r}")

    def _seed(self) -> int:
        """One integer seed: ``random_state`` itself when it is an int, else
        a draw from it (``None``: numpy's global generator)."""
        if _integer(self.random_state):
            return int(self.random_state)
        return int(check_random_state(self.random_state).randint(np.iinfo(np.int32).max))

    def _torch_dtype(self) -> torch.dtype:
        return _torch_dtype_or_none(self.dtype)

    # -- data --------------------------------------------------------------------
    def _validate(self, X: Any, reset: bool) -> np.ndarray:
        options = dict(dtype=(np.float64, np.float32), ensure_min_samples=2 if reset else 1)
        if _validate_data is not None:
            return _validate_data(self, X, reset=reset, **options)
        return self._validate_data(X, reset=reset, **options)  # pragma: no cover

    def _fitted_data(self, X: Any) -> np.ndarray:
        check_is_fitted(self)
        return self._validate(X, reset=False)

    # -- fitting -----------------------------------------------------------------
    def _build(self, factory: Callable[[], torch.nn.Module], seed: int) -> torch.nn.Module:
        # Seeded, so that initial weights drawn from torch's global
        # generator are decided by random_state too.
        with seeded(seed):
            return factory().to(self._torch_dtype())

    def _fit_svi(self, model: torch.nn.Module, X: np.ndarray, seed: int) -> None:
        """Train ``model`` by SVI with :func:`pyrovae.fit`: ``max_iter``
        epochs of ``batch_size`` points (``None``: full batch) at
        ``learning_rate``, seeded by ``seed``; the model's own objective."""
        n = X.shape[0]
        batch = n if self.batch_size is None else min(self.batch_size, n)
        with _param_store_released(model):
            result = fit_svi(model, X, epochs=self.max_iter, lr=self.learning_rate,
                             batch_size=batch, seed=seed, progress=False, eval_every=0)
        elbo = result.history["train_elbo"].to_numpy()
        self.history_ = result.history
        self.n_iter_ = int(len(elbo))
        self.lower_bound_ = float(elbo[-1])
        # No early stopping in SVI: a diagnostic on the last two epochs only.
        self.converged_ = bool(len(elbo) >= 2 and abs(elbo[-1] - elbo[-2]) < self.tol)

    def _record_em(self, result: Any, what: str) -> None:
        self.history_ = result.history
        self.n_iter_ = int(result.n_iter)
        self.converged_ = bool(result.converged)
        self.lower_bound_ = float(result.history["log_likelihood"].iloc[-1])
        if not self.converged_:
            warnings.warn(
                f"{what} EM did not converge in max_iter={self.max_iter} iterations "
                f"(tol={self.tol}); raise max_iter or tol", ConvergenceWarning, stacklevel=3,
            )

    def _generator(self) -> torch.Generator:
        return torch.Generator().manual_seed(self._seed())


class _DensityMixin(DensityMixin):
    """scikit-learn's density-estimator type, with ``score`` defined (its own
    returns ``None``) as the mean of ``score_samples``."""

    def score_samples(self, X: Any) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def score(self, X: Any, y: Any = None) -> float:
        """Mean of :meth:`score_samples`: log-likelihood per data point, nats."""
        return float(np.mean(self.score_samples(X)))


class _InformationCriteriaMixin:
    """BIC [1] and AIC [2] from the exact log-likelihood and the number of
    free parameters, as scikit-learn's ``GaussianMixture`` computes them."""

    def _n_parameters(self) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    def bic(self, X: Any) -> float:
        """-2 log p(X) + n_parameters log N; lower is better."""
        n = np.asarray(self.score_samples(X))
        return float(-2.0 * n.sum() + self._n_parameters() * math.log(n.shape[0]))

    def aic(self, X: Any) -> float:
        """-2 log p(X) + 2 n_parameters; lower is better."""
        n = np.asarray(self.score_samples(X))
        return float(-2.0 * n.sum() + 2.0 * self._n_parameters())


# -- factor analysis and probabilistic PCA --------------------------------------------
class _LinearGaussianEstimator(
    ClassNamePrefixFeaturesOutMixin, TransformerMixin, _DensityMixin, _InformationCriteriaMixin,
    _PyroEstimator,
):
    _model_class: type = FactorAnalysis
    _choices = {"init": ("pca", "random")}

    def __init__(
        self,
        n_components: int = 2,
        *,
        method: str = "em",
        init: str = "pca",
        tol: float = 1e-6,
        max_iter: int = 1000,
        min_noise: float = 1e-9,
        learning_rate: float = 0.01,
        batch_size: int | None = None,
        random_state: Any = None,
        dtype: Any = "float64",
    ) -> None:
        self.n_components = n_components
        self.method = method
        self.init = init
        self.tol = tol
        self.max_iter = max_iter
        self.min_noise = min_noise
        self.learning_rate = learning_rate
        self.batch_size = batch_size
        self.random_state = random_state
        self.dtype = dtype

    def fit(self, X: Any, y: Any = None) -> "_LinearGaussianEstimator":
        """Fit the model to X, shape (n_samples, n_features); ``y`` is ignored."""
        self._check_params()
        X = self._validate(X, reset=True)
        d, k = X.shape[1], self.n_components
        if not k < d:
            raise ValueError(
                f"n_components={k} must be smaller than the number of features (got "
                f"n_features = {d}): with as many factors as features the noise variances "
                "are not identifiable"
            )
        seed = self._seed()
        model = self._build(lambda: self._model_class(d, k), seed)
        if self.method == "em":
            result = model.fit_em(X, max_iter=self.max_iter, tol=self.tol, init=self.init,
                                  seed=seed, min_noise=self.min_noise)
            self._record_em(result, type(self).__name__)
        elif self.method == "svi":
            if self.init == "pca":
                model.init_from_data(X)
            self._fit_svi(model, X, seed)
        else:  # closed_form (PPCA)
            model.fit_closed_form(X)
            # One exact step: scikit-learn expects n_iter_ >= 1 of a fitted
            # estimator that has max_iter.
            self.n_iter_, self.converged_, self.history_ = 1, True, None
            with torch.no_grad():
                self.lower_bound_ = float(model.log_marginal(X).mean())
        self.model_ = model
        p = model.params()
        self.components_ = _numpy(p.weight).T.copy()
        self.mean_ = _numpy(p.loc).copy()
        self._set_noise(_numpy(p.noise).copy())
        return self

    def _set_noise(self, noise: np.ndarray) -> None:
        self.noise_variance_ = noise

    def __sklearn_tags__(self) -> Any:
        tags = super().__sklearn_tags__()
        # transform returns the model's dtype, whatever the input's.
        tags.transformer_tags.preserves_dtype = [np.dtype(self.dtype).name] \
            if _torch_dtype_or_none(self.dtype) is not None else []
        return tags

    @property
    def _n_features_out(self) -> int:
        return self.components_.shape[0]

    def transform(self, X: Any) -> np.ndarray:
        """Factor scores E[z_n | x_n] (exact posterior means), shape (n_samples, n_components)."""
        X = self._fitted_data(X)
        return _numpy(self.model_.encode(X))

    def score_samples(self, X: Any) -> np.ndarray:
        """Exact log p(x_n) = log N(x_n; mean_, W W^T + Psi), shape (n_samples,)."""
        X = self._fitted_data(X)
        with torch.no_grad():
            return _numpy(self.model_.log_marginal(X))

    def sample(self, n_samples: int = 1) -> np.ndarray:
        """``n_samples`` draws x ~ p(x), shape (n_samples, n_features)."""
        check_is_fitted(self)
        if not (_integer(n_samples) and n_samples >= 1):
            raise ValueError(f"n_samples must be an integer >= 1, got {n_samples!r}")
        return _numpy(self.model_.sample(int(n_samples), generator=self._generator()))

    def get_covariance(self) -> np.ndarray:
        """Model covariance W W^T + Psi, shape (n_features, n_features)."""
        check_is_fitted(self)
        w = self.components_.T
        return w @ w.T + np.diag(np.broadcast_to(self.noise_variance_, w.shape[:1]))

    def get_precision(self) -> np.ndarray:
        """Inverse of :meth:`get_covariance`."""
        return np.linalg.inv(self.get_covariance())


class FactorAnalysisEstimator(_LinearGaussianEstimator):
    """Factor analysis as a scikit-learn transformer and density estimator.

    .. math::

        z_n \\sim \\mathcal{N}(0, I_K), \\qquad
        x_n \\mid z_n \\sim \\mathcal{N}(W z_n + \\mu, \\mathrm{diag}(\\psi)),

    fitted by maximum likelihood over :class:`pyrovae.FactorAnalysis`.

    Args:
        n_components: number of factors K, 1 <= K < n_features.
        method: ``"em"`` (:meth:`pyrovae.FactorAnalysis.fit_em`, float64) or
            ``"svi"`` (:func:`pyrovae.fit` with the model's linear-Gaussian
            amortized guide, whose family contains the exact posterior).
        init: ``"pca"`` (maximum-likelihood PPCA start) or ``"random"``
            (random loadings drawn with the seed).
        tol: EM stops once an iteration raises the mean log-likelihood per
            data point by less than ``tol`` nats. For SVI (no early stopping)
            ``converged_`` only reports whether the last two epochs' ELBOs
            differ by less than ``tol``.
        max_iter: EM iterations, or SVI epochs.
        min_noise: floor on the noise variances (EM; Heywood cases).
        learning_rate: Adam's learning rate (SVI).
        batch_size: points per SVI step; ``None`` is the full data set.
        random_state: int, ``None`` or ``numpy.random.RandomState`` (see the
            module docstring).
        dtype: ``"float64"`` (default, exact scores) or ``"float32"``: the
            model's dtype; EM itself always computes in float64.

    Attributes:
        model_: the fitted :class:`pyrovae.FactorAnalysis`.
        components_: loadings W^T, shape (n_components, n_features).
        noise_variance_: psi, shape (n_features,).
        mean_: mu, shape (n_features,).
        n_iter_, converged_: EM iterations (SVI epochs) run, and whether
            ``tol`` was reached.
        lower_bound_: the final mean training log-likelihood per point (EM) or
            ELBO per point (SVI).
        history_: the EM or SVI history, a DataFrame.
        n_features_in_, feature_names_in_: as in scikit-learn.

    ``bic``/``aic`` count D K + 2 D - K (K - 1) / 2 free parameters: the
    loadings, noise variances and means, less the K (K - 1) / 2 of an
    orthogonal rotation of the factors, which leaves the likelihood unchanged.
    """

    def _n_parameters(self) -> int:
        k, d = self.components_.shape
        return d * k + 2 * d - k * (k - 1) // 2


class PPCAEstimator(_LinearGaussianEstimator):
    """Probabilistic PCA (factor analysis with isotropic noise sigma^2 I) as a
    scikit-learn transformer and density estimator, over :class:`pyrovae.PPCA`.

    Arguments and attributes as :class:`FactorAnalysisEstimator`, except that
    ``method`` may also be ``"closed_form"`` (the maximum-likelihood solution
    by eigendecomposition, Tipping and Bishop; ``n_iter_`` is 1) and
    ``noise_variance_`` is the scalar sigma^2, as in scikit-learn's ``PCA``.

    ``bic``/``aic`` count D K + D + 1 - K (K - 1) / 2 free parameters [3].
    """

    _model_class = PPCA
    _methods = ("em", "svi", "closed_form")

    def _set_noise(self, noise: np.ndarray) -> None:
        self.noise_variance_ = float(noise[0])

    def _n_parameters(self) -> int:
        k, d = self.components_.shape
        return d * k + d + 1 - k * (k - 1) // 2


# -- Gaussian mixtures ------------------------------------------------------------------
class _MixtureEstimator(ClusterMixin, _DensityMixin, _PyroEstimator):
    _choices = {"init": _MIXTURE_INITS}

    def _check_samples(self, X: np.ndarray) -> None:
        if X.shape[0] < self.n_components:
            raise ValueError(
                f"Expected n_samples >= n_components but got n_components = "
                f"{self.n_components}, n_samples = {X.shape[0]}"
            )

    def _set_fitted(self, model: Any, X: np.ndarray) -> None:
        self.model_ = model
        params = model.mixture_parameters()
        self.weights_ = _numpy(params.weights).copy()
        self.means_ = _numpy(params.means).copy()
        self.covariances_ = _numpy(params.covariances).copy()
        self.labels_ = _numpy(model.predict(X))

    def predict_proba(self, X: Any) -> np.ndarray:
        """Responsibilities p(z_n = k | x_n), shape (n_samples, n_components)."""
        X = self._fitted_data(X)
        return _numpy(self.model_.predict_proba(X))

    def predict(self, X: Any) -> np.ndarray:
        """Most probable component of each point, shape (n_samples,), int64."""
        X = self._fitted_data(X)
        return _numpy(self.model_.predict(X))

    def sample(self, n_samples: int = 1) -> Tuple[np.ndarray, np.ndarray]:
        """``n_samples`` draws x ~ p(x) and the component each came from:
        ``(X, labels)`` of shapes (n_samples, n_features) and (n_samples,)."""
        check_is_fitted(self)
        if not (_integer(n_samples) and n_samples >= 1):
            raise ValueError(f"n_samples must be an integer >= 1, got {n_samples!r}")
        x, z = self.model_.sample(int(n_samples), generator=self._generator(), return_labels=True)
        return _numpy(x), _numpy(z)


class GaussianMixtureEstimator(_InformationCriteriaMixin, _MixtureEstimator):
    """Gaussian mixture, maximum likelihood, as a scikit-learn density
    estimator and clusterer, over :class:`pyrovae.GaussianMixture`.

    .. math::

        z_n \\sim \\mathrm{Categorical}(\\pi), \\qquad
        x_n \\mid z_n = k \\sim \\mathcal{N}(\\mu_k, \\Sigma_k).

    Args:
        n_components: number of components K.
        covariance_type: ``"full"`` or ``"diag"`` (scikit-learn's
            ``"tied"`` and ``"spherical"`` are not offered).
        method: ``"em"`` (:meth:`pyrovae.GaussianMixture.fit_em`: best of
            ``n_init`` k-means-seeded runs, float64) or ``"svi"``
            (:func:`pyrovae.fit` with ``TraceEnum_ELBO``, the assignment
            summed out exactly, from the best of ``n_init`` seedings;
            ``reg_covar`` does not apply).
        tol: EM stops once the mean log-likelihood per point changes by less
            than ``tol``; for SVI see :class:`FactorAnalysisEstimator`.
        reg_covar: added to every covariance diagonal in EM's M-step.
        max_iter: EM iterations per run, or SVI epochs.
        n_init: EM runs (SVI: seedings) from independent k-means++ seedings.
        init: ``"kmeans"`` (seeding refined by k-means) or ``"kmeans++"``.
        learning_rate, batch_size, random_state, dtype: as for
            :class:`FactorAnalysisEstimator`.

    Attributes:
        model_: the fitted :class:`pyrovae.GaussianMixture`.
        weights_ (K,), means_ (K, D), covariances_ ((K, D, D) for full,
        (K, D) for diag): scikit-learn's layout.
        labels_: :meth:`predict` of the training data (``fit_predict``).
        n_iter_, converged_, lower_bound_, history_: of the kept EM run (or
        the SVI run), as for :class:`FactorAnalysisEstimator`.

    ``bic``/``aic`` count free parameters as scikit-learn's
    ``GaussianMixture._n_parameters``: K D means, K - 1 weights, and K D (D + 1) / 2
    (full) or K D (diag) covariance entries.
    """

    def __init__(
        self,
        n_components: int = 1,
        *,
        covariance_type: str = "full",
        method: str = "em",
        tol: float = 1e-6,
        reg_covar: float = 1e-6,
        max_iter: int = 500,
        n_init: int = 5,
        init: str = "kmeans",
        learning_rate: float = 0.01,
        batch_size: int | None = None,
        random_state: Any = None,
        dtype: Any = "float64",
    ) -> None:
        self.n_components = n_components
        self.covariance_type = covariance_type
        self.method = method
        self.tol = tol
        self.reg_covar = reg_covar
        self.max_iter = max_iter
        self.n_init = n_init
        self.init = init
        self.learning_rate = learning_rate
        self.batch_size = batch_size
        self.random_state = random_state
        self.dtype = dtype

    def fit(self, X: Any, y: Any = None) -> "GaussianMixtureEstimator":
        """Fit the mixture to X, shape (n_samples, n_features); ``y`` is ignored."""
        self._check_params()
        X = self._validate(X, reset=True)
        self._check_samples(X)
        seed = self._seed()
        k, d = self.n_components, X.shape[1]
        model = self._build(
            lambda: GaussianMixture(k, d, covariance=self.covariance_type, init=self.init, seed=seed),
            seed,
        )
        if self.method == "em":
            result = model.fit_em(X, max_iter=self.max_iter, tol=self.tol, n_init=self.n_init,
                                  seed=seed, reg_covar=self.reg_covar)
            self._record_em(result, type(self).__name__)
        else:
            model.initialize(X, seed=seed, n_init=self.n_init)
            self._fit_svi(model, X, seed)
        self._set_fitted(model, X)
        return self

    def score_samples(self, X: Any) -> np.ndarray:
        """Exact log p(x_n) = logsumexp_k [log pi_k + log N(x_n; mu_k, Sigma_k)], shape (n_samples,)."""
        X = self._fitted_data(X)
        with torch.no_grad():
            return _numpy(self.model_.log_marginal(X))

    def _n_parameters(self) -> int:
        k, d = self.means_.shape
        cov = k * d * (d + 1) // 2 if self.covariance_type == "full" else k * d
        return int(cov + k * d + k - 1)


class BayesianGaussianMixtureEstimator(_MixtureEstimator):
    """Bayesian Gaussian mixture fitted by mean-field SVI, as a scikit-learn
    density estimator and clusterer, over
    :class:`pyrovae.BayesianGaussianMixture` (see it for the priors).

    ``score_samples`` is the posterior predictive density, estimated with
    ``predictive_samples`` draws theta_s ~ q taken with the fixed seed
    :data:`PREDICTIVE_SEED` (the same draws for every call and every row, so
    scores are reproducible and comparable across data sets and subsets).
    ``predict``, ``predict_proba``, ``sample`` and ``weights_``/``means_``/
    ``covariances_`` use the model's plug-in parameters (posterior means).
    There is no ``bic``/``aic``: the fit is not a maximum of the likelihood.

    Args:
        n_components: number of components K (a truncation: the Dirichlet
            prior with a small ``concentration`` can leave some nearly empty).
        covariance_type: ``"diag"`` (default) or ``"full"`` (LKJ correlations).
        method: ``"svi"``, the only one (pyrovae has no variational EM).
        concentration, loc_prior_loc, loc_prior_scale, scale_prior_loc,
        scale_prior_scale, lkj_concentration: the priors, as for
            :class:`pyrovae.BayesianGaussianMixture` (defaults suit
            standardized data).
        init, n_init: the guide is centred on the best of ``n_init``
            k-means(++) seedings before SVI.
        tol, max_iter, learning_rate, batch_size, random_state, dtype: as for
            :class:`FactorAnalysisEstimator` (``max_iter`` counts SVI
            epochs). With ``batch_size`` below the number of samples the
            likelihood of each batch is scaled to the whole data set.
        predictive_samples: S, the draws behind ``score_samples``.

    Attributes:
        model_, weights_, means_, covariances_, labels_, n_iter_,
        converged_, history_: as for :class:`GaussianMixtureEstimator`.
        lower_bound_: the ELBO per data point of the last epoch.
    """

    _methods = ("svi",)

    def __init__(
        self,
        n_components: int = 1,
        *,
        covariance_type: str = "diag",
        method: str = "svi",
        concentration: float = 1.0,
        loc_prior_loc: float = 0.0,
        loc_prior_scale: float = 5.0,
        scale_prior_loc: float = 0.0,
        scale_prior_scale: float = 1.0,
        lkj_concentration: float = 1.0,
        init: str = "kmeans",
        n_init: int = 1,
        tol: float = 1e-6,
        max_iter: int = 500,
        learning_rate: float = 0.01,
        batch_size: int | None = None,
        predictive_samples: int = 100,
        random_state: Any = None,
        dtype: Any = "float64",
    ) -> None:
        self.n_components = n_components
        self.covariance_type = covariance_type
        self.method = method
        self.concentration = concentration
        self.loc_prior_loc = loc_prior_loc
        self.loc_prior_scale = loc_prior_scale
        self.scale_prior_loc = scale_prior_loc
        self.scale_prior_scale = scale_prior_scale
        self.lkj_concentration = lkj_concentration
        self.init = init
        self.n_init = n_init
        self.tol = tol
        self.max_iter = max_iter
        self.learning_rate = learning_rate
        self.batch_size = batch_size
        self.predictive_samples = predictive_samples
        self.random_state = random_state
        self.dtype = dtype

    def fit(self, X: Any, y: Any = None) -> "BayesianGaussianMixtureEstimator":
        """Fit the guide to X, shape (n_samples, n_features); ``y`` is ignored."""
        self._check_params()
        X = self._validate(X, reset=True)
        self._check_samples(X)
        seed = self._seed()
        n, d = X.shape
        minibatch = self.batch_size is not None and self.batch_size < n
        options = dict(
            covariance=self.covariance_type, num_data=n if minibatch else None,
            concentration=self.concentration, loc_prior_loc=self.loc_prior_loc,
            loc_prior_scale=self.loc_prior_scale, scale_prior_loc=self.scale_prior_loc,
            scale_prior_scale=self.scale_prior_scale, lkj_concentration=self.lkj_concentration,
            init=self.init, seed=seed,
        )
        model = self._build(lambda: BayesianGaussianMixture(self.n_components, d, **options), seed)
        model.initialize(X, seed=seed, n_init=self.n_init)
        self._fit_svi(model, X, seed)
        self._set_fitted(model, X)
        return self

    def score_samples(self, X: Any) -> np.ndarray:
        """Posterior predictive log density per point, shape (n_samples,),
        from ``predictive_samples`` guide draws seeded with :data:`PREDICTIVE_SEED`."""
        X = self._fitted_data(X)
        generator = torch.Generator().manual_seed(PREDICTIVE_SEED)
        with _param_store_released(self.model_):
            out = self.model_.log_predictive(X, num_samples=self.predictive_samples,
                                             generator=generator)
        return _numpy(out)
