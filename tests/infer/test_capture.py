"""The recorded graph replays the fast path bit for bit, is checked against the
program, and steps aside for programs it cannot follow."""

import copy

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO

from pyrovae import VAE, FactorAnalysis, fit
from pyrovae.infer.fastpath import FastELBO
from pyrovae.models.conv import ConvVAE
from pyrovae.models.ladder import LadderVAE
from pyrovae.models.linear import BayesianFactorAnalysis


def _binary(n=64, d=20, seed=0):
    return (torch.rand(n, d, generator=torch.Generator().manual_seed(seed)) < 0.3).float()


MODELS = {
    "vae": lambda: VAE(20, 3, hidden=(8,)),
    "vae-iaf": lambda: VAE(20, 3, hidden=(8,), flows=2),
    "vae-vamp": lambda: VAE(20, 3, hidden=(8,), prior="vamp"),
    "vae-gaussian": lambda: VAE(20, 3, hidden=(8,), likelihood="gaussian"),
    "conv-vae": lambda: ConvVAE(64, z_dim=3, channels=(4,), image_shape=(8, 8)),
    "ladder-bn": lambda: LadderVAE(20, z_dims=(4, 2), hidden=(8, 6), batch_norm=True),
    # A full-covariance guide: autograd adds the scale's gradient parts in
    # another order on the graph (the last bits differ; the loss does not).
    "factor-analysis": lambda: FactorAnalysis(20, 3),
    # Global latents, and priors the model keeps (made before the step, with
    # their support checks on).
    "bayes-fa": lambda: BayesianFactorAnalysis(20, 3),
}


def _steps(fast, model, x, seeds):
    """Losses, gradients and buffers of a few steps of ``fast`` on ``model``."""
    params = list(model.parameters())
    out = []
    for seed in seeds:
        torch.manual_seed(seed)
        loss = fast(x)
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        out.append((loss.detach(), grads, [b.clone() for b in model.buffers()]))
    return out


@pytest.mark.parametrize("objective", [Trace_ELBO, TraceMeanField_ELBO])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_the_replayed_graph_gives_the_fast_paths_loss_gradients_and_buffers(name, objective):
    torch.manual_seed(0)
    recorded = MODELS[name]()
    traced = copy.deepcopy(recorded)
    x = _binary(d=64) if name == "conv-vae" else _binary()
    if name in ("vae-gaussian", "factor-analysis", "bayes-fa"):
        x = torch.randn(64, 20, generator=torch.Generator().manual_seed(1))
    on = FastELBO(objective(), recorded.model, recorded.guide, 1, capture=True,
                  modules=[recorded], params=list(recorded.parameters()))
    off = FastELBO(objective(), traced.model, traced.guide, 1, capture=False,
                   modules=[traced], params=list(traced.parameters()))
    seeds = range(5)  # every step replays, the first one included
    got, want = _steps(on, recorded, x, seeds), _steps(off, traced, x, seeds)
    assert on.fast is True and on.capturing is True, on.capture_reason
    assert off.capturing is False and off.capture_reason == "turned off"
    graphs = list(on._graphs.values())
    assert len(graphs) == 1 and graphs[0].verified
    for (loss_a, grads_a, bufs_a), (loss_b, grads_b, bufs_b) in zip(got, want):
        assert torch.equal(loss_a, loss_b)
        for a, b in zip(grads_a, grads_b):
            if name in ("factor-analysis", "bayes-fa"):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
            else:
                assert (a is None and b is None) or torch.equal(a, b)
        for a, b in zip(bufs_a, bufs_b):
            assert torch.equal(a, b)
    assert on.check() == ""


def test_a_new_shape_records_its_own_graph():
    torch.manual_seed(0)
    model = VAE(20, 3, hidden=(8,))
    fast = FastELBO(Trace_ELBO(), model.model, model.guide, 1, capture=True, modules=[model],
                    params=list(model.parameters()))
    for n in (32, 32, 32, 32, 24, 24, 24):
        fast(_binary(n))
    assert sorted(key[0][0] for key in fast._graphs) == [24, 32]
    model.eval()  # another training flag is another graph
    fast(_binary(32))
    assert len(fast._graphs) == 3 and fast.capturing


def test_fit_trains_the_same_with_and_without_capture():
    x = _binary(256)
    runs = []
    for capture in (True, False):
        torch.manual_seed(0)
        model = VAE(20, 3, hidden=(8,))
        res = fit(model, x[:224], x[224:], epochs=3, batch_size=32, seed=3, progress=False,
                  capture=capture)
        runs.append((res.history, [p.detach().clone() for p in model.parameters()]))
    (h1, p1), (h2, p2) = runs
    assert h1["train_elbo"].tolist() == h2["train_elbo"].tolist()
    assert h1["test_elbo"].tolist() == h2["test_elbo"].tolist()
    for a, b in zip(p1, p2):
        assert torch.equal(a, b)


class _Tempered(VAE):
    """A VAE whose likelihood is scaled by a Python float the graph cannot see."""

    temperature = 1.0

    def model(self, x):
        self.register("decoder", self.decoder)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", self.prior_dist())
            with pyro.poutine.scale(scale=self.temperature):
                pyro.sample("x", self.likelihood_dist(z), obs=x)


class _Anneal:
    """Lowers the model's temperature at the end of every epoch, at every
    step, or once after step ``at``."""

    def __init__(self, model, hook, at=None):
        self.model, self.at = model, at
        setattr(self, hook, self._change)

    def _change(self, state):
        if self.at is None or state.step == self.at:
            self.model.temperature *= 0.9


