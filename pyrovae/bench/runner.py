"""Running a suite: one process-safe function per cell, resumable results.

Each cell trains one model and scores it; its row goes to ``results.csv`` the
moment it is done (append, flush, fsync), so an interrupted suite loses only
the cells that were running. A rerun reads the file, skips every cell whose
key is already there and runs the rest. With ``jobs > 1`` cells run in
separate processes (spawn context, each with a fair share of the CPU threads)
while the parent alone writes rows, in the order they finish. With
``engine="ray"`` the cells run as tasks on a Ray cluster instead
(:mod:`pyrovae.bench.ray_engine`); the rows come back to this process and go
through the same results file, so resuming works the same way.

A suite never leaves orphans: workers die with their parent however it dies
(``PR_SET_PDEATHSIG`` on Linux, plus a watchdog thread polling the parent pid
everywhere), and SIGTERM or SIGHUP stop a suite the way Ctrl-C does: the cells
in flight are stopped, the finished rows stay, and a rerun continues. The
output folder is locked (:class:`pyrovae.files.FolderLock`) while a suite
writes to it, so a second ``bench run`` into it fails at once.
"""

from __future__ import annotations

import datetime as _dt
import contextlib
import multiprocessing
import os
import signal
import sys
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Union

import pandas as pd
import pyro
import torch

from pyrovae.bench.report import write_report
from pyrovae.bench.results import (
    NAN,
    RESULT_COLUMNS,
    RESULTS_FILE,
    ResultsFile,
)
from pyrovae.bench.spec import Cell, Suite, canonical_json
from pyrovae.files import FolderLock, remove_stale_temporaries, write_atomic
from pyrovae.pipeline import RunSpec, run, versions

SUITE_COPY = "suite.toml"
ENGINES = ("local", "ray")  # where the cells run: this machine's processes, or a Ray cluster
# Signals that stop a suite the way Ctrl-C does (SIGINT keeps Python's own
# handler, which raises KeyboardInterrupt).
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name))
WATCHDOG_INTERVAL = 0.5  # seconds between a worker's checks that its parent lives


# -- one cell ----------------------------------------------------------------------


def cell_spec(cell: Cell) -> RunSpec:
    """The pipeline spec of a cell: the grid axes become the run's fields."""
    fit: Dict[str, Any] = {}
    if cell.method == "svi":
        budget = cell.budget
        fit = dict(
            elbo=cell.objective, num_particles=cell.num_particles,
            vectorize_particles=cell.vectorize_particles,
            elbo_options=dict(cell.objective_options),
            # Without an epoch budget the step or time budget ends the run.
            epochs=int(budget.get("epochs", 10**9)), max_steps=budget.get("steps"),
            max_seconds=budget.get("seconds"), eval_every=0, progress=False,
            **cell.fit_options,
        )
    return RunSpec(
        model=cell.model, model_options=dict(cell.model_options), dataset=cell.dataset,
        dataset_options=dict(cell.dataset_options), train_split=cell.train_split,
        test_split=cell.test_split, train_size=cell.train_size, test_size=cell.test_size,
        method=cell.method, fit=fit, method_options=dict(cell.method_options), seed=cell.seed,
        eval=cell.eval, metrics=tuple(cell.metrics), device=cell.device, out=None,
    )


def run_cell(cell_dict: Mapping[str, Any], fail_fast: bool = False) -> Dict[str, Any]:
    """Train and score one cell through :func:`pyrovae.pipeline.run`; return
    its results row.

    Takes and returns plain dicts so it can cross a process boundary. Any
    error inside the cell is caught and recorded in the row (``status`` =
    ``"error"``, ``error`` = the message) unless ``fail_fast``: one bad cell
    must not cost the rest of a long suite.
    """
    cell = Cell.from_dict(cell_dict)
    t0 = time.perf_counter()
    row = _start_row(cell)
    notes: List[str] = []
    store = pyro.get_param_store()
    names_before = set(store.keys())
    try:
        result = run(cell_spec(cell), progress=False)
        row.update(result.metrics)
        notes += result.notes
    except Exception as err:  # noqa: BLE001  (the row records the failure; see docstring)
        if fail_fast:
            raise
        row.update(status="error", error=f"{type(err).__name__}: {err}")
    finally:
        # The global param store only holds references to this cell's
        # modules; dropping them lets a worker running many cells free them.
        for name in set(store.keys()) - names_before:
            del store[name]
    return _finish_row(row, wall_seconds=time.perf_counter() - t0,
                       threads=torch.get_num_threads(), notes=notes)


