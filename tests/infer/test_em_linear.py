"""EM for factor analysis and probabilistic PCA.

Invariants (the log-likelihood never decreases; at a fixed point the model's
variances equal the sample variances; the gradient vanishes), agreement with
scikit-learn's FactorAnalysis and PCA on real data (bfi, standardized by
train statistics) in held-out log-likelihood, and the PPCA closed form.
Loadings are identified only up to rotation, so likelihoods, covariances and
subspaces are compared, never loadings.
"""

import math

import pytest
import torch

from pyrovae.data import load_dataset
from pyrovae.data.synthetic import linear_gaussian_truth
from pyrovae.infer.em import EMResult, fit_linear_gaussian_em, log_likelihood_from_moments
from pyrovae.models import PPCA, FactorAnalysis
from pyrovae.maths.linear import LinearGaussianParams, linear_gaussian_log_prob, ppca_closed_form

F64 = torch.float64



@pytest.fixture(scope="module")
def bfi():
    train = load_dataset("bfi", split="train", seed=0).x.double()
    test = load_dataset("bfi", split="test", seed=0).x.double()
    return train, test


def mean_ll(params, x):
    return linear_gaussian_log_prob(x, params.loc, params.weight, params.noise).mean().item()


@pytest.mark.parametrize("isotropic", [False, True], ids=["fa", "ppca"])
def test_log_likelihood_never_decreases(bfi, isotropic):
    train, _ = bfi
    # A random start gives a long, informative climb (a PCA start is near the optimum).
    params, result = fit_linear_gaussian_em(
        train, 5, isotropic=isotropic, init="random", seed=1, max_iter=300, tol=1e-10
    )
    assert isinstance(result, EMResult)
    ll = torch.tensor(result.history["log_likelihood"].to_numpy())
    assert len(ll) == result.n_iter + 1  # row 0 is the initialization
    steps = ll[1:] - ll[:-1]
    # float64 rounding of a ~30-nat quantity is ~1e-14; allow 1e-11
    assert bool((steps >= -1e-11).all()), steps.min()
    assert ll[-1] - ll[0] > 1.0  # it did climb
    # the recorded value is the log-likelihood of the returned parameters
    assert mean_ll(params, train) == pytest.approx(ll[-1].item(), abs=1e-9)


def test_moment_log_likelihood_equals_the_per_point_mean(bfi):
    train, _ = bfi
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(25, 4, generator=gen, dtype=F64)
    noise = torch.rand(25, generator=gen, dtype=F64) + 0.1
    mu = train.mean(0)
    cov = (train - mu).T @ (train - mu) / len(train)
    per_point = linear_gaussian_log_prob(train, mu, w, noise).mean()
    assert log_likelihood_from_moments(cov, w, noise).item() == pytest.approx(per_point.item(), abs=1e-10)


def test_fa_fixed_point_invariants(bfi):
    train, _ = bfi
    params, result = fit_linear_gaussian_em(train, 5, tol=1e-12, max_iter=5000)
    assert result.converged
    cov = torch.cov(train.T, correction=0)
    # At a fixed point of the Psi update, diag(W W^T + Psi) = diag(S) exactly
    # (the classical property of ML factor analysis when no psi is floored).
    torch.testing.assert_close(params.covariance().diagonal(), cov.diagonal(), rtol=0, atol=1e-6)
    torch.testing.assert_close(params.loc, train.mean(0), rtol=0, atol=1e-12)
    # and the log-likelihood is stationary in every parameter
    w = params.weight.clone().requires_grad_()
    log_noise = params.noise.log().clone().requires_grad_()
    linear_gaussian_log_prob(train, params.loc, w, log_noise.exp()).mean().backward()
    assert w.grad.abs().max().item() < 1e-5
    assert log_noise.grad.abs().max().item() < 1e-5


def test_fa_matches_sklearn_held_out_log_likelihood(bfi):
    sklearn_fa = pytest.importorskip("sklearn.decomposition").FactorAnalysis
    train, test = bfi
    model = FactorAnalysis(25, 5).double()
    result = model.fit_em(train, tol=1e-9, max_iter=5000)
    assert result.converged
    # sklearn's own default tol (1e-2 on the *total* log-likelihood) stops
    # early; tighten it so both reach the optimum.
    threadpoolctl = pytest.importorskip("threadpoolctl")
    with threadpoolctl.threadpool_limits(1):  # 25 x 25 problems: BLAS threads only contend
        reference = sklearn_fa(5, tol=1e-8, max_iter=10_000, svd_method="lapack").fit(train.numpy())
    ours = model.log_marginal(test).mean().item()
    theirs = reference.score(test.numpy())
    assert abs(ours - theirs) < 1e-3  # nats per data point
    assert abs(model.log_marginal(train).mean().item() - reference.score(train.numpy())) < 1e-3
    # same noise variances (identified, unlike the loadings)
    torch.testing.assert_close(
        model.noise_variance, torch.as_tensor(reference.noise_variance_), rtol=0, atol=1e-3
    )


