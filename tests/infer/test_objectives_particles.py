"""Particles drawn in one vectorized pass by default, with a fallback to
sequential particles for programs that cannot broadcast over them.

Exact checks use a guide whose draws are fixed in advance, so that the
vectorized objective (one trace with a particle dimension) and the sequential
one (K traces) see the same draws; statistical checks compare means within
four standard errors.
"""

import math
import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import infer
from torch import nn

from pyrovae import GaussianMixture
from pyrovae.infer.iwae import IWAE
from pyrovae.infer.objectives import ParticleFallback, make_objective

DTYPE = torch.float64
PARTICLE_OBJECTIVES = ("Trace_ELBO", "TraceMeanField_ELBO", "TraceGraph_ELBO", "TraceEnum_ELBO",
                       "RenyiELBO", "JitTrace_ELBO", "IWAE", "IWAE-STL", "IWAE-DReG",
                       "STL_ELBO")


class Linear(nn.Module):
    """z_n ~ N(0, I_2), x_n | z_n ~ N(W z_n, 0.7^2 I_3); q(z_n) = N(A x_n, diag s^2)."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        r = lambda *shape: nn.Parameter(0.5 * torch.randn(*shape, generator=g, dtype=DTYPE))
        self.W, self.A, self.log_s = r(3, 2), r(2, 3), r(2)
        self.draws = None  # when set: the guide's values, in the order it is run

    def model(self, x):
        pyro.module("linear", self)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(2), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z @ self.W.T, 0.7).to_event(1), obs=x)

    def guide(self, x):
        pyro.module("linear", self)
        loc, scale = x @ self.A.T, self.log_s.exp().expand(x.shape[0], 2)
        q = dist.Normal(loc, scale) if self.draws is None else Fixed(loc, scale, self.draws)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", q.to_event(1))


class Fixed(dist.Normal):
    """A Normal whose draws are given in advance, taken in turn by each call of
    ``rsample`` (a replayed site is not drawn); its density is the Normal's."""

    def __init__(self, loc, scale, draws):
        super().__init__(loc, scale)
        self.draws = draws

    def expand(self, batch_shape, _instance=None):
        shape = torch.Size(batch_shape)
        return Fixed(self.loc.expand(shape), self.scale.expand(shape), self.draws)

    def rsample(self, sample_shape=torch.Size()):
        value = next(self.draws)
        assert value.shape == self.loc.shape
        return value


def _x(n=6, seed=1):
    return torch.randn(n, 3, generator=torch.Generator().manual_seed(seed), dtype=DTYPE)


def test_every_particle_objective_vectorizes_by_default():
    for name in PARTICLE_OBJECTIVES:
        objective = make_objective(name, 4, max_plate_nesting=1)
        assert objective.vectorize_particles and isinstance(objective, ParticleFallback), name
        assert objective.particle_fallback, name
        assert not make_objective(name, 4, False, max_plate_nesting=1).vectorize_particles
        one = make_objective(name, 1)
        assert not one.vectorize_particles and not getattr(one, "particle_fallback", False)
    # One particle: Pyro's own class, so code that recognises it by type still does.
    assert type(make_objective("Trace_ELBO")) is infer.Trace_ELBO
    assert type(make_objective("TraceMeanField_ELBO", vectorize_particles=None)) \
        is infer.TraceMeanField_ELBO
    assert isinstance(make_objective("Trace_ELBO", 3), infer.Trace_ELBO)
    assert IWAE(num_particles=3).vectorize_particles
    assert not IWAE(num_particles=3, vectorize_particles=False).vectorize_particles


