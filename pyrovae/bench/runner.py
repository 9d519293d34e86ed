"""Running a suite: one process-safe function per cell, resumable results.

Each cell trains one model and scores it; its row goes to ``results.csv`` the
moment it is done (append, flush, fsync), so an interrupted suite loses only
the cells that were running. A rerun reads the file, skips every cell whose
key is already there and runs the rest. With ``jobs > 1`` cells run in
separate processes (spawn context, each with a fair share of the CPU threads)
while the parent alone writes rows, in the order they finish.
"""

from __future__ import annotations

import csv
import datetime as _dt
import functools
import io
import json
import math
import multiprocessing
import os
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import pandas as pd
import pyro
import torch

from pyrovae.bench.spec import Cell, Suite, sklearn_estimator, canonical_json

RESULTS_FILE = "results.csv"
SUITE_COPY = "suite.toml"

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
]
INFO_COLUMNS = [
    "status", "error", "notes", "threads", "pyrovae_version", "torch_version", "pyro_version",
    "timestamp", "config",
]
RESULT_COLUMNS = CELL_COLUMNS + METRIC_COLUMNS + INFO_COLUMNS
NAN = float("nan")


# -- one cell ----------------------------------------------------------------------


@functools.lru_cache(maxsize=16)
def _load_split(name: str, split: str, options_json: str) -> Any:
    """Data sets are read once per process: MNIST takes a second or two."""
    from pyrovae.data import load_dataset

    return load_dataset(name, split=split, **json.loads(options_json))


def _load_data(cell: Cell) -> Tuple[Any, Any]:
    options = canonical_json(cell.dataset_options)
    train = _load_split(cell.dataset, cell.train_split, options)
    test = _load_split(cell.dataset, cell.test_split, options)
    if cell.train_size is not None:
        train = train.subset(cell.train_size)
    if cell.test_size is not None:
        test = test.subset(cell.test_size)
    if cell.device != "cpu":
        train, test = train.to(cell.device), test.to(cell.device)
    return train, test


def _versions() -> Dict[str, str]:
    import pyrovae  # the package imports this module's package: import late

    return {
        "pyrovae_version": getattr(pyrovae, "__version__", "unknown"),
        "torch_version": torch.__version__,
        "pyro_version": pyro.__version__,
    }


def _build_model(cell: Cell, x_dim: int, num_data: int) -> Any:
    from pyrovae.bench.spec import builder_options
    from pyrovae.models import MODELS

    build = MODELS.get_checked(cell.model)
    options = dict(cell.model_options)
    accepted, _ = builder_options(build)
    accepted = accepted or []
    # Models with global latents scale a mini-batch's likelihood by
    # num_data / batch size: the training set size is the right value. Models
    # that draw their own initialisation take the cell's seed.
    derived = {"num_data": num_data, "seed": cell.seed}
    for name, value in derived.items():
        if name in accepted and name not in options:
            options[name] = value
    # Weight initialisation draws from the global generator; fork it so a
    # cell's seed decides its initial weights without leaking into the caller.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cell.seed)
        model = build(x_dim, **options)
    if cell.device != "cpu" and isinstance(model, torch.nn.Module):
        model = model.to(cell.device)
    return model


def _fit_svi(cell: Cell, model: Any, train: Any) -> Dict[str, Any]:
    from pyrovae.infer.fit import FitConfig, fit

    budget = cell.budget
    config = FitConfig(
        elbo=cell.objective, num_particles=cell.num_particles,
        vectorize_particles=cell.vectorize_particles, elbo_options=dict(cell.objective_options),
        # Without an epoch budget the step or time budget ends the run.
        epochs=int(budget.get("epochs", 10**9)), max_steps=budget.get("steps"),
        max_seconds=budget.get("seconds"), seed=cell.seed, eval_every=0, progress=False,
        **cell.fit_options,
    )
    result = fit(model, train, config=config)
    history = result.history
    seconds = float(history["seconds"].iloc[-1]) if len(history) else 0.0
    return {
        "objective_obj": result.objective,
        "steps": result.steps,
        "epochs": int(history["epoch"].iloc[-1]) if len(history) else 0,
        "train_seconds": seconds,
        "ms_per_step": 1000.0 * seconds / result.steps if result.steps else NAN,
        "last_train_elbo": float(history["train_elbo"].iloc[-1]) if len(history) else NAN,
    }


