"""gradient_stats against gradient distributions known in closed form.

Model: z ~ N(0, 1), x | z ~ N(z + b, 1); guide q(z) = N(m, sigma^2), sigma = exp(rho).
With z = m + sigma eps, the single-sample reparameterized gradient of the loss
(negative ELBO) is, per parameter,

    d/db   = z + b - x                      mean m + b - x,    variance sigma^2
    d/dm   = 2 z + b - x                    mean 2m + b - x,   variance 4 sigma^2
    d/drho = (x - b - 2m) sigma eps - 2 sigma^2 eps^2
                                            mean 2 sigma^2 - 1,
                                            variance (x - b - 2m)^2 sigma^2 + 8 sigma^4.

The exact posterior is N((x - b) / 2, 1/2), where the sticking-the-landing
gradient of the guide parameters is exactly zero in every draw.
"""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import Trace_ELBO
from torch import nn

from pyrovae.infer.diagnostics import COLUMNS, gradient_stats, parameter_groups
from pyrovae.infer.iwae import IWAE, STL_ELBO
from pyrovae.models.vae import VAE

DTYPE = torch.float64



class OneD:
    def __init__(self, b, m, sigma):
        self.decoder = nn.Module()
        self.decoder.b = nn.Parameter(torch.tensor(b, dtype=DTYPE))
        self.encoder = nn.Module()
        self.encoder.m = nn.Parameter(torch.tensor(m, dtype=DTYPE))
        self.encoder.rho = nn.Parameter(torch.tensor(math.log(sigma), dtype=DTYPE))

    def model(self, x):
        pyro.module("oned.decoder", self.decoder)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(torch.zeros((), dtype=DTYPE), 1.0))
            pyro.sample("x", dist.Normal(z + self.decoder.b, 1.0), obs=x)

    def guide(self, x):
        pyro.module("oned.encoder", self.encoder)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(self.encoder.m, self.encoder.rho.exp()))


X = torch.tensor([1.0], dtype=DTYPE)


def test_reparameterized_elbo_gradient_moments_match_closed_form():
    b, m, sigma, x = 0.2, 0.1, 0.8, 1.0
    one = OneD(b, m, sigma)
    n = 1500
    stats = gradient_stats(one.model, one.guide, Trace_ELBO(), X, num_draws=n, seed=0)
    assert list(stats.columns) == COLUMNS
    enc, dec = (stats.set_index("group").loc[g] for g in ("encoder", "decoder"))
    assert (enc.n_params, dec.n_params, enc.num_draws) == (2, 1, n)

    var = {"b": sigma**2, "m": 4 * sigma**2,
           "rho": (x - b - 2 * m) ** 2 * sigma**2 + 8 * sigma**4}
    mean = {"b": m + b - x, "m": 2 * m + b - x, "rho": 2 * sigma**2 - 1}
    # Sample variances within 15% (about 4 standard errors at 1500 draws, the
    # eps^2 term included); means within 4 standard errors.
    assert dec.mean_variance == pytest.approx(var["b"], rel=0.15)
    assert enc.mean_variance == pytest.approx((var["m"] + var["rho"]) / 2, rel=0.15)
    assert dec.mean_abs_mean == pytest.approx(abs(mean["b"]), abs=4 * math.sqrt(var["b"] / n))
    se = math.sqrt(var["m"] / n + var["rho"] / n) / 2
    assert enc.mean_abs_mean == pytest.approx((abs(mean["m"]) + abs(mean["rho"])) / 2, abs=4 * se)
    snr = [abs(mean[k]) / math.sqrt(var[k]) for k in ("m", "rho")]
    assert dec.mean_snr == pytest.approx(abs(mean["b"]) / sigma, rel=0.15)
    assert dec.median_snr == dec.mean_snr  # a single component
    assert enc.mean_snr == pytest.approx(sum(snr) / 2, rel=0.2)
    assert enc.median_snr == pytest.approx(enc.mean_snr)  # median of two = their mean


