"""A suite stopped by any signal leaves no worker behind and loses no row;
a second suite into the same folder fails at once, naming the first."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pyrovae.bench import load_results, load_suite, run_suite
from pyrovae.bench.runner import SuiteInterrupted
from pyrovae.files import LOCK_FILE, FolderLock, FolderLockedError

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")

CLI = [sys.executable, "-m", "pyrovae", "bench", "run"]

# Cells of a couple of seconds each (a time budget), so that a signal finds
# workers busy and some rows already written.
SUITE = """
[suite]
name = "stop"
metrics = ["elbo"]
[suite.eval]
max_points = 50
[[grid]]
models = [{{ name = "fa", z_dim = 2 }}]
objectives = ["Trace_ELBO"]
datasets = [{{ name = "synthetic-fa", train_size = 200, test_size = 50 }}]
budgets = [{{ {budget} }}]
seeds = {seeds}
"""


def _suite(tmp_path: Path, budget: str = "seconds = 1", seeds=(0, 1, 2)) -> Path:
    path = tmp_path / "stop.toml"
    path.write_text(SUITE.format(budget=budget, seeds=list(seeds)))
    return path


def _rows(path: Path) -> int:
    return max(0, path.read_bytes().count(b"\n") - 1) if path.exists() else 0


def _children(pid: int) -> list:
    """Processes whose parent is ``pid`` (the workers and the resource tracker)."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        if int(stat[stat.rfind(")") + 2:].split()[1]) == pid:
            out.append(int(entry))
    return out


def _running(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2] != "Z"


def _start_and_wait_for_a_row(cmd, results: Path) -> subprocess.Popen:
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while _rows(results) < 1:
        if proc.poll() is not None:
            raise AssertionError(f"the suite ended before a signal could stop it:\n{proc.stderr.read()}")
        assert time.monotonic() < deadline, "no row after 120 s"
        time.sleep(0.05)
    return proc