def _fit_em(cell: Cell, model: Any, train: Any) -> Dict[str, Any]:
    from pyrovae.bench.spec import signature_options

    fit_em = getattr(model, "fit_em", None)
    if not callable(fit_em):
        raise ValueError(f"method 'em' needs a model with a fit_em method; {cell.model!r} has none")
    accepted, _ = signature_options(fit_em, ())
    options = dict(cell.method_options)
    if (accepted is None or "seed" in accepted) and "seed" not in options:
        options["seed"] = cell.seed
    x = train.fixed(cell.eval.seed)
    t0 = time.perf_counter()
    result = fit_em(x, **options)
    seconds = time.perf_counter() - t0
    steps = int(getattr(result, "n_iter", 0) or 0)
    return {
        "steps": steps, "epochs": steps, "train_seconds": seconds,
        "ms_per_step": 1000.0 * seconds / steps if steps else NAN,
    }


def _sklearn_options(cell: Cell) -> Dict[str, Any]:
    """Map the pyrovae model's options onto its scikit-learn counterpart."""
    from pyrovae.bench.spec import builder_options
    from pyrovae.models import MODELS

    _, defaults = builder_options(MODELS[cell.model])
    opts = {**defaults, **cell.model_options}
    if cell.model in ("fa", "ppca"):
        out = {"n_components": opts.get("z_dim")}
    else:  # gmm
        out = {"n_components": opts.get("K") or opts.get("z_dim") or 2}
        cov = opts.get("covariance")
        if cov is not None:
            out["covariance_type"] = {"diagonal": "diag"}.get(cov, cov)
    if cell.model in ("fa", "gmm"):
        out["random_state"] = cell.seed
    return {**{k: v for k, v in out.items() if v is not None}, **cell.method_options}


def _run_sklearn(cell: Cell, train: Any, test: Any) -> Dict[str, Any]:
    import numpy as np

    estimator = sklearn_estimator(cell.model)(**_sklearn_options(cell))
    x_train = train.fixed(cell.eval.seed).cpu().double().numpy()
    x_test = test.fixed(cell.eval.seed).cpu().double().numpy()[: cell.eval.max_points]
    t0 = time.perf_counter()
    estimator.fit(x_train)
    seconds = time.perf_counter() - t0
    steps = int(np.max(getattr(estimator, "n_iter_", 0)))
    ll_test = estimator.score_samples(x_test)
    ll_train = estimator.score_samples(x_train[: cell.eval.max_points])
    return {
        "steps": steps, "epochs": steps, "train_seconds": seconds,
        "ms_per_step": 1000.0 * seconds / steps if steps else NAN,
        "train_exact": float(ll_train.mean()), "test_exact": float(ll_test.mean()),
        "test_exact_se": float(ll_test.std(ddof=1) / math.sqrt(len(ll_test))),
        "n_eval": len(ll_test),
    }


def _objective_value(objective: Any, model: Any, x: torch.Tensor, repeats: int, seed: int) -> float:
    """The trained objective's own estimate on held-out data, per data point
    (for IWAE with K particles, the K-sample bound)."""
    values = []
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        for _ in range(repeats):
            values.append(objective.loss(model.model, model.guide, x))
    # Models with global latents scale the likelihood to num_data points (as
    # in training), so their bound is per num_data points, not per batch point.
    per = getattr(model, "num_data", None) or x.shape[0]
    return -sum(values) / len(values) / per


def _gradient_columns(cell: Cell, model: Any, objective: Any, x: torch.Tensor,
                      prefix: str = "grad") -> Dict[str, Any]:
    from pyrovae.infer.diagnostics import gradient_stats

    frame = gradient_stats(model, None, objective, x, num_draws=cell.eval.grad_draws,
                           seed=cell.eval.seed)
    out: Dict[str, Any] = {"grad_draws": cell.eval.grad_draws}
    for group in ("encoder", "decoder"):
        rows = frame[frame["group"] == group]
        if len(rows):
            out[f"{prefix}_{group}_snr"] = float(rows["mean_snr"].iloc[0])
            out[f"{prefix}_{group}_var"] = float(rows["mean_variance"].iloc[0])
    return out


