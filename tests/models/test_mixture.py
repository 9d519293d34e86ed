"""Gaussian mixture models: exact identities first (log-marginal, enumerated
ELBO, responsibilities), then training by SVI against the EM optimum and
recovery of a known mixture, then the Bayesian mixture."""

import math

import numpy as np
import pyro.poutine as poutine
import pytest
import torch
from pyro.infer import TraceEnum_ELBO

from pyrovae.data import data_root, load_dataset
from pyrovae.data.synthetic import gmm_truth
from pyrovae.infer import evaluate, fit
from pyrovae.models import MODELS
from pyrovae.models.mixture import BayesianGaussianMixture, GaussianMixture, match_components
from pyrovae.viz import FIGURES

needs_faithful = pytest.mark.skipif(
    not (data_root() / "tabular" / "faithful.csv").exists(), reason="faithful.csv not found"
)
ENUM = dict(elbo="TraceEnum_ELBO", elbo_options={"max_plate_nesting": 1})



def _random_mixture(covariance: str, K: int = 3, D: int = 3, seed: int = 0) -> GaussianMixture:
    """A float64 mixture with unequal weights and correlated components."""
    model = GaussianMixture(K, D, covariance, init="random", seed=seed).double()
    gen = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for p in model.mixture.parameters():
            p.add_(0.5 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return model



# -- exact identities ------------------------------------------------------------------
@pytest.mark.parametrize("covariance", ["full", "diag"])
def test_log_marginal_matches_dense_computation(covariance):
    model = _random_mixture(covariance)
    x = torch.randn(50, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 2
    params = model.mixture_parameters()
    dense = torch.stack([
        torch.distributions.MultivariateNormal(
            params.means[k], covariance_matrix=params.dense_covariances()[k]
        ).log_prob(x) + params.weights[k].log()
        for k in range(3)
    ], -1)
    expected = torch.logsumexp(dense, -1)
    torch.testing.assert_close(model.log_marginal(x), expected, rtol=0, atol=1e-10)
    # The same numbers through the float64 EM helpers.
    torch.testing.assert_close(params.log_likelihood(x), expected, rtol=0, atol=1e-10)
    if covariance == "diag":
        assert torch.count_nonzero(params.dense_covariances()[0] - torch.diag(params.covariances[0])) == 0


@pytest.mark.parametrize("covariance", ["full", "diag"])
def test_enumerated_elbo_with_empty_guide_is_the_exact_log_likelihood(covariance):
    # With z summed out by enumeration and nothing left for the guide, the
    # ELBO is log p(x) itself: same value and same gradients.
    model = _random_mixture(covariance)
    x = torch.randn(40, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    elbo = TraceEnum_ELBO(max_plate_nesting=1)
    loss = elbo.differentiable_loss(model.model, model.guide, x)
    grads = torch.autograd.grad(loss, list(model.mixture.parameters()))
    exact = -model.log_marginal(x).sum()
    exact_grads = torch.autograd.grad(exact, list(model.mixture.parameters()))
    torch.testing.assert_close(loss, exact, rtol=1e-12, atol=0)
    for g, h in zip(grads, exact_grads):
        torch.testing.assert_close(g, h, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("covariance", ["full", "diag"])
def test_responsibilities_are_bayes_rule(covariance):
    model = _random_mixture(covariance)
    x = torch.randn(30, 3, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    resp = model.predict_proba(x)
    torch.testing.assert_close(resp.sum(-1), torch.ones(30, dtype=torch.float64), rtol=0, atol=1e-12)
    params = model.mixture_parameters()
    joint = torch.stack([
        params.weights[k] * torch.distributions.MultivariateNormal(
            params.means[k], params.dense_covariances()[k]).log_prob(x).exp()
        for k in range(3)
    ], -1)
    torch.testing.assert_close(resp, joint / joint.sum(-1, keepdim=True), rtol=1e-9, atol=1e-12)
    assert torch.equal(model.predict(x), resp.argmax(-1))
    torch.testing.assert_close(model.posterior(x).probs, resp)


def test_sample_follows_the_mixture():
    model = _random_mixture("full", K=2, D=2)
    x, z = model.sample(20000, generator=torch.Generator().manual_seed(0), return_labels=True)
    again = model.sample(20000, generator=torch.Generator().manual_seed(0))
    assert torch.equal(x, again) and x.shape == (20000, 2)
    params = model.mixture_parameters()
    freq = torch.bincount(z, minlength=2).double() / 20000
    se_w = (params.weights * (1 - params.weights) / 20000).sqrt()
    assert ((freq - params.weights).abs() < 4 * se_w).all()
    for k in range(2):
        xk = x[z == k]
        se = params.dense_covariances()[k].diagonal().sqrt() / math.sqrt(len(xk))
        assert ((xk.mean(0) - params.means[k]).abs() < 4 * se).all()
        # Sample covariance within 10% of the largest entry (n_k > 2000).
        scale = params.dense_covariances()[k].abs().max()
        assert (torch.cov(xk.T) - params.dense_covariances()[k]).abs().max() < 0.1 * scale


@pytest.mark.parametrize("covariance", ["full", "diag"])
def test_set_parameters_round_trip(covariance):
    model = _random_mixture(covariance)
    params = model.mixture_parameters()
    other = GaussianMixture(3, 3, covariance, init="random", seed=9).double()
    other.set_parameters(params)
    back = other.mixture_parameters()
    for a, b in ((params.weights, back.weights), (params.means, back.means),
                 (params.covariances, back.covariances)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert bool(other.initialized)


# -- training ----------------------------------------------------------------------------
@needs_faithful
def test_fit_em_sets_the_model():
    train = load_dataset("faithful")
    model = GaussianMixture(2, 2, "full")
    result = model.fit_em(train.x, n_init=3)
    assert result.converged and result.n_iter == len(result.history)
    final = result.history["log_likelihood"].iloc[-1]
    assert abs(model.log_marginal(train.x).mean().item() - final) < 1e-5
    assert len(model.em_fit.restarts) == 3


@needs_faithful
@pytest.mark.parametrize("covariance", ["full", "diag"])
def test_enumerated_svi_reaches_the_em_optimum_on_faithful(covariance):
    # From a random start (means ~ N(0, I), unit covariances, equal weights),
    # 300 full-batch Adam steps on the enumerated ELBO reach the EM optimum:
    # within 1e-3 nats per point on the training and the held-out split.
    train, test = load_dataset("faithful"), load_dataset("faithful", "test")
    em = GaussianMixture(2, 2, covariance)
    em.fit_em(train.x, n_init=5, tol=1e-9)
    model = GaussianMixture(2, 2, covariance, init="random", seed=0)
    start = model.log_marginal(train.x).mean().item()
    result = fit(model, train, epochs=300, batch_size=len(train), lr=0.05, progress=False, **ENUM)
    em_train = em.log_marginal(train.x).mean().item()
    assert start < em_train - 1.0  # the start is far from the optimum
    assert abs(model.log_marginal(train.x).mean().item() - em_train) < 1e-3
    assert abs(model.log_marginal(test.x).mean().item() - em.log_marginal(test.x).mean().item()) < 1e-3
    # fit's per-point training ELBO is the exact log-likelihood here.
    assert abs(result.history["train_elbo"].iloc[-1] - em_train) < 2e-3


def test_enumerated_svi_recovers_synthetic_mixture():
    # Same tolerances as the EM recovery test (about three standard errors of
    # the MLE for the smallest component of 1000 points), on mini-batches.
    # The start keeps the k-means means but resets the weights to equal and
    # the covariances to identity, far from the truth, so SVI has to learn them.
    truth = gmm_truth(3, 2, "full", seed=0)
    train = load_dataset("synthetic-gmm", seed=0)
    model = GaussianMixture(3, 2, "full", seed=0)
    model.initialize(train.x)
    with torch.no_grad():
        model.mixture.logits.zero_()
        model.mixture.raw_scale.zero_()
    start = model.mixture_parameters()
    perm = match_components(truth.means, start.means)
    assert (start.weights[perm] - truth.weights).abs().max() > 0.2
    assert (start.dense_covariances()[perm] - truth.covariances).abs().max() > 0.5
    fit(model, train, epochs=40, batch_size=250, lr=0.03, progress=False, **ENUM)
    p = model.mixture_parameters()
    perm = match_components(truth.means, p.means)
    assert (p.weights[perm] - truth.weights).abs().max() < 0.05
    assert (p.means[perm] - truth.means).abs().max() < 0.2
    assert (p.dense_covariances()[perm] - truth.covariances).abs().max() < 0.25


def test_first_call_initializes_from_data_and_checkpoints_keep_it():
    x = load_dataset("synthetic-gmm", n=300, seed=0).x
    lazy = GaussianMixture(3, 2, seed=4)
    assert not bool(lazy.initialized)
    lazy.model(x)
    explicit = GaussianMixture(3, 2, seed=4)
    explicit.initialize(x)
    torch.testing.assert_close(lazy.log_marginal(x), explicit.log_marginal(x))
    restored = GaussianMixture(3, 2, seed=99)
    restored.load_state_dict(lazy.state_dict())
    restored.model(x[:10])  # already initialized: the restored parameters stay
    torch.testing.assert_close(restored.log_marginal(x), lazy.log_marginal(x))
    untouched = GaussianMixture(3, 2, init="random", seed=4)
    before = untouched.log_marginal(x)
    untouched.model(x)
    torch.testing.assert_close(untouched.log_marginal(x), before)


@needs_faithful
# evaluate's ELBO pass samples the assignment from its prior (the guide is
# empty), which Pyro reports; the exact log-likelihood is what is checked.
@pytest.mark.filterwarnings("ignore:Found vars in model but not guide")
def test_evaluate_uses_the_exact_log_likelihood():
    train, test = load_dataset("faithful"), load_dataset("faithful", "test")
    model = GaussianMixture(2, 2)
    model.fit_em(train.x)
    ev = evaluate(model, test, num_samples=0)
    assert ev.log_likelihood_method == "exact"
    assert abs(ev.log_likelihood - model.log_marginal(test.x).mean().item()) < 1e-6


# -- the Bayesian mixture -------------------------------------------------------------
@pytest.mark.parametrize("covariance", ["diag", "full"])
@pytest.mark.parametrize("elbo", ["Trace_ELBO", "TraceMeanField_ELBO"])
def test_bayesian_mixture_recovers_synthetic_truth(elbo, covariance):
    # Posterior means against the truth, after matching labels: the same
    # tolerances as maximum likelihood (weights 0.05, means 0.2, covariance
    # entries 0.25), the prior being weak against 1000 points.
    truth = gmm_truth(3, 2, covariance, seed=0)
    train = load_dataset("synthetic-gmm", covariance=covariance, seed=0)
    model = BayesianGaussianMixture(3, 2, covariance, seed=0)
    model.initialize(train.x)
    result = fit(model, train, elbo=elbo, epochs=150, batch_size=len(train), lr=0.05,
                 progress=False)
    assert np.isfinite(result.history["train_elbo"]).all()
    p = model.mixture_parameters()
    perm = match_components(truth.means, p.means)
    assert (p.weights[perm] - truth.weights).abs().max() < 0.05
    assert (p.means[perm] - truth.means).abs().max() < 0.2
    assert (p.dense_covariances()[perm] - truth.covariances).abs().max() < 0.25
    # Posterior spread of each mean: the conjugate answer is sd / sqrt(N_k);
    # mean-field VI should land within a factor of 2 of it.
    post_sd = model.variational.loc_log_scale.exp().detach()[perm]
    n_k = 1000 * truth.weights
    reference = truth.covariances.diagonal(dim1=-2, dim2=-1).sqrt() / n_k.sqrt()[:, None]
    ratio = post_sd.double() / reference
    assert ((ratio > 0.5) & (ratio < 2.0)).all()


def test_bayesian_predictive_close_to_maximum_likelihood():
    train = load_dataset("synthetic-gmm", seed=0)
    test = load_dataset("synthetic-gmm", "test", seed=0)
    model = BayesianGaussianMixture(3, 2, "full", seed=0)
    model.initialize(train.x)
    fit(model, train, elbo="TraceMeanField_ELBO", epochs=100, batch_size=len(train), lr=0.05,
        progress=False)
    em = GaussianMixture(3, 2, "full")
    em.fit_em(train.x)
    predictive = model.log_predictive(test.x, num_samples=50, generator=torch.Generator().manual_seed(0))
    assert predictive.shape == (len(test),)
    # With 1000 points the posterior is narrow: the predictive density is
    # within 0.05 nats per point of the maximum-likelihood plug-in.
    assert abs(predictive.mean().item() - em.log_marginal(test.x).mean().item()) < 0.05


def test_bayesian_minibatch_likelihood_is_scaled_by_num_data():
    x = load_dataset("synthetic-gmm", n=100, seed=0).x
    model = BayesianGaussianMixture(3, 2, "full", num_data=1000)
    trace = poutine.trace(poutine.replay(model.model, trace=poutine.trace(model.guide).get_trace(x))).get_trace(x)
    assert trace.nodes["x"]["scale"] == pytest.approx(10.0)
    assert trace.nodes["loc"]["scale"] == 1.0
    corr = poutine.trace(model.guide).get_trace(x).nodes["corr"]["value"]
    # Guide draws are valid correlation factors: unit-norm rows.
    torch.testing.assert_close(corr.pow(2).sum(-1), torch.ones(3, 2))


# -- registry, errors, figures --------------------------------------------------------
def test_registry_builders_and_errors():
    model = MODELS["gmm"](4, K=3, covariance="diag")
    assert isinstance(model, GaussianMixture) and model.K == 3 and model.x_dim == 4
    assert MODELS["gmm"](4, z_dim=5).K == 5  # --z-dim sets K
    assert isinstance(MODELS["bayes-gmm"](2, K=2), BayesianGaussianMixture)
    assert GaussianMixture(**model.config()).config() == model.config()
    with pytest.raises(ValueError, match="disagree"):
        MODELS["gmm"](2, K=2, z_dim=3)
    with pytest.raises(ValueError, match="covariance"):
        GaussianMixture(2, 2, "spherical")
    with pytest.raises(ValueError, match="init"):
        GaussianMixture(2, 2, init="zeros")
    with pytest.raises(ValueError, match="concentration"):
        BayesianGaussianMixture(2, 2, concentration=0.0)
    with pytest.raises(ValueError, match=r"\(N, 4\)"):
        model.log_marginal(torch.zeros(5, 3))
    with pytest.raises(ValueError, match="NaN"):
        model.predict(torch.full((2, 4), float("nan")))


def _is_png(path) -> bool:
    return path.exists() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("name,K", [("synthetic-gmm", 3), ("iris", 3)])
def test_figures_are_written(tmp_path, name, K):
    if name == "iris":
        pytest.importorskip("sklearn")
    train, test = load_dataset(name), load_dataset(name, "test")
    model = GaussianMixture(K, train.dim)
    model.fit_em(train.x, n_init=1)
    paths = FIGURES["gmm"](model, train, test, tmp_path / "gmm")
    assert [p.name for p in paths] == ["components.png"] and _is_png(paths[0])
    bayes = BayesianGaussianMixture(K, train.dim, "full")
    bayes.initialize(train.x)
    paths = FIGURES["bayes-gmm"](bayes, train, test, tmp_path / "bayes")
    assert _is_png(paths[0])
