"""Exact identities of the evaluation code on a linear-Gaussian model whose
posterior and marginal likelihood are known in closed form:

    z ~ N(0, I_d),  x | z ~ N(W z + b, s^2 I_D)
    p(z | x) = N(S W^T (x - b) / s^2, S),  S = (I + W^T W / s^2)^-1
    p(x) = N(b, W W^T + s^2 I)
"""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import Trace_ELBO

from pyrovae.infer.evaluate import (
    elbo_terms,
    evaluate,
    importance_log_likelihood,
    log_importance_weights,
    posterior_predictive_log_density,
)


class LinearGaussian:
    def __init__(self, d=2, D=5, s=0.7, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.W = torch.randn(D, d, generator=g, dtype=torch.float64)
        self.b = torch.randn(D, generator=g, dtype=torch.float64)
        self.s, self.d, self.D = s, d, D
        self.S = torch.linalg.inv(torch.eye(d, dtype=torch.float64) + self.W.T @ self.W / s**2)
        self.loc_shift = 0.0
        self.scale_mult = 1.0

    def data(self, n, seed=1):
        g = torch.Generator().manual_seed(seed)
        z = torch.randn(n, self.d, generator=g, dtype=torch.float64)
        return z @ self.W.T + self.b + self.s * torch.randn(n, self.D, generator=g, dtype=torch.float64)

    def model(self, x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(self.d), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z @ self.W.T + self.b, self.s).to_event(1), obs=x)

    def posterior(self, x):
        loc = (x - self.b) @ self.W @ self.S.T / self.s**2
        return dist.MultivariateNormal(loc, covariance_matrix=self.S)

    def guide(self, x):
        post = self.posterior(x)
        tril = post.scale_tril * self.scale_mult
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.MultivariateNormal(post.loc + self.loc_shift, scale_tril=tril))

    def log_marginal(self, x):
        cov = self.W @ self.W.T + self.s**2 * torch.eye(self.D, dtype=torch.float64)
        return dist.MultivariateNormal(self.b, covariance_matrix=cov).log_prob(x)


@pytest.fixture
def lg():
    return LinearGaussian()


def test_elbo_with_exact_posterior_equals_log_marginal(lg):
    # log p(x, z) - log q(z | x) = log p(x) for every z when q is the posterior,
    # so a single draw gives the exact answer per data point.
    x = lg.data(64)
    exact = lg.log_marginal(x)
    terms = elbo_terms(lg.model, lg.guide, x, num_particles=3)
    assert torch.allclose(terms["elbo"], exact, atol=1e-6, rtol=0)
    log_w = log_importance_weights(lg.model, lg.guide, x, 7)[0]
    assert log_w.shape == (7, 64)
    assert torch.allclose(log_w, exact.expand(7, 64), atol=1e-6, rtol=0)
    # Pyro's own estimator agrees: its loss is the negative ELBO summed over the batch.
    assert Trace_ELBO().loss(lg.model, lg.guide, x) == pytest.approx(-exact.sum().item(), abs=1e-6)


def test_recon_and_kl_split_the_elbo(lg):
    lg.loc_shift, lg.scale_mult = 0.3, 1.4
    x = lg.data(32)
    terms = elbo_terms(lg.model, lg.guide, x)
    assert torch.allclose(terms["recon"] - terms["kl"], terms["elbo"], atol=1e-9)
    # The KL between two Gaussians is non-negative; a single draw estimates it,
    # so compare its mean with the closed form within Monte Carlo error.
    many = elbo_terms(lg.model, lg.guide, x, num_particles=4000)
    q = dist.MultivariateNormal(lg.posterior(x).loc + 0.3, scale_tril=lg.posterior(x).scale_tril * 1.4)
    p = dist.MultivariateNormal(torch.zeros(lg.d, dtype=torch.float64), torch.eye(lg.d, dtype=torch.float64))
    kl = torch.distributions.kl_divergence(q, p)
    assert torch.allclose(many["kl"], kl, atol=0.08)


