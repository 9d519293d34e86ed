"""The fast path gives plain Pyro's loss and gradients, and steps aside by itself."""

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO

from pyrovae import VAE, fit
from pyrovae.infer import make_objective
from pyrovae.infer.fastpath import FastELBO
from pyrovae.infer.fit import TrainingDiverged, device_rng_state, restore_device_rng


def _binary(n=32, d=20, seed=0):
    return (torch.rand(n, d, generator=torch.Generator().manual_seed(seed)) < 0.3).float()


def _same_as_plain(fast: FastELBO, objective, model, guide, x, params, seed=7):
    torch.manual_seed(seed)
    fast_loss = fast(x)
    fast_grads = torch.autograd.grad(fast_loss, params)
    torch.manual_seed(seed)
    plain_loss = objective.differentiable_loss(model, guide, x)
    plain_grads = torch.autograd.grad(plain_loss, params)
    assert fast_loss.item() == pytest.approx(plain_loss.item(), rel=1e-6)
    for a, b in zip(fast_grads, plain_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("objective", [Trace_ELBO, TraceMeanField_ELBO])
def test_a_vae_gets_plain_pyros_loss_and_gradients(objective):
    torch.manual_seed(0)
    model = VAE(20, 3, hidden=(8,))
    x = _binary()
    fast = FastELBO(objective(), model.model, model.guide, 1)
    params = list(model.parameters())
    for seed in (1, 2, 3):  # the first call decides, later ones take the fast path
        _same_as_plain(fast, objective(), model.model, model.guide, x, params, seed)
    assert fast.fast is True and fast.reason == ""


def _scaled_masked_programs():
    """Non-analytic KL (Normal against Laplace), a mask, a scale, a global site."""
    loc = torch.nn.Parameter(torch.zeros(3))
    raw = torch.nn.Parameter(torch.zeros(3))
    g = torch.nn.Parameter(torch.tensor(0.2))
    mask = torch.tensor([True, False, True, True] * 8)

    def model(x):
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        with pyro.plate("data", x.shape[0]), pyro.poutine.scale(scale=2.5):
            z = pyro.sample("z", dist.Laplace(mu, 1.0).expand([x.shape[0], 3]).to_event(1)
                            .mask(mask))
            pyro.sample("x", dist.Normal(z.sum(-1, keepdim=True), 1.0).to_event(1), obs=x)

    def guide(x):
        pyro.sample("mu", dist.Normal(g, 0.5))
        with pyro.plate("data", x.shape[0]), pyro.poutine.scale(scale=2.5):
            pyro.sample("z", dist.Normal(loc, torch.nn.functional.softplus(raw))
                        .expand([x.shape[0], 3]).to_event(1))

    return model, guide, [loc, raw, g]


@pytest.mark.parametrize("objective", [Trace_ELBO, TraceMeanField_ELBO])
def test_scales_masks_global_sites_and_sampled_kl_match_plain_pyro(objective):
    model, guide, params = _scaled_masked_programs()
    x = torch.randn(32, 1, generator=torch.Generator().manual_seed(0))
    fast = FastELBO(objective(), model, guide, 1)
    fast(x)
    assert fast.fast is True
    _same_as_plain(fast, objective(), model, guide, x, params)


def test_programs_and_objectives_it_cannot_reproduce_run_plain_pyro():
    model = VAE(20, 3, hidden=(8,))
    x = _binary()
    iwae = make_objective("IWAE", num_particles=3, vectorize_particles=True, max_plate_nesting=1)
    fast = FastELBO(iwae, model.model, model.guide, 1)
    fast(x)
    assert fast.fast is False and "IWAE" in fast.reason

    def discrete_model(x):
        with pyro.plate("data", x.shape[0]):
            c = pyro.sample("c", dist.Bernoulli(0.5))
            pyro.sample("x", dist.Normal(c, 1.0), obs=x)

    p = torch.nn.Parameter(torch.tensor(0.0))

    def discrete_guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("c", dist.Bernoulli(logits=p))

    fast = FastELBO(Trace_ELBO(), discrete_model, discrete_guide, 1)
    fast(torch.zeros(4))
    assert fast.fast is False and "'c'" in fast.reason and "reparameterized" in fast.reason
    off = FastELBO(Trace_ELBO(), model.model, model.guide, 1, enabled=False)
    off(x)
    assert off.fast is False


def test_a_program_whose_sites_change_falls_back_for_good():
    loc = torch.nn.Parameter(torch.zeros(()))

    def model(x):
        n = 2 if x.sum() > 0 else 1  # the number of latent sites depends on the data
        for i in range(n):
            z = pyro.sample(f"z{i}", dist.Normal(0.0, 1.0))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("x", dist.Normal(z, 1.0), obs=x)

    def guide(x):
        n = 2 if x.sum() > 0 else 1
        for i in range(n):
            pyro.sample(f"z{i}", dist.Normal(loc, 1.0))

    fast = FastELBO(Trace_ELBO(), model, guide, 1)
    fast(-torch.ones(3))
    assert fast.fast is True
    torch.manual_seed(0)
    changed = fast(torch.ones(3))
    assert fast.fast is False and "changed" in fast.reason
    assert torch.isfinite(changed)
    _same_as_plain(fast, Trace_ELBO(), model, guide, torch.ones(3), [loc])


def test_fit_trains_the_same_with_and_without_the_fast_path():
    x = _binary(256)
    runs = []
    for fast in (True, False):
        torch.manual_seed(0)
        model = VAE(20, 3, hidden=(8,))
        res = fit(model, x, elbo="TraceMeanField_ELBO", epochs=2, batch_size=32, seed=3,
                  progress=False, eval_every=0, fast_path=fast)
        runs.append((res.history, [p.detach().clone() for p in model.parameters()]))
    (h1, p1), (h2, p2) = runs
    assert h1["train_elbo"].tolist() == pytest.approx(h2["train_elbo"].tolist(), rel=1e-6)
    for a, b in zip(p1, p2):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_losses_read_back_in_blocks_still_name_the_first_bad_step():
    def model(x):
        loc = pyro.param("runaway_loc", torch.tensor(0.0))
        with pyro.plate("data", x.shape[0]):
            pyro.factor("f", torch.exp(loc * 10.0) * x.squeeze(-1))

    def guide(x):
        pass

    pyro.clear_param_store()
    with pytest.raises(TrainingDiverged, match=r"at step 2 \(epoch 1\)"):
        fit(model, torch.ones(64, 1), guide=guide, epochs=5, batch_size=16, lr=0.1,
            optimizer="sgd", progress=False, sync_every=8)
    pyro.clear_param_store()


def test_sync_every_is_checked():
    with pytest.raises(ValueError, match="sync_every must be an integer >= 1"):
        fit(VAE(20, 3, hidden=(8,)), _binary(), sync_every=0, progress=False)


def test_cuda_generator_state_travels_with_checkpoints_and_a_device_change_is_said():
    assert device_rng_state(torch.device("cpu")) == {}
    restore_device_rng({}, torch.device("cpu"), "ckpt")  # nothing to restore, nothing said
    with pytest.warns(RuntimeWarning, match="written by a run on a GPU and resumes on cpu"):
        restore_device_rng({"cuda_rng": torch.zeros(8, dtype=torch.uint8)},
                           torch.device("cpu"), "ckpt")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_resumed_gpu_run_repeats_the_uninterrupted_one(tmp_path):
    x = _binary(256).cuda()
    whole, parts = [], []
    torch.manual_seed(0)
    model = VAE(20, 3, hidden=(8,)).cuda()
    whole = fit(model, x, epochs=4, batch_size=32, progress=False, eval_every=0).history
    torch.manual_seed(0)
    model = VAE(20, 3, hidden=(8,)).cuda()
    fit(model, x, epochs=2, batch_size=32, progress=False, eval_every=0,
        checkpoint_dir=str(tmp_path))
    parts = fit(model, x, epochs=4, batch_size=32, progress=False, eval_every=0,
                checkpoint_dir=str(tmp_path), resume=True).history
    assert whole["train_elbo"].tolist() == parts["train_elbo"].tolist()
