"""The importance-sampled log-likelihood: streaming over chunks of (points x
particles) under a memory bound, the fused decoder kernel against the generic
Pyro path, and the progress bar.

The fused kernel is checked against Pyro on the same draws: with the same
chunks (one chunk per block of points here) both paths run the same vectorized
guide trace, so the log-weights agree to float rounding.
"""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from torch import nn

from pyrovae import VAE
from pyrovae.infer.evaluate import (
    MAX_MEMORY,
    evaluate,
    importance_log_likelihood,
    importance_plan,
)
from pyrovae.seeding import seeded


def _vae(x_dim=12, z_dim=3, hidden=(7,), seed=0, **options):
    with seeded(seed):
        return VAE(x_dim, z_dim=z_dim, hidden=hidden, **options)


def _bits(n, d, seed=1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.bernoulli(torch.full((n, d), 0.3, dtype=dtype), generator=g)


def _both(model, x, k, seed=3, **options):
    """Fused and generic estimates for the same seed, after checking that the
    two paths split the work into the same chunks (hence draw the same z)."""
    fused_plan = importance_plan(model, None, x, k, **options)
    generic_plan = importance_plan(model, None, x, k, fast=False, **options)
    assert fused_plan.method == "fused" and generic_plan.method == "generic"
    assert (fused_plan.points, fused_plan.particles) == (generic_plan.points,
                                                          generic_plan.particles)
    with seeded(seed):
        fused = importance_log_likelihood(model, None, x, k, compile_kernel=False, **options)
    with seeded(seed):
        generic = importance_log_likelihood(model, None, x, k, fast=False, **options)
    return fused, generic


def test_fused_kernel_equals_the_generic_pyro_path_on_the_same_draws():
    model = _vae()
    x = _bits(23, 12)
    fused, generic = _both(model, x, 9, batch_size=10)
    assert fused.shape == (23,)
    torch.testing.assert_close(fused, generic, rtol=1e-5, atol=1e-4)


def test_fused_kernel_is_exact_far_out_in_the_tails_float64():
    # Logits of +-200 and near 0 exercise every branch of the softplus: its
    # threshold, log1p of a tiny e, and the grouped products of the output sum.
    model = _vae(x_dim=40, z_dim=2, hidden=(5, 6)).double()
    with torch.no_grad():
        model.decoder[-1].bias.copy_(torch.linspace(-200, 200, 40, dtype=torch.float64))
        model.decoder[0].bias.mul_(30)
    x = _bits(9, 40, dtype=torch.float64)
    fused, generic = _both(model, x, 5)
    torch.testing.assert_close(fused, generic, rtol=1e-12, atol=1e-9)


class TinyVAE(nn.Module):
    """A user's own VAE in plain Pyro (as in the README), not a pyrovae model."""

    def __init__(self, z_dim=2, x_dim=10):
        super().__init__()
        self.z_dim = z_dim
        self.decoder = nn.Sequential(nn.Linear(z_dim, 8), nn.Tanh(), nn.Linear(8, x_dim))
        self.encoder = nn.Sequential(nn.Linear(x_dim, 8), nn.Softplus(), nn.Linear(8, 2 * z_dim))

    def model(self, x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(self.z_dim), 1.0).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=self.decoder(z)).to_event(1), obs=x)

    def guide(self, x):
        loc, log_scale = self.encoder(x).chunk(2, -1)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(loc, log_scale.exp()).to_event(1))


def test_a_users_own_vae_gets_the_fused_kernel_too():
    with seeded(0):
        model = TinyVAE()
    fused, generic = _both(model, _bits(15, 10), 6)
    torch.testing.assert_close(fused, generic, rtol=1e-5, atol=1e-4)


class LaplaceGuide(TinyVAE):
    """A guide outside the Normal family: its log-density comes from the site."""

    def guide(self, x):
        loc, log_scale = self.encoder(x).chunk(2, -1)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Laplace(loc, log_scale.exp()).to_event(1))


def test_a_guide_outside_the_normal_family_keeps_the_fused_kernel():
    with seeded(0):
        model = LaplaceGuide()
    fused, generic = _both(model, _bits(15, 10), 6)
    torch.testing.assert_close(fused, generic, rtol=1e-5, atol=1e-4)


class ScaledLogits(TinyVAE):
    """Logits are twice the decoder's output: the kernel's reading is wrong."""

    def model(self, x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(self.z_dim), 1.0).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=2 * self.decoder(z)).to_event(1), obs=x)


