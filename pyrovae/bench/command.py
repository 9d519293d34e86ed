"""``pyrovae bench run | compare | report``: the command-line face of the suites.

``add_bench_commands(subparsers)`` adds the ``bench`` command to an argparse
subparsers object and sets ``handler`` on the parsed arguments (a function
of the namespace returning the exit status). ``main(argv)`` runs the same
commands standalone: ``python -m pyrovae.bench.command run SUITE --out DIR``.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path
from typing import List, Optional


def _add_run(sub) -> None:
    p = sub.add_parser(
        "run", help="run a benchmark suite (resumes: finished cells are skipped)",
        description="Run every cell of a suite file, appending one row per finished cell to "
        "OUT/results.csv, then write OUT/report.md and plots. Rerunning with the same OUT "
        "skips the cells already there.",
    )
    p.add_argument("suite", help="suite file (TOML), e.g. benchmarks/quick.toml")
    p.add_argument("--out", required=True, help="results folder")
    p.add_argument("--jobs", type=int, default=None,
                   help="cells run at once: in separate processes (default 1: in this process); "
                   "with --engine ray, cells in flight on the cluster (default: its CPUs / threads)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads per cell (default: cores / jobs for --jobs > 1); with "
                   "--engine ray also the CPUs each cell's task asks for (default 1)")
    p.add_argument("--engine", choices=("local", "ray"), default="local",
                   help="where the cells run: this machine's processes (default), or tasks on a "
                   "Ray cluster (pip install 'pyrovae[ray]'); the rows are written here either way")
    p.add_argument("--address", default=None, metavar="ADDR",
                   help="with --engine ray: the cluster, e.g. ray://HEAD:10001 (default "
                   "$RAY_ADDRESS, else a local Ray instance started and stopped with the suite)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a suite value before validation, e.g. "
                   "grid.budgets=[{epochs=100}] or suite.eval.num_samples=5000 (repeatable)")
    p.add_argument("--data-root", default=None,
                   help="folder with the data sets (sets PYROVAE_DATA for every cell)")
    p.add_argument("--retry-errors", action="store_true", help="run failed cells again")
    p.add_argument("--fail-fast", action="store_true",
                   help="stop at the first failing cell instead of recording the error")
    p.add_argument("--dry-run", action="store_true", help="list the cells and exit")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(handler=_run)


def _add_compare(sub) -> None:
    p = sub.add_parser(
        "compare", help="put two result folders side by side",
        description="Join the seed-averaged metrics of two result folders on their cell "
        "columns; print a markdown table of A, B, B - A and B / A and write it as CSV.",
    )
    p.add_argument("a", help="result folder A (or its results.csv)")
    p.add_argument("b", help="result folder B (or its results.csv)")
    p.add_argument("--out", default=None, help="CSV file to write (default: B/compare.csv)")
    p.add_argument("--ignore", action="append", default=None, metavar="COLUMN",
                   help="cell column left out of the join, e.g. budget (repeatable; default: device)")
    p.add_argument("--metric", action="append", default=None,
                   help="only these metrics (repeatable), e.g. test_elbo")
    p.set_defaults(handler=_compare)


def _add_report(sub) -> None:
    p = sub.add_parser("report", help="write report.md and plots again from a results folder")
    p.add_argument("out", help="results folder")
    p.set_defaults(handler=_report)


def add_bench_commands(subparsers) -> argparse.ArgumentParser:
    """Add ``bench`` (with ``run``, ``compare``, ``report``) to ``subparsers``."""
    bench = subparsers.add_parser(
        "bench", help="benchmark suites: run, compare, report",
        description="Benchmark suites from TOML files (see benchmarks/README.md).",
    )
    sub = bench.add_subparsers(dest="bench_command", required=True)
    _add_run(sub)
    _add_compare(sub)
    _add_report(sub)
    return bench


def _run(args: argparse.Namespace) -> int:
    from pyrovae.bench.ray_engine import EngineUnavailableError
    from pyrovae.bench.runner import cell_label, run_suite
    from pyrovae.bench.spec import load_suite
    from pyrovae.files import FolderLockedError, check_writable

    if args.address is not None and args.engine != "ray":
        print("pyrovae bench: error: --address is for --engine ray", file=sys.stderr)
        return 2
    if args.data_root is not None:
        os.environ["PYROVAE_DATA"] = str(Path(args.data_root).expanduser())
    suite = load_suite(args.suite, args.overrides)
    check_writable(args.out)  # a file, an empty name or a read-only place: refused before running
    if args.dry_run:
        cells = suite.cells()
        for cell in cells:
            print(f"{cell.key}  {cell_label(cell)}")
        print(f"{len(cells)} cells")
        return 0
    try:
        summary = run_suite(
            suite, args.out, jobs=args.jobs, engine=args.engine, address=args.address,
            progress=not args.no_progress, retry_errors=args.retry_errors,
            fail_fast=args.fail_fast, threads=args.threads,
        )
    except (FolderLockedError, EngineUnavailableError) as err:
        print(f"pyrovae bench: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:
        signum = getattr(err, "signum", signal.SIGINT)
        how = "interrupted" if signum == signal.SIGINT else f"stopped by {signal.Signals(signum).name}"
        print(
            f"pyrovae bench: {how}; the finished cells are in {Path(args.out) / 'results.csv'}; "
            "run the same command again to continue",
            file=sys.stderr,
        )
        return 128 + signum
    print(
        f"suite {suite.name}: {summary.cells} cells, {summary.skipped} already done, "
        f"{summary.ran} run now ({summary.errors} failed) in {summary.seconds:.1f} s"
    )
    print(f"results: {summary.results_path}")
    if summary.report_path is not None:
        print(f"report:  {summary.report_path}")
    return 1 if summary.errors else 0


def _compare(args: argparse.Namespace) -> int:
    from pyrovae.bench.compare import COMPARE_METRICS, DEFAULT_IGNORE, compare_results
    from pyrovae.bench.report import to_markdown
    from pyrovae.files import write_atomic

    table = compare_results(
        args.a, args.b, ignore=args.ignore if args.ignore is not None else DEFAULT_IGNORE,
        metrics=args.metric or COMPARE_METRICS,
    )
    b = Path(args.b)
    out = Path(args.out) if args.out else (b if b.is_dir() else b.parent) / "compare.csv"
    write_atomic(out, table.to_csv(index=False))
    print(f"A = {args.a}\nB = {args.b}\n")
    print(to_markdown(table))
    print(f"written: {out}")
    return 0


def _report(args: argparse.Namespace) -> int:
    from pyrovae.bench.report import write_report
    from pyrovae.bench.results import load_results
    from pyrovae.bench.runner import SUITE_COPY
    from pyrovae.bench.spec import load_suite
    from pyrovae.files import FolderLock, FolderLockedError

    suite = None
    copy = Path(args.out) / SUITE_COPY
    if copy.exists():
        try:  # the suite file kept with the results gives the tables their order
            suite = load_suite(copy)
        except ValueError:
            suite = None
    frame = load_results(args.out)
    try:
        with FolderLock(args.out, what="suite"):  # not while a suite writes there
            path = write_report(frame, args.out, suite=suite)
    except FolderLockedError as err:
        print(f"pyrovae bench: error: {err}", file=sys.stderr)
        return 2
    print(f"report: {path}")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    """Standalone entry point: ``python -m pyrovae.bench.command run ...``."""
    parser = argparse.ArgumentParser(prog="pyrovae bench")
    sub = parser.add_subparsers(dest="command", required=True)
    add_bench_commands(sub)
    # Accept both "bench run ..." and "run ...".
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] != "bench":
        argv = ["bench", *argv]
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"pyrovae bench: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
