"""The Ray engine: the same rows as the local engine, error rows for failing
cells and dead workers, cancelled cells on a stop, and a killed driver whose
suite resumes without losing or repeating a row.

One local Ray instance (2 CPUs) serves the whole module; the tests that run
``pyrovae bench run --engine ray`` as a subprocess let it start its own, as a
user's command does, and check that it goes away with the driver.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from pyrovae.bench import load_results, load_suite, ray_engine, run_suite, runner
from pyrovae.bench.command import main as bench_main
from pyrovae.bench.runner import SuiteInterrupted

HAVE_RAY = importlib.util.find_spec("ray") is not None
needs_ray = pytest.mark.skipif(
    not HAVE_RAY, reason="ray is not installed (pip install 'pyrovae[ray]' or 'ray>=2.9')")
on_linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")

QUICK = Path(__file__).resolve().parents[2] / "benchmarks" / "quick.toml"
CLI = [sys.executable, "-m", "pyrovae", "bench", "run"]
# Columns that time or date a run; every other column is decided by the seeds.
TIMING = ("train_seconds", "wall_seconds", "ms_per_step", "timestamp")

SUITE = """
[suite]
name = "ray"
metrics = ["elbo", "exact"]
[suite.eval]
max_points = 50
[[grid]]
models = {models}
objectives = ["Trace_ELBO"]
datasets = [{{ name = "synthetic-fa", train_size = 200, test_size = 50 }}]
budgets = [{{ {budget} }}]
seeds = {seeds}
"""


def _suite(tmp_path: Path, budget: str = "steps = 5", seeds=(0, 1, 2),
           models: str = '[{ name = "fa", z_dim = 2 }]') -> Path:
    path = tmp_path / "suite.toml"
    path.write_text(SUITE.format(budget=budget, seeds=list(seeds), models=models))
    return path


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray instance for the module (its startup takes seconds)."""
    if not HAVE_RAY:
        pytest.skip("ray is not installed")
    import ray

    previous = signal.getsignal(signal.SIGTERM)  # ray.init installs its own
    ray.init(address="local", num_cpus=2, include_dashboard=False,
             object_store_memory=ray_engine.OBJECT_STORE_BYTES, logging_level=logging.WARNING)
    signal.signal(signal.SIGTERM, previous)
    try:
        yield ray
    finally:
        ray.shutdown()
        signal.signal(signal.SIGTERM, previous)


# -- /proc -------------------------------------------------------------------------------


def _parents() -> dict:
    out = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            out[int(entry)] = int(stat[stat.rfind(")") + 2:].split()[1])
    return out


