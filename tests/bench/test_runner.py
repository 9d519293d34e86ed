"""The suite runner end to end: ``pyrovae bench run benchmarks/quick.toml`` is
killed after its first rows and run again; the rerun finishes the suite
without redoing or losing a row. Then the numbers, the report and compare."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pyrovae.bench import compare_results, load_results, load_suite, summarize
from pyrovae.bench.results import RESULT_COLUMNS, ResultsFile

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
QUICK = BENCHMARKS / "quick.toml"
CLI = [sys.executable, "-m", "pyrovae.cli", "bench"]
FIRST_ROWS = 3  # rows written before the kill


def _data_rows(path: Path) -> int:
    """Complete data lines in a results file (header excluded)."""
    if not path.exists():
        return 0
    return max(0, path.read_bytes().count(b"\n") - 1)


def _complete_lines(data: bytes) -> bytes:
    return data[: data.rfind(b"\n") + 1]


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """The quick suite, killed (SIGKILL) once its first rows are on disk,
    then run again to completion."""
    out = tmp_path_factory.mktemp("bench") / "quick"
    results = out / "results.csv"
    cmd = CLI + ["run", str(QUICK), "--out", str(out), "--jobs", "1", "--threads", "1",
                 "--no-progress"]
    first = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        while _data_rows(results) < FIRST_ROWS:
            try:
                first.wait(timeout=0.2)
            except subprocess.TimeoutExpired:
                continue
            raise AssertionError(
                "the suite ended before it could be interrupted:\n" + first.stderr.read().decode()
            )
        first.kill()
    finally:
        first.wait()
        first.stdout.close()
        first.stderr.close()
    first_bytes = _complete_lines(results.read_bytes())
    second = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    return {"out": out, "first": first_bytes, "stdout": second.stdout,
            "suite": load_suite(QUICK), "frame": load_results(out)}


# -- resume ----------------------------------------------------------------------------


@pytest.mark.mnist
def test_rerun_completes_every_cell_exactly_once(quick):
    frame, suite = quick["frame"], quick["suite"]
    keys = [c.key for c in suite.cells()]
    assert sorted(frame["cell_key"]) == sorted(keys)  # each cell once, none missing
    n_first = quick["first"].count(b"\n") - 1
    assert FIRST_ROWS <= n_first < len(keys)  # the kill came midway
    assert f"{n_first} already done, {len(keys) - n_first} run now (0 failed)" in quick["stdout"]


@pytest.mark.mnist
def test_rows_of_the_interrupted_run_are_unchanged(quick):
    final = (quick["out"] / "results.csv").read_bytes()
    assert final.startswith(quick["first"])


@pytest.mark.mnist
def test_rows_record_the_cell_and_its_provenance(quick):
    frame = quick["frame"]
    assert list(frame.columns) == RESULT_COLUMNS
    assert (frame["status"] == "ok").all(), frame.loc[frame["status"] != "ok", "error"].tolist()
    assert (frame["suite"] == "quick").all()
    assert frame["timestamp"].str.match(r"\d{4}-\d\d-\d\dT").all()
    for col in ("pyrovae_version", "torch_version", "pyro_version"):
        assert (frame[col] != "").all()
    svi = frame[frame["method"] == "svi"]
    assert (svi["steps"] == svi["budget"].str.extract(r"steps=(\d+)")[0].astype(int)).all()
    assert (svi["ms_per_step"] > 0).all()
    # Gradient statistics were requested: every amortized model has both groups.
    amortized = svi[svi["model"].isin(["vae", "fa"])]
    assert amortized[["grad_encoder_snr", "grad_decoder_snr", "grad_encoder_var"]].notna().all().all()
    assert (amortized["grad_encoder_var"] > 0).all()


# -- the numbers obey the theory ---------------------------------------------------------


@pytest.mark.mnist
def test_bounds_and_maximum_likelihood(quick):
    f = quick["frame"]
    fa = f[f["model"] == "fa"]
    svi, em, skl = (fa[fa["method"] == m] for m in ("svi", "em", "sklearn"))
    # The importance-sampled estimate is a stochastic lower bound; with K = 50
    # it cannot exceed the exact log-likelihood by more than Monte Carlo noise.
    assert (svi["test_iwae"] <= svi["test_exact"] + 0.02).all()
    assert (svi["test_elbo"] <= svi["test_iwae"] + 0.02).all()
    # EM converges to the maximum-likelihood fit: no 30-step SVI run beats it
    # on the training data, and scikit-learn's FactorAnalysis finds the same
    # optimum.
    assert (svi["train_exact"] <= em["train_exact"].min() + 1e-4).all()
    assert abs(em["test_exact"].mean() - skl["test_exact"].mean()) < 5e-3
    # EM from the PCA start is deterministic: both seeds give the same fit.
    assert em["test_exact"].std() < 1e-6
    # The mixture's assignment is enumerated, so TraceEnum_ELBO is the exact
    # log-likelihood (objective - exact = 0 up to float32 rounding).
    gmm = f[f["model"] == "gmm"].set_index("method")
    assert abs(gmm.loc["svi", "objective_gap"]) < 1e-4
    assert abs(gmm.loc["em", "test_exact"] - gmm.loc["sklearn", "test_exact"]) < 1e-2
    # The Bayesian mixture has global latents: a posterior predictive density,
    # no importance-sampled bound.
    bayes = f[f["model"] == "bayes-gmm"]
    assert bayes["test_iwae"].isna().all() and bayes["test_predictive"].notna().all()


# -- report --------------------------------------------------------------------------------


@pytest.mark.mnist
def test_report_tables_and_plots(quick):
    out = quick["out"]
    text = (out / "report.md").read_text()
    assert text.startswith("# Benchmark report: quick")
    assert "### fa(z_dim=3) on synthetic-fa(train=500, test=200)" in text
    assert "| objective | K | guide | budget | seeds |" in text
    for png in ("heldout.png", "bias.png", "gradient_snr.png", "time_per_step.png"):
        data = (out / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
        assert f"]({png})" in text
    summary = pd.read_csv(out / "summary.csv")
    fa_svi = summary[(summary["model"] == "fa") & (summary["method"] == "svi")]
    assert (fa_svi["n_seeds"] == 2).all()
    # mean and standard deviation over the two seeds, as pandas computes them
    rows = quick["frame"]
    one = rows[(rows["model"] == "fa") & (rows["objective"] == "IWAE")]
    got = fa_svi[fa_svi["objective"] == "IWAE"].iloc[0]
    assert math.isclose(got["test_exact_mean"], one["test_exact"].mean(), rel_tol=1e-9)
    assert math.isclose(got["test_exact_std"], one["test_exact"].std(ddof=1), rel_tol=1e-9)


# -- compare -------------------------------------------------------------------------------


@pytest.mark.mnist
def test_compare_command(quick, tmp_path):
    out = quick["out"]
    csv = tmp_path / "cmp.csv"
    run = subprocess.run(CLI + ["compare", str(out), str(out), "--out", str(csv)],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "| model | dataset | method | objective | K | budget | metric | a | b | diff | ratio |" in run.stdout
    table = pd.read_csv(csv)
    assert len(table) and (table["diff"].dropna() == 0).all()
    assert np.allclose(table["ratio"].dropna(), 1.0)


@pytest.mark.mnist
def test_compare_joins_on_cells_and_reports_differences(quick):
    a = quick["frame"]
    b = a.copy()
    b["test_exact"] = b["test_exact"] + 1.0
    b["ms_per_step"] = b["ms_per_step"] * 2.0
    b = b[b["model"] != "vae"]  # groups only in A get NaN on the B side
    table = compare_results(a, b)
    exact = table[(table["metric"] == "test_exact") & table["b"].notna()]
    assert len(exact) and np.allclose(exact["diff"], 1.0)
    speed = table[(table["metric"] == "ms_per_step") & table["b"].notna()]
    assert np.allclose(speed["ratio"], 2.0)
    only_a = table[(table["model"].str.startswith("vae")) & (table["metric"] == "test_elbo")]
    assert len(only_a) == 9 and only_a["b"].isna().all()
    with pytest.raises(ValueError, match="cannot ignore"):
        compare_results(a, b, ignore=["colour"])


# -- parallel workers, failing cells, the results file ---------------------------------


def test_parallel_run_records_failures_and_resumes(tmp_path):
    suite = tmp_path / "tiny.toml"
    suite.write_text(
        """