def _ray_task(cell_dict: Mapping[str, Any], fail_fast: bool, threads: int) -> Dict[str, Any]:
    """One cell inside a Ray worker process (the ray engine's task): the
    cell's thread count, then :func:`run_cell`."""
    # As in the local engine's workers: no multiprocessing lock for tqdm, which
    # a worker killed by a cancellation could not release.
    from tqdm.std import tqdm as std_tqdm

    std_tqdm.set_lock(threading.RLock())
    torch.set_num_threads(threads)
    return run_cell(cell_dict, fail_fast)


def error_row(cell: Cell, error: str, *, threads: int, wall_seconds: float = NAN) -> Dict[str, Any]:
    """The row of a cell that could not return one itself: the process that
    ran it died (killed, out of memory, a lost node). ``error`` says why."""
    row = _start_row(cell)
    row.update(status="error", error=error)
    return _finish_row(row, wall_seconds=wall_seconds, threads=threads, notes=[])


def _start_row(cell: Cell) -> Dict[str, Any]:
    return {**cell_columns(cell), **versions(), "status": "ok", "error": "",
            "config": canonical_json(cell.config())}


def _finish_row(row: Dict[str, Any], *, wall_seconds: float, threads: int,
                notes: Sequence[str]) -> Dict[str, Any]:
    row["wall_seconds"] = wall_seconds
    row["threads"] = threads
    row["notes"] = " | ".join(notes)
    row["timestamp"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    return {c: row.get(c, NAN) for c in RESULT_COLUMNS}


def cell_columns(cell: Cell) -> Dict[str, Any]:
    """The identifying columns of a cell's row (options as canonical JSON)."""
    return {
        "suite": cell.suite, "grid": cell.grid, "cell_key": cell.key, "method": cell.method,
        "model": cell.model, "model_options": canonical_json(cell.model_options),
        "guide": cell.guide, "objective": cell.objective, "num_particles": cell.num_particles,
        "objective_options": canonical_json(cell.objective_options), "dataset": cell.dataset,
        "dataset_options": canonical_json(cell.dataset_options),
        "train_size": "" if cell.train_size is None else cell.train_size,
        "test_size": "" if cell.test_size is None else cell.test_size,
        "budget": cell.budget_label, "seed": cell.seed,
        "fit_options": canonical_json(cell.fit_options),
        "method_options": canonical_json(cell.method_options), "device": cell.device,
    }


def cell_label(cell: Cell) -> str:
    what = cell.method if cell.method != "svi" else f"{cell.objective} K={cell.num_particles}"
    return f"{cell.model}/{cell.dataset}/{what}/{cell.budget_label}/seed={cell.seed}"


# -- the suite -------------------------------------------------------------------


@dataclass
class RunSummary:
    """What ``run_suite`` did."""

    out_dir: Path
    results_path: Path
    report_path: Optional[Path]
    cells: int  # cells in the suite
    skipped: int  # already in results.csv
    ran: int  # run now
    errors: int  # of those run now, how many failed
    seconds: float
    results: pd.DataFrame = field(repr=False)


class SuiteInterrupted(KeyboardInterrupt):
    """A suite stopped by a signal; ``signum`` says which (the exit status of
    ``pyrovae bench run`` is 128 + signum: 130 for SIGINT, 143 for SIGTERM)."""

    def __init__(self, signum: int = signal.SIGINT) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = int(signum)


@dataclass
class _Stop:
    signum: Optional[int] = None  # the signal that stopped the suite, if one did


@contextlib.contextmanager
def _stop_on_signals() -> Iterator[_Stop]:
    """Turn SIGTERM and SIGHUP into :class:`SuiteInterrupted` (a
    ``KeyboardInterrupt``) in the main thread for the duration of the block,
    then restore the previous handlers. The first signal raises; later ones
    are ignored so that they cannot cut the cleanup short. Outside the main
    thread Python cannot set handlers and the block runs unchanged. The
    yielded object records the signal: code that turns any
    ``KeyboardInterrupt`` raised inside it into a plain one (Ray's blocking
    calls do) loses the exception's ``signum``, not the record."""
    stop = _Stop()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def handler(signum: int, frame: Any) -> None:
        if stop.signum is not None:
            return
        stop.signum = signum
        raise SuiteInterrupted(signum)

    previous = {}
    try:
        for signum in STOP_SIGNALS:
            previous[signum] = signal.signal(signum, handler)
        yield stop
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old if old is not None else signal.SIG_DFL)


