"""The results file of a benchmark suite: its fixed schema and its I/O.

``results.csv`` has one row per cell run, in the fixed column order below; it
only ever grows by whole, fsynced rows, so an interrupted suite loses only the
cells that were running. The runner writes it, the report and the comparison
read it; this module imports neither of them.
"""

from __future__ import annotations

import csv
import io
import math
import os
from pathlib import Path
from typing import Any, Mapping, Union

import pandas as pd

from pyrovae.files import fsync_folder

RESULTS_FILE = "results.csv"

# Fixed column order of results.csv: a file only ever grows by whole rows of
# this schema, so rows from earlier runs stay byte-for-byte unchanged.
CELL_COLUMNS = [
    "suite", "grid", "cell_key", "method", "model", "model_options", "guide", "objective",
    "num_particles", "objective_options", "dataset", "dataset_options", "train_size",
    "test_size", "budget", "seed", "fit_options", "method_options", "device",
]
METRIC_COLUMNS = [
    "steps", "epochs", "train_seconds", "wall_seconds", "ms_per_step",
    "n_train", "n_test", "n_eval",
    "train_elbo", "train_exact", "test_elbo", "test_elbo_se", "test_iwae", "test_iwae_se",
    "num_samples", "test_exact", "test_exact_se", "test_objective",
    "elbo_gap", "iwae_gap", "objective_gap",
    "grad_encoder_snr", "grad_decoder_snr", "grad_encoder_var", "grad_decoder_var",
    "grad_draws", "test_predictive",
    "grad_init_encoder_snr", "grad_init_decoder_snr", "grad_init_encoder_var",
    "grad_init_decoder_var",
    "active_units", "latent_kl", "approximation_gap", "amortization_gap",
]
INFO_COLUMNS = [
    "status", "error", "notes", "threads", "pyrovae_version", "torch_version", "pyro_version",
    "timestamp", "config",
]
RESULT_COLUMNS = CELL_COLUMNS + METRIC_COLUMNS + INFO_COLUMNS
NAN = float("nan")


def _format(value: Any) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else repr(value)
    if isinstance(value, str):
        # One row per line, always: a newline inside an error message would
        # otherwise make the file unreadable by line-based tools.
        return value.replace("\r", " ").replace("\n", " | ")
    return str(value)


class ResultsFile:
    """``results.csv``, written one complete, fsynced row at a time."""

    def __init__(self, path: Union[str, Path]) -> None:
        self.path = Path(path)

    def repair(self) -> None:
        """Drop a half-written last line left by a process killed mid-write."""
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        if data and not data.endswith(b"\n"):
            with open(self.path, "r+b") as f:
                f.truncate(data.rfind(b"\n") + 1)
                f.flush()
                os.fsync(f.fileno())

    def _check_header(self) -> bool:
        """True when the file already has our header."""
        if not self.path.exists() or self.path.stat().st_size == 0:
            return False
        with open(self.path, newline="") as f:
            header = next(csv.reader(f), None)
        if header != RESULT_COLUMNS:
            raise ValueError(
                f"{self.path} was written with other columns than this version of pyrovae "
                "writes; use a new --out folder (or move the old results away)"
            )
        return True

    def append(self, row: Mapping[str, Any]) -> None:
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        new = not self._check_header()
        if new:
            writer.writerow(RESULT_COLUMNS)
        writer.writerow([_format(row.get(c, NAN)) for c in RESULT_COLUMNS])
        with open(self.path, "a", newline="") as f:
            f.write(buf.getvalue())
            f.flush()
            os.fsync(f.fileno())
        if new:  # the file's name in its folder must survive a crash too
            fsync_folder(self.path.parent)

    def read(self) -> pd.DataFrame:
        return load_results(self.path)


def load_results(path: Union[str, Path]) -> pd.DataFrame:
    """Read a results file (or the ``results.csv`` in a folder).

    Text columns keep empty strings (not NaN), so grouping by them works.
    """
    path = Path(path)
    if path.is_dir():
        path = path / RESULTS_FILE
    if not path.exists():
        raise FileNotFoundError(f"no benchmark results at {path}")
    text_columns = [c for c in CELL_COLUMNS + INFO_COLUMNS
                    if c not in ("num_particles", "seed", "threads")]
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):  # a row cut off by a kill is not a result
        data = data[: data.rfind(b"\n") + 1]
    frame = pd.read_csv(io.BytesIO(data), dtype={c: str for c in text_columns},
                        keep_default_na=False, na_values={c: ["nan", "NaN", ""] for c in METRIC_COLUMNS})
    for c in ("train_size", "test_size"):
        frame[c] = pd.to_numeric(frame[c], errors="coerce")
    return frame