def test_ppca_closed_form_matches_sklearn_pca_score(bfi):
    pca = pytest.importorskip("sklearn.decomposition").PCA
    train, test = bfi
    n = len(train)
    model = PPCA(25, 5).double().fit_closed_form(train)
    reference = pca(5).fit(train.numpy())
    ours = model.log_marginal(test).mean().item()
    assert abs(ours - reference.score(test.numpy())) < 1e-3  # nats per data point
    # Exactly: sklearn estimates the covariance with 1/(N - 1) where maximum
    # likelihood uses 1/N, so its model covariance is N/(N-1) times ours.
    p = model.params()
    c = n / (n - 1)
    scaled = LinearGaussianParams(p.loc, p.weight * math.sqrt(c), p.noise * c)
    assert mean_ll(scaled, test) == pytest.approx(reference.score(test.numpy()), abs=1e-9)
    assert model.sigma2.item() == pytest.approx(reference.noise_variance_ / c, rel=1e-10)


def test_ppca_closed_form_is_a_stationary_point(bfi):
    train, _ = bfi
    p = ppca_closed_form(train, 5)
    w = p.weight.clone().requires_grad_()
    log_s2 = p.noise[:1].log().clone().requires_grad_()
    ll = linear_gaussian_log_prob(train, p.loc, w, log_s2.exp().expand(25)).mean()
    ll.backward()
    assert w.grad.abs().max().item() < 1e-9
    assert abs(log_s2.grad.item()) < 1e-9


def test_ppca_em_converges_to_the_closed_form(bfi):
    train, _ = bfi
    exact = ppca_closed_form(train, 5)
    params, result = fit_linear_gaussian_em(
        train, 5, isotropic=True, init="random", seed=3, tol=1e-12, max_iter=5000
    )
    assert result.converged
    assert mean_ll(params, train) == pytest.approx(mean_ll(exact, train), abs=1e-8)
    assert params.noise[0].item() == pytest.approx(exact.noise[0].item(), rel=1e-5)
    # same principal subspace: equal orthogonal projectors
    def projector(w):
        q, _ = torch.linalg.qr(w)
        return q @ q.T

    torch.testing.assert_close(projector(params.weight), projector(exact.weight), rtol=0, atol=1e-4)


def test_em_recovers_synthetic_parameters():
    truth = linear_gaussian_truth(10, 3, seed=4)
    x, _ = truth.sample(20_000, torch.Generator().manual_seed(0))
    params, result = fit_linear_gaussian_em(x, 3, tol=1e-10)
    assert result.converged
    # covariance entries have sampling sd ~ |C| / sqrt(N) ~ 0.03 here
    assert (params.covariance() - truth.covariance()).abs().max().item() < 0.15
    torch.testing.assert_close(params.noise, truth.noise, rtol=0, atol=0.05)
    # the fit is at least as likely as the truth on its own training data
    assert mean_ll(params, x) >= mean_ll(LinearGaussianParams(truth.loc, truth.weight, truth.noise), x)


def test_em_result_and_errors():
    x = torch.randn(50, 4, dtype=F64)
    _, result = fit_linear_gaussian_em(x, 2, max_iter=2, tol=0.0)
    assert not result.converged and result.n_iter == 2
    assert list(result.history.columns[:2]) == ["iteration", "log_likelihood"]
    with pytest.raises(ValueError, match="z_dim"):
        fit_linear_gaussian_em(x, 4)
    with pytest.raises(ValueError, match="NaN"):
        fit_linear_gaussian_em(torch.full((5, 4), math.nan), 1)
    with pytest.raises(ValueError, match="init must be"):
        fit_linear_gaussian_em(x, 1, init="kmeans")
    with pytest.raises(ValueError, match="init must be"):
        FactorAnalysis(4, 1).fit_em(x.float(), init="kmeans")
