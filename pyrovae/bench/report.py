"""Benchmark reports: summary tables (pandas) and plots (PNG, matplotlib Agg).

The summary groups rows by every cell column except the seed and reports the
mean and standard deviation over seeds of each metric. ``write_report``
renders it as ``report.md`` (one table per model and data set), saves the
numbers as ``summary.csv`` and draws the plots the data supports: held-out
ELBO and log-likelihood per objective, bias against the exact likelihood,
gradient signal-to-noise ratio against the number of particles K, and time
per step.
"""

from __future__ import annotations

import datetime as _dt
import functools
import json
import math
from pathlib import Path
from typing import Any, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np
import pandas as pd

from pyrovae.bench.results import CELL_COLUMNS, METRIC_COLUMNS
from pyrovae.files import atomic_path, write_atomic

# Columns that identify a group of cells differing only by seed.
GROUP_COLUMNS = [
    c for c in CELL_COLUMNS if c not in ("suite", "grid", "cell_key", "seed")
]
# Metrics shown in report tables, with their headers, in order.
TABLE_METRICS = [
    ("steps", "steps"),
    ("ms_per_step", "ms/step"),
    ("train_elbo", "train ELBO"),
    ("train_exact", "train exact LL"),
    ("test_elbo", "test ELBO"),
    ("test_iwae", "test IS-LL"),
    ("test_exact", "test exact LL"),
    ("test_predictive", "test predictive LL"),
    ("test_objective", "test objective"),
    ("elbo_gap", "ELBO - exact"),
    ("iwae_gap", "IS-LL - exact"),
    ("objective_gap", "objective - exact"),
    ("grad_encoder_snr", "enc SNR"),
    ("grad_decoder_snr", "dec SNR"),
    ("grad_encoder_var", "enc grad var"),
    ("grad_decoder_var", "dec grad var"),
    ("grad_init_encoder_snr", "enc SNR at init"),
    ("grad_init_decoder_snr", "dec SNR at init"),
]
SUMMARY_METRICS = [c for c in METRIC_COLUMNS if c not in ("grad_draws", "num_samples")]


# -- labels -------------------------------------------------------------------------


def _options_text(options_json: str) -> str:
    try:
        options = json.loads(options_json) if options_json else {}
    except json.JSONDecodeError:
        return options_json
    return ", ".join(f"{k}={json.dumps(v, separators=(',', ':'))}" for k, v in options.items())


def model_label(row: pd.Series) -> str:
    opts = json.loads(row["model_options"] or "{}")
    opts.pop("encoder", None)  # shown as the guide
    text = ", ".join(f"{k}={json.dumps(v, separators=(',', ':'))}" for k, v in opts.items())
    return f"{row['model']}({text})" if text else str(row["model"])


def dataset_label(row: pd.Series) -> str:
    text = _options_text(row["dataset_options"])
    sizes = []
    for col in ("train_size", "test_size"):
        v = row.get(col)
        if v is not None and not (isinstance(v, float) and math.isnan(v)) and v != "":
            sizes.append(f"{col.split('_')[0]}={int(float(v))}")
    inner = ", ".join([s for s in (text, ", ".join(sizes)) if s])
    return f"{row['dataset']}({inner})" if inner else str(row["dataset"])


# Objective options that change how a bound is computed, not which one.
UNLABELLED_OPTIONS = ("max_plate_nesting",)


def objective_label(row: pd.Series, with_k: bool = True) -> str:
    if row["method"] != "svi":
        return {"em": "EM", "sklearn": "scikit-learn"}.get(row["method"], row["method"])
    options = json.loads(row["objective_options"] or "{}")
    for key in UNLABELLED_OPTIONS:
        options.pop(key, None)
    text = _options_text(json.dumps(options))
    name = f"{row['objective']}({text})" if text else str(row["objective"])
    return f"{name} K={int(row['num_particles'])}" if with_k else name


def add_labels(frame: pd.DataFrame) -> pd.DataFrame:
    """A copy of ``frame`` with the display labels the tables and plots group by:
    ``model_label``, ``dataset_label``, ``objective_label``, ``objective_family``
    and ``panel`` (model on data set)."""
    frame = frame.copy()
    if frame.empty:
        for c in ("model_label", "dataset_label", "objective_label", "objective_family", "panel"):
            frame[c] = pd.Series(dtype=str)
        return frame
    frame["model_label"] = frame.apply(model_label, axis=1)
    frame["dataset_label"] = frame.apply(dataset_label, axis=1)
    frame["objective_label"] = frame.apply(objective_label, axis=1)
    frame["objective_family"] = frame.apply(lambda r: objective_label(r, with_k=False), axis=1)
    frame["panel"] = frame["model_label"] + " on " + frame["dataset_label"]
    return frame