def _initial_gradient_columns(cell: Cell, train: Any, test: Any) -> Dict[str, Any]:
    """Gradient statistics of the cell's objective at the initial parameters.

    Every cell with the same model and seed starts from the same weights, so
    these compare estimators at one common point, free of how far each one's
    training got. A separate, identically seeded instance is used, so the
    model that is trained never sees the held-out batch.
    """
    from pyrovae.infer.objectives import make_objective

    model = _build_model(cell, train.dim, len(train))
    objective = make_objective(cell.objective, cell.num_particles, cell.vectorize_particles,
                               **cell.objective_options)
    x = test.fixed(cell.eval.seed)[: cell.eval.grad_batch]
    return _gradient_columns(cell, model, objective, x, prefix="grad_init")


def _score(cell: Cell, model: Any, train: Any, test: Any, objective: Any,
           row: Dict[str, Any], notes: List[str]) -> None:
    """Held-out and training metrics of a trained model, into ``row``."""
    from pyrovae.infer.evaluate import evaluate

    ev = cell.eval
    metrics = set(cell.metrics)
    k = ev.num_samples if "iwae" in metrics else 0
    try:
        res = evaluate(model, test, num_samples=k, elbo_particles=ev.elbo_particles,
                       max_points=ev.max_points, seed=ev.seed)
        row.update(test_elbo=res.elbo, test_elbo_se=res.elbo_se, n_eval=res.n)
        if k and res.log_likelihood_method.startswith("posterior predictive"):
            # Global latents: evaluate's second estimate is the posterior
            # predictive density, not an importance-sampled bound.
            row.update(test_predictive=res.iwae, num_samples=k)
        elif k:
            row.update(test_iwae=res.iwae, test_iwae_se=res.iwae_se, num_samples=k)
        if "exact" in metrics:
            row.update(test_exact=res.exact, test_exact_se=res.exact_se)
        if "elbo" in metrics:
            train_res = evaluate(model, train, num_samples=0, elbo_particles=ev.elbo_particles,
                                 max_points=ev.max_points, seed=ev.seed)
            row.update(train_elbo=train_res.elbo)
            if "exact" in metrics:
                row.update(train_exact=train_res.exact)
    except ValueError as err:
        # Models with global latent variables have no per-data-point ELBO;
        # the exact likelihood, when there is one, still applies.
        notes.append(f"per-point evaluation unavailable: {err}")
        log_marginal = getattr(model, "log_marginal", None)
        if "exact" in metrics and callable(log_marginal):
            with torch.no_grad():
                lm = log_marginal(test.fixed(ev.seed)[: ev.max_points]).double()
                row.update(test_exact=lm.mean().item(), n_eval=len(lm),
                           test_exact_se=(lm.std() / math.sqrt(len(lm))).item())
                row.update(train_exact=log_marginal(train.fixed(ev.seed)[: ev.max_points]).mean().item())
    log_predictive = getattr(model, "log_predictive", None)
    if ("exact" in metrics and callable(log_predictive) and math.isnan(row.get("test_exact", NAN))
            and math.isnan(row.get("test_predictive", NAN))):
        # Bayesian models: the posterior predictive density stands in for the likelihood.
        gen = torch.Generator(device="cpu").manual_seed(ev.seed)
        with torch.no_grad():
            lp = log_predictive(test.fixed(ev.seed)[: ev.max_points], generator=gen)
        row["test_predictive"] = lp.double().mean().item()
    if "elbo" in metrics and math.isnan(row.get("train_elbo", NAN)):
        row["train_elbo"] = row.get("last_train_elbo", NAN)
    x_eval = test.fixed(ev.seed)[: ev.max_points]
    if "objective" in metrics and objective is not None:
        try:
            row["test_objective"] = _objective_value(objective, model, x_eval, ev.objective_repeats,
                                                     ev.seed)
        except (ValueError, NotImplementedError) as err:
            notes.append(f"objective value unavailable: {err}")
    if "gradients" in metrics and objective is not None:
        row.update(_gradient_columns(cell, model, objective, test.fixed(ev.seed)[: ev.grad_batch]))