def _die_with_parent(parent: int) -> None:
    """Make this worker process end when ``parent`` does, however it ends.

    On Linux the kernel sends SIGKILL when the parent dies (``PR_SET_PDEATHSIG``).
    That signal fires when the *thread* that started this process exits; in
    Python 3.11 ``ProcessPoolExecutor`` with a non-fork context starts its
    workers from ``submit``, i.e. from the thread that runs the suite (the
    executor's manager thread starts workers only with ``max_tasks_per_child``,
    which the runner does not use), and that thread outlives the pool. The
    watchdog thread below is the portable fallback: it polls the parent pid
    and exits at once when this process has been reparented.
    """
    if sys.platform.startswith("linux"):
        with contextlib.suppress(Exception):
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            PR_SET_PDEATHSIG = 1
            libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    if os.getppid() != parent:  # the parent died before the line above
        os._exit(1)

    def watch() -> None:
        while True:
            time.sleep(WATCHDOG_INTERVAL)
            if os.getppid() != parent:
                os._exit(1)

    threading.Thread(target=watch, name="pyrovae-parent-watchdog", daemon=True).start()


def _init_worker(threads: int, env: Dict[str, str], parent: Optional[int] = None) -> None:
    if parent is not None:
        _die_with_parent(parent)
    # Ctrl-C in a terminal reaches the whole process group; the parent alone
    # decides, and stops the workers itself.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # tqdm would otherwise create a multiprocessing lock (a named semaphore)
    # on a worker's first bar; a worker stopped with its suite cannot release
    # it, and the resource tracker then warns about it on the suite's stderr.
    from tqdm.std import tqdm as std_tqdm

    std_tqdm.set_lock(threading.RLock())
    os.environ.update(env)
    torch.set_num_threads(threads)


