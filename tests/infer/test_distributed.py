"""Data-parallel SVI on Lightning Fabric (pyrovae.infer.distributed): the
batch shards, the config and refusals, and two CPU processes on the gloo
backend that train like one process with the whole batch.

The multi-process runs start a script (``distributed_script.py``) or the
``pyrovae`` command in a subprocess: Fabric's ``ddp`` strategy starts the
other rank by running the same command again, which pytest itself is not.
"""

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pyro
import pyro.distributions as dist
import pytest
import torch
from torch import nn

from pyrovae import VAE, FitConfig, fit, load_dataset
from pyrovae.cli import main
from pyrovae.data.core import ArrayDataset
from pyrovae.infer.distributed import ObjectiveModule, rank_seed, worker_process
from pyrovae.infer.fit import load_checkpoint
from pyrovae.seeding import seeded

HERE = Path(__file__).resolve().parent
needs_lightning = pytest.mark.skipif(
    importlib.util.find_spec("lightning") is None,
    reason="Lightning is not installed: pip install 'pyrovae[distributed]'",
)


def _script():
    spec = importlib.util.spec_from_file_location("distributed_script", HERE / "distributed_script.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(args, timeout=300):
    done = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


# -- data shards --------------------------------------------------------------------------


@pytest.mark.parametrize("binarize", [None, "dynamic"])
def test_shards_make_up_the_single_process_batches(binarize):
    x = torch.rand(50, 3)
    data = ArrayDataset(x, binarize=binarize)
    gens = [torch.Generator().manual_seed(3) for _ in range(3)]
    whole = list(data.batches(8, gens[0]))
    shards = [list(data.batches(8, gens[1 + r], rank=r, world_size=2)) for r in range(2)]
    assert len(whole) == len(shards[0]) == len(shards[1]) == 6  # 50 // 8, partial batch dropped
    for batch, first, second in zip(whole, *shards):
        assert first.shape == second.shape == (4, 3)
        assert torch.equal(torch.cat([first, second]), batch)
    # Every rank's generator ends where one process's does: the next epoch agrees too.
    assert all(torch.equal(g.get_state(), gens[0].get_state()) for g in gens[1:])


def test_shards_refuse_a_batch_that_does_not_split():
    data = ArrayDataset(torch.rand(20, 2))
    with pytest.raises(ValueError, match="divide evenly"):
        next(data.batches(9, torch.Generator(), rank=0, world_size=2))
    with pytest.raises(ValueError, match="divide evenly"):
        next(data.batches(40, torch.Generator(), rank=0, world_size=2))


# -- config, refusals, the objective as a module ---------------------------------------------


def test_config_checks_the_distributed_fields():
    for bad in (dict(devices=0), dict(num_nodes=0), dict(devices=True), dict(devices=1.5),
                dict(strategy=""), dict(accelerator=None)):
        with pytest.raises(ValueError, match="FitConfig"):
            FitConfig(**bad)
    config = FitConfig()
    assert (config.devices, config.num_nodes, config.strategy, config.accelerator) == \
        (1, 1, "auto", "auto")


def test_missing_lightning_says_what_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "lightning" else real(name, *a))
    with pytest.raises(ValueError, match=r"pip install 'pyrovae\[distributed\]'"):
        FitConfig(devices=2, batch_size=64)
    FitConfig(devices=1)  # one process needs nothing more


@needs_lightning
def test_batch_must_divide_over_the_processes():
    with pytest.raises(ValueError, match="divide evenly over devices x num_nodes = 4"):
        FitConfig(devices=2, num_nodes=2, batch_size=66)


def test_worker_process_reads_the_launchers_variables(monkeypatch):
    two = SimpleNamespace(devices=2, num_nodes=1)
    for name in ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(name, raising=False)
    assert not worker_process(two)  # the launching process is rank 0
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("NODE_RANK", "0")
    assert not worker_process(two)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert worker_process(two)
    assert not worker_process(SimpleNamespace(devices=1, num_nodes=1))  # one process: no ranks
    monkeypatch.delenv("LOCAL_RANK")
    monkeypatch.setenv("RANK", "3")  # torchrun
    assert worker_process(two)