def run_cell(cell_dict: Mapping[str, Any], fail_fast: bool = False) -> Dict[str, Any]:
    """Train and score one cell; return its results row.

    Takes and returns plain dicts so it can cross a process boundary. Any
    error inside the cell is caught and recorded in the row (``status`` =
    ``"error"``, ``error`` = the message) unless ``fail_fast``: one bad cell
    must not cost the rest of a long suite.
    """
    cell = Cell.from_dict(cell_dict)
    t0 = time.perf_counter()
    row: Dict[str, Any] = {**cell_columns(cell), **_versions(), "status": "ok", "error": "",
                           "config": canonical_json(cell.config())}
    notes: List[str] = []
    store = pyro.get_param_store()
    names_before = set(store.keys())
    try:
        train, test = _load_data(cell)
        row.update(n_train=len(train), n_test=len(test))
        objective = None
        if cell.method == "sklearn":
            row.update(_run_sklearn(cell, train, test))
        else:
            model = _build_model(cell, train.dim, len(train))
            if cell.method == "em":
                row.update(_fit_em(cell, model, train))
            else:
                if "gradients" in cell.metrics:
                    row.update(_initial_gradient_columns(cell, train, test))
                fitted = _fit_svi(cell, model, train)
                objective = fitted.pop("objective_obj")
                row.update(fitted)
            _score(cell, model, train, test, objective, row, notes)
    except Exception as err:  # noqa: BLE001  (the row records the failure; see docstring)
        if fail_fast:
            raise
        row.update(status="error", error=f"{type(err).__name__}: {err}")
    finally:
        # The global param store only holds references to this cell's
        # modules; dropping them lets a worker running many cells free them.
        for name in set(store.keys()) - names_before:
            del store[name]
    row.pop("last_train_elbo", None)
    exact = row.get("test_exact", NAN)
    for metric, gap in (("test_elbo", "elbo_gap"), ("test_iwae", "iwae_gap"),
                        ("test_objective", "objective_gap")):
        row[gap] = row.get(metric, NAN) - exact
    row["wall_seconds"] = time.perf_counter() - t0
    row["threads"] = torch.get_num_threads()
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


# -- the results file --------------------------------------------------------------


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
        if not self._check_header():
            writer.writerow(RESULT_COLUMNS)
        writer.writerow([_format(row.get(c, NAN)) for c in RESULT_COLUMNS])
        with open(self.path, "a", newline="") as f:
            f.write(buf.getvalue())
            f.flush()
            os.fsync(f.fileno())

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


def _init_worker(threads: int, env: Dict[str, str]) -> None:
    os.environ.update(env)
    torch.set_num_threads(threads)


def run_suite(
    suite: Suite,
    out_dir: Union[str, Path],
    *,
    jobs: int = 1,
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
        jobs: cells run at once, each in its own spawned process with
            ``cpu_count // jobs`` torch threads; 1 runs them in this process.
        progress: show a progress bar over cells.
        retry_errors: run cells again whose earlier row failed (the newest
            row of a cell wins in reports).
        fail_fast: re-raise the first error instead of recording it.
        report: write ``report.md`` and the plots at the end.
        threads: torch threads per cell (default: ``cpu_count // jobs`` in
            worker processes, unchanged when ``jobs == 1``). Timings of small
            models are steadier with 1 on a busy machine.
        on_row: called with each row after it is written.
    """
    from tqdm.auto import tqdm

    if jobs < 1:
        raise ValueError(f"jobs must be >= 1, got {jobs}")
    if threads is not None and threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    t0 = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if suite.text:
        (out / SUITE_COPY).write_text(suite.text)
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
    bar = tqdm(total=len(todo), desc=f"bench {suite.name}", unit="cell", disable=not progress)

    def record(row: Dict[str, Any]) -> None:
        nonlocal errors
        results.append(row)
        errors += row["status"] != "ok"
        bar.update(1)
        bar.set_postfix(errors=errors, last=f"{row['model']}/{row['objective'] or row['method']}")
        if on_row is not None:
            on_row(row)

    previous_threads = torch.get_num_threads()
    try:
        if jobs == 1:
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
        from pyrovae.bench.report import write_report

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
    pool = ProcessPoolExecutor(
        max_workers=jobs, mp_context=multiprocessing.get_context("spawn"),
        initializer=_init_worker, initargs=(threads, env),
    )
    pending: Dict[Future, Cell] = {}
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
            for fut in finished:
                pending.pop(fut)
                record(fut.result())
        finished_normally = True
    finally:
        if not finished_normally:
            # Interrupted (Ctrl-C, an error in the parent): stop the cells in
            # flight now rather than let them run on with nobody to record them.
            for process in list(getattr(pool, "_processes", {}).values()):
                process.terminate()
        pool.shutdown(wait=finished_normally, cancel_futures=True)