def test_stl_at_exact_posterior_has_zero_encoder_variance():
    b, x = 0.2, 1.0
    one = OneD(b, (x - b) / 2, math.sqrt(0.5))
    stats = gradient_stats(one.model, one.guide, STL_ELBO(), X, num_draws=50, seed=1)
    enc, dec = (stats.set_index("group").loc[g] for g in ("encoder", "decoder"))
    assert enc.mean_variance < 1e-28 and enc.mean_abs_mean < 1e-14
    assert dec.mean_variance == pytest.approx(0.5, rel=0.5)  # variance sigma^2, 50 draws
    standard = gradient_stats(one.model, one.guide, Trace_ELBO(), X, num_draws=50, seed=1)
    assert standard.set_index("group").loc["encoder"].mean_variance > 0.1


def test_snr_trends_with_particles_standard_iwae_versus_dreg():
    # Rainforth et al. (2018): with more particles the standard IWAE gradient's
    # SNR falls for guide parameters and rises for model parameters; DReG's
    # guide SNR rises too. 300 draws estimate each SNR to about +-0.1 here.
    one = OneD(0.2, 0.6, 0.9)  # a wrong but nearby guide
    x = X.expand(4).contiguous()

    def snr(k, estimator):
        objective = IWAE(num_particles=k, vectorize_particles=True, max_plate_nesting=1,
                         estimator=estimator)
        stats = gradient_stats(one.model, one.guide, objective, x, num_draws=300, seed=2)
        return stats.set_index("group").mean_snr

    standard_1, standard_16, dreg_16 = snr(1, "standard"), snr(16, "standard"), snr(16, "dreg")
    assert standard_16.encoder < 0.5 * standard_1.encoder
    assert standard_16.decoder > 5 * standard_1.decoder
    assert dreg_16.encoder > 4 * standard_1.encoder
    assert dreg_16.encoder > 20 * standard_16.encoder
    # Model parameters get the standard estimator, from the same draws.
    assert dreg_16.decoder == pytest.approx(standard_16.decoder, rel=1e-9)


def test_groups_of_a_vae_and_state_left_as_found():
    torch.manual_seed(0)
    vae = VAE(x_dim=10, z_dim=2, hidden=(8,))
    x = (torch.rand(6, 10, generator=torch.Generator().manual_seed(1)) > 0.5).float()
    groups = parameter_groups(vae.model, vae.guide, x)
    assert {id(p) for p in groups["encoder"]} == {id(p) for p in vae.encoder.parameters()}
    assert {id(p) for p in groups["decoder"]} == {id(p) for p in vae.decoder.parameters()}

    marker = [torch.full_like(p, 7.0) for p in vae.parameters()]
    for p, g in zip(vae.parameters(), marker):
        p.grad = g
    state = torch.random.get_rng_state()
    stats = gradient_stats(vae, None, "Trace_ELBO", x, num_draws=4, seed=3)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert all(p.grad is g for p, g in zip(vae.parameters(), marker))
    assert list(stats.group) == ["encoder", "decoder"]
    assert list(stats.n_params) == [sum(p.numel() for p in vae.encoder.parameters()),
                                    sum(p.numel() for p in vae.decoder.parameters())]
    # Same seed, same draws.
    again = gradient_stats(vae, None, "Trace_ELBO", x, num_draws=4, seed=3)
    assert again.equals(stats)


def test_bad_arguments():
    one = OneD(0.0, 0.0, 1.0)
    with pytest.raises(ValueError, match="num_draws must be an integer >= 2"):
        gradient_stats(one.model, one.guide, Trace_ELBO(), X, num_draws=1)
    with pytest.raises(TypeError, match="loss_and_grads"):
        gradient_stats(one.model, one.guide, object(), X)
    with pytest.raises(TypeError, match="guide=..."):
        gradient_stats(one.model, None, Trace_ELBO(), X)