[suite]
name = "tiny"
metrics = ["elbo", "exact"]
[suite.eval]
max_points = 100
[[grid]]
models = [{ name = "fa", z_dim = 2 }, { name = "fa", z_dim = 20 }]  # 20 > x_dim: fails
objectives = ["Trace_ELBO"]
datasets = [{ name = "synthetic-fa", train_size = 200, test_size = 100 }]
budgets = [{ steps = 5 }]
seeds = [0, 1]
"""
    )
    out = tmp_path / "out"
    cmd = CLI + ["run", str(suite), "--out", str(out), "--jobs", "2", "--no-progress"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert run.returncode == 1  # some cells failed
    frame = load_results(out)
    assert len(frame) == 4
    ok, bad = frame[frame["status"] == "ok"], frame[frame["status"] == "error"]
    # the cores are shared fairly between the two workers
    assert len(ok) == 2 and (ok["threads"] == max(1, (os.cpu_count() or 1) // 2)).all()
    assert len(bad) == 2 and bad["error"].str.contains("z_dim must be smaller than x_dim").all()
    assert "## Failed cells" in (out / "report.md").read_text()
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert "4 already done, 0 run now" in again.stdout
    assert len(load_results(out)) == 4


def test_a_row_cut_off_by_a_kill_is_dropped(tmp_path):
    path = tmp_path / "results.csv"
    results = ResultsFile(path)
    row = {c: "" for c in RESULT_COLUMNS}
    row.update(cell_key="abc", status="ok", num_particles=1, seed=0, test_elbo=-1.5)
    results.append(row)
    with open(path, "ab") as f:
        f.write(b"quick,grid0,def,svi,vae")  # a half-written row
    assert len(load_results(path)) == 1
    results.repair()
    assert path.read_bytes().endswith(b"\n")
    results.append({**row, "cell_key": "ghi", "error": "two\nlines"})
    frame = load_results(path)
    assert list(frame["cell_key"]) == ["abc", "ghi"]
    assert frame["error"].iloc[1] == "two | lines"
    assert frame["test_elbo"].iloc[0] == -1.5


def test_summarize_means_and_standard_deviations():
    rows = []
    for seed, value in enumerate([1.0, 2.0, 4.0]):
        row = {c: "" for c in RESULT_COLUMNS}
        row.update(cell_key=f"k{seed}", status="ok", method="svi", model="fa", seed=seed,
                   num_particles=5, objective="IWAE", test_elbo=value, steps=10)
        rows.append(row)
    rows.append({**rows[0], "cell_key": "bad", "status": "error", "test_elbo": 100.0})
    frame = pd.DataFrame(rows)
    out = summarize(frame)
    assert len(out) == 1 and out["n_seeds"].iloc[0] == 3
    assert math.isclose(out["test_elbo_mean"].iloc[0], 7 / 3)
    assert math.isclose(out["test_elbo_std"].iloc[0], np.std([1.0, 2.0, 4.0], ddof=1))
