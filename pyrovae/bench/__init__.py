"""Benchmark suites: TOML grids of model x guide x objective x data x budget x
seed, run resumably (optionally in parallel), reported as tables and plots.

See ``benchmarks/README.md`` for the file format and the shipped suites.
"""

from pyrovae.bench.compare import compare_results
from pyrovae.bench.report import summarize, write_report
from pyrovae.bench.results import RESULT_COLUMNS, load_results
from pyrovae.bench.runner import RunSummary, run_cell, run_suite
from pyrovae.bench.spec import Cell, EvalSettings, Grid, SpecError, Suite, load_suite, parse_suite

__all__ = [
    "Cell",
    "EvalSettings",
    "Grid",
    "RESULT_COLUMNS",
    "RunSummary",
    "SpecError",
    "Suite",
    "compare_results",
    "load_results",
    "load_suite",
    "parse_suite",
    "run_cell",
    "run_suite",
    "summarize",
    "write_report",
]
