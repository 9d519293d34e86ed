"""The Ray engine of a suite: each cell a Ray task, every row written here.

``pyrovae bench run SUITE --engine ray [--address ADDR]`` hands the cells of
a suite to a Ray cluster instead of this machine's processes. Each cell is
one task that asks for ``threads`` CPUs (its torch threads) and one GPU when
the cell's device is cuda; it runs the runner's ``run_cell`` on whichever
node Ray picks and returns the row. The driver (the process that
runs the suite) alone writes the rows, through the same fsynced,
cell-keyed results file as the local engine, in the order the cells finish:
an interrupted suite resumes the same way, and no row is lost or written
twice.

- Without an address (and without ``$RAY_ADDRESS``) the driver starts a local
  Ray instance for the suite -- no dashboard, a small object store, the
  machine's CPUs or ``jobs * threads`` -- and stops it at the end. Given an
  address it connects to that cluster and only disconnects at the end. A Ray
  connection the calling program already made (``ray.init`` before
  ``run_suite``) is used as it is and left open.
- At most ``jobs`` cells are in flight (submitted and not yet recorded);
  by default as many as the cluster's CPUs can run at once, so few cells are
  lost to an interruption.
- The driver's ``PYROVAE_*`` environment variables (``PYROVAE_DATA`` above
  all) are set in every task, so the workers find the data where the driver
  does; on a cluster that path must exist on every node, and every node needs
  pyrovae installed.
- A cell that fails inside its task records an error row (``run_cell``
  catches the error). A worker process that dies -- killed, out of memory,
  its node lost -- also records an error row, naming Ray's account of the
  death; tasks are not retried (``max_retries=0``), so ``--retry-errors``
  decides whether such a cell runs again.
- Ctrl-C, SIGTERM or SIGHUP stop the driver as they stop a local suite
  (``SuiteInterrupted``): every cell in flight is
  cancelled with ``ray.cancel(force=True)``, which kills its worker process,
  and the finished rows stay. A driver killed outright (SIGKILL) cannot
  cancel anything: a local instance it started dies with it (Ray's own
  fate-sharing of the processes it starts; its two per-node agents linger
  for about a minute, waiting on the dead GCS, then exit), a cluster joined
  by its GCS address ends the dead driver's tasks at once, and one joined
  through ``ray://`` after Ray Client's reconnect grace period (30 s). The
  rerun repeats exactly the cells that have no row.

The runner hands this module what it needs of it (the task a worker runs,
the error row of a dead worker), so this module imports nothing of the
runner's.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from typing import Any, Callable, Dict, Iterator, Mapping, Optional, Sequence

from pyrovae.bench.spec import Cell

RAY_REQUIREMENT = "ray>=2.9"
# Rows are a few kilobytes: the object store of a local instance can be small.
OBJECT_STORE_BYTES = 100 * 1024 * 1024
WAIT_SECONDS = 0.5  # the longest a signal waits for the driver's loop to notice it


class EngineUnavailableError(RuntimeError):
    """The ray engine cannot run: Ray is not installed, or the cluster cannot
    be started or reached. The message is one line saying what to do."""


def require_ray():
    """Import and return ``ray``, or raise :class:`EngineUnavailableError`
    with the line to install it."""
    try:
        import ray
    except ImportError:
        raise EngineUnavailableError(
            "--engine ray needs Ray, which is not installed: "
            f"pip install 'pyrovae[ray]' (or pip install '{RAY_REQUIREMENT}')"
        ) from None
    return ray


def cell_resources(cell: Cell, threads: int) -> Dict[str, float]:
    """What one cell's task asks Ray for: its threads as CPUs, and a GPU
    when the cell runs on cuda."""
    return {"num_cpus": threads, "num_gpus": 1 if cell.device.startswith("cuda") else 0}


@contextlib.contextmanager
def _keep_signal_handlers() -> Iterator[None]:
    """``ray.init`` sets its own SIGTERM handler (``sys.exit``); the suite's
    (SIGTERM stops it like Ctrl-C) must stay in force."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for signum, handler in saved.items():
            if handler is not None:
                signal.signal(signum, handler)


