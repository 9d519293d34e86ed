"""One run pipeline: the command line and a suite cell give the same numbers,
seeds decide everything, and trained models come back from their folders."""

import json
import math
import subprocess
import sys
import textwrap
from dataclasses import replace

import numpy as np
import pandas as pd
import pyro
import pyro.distributions as dist
import pytest
import torch

from pyrovae import GaussianMixture, VAE, evaluate, fit, load_run
from pyrovae.bench.results import load_results
from pyrovae.bench.runner import cell_spec, run_suite
from pyrovae.bench.spec import load_suite
from pyrovae.cli import build_parser, build_spec, main
from pyrovae.data import load_dataset
from pyrovae.infer.fit import FitConfig, load_checkpoint
from pyrovae.infer.program import resolve
from pyrovae.pipeline import EvalSettings, RunSpec, run


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_cli_and_suite_cell_give_identical_parameters_and_metrics(tmp_path):
    out = tmp_path / "cli"
    argv = ["train", "fa", "--dataset", "bfi", "--z-dim", "3", "--elbo", "Trace_ELBO",
            "--epochs", "2", "--batch-size", "64", "--lr", "0.01", "--seed", "3",
            "--eval-samples", "20", "--eval-points", "150", "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    suite_file = tmp_path / "one.toml"
    suite_file.write_text(textwrap.dedent("""
        [suite]
        name = "one"
        [suite.eval]
        num_samples = 20
        max_points = 150
        [[grid]]
        models = [{ name = "fa", z_dim = 3 }]
        objectives = ["Trace_ELBO"]
        datasets = ["bfi"]
        budgets = [{ epochs = 2 }]
        seeds = [3]
        [grid.fit]
        batch_size = 64
        lr = 0.01
    """))
    suite = load_suite(suite_file)
    summary = run_suite(suite, tmp_path / "suite", progress=False, report=False)
    assert summary.errors == 0
    row = load_results(tmp_path / "suite").iloc[0]
    metrics = pd.read_csv(out / "metrics.csv").iloc[0]
    assert row["test_elbo"] == metrics["elbo"]
    assert row["test_iwae"] == metrics["iwae"]
    assert row["test_exact"] == metrics["exact"]
    assert row["n_eval"] == metrics["n"] == 150
    # The cell's model, trained by the same pipeline, has the CLI run's weights bit for bit.
    (cell,) = suite.cells()
    cell_model = run(cell_spec(cell), progress=False).model
    cli_model = load_run(out)
    cli_state, cell_state = _state(cli_model), _state(cell_model)
    assert cli_state.keys() == cell_state.keys()
    for name in cli_state:
        assert torch.equal(cli_state[name], cell_state[name]), name


_SEED_RUN = """
import sys, torch
from pyrovae.cli import main
from pyrovae.infer.fit import FitConfig, load_checkpoint
out = sys.argv[1]
assert main(["train", "vae", "--dataset", "digits", "--likelihood", "gaussian", "--z-dim", "2",
             "--hidden", "16", "--epochs", "2", "--batch-size", "64", "--seed", sys.argv[2],
             "--eval-samples", "5", "--eval-points", "50", "--out", out, "--no-progress"]) == 0
"""


def test_the_same_command_is_bitwise_identical_in_two_processes(tmp_path):
    outs = []
    for i, seed in enumerate(["0", "0", "1"]):
        out = tmp_path / f"run{i}"
        done = subprocess.run([sys.executable, "-c", _SEED_RUN, str(out), seed],
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        outs.append(out)
    states = [load_checkpoint(o)["model_state"] for o in outs]
    metrics = [pd.read_csv(o / "metrics.csv").drop(columns="seconds") for o in outs]
    history = [pd.read_csv(o / "history.csv").drop(columns="seconds") for o in outs]
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    pd.testing.assert_frame_equal(metrics[0], metrics[1], check_exact=True)
    pd.testing.assert_frame_equal(history[0], history[1], check_exact=True)
    # Another seed gives other initial weights, so other numbers.
    assert not all(torch.equal(states[0][k], states[2][k]) for k in states[0])
    assert metrics[0]["elbo"].item() != metrics[2]["elbo"].item()


def test_fit_seed_does_not_depend_on_evaluation_during_training():
    x = load_dataset("digits", split="train").x[:256]
    runs = []
    for eval_every in (0, 1):
        pyro.clear_param_store()
        torch.manual_seed(0)
        model = VAE(x.shape[1], z_dim=2, hidden=[16], likelihood="gaussian")
        fit(model, x, x[:64], epochs=2, batch_size=64, seed=5, eval_every=eval_every,
            progress=False)
        runs.append(_state(model))
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])