def run_suite(
    suite: Suite,
    out_dir: Union[str, Path],
    *,
    jobs: Optional[int] = None,
    engine: str = "local",
    address: Optional[str] = None,
    progress: bool = True,
    retry_errors: bool = False,
    fail_fast: bool = False,
    report: bool = True,
    threads: Optional[int] = None,
    on_row: Optional[Callable[[Dict[str, Any]], None]] = None,
) -> RunSummary:
    """Run every cell of ``suite`` not yet in ``out_dir/results.csv``.

    Args:
        suite: a validated suite (:func:`pyrovae.bench.load_suite`).
        out_dir: results folder; created if missing.
        jobs: cells run at once. Local engine: each in its own spawned
            process with ``cpu_count // jobs`` torch threads; 1 (the
            default) runs them in this process. Ray engine: cells in flight
            on the cluster (default: its CPUs // ``threads``).
        engine: ``"local"`` (this machine) or ``"ray"`` (each cell a Ray task
            asking for ``threads`` CPUs, and a GPU when its device is cuda;
            see :mod:`pyrovae.bench.ray_engine`). Rows are written here, by
            this process alone, either way.
        address: the Ray cluster to use (``ray://HEAD:10001``, ``HEAD:6379``);
            default ``$RAY_ADDRESS``, else a local Ray instance started for
            this suite and stopped at its end. Only with ``engine="ray"``.
        progress: show a progress bar over cells.
        retry_errors: run cells again whose earlier row failed (the newest
            row of a cell wins in reports).
        fail_fast: re-raise the first error instead of recording it.
        report: write ``report.md`` and the plots at the end.
        threads: torch threads per cell (default: ``cpu_count // jobs`` in
            worker processes, unchanged when ``jobs == 1``; 1 on Ray). Timings
            of small models are steadier with 1 on a busy machine.
        on_row: called with each row after it is written.

    Raises:
        pyrovae.files.FolderLockedError: another process writes to ``out_dir``.
        pyrovae.bench.ray_engine.EngineUnavailableError: ``engine="ray"``
            without Ray installed, or a Ray cluster that cannot be reached.
        SuiteInterrupted: SIGTERM or SIGHUP stopped the suite (a
            ``KeyboardInterrupt``, as Ctrl-C raises); the finished rows are
            in ``results.csv`` and a rerun continues from them.
    """
    if jobs is not None and jobs < 1:
        raise ValueError(f"jobs must be >= 1, got {jobs}")
    if threads is not None and threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    if address is not None and engine != "ray":
        raise ValueError("an address is for the ray engine (engine='ray', --engine ray)")
    if engine == "ray":
        from pyrovae.bench.ray_engine import require_ray

        require_ray()  # before anything is written: one line on what to install
    t0 = time.perf_counter()
    out = Path(out_dir)
    with FolderLock(out, what="suite"), _stop_on_signals() as stop:
        try:
            return _run_suite_locked(suite, out, t0, jobs=jobs, engine=engine,
                                     address=address, progress=progress,
                                     retry_errors=retry_errors, fail_fast=fail_fast,
                                     report=report, threads=threads, on_row=on_row)
        except KeyboardInterrupt as err:
            if stop.signum is not None and not isinstance(err, SuiteInterrupted):
                raise SuiteInterrupted(stop.signum) from None
            raise


def _run_suite_locked(suite: Suite, out: Path, t0: float, *, jobs: Optional[int], engine: str,
                      address: Optional[str], progress: bool, retry_errors: bool,
                      fail_fast: bool, report: bool, threads: Optional[int],
                      on_row: Optional[Callable[[Dict[str, Any]], None]]) -> RunSummary:
    """The body of :func:`run_suite`, run holding the folder's lock."""
    from tqdm.auto import tqdm

    remove_stale_temporaries(out)  # half-written files of a killed suite
    if suite.text:
        write_atomic(out / SUITE_COPY, suite.text)
    results = ResultsFile(out / RESULTS_FILE)
    results.repair()
    cells = suite.cells()
    done: Dict[str, str] = {}
    if results.path.exists() and results.path.stat().st_size:
        previous = results.read()
        for key, status in zip(previous["cell_key"], previous["status"]):
            if status == "ok" or key not in done:
                done[key] = status
    todo = [c for c in cells if c.key not in done or (retry_errors and done[c.key] != "ok")]
    errors = 0
    # A bar on a terminal; one line per finished cell in a log file or CI output.
    interactive = progress and sys.stderr.isatty()
    bar = tqdm(total=len(todo), desc=f"bench {suite.name}", unit="cell", disable=not interactive)
    done_now = 0

    def record(row: Dict[str, Any]) -> None:
        nonlocal errors, done_now
        results.append(row)
        errors += row["status"] != "ok"
        done_now += 1
        bar.update(1)
        bar.set_postfix(errors=errors, last=f"{row['model']}/{row['objective'] or row['method']}")
        if progress and not interactive:
            what = row["objective"] or row["method"]
            print(f"bench {suite.name}: cell {done_now}/{len(todo)} {row['model']}/"
                  f"{row['dataset']}/{what} seed={row['seed']}: {row['status']} "
                  f"({row['wall_seconds']:.1f} s)", file=sys.stderr, flush=True)
        if on_row is not None:
            on_row(row)

    previous_threads = torch.get_num_threads()
    try:
        if engine == "ray":
            from pyrovae.bench.ray_engine import run_on_ray

            run_on_ray(todo, record, task=_ray_task, error_row=error_row, label=cell_label,
                       jobs=jobs, threads=threads, fail_fast=fail_fast, address=address)
        elif (jobs or 1) == 1:
            if threads is not None:
                torch.set_num_threads(threads)
            for cell in todo:
                bar.set_description(f"bench {suite.name}: {cell_label(cell)}")
                record(run_cell(cell.to_dict(), fail_fast))
        else:
            _run_parallel(todo, jobs, threads, fail_fast, record)
    finally:
        torch.set_num_threads(previous_threads)
        bar.close()
    report_path = None
    frame = results.read() if results.path.exists() else pd.DataFrame(columns=RESULT_COLUMNS)
    keys = {c.key for c in cells}
    frame = frame[frame["cell_key"].isin(keys)]
    if report and len(frame):
        report_path = write_report(frame, out, suite=suite)
    return RunSummary(
        out_dir=out, results_path=results.path, report_path=report_path, cells=len(cells),
        skipped=len(cells) - len(todo), ran=len(todo), errors=errors,
        seconds=time.perf_counter() - t0, results=frame,
    )