# -- tables -------------------------------------------------------------------------


def latest_rows(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per cell: the last one written (a retried cell's newest run)."""
    return frame.drop_duplicates("cell_key", keep="last")


def summarize(frame: pd.DataFrame, group_columns: Sequence[str] = GROUP_COLUMNS) -> pd.DataFrame:
    """Mean and standard deviation over seeds of every metric.

    Returns one row per group of cells that differ only by seed, with the
    group columns, ``n_seeds``, and ``<metric>_mean`` / ``<metric>_std``
    columns (std is NaN for a single seed).
    """
    ok = latest_rows(frame)
    ok = ok[ok["status"] == "ok"]
    group_columns = list(group_columns)
    if ok.empty:
        cols = group_columns + ["n_seeds"] + [f"{m}_{s}" for m in SUMMARY_METRICS for s in ("mean", "std")]
        return pd.DataFrame(columns=cols)
    values = ok[SUMMARY_METRICS].apply(pd.to_numeric, errors="coerce")
    values[group_columns] = ok[group_columns]
    grouped = values.groupby(group_columns, dropna=False, sort=False)
    mean = grouped[SUMMARY_METRICS].mean().add_suffix("_mean")
    std = grouped[SUMMARY_METRICS].std(ddof=1).add_suffix("_std")
    count = grouped.size().rename("n_seeds")
    out = pd.concat([count, mean, std], axis=1).reset_index()
    ordered = group_columns + ["n_seeds"] + [f"{m}_{s}" for m in SUMMARY_METRICS for s in ("mean", "std")]
    return out[ordered]


def _decimals(v: float) -> Optional[int]:
    """Decimals shown for ``v`` (None: use 3 significant digits instead)."""
    a = abs(v)
    if a == 0 or (a >= 1e-3 and a < 1e5):
        return 1 if a >= 100 else 3 if a >= 1 else 4
    return None


def _fmt(v: Any, decimals: Optional[int] = -1) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    if isinstance(v, (float, np.floating)):
        v = float(v)
        if decimals == -1:
            if v.is_integer() and abs(v) < 1e6:
                return str(int(v))
            decimals = _decimals(v)
        return f"{v:.3g}" if decimals is None else f"{v:.{decimals}f}"
    return str(v)


def _mean_sd(mean: float, sd: float) -> str:
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return ""
    if sd is None or (isinstance(sd, float) and math.isnan(sd)) or sd == 0:
        return _fmt(mean)
    # The spread is shown to the precision of the mean it qualifies.
    decimals = 1 if float(mean).is_integer() else _decimals(float(mean))
    return f"{_fmt(mean, decimals)} ± {_fmt(sd, decimals)}"


def to_markdown(frame: pd.DataFrame) -> str:
    """A GitHub-flavoured markdown table; numbers right-aligned."""
    if frame.empty:
        return "(no rows)\n"
    header = [str(c) for c in frame.columns]
    rows = [[_fmt(v) for v in row] for row in frame.itertuples(index=False)]
    numeric = [pd.api.types.is_numeric_dtype(frame[c]) for c in frame.columns]
    esc = lambda s: s.replace("|", "\\|")  # noqa: E731
    lines = ["| " + " | ".join(esc(h) for h in header) + " |",
             "| " + " | ".join("---:" if n else "---" for n in numeric) + " |"]
    lines += ["| " + " | ".join(esc(c) for c in r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def results_table(summary: pd.DataFrame) -> pd.DataFrame:
    """Display table: labels plus "mean ± sd" text for each metric with data."""
    if summary.empty:
        return pd.DataFrame()
    labelled = add_labels(summary)
    table = pd.DataFrame({
        "objective": labelled["objective_family"],
        "K": [int(k) if m == "svi" else "" for k, m in zip(labelled["num_particles"], labelled["method"])],
        "guide": labelled["guide"],
        "budget": labelled["budget"],
        "seeds": labelled["n_seeds"].astype(int),
    })
    for metric, header in TABLE_METRICS:
        mean, sd = labelled[f"{metric}_mean"], labelled[f"{metric}_std"]
        if mean.notna().any():
            table[header] = [_mean_sd(m, s) for m, s in zip(mean, sd)]
    if (table["guide"] == "").all():
        table = table.drop(columns="guide")
    return table


# -- plots --------------------------------------------------------------------------


def _grid_axes(n: int, width: float = 5.0, height: float = 3.6):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ncols = min(3, n)
    nrows = math.ceil(n / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(width * ncols, height * nrows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, list(axes.flat[:n])


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    try:
        # Written beside the target and renamed over it: a report is never
        # seen, or left by a kill, half-drawn. The temporary name hides the
        # format from matplotlib, so it is named.
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=110, format=Path(path).suffix.lstrip(".") or "png")
    finally:
        plt.close(fig)
    return path


def _legend(ax, size: int) -> None:
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=size)


def _k_axis(ax, ks: Iterable[Any]) -> None:
    """Log-scaled K axis with plain tick labels at the K values used."""
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    ticks = sorted({int(k) for k in ks})
    ax.set_xscale("log")
    if ticks:
        ax.set_xticks(ticks)
        ax.set_xlim(ticks[0] / 1.5, ticks[-1] * 1.5)
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_formatter(NullFormatter())


def _finite(frame: pd.DataFrame, column: str) -> pd.DataFrame:
    """Rows where ``column`` is finite (an exact zero-variance gradient has SNR inf)."""
    return frame[np.isfinite(pd.to_numeric(frame[column], errors="coerce"))]


def _short(text: str, n: int = 60) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


def plot_heldout(summary: pd.DataFrame, path: Path) -> Optional[Path]:
    """Held-out log-likelihood (exact, else importance-sampled) and ELBO per
    objective, one panel per model, data set and budget; bars are ± 1 sd over seeds."""
    s = add_labels(summary)
    metrics = ["test_elbo", "test_exact", "test_iwae", "test_predictive"]
    if s.empty or not any(s[f"{m}_mean"].notna().any() for m in metrics):
        return None
    panels = list(dict.fromkeys(s["panel"] + " | " + s["budget"]))
    fig, axes = _grid_axes(len(panels), width=5.5, height=4.0)
    for ax, panel in zip(axes, panels):
        d = s[(s["panel"] + " | " + s["budget"]) == panel].reset_index(drop=True)
        x = np.arange(len(d))
        series = [("test_exact", "exact log-lik", "o"), ("test_predictive", "predictive log-lik", "^"),
                  ("test_iwae", "IS log-lik", "D"), ("test_elbo", "ELBO", "s")]
        for offset, (metric, name, marker) in zip((-0.24, -0.08, 0.08, 0.24), series):
            mean, sd = d[f"{metric}_mean"], d[f"{metric}_std"].fillna(0.0)
            if mean.notna().any():
                ax.errorbar(x + offset, mean, yerr=sd, fmt=marker, capsize=3, label=name)
        ax.set_xticks(x)
        ax.set_xticklabels(d["objective_label"], rotation=60, ha="right", fontsize=7)
        ax.set_ylabel("nats per data point (higher is better)")
        ax.ticklabel_format(axis="y", useOffset=False)
        ax.set_title(_short(panel), fontsize=8)
        ax.grid(alpha=0.3)
        _legend(ax, 7)
    return _save(fig, path)


def _by_k_panels(s: pd.DataFrame, columns: Sequence[str]) -> List[Tuple[str, pd.DataFrame]]:
    s = s[s["method"] == "svi"]
    s = s[s[[f"{c}_mean" for c in columns]].notna().any(axis=1)]
    return [(p, s[(s["panel"] + " | " + s["budget"]) == p])
            for p in dict.fromkeys(s["panel"] + " | " + s["budget"])]


def plot_snr(summary: pd.DataFrame, path: Path, prefix: str = "grad") -> Optional[Path]:
    """Mean gradient SNR of the encoder (left) and decoder (right) parameters
    against the number of particles K, one line per objective and one row per
    model, data set and budget; ``prefix="grad_init"`` plots the statistics at
    the initial parameters. Infinite SNRs (exact, zero-variance gradients)
    are left out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = add_labels(summary)
    if s.empty:
        return None
    columns = [f"{prefix}_encoder_snr", f"{prefix}_decoder_snr"]
    where = "initial" if prefix == "grad_init" else "trained"
    rows = []
    for panel, d in _by_k_panels(s, columns):
        finite = {c: _finite(d, f"{c}_mean") for c in columns}
        finite = {c: f[f[f"{c}_mean"] > 0] for c, f in finite.items()}
        if any(len(f) for f in finite.values()):
            rows.append((panel, finite))
    if not rows:
        return None
    fig, axes = plt.subplots(len(rows), 2, figsize=(11, 3.6 * len(rows)), squeeze=False)
    for (panel, finite), pair in zip(rows, axes):
        families = list(dict.fromkeys(pd.concat(list(finite.values()))["objective_family"]))
        for ax, column in zip(pair, columns):
            part = "encoder" if "encoder" in column else "decoder"
            for i, family in enumerate(families):
                g = finite[column][finite[column]["objective_family"] == family]
                g = g.sort_values("num_particles")
                if len(g):
                    ax.errorbar(g["num_particles"], g[f"{column}_mean"],
                                yerr=g[f"{column}_std"].fillna(0.0), fmt="o-",
                                color=f"C{i % 10}", capsize=2, label=family)
            _k_axis(ax, pd.concat(list(finite.values()))["num_particles"])
            if ax.get_legend_handles_labels()[0]:
                ax.set_yscale("log")
            ax.set_xlabel("particles K")
            ax.set_ylabel(f"mean {part} gradient SNR")
            if not ax.get_legend_handles_labels()[0]:
                ax.text(0.5, 0.5, f"no {part} parameters", ha="center", va="center",
                        transform=ax.transAxes)
            ax.set_title(_short(f"{part}, {where} parameters: {panel}", 75), fontsize=8)
            ax.grid(alpha=0.3, which="both")
        handles, labels = pair[0].get_legend_handles_labels()
        more_h, more_l = pair[1].get_legend_handles_labels()
        for h, lab in zip(more_h, more_l):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
        pair[1].legend(handles, labels, fontsize=6, loc="center left", bbox_to_anchor=(1.02, 0.5))
    return _save(fig, path)


def plot_bias(summary: pd.DataFrame, path: Path) -> Optional[Path]:
    """Bias against the exact held-out log-likelihood: the trained objective's
    own value (solid) and the ELBO (dotted) minus exact, against K."""
    s = add_labels(summary)
    panels = _by_k_panels(s, ["objective_gap", "elbo_gap"]) if not s.empty else []
    if not panels:
        return None
    fig, axes = _grid_axes(len(panels), width=8.0)
    for ax, (panel, d) in zip(axes, panels):
        for i, (family, g) in enumerate(d.groupby("objective_family", sort=False)):
            g = g.sort_values("num_particles")
            color = f"C{i % 10}"
            if g["objective_gap_mean"].notna().any():
                ax.errorbar(g["num_particles"], g["objective_gap_mean"],
                            yerr=g["objective_gap_std"].fillna(0.0), fmt="o-", color=color,
                            capsize=2, label=f"{family}: objective")
            if g["elbo_gap_mean"].notna().any():
                ax.plot(g["num_particles"], g["elbo_gap_mean"], "x:", color=color,
                        label=f"{family}: ELBO")
        ax.axhline(0.0, color="k", lw=0.8)
        _k_axis(ax, d["num_particles"])
        ax.set_xlabel("particles K")
        ax.set_ylabel("estimate - exact log-lik (nats)")
        ax.set_title(_short(panel), fontsize=8)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    return _save(fig, path)


def plot_time(summary: pd.DataFrame, path: Path) -> Optional[Path]:
    """Milliseconds per training step per objective (± 1 sd over seeds)."""
    s = add_labels(summary)
    if s.empty or not s["ms_per_step_mean"].notna().any():
        return None
    s = s[s["ms_per_step_mean"].notna()]
    panels = list(dict.fromkeys(s["panel"]))
    fig, axes = _grid_axes(len(panels), width=5.5, height=4.0)
    for ax, panel in zip(axes, panels):
        d = s[s["panel"] == panel].drop_duplicates("objective_label").reset_index(drop=True)
        y = np.arange(len(d))
        ax.barh(y, d["ms_per_step_mean"], xerr=d["ms_per_step_std"].fillna(0.0), capsize=2)
        ax.set_yticks(y)
        ax.set_yticklabels(d["objective_label"], fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel("ms per step")
        ax.set_title(_short(panel), fontsize=8)
        ax.grid(alpha=0.3, axis="x")
    return _save(fig, path)


PLOTS = {
    "heldout.png": (plot_heldout, "Held-out log-likelihood and ELBO per objective"),
    "bias.png": (plot_bias, "Bias against the exact log-likelihood"),
    "gradient_snr.png": (plot_snr, "Gradient signal-to-noise ratio against K, at the trained parameters"),
    "gradient_snr_init.png": (functools.partial(plot_snr, prefix="grad_init"),
                              "Gradient signal-to-noise ratio against K, at the initial parameters"),
    "time_per_step.png": (plot_time, "Time per training step"),
}


# -- the report ---------------------------------------------------------------------


def write_report(
    frame: pd.DataFrame,
    out_dir: Union[str, Path],
    suite: Any = None,
) -> Path:
    """Write ``report.md``, ``summary.csv`` and the plots into ``out_dir``.

    Args:
        frame: rows of ``results.csv`` (see :func:`pyrovae.bench.load_results`).
        out_dir: destination folder.
        suite: the :class:`~pyrovae.bench.spec.Suite` they came from, for the
            header (optional).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = latest_rows(frame)
    if suite is not None:
        # Tables follow the suite file's order, not the order cells finished in.
        rank = {cell.key: i for i, cell in enumerate(suite.cells())}
        rows = rows.assign(_rank=rows["cell_key"].map(rank)).sort_values(
            "_rank", kind="stable", na_position="last").drop(columns="_rank")
    summary = summarize(rows)
    write_atomic(out / "summary.csv", summary.to_csv(index=False))
    name = getattr(suite, "name", None) or (rows["suite"].iloc[0] if len(rows) else "benchmark")
    ok = int((rows["status"] == "ok").sum())
    failed = rows[rows["status"] != "ok"]
    lines = [f"# Benchmark report: {name}", ""]
    if getattr(suite, "description", ""):
        lines += [suite.description.strip(), ""]
    versions = rows[["pyrovae_version", "torch_version", "pyro_version"]].drop_duplicates()
    lines += [
        f"- cells: {len(rows)} ({ok} finished, {len(failed)} failed)",
        f"- seeds per group: {', '.join(str(n) for n in sorted(set(summary['n_seeds'])))}"
        if len(summary) else "- seeds per group: none",
        "- versions: " + "; ".join(
            f"pyrovae {v.pyrovae_version}, torch {v.torch_version}, pyro {v.pyro_version}"
            for v in versions.itertuples()
        ),
        f"- total training time: {pd.to_numeric(rows['train_seconds'], errors='coerce').sum():.1f} s, "
        f"wall time of the cells: {pd.to_numeric(rows['wall_seconds'], errors='coerce').sum():.1f} s",
        f"- written: {_dt.datetime.now(_dt.timezone.utc).isoformat(timespec='seconds')}",
    ]
    if suite is not None and getattr(suite, "source", None):
        lines.append(f"- suite file: `{suite.source}`")
    if suite is not None and getattr(suite, "overrides", None):
        lines.append("- overrides: " + ", ".join(f"`{o}`" for o in suite.overrides))
    if getattr(suite, "eval", None) is not None:
        ev = suite.eval
        lines.append(
            f"- evaluation: {ev.max_points} held-out points, importance-sampled log-likelihood "
            f"with K={ev.num_samples}, gradient statistics from {ev.grad_draws} draws on a "
            f"fixed held-out batch of {ev.grad_batch}"
        )
    lines += [
        "",
        "All log-likelihoods and ELBOs are in nats per data point (higher is better), "
        "shown as mean ± standard deviation over seeds. *test objective* is the "
        "trained objective's own estimate on held-out data (for IWAE with K particles, "
        "the K-sample bound); the three *- exact* columns are biases against the exact "
        "log-likelihood where the model has one.",
        "",
        "## Results",
        "",
    ]
    labelled = add_labels(summary)
    for panel in dict.fromkeys(labelled["panel"]):
        part = summary[(labelled["panel"] == panel).to_numpy()]
        lines += [f"### {panel}", "", to_markdown(results_table(part)), ""]
    plots = []
    for filename, (draw, title) in PLOTS.items():
        written = draw(summary, out / filename) if len(summary) else None
        if written is None and (out / filename).exists():
            (out / filename).unlink()  # a stale plot from other rows would mislead
        if written is not None:
            plots.append((filename, title))
    if plots:
        lines += ["## Plots", ""]
        for filename, title in plots:
            lines += [f"### {title}", "", f"![{title}]({filename})", ""]
    if len(failed):
        lines += ["## Failed cells", ""]
        table = add_labels(failed)[["cell_key", "panel", "objective_label", "budget", "seed", "error"]]
        lines += [to_markdown(table), ""]
    return write_atomic(out / "report.md", "\n".join(lines))