def _connect(ray, address: Optional[str], cpus: Optional[int]) -> bool:
    """Start or join Ray; True when this call did (and so must shut it down)."""
    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS") or None
    options: Dict[str, Any] = dict(logging_level=logging.WARNING)
    if address is None:  # a local instance for this suite alone
        address = "local"  # never an instance that happens to run here already
        options.update(num_cpus=cpus or os.cpu_count() or 1, include_dashboard=False,
                       object_store_memory=OBJECT_STORE_BYTES)
    where = "start a local Ray instance" if address == "local" else f"reach Ray at {address}"
    try:
        with _keep_signal_handlers():
            ray.init(address=address, **options)
    except (KeyboardInterrupt, SystemExit) as err:
        with contextlib.suppress(Exception):
            ray.shutdown()
        if (isinstance(err, SystemExit) and err.code == signal.SIGTERM
                and threading.current_thread() is threading.main_thread()):
            # SIGTERM while Ray started met Ray's own handler (sys.exit), in
            # force until ray.init returned; the handler in force now (the
            # suite's: stop like Ctrl-C) gets the signal after all.
            signal.raise_signal(signal.SIGTERM)
        raise
    except Exception as err:  # noqa: BLE001  (one line for the command, not a traceback)
        with contextlib.suppress(Exception):
            ray.shutdown()
        message = " ".join(str(err).split()) or type(err).__name__
        raise EngineUnavailableError(f"cannot {where}: {message}") from err
    return True


def _describe_death(err: BaseException) -> str:
    """The error column of a cell whose worker died."""
    message = " ".join(str(err).split())
    return f"the Ray worker running this cell died: {type(err).__name__}: {message}".rstrip(": ")


def run_on_ray(
    todo: Sequence[Cell],
    record: Callable[[Dict[str, Any]], None],
    *,
    task: Callable[[Mapping[str, Any], bool, int], Dict[str, Any]],
    error_row: Callable[..., Dict[str, Any]],
    label: Callable[[Cell], str] = lambda cell: cell.key,
    jobs: Optional[int] = None,
    threads: Optional[int] = None,
    fail_fast: bool = False,
    address: Optional[str] = None,
) -> None:
    """Run ``todo`` as Ray tasks, calling ``record`` with each row as it
    comes back (in this process, in the order the cells finish).

    Args:
        todo: the cells to run.
        record: writes one row (the runner's results-file path).
        task: what a worker runs, ``(cell_dict, fail_fast, threads) -> row``;
            a module-level function, so that Ray sends it by name.
        error_row: ``(cell, error, threads=...) -> row`` for a cell whose
            worker died.
        label: a cell's name for Ray's task list.
        jobs: cells in flight at most (default: the cluster's CPUs // threads).
        threads: torch threads, and CPUs asked of Ray, per cell (default 1).
        fail_fast: re-raise the first failure instead of recording it.
        address: the cluster (default ``$RAY_ADDRESS``, else a local instance).
    """
    if not todo:
        return
    ray = require_ray()
    from ray.exceptions import RayError, RayTaskError

    threads = threads or 1
    started = _connect(ray, address, cpus=jobs * threads if jobs else None)
    pending: Dict[Any, Cell] = {}
    finished_normally = False
    try:
        if jobs is None:
            cpus = int(ray.cluster_resources().get("CPU", 1))
            jobs = max(1, cpus // threads)
        env = {k: v for k, v in os.environ.items() if k.startswith("PYROVAE_")}
        remote = ray.remote(task)
        options: Dict[str, Any] = dict(max_retries=0)
        if env:
            options["runtime_env"] = {"env_vars": env}
        queue = list(todo)
        while queue or pending:
            while queue and len(pending) < jobs:
                cell = queue.pop(0)
                ref = remote.options(name=f"pyrovae {label(cell)}", **options,
                                     **cell_resources(cell, threads)).remote(
                    cell.to_dict(), fail_fast, threads)
                pending[ref] = cell
            # A short timeout keeps the loop in Python, where a signal's handler
            # (SIGTERM -> SuiteInterrupted) can run.
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=WAIT_SECONDS)
            for ref in ready:
                cell = pending.pop(ref)
                try:
                    row = ray.get(ref)
                except RayTaskError as err:
                    # The task raised: fail_fast (the local engine re-raises
                    # too), or an error that run_cell does not catch.
                    if fail_fast:
                        raise
                    cause = getattr(err, "cause", None) or err
                    message = " ".join(str(cause).split())
                    row = error_row(cell, f"{type(cause).__name__}: {message}", threads=threads)
                except RayError as err:  # the worker died: killed, OOM, node lost
                    if fail_fast:
                        raise
                    row = error_row(cell, _describe_death(err), threads=threads)
                record(row)
        finished_normally = True
    finally:
        if not finished_normally:
            # Interrupted, or an error here: stop every cell in flight now rather
            # than let it run on with nobody to record it.
            for ref in pending:
                with contextlib.suppress(Exception):
                    ray.cancel(ref, force=True)
        if started:
            with contextlib.suppress(Exception):
                ray.shutdown()
