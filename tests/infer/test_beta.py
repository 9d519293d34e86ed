"""beta-ELBO and KL warm-up: exact values against hand computations on recorded draws.

Model: z_n ~ N(0, I_2), x_n | z_n ~ N(W z_n + b, s^2 I_3); guide
q(z_n | x_n) = N(A x_n + c, diag sigma^2). With the guide's draws recorded, the
beta-weighted integrand log p(x | z) + beta (log p(z) - log q(z)) is computed by
hand and compared to the objective's value and gradient.
"""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import Trace_ELBO
from torch import nn

from pyrovae.infer.beta import BetaELBO
from pyrovae.infer.fit import fit
from pyrovae.infer.objectives import make_objective
from pyrovae.models.vae import VAE

D, Z = 3, 2
DTYPE = torch.float64



class Linear(nn.Module):
    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        r = lambda *shape: nn.Parameter(0.5 * torch.randn(*shape, generator=g, dtype=DTYPE))
        self.W, self.b, self.A, self.c, self.log_sigma = r(D, Z), r(D), r(Z, D), r(Z), r(Z)
        self.s = 0.7
        self.eps = []  # standard-normal draws behind each guide sample

    def model(self, x):
        pyro.module("linear", self)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(Z), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z @ self.W.T + self.b, self.s).to_event(1), obs=x)

    def guide(self, x):
        pyro.module("linear", self)
        with pyro.plate("data", x.shape[0]):
            loc, scale = x @ self.A.T + self.c, self.log_sigma.exp()
            z = pyro.sample("z", dist.Normal(loc, scale).to_event(1))
        self.eps.append(((z - loc) / scale).detach())

    def integrand(self, x, eps, beta):
        """Sum over data points of log p(x|z) + beta (log p(z) - log q(z)), z = loc + scale eps."""
        loc, scale = x @ self.A.T + self.c, self.log_sigma.exp()
        z = loc + scale * eps
        log_lik = torch.distributions.Normal(z @ self.W.T + self.b, self.s).log_prob(x).sum()
        log_prior = torch.distributions.Normal(0.0, 1.0).log_prob(z).sum()
        log_q = torch.distributions.Normal(loc, scale).log_prob(z).sum()
        return log_lik + beta * (log_prior - log_q)


def _x(n=5):
    return torch.randn(n, D, generator=torch.Generator().manual_seed(1), dtype=DTYPE)


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0, 3.0])
def test_value_and_gradient_match_the_beta_weighted_integrand(beta):
    x, m = _x(), Linear()
    objective = BetaELBO(beta=beta)
    pyro.set_rng_seed(0)
    loss = objective.differentiable_loss(m.model, m.guide, x)
    expected = -m.integrand(x, m.eps[-1], beta)
    assert loss.item() == pytest.approx(expected.item(), abs=1e-10)
    params = list(m.parameters())
    got = torch.autograd.grad(loss, params)
    want = torch.autograd.grad(expected, params)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


def test_beta_zero_is_the_expected_log_likelihood():
    x, m = _x(), Linear()
    pyro.set_rng_seed(0)
    loss = BetaELBO(beta=0.0, num_particles=3).loss(m.model, m.guide, x)
    loc, scale = x @ m.A.T + m.c, m.log_sigma.exp()
    log_lik = [torch.distributions.Normal((loc + scale * e) @ m.W.T + m.b, m.s).log_prob(x).sum()
               for e in m.eps]
    assert len(log_lik) == 3
    assert loss == pytest.approx(-torch.stack(log_lik).mean().item(), abs=1e-10)


@pytest.mark.parametrize("vectorize", [False, True])
def test_beta_one_equals_trace_elbo_exactly_on_a_vae(vectorize):
    torch.manual_seed(0)
    vae = VAE(x_dim=12, z_dim=3, hidden=(16,))
    x = (torch.rand(20, 12, generator=torch.Generator().manual_seed(2)) > 0.5).float()
    for warmup in ({}, {"beta0": 0.2, "warmup_steps": 10}):
        # A known max_plate_nesting: guessing it would consume random draws.
        common = dict(num_particles=2, vectorize_particles=vectorize, max_plate_nesting=1)
        objective = BetaELBO(**common, **warmup)
        objective.on_step(10)  # end of warm-up: beta is 1
        runs = []
        for elbo in (Trace_ELBO(**common), objective):
            vae.zero_grad()
            pyro.set_rng_seed(3)
            loss_and_grads = elbo.loss_and_grads(vae.model, vae.guide, x)
            grads = [p.grad.clone() for p in vae.parameters()]
            pyro.set_rng_seed(3)
            runs.append((elbo.loss(vae.model, vae.guide, x), loss_and_grads, grads))
        (loss_a, lg_a, grads_a), (loss_b, lg_b, grads_b) = runs
        assert loss_a == loss_b and lg_a == lg_b
        for a, b in zip(grads_a, grads_b):
            assert torch.equal(a, b)