def test_rank_seeds_differ():
    assert len({rank_seed(0, r) for r in range(8)} | {rank_seed(1, 0)}) == 9


def test_objective_module_is_the_differentiable_loss():
    torch.manual_seed(0)
    vae = VAE(5, z_dim=2, hidden=(8,), likelihood="gaussian")
    elbo = pyro.infer.Trace_ELBO()
    module = ObjectiveModule([vae], elbo, vae.model, vae.guide)
    x = torch.randn(6, 5)
    assert {id(p) for p in module.parameters()} == {id(p) for p in vae.parameters()}
    with seeded(1):
        loss = module(x)
    with seeded(1):
        expected = elbo.differentiable_loss(vae.model, vae.guide, x)
    assert torch.equal(loss, expected) and module.error is None
    # A failing program still gives every parameter a gradient, so no rank is
    # left waiting in the all-reduce; it is NaN, so every rank learns of the
    # failure from the reduced gradients, and the error is kept.
    nn.init.constant_(vae.decoder.raw_scale, math.nan)
    loss = module(x)
    loss.backward()
    assert isinstance(module.error, ValueError)
    assert all(p.grad is not None and bool(p.grad.isnan().all()) for p in vae.parameters())


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", split="train"), load_dataset("digits", split="test")


@needs_lightning
def test_what_cannot_be_trained_on_many_processes_is_refused(digits):
    train, _ = digits
    two = dict(devices=2, accelerator="cpu", batch_size=64, epochs=1, progress=False)

    def model(x):
        loc = pyro.param("loc", torch.zeros(x.shape[1]))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("x", dist.Normal(loc, 1.0).to_event(1), obs=x)

    def guide(x):
        pass

    with pytest.raises(ValueError, match="nn.Module model object"):
        fit(model, train, guide=guide, **two)

    class WithStoreParam(nn.Module):  # a module, whose programs keep a pyro.param apart
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.ones(()))

        def model(self, x):
            model(x / self.scale)

        def guide(self, x):
            pass

    with pytest.raises(ValueError, match="pyro.param sites outside"):
        fit(WithStoreParam(), train, **two)
    vae = VAE(train.dim, z_dim=2, hidden=(8,), likelihood="gaussian")
    with pytest.raises(ValueError, match="no differentiable_loss"):
        fit(vae, train, elbo="TraceGraph_ELBO", **two)
    with pytest.raises(ValueError, match="larger than the training set"):
        fit(vae, train.subset(50), **two)
    with pytest.raises(ValueError, match="Lightning Fabric cannot run"):
        fit(vae, train, **{**two, "strategy": "fsdp"})  # FSDP needs GPUs


# -- two processes ----------------------------------------------------------------------------


