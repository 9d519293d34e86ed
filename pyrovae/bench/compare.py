"""Two result folders side by side.

Both are summarized over seeds (see :func:`pyrovae.bench.report.summarize`)
and joined on the cell columns; for every metric the result gives the mean in
A, the mean in B, their difference B - A and ratio B / A. Typical uses: the
same suite before and after a code change, on two machines, or at two budgets
(``ignore=["budget"]``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, List, Sequence, Union

import numpy as np
import pandas as pd

from pyrovae.bench.report import GROUP_COLUMNS, SUMMARY_METRICS, add_labels, summarize
from pyrovae.bench.results import load_results

# The device is left out of the join by default: comparing a CPU run with a
# GPU run of the same suite is a main use.
DEFAULT_IGNORE = ("device",)
COMPARE_METRICS = [m for m in SUMMARY_METRICS if m not in ("n_train", "n_test", "n_eval", "epochs")]


def compare_results(
    a: Union[str, Path, pd.DataFrame],
    b: Union[str, Path, pd.DataFrame],
    *,
    ignore: Iterable[str] = DEFAULT_IGNORE,
    metrics: Sequence[str] = COMPARE_METRICS,
) -> pd.DataFrame:
    """Metric means of two result sets, joined on the cell columns.

    Args:
        a, b: result folders, ``results.csv`` files, or frames of their rows.
        ignore: cell columns left out of the join (their values may differ
            between A and B); must be among the cell columns.
        metrics: metrics to compare; those with no value in A nor B are dropped.

    Returns:
        Long table, one row per (group, metric): labels (``model``,
        ``dataset``, ``objective``, ``K``, ``budget``, ...), ``metric``,
        ``a``, ``b``, ``diff`` (= b - a), ``ratio`` (= b / a), ``n_seeds_a``,
        ``n_seeds_b``. Groups present on one side only get NaN on the other.
    """
    ignore = list(ignore)
    unknown = [c for c in ignore if c not in GROUP_COLUMNS]
    if unknown:
        raise ValueError(f"cannot ignore {unknown}: not cell columns; choose from {GROUP_COLUMNS}")
    frames = [x if isinstance(x, pd.DataFrame) else load_results(x) for x in (a, b)]
    on = [c for c in GROUP_COLUMNS if c not in ignore]
    sa, sb = (summarize(f, on) for f in frames)
    for s in (sa, sb):
        for c in on:
            if s[c].dtype == object:
                s[c] = s[c].fillna("")
    merged = sa.merge(sb, on=on, how="outer", suffixes=("_a", "_b"), sort=False)
    labelled = add_labels(merged.assign(**{c: "" for c in GROUP_COLUMNS if c not in on}))
    rows: List[pd.DataFrame] = []
    for metric in metrics:
        va, vb = merged[f"{metric}_mean_a"], merged[f"{metric}_mean_b"]
        if not (va.notna().any() or vb.notna().any()):
            continue
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = vb / va.where(va != 0)
        rows.append(pd.DataFrame({
            "model": labelled["model_label"],
            "dataset": labelled["dataset_label"],
            "method": merged["method"],
            "objective": labelled["objective_family"],
            "K": merged["num_particles"],
            "budget": merged["budget"] if "budget" in merged else "",
            "metric": metric,
            "a": va, "b": vb, "diff": vb - va, "ratio": ratio,
            "n_seeds_a": merged["n_seeds_a"], "n_seeds_b": merged["n_seeds_b"],
        }))
    columns = ["model", "dataset", "method", "objective", "K", "budget", "metric", "a", "b",
               "diff", "ratio", "n_seeds_a", "n_seeds_b"]
    if not rows:
        return pd.DataFrame(columns=columns)
    return pd.concat(rows, ignore_index=True)[columns]
