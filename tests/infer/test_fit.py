"""Training: improvement on real data, exact resume, every objective, custom
Pyro programs, clear errors."""

import pyro
import pyro.distributions as dist
import pytest
import torch
from torch.distributions import constraints

from pyrovae import VAE, FitConfig, evaluate, fit, load_dataset
from pyrovae.infer.fit import OPTIMIZERS, load_checkpoint
from pyrovae.infer.objectives import ELBOS


@pytest.fixture(scope="module")
def mnist_small():
    train = load_dataset("mnist", "train", binarize="dynamic").subset(3000)
    test = load_dataset("mnist", "test", binarize="dynamic").subset(500)
    return train, test


@pytest.mark.mnist
def test_vae_improves_held_out_elbo_on_mnist(mnist_small):
    train, test = mnist_small
    torch.manual_seed(0)
    model = VAE(784, z_dim=10, hidden=(200,))
    before = evaluate(model, test, num_samples=0).elbo
    result = fit(model, train, test, epochs=4, batch_size=100, lr=3e-3, progress=False)
    after = result.history["test_elbo"].iloc[-1]
    # An untrained decoder scores about 784 log 2 = 543 nats per image; a few
    # epochs on 3000 images bring the held-out ELBO below 200 nats.
    assert before < -500
    assert after > -200, result.history
    assert after - before > 300
    hist = result.history
    assert list(hist["epoch"]) == [1, 2, 3, 4]
    assert list(hist["step"]) == [30, 60, 90, 120]
    assert (hist["test_recon"] - hist["test_kl"] - hist["test_elbo"]).abs().max() < 1e-3
    assert (hist["test_kl"] > 0).all()
    assert hist["seconds"].is_monotonic_increasing


@pytest.mark.mnist
def test_resume_reproduces_uninterrupted_run(mnist_small, tmp_path):
    train, test = mnist_small[0].subset(600), mnist_small[1].subset(100)
    cfg = FitConfig(epochs=3, batch_size=100, seed=7, progress=False)

    def fresh():
        torch.manual_seed(123)  # same initial weights for both runs
        return VAE(784, z_dim=5, hidden=(64,))

    full = fit(fresh(), train, test, config=cfg)
    first = fresh()
    fit(first, train, test, config=cfg, epochs=1, checkpoint_dir=str(tmp_path))
    state = load_checkpoint(tmp_path)  # weights_only load: plain tensors and containers
    assert state["epoch"] == 1 and state["step"] == 6
    resumed_model = fresh()
    resumed = fit(resumed_model, train, test, config=cfg, checkpoint_dir=str(tmp_path), resume=True)
    assert resumed.history["epoch"].tolist() == [1, 2, 3]
    cols = ["step", "train_elbo", "test_elbo"]
    assert resumed.history[cols].equals(full.history[cols])
    for p, q in zip(resumed_model.parameters(), full.model.parameters()):
        assert torch.equal(p, q)


def _toy_data(n=64):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 3, generator=g) * 0.5 + torch.tensor([1.0, -2.0, 0.5])


@pytest.mark.parametrize("name", sorted(n for n in ELBOS if n not in ("TraceEnum_ELBO", "JitTraceEnum_ELBO")))
def test_every_objective_trains_a_vae(name):
    x = _toy_data()
    torch.manual_seed(0)
    model = VAE(3, z_dim=2, hidden=(8,), likelihood="gaussian")
    res = fit(model, x, x, elbo=name, num_particles=2, vectorize_particles=True, epochs=3,
              batch_size=32, lr=1e-2, progress=False)
    assert torch.isfinite(torch.tensor(res.history["train_elbo"].values)).all()
    assert res.steps == 6


def test_enumeration_objective_trains_a_discrete_model():
    # A two-component 1-D mixture with the assignment enumerated out.
    x = torch.cat([torch.randn(40) - 3, torch.randn(40) + 3]).unsqueeze(-1)

    def model(x):
        locs = pyro.param("locs", torch.tensor([-0.5, 0.5]))
        with pyro.plate("data", x.shape[0]):
            k = pyro.sample("k", dist.Categorical(torch.ones(2) / 2), infer={"enumerate": "parallel"})
            pyro.sample("x", dist.Normal(locs[k], 1.0), obs=x.squeeze(-1))

    def guide(x):
        pass

    pyro.clear_param_store()
    fit(model, x, guide=guide, elbo="TraceEnum_ELBO", elbo_options={"max_plate_nesting": 1},
        epochs=150, batch_size=80, lr=0.1, progress=False, eval_every=0)
    locs = pyro.param("locs").detach().sort().values
    assert torch.allclose(locs, torch.tensor([-3.0, 3.0]), atol=0.5)