def test_importance_estimate_matches_exact_within_error(lg):
    lg.loc_shift, lg.scale_mult = 0.2, 1.3
    x = lg.data(50)
    exact = lg.log_marginal(x)
    torch.manual_seed(0)
    est = importance_log_likelihood(lg.model, lg.guide, x, num_samples=3000, batch_size=17)
    # Each estimate has Monte Carlo error of order sqrt(Var(w) / K) / E[w] and a
    # downward bias of order Var(w) / (2 K E[w]^2); both are small at K = 3000.
    err = est - exact
    assert err.abs().max().item() < 0.1
    assert abs(err.mean().item()) < 4 * err.std().item() / math.sqrt(len(err)) + 1e-3


def test_elbo_below_iwae_and_iwae_increases_with_k(lg):
    lg.loc_shift, lg.scale_mult = 0.5, 1.6
    x = lg.data(400)
    exact = lg.log_marginal(x).mean().item()
    torch.manual_seed(0)
    elbo = elbo_terms(lg.model, lg.guide, x, num_particles=50)["elbo"].mean().item()
    one = importance_log_likelihood(lg.model, lg.guide, x, 1)
    bounds = [one.mean().item()] + [
        importance_log_likelihood(lg.model, lg.guide, x, k).mean().item() for k in (10, 100)
    ]
    # K = 1 is a single-draw ELBO estimate: it agrees within 4 standard errors.
    assert abs(bounds[0] - elbo) < 4 * one.std().item() / math.sqrt(len(one))
    assert elbo < bounds[1] < bounds[2] < exact + 1e-3
    assert exact - bounds[2] < 0.5 * (exact - elbo)


def test_evaluate_reports_exact_likelihood_when_available(lg):
    lg.loc_shift = 0.2
    x = lg.data(40)
    ev = evaluate(lg, x, num_samples=200, seed=3)
    assert ev.log_likelihood_method == "exact"
    assert ev.exact == pytest.approx(lg.log_marginal(x).mean().item(), abs=1e-9)
    # The importance estimate is noisy around a bound just below the exact
    # value: at K = 200 with this guide its error is a few hundredths of a nat.
    assert ev.elbo < ev.iwae and abs(ev.iwae - ev.exact) < 0.05
    # Seeded: the same call gives the same numbers and leaves global RNG alone.
    state = torch.get_rng_state()
    again = evaluate(lg, x, num_samples=200, seed=3)
    assert torch.equal(state, torch.get_rng_state())
    assert again.iwae == ev.iwae and again.elbo == ev.elbo


def test_global_latent_gives_clear_error():
    def model(x):
        w = pyro.sample("w", dist.Normal(0.0, 1.0))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("x", dist.Normal(w, 1.0), obs=x)

    def guide(x):
        pyro.sample("w", dist.Normal(0.0, 1.0))

    with pytest.raises(ValueError, match=r"outside pyro.plate\('data'\)"):
        log_importance_weights(model, guide, torch.zeros(3), 4)


