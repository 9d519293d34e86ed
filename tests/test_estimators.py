"""scikit-learn estimators (pyrovae.estimators): scikit-learn's own estimator
checks, agreement with scikit-learn's FactorAnalysis, PCA and GaussianMixture
on real data, Pipeline and GridSearchCV use, parameter counts, seeds.

Skipped checks: none. Every check that ``parametrize_with_checks`` generates
for these estimators passes; ``expected_failed_checks`` is therefore empty.
(scikit-learn itself skips ``check_array_api_input`` unless the environment
variable SCIPY_ARRAY_API=1 is set; with it set, that check passes too.)
"""

from __future__ import annotations

import math
import subprocess
import sys
import warnings

import numpy as np
import pandas as pd
import pytest
import torch

sklearn = pytest.importorskip("sklearn", minversion="1.6")  # expected_failed_checks, validate_data

from sklearn.base import clone  # noqa: E402
from sklearn.decomposition import PCA, FactorAnalysis  # noqa: E402
from sklearn.exceptions import ConvergenceWarning  # noqa: E402
from sklearn.mixture import GaussianMixture  # noqa: E402
from sklearn.model_selection import GridSearchCV, KFold  # noqa: E402
from sklearn.pipeline import Pipeline, make_pipeline  # noqa: E402
from sklearn.preprocessing import StandardScaler  # noqa: E402
from sklearn.utils.estimator_checks import parametrize_with_checks  # noqa: E402

from pyrovae import load_dataset  # noqa: E402
from pyrovae.estimators import (  # noqa: E402
    BayesianGaussianMixtureEstimator,
    FactorAnalysisEstimator,
    GaussianMixtureEstimator,
    PPCAEstimator,
)

#: Held-out log-likelihood per point: pyrovae's EM against scikit-learn's, nats.
AGREEMENT = 1e-3


# -- scikit-learn's estimator checks ------------------------------------------------
# Small and fast: few iterations; EM where the model has it, SVI for the
# Bayesian mixture (its only method) and for one instance of each other family.
CHECKED = [
    FactorAnalysisEstimator(n_components=1, max_iter=50, tol=1e-4),
    PPCAEstimator(n_components=1, max_iter=50, tol=1e-4),
    PPCAEstimator(n_components=1, method="closed_form"),
    GaussianMixtureEstimator(n_components=3, max_iter=20, n_init=1, tol=1e-3),
    GaussianMixtureEstimator(n_components=3, covariance_type="diag", max_iter=20, n_init=1, tol=1e-3),
    BayesianGaussianMixtureEstimator(n_components=3, max_iter=5, predictive_samples=10),
    FactorAnalysisEstimator(n_components=1, method="svi", max_iter=3),
    GaussianMixtureEstimator(n_components=3, method="svi", max_iter=3, n_init=1),
]


def expected_failed_checks(estimator):
    # No check is skipped: every generated check passes for every instance above.
    return {}


@parametrize_with_checks(CHECKED, expected_failed_checks=expected_failed_checks)
def test_sklearn_estimator_checks(estimator, check):
    with warnings.catch_warnings():
        # EM with max_iter=20 on the checks' toy data may stop early; that is
        # what the ConvergenceWarning says, not a failure of the check.
        warnings.simplefilter("ignore", ConvergenceWarning)
        check(estimator)


# -- real data ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bfi():
    """(train, test) Big Five items, standardized by train statistics, float64."""
    return tuple(load_dataset("bfi", split).x.double().numpy() for split in ("train", "test"))


@pytest.fixture(scope="module")
def faithful():
    return tuple(load_dataset("faithful", split).x.double().numpy() for split in ("train", "test"))


@pytest.mark.parametrize("k", [1, 3, 5])
def test_factor_analysis_agrees_with_sklearn(bfi, k):
    train, test = bfi
    ours = FactorAnalysisEstimator(k, tol=1e-10, max_iter=10_000, random_state=0).fit(train)
    theirs = FactorAnalysis(k, tol=1e-10, max_iter=10_000, svd_method="lapack").fit(train)
    assert ours.converged_
    assert abs(ours.score(test) - theirs.score(test)) < AGREEMENT
    np.testing.assert_allclose(ours.score_samples(test), theirs.score_samples(test), atol=1e-2)
    # The same maximum: model covariances agree (loadings only up to rotation).
    np.testing.assert_allclose(ours.get_covariance(), theirs.get_covariance(), atol=1e-3)
    np.testing.assert_allclose(ours.mean_, theirs.mean_, atol=1e-12)