def _bayes_gmm_weight_sd(argv):
    spec = build_spec(build_parser().parse_args(argv))
    model = run(spec, progress=False).model
    alpha = model.variational.log_concentration.exp().detach()
    a0 = alpha.sum()
    return (alpha * (a0 - alpha) / (a0**2 * (a0 + 1))).sqrt(), spec


def test_bayes_gmm_posterior_does_not_depend_on_the_batch_size(tmp_path):
    base = ["train", "bayes-gmm", "--dataset", "faithful", "--set", "K=2", "--lr", "0.02",
            "--eval-samples", "10", "--no-progress"]
    mini, spec = _bayes_gmm_weight_sd(base + ["--epochs", "60", "--batch-size", "64",
                                              "--out", str(tmp_path / "a")])
    full, _ = _bayes_gmm_weight_sd(base + ["--epochs", "240", "--batch-size", "218",
                                           "--out", str(tmp_path / "b")])
    # The run gives the model the training-set size, so a mini-batch is scaled to it.
    assert json.loads((tmp_path / "a" / "config.json").read_text())["built_options"]["num_data"] == 218
    assert torch.allclose(mini, full, rtol=0.10), (mini, full)


def test_fit_uses_the_models_own_objective_and_matches_em_on_faithful():
    train = load_dataset("faithful", split="train", standardize=False)
    x = train.x
    em = GaussianMixture(2, 2)
    em.fit_em(x)
    optimum = em.log_marginal(x).mean().item()
    pyro.clear_param_store()
    model = GaussianMixture(2, 2)
    start = None
    model.initialize(x)
    start = model.log_marginal(x).mean().item()
    result = fit(model, x, epochs=400, batch_size=len(x), lr=0.02, progress=False, eval_every=0)
    assert result.config.elbo == "TraceEnum_ELBO"
    final = model.log_marginal(x).mean().item()
    assert final >= start - 1e-3
    assert abs(final - optimum) < 1e-3, (start, final, optimum)


def _global_local_programs(m, s, a, b):
    """mu ~ N(0, 1); z_n | mu ~ N(mu, 1); x_n | z_n ~ N(z_n, 0.5^2), with
    q(mu) = N(m, s^2) and q(z_n | x_n) = N(a x_n, b^2)."""

    def model(x):
        mu = pyro.sample("mu", dist.Normal(torch.tensor(0.0, dtype=x.dtype), 1.0))
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(mu, 1.0))
            pyro.sample("x", dist.Normal(z, 0.5), obs=x.squeeze(-1))

    def guide(x):
        pyro.sample("mu", dist.Normal(torch.tensor(m, dtype=x.dtype), s))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(a * x.squeeze(-1), b))

    return model, guide


def test_global_and_local_latents_give_the_exact_predictive_density():
    m, s = 0.4, 0.3
    model, guide = _global_local_programs(m, s, a=0.6, b=0.8)
    x = torch.linspace(-3, 3, 9, dtype=torch.float64).unsqueeze(-1)
    # Integrating z and then mu under q(mu): x ~ N(m, s^2 + 1 + 0.25).
    exact = dist.Normal(m, math.sqrt(s**2 + 1.25)).log_prob(x.squeeze(-1)).mean().item()
    ev = evaluate(model, x, guide=guide, num_samples=400, local_samples=200, seed=1)
    assert ev.log_likelihood_method == "posterior predictive (S=400, K=200)"
    assert ev.log_likelihood == pytest.approx(exact, abs=0.03)
    # What drawing z from q without weighting scores instead: p(x | z) with
    # z ~ q(z | x), far above the true density.
    torch.manual_seed(0)
    z = dist.Normal(0.6 * x.squeeze(-1), 0.8).sample((4000,))
    naive = (dist.Normal(z, 0.5).log_prob(x.squeeze(-1)).exp().mean(0)).log().mean().item()
    assert naive - exact > 0.3


def test_a_model_only_global_latent_is_refused():
    def model(x):
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        tau = pyro.sample("tau", dist.Normal(0.0, 1.0))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("x", dist.Normal(mu + tau, 1.0), obs=x.squeeze(-1))

    def guide(x):
        pyro.sample("mu", dist.Normal(0.0, 1.0))

    with pytest.raises(ValueError, match="guide to sample every global latent"):
        evaluate(model, torch.zeros(4, 1), guide=guide, num_samples=3)


