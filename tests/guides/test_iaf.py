"""The IAF guide: identity at initialization (then exactly the Gaussian
guide's ELBO), the change-of-variables density against a hand computation,
triangular Jacobians with alternating orders, the Monte Carlo encode, and
registration of the flow's parameters with Pyro."""

import math

import pyro
import pyro.poutine as poutine
import pytest
import torch
from torch.autograd.functional import jacobian

from pyrovae import seeded
from pyrovae.guides import IAF
from pyrovae.models import VAE
from pyrovae.models.conv import ConvVAE

X_DIM, Z_DIM, CONTEXT = 16, 3, 4


def binary(n, d=X_DIM, seed=0):
    return torch.bernoulli(torch.full((n, d), 0.4, dtype=torch.float64),
                           generator=torch.Generator().manual_seed(seed))


def build(cls, flows, **options):
    with seeded(0):
        if cls is VAE:
            model = VAE(X_DIM, z_dim=Z_DIM, hidden=(8,), flows=flows, context_dim=CONTEXT, **options)
        else:
            model = ConvVAE(X_DIM, z_dim=Z_DIM, channels=(2, 3), flows=flows,
                            context_dim=CONTEXT, **options)
    return model.double()


def same_weights(plain, flowed):
    """Copy every weight of ``plain`` into ``flowed``; the encoder's last layer
    of ``flowed`` has CONTEXT more outputs (the flow context), which keep
    their own values."""
    own = flowed.state_dict()
    for key, value in plain.state_dict().items():
        if own[key].shape == value.shape:
            own[key] = value.clone()
        else:  # loc and scale rows first, context rows after
            own[key][: value.shape[0]] = value
    flowed.load_state_dict(own)