def test_ppca_agrees_with_sklearn_pca(bfi):
    """PCA's score is the PPCA likelihood at the maximum-likelihood solution,
    but from variances with ddof=1; rescaled to ddof=0 the two agree exactly."""
    train, test = bfi
    n, k = train.shape[0], 5
    pca = PCA(k, svd_solver="full").fit(train)
    pca.explained_variance_ *= (n - 1) / n
    pca.noise_variance_ *= (n - 1) / n
    for method in ("closed_form", "em"):
        ours = PPCAEstimator(k, method=method, tol=1e-12, random_state=0).fit(train)
        assert abs(ours.score(test) - pca.score(test)) < 1e-8
        np.testing.assert_allclose(ours.noise_variance_, pca.noise_variance_, rtol=1e-10)


@pytest.mark.parametrize("covariance_type", ["full", "diag"])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_gaussian_mixture_agrees_with_sklearn(faithful, covariance_type, k):
    train, test = faithful
    ours = GaussianMixtureEstimator(k, covariance_type=covariance_type, tol=1e-10,
                                    max_iter=5000, random_state=0).fit(train)
    theirs = GaussianMixture(k, covariance_type=covariance_type, tol=1e-10, max_iter=5000,
                             n_init=5, random_state=0).fit(train)
    assert ours.converged_
    assert abs(ours.score(test) - theirs.score(test)) < AGREEMENT
    assert abs(ours.score(train) - theirs.score(train)) < 1e-6  # the same maximum
    n = test.shape[0]
    assert abs(ours.bic(test) - theirs.bic(test)) < 2 * n * AGREEMENT
    assert abs(ours.aic(test) - theirs.aic(test)) < 2 * n * AGREEMENT


def test_pipeline_and_grid_search_over_factors(bfi):
    """GridSearchCV with the default scoring (held-out log-likelihood per point)
    picks the argmax of the cross-validated scores, which agree with the same
    search over scikit-learn's FactorAnalysis."""
    X = load_dataset("bfi", "all", standardize=False).x.double().numpy()
    cv = KFold(3, shuffle=True, random_state=0)
    grid = {"fa__n_components": [1, 3, 5]}
    ours = GridSearchCV(Pipeline([("scale", StandardScaler()),
                                  ("fa", FactorAnalysisEstimator(tol=1e-8, random_state=0))]),
                        grid, cv=cv).fit(X)
    theirs = GridSearchCV(Pipeline([("scale", StandardScaler()),
                                    ("fa", FactorAnalysis(tol=1e-8, svd_method="lapack"))]),
                          grid, cv=cv).fit(X)
    scores = ours.cv_results_["mean_test_score"]
    np.testing.assert_allclose(scores, theirs.cv_results_["mean_test_score"], atol=AGREEMENT)
    assert ours.best_params_ == {"fa__n_components": grid["fa__n_components"][int(np.argmax(scores))]}
    assert ours.best_params_ == theirs.best_params_
    best = ours.best_estimator_
    assert isinstance(best[-1], FactorAnalysisEstimator) and best[-1].n_features_in_ == 25
    assert best.score(X) == pytest.approx(best[-1].score(best[0].transform(X)))
    assert best.transform(X).shape == (X.shape[0], ours.best_params_["fa__n_components"])


def test_pipeline_and_grid_search_over_components():
    X = load_dataset("faithful", "all", standardize=False).x.double().numpy()
    cv = KFold(3, shuffle=True, random_state=0)
    grid = {"gaussianmixtureestimator__n_components": [1, 2],
            "gaussianmixtureestimator__covariance_type": ["full", "diag"]}
    ours = GridSearchCV(make_pipeline(StandardScaler(), GaussianMixtureEstimator(tol=1e-8, random_state=0)),
                        grid, cv=cv).fit(X)
    theirs = GridSearchCV(
        make_pipeline(StandardScaler(), GaussianMixture(tol=1e-8, max_iter=1000, n_init=5, random_state=0)),
        {k.replace("gaussianmixtureestimator", "gaussianmixture"): v for k, v in grid.items()}, cv=cv,
    ).fit(X)
    np.testing.assert_allclose(ours.cv_results_["mean_test_score"],
                               theirs.cv_results_["mean_test_score"], atol=AGREEMENT)
    assert ours.best_params_["gaussianmixtureestimator__n_components"] == 2  # two eruption kinds
    labels = ours.best_estimator_.predict(X)
    assert set(np.unique(labels)) == {0, 1}


# -- parameter counts (BIC/AIC), by hand ----------------------------------------------
def _n_parameters(estimator, X):
    """Recovered from the public criteria: BIC - AIC = p (log N - 2)."""
    return (estimator.bic(X) - estimator.aic(X)) / (math.log(X.shape[0]) - 2.0)