@needs_lightning
def test_two_processes_train_like_one_with_the_whole_batch(digits, tmp_path):
    # Two gloo ranks with 32 points each against one process with 64; the
    # script also stops after 2 epochs and resumes to 3 (about 20 s in all).
    _run([str(HERE / "distributed_script.py"), str(tmp_path), "--devices", "2",
          "--batch-size", "64", "--epochs", "3", "--seed", "0"])
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    assert [r["rank"] for r in ranks] == [0, 1]
    # DDP averages the gradients, so every rank takes the same steps, bit for bit.
    for key, value in ranks[0]["state"].items():
        assert torch.equal(value, ranks[1]["state"][key]), key
    assert ranks[0]["history"] == ranks[1]["history"]
    # Resuming on the same two processes continues the run exactly.
    for key, value in ranks[0]["state"].items():
        assert torch.equal(value, ranks[0]["resumed_state"][key]), key
    history, resumed = ranks[0]["history"], ranks[0]["resumed_history"]
    for column in ("epoch", "step", "train_elbo", "test_elbo", "test_kl"):
        assert history[column] == resumed[column], column
    # Divergence is seen by every rank at the same step: no rank is left waiting.
    assert ranks[0]["diverged"] and ranks[0]["diverged"] == ranks[1]["diverged"]
    assert "lower the learning rate" in ranks[0]["diverged"]
    state = load_checkpoint(tmp_path / "ckpt")
    assert state["world_size"] == 2 and len(state["rank_rng"]) == 2

    script = _script()
    train, test = digits
    # Without noise, the gradient of two half batches, each loss scaled by 2
    # (by 1 with num_data) and averaged by DDP, is the whole batch's: plain SGD
    # takes the same steps on one process and two, up to rounding.
    one = script.train_means(train, dict(batch_size=64, seed=0, progress=False))
    for key, loc in one.items():
        assert torch.allclose(ranks[0]["means"][key], loc, rtol=1e-5, atol=1e-5), key
        assert float((loc - 1).abs().min()) > 0.5  # it moved from its start, 1
    single = fit(script.build(train.dim, 0), train, test, epochs=3, batch_size=64, seed=0,
                 **script.SETTINGS)
    assert history["step"] == single.history["step"].tolist() == [22, 44, 66]
    # The two runs see the same batches but draw different noise (each rank
    # its own stream), so they agree statistically, not exactly. Measured on
    # this machine over seeds 0-15 (3 epochs): |difference| of the final
    # held-out ELBO at most 0.29 nats (mean -0.005, sd 0.15; 0.13 at seed 0),
    # against a spread of 0.61 nats (sd) between single-process seeds. The
    # tolerance of 1 nat leaves a margin of more than 3x.
    assert abs(history["test_elbo"][-1] - single.history["test_elbo"].iloc[-1]) < 1.0
    assert abs(history["train_elbo"][-1] - single.history["train_elbo"].iloc[-1]) < 1.0


CLI = ["-m", "pyrovae", "train", "vae", "--dataset", "digits", "--likelihood", "gaussian",
       "--z-dim", "8", "--hidden", "64", "--batch-size", "64", "--lr", "3e-3",
       "--eval-samples", "10", "--no-progress"]


@needs_lightning
def test_cli_trains_on_two_processes(tmp_path, capsys):
    out = tmp_path / "run"
    done = _run([*CLI, "--epochs", "2", "--devices", "2", "--strategy", "ddp",
                 "--accelerator", "cpu", "--out", str(out)])
    assert done.stdout.count("wrote ") == 1  # rank 0 reports, rank 1 stays quiet
    for name in ("config.json", "checkpoint.pt", "history.csv", "metrics.csv", "loss_curves.png"):
        assert (out / name).exists(), name
    fit_options = json.loads((out / "config.json").read_text())["fit"]
    assert (fit_options["devices"], fit_options["strategy"], fit_options["accelerator"]) == \
        (2, "ddp", "cpu")
    assert load_checkpoint(out)["world_size"] == 2
    # Resuming on one process is refused, in one line.
    code = main([*CLI[2:], "--epochs", "3", "--resume", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "written by a run on 2 processes" in err and "devices x num_nodes = 2" in err


def test_single_process_never_imports_lightning():
    code = ("import sys, torch\n"
            "from pyrovae import VAE, fit\n"
            "fit(VAE(3, z_dim=1, hidden=(4,), likelihood='gaussian'), torch.randn(40, 3), "
            "epochs=1, batch_size=20, progress=False)\n"
            "assert not [m for m in sys.modules if m.startswith('lightning')]\n")
    _run(["-c", code], timeout=120)


@pytest.mark.slow
@needs_lightning
def test_ddp_spawn_hands_the_trained_weights_back(digits):
    # Spawned processes receive the model by pickling; rank 0's weights come back.
    script = _script()
    train, test = digits
    model = script.build(train.dim, 0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = fit(model, train, test, epochs=3, batch_size=64, seed=0, devices=2,
                 strategy="ddp_spawn", accelerator="cpu", **script.SETTINGS)
    assert result.model is model and result.history["step"].tolist() == [22, 44, 66]
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    single = fit(script.build(train.dim, 0), train, test, epochs=3, batch_size=64, seed=0,
                 **script.SETTINGS)
    assert abs(result.history["test_elbo"].iloc[-1] - single.history["test_elbo"].iloc[-1]) < 1.0