def flow_perturbed(model, scale=0.3, seed=1):
    """Move every step away from the identity (small, so log s stays inside
    Pyro's clipping range [-5, 3])."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for step in model.flow.steps:
            last = step.nn.layers[-1]
            last.weight.copy_(scale * torch.randn(last.weight.shape, generator=g, dtype=last.weight.dtype))
            last.bias.copy_(scale * torch.randn(last.bias.shape, generator=g, dtype=last.bias.dtype))
    return model


# -- exact identities ------------------------------------------------------------------


@pytest.mark.parametrize("cls", [VAE, ConvVAE])
def test_identity_flow_gives_exactly_the_gaussian_guides_elbo(cls):
    plain, flowed = build(cls, 0), build(cls, 2)
    same_weights(plain, flowed)
    x = binary(10)
    losses = []
    for model in (plain, flowed):
        pyro.set_rng_seed(7)
        losses.append(pyro.infer.Trace_ELBO(num_particles=3).loss(model.model, model.guide, x))
    assert losses[1] == pytest.approx(losses[0], rel=1e-12, abs=0)

    traces = []
    for model in (plain, flowed):
        pyro.set_rng_seed(3)
        trace = poutine.trace(model.guide).get_trace(x)
        trace.compute_log_prob()
        traces.append(trace.nodes["z"])
    # The same draws: the flow at its initialization is the identity map ...
    torch.testing.assert_close(traces[1]["value"], traces[0]["value"], rtol=1e-12, atol=0)
    torch.testing.assert_close(traces[1]["log_prob"], traces[0]["log_prob"], rtol=1e-12, atol=0)
    # ... and log q(z | x) is exactly the Gaussian base's log-density.
    loc, scale, _ = flowed.encoder(x)
    base = torch.distributions.Normal(loc, scale).log_prob(traces[1]["value"]).sum(-1)
    assert torch.equal(traces[1]["log_prob"], base)


def test_identity_init_makes_every_step_the_identity_map():
    flow = IAF(Z_DIM, CONTEXT, steps=3)
    z0, h = torch.randn(5, Z_DIM), torch.randn(5, CONTEXT)
    t = flow.transform(h)
    z = t(z0)
    assert torch.equal(z, z0)
    assert torch.equal(t.log_abs_det_jacobian(z0, z), torch.zeros(5))
    # The orderings alternate between steps: natural, reversed, natural.
    orders = [step.nn.permutation.tolist() for step in flow.steps]
    assert orders == [[0, 1, 2], [2, 1, 0], [0, 1, 2]]


def test_density_of_two_steps_matches_the_change_of_variables_by_hand():
    model = flow_perturbed(build(VAE, 2))
    x = binary(6)
    loc, scale, h = model.encoder(x)
    base = torch.distributions.Normal(loc, scale)
    z0 = loc + scale * torch.randn(loc.shape, dtype=loc.dtype, generator=torch.Generator().manual_seed(2))
    # By hand: z_t = m_t + exp(l_t) * z_{t-1}, log q = log N(z_0) - sum_t sum_i l_t.
    z, log_q = z0, base.log_prob(z0).sum(-1)
    for step in model.flow.steps:
        m, log_s = step.nn(z, context=h)
        assert log_s.abs().max() < 3  # inside Pyro's clipping range
        z, log_q = m + log_s.exp() * z, log_q - log_s.sum(-1)
    q = model.guide_dist(model.encoder(x))
    assert q.event_shape == (Z_DIM,) and q.batch_shape == (6,)
    torch.testing.assert_close(model.flow.transform(h)(z0), z, rtol=1e-12, atol=1e-12)
    # A fresh tensor misses the transforms' cache, so this inverts the flow.
    torch.testing.assert_close(q.log_prob(z.clone()), log_q, rtol=1e-10, atol=1e-10)


def test_each_step_has_a_triangular_jacobian_with_log_determinant_sum_log_s():
    model = flow_perturbed(build(VAE, 2))
    h = torch.randn(1, CONTEXT, dtype=torch.float64)
    z = torch.randn(1, Z_DIM, dtype=torch.float64)
    for t, step in enumerate(model.flow.steps):
        f = step.condition(h)
        J = jacobian(lambda v: f(v.unsqueeze(0)).squeeze(0), z[0])
        # Output i depends on the inputs before i in the step's order only.
        assert torch.equal(J, J.tril() if t % 2 == 0 else J.triu())
        _, log_s = step.nn(z, context=h)
        assert torch.logdet(J).item() == pytest.approx(log_s.sum().item(), rel=1e-10)
        assert f.log_abs_det_jacobian(z, f(z)).item() == pytest.approx(log_s.sum().item(), rel=1e-10)


# -- encode: the Monte Carlo mean --------------------------------------------------------


def test_encode_is_the_seeded_monte_carlo_mean_and_deterministic_per_point():
    model = build(VAE, 2)
    x = binary(5)
    loc, scale, _ = model.encoder(x)
    eps = torch.randn(100, 1, Z_DIM, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    # Identity flow: the mean of the 100 draws loc + scale * eps, exactly computable.
    torch.testing.assert_close(model.encode(x), loc + scale * eps.mean(0), rtol=1e-12, atol=1e-12)
    flow_perturbed(model)
    codes = model.encode(x)
    assert torch.equal(codes, model.encode(x))
    torch.testing.assert_close(model.encode(x[2:3]), codes[2:3], rtol=1e-12, atol=1e-12)
    # Against 20000 draws: within 5 standard errors of the 100-draw mean.
    with torch.no_grad():
        many = model.guide_dist(model.encoder(x)).sample((20000,))
    err = (codes - many.mean(0)).abs()
    assert bool((err < 5 * many.std(0) / math.sqrt(100)).all())
    with pytest.raises(ValueError, match="num_samples must be an integer >= 1"):
        model.encode(x, num_samples=0)


# -- registration and bad options ------------------------------------------------------------


def test_flow_parameters_are_registered_with_pyro_and_get_gradients():
    model = build(VAE, 2)
    x = binary(8)
    with poutine.trace(param_only=True) as tr:
        model.guide(x)
    names = set(tr.trace.nodes)
    flow_params = {f"{model.pyro_name}.flow$$${k}" for k, _ in model.flow.named_parameters()}
    assert flow_params <= names
    pyro.infer.Trace_ELBO().loss_and_grads(model.model, model.guide, x)
    # At the identity the last layers are the ones the gradient reaches first.
    for step in model.flow.steps:
        assert step.nn.layers[-1].weight.grad.abs().sum() > 0


def test_bad_flow_options_give_one_clear_error():
    with pytest.raises(ValueError, match="flows must be an integer >= 0"):
        VAE(X_DIM, z_dim=Z_DIM, flows=-1)
    with pytest.raises(ValueError, match="needs z_dim >= 2"):
        VAE(X_DIM, z_dim=1, flows=1)
    with pytest.raises(ValueError, match="at least z_dim=3"):
        VAE(X_DIM, z_dim=Z_DIM, flows=1, flow_hidden=[2])
    with pytest.raises(ValueError, match="encoder that outputs a flow context"):
        VAE(X_DIM, z_dim=Z_DIM, flows=1, encoder="linear")