def test_resolver_reads_the_structure_once():
    _, guide = _global_local_programs(0.0, 1.0, 1.0, 1.0)

    def with_enum(x):
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(mu, 1.0))
            k = pyro.sample("k", dist.Categorical(torch.ones(2) / 2),
                            infer={"enumerate": "parallel"})
            u = pyro.sample("u", dist.Normal(0.0, 1.0))
            pyro.sample("x", dist.Normal(z + u + k, 1.0), obs=x.squeeze(-1))

    program = resolve(with_enum, guide, torch.zeros(3, 1))
    assert program.global_latents == ("mu",)
    assert program.local_latents == ("z",)
    assert program.enumerated == ("k",)
    assert program.prior_latents == ("u",)
    assert program.max_plate_nesting == 1
    assert program.default_elbo == "Trace_ELBO" and program.num_data is None
    vae = VAE(5, z_dim=2, hidden=[4])
    p = resolve(vae, None, torch.zeros(3, 5))
    assert {id(t) for t in p.params} == {id(t) for t in vae.parameters()}


def test_two_model_instances_never_share_parameters():
    x = load_dataset("digits", split="train").x[:128]
    a = VAE(x.shape[1], z_dim=2, hidden=[8], likelihood="gaussian")
    b = VAE(x.shape[1], z_dim=2, hidden=[8], likelihood="gaussian")
    before = _state(b)
    fit(a, x, epochs=1, batch_size=64, progress=False)
    after = _state(b)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not set(map(id, a.parameters())) & set(map(id, b.parameters()))


def test_numpy_frames_and_float64_enter_fit_and_evaluate():
    from pyrovae import FactorAnalysis

    train = load_dataset("bfi", split="train").x[:300]
    frame = pd.DataFrame(train.double().numpy())
    model = FactorAnalysis(train.shape[1], 2)
    fit(model, frame, train.double().numpy()[:100], epochs=1, batch_size=100, progress=False)
    ev64 = evaluate(model, train.double()[:50], num_samples=5)
    ev32 = evaluate(model, train[:50], num_samples=5)
    assert ev64.exact == pytest.approx(ev32.exact, abs=1e-6)
    assert ev64.elbo == ev32.elbo


