"""Smoke tests of the deeper-VAEs benchmark: the script runs end to end on a
tiny budget and writes one finite row per model, the verdicts and resumable
model folders; the Burda et al. (2016) suite file passes the suite loader."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pandas as pd
import pytest

from pyrovae.bench.spec import load_suite
from pyrovae.infer.callbacks import schedule_factor

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def _script():
    spec = importlib.util.spec_from_file_location("vae_families", BENCHMARKS / "vae_families.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


TINY = ["--train-size", "256", "--batch-size", "128", "--epochs", "1", "--eval-points", "32",
        "--k", "10", "--elbo-particles", "2", "--latent-samples", "4", "--gap-points", "4",
        "--gap-steps", "5"]


@pytest.mark.mnist
def test_vae_families_tiny_run(tmp_path, capsys):
    script = _script()
    out = tmp_path / "families"
    verdicts = script.main(["--out", str(out), *TINY])

    table = pd.read_csv(out / "results.csv")
    assert list(table.columns) == script.COLUMNS
    assert list(table["model"]) == ["vae", "vae-iaf", "ladder", "conv"]
    assert (table["notes"].isna() | (table["notes"] == "")).all(), table["notes"].tolist()
    numeric = ["parameters", "latent_dims", "seconds_per_epoch", "train_elbo", "test_elbo",
               "test_elbo_se", "test_log_likelihood", "test_log_likelihood_se", "elbo_gap",
               "kl", "active_units", "approximation_gap", "amortization_gap",
               "inference_gap", "inference_gap_se"]
    values = table[numeric].astype(float)
    assert values.map(math.isfinite).all().all(), values
    assert (table["epochs"] == 1).all() and (table["seed"] == 0).all()
    assert (table["K"] == 10).all() and (table["eval_points"] == 32).all()
    assert (table["gap_points"] == 4).all() and (table["train_size"] == 256).all()
    assert list(table["latent_dims"]) == [32, 32, 48, 32]
    # Every site's units are counted: the ladder reports both of its layers.
    sites = table.set_index("model").at["ladder", "active_units_by_site"]
    assert "z1: " in sites and "/32" in sites and "z2: " in sites and "/16" in sites
    assert (table["active_units"] <= table["latent_dims"]).all()
    # The gaps add up: approximation + amortization = log p(x) - ELBO of q.
    total = table["approximation_gap"] + table["amortization_gap"]
    assert (total - table["inference_gap"]).abs().max() < 1e-6
    # A K-sample bound is above the ELBO on average, for every model here.
    assert (table["test_log_likelihood"] > table["test_elbo"]).all()

    claims = pd.read_csv(out / "claims.csv")
    assert list(claims.columns) == script.CLAIM_COLUMNS and len(claims) == 2
    assert claims[["paired_difference", "paired_se", "full_set_difference",
                   "full_set_se"]].map(math.isfinite).all().all()
    assert set(claims["verdict"].str.split(" ").str[0]) <= {"confirmed", "refuted", "not"}
    assert (claims["seed"] == 0).all() and verdicts.shape == claims.shape

    report = (out / "results.md").read_text()
    assert "the ladder beats the flat VAE" in report and "| vae-iaf" in report
    for name in table["model"]:
        folder = out / "models" / name
        assert (folder / "checkpoint.pt").exists() and (folder / "result.json").exists()

    # A rerun resumes: training and evaluation are read back, not redone.
    capsys.readouterr()
    script.main(["--out", str(out), *TINY])
    assert capsys.readouterr().out.count("evaluation found") == 4
    assert pd.read_csv(out / "results.csv").equals(table)
    # A checkpoint is never resumed under another training setup.
    with pytest.raises(SystemExit, match="another setup"):
        script.main(["--out", str(out), *TINY, "--lr", "0.01", "--models", "vae"])


def test_burda2016_suite_loads():
    suite = load_suite(BENCHMARKS / "burda2016.toml")
    cells = suite.cells()
    assert len(cells) == 12
    assert suite.eval.num_samples == 5000 and suite.eval.max_points == 10000
    models = {c.model for c in cells}
    assert models == {"vae", "ladder-vae"}
    seen = {(c.model, c.objective, c.num_particles) for c in cells}
    for model in models:
        for objective in ("Trace_ELBO", "IWAE"):
            assert {k for m, o, k in seen if m == model and o == objective} == {1, 5, 50}
    for cell in cells:
        assert cell.device == "cuda" and cell.budget == {"epochs": 3280}
        assert cell.fit_options["batch_size"] == 20 and cell.fit_options["lr"] == 1e-3
        assert cell.fit_options["optimizer_options"] == {"eps": 1e-4}  # the paper's Adam
        assert cell.dataset_options.get("binarize") == "dynamic"
    # The schedule: the paper's eight rates, 1e-3 * 10^(-i/7), over 3,280 epochs.
    schedule = cells[0].fit_options["lr_schedule"]
    rates = [round(1e-3 * schedule_factor(schedule, e, 3280), 12) for e in range(3280)]
    assert [rates.count(round(1e-3 * 10 ** (-i / 7), 12)) for i in range(8)] == [
        3 ** i for i in range(8)]  # stage i: 3^i epochs
    # The reduced CPU command of the header validates too.
    cpu = load_suite(BENCHMARKS / "burda2016.toml", overrides=[
        "grid.device=cpu", "grid.budgets=[{seconds = 120}]", "grid.fit.batch_size=100",
        "suite.eval.num_samples=500", "suite.eval.max_points=1000"])
    assert {c.device for c in cpu.cells()} == {"cpu"} and len(cpu.cells()) == 12