def _run_parallel(todo: Sequence[Cell], jobs: int, threads: Optional[int], fail_fast: bool,
                  record: Callable[[Dict[str, Any]], None]) -> None:
    threads = threads or max(1, (os.cpu_count() or 1) // jobs)
    env = {k: v for k, v in os.environ.items() if k.startswith("PYROVAE_")}

    def new_pool() -> ProcessPoolExecutor:
        return ProcessPoolExecutor(
            max_workers=jobs, mp_context=multiprocessing.get_context("spawn"),
            initializer=_init_worker, initargs=(threads, env, os.getpid()),
        )

    pool = new_pool()
    pending: Dict[Future, Cell] = {}
    died: set = set()  # keys of cells whose worker pool broke once
    queue = list(todo)
    finished_normally = False
    try:
        # Submit only as many cells as there are workers (plus one each), so a
        # stopped suite leaves few started-but-unrecorded cells behind.
        while queue or pending:
            while queue and len(pending) < 2 * jobs:
                cell = queue.pop(0)
                pending[pool.submit(run_cell, cell.to_dict(), fail_fast)] = cell
            finished, _ = wait(list(pending), return_when=FIRST_COMPLETED)
            broken = []
            for fut in finished:
                cell = pending.pop(fut)
                try:
                    row = fut.result()
                except BrokenProcessPool:
                    broken.append(cell)
                    continue
                record(row)
            if broken:
                # A worker died (killed, out of memory) and took the pool with
                # it; which of the cells in flight it held is unknown. Each
                # gets one more try in a fresh pool, and an error row when
                # it breaks a pool again.
                pool.shutdown(wait=True, cancel_futures=True)
                broken += [pending.pop(fut) for fut in list(pending)]
                retry = []
                for cell in broken:
                    if cell.key in died:
                        record(error_row(cell, "the worker process running this cell died "
                                         "(killed, or out of memory?) twice; rerun with "
                                         "--retry-errors", threads=threads))
                    else:
                        died.add(cell.key)
                        retry.append(cell)
                queue = retry + queue
                pool = new_pool()
        finished_normally = True
    finally:
        if not finished_normally:
            # Interrupted (Ctrl-C, an error in the parent): stop the cells in
            # flight now rather than let them run on with nobody to record them.
            processes = list((getattr(pool, "_processes", None) or {}).values())
            for process in processes:
                process.terminate()
            for process in processes:
                process.join(timeout=5)
        # With the workers gone the pool's manager thread ends at once; waiting
        # for it lets the pool release its queues' semaphores before exit.
        pool.shutdown(wait=True, cancel_futures=True)