def test_posterior_predictive_for_a_global_latent_matches_closed_form():
    # mu ~ N(0, 1), x_n | mu ~ N(mu, 1); with q(mu) = N(m, v) the predictive
    # density of a new point is N(x; m, 1 + v).
    m, v = 0.7, 0.2

    def model(x):
        mu = pyro.sample("mu", dist.Normal(torch.tensor(0.0, dtype=x.dtype), 1.0))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("x", dist.Normal(mu, 1.0), obs=x.squeeze(-1))

    def guide(x):
        pyro.sample("mu", dist.Normal(torch.tensor(m, dtype=x.dtype), v**0.5))

    x = torch.linspace(-2, 3, 11, dtype=torch.float64).unsqueeze(-1)  # (N, D) with D = 1
    exact = dist.Normal(m, (1 + v) ** 0.5).log_prob(x.squeeze(-1))
    torch.manual_seed(0)
    est = posterior_predictive_log_density(model, guide, x, num_samples=4000)
    assert (est - exact).abs().max().item() < 0.02
    ev = evaluate(model, x, guide=guide, num_samples=4000, elbo_particles=4)
    assert ev.log_likelihood_method.startswith("posterior predictive")
    assert ev.log_likelihood == pytest.approx(exact.mean().item(), abs=0.02)
    # The whole-batch ELBO per point: E_q sum_n log N(x_n; mu, 1) - KL(q || p), over N.
    kl = torch.distributions.kl_divergence(dist.Normal(m, v**0.5), dist.Normal(0.0, 1.0))
    expected = (dist.Normal(m, 1.0).log_prob(x.squeeze(-1)) - v / 2).mean() - kl / len(x)
    assert ev.elbo == pytest.approx(expected.item(), abs=0.1)


def test_enumerated_sites_are_summed_out_exactly():
    # x_n | k ~ N(mu_k, 1), k ~ Categorical(w), with k enumerated in the model
    # and an empty guide: every log weight is the exact log p(x_n).
    w = torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64)
    mu = torch.tensor([-2.0, 0.0, 3.0], dtype=torch.float64)

    def model(x):
        with pyro.plate("data", x.shape[0]):
            k = pyro.sample("k", dist.Categorical(w), infer={"enumerate": "parallel"})
            pyro.sample("x", dist.Normal(mu[k].unsqueeze(-1), 1.0).to_event(1), obs=x)

    def guide(x):
        pass

    x = torch.linspace(-4, 5, 13, dtype=torch.float64).unsqueeze(-1)
    exact = torch.logsumexp(w.log() + dist.Normal(mu, 1.0).log_prob(x), -1)
    log_w, log_lik, log_ratio = log_importance_weights(model, guide, x, 4)
    assert torch.allclose(log_w, exact.expand(4, -1), atol=1e-10)
    assert torch.allclose(log_ratio, torch.zeros_like(log_ratio))
    ev = evaluate(model, x, guide=guide, num_samples=3)
    assert ev.elbo == pytest.approx(exact.mean().item(), abs=1e-10)
    assert ev.iwae == pytest.approx(exact.mean().item(), abs=1e-10)


def test_enumeration_next_to_a_guided_continuous_latent():
    # z ~ N(0, 1) from the guide, k enumerated: log w = log sum_k p(k) p(x | z, k)
    # + log p(z) - log q(z | x), checked against the same sum written by hand.
    w = torch.tensor([0.4, 0.6], dtype=torch.float64)
    shift = torch.tensor([-1.0, 2.0], dtype=torch.float64)

    def model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(torch.zeros((), dtype=x.dtype), 1.0))
            k = pyro.sample("k", dist.Categorical(w), infer={"enumerate": "parallel"})
            pyro.sample("x", dist.Normal(z + shift[k], 0.5), obs=x.squeeze(-1))

    def guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(0.3 * x.squeeze(-1), 0.8))

    x = torch.tensor([[-1.5], [0.2], [2.5]], dtype=torch.float64)
    torch.manual_seed(0)
    # nesting and enumeration given, so the guide's draws are the first ones.
    log_w, log_lik, log_ratio = log_importance_weights(model, guide, x, 5, 1, True)
    torch.manual_seed(0)
    z = dist.Normal(0.3 * x.squeeze(-1), 0.8).expand((5, 3)).sample()
    by_hand = (
        torch.logsumexp(w.log() + dist.Normal(z.unsqueeze(-1) + shift, 0.5).log_prob(x), -1)
        + dist.Normal(0.0, 1.0).log_prob(z) - dist.Normal(0.3 * x.squeeze(-1), 0.8).log_prob(z)
    )
    assert torch.allclose(log_w, by_hand, atol=1e-10)
    assert torch.allclose(log_lik + log_ratio, log_w)