def test_load_run_and_fit_folders_give_the_trained_model_back(tmp_path):
    x = load_dataset("digits", split="train").x[:256]
    model = VAE(x.shape[1], z_dim=2, hidden=[16], likelihood="gaussian")
    fit(model, x, epochs=1, batch_size=64, progress=False, checkpoint_dir=str(tmp_path / "fit"))
    back = load_run(tmp_path / "fit")
    assert type(back) is VAE
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                 back.state_dict().values()))
    assert torch.equal(back.encode(x[:4]), model.encode(x[:4]))
    assert back.sample(3).shape == (3, x.shape[1])
    assert evaluate(back, x[:20], num_samples=5).elbo == evaluate(model, x[:20], num_samples=5).elbo

    def plain_model(x):
        loc = pyro.param("loc", torch.zeros(()))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("x", dist.Normal(loc, 1.0), obs=x.squeeze(-1))

    class Own(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.loc = torch.nn.Parameter(torch.zeros(()))

        def model(self, x):
            with pyro.plate("data", x.shape[0]):
                pyro.sample("x", dist.Normal(self.loc, 1.0), obs=x.squeeze(-1))

        def guide(self, x):
            pass

    fit(Own(), torch.randn(64, 1), epochs=1, batch_size=32, progress=False,
        checkpoint_dir=str(tmp_path / "own"))
    with pytest.raises(ValueError, match="not a pyrovae model: rebuild it yourself"):
        load_run(tmp_path / "own")


def test_spec_round_trips_through_json():
    spec = RunSpec(model="gmm", model_options={"K": 3}, dataset="iris", seed=4,
                   fit={"lr": 0.1}, out="x")
    assert RunSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec


def test_config_of_the_first_command_line_reads_with_every_setting():
    old = {"model": "vae", "dataset": "mnist", "out": "x", "data_root": "/data",
           "binarize": "static", "train_size": 512, "data_options": {}, "z_dim": 2,
           "model_options": {"hidden": [32]}, "method": "svi", "em_max_iter": 500,
           "eval_samples": 20, "eval_points": 200, "device": "cpu",
           "fit": {"elbo": "TraceMeanField_ELBO", "seed": 3, "epochs": 2}, "x_dim": 784}
    spec = RunSpec.from_dict(old)
    assert spec.model_options == {"hidden": [32], "z_dim": 2}
    assert spec.dataset_options == {"root": "/data", "binarize": "static"}
    assert spec.seed == 3 and spec.fit == {"elbo": "TraceMeanField_ELBO", "epochs": 2}
    assert (spec.eval.num_samples, spec.eval.max_points, spec.train_size) == (20, 200, 512)


def test_two_mean_field_guides_never_share_parameters():
    from pyrovae import BayesianGaussianMixture

    x = load_dataset("faithful", split="train").x
    a = BayesianGaussianMixture(2, 2, num_data=len(x))
    b = BayesianGaussianMixture(2, 2, num_data=len(x))
    b.initialize(x)
    before = _state(b)
    fit(a, x, epochs=3, batch_size=64, lr=0.05, progress=False)
    assert all(torch.equal(before[k], _state(b)[k]) for k in before)
    assert not set(map(id, a.parameters())) & set(map(id, b.parameters()))


def _tiny_vae_spec(out, **changes):
    spec = RunSpec(model="vae",
                   model_options={"z_dim": 3, "hidden": [16], "likelihood": "gaussian"},
                   dataset="digits", train_size=128, test_size=64,
                   fit={"epochs": 1, "batch_size": 64, "progress": False},
                   eval=EvalSettings(num_samples=5, gap_points=8, gap_steps=5, gap_samples=20),
                   out=str(out))
    return replace(spec, **changes)


def test_latent_diagnostics_reach_metrics_csv_and_their_own_tables(tmp_path):
    out = tmp_path / "vae"
    result = run(_tiny_vae_spec(out, metrics=("elbo", "latents", "gap")))
    metrics = pd.read_csv(out / "metrics.csv").iloc[0]
    latents = pd.read_csv(out / "latents.csv")
    assert latents["dim"].tolist() == [0, 1, 2] and (latents["site"] == "z").all()
    assert metrics["active_units"] == latents["active"].sum() == result.metrics["active_units"]
    assert metrics["latent_kl"] == pytest.approx(latents["kl"].sum())
    assert metrics["kl_z"] == metrics["latent_kl"] and metrics["latent_dims"] == 3
    gap = pd.read_csv(out / "gap.csv")
    assert len(gap) == 8 == metrics["gap_points"]
    assert metrics["amortization_gap"] == pytest.approx(gap["amortization_gap"].mean())
    assert metrics["approximation_gap"] == pytest.approx(gap["approximation_gap"].mean())
    assert {p.name for p in result.files} >= {"metrics.csv", "latents.csv", "gap.csv"}
    assert "kl_per_dimension.png" in {p.name for p in result.figures}
    # The run's own statistics drew the bar plot: the table and the run agree.
    assert result.latents.dims["kl"].tolist() == pytest.approx(latents["kl"].tolist())


def test_latents_are_skipped_by_default_and_refused_when_named_where_they_do_not_apply(tmp_path):
    gmm = RunSpec(model="gmm", model_options={"K": 2}, dataset="faithful", method="em",
                  eval=EvalSettings(num_samples=5), out=str(tmp_path / "gmm"))
    result = run(gmm)
    assert any(note.startswith("latents not measured: the model has no continuous local")
               for note in result.notes)
    assert "active_units" not in result.metrics and not (tmp_path / "gmm" / "latents.csv").exists()
    with pytest.raises(ValueError, match="metric 'latents' does not apply to model 'gmm'"):
        run(replace(gmm, metrics=("elbo", "latents"), out=str(tmp_path / "named")))
    assert not (tmp_path / "named").exists()
    fa = RunSpec(model="fa", model_options={"z_dim": 2}, dataset="bfi", method="em",
                 metrics=("elbo", "gap"), out=str(tmp_path / "fa"))
    with pytest.raises(ValueError, match="metric 'gap' does not apply.*LinearGaussianEncoder"):
        run(fa)
    assert not (tmp_path / "fa").exists()


def test_no_capture_reaches_fit_and_capture_is_the_default():
    argv = ["train", "vae", "--dataset", "digits", "--out", "unused"]
    assert "capture" not in build_spec(build_parser().parse_args(argv)).fit
    spec = build_spec(build_parser().parse_args(argv + ["--no-capture"]))
    assert spec.fit["capture"] is False
    assert FitConfig(**spec.fit).capture is False and FitConfig().capture is True


def test_optimizer_options_from_the_command_line():
    argv = ["train", "vae", "--dataset", "digits", "--out", "unused", "--optimizer-opt",
            "eps=1e-4", "--optimizer-opt", "betas=[0.8,0.99]"]
    spec = build_spec(build_parser().parse_args(argv))
    assert spec.fit["optimizer_options"] == {"eps": 1e-4, "betas": [0.8, 0.99]}
    assert FitConfig(**spec.fit).optimizer_options["eps"] == 1e-4