@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_a_stopped_suite_leaves_no_workers_and_loses_no_row(tmp_path, signum):
    suite = _suite(tmp_path)
    out = tmp_path / "out"
    results = out / "results.csv"
    cmd = CLI + [str(suite), "--out", str(out), "--jobs", "2", "--no-progress"]
    proc = _start_and_wait_for_a_row(cmd, results)
    children = _children(proc.pid)
    assert len(children) >= 2, children  # two workers (and the resource tracker)
    before = results.read_bytes()
    sent = time.monotonic()
    proc.send_signal(signum)
    while any(_running(pid) for pid in children) and time.monotonic() - sent < 10:
        time.sleep(0.02)
    gone_after = time.monotonic() - sent
    left = [pid for pid in children if _running(pid)]
    assert not left, f"still running {gone_after:.1f} s after {signum.name}: {left}"
    assert gone_after < 5
    print(f"{signum.name}: workers gone {gone_after:.2f} s after the signal")
    _, stderr = proc.communicate(timeout=30)
    if signum == signal.SIGTERM:
        assert proc.returncode == 128 + signal.SIGTERM == 143
        lines = [line for line in stderr.splitlines() if line.strip()]
        assert len(lines) == 1, stderr
        assert lines[0].startswith("pyrovae bench: stopped by SIGTERM; the finished cells are in ")
        assert "run the same command again to continue" in lines[0]
    else:
        assert proc.returncode == -signal.SIGKILL
    # The rows written before the signal survive, byte for byte, and a rerun
    # runs only the rest (in this process: spawning workers again would only
    # make the test slower).
    n_before = before.count(b"\n") - 1
    assert 1 <= n_before < 3
    rerun = [*cmd[:cmd.index("--jobs")], "--no-progress"]
    again = subprocess.run(rerun, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"{n_before} already done, {3 - n_before} run now (0 failed)" in again.stdout
    assert results.read_bytes().startswith(before)
    frame = load_results(out)
    keys = sorted(c.key for c in load_suite(suite).cells())
    assert sorted(frame["cell_key"]) == keys  # every cell exactly once
    assert (frame["status"] == "ok").all()


def test_a_second_suite_into_the_same_folder_fails_at_once(tmp_path):
    suite = _suite(tmp_path, seeds=range(8))
    out = tmp_path / "out"
    first = subprocess.Popen(CLI + [str(suite), "--out", str(out), "--jobs", "2", "--no-progress"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lock = out / LOCK_FILE
        deadline = time.monotonic() + 60
        while not (lock.exists() and lock.read_text()):
            assert first.poll() is None, first.stderr.read()
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert json.loads(lock.read_text())["pid"] == first.pid
        loaded = load_suite(suite)
        t0 = time.monotonic()
        with pytest.raises(FolderLockedError) as info:
            run_suite(loaded, out, jobs=2, progress=False)
        assert time.monotonic() - t0 < 1.0
        message = str(info.value)
        assert "\n" not in message
        assert f"{out} is being written by process {first.pid} on " in message
        assert "wait for that suite to finish or choose another folder" in message
        # The command says the same in one line.
        second = subprocess.run(CLI + [str(suite), "--out", str(out), "--no-progress"],
                                capture_output=True, text=True, timeout=120)
        assert first.poll() is None, "the first suite ended before the second tried"
        assert second.returncode == 2
        assert second.stderr.strip().splitlines() == [f"pyrovae bench: error: {message}"]
    finally:
        first.kill()
        first.communicate()
    # The kernel released the lock of the killed suite.
    with FolderLock(out, what="suite"):
        pass


def test_sigterm_in_process_stops_the_suite_and_restores_the_handler(tmp_path):
    suite = load_suite(_suite(tmp_path, budget="steps = 2", seeds=(0, 1, 2)))
    out = tmp_path / "out"
    previous = signal.getsignal(signal.SIGTERM)

    def stop(row):
        os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(SuiteInterrupted) as info:
        run_suite(suite, out, jobs=1, progress=False, on_row=stop)
    assert isinstance(info.value, KeyboardInterrupt) and info.value.signum == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is previous
    assert len(load_results(out)) == 1  # the row that was written stays
    summary = run_suite(suite, out, jobs=1, progress=False)  # the lock is free again
    assert (summary.skipped, summary.ran, summary.errors) == (1, 2, 0)
    assert signal.getsignal(signal.SIGTERM) is previous
    # Everything the suite writes is written whole: no temporaries are left.
    assert not list(out.glob(".*.tmp"))
    assert (out / "suite.toml").read_text() == suite.text


def test_a_worker_that_dies_costs_one_retry_not_the_suite(tmp_path):
    # A worker killed from outside (as the kernel's out-of-memory killer would)
    # breaks the process pool; its cells run again in a fresh pool.
    import threading

    suite = load_suite(_suite(tmp_path, budget="seconds = 1", seeds=(0, 1, 2, 3)))
    out = tmp_path / "out"
    killed = []

    def kill_a_worker():
        deadline = time.time() + 60
        while time.time() < deadline and not killed:
            workers = [pid for pid in _children(os.getpid())
                       if b"resource_tracker" not in Path(f"/proc/{pid}/cmdline").read_bytes()]
            if workers and _rows(out / "results.csv") == 0:
                time.sleep(1.0)  # let it start a cell
                os.kill(workers[0], signal.SIGKILL)
                killed.append(workers[0])
            time.sleep(0.05)

    thread = threading.Thread(target=kill_a_worker)
    thread.start()
    summary = run_suite(suite, out, jobs=2, progress=False, report=False)
    thread.join()
    assert killed
    frame = load_results(out)
    assert sorted(frame["cell_key"]) == sorted(c.key for c in suite.cells())
    assert (frame["status"] == "ok").all(), frame["error"].tolist()
    assert summary.errors == 0


def test_progress_off_a_terminal_is_one_line_per_cell(tmp_path, capsys):
    suite = load_suite(_suite(tmp_path, budget="steps = 3", seeds=(0, 1)))
    run_suite(suite, tmp_path / "out", progress=True, report=False)
    err = capsys.readouterr().err
    assert "\r" not in err
    lines = [line for line in err.splitlines() if line.startswith("bench stop: cell")]
    assert [line.split(" fa/")[0] for line in lines] == ["bench stop: cell 1/2",
                                                         "bench stop: cell 2/2"]
    assert all(": ok (" in line for line in lines)