def test_warmup_schedule_and_the_training_loop_hook():
    objective = BetaELBO(beta=2.0, beta0=0.5, warmup_steps=10)
    assert [objective.beta_at(s) for s in (0, 4, 10, 25)] == pytest.approx([0.5, 1.1, 2.0, 2.0])
    assert objective.current_beta == 0.5
    x, m = _x(), Linear()
    objective.on_step(4)
    assert objective.current_beta == pytest.approx(1.1)
    pyro.set_rng_seed(0)
    loss = objective.loss(m.model, m.guide, x)
    assert loss == pytest.approx(-m.integrand(x, m.eps[-1], 1.1).item(), abs=1e-10)
    # No warm-up: beta from the first step.
    assert BetaELBO(beta=0.3).beta_at(0) == 0.3
    # fit calls on_step(step) before each of its steps.
    vae = VAE(x_dim=12, z_dim=2, hidden=(8,))
    data = (torch.rand(64, 12, generator=torch.Generator().manual_seed(4)) > 0.5).float()
    objective = BetaELBO(beta=1.0, beta0=0.0, warmup_steps=100)
    fit(vae, data, elbo=objective, epochs=1, batch_size=16, eval_every=0, progress=False)
    assert objective.step == 3 and objective.current_beta == pytest.approx(0.03)


def test_discrete_latent_gradient_is_unbiased():
    # c_n ~ Bernoulli(0.3), x_n | c_n ~ N(mu_c, 1); guide c_n ~ Bernoulli(sigmoid(phi_n)),
    # one phi per copy of the data point, so the R copies give R independent
    # single-sample gradient draws. The exact gradient enumerates c.
    R, beta, prior = 20000, 0.4, 0.3
    mu = torch.tensor([-1.0, 2.0], dtype=DTYPE)
    x = torch.full((R,), 0.5, dtype=DTYPE)
    phi = nn.Parameter(torch.full((R,), 0.7, dtype=DTYPE))

    def model(x):
        with pyro.plate("data", x.shape[0]):
            c = pyro.sample("c", dist.Bernoulli(torch.tensor(prior, dtype=DTYPE)))
            pyro.sample("x", dist.Normal(mu[c.long()], 1.0), obs=x)

    def guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("c", dist.Bernoulli(logits=phi))

    pyro.set_rng_seed(5)
    loss = BetaELBO(beta=beta).differentiable_loss(model, guide, x)
    (draws,) = torch.autograd.grad(-loss, phi)  # gradient of the bound

    q1 = torch.sigmoid(phi[:1])
    exact = 0.0
    for c, qc, pc in ((1, q1, prior), (0, 1 - q1, 1 - prior)):
        log_lik = torch.distributions.Normal(mu[c], 1.0).log_prob(x[:1])
        exact = exact + qc * (log_lik + beta * (math.log(pc) - qc.log()))
    (exact_grad,) = torch.autograd.grad(exact.sum(), phi)
    se = draws.std() / math.sqrt(R)
    assert abs(draws.mean() - exact_grad[0]) < 4 * se


def test_bad_options_and_registry():
    with pytest.raises(ValueError, match="beta must be a finite number >= 0"):
        BetaELBO(beta=-1.0)
    with pytest.raises(ValueError, match="warmup_steps must be an integer >= 0"):
        BetaELBO(warmup_steps=2.5)
    with pytest.raises(TypeError, match="beta0 must be a number"):
        BetaELBO(beta0="high")
    objective = make_objective("BetaELBO", num_particles=2, beta=4.0, warmup_steps=5)
    assert isinstance(objective, BetaELBO)
    assert (objective.beta, objective.warmup_steps, objective.num_particles) == (4.0, 5, 2)
    with pytest.raises(ValueError, match="bad options for objective 'BetaELBO'"):
        make_objective("BetaELBO", gamma=1.0)