def test_parameter_counts_by_hand():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(200, 4))
    # Factor analysis, D = 4, K = 2: W 8 + psi 4 + mu 4 - one rotation angle = 15.
    fa = FactorAnalysisEstimator(2, random_state=0).fit(X)
    assert _n_parameters(fa, X) == pytest.approx(15)
    # PPCA, D = 4, K = 2: W 8 + sigma^2 1 + mu 4 - 1 = 12.
    assert _n_parameters(PPCAEstimator(2, method="closed_form").fit(X), X) == pytest.approx(12)
    # K = 3 factors: 12 + 4 + 4 - 3 = 17.
    assert _n_parameters(FactorAnalysisEstimator(3, random_state=0).fit(X), X) == pytest.approx(17)
    # Mixture, K = 3, D = 4: means 12 + weights 2 + full covariances 3 * 10 = 44; diag 3 * 4 = 26.
    full = GaussianMixtureEstimator(3, n_init=1, random_state=0).fit(X)
    diag = GaussianMixtureEstimator(3, covariance_type="diag", n_init=1, random_state=0).fit(X)
    assert _n_parameters(full, X) == pytest.approx(44)
    assert _n_parameters(diag, X) == pytest.approx(26)
    # And as scikit-learn counts them, on its own fits of the same shapes.
    for ours, cov in ((full, "full"), (diag, "diag")):
        theirs = GaussianMixture(3, covariance_type=cov, random_state=0).fit(X)
        assert _n_parameters(ours, X) == pytest.approx(
            (theirs.bic(X) - theirs.aic(X)) / (math.log(X.shape[0]) - 2.0))
    # BIC itself: -2 log p(X) + p log N.
    assert fa.bic(X) == pytest.approx(-2 * fa.score_samples(X).sum() + 15 * math.log(200))


# -- fitted state, data in, seeds -------------------------------------------------------
def test_fitted_attributes_and_dataframes(bfi):
    train, _ = bfi
    columns = [f"item{i}" for i in range(train.shape[1])]
    frame = pd.DataFrame(train, columns=columns)
    fa = FactorAnalysisEstimator(3, random_state=0).fit(frame)
    assert list(fa.feature_names_in_) == columns and fa.n_features_in_ == 25
    assert fa.components_.shape == (3, 25) and fa.noise_variance_.shape == (25,)
    assert fa.mean_.shape == (25,) and fa.n_iter_ >= 1 and fa.converged_
    assert fa.lower_bound_ == pytest.approx(fa.score(frame), abs=1e-10)
    # transform: the exact posterior means, M^{-1} W^T Psi^{-1} (x - mu).
    w, psi = fa.components_.T, fa.noise_variance_
    m = np.eye(3) + w.T @ (w / psi[:, None])
    expected = np.linalg.solve(m, (w / psi[:, None]).T @ (train - fa.mean_).T).T
    np.testing.assert_allclose(fa.transform(frame), expected, atol=1e-10)
    fa.set_output(transform="pandas")
    out = fa.transform(frame)
    assert list(out.columns) == [f"factoranalysisestimator{i}" for i in range(3)]
    ppca = PPCAEstimator(3, method="closed_form").fit(train)
    assert isinstance(ppca.noise_variance_, float)
    gmm = GaussianMixtureEstimator(2, covariance_type="diag", random_state=0).fit(train[:, :4])
    assert gmm.weights_.shape == (2,) and gmm.means_.shape == (2, 4)
    assert gmm.covariances_.shape == (2, 4) and gmm.labels_.shape == (train.shape[0],)
    np.testing.assert_allclose(gmm.predict_proba(train[:, :4]).sum(1), 1.0)


def test_sampling(faithful):
    train, _ = faithful
    gmm = GaussianMixtureEstimator(2, random_state=0).fit(train)
    X, labels = gmm.sample(4000)
    assert X.shape == (4000, 2) and labels.shape == (4000,) and labels.dtype == np.int64
    # An int random_state gives the same draws on every call (as scikit-learn).
    np.testing.assert_array_equal(gmm.sample(5)[0], gmm.sample(5)[0])
    np.testing.assert_allclose(np.bincount(labels) / 4000, gmm.weights_, atol=0.03)
    fa = FactorAnalysisEstimator(1, random_state=0).fit(train)
    draws = fa.sample(20_000)
    np.testing.assert_allclose(np.cov(draws.T, bias=True), fa.get_covariance(), atol=0.05)
    with pytest.raises(ValueError, match="n_samples"):
        gmm.sample(0)


