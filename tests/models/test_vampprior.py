"""The VampPrior: its density against a hand-computed mixture, one
pseudo-input giving exactly q(z | u), draws from the mixture, and its
parameters registered with Pyro in the model."""

import math

import pyro
import pyro.poutine as poutine
import pytest
import torch

from pyrovae import seeded
from pyrovae.guides import encoder_distribution
from pyrovae.models import VAE
from pyrovae.models.conv import ConvVAE

X_DIM, Z_DIM = 16, 3


def build(cls=VAE, **options):
    with seeded(0):
        if cls is VAE:
            model = VAE(X_DIM, z_dim=Z_DIM, hidden=(8,), prior="vamp", **options)
        else:
            model = ConvVAE(X_DIM, z_dim=Z_DIM, channels=(2, 3), prior="vamp", **options)
    return model.double()


@pytest.mark.parametrize("cls,options", [(VAE, {}), (VAE, {"encoder": "linear"}),
                                         (VAE, {"flows": 2, "context_dim": 2}), (ConvVAE, {})])
def test_log_density_is_the_logsumexp_of_the_components_minus_log_k(cls, options):
    model = build(cls, pseudo_inputs=5, **options)
    z = torch.randn(7, Z_DIM, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    u = model.vamp.inputs
    assert u.shape == (5, X_DIM)
    # Component k: the guide's Gaussian at pseudo-input u_k (the flow's base
    # for a flow guide), each scored on its own.
    comps = torch.stack([encoder_distribution(model.encoder, u[k:k + 1]).log_prob(z)
                         for k in range(5)])  # (K, 7)
    expected = torch.logsumexp(comps, dim=0) - math.log(5)
    prior = model.prior_dist()
    assert prior.event_shape == (Z_DIM,) and prior.batch_shape == ()
    torch.testing.assert_close(prior.log_prob(z), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian"])
def test_one_pseudo_input_u_gives_exactly_q_of_z_given_u(likelihood):
    model = build(pseudo_inputs=1, likelihood=likelihood)
    u = torch.rand(1, X_DIM, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        model.vamp.raw_inputs.copy_(u)
    z = torch.randn(9, Z_DIM, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    q = encoder_distribution(model.encoder, u)
    assert torch.equal(model.prior_dist().log_prob(z), q.log_prob(z))


def test_pseudo_inputs_start_small_and_stay_in_the_unit_interval_for_binary_data():
    model = build(pseudo_inputs=200)
    raw = model.vamp.raw_inputs.detach()
    # N(0.05, 0.01^2) entrywise, as the reference implementation of the paper.
    assert raw.mean().item() == pytest.approx(0.05, abs=0.002)
    assert raw.std().item() == pytest.approx(0.01, rel=0.05)
    with torch.no_grad():
        model.vamp.raw_inputs.add_(torch.linspace(-2, 2, X_DIM, dtype=torch.float64))
    u = model.vamp.inputs
    assert u.min().item() == 0.0 and u.max().item() == 1.0
    gaussian = build(pseudo_inputs=3, likelihood="gaussian")
    assert torch.equal(gaussian.vamp.inputs, gaussian.vamp.raw_inputs)  # unconstrained


@pytest.mark.parametrize("encoder", ["mlp", "linear"])
def test_samples_come_from_the_mixture(encoder):
    model = build(pseudo_inputs=4, encoder=encoder)
    with torch.no_grad():  # well-separated components
        model.vamp.raw_inputs.copy_(torch.eye(4, X_DIM, dtype=torch.float64))
    loc, scale = model.vamp.components(model.encoder)[:2]
    # The per-coordinate variance: scale^2, or diag(S S^T) for a Cholesky factor S.
    var = (scale @ scale.T).diagonal() if encoder == "linear" else scale ** 2
    gen = torch.Generator().manual_seed(0)
    z = model.sample_prior(40000, generator=gen)
    again = model.sample_prior(40000, generator=torch.Generator().manual_seed(0))
    assert torch.equal(z, again)
    # Mixture moments: E z = mean_k loc_k, E z^2 = mean_k (loc_k^2 + var_k).
    mean, second = loc.mean(0), (loc ** 2 + var).mean(0)
    sd = (second - mean ** 2).sqrt()
    assert bool(((z.mean(0) - mean).abs() < 4 * sd / math.sqrt(40000)).all())
    assert bool(((z.pow(2).mean(0) - second).abs() < 0.03 * second + 1e-3).all())
    x = model.sample_mean(3, generator=gen)
    assert x.shape == (3, X_DIM) and bool(((x > 0) & (x < 1)).all())


def test_pseudo_inputs_and_encoder_are_parameters_of_the_model_program():
    model = build(pseudo_inputs=3)
    x = torch.bernoulli(torch.full((8, X_DIM), 0.5, dtype=torch.float64))
    with poutine.trace(param_only=True) as tr:
        model.model(x)
    names = set(tr.trace.nodes)
    assert f"{model.pyro_name}.prior$$$raw_inputs" in names
    assert any(n.startswith(f"{model.pyro_name}.encoder$$$") for n in names)
    pyro.infer.Trace_ELBO().loss_and_grads(model.model, model.guide, x)
    assert model.vamp.raw_inputs.grad.abs().sum() > 0


def test_bad_prior_options_give_one_clear_error():
    with pytest.raises(ValueError, match="prior must be one of"):
        VAE(X_DIM, z_dim=Z_DIM, prior="vampire")
    with pytest.raises(ValueError, match="pseudo_inputs must be an integer >= 1"):
        VAE(X_DIM, z_dim=Z_DIM, prior="vamp", pseudo_inputs=0)