class DataDependentPrior(TinyVAE):
    """A prior whose mean depends on the point: not one prior shared by all."""

    def model(self, x):
        with pyro.plate("data", x.shape[0]):
            loc = x[:, : self.z_dim]
            z = pyro.sample("z", dist.Normal(loc, 1.0).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=self.decoder(z)).to_event(1), obs=x)


class ExtraSite(TinyVAE):
    """A second observed site."""

    def model(self, x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(self.z_dim), 1.0).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=self.decoder(z)).to_event(1), obs=x)
            pyro.sample("y", dist.Normal(z.sum(-1), 1.0), obs=x.sum(-1))


@pytest.mark.parametrize("cls", [ScaledLogits, DataDependentPrior, ExtraSite])
def test_programs_the_kernel_does_not_handle_run_the_generic_path(cls):
    with seeded(0):
        model = cls()
    x = _bits(7, 10)
    assert importance_plan(model, None, x, 4).method == "generic"
    with seeded(1):
        auto = importance_log_likelihood(model, None, x, 4)
    with seeded(1):
        generic = importance_log_likelihood(model, None, x, 4, fast=False)
    torch.testing.assert_close(auto, generic, rtol=0, atol=0)


def test_gaussian_likelihood_runs_the_generic_path():
    model = _vae(likelihood="gaussian")
    assert importance_plan(model, None, torch.randn(5, 12), 3).method == "generic"


def test_chunks_stay_under_the_memory_bound_whatever_k_is():
    model = _vae(x_dim=784, z_dim=50, hidden=(400,))
    x = _bits(300, 784)
    for fast in (True, False):
        plans = [importance_plan(model, None, x, k, fast=fast) for k in (1000, 5000)]
        assert plans[0] == plans[1]  # the chunk does not grow with K
        assert plans[0].rows * plans[0].row_bytes <= MAX_MEMORY
        small = importance_plan(model, None, x, 5000, fast=fast, max_memory=2**22)
        assert small.rows * small.row_bytes <= 2**22 < plans[0].rows * plans[0].row_bytes


class ExactPosterior:
    """z ~ N(0, 1), x | z ~ N(z, s^2), guide = the exact posterior: every
    importance weight equals p(x), so any chunking gives log p(x) exactly."""

    s = 0.5

    def model(self, x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(()), 1.0))
            pyro.sample("x", dist.Normal(z, self.s), obs=x)

    def guide(self, x):
        var = 1 / (1 + 1 / self.s**2)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(var * x / self.s**2, math.sqrt(var)))


def test_streaming_over_many_chunks_gives_the_exact_answer():
    lg = ExactPosterior()
    x = torch.linspace(-3, 3, 11, dtype=torch.float64)
    exact = dist.Normal(x.new_zeros(()), x.new_tensor(1 + lg.s**2).sqrt()).log_prob(x)
    plan = importance_plan(lg.model, lg.guide, x, 50, batch_size=4, max_memory=200)
    assert plan.points * plan.particles < 50  # several chunks for every point
    est = importance_log_likelihood(lg.model, lg.guide, x, 50, batch_size=4, max_memory=200)
    torch.testing.assert_close(est, exact, rtol=1e-12, atol=1e-12)


def test_progress_bar_is_on_stderr_only_when_asked(capsys):
    model = _vae()
    x = _bits(6, 12)
    importance_log_likelihood(model, None, x, 3, progress=True)
    captured = capsys.readouterr()
    assert "log-likelihood (K=3)" in captured.err and captured.out == ""
    importance_log_likelihood(model, None, x, 3, progress=False)
    assert capsys.readouterr().err == ""
    evaluate(model, x, num_samples=3, progress=True)
    assert "log-likelihood (K=3)" in capsys.readouterr().err


@pytest.mark.parametrize("options, message", [
    ({"max_memory": 0}, "max_memory must be an integer >= 1"),
    ({"num_samples": 0}, "num_samples must be an integer >= 1"),
    ({"batch_size": 2.5}, "batch_size must be an integer >= 1"),
])
def test_bad_sizes_are_rejected(options, message):
    model = _vae()
    with pytest.raises(ValueError, match=message):
        importance_log_likelihood(model, None, _bits(4, 12), **{"num_samples": 2, **options})


@pytest.mark.slow
def test_compiled_kernel_equals_the_uncompiled_one():
    model = _vae(x_dim=784, z_dim=50, hidden=(400,))
    x = _bits(30, 784)
    with seeded(2):
        eager = importance_log_likelihood(model, None, x, 40, compile_kernel=False)
    with seeded(2):
        compiled = importance_log_likelihood(model, None, x, 40, compile_kernel=True)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-3)