def test_custom_pyro_programs_with_pyro_param():
    # A plain Pyro model and guide: the closed-form answer for this conjugate
    # model is that q(mu) = N(sum x / (n + 1), 1 / (n + 1)) for every data point
    # when mu is local with prior N(0, 1) and one observation each.
    x = _toy_data(200)[:, :1]

    def model(x):
        with pyro.plate("data", x.shape[0]):
            mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
            pyro.sample("x", dist.Normal(mu, 1.0), obs=x.squeeze(-1))

    def guide(x):
        a = pyro.param("a", torch.tensor(0.0))
        s = pyro.param("s", torch.tensor(1.0), constraint=constraints.positive)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("mu", dist.Normal(a * x.squeeze(-1), s))

    pyro.clear_param_store()
    fit(model, x, guide=guide, elbo="TraceMeanField_ELBO", epochs=300, batch_size=200, lr=0.03,
        progress=False, eval_every=0)
    # Exact posterior: mu | x ~ N(x / 2, 1 / 2).
    assert pyro.param("a").item() == pytest.approx(0.5, abs=0.05)
    assert pyro.param("s").item() == pytest.approx(0.5**0.5, abs=0.05)


def test_two_models_train_independently():
    x = _toy_data()
    torch.manual_seed(0)
    a = VAE(3, z_dim=2, hidden=(8,), likelihood="gaussian")
    b = VAE(3, z_dim=2, hidden=(8,), likelihood="gaussian")
    b_before = [p.detach().clone() for p in b.parameters()]
    fit(a, x, epochs=2, batch_size=32, progress=False)
    assert all(torch.equal(p, q) for p, q in zip(b.parameters(), b_before))


def test_clear_errors():
    x = torch.rand(20, 4)
    with pytest.raises(ValueError, match="binary data"):
        fit(VAE(4, z_dim=2), x, epochs=1, progress=False)
    with pytest.raises(ValueError, match="unknown objective 'NoSuch'.*Trace_ELBO"):
        fit(VAE(4, z_dim=2, likelihood="gaussian"), x, elbo="NoSuch", progress=False)
    with pytest.raises(ValueError, match="unknown fit options"):
        fit(VAE(4, z_dim=2, likelihood="gaussian"), x, epoch=3)
    with pytest.raises(ValueError, match="batch_size"):
        FitConfig(batch_size=0)
    with pytest.raises(ValueError, match=r"shape \(N, 4\)"):
        fit(VAE(4, z_dim=2, likelihood="gaussian"), torch.rand(20, 5), progress=False)
    with pytest.raises(TypeError, match="guide"):
        fit(lambda x: None, x)


def test_optimizers_update_many_tensors_at_once_and_the_same_way():
    from pyrovae.infer.fit import make_optimizer

    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(3))]
    for name, batched in (("adam", "fused"), ("adamw", "fused"), ("sgd", "fused"),
                          ("rmsprop", "foreach")):
        a = [p.detach().clone().requires_grad_() for p in params]
        b = [p.detach().clone().requires_grad_() for p in params]
        fast, loop = make_optimizer(name, a, 0.1), OPTIMIZERS[name](b, lr=0.1)
        assert fast.param_groups[0][batched] is True, name
        for step in range(3):
            grads = [torch.randn_like(p) for p in params]
            for p, q, g in zip(a, b, grads):
                p.grad, q.grad = g.clone(), g.clone()
            fast.step()
            loop.step()
        for p, q in zip(a, b):
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-6)
    # Tensors torch has no fused kernel for keep the one-at-a-time update.
    complex_param = torch.nn.Parameter(torch.randn(3, dtype=torch.complex64))
    assert not make_optimizer("adam", [complex_param], 0.1).param_groups[0]["fused"]


def test_optimizer_options_reach_the_optimizer_and_bad_ones_are_refused(tmp_path):
    from pyrovae.infer.fit import FitConfig

    x = (torch.rand(64, 10, generator=torch.Generator().manual_seed(0)) < 0.3).float()
    fit(VAE(10, 2, hidden=(8,)), x, epochs=1, batch_size=32, progress=False, eval_every=0,
        optimizer_options={"eps": 1e-4, "betas": [0.8, 0.99]}, checkpoint_dir=str(tmp_path))
    group = load_checkpoint(tmp_path / "checkpoint.pt")["optimizer"]["param_groups"][0]
    assert group["eps"] == 1e-4 and tuple(group["betas"]) == (0.8, 0.99)
    # Resumed with other options, as with another lr: the configured ones apply.
    fit(VAE(10, 2, hidden=(8,)), x, epochs=2, batch_size=32, progress=False, eval_every=0,
        optimizer_options={"eps": 1e-3}, checkpoint_dir=str(tmp_path), resume=True)
    group = load_checkpoint(tmp_path / "checkpoint.pt")["optimizer"]["param_groups"][0]
    assert group["eps"] == 1e-3 and tuple(group["betas"]) == (0.8, 0.99)
    assert FitConfig(optimizer="sgd", optimizer_options={"momentum": 0.9}).optimizer_options
    for bad, said in (({"epsilon": 1e-4}, "takes no option epsilon; it takes betas, eps"),
                      ({"lr": 0.1}, "the learning rate is lr"),
                      ({"betas": 0.9}, "betas must be two numbers"),
                      ({"eps": -1.0}, "Invalid epsilon value")):
        with pytest.raises(ValueError, match=said):
            FitConfig(optimizer_options=bad)