def _descendants(pid: int) -> set:
    parents = _parents()
    found, frontier = set(), {pid}
    while frontier:
        frontier = {p for p, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def _running(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2] != "Z"


def _name(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:80]
    except OSError:
        return "?"


def _rows(path: Path) -> int:
    return max(0, path.read_bytes().count(b"\n") - 1) if path.exists() else 0


def _same_rows(a: pd.DataFrame, b: pd.DataFrame) -> int:
    """Assert two results frames hold the same cells and, for every cell
    whose budget is not a time budget, the same values in every column but the
    timings; return how many cells were compared value by value."""
    a, b = a.set_index("cell_key").sort_index(), b.set_index("cell_key").sort_index()
    assert list(a.index) == list(b.index)
    deterministic = [k for k in a.index if "seconds" not in a.loc[k, "budget"]]
    for column in a.columns:
        if column in TIMING:
            continue
        x, y = a.loc[deterministic, column], b.loc[deterministic, column]
        if x.dtype.kind == "f" or y.dtype.kind == "f":
            same = (x == y) | (x.isna() & y.isna())
        else:
            same = x == y
        assert same.all(), (column, list(zip(x[~same], y[~same]))[:3])
    return len(deterministic)


# -- without ray -------------------------------------------------------------------------


def test_without_ray_the_engine_says_what_to_install(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray now fails
    out = tmp_path / "out"
    status = bench_main(["run", str(_suite(tmp_path)), "--out", str(out), "--engine", "ray",
                         "--no-progress"])
    assert status == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == ["pyrovae bench: error: --engine ray needs Ray, which is not installed: "
                     "pip install 'pyrovae[ray]' (or pip install 'ray>=2.9')"]
    assert not out.exists()  # nothing was started or written
    status = bench_main(["run", str(_suite(tmp_path)), "--out", str(out), "--address", "x:1"])
    assert status == 2 and "--address is for --engine ray" in capsys.readouterr().err


# -- the same rows -------------------------------------------------------------------------


@needs_ray
def test_ray_rows_equal_local_rows(local_ray, tmp_path):
    # A subset of the quick suite: every method and model kind, two VAE
    # objectives, and a time-budgeted cell (compared by key only).
    suite = load_suite(QUICK, [
        'grid.0.objectives=["Trace_ELBO", { name = "IWAE-DReG", num_particles = [2] }]',
        'grid.1.objectives=["Trace_ELBO", { name = "IWAE", num_particles = [2] }, "STL_ELBO"]',
        "grid.3.budgets=[{ steps = 30 }, { seconds = 0.5 }]",
    ])
    if not (Path(os.environ.get("PYROVAE_DATA", "")) / "MNIST" / "raw").exists():
        suite.grids = [g for g in suite.grids if g.name != "vae-mnist"]
    n = len(suite.cells())
    t0 = time.perf_counter()
    local = run_suite(suite, tmp_path / "local", jobs=1, threads=1, progress=False, report=False)
    t1 = time.perf_counter()
    on_ray = run_suite(suite, tmp_path / "ray", engine="ray", threads=1, progress=False,
                       report=False)
    t2 = time.perf_counter()
    print(f"{n} cells: local engine {t1 - t0:.1f} s, ray engine {t2 - t1:.1f} s")
    assert (local.ran, local.errors, on_ray.ran, on_ray.errors) == (n, 0, n, 0)
    a, b = load_results(tmp_path / "local"), load_results(tmp_path / "ray")
    assert len(a) == len(b) == n
    assert (b["threads"] == 1).all()
    compared = _same_rows(a, b)
    assert compared == n - 2  # all but the two time-budgeted cells
    svi = b[(b["method"] == "svi") & b["budget"].str.startswith("steps=")]
    assert (svi["steps"] == svi["budget"].str.extract(r"steps=(\d+)")[0].astype(float)).all()


# -- failures ----------------------------------------------------------------------------


@needs_ray
def test_failing_cells_and_dead_workers_give_error_rows(local_ray, tmp_path, monkeypatch):
    suite = load_suite(_suite(tmp_path, seeds=(0, 1),
                              models='[{ name = "fa", z_dim = 2 }, { name = "fa", z_dim = 20 }]'))
    cells = suite.cells()
    victim = next(c for c in cells if c.model_options["z_dim"] == 2 and c.seed == 1).key

    def task(cell_dict, fail_fast, threads):  # pickled by value into the workers
        import os as _os

        from pyrovae.bench.runner import run_cell
        from pyrovae.bench.spec import Cell

        if Cell.from_dict(cell_dict).key == victim:
            _os._exit(3)  # the worker process dies mid-cell
        return run_cell(cell_dict, fail_fast)

    out = tmp_path / "out"
    monkeypatch.setattr(runner, "_ray_task", task)
    summary = run_suite(suite, out, engine="ray", progress=False, report=False)
    assert (summary.ran, summary.errors) == (4, 3)
    frame = load_results(out).set_index("cell_key")
    died = frame.loc[victim]
    assert died["status"] == "error"
    assert died["error"].startswith("the Ray worker running this cell died: WorkerCrashedError: ")
    assert died["threads"] == 1 and math.isnan(died["test_elbo"])
    bad = frame[frame["model_options"].str.contains('"z_dim":20')]
    assert len(bad) == 2 and bad["error"].str.contains("z_dim must be smaller than x_dim").all()
    # With the worker healthy again, --retry-errors runs the failed cells again.
    monkeypatch.undo()
    again = run_suite(suite, out, engine="ray", retry_errors=True, progress=False, report=False)
    assert (again.skipped, again.ran, again.errors) == (1, 3, 2)
    newest = load_results(out).drop_duplicates("cell_key", keep="last").set_index("cell_key")
    assert newest.loc[victim, "status"] == "ok"


@needs_ray
@on_linux
def test_a_stop_cancels_the_cells_in_flight(local_ray, tmp_path, monkeypatch):
    suite = load_suite(_suite(tmp_path, seeds=(0, 1, 2, 3)))
    first, sleeper = suite.cells()[:2]
    pids = tmp_path / "pids"
    pids.mkdir()

    def task(cell_dict, fail_fast, threads):
        import os as _os
        import time as _time

        from pyrovae.bench.runner import run_cell
        from pyrovae.bench.spec import Cell

        key = Cell.from_dict(cell_dict).key
        (pids / key).write_text(str(_os.getpid()))
        if key != first.key:
            _time.sleep(300)  # busy until cancelled
        return run_cell(cell_dict, fail_fast)

    def stop(row):
        deadline = time.monotonic() + 60
        while not (pids / sleeper.key).exists():  # the second cell runs
            assert time.monotonic() < deadline
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(runner, "_ray_task", task)
    out = tmp_path / "out"
    with pytest.raises(SuiteInterrupted):
        run_suite(suite, out, engine="ray", progress=False, report=False, on_row=stop)
    worker = int((pids / sleeper.key).read_text())
    deadline = time.monotonic() + 10
    while _running(worker) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _running(worker), "the cancelled cell's worker still runs"
    assert len(load_results(out)) == 1
    monkeypatch.undo()
    summary = run_suite(suite, out, engine="ray", progress=False, report=False)
    assert (summary.skipped, summary.ran, summary.errors) == (1, 3, 0)
    assert sorted(load_results(out)["cell_key"]) == sorted(c.key for c in suite.cells())


# -- a killed driver ---------------------------------------------------------------------

# Ray's per-node agents of a local instance: after a SIGKILL of the driver they
# notice at once that their raylet is gone, but then try for 60 s (a fixed
# timeout in Ray) to report that to the GCS, which died with the driver.
AGENTS = ("ray::DashboardAgent", "ray::RuntimeEnvAgent")


def _stop_driver(tmp_path: Path, signum: int, wait: float = 15.0, agents: bool = False):
    """Run a 6-cell suite through ``pyrovae bench run --engine ray`` (its own
    local Ray instance), send ``signum`` once the first row is written, and
    wait up to ``wait`` seconds for every process the driver started to end
    (but Ray's agents, unless ``agents``). Return the suite, the results
    file's bytes at the signal, the processes still running then ({pid:
    command}), the driver and its stderr."""
    suite = _suite(tmp_path, budget="seconds = 1", seeds=range(6))
    out = tmp_path / "out"
    results = out / "results.csv"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a local instance
    cmd = CLI + [str(suite), "--out", str(out), "--engine", "ray", "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)
    started = set()  # every process the driver started: Ray's own and its workers
    try:
        deadline = time.monotonic() + 120
        while _rows(results) < 1:
            if proc.poll() is not None:
                raise AssertionError(f"the suite ended before the signal:\n{proc.stderr.read()}")
            assert time.monotonic() < deadline, "no row after 120 s"
            started |= _descendants(proc.pid)
            time.sleep(0.05)
        started |= _descendants(proc.pid)
        before = results.read_bytes()
        proc.send_signal(signum)
        sent = time.monotonic()
        _, stderr = proc.communicate(timeout=60)
        while time.monotonic() - sent < wait and any(
                _running(p) and (agents or not _name(p).startswith(AGENTS)) for p in started):
            time.sleep(0.1)
        left = {p: _name(p) for p in started if _running(p)}
        print(f"{signum.name}: {len(started)} processes started by the driver, "
              f"{len(left)} running {time.monotonic() - sent:.1f} s after the signal: "
              f"{sorted(left.values())}")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        for pid in started:  # never leave a process of this test behind
            if _running(pid):
                os.kill(pid, signal.SIGKILL)
    return suite, before, left, proc, stderr


def _rerun_resumes(local_ray, suite: Path, before: bytes) -> None:
    """The rerun (on the module's Ray instance) runs only the missing cells and
    leaves the earlier rows byte for byte."""
    out = suite.parent / "out"
    n_before = before.count(b"\n") - 1
    assert 1 <= n_before < 6
    loaded = load_suite(suite)
    summary = run_suite(loaded, out, engine="ray", progress=False, report=False)
    assert (summary.skipped, summary.ran, summary.errors) == (n_before, 6 - n_before, 0)
    assert (out / "results.csv").read_bytes().startswith(before)
    assert sorted(load_results(out)["cell_key"]) == sorted(c.key for c in loaded.cells())


@needs_ray
@on_linux
def test_a_sigkilled_driver_resumes_without_losing_or_repeating_a_row(local_ray, tmp_path):
    suite, before, left, proc, _ = _stop_driver(tmp_path, signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL
    # The local instance dies with its driver (Ray's fate-sharing), the cells
    # in flight with it; only the two agents linger (they were killed above).
    assert all(name.startswith(AGENTS) for name in left.values()), left
    _rerun_resumes(local_ray, suite, before)


@needs_ray
@on_linux
def test_a_sigtermed_driver_stops_its_ray_instance_and_resumes(local_ray, tmp_path):
    suite, before, left, proc, stderr = _stop_driver(tmp_path, signal.SIGTERM)
    assert proc.returncode == 143
    assert stderr.strip().splitlines()[-1].startswith(
        "pyrovae bench: stopped by SIGTERM; the finished cells are in ")
    assert not left  # cancelled, and the instance shut down
    _rerun_resumes(local_ray, suite, before)


@needs_ray
@on_linux
@pytest.mark.slow
def test_the_agents_of_a_sigkilled_driver_end_by_themselves(local_ray, tmp_path):
    _, _, left, _, _ = _stop_driver(tmp_path, signal.SIGKILL, wait=120, agents=True)
    assert not left