def test_seeds_decide_every_random_choice(faithful):
    train, _ = faithful
    torch_state = torch.get_rng_state()
    for cls, options in ((GaussianMixtureEstimator, dict(method="svi", max_iter=20)),
                         (BayesianGaussianMixtureEstimator, dict(max_iter=20)),
                         (FactorAnalysisEstimator, dict(n_components=1, method="svi", init="random",
                                                        max_iter=5))):
        options = {"n_components": 2, **options}
        a = cls(**options, random_state=3).fit(train).score_samples(train)
        b = cls(**options, random_state=3).fit(train).score_samples(train)
        c = cls(**options, random_state=4).fit(train).score_samples(train)
        np.testing.assert_array_equal(a, b)
        assert not np.array_equal(a, c)
        # A RandomState instance is drawn from: the same stream gives the same fit.
        d = cls(**options, random_state=np.random.RandomState(7)).fit(train).score_samples(train)
        e = cls(**options, random_state=np.random.RandomState(7)).fit(train).score_samples(train)
        np.testing.assert_array_equal(d, e)
    # Nothing seeded or consumed torch's global generator.
    assert torch.equal(torch.get_rng_state(), torch_state)


def test_svi_reaches_the_em_maximum(faithful):
    """TraceEnum_ELBO with the assignment enumerated is the exact
    log-likelihood, so SVI from the same start climbs to EM's maximum."""
    train, test = faithful
    em = GaussianMixtureEstimator(2, random_state=0).fit(train)
    svi = GaussianMixtureEstimator(2, method="svi", max_iter=100, learning_rate=0.05,
                                   random_state=0).fit(train)
    assert abs(svi.score(train) - em.score(train)) < 1e-4
    assert svi.lower_bound_ == pytest.approx(svi.score(train), abs=1e-4)


def test_bayesian_mixture_scores_the_posterior_predictive(faithful):
    train, test = faithful
    bgmm = BayesianGaussianMixtureEstimator(2, covariance_type="full", max_iter=100,
                                            learning_rate=0.05, random_state=0).fit(train)
    em = GaussianMixtureEstimator(2, random_state=0).fit(train)
    scores = bgmm.score_samples(test)
    # Fixed predictive seed: the same numbers on every call and on any subset.
    np.testing.assert_array_equal(scores, bgmm.score_samples(test))
    np.testing.assert_allclose(scores[::3], bgmm.score_samples(test[::3]), rtol=1e-12)
    # Close to the maximum-likelihood fit, and never far above it on its training data.
    assert abs(bgmm.score(test) - em.score(test)) < 0.1
    assert bgmm.score(train) < em.score(train) + 1e-3
    assert np.mean(bgmm.predict(train) == em.predict(train)) > 0.95 or \
        np.mean(bgmm.predict(train) != em.predict(train)) > 0.95  # up to relabelling
    assert not hasattr(bgmm, "bic")


def test_bad_arguments_fail_at_fit_not_init():
    X = np.random.default_rng(0).normal(size=(30, 3))
    for estimator, match in (
        (FactorAnalysisEstimator(method="gibbs"), "method must be one of"),
        (FactorAnalysisEstimator(3), "n_components=3 must be smaller than the number of features"),
        (PPCAEstimator(tol=-1), "tol must be"),
        (GaussianMixtureEstimator(covariance_type="tied"), "covariance_type must be one of"),
        (GaussianMixtureEstimator(40), "n_samples >= n_components"),
        (GaussianMixtureEstimator(dtype="int32"), "dtype must be"),
        (BayesianGaussianMixtureEstimator(method="em"), "method must be one of"),
        (BayesianGaussianMixtureEstimator(concentration=0.0), "concentration must be"),
    ):
        with pytest.raises(ValueError, match=match):
            estimator.fit(X)
    with pytest.warns(ConvergenceWarning, match="did not converge"):
        GaussianMixtureEstimator(2, max_iter=1, tol=0.0, random_state=0).fit(X)


def test_import_pyrovae_does_not_import_sklearn():
    code = "import sys, pyrovae; print('sklearn' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_clone_and_params_round_trip():
    est = BayesianGaussianMixtureEstimator(3, covariance_type="full", batch_size=32,
                                           random_state=np.random.RandomState(0))
    twin = clone(est)
    assert twin.get_params()["batch_size"] == 32 and twin is not est
    twin.set_params(n_components=2, learning_rate=0.1)
    assert (twin.n_components, twin.learning_rate) == (2, 0.1)