def _tempered_run(capture, hook, at=None, epochs=3, checkpoint_dir=None):
    torch.manual_seed(0)
    model = _Tempered(20, 3, hidden=(8,))
    res = fit(model, _binary(256), epochs=epochs, batch_size=32, seed=1, progress=False,
              eval_every=0, capture=capture, callbacks=[_Anneal(model, hook, at)],
              checkpoint_dir=checkpoint_dir)
    return res.history["train_elbo"].tolist(), [p.detach().clone() for p in model.parameters()]


def test_a_change_between_epochs_is_recorded_again():
    (h1, p1) = _tempered_run(True, "on_epoch_end")
    (h2, p2) = _tempered_run(False, "on_epoch_end")
    assert h1 == h2
    for a, b in zip(p1, p2):
        assert torch.equal(a, b)


@pytest.mark.parametrize("at", [None, 6])
def test_a_change_within_an_epoch_is_refused_before_the_epoch_counts(at, tmp_path):
    # Every step replays; the temperature changes after every step, or once
    # after step 6 of 8, so later steps of the epoch replayed an outdated graph.
    with pytest.raises(ValueError, match=r"no longer gives the program's loss.*capture=False"):
        _tempered_run(True, "on_step", at=at, checkpoint_dir=str(tmp_path))
    assert not (tmp_path / "checkpoint.pt").exists()  # the epoch was not saved as done
    history, _ = _tempered_run(False, "on_step", at=at)  # the advice works
    assert len(history) == 3


def test_programs_it_cannot_record_keep_the_fast_path():
    torch.manual_seed(0)

    class Branching(VAE):
        def model(self, x):  # a branch on the data's values
            self.register("decoder", self.decoder)
            with pyro.plate("data", x.shape[0]):
                z = pyro.sample("z", self.prior_dist())
                with pyro.poutine.scale(scale=2.0 if bool(x.mean() > 0.5) else 1.0):
                    pyro.sample("x", self.likelihood_dist(z), obs=x)

    model = Branching(20, 3, hidden=(8,))
    fast = FastELBO(Trace_ELBO(), model.model, model.guide, 1, capture=True, modules=[model],
                    params=list(model.parameters()))
    for _ in range(3):
        fast(_binary())
    assert fast.fast is True and fast.capturing is False
    assert "cannot be recorded" in fast.capture_reason

    outside = torch.nn.Parameter(torch.zeros(()))

    class Outside(VAE):
        def guide(self, x):  # a trainable tensor the modules do not hold
            self.register("encoder", self.encoder)
            with pyro.plate("data", x.shape[0]):
                loc, scale = self.encoder(x)
                pyro.sample("z", dist.Normal(loc + outside, scale).to_event(1))

    model = Outside(20, 3, hidden=(8,))
    fast = FastELBO(Trace_ELBO(), model.model, model.guide, 1, capture=True, modules=[model],
                    params=[*model.parameters(), outside])
    fast(_binary())
    assert fast.capturing is False and "outside" in fast.capture_reason
    # Given only the module's parameters, the recording itself finds the tensor.
    fast = FastELBO(Trace_ELBO(), model.model, model.guide, 1, capture=True, modules=[model],
                    params=list(model.parameters()))
    for _ in range(3):
        fast(_binary())
    assert fast.capturing is False
    assert "trainable tensor" in fast.capture_reason or "cannot be recorded" in fast.capture_reason

    def model_fn(x):
        loc = pyro.param("capture_loc", torch.zeros(()))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("x", dist.Normal(loc, 1.0), obs=x)

    fast = FastELBO(Trace_ELBO(), model_fn, lambda x: None, 1, capture=True)
    fast(torch.zeros(4))
    assert fast.capturing is False and "no modules" in fast.capture_reason


def test_a_program_that_differs_from_itself_is_held_to_a_relative_tolerance():
    # Stands in for a device whose reductions are not reproducible: a jitter
    # of a relative 1e-8 that the program never repeats exactly.
    import random

    jitter = random.Random(0)

    class Jittery(VAE):
        def model(self, x):
            super().model(x)
            pyro.factor("jitter", torch.tensor(jitter.uniform(-1e-5, 1e-5)))

    torch.manual_seed(0)
    model = Jittery(20, 3, hidden=(8,))
    fast = FastELBO(Trace_ELBO(), model.model, model.guide, 1, capture=True, modules=[model],
                    params=list(model.parameters()))
    for _ in range(3):
        fast(_binary())
    assert fast.capturing is True and fast.check() == ""


def test_no_graph_without_the_fast_path():
    from pyrovae.infer import make_objective

    model = VAE(20, 3, hidden=(8,))
    iwae = make_objective("IWAE", num_particles=3, vectorize_particles=True, max_plate_nesting=1)
    fast = FastELBO(iwae, model.model, model.guide, 1, capture=True, modules=[model],
                    params=list(model.parameters()))
    fast(_binary())
    assert fast.fast is False and fast.capturing is False
    assert fast.capture_reason == "the fast path does not apply" and not fast._graphs
    off = FastELBO(Trace_ELBO(), model.model, model.guide, 1, enabled=False, capture=True,
                   modules=[model], params=list(model.parameters()))
    off(_binary())
    assert off.capturing is False and off.capture_reason == "the fast path is off"