@pytest.mark.parametrize("name, options", [
    ("IWAE", {}), ("IWAE", {"estimator": "dreg"}), ("IWAE", {"estimator": "stl"}),
    ("Trace_ELBO", {}), ("RenyiELBO", {"alpha": 0.5}),
])
def test_vectorized_equals_sequential_on_the_same_draws(name, options):
    k, x = 5, _x()
    draws = torch.randn(k, x.shape[0], 2, generator=torch.Generator().manual_seed(2),
                        dtype=DTYPE)
    results = {}
    for vectorize in (True, False):
        lin = Linear()
        lin.draws = iter([draws] if vectorize else list(draws))
        objective = make_objective(name, k, vectorize, max_plate_nesting=1, **options)
        loss = objective.loss_and_grads(lin.model, lin.guide, x)
        assert next(lin.draws, None) is None  # every draw used, each once
        results[vectorize] = (loss, [p.grad.clone() for p in lin.parameters()])
        pyro.clear_param_store()
    assert results[True][0] == pytest.approx(results[False][0], rel=1e-12)
    for a, b in zip(results[True][1], results[False][1]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", ["Trace_ELBO", "TraceMeanField_ELBO", "IWAE", "STL_ELBO"])
def test_vectorized_and_sequential_losses_have_the_same_mean(name):
    k, x, draws = 5, _x(), 150
    lin = Linear()
    means, ses = [], []
    for vectorize in (True, False):
        objective = make_objective(name, k, vectorize, max_plate_nesting=1)
        pyro.set_rng_seed(7 if vectorize else 8)
        values = torch.tensor([objective.loss(lin.model, lin.guide, x) for _ in range(draws)])
        means.append(values.mean().item())
        ses.append(values.std().item() / math.sqrt(draws))
    assert abs(means[0] - means[1]) < 4 * math.hypot(*ses)


def _view_model(x):
    """Indexes from the left (``view(n, 1)``): fine with sequential particles,
    a shape error with a particle dimension in front."""
    n = x.shape[0]
    with pyro.plate("data", n):
        z = pyro.sample("z", dist.Normal(x.new_zeros(n), 1.0))
        pyro.sample("x", dist.Normal(z.view(n, 1), 1.0).to_event(1), obs=x)


def _view_guide(x):
    loc = pyro.param("loc", torch.zeros(x.shape[0], dtype=x.dtype))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("z", dist.Normal(loc, 1.0))


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
@pytest.mark.parametrize("name", ["Trace_ELBO", "TraceMeanField_ELBO", "JitTrace_ELBO",
                                  "IWAE", "STL_ELBO"])
def test_a_program_that_cannot_broadcast_falls_back_to_sequential_particles(name):
    x = torch.randn(4, 1, dtype=DTYPE)
    objective = make_objective(name, 3, max_plate_nesting=1)
    with pytest.warns(RuntimeWarning, match="drawn one at a time"):
        first = objective.loss_and_grads(_view_model, _view_guide, x)
    assert math.isfinite(first)
    assert not objective.vectorize_particles and objective.max_plate_nesting == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert math.isfinite(objective.loss_and_grads(_view_model, _view_guide, x))
        assert math.isfinite(objective.loss(_view_model, _view_guide, x))
    insisted = make_objective(name, 3, True, max_plate_nesting=1)
    with pytest.raises(RuntimeError):
        insisted.loss_and_grads(_view_model, _view_guide, x)


def test_an_error_of_the_program_itself_is_raised_not_hidden():
    def broken(x):
        raise ValueError("the model's own mistake")

    objective = make_objective("Trace_ELBO", 3, max_plate_nesting=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError, match="the model's own mistake"):
            objective.loss(broken, _view_guide, torch.zeros(2, 1))
    # Nothing learned from it: the next call still tries vectorized particles.
    assert objective.vectorize_particles and objective.particle_fallback
    assert objective.max_plate_nesting == 2


def test_enumerated_mixture_runs_vectorized():
    torch.manual_seed(0)
    x = torch.cat([torch.randn(10, 2) - 2, torch.randn(10, 2) + 2])
    model = GaussianMixture(K=2, x_dim=2)
    objective = make_objective("TraceEnum_ELBO", 4, max_plate_nesting=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        loss = objective.loss_and_grads(model.model, model.guide, x)
    assert math.isfinite(loss) and objective.vectorize_particles
