"""EM for Gaussian mixtures: monotone likelihood, agreement with
scikit-learn's GaussianMixture on real data, seeding, recovery of a known
mixture."""

import numpy as np
import pytest
import torch

from pyrovae.data import data_root, load_dataset
from pyrovae.data.synthetic import gmm_truth
from pyrovae.infer.em_mixture import fit_mixture_em
from pyrovae.maths.mixture import MixtureParameters, initial_parameters, kmeans_plusplus
from pyrovae.models.mixture import match_components

sklearn_mixture = pytest.importorskip("sklearn.mixture")
needs_faithful = pytest.mark.skipif(
    not (data_root() / "tabular" / "faithful.csv").exists(), reason="faithful.csv not found"
)



def _split(name):
    return load_dataset(name, "train").x.double(), load_dataset(name, "test").x.double()



def _sklearn_precisions(params: MixtureParameters) -> np.ndarray:
    if params.covariance == "diag":
        return (1.0 / params.covariances).numpy()
    return torch.linalg.inv(params.covariances).numpy()


REAL = [pytest.param("faithful", 2, marks=needs_faithful), ("iris", 3)]


@pytest.mark.parametrize("covariance", ["full", "diag"])
@pytest.mark.parametrize("name,K", [pytest.param("faithful", 3, marks=needs_faithful), ("iris", 3)])
def test_log_likelihood_never_decreases(name, K, covariance):
    # Without the covariance regularizer EM is exact coordinate ascent, so
    # every iteration's mean log-likelihood is at least the previous one (up
    # to float64 rounding, 1e-12 nats).
    x, _ = _split(name)
    fit = fit_mixture_em(x, K, covariance, n_init=2, seed=1, tol=1e-10, max_iter=300, reg_covar=0.0)
    ll = fit.result.history["log_likelihood"].to_numpy()
    assert fit.result.n_iter == len(ll) >= 5
    assert np.all(np.diff(ll) >= -1e-12)
    assert list(fit.result.history["iteration"]) == list(range(1, len(ll) + 1))


@pytest.mark.parametrize("covariance", ["full", "diag"])
@pytest.mark.parametrize("name,K", REAL)
def test_matches_sklearn_from_the_same_start(name, K, covariance):
    # Both implementations run EM from identical parameters with the same
    # regularizer (1e-6) to a tight tolerance, so they follow the same path to
    # the same fixed point: held-out log-likelihood per point within 1e-3 nats
    # (in practice ~1e-8) and the same means.
    x, x_test = _split(name)
    start = initial_parameters(x, K, covariance, generator=torch.Generator().manual_seed(0))
    ours = fit_mixture_em(x, K, covariance, init_params=start, tol=1e-10, max_iter=2000)
    sk = sklearn_mixture.GaussianMixture(
        K, covariance_type=covariance, tol=1e-10, max_iter=2000, reg_covar=1e-6,
        weights_init=start.weights.numpy(), means_init=start.means.numpy(),
        precisions_init=_sklearn_precisions(start), random_state=0,
    ).fit(x.numpy())
    assert ours.result.converged and sk.converged_
    held_out = ours.params.log_likelihood(x_test).mean().item()
    assert abs(held_out - sk.score(x_test.numpy())) < 1e-3
    assert abs(ours.log_likelihood - sk.score(x.numpy())) < 1e-6
    assert np.allclose(ours.params.means.numpy(), sk.means_, atol=1e-4)


@pytest.mark.parametrize("covariance", ["full", "diag"])
@pytest.mark.parametrize("name,K", REAL)
def test_best_of_restarts_matches_sklearn_optimum(name, K, covariance):
    # Independent starts on each side. The likelihood is multimodal (on iris
    # with full covariances the first of our five seedings ends in a worse
    # local optimum, -1.877 against -1.834 nats per point on the training
    # split), so the claim is about the best of five restarts on each side:
    # both reach the same optimum, to 1e-3 nats per point on held-out data.
    x, x_test = _split(name)
    ours = fit_mixture_em(x, K, covariance, n_init=5, seed=0, tol=1e-10, max_iter=2000)
    sk = sklearn_mixture.GaussianMixture(
        K, covariance_type=covariance, n_init=5, tol=1e-10, max_iter=2000, random_state=0,
    ).fit(x.numpy())
    assert abs(ours.log_likelihood - sk.score(x.numpy())) < 1e-4
    assert abs(ours.params.log_likelihood(x_test).mean().item() - sk.score(x_test.numpy())) < 1e-3
    restarts = ours.restarts
    assert len(restarts) == 5 and restarts["kept"].sum() == 1
    assert restarts.loc[restarts["kept"], "log_likelihood"].item() == restarts["log_likelihood"].max()


def test_kmeans_plusplus_seeds_one_point_per_separated_cluster():
    data = load_dataset("synthetic-gmm", n=600, seed=0)
    for seed in range(10):
        idx = kmeans_plusplus(data.x.double(), 3, torch.Generator().manual_seed(seed))
        assert len(set(idx.tolist())) == 3
        assert sorted(data.y[idx].tolist()) == [0, 1, 2]


def test_initialization_does_not_collapse_components():
    # A k-means start already splits well-separated clusters correctly: every
    # initial weight is within 0.05 of the true proportion.
    data = load_dataset("synthetic-gmm", n=600, seed=0)
    truth = gmm_truth(seed=0)
    start = initial_parameters(data.x, 3, "full", generator=torch.Generator().manual_seed(5))
    perm = match_components(truth.means, start.means)
    assert torch.allclose(start.weights[perm], truth.weights, atol=0.05)


@pytest.mark.parametrize("covariance", ["full", "diag"])
def test_em_recovers_synthetic_mixture(covariance):
    # 1000 points; the smallest true component has ~130. Tolerances are about
    # three standard errors of the maximum-likelihood estimate for that
    # component: weights 0.05, means 0.2, covariance entries 0.25.
    truth = gmm_truth(3, 2, covariance, seed=0)
    train = load_dataset("synthetic-gmm", covariance=covariance, seed=0)
    test = load_dataset("synthetic-gmm", "test", covariance=covariance, seed=0)
    fit = fit_mixture_em(train.x, 3, covariance, n_init=3, seed=0)
    p = fit.params
    perm = match_components(truth.means, p.means)
    assert (p.weights[perm] - truth.weights).abs().max() < 0.05
    assert (p.means[perm] - truth.means).abs().max() < 0.2
    assert (p.dense_covariances()[perm] - truth.covariances).abs().max() < 0.25
    # On held-out points the fit is as good as the truth, within 0.05 nats.
    gap = p.log_likelihood(test.x.double()).mean() - truth.log_likelihood(test.x.double()).mean()
    assert abs(gap.item()) < 0.05


def test_bad_input_is_rejected():
    x = torch.randn(20, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match="covariance"):
        fit_mixture_em(x, 2, "spherical")
    bad = x.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        fit_mixture_em(bad, 2)
    start = initial_parameters(x, 2, "diag", generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="init_params"):
        fit_mixture_em(x, 2, "full", init_params=start)
    with pytest.raises(ValueError, match="n_components"):
        kmeans_plusplus(x, 21)
