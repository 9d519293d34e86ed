"""One run, one pipeline: a :class:`RunSpec` goes through :func:`run` to a
finished :class:`RunResult`.

The steps, in order, each in one place:

1. **check** the spec (names against their registries, options against the
   signatures they configure, sizes and settings);
2. **data**: the train and held-out splits (named data set or CSV file);
3. **model**: built from its registry entry with the run's seed deciding the
   initial weights; options the run knows better than a default (the
   training-set size ``num_data`` of models with global latents, the model's
   own ``seed`` for its initialization) are filled in when not given;
4. **training**: SVI through :func:`pyrovae.infer.fit` (the model's own
   objective unless one is named), EM through the model's ``fit_em``, or the
   scikit-learn counterpart of the model, or nothing when an existing run
   folder is evaluated again;
5. **evaluation**: one :func:`pyrovae.infer.evaluate` call on the held-out
   split, plus the metrics the spec asks for (training ELBO, the trained
   objective's held-out value, gradient statistics, the latent diagnostics
   of :mod:`pyrovae.infer.latents`: KL per dimension and active units, the
   inference gap);
6. **files**, when ``spec.out`` is set: ``config.json`` (the spec, the built
   model's options, library versions), ``checkpoint.pt``, ``history.csv``,
   ``metrics.csv``, ``latents.csv`` (one row per latent dimension) and
   ``gap.csv`` (one row per data point) when those were measured, and the
   figures.

``pyrovae train``, ``pyrovae eval`` and every cell of a benchmark suite build
a spec and call :func:`run`; none of them repeats a step. :func:`load_run`
brings a trained model back from a run folder (or from a folder written by
``fit(checkpoint_dir=...)``).
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import time
import warnings
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import pandas as pd
import pyro
import torch

from pyrovae.data import DATASETS, ArrayDataset, load_dataset
from pyrovae.data.core import check_finite
from pyrovae.files import FolderLock, check_writable, remove_stale_temporaries, write_atomic
from pyrovae.data.tabular import load_csv
from pyrovae.infer.distributed import worker_process
from pyrovae.infer.evaluate import Evaluation, evaluate
from pyrovae.infer.fit import (CHECKPOINT_FORMAT, FitConfig, TrainingDiverged, fit,
                               load_checkpoint, load_weights, save_checkpoint)
from pyrovae.infer.latents import (InferenceGap, LatentStats, check_inference_gap,
                                   continuous_local_latents, inference_gap, latent_stats)
from pyrovae.infer.objectives import ELBOS, make_objective
from pyrovae.models import MODELS
from pyrovae.models.base import LatentModel, capability, num_data
from pyrovae.registry import builder_options, option_problems, signature_options
from pyrovae.seeding import seeded
from pyrovae.version import __version__

METHODS = ("svi", "em", "sklearn")
METRICS = ("elbo", "iwae", "exact", "objective", "gradients", "latents", "gap")
# "latents" is measured by default only where it applies (see RunSpec.metrics).
DEFAULT_METRICS = ("elbo", "iwae", "exact", "latents")
#: What each metric measures and what it costs (the command line's help).
METRIC_HELP = {
    "elbo": "held-out and training ELBO: one pass over each split",
    "iwae": "importance-sampled held-out log-likelihood: num_samples (K) passes",
    "exact": "exact log-likelihood, where the model has one: closed form, cheap",
    "objective": "the trained objective on held-out data: objective_repeats passes",
    "gradients": "gradient variance and SNR of the objective, at the start and the end of "
                 "training: grad_draws backward passes each",
    "latents": "KL to the prior per latent dimension and active units (latents.csv): "
               "latent_samples draws per point, about the cost of the ELBO; measured by "
               "default where the model has continuous local latents",
    "gap": "approximation and amortization gaps (gap.csv): q optimized for each of "
           "gap_points points for gap_steps steps, then gap_samples draws per point; the "
           "costliest, never by default",
}
CONFIG_FILE = "config.json"
CHECKPOINT_FILE = "checkpoint.pt"
NAN = float("nan")
# scikit-learn estimators standing in for pyrovae models under method = "sklearn".
SKLEARN_MODELS = {
    "fa": "sklearn.decomposition.FactorAnalysis",
    "ppca": "sklearn.decomposition.PCA",
    "gmm": "sklearn.mixture.GaussianMixture",
}
# Options of a data set loader that the pipeline sets itself.
PIPELINE_DATASET_OPTIONS = ("split", "device")


@dataclass
class EvalSettings:
    """How a trained model is scored."""

    num_samples: int = 1000  # K of the importance-sampled held-out log-likelihood (0: skip)
    max_points: Optional[int] = 1000  # held-out (and training) points scored (None: all)
    elbo_particles: int = 1  # draws per point for the held-out ELBO
    objective_repeats: int = 5  # evaluations of the trained objective averaged on held-out data
    grad_draws: int = 20  # gradient estimates per gradient statistic
    grad_batch: int = 100  # size of the fixed held-out batch the gradients are taken on
    seed: int = 0  # seeds evaluation draws and the held-out binarization
    latent_samples: int = 16  # draws per point for the latent statistics ("latents")
    gap_points: int = 100  # held-out points whose inference gap is measured ("gap")
    gap_steps: int = 300  # Adam steps optimizing q for each of those points
    gap_lr: float = 0.01  # learning rate of those steps
    gap_samples: int = 1000  # K of the importance-sampled log p(x) of the gap (0: exact only)

    def to_dict(self) -> Dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


#: Seeds torch's generators take: 0 .. 2**64 - 1.
MAX_SEED = 2**64 - 1


def _check_eval(ev: EvalSettings) -> None:
    minimum = {"num_samples": 0, "seed": 0, "grad_draws": 2, "gap_steps": 0, "gap_samples": 0}
    for f in fields(EvalSettings):
        value = getattr(ev, f.name)
        if f.name == "max_points" and value is None:
            continue
        if f.name == "gap_lr":
            if isinstance(value, bool) or not isinstance(value, (int, float)) or \
                    not (math.isfinite(value) and value > 0):
                raise ValueError(f"eval gap_lr must be a finite number > 0, got {value!r}")
            continue
        low = minimum.get(f.name, 1)
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"eval {f.name} must be an integer >= {low}, got {value!r}")
        if f.name == "seed" and value > MAX_SEED:
            raise ValueError(f"eval seed must be an integer from 0 to {MAX_SEED}, got {value}")


def check_device(device: str) -> torch.device:
    """The torch device named ``device``, if this machine has it."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device {device!r} is not a device name; use 'cpu' or 'cuda'") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} asked for, but torch sees no CUDA device on "
                             "this machine; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r} asked for, but this machine has "
                             f"{torch.cuda.device_count()} CUDA devices")
    elif dev.type != "cpu":
        raise ValueError(f"device {device!r} is not supported; use 'cpu' or 'cuda'")
    return dev


@dataclass
class RunSpec:
    """Everything that decides a run; saved as ``config.json`` in its folder."""

    model: str = "vae"  # name in MODELS
    model_options: Dict[str, Any] = field(default_factory=dict)  # builder kwargs (z_dim, hidden, ...)
    dataset: str = "mnist"  # name in DATASETS, or a path to a .csv file
    dataset_options: Dict[str, Any] = field(default_factory=dict)  # loader kwargs (root, binarize, ...)
    train_split: str = "train"  # split trained on
    test_split: str = "test"  # split evaluated on
    train_size: Optional[int] = None  # use only the first N training points
    test_size: Optional[int] = None  # use only the first N held-out points
    method: str = "svi"  # "svi", "em" (the model's fit_em) or "sklearn" (its scikit-learn twin)
    fit: Dict[str, Any] = field(default_factory=dict)  # FitConfig fields for SVI (seed: see below)
    method_options: Dict[str, Any] = field(default_factory=dict)  # fit_em or estimator kwargs
    seed: int = 0  # decides initial weights, batching, every draw of training and EM restarts
    eval: EvalSettings = field(default_factory=EvalSettings)  # how the trained model is scored
    # What is scored, a subset of METRICS. With the defaults, "latents" is
    # skipped (with a note) for a model without continuous local latents; any
    # other choice that names a metric the model cannot give is refused.
    metrics: Tuple[str, ...] = DEFAULT_METRICS
    device: str = "cpu"  # where data and parameters live
    out: Optional[str] = None  # run folder (None: write nothing)

    # -- checks -------------------------------------------------------------------
    def check(self) -> "RunSpec":
        """Raise ``ValueError`` naming the bad field, its value and the fix; return self."""
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        build = MODELS.get_checked(self.model)
        accepted, _ = builder_options(build)
        if accepted is not None:
            unknown = sorted(set(self.model_options) - set(accepted))
            if unknown:
                raise ValueError(f"unknown options {unknown} for model {self.model!r}; "
                                 f"it accepts {sorted(accepted)}")
        problems = option_problems(build, self.model_options)
        if problems:
            raise ValueError(f"model {self.model!r}: " + "; ".join(problems))
        loader = load_csv if self.dataset.endswith(".csv") else DATASETS.get_checked(self.dataset)
        accepted, _ = signature_options(loader, (*PIPELINE_DATASET_OPTIONS, "path"))
        unknown = sorted(set(self.dataset_options) - set(accepted or self.dataset_options))
        if unknown:
            raise ValueError(f"unknown options {unknown} for data set {self.dataset!r}; "
                             f"it accepts {sorted(accepted)}")
        problems = option_problems(loader, self.dataset_options)
        if problems:
            raise ValueError(f"data set {self.dataset!r}: " + "; ".join(problems))
        for name in ("train_size", "test_size"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or value < 1):
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        if not 0 <= self.seed <= MAX_SEED:
            raise ValueError(f"seed must be an integer from 0 to {MAX_SEED}, got {self.seed}")
        _check_eval(self.eval)
        unknown = sorted(set(self.metrics) - set(METRICS))
        if unknown:
            raise ValueError(f"unknown metrics {unknown}; known: {', '.join(METRICS)}")
        if self.method == "svi":
            config = self.fit_config()  # FitConfig validates its own fields
            if isinstance(config.elbo, str):
                ELBOS.get_checked(config.elbo)
        elif self.method == "sklearn" and self.model not in SKLEARN_MODELS:
            raise ValueError(f"method 'sklearn' has no counterpart of model {self.model!r}; "
                             f"models with one: {', '.join(SKLEARN_MODELS)}")
        elif self.method == "sklearn" and self.seed > 2**32 - 1:
            raise ValueError(f"seed must be an integer from 0 to {2**32 - 1} for method 'sklearn' "
                             f"(scikit-learn's random_state), got {self.seed}")
        elif self.method == "em" and isinstance(build, type) and not hasattr(build, "fit_em"):
            raise ValueError(f"model {self.model!r} has no EM algorithm; use method 'svi'")
        check_device(self.device)
        return self

    def fit_config(self, resume: bool = False) -> FitConfig:
        """The FitConfig of an SVI run: the spec's ``fit`` fields, its seed and folder."""
        valid = {f.name for f in fields(FitConfig)}
        unknown = sorted(set(self.fit) - valid)
        if unknown:
            raise ValueError(f"unknown fit options {unknown}; valid: {sorted(valid)}")
        options = {**self.fit, "seed": self.seed, "checkpoint_dir": self.out, "resume": resume}
        return FitConfig(**options)

    # -- (de)serialization --------------------------------------------------------
    def to_dict(self) -> Dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["eval"] = self.eval.to_dict()
        d["metrics"] = list(self.metrics)
        return json.loads(json.dumps(d))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "RunSpec":
        d = _upgrade_config(d)
        known = {f.name for f in fields(cls)}
        d = {k: v for k, v in d.items() if k in known}
        if "eval" in d:
            d["eval"] = EvalSettings(**d["eval"])
        if "metrics" in d:
            d["metrics"] = tuple(d["metrics"])
        return cls(**d)


# Fields of run folders written by pyrovae 0.1's first command line, and where
# they live now; reading such a folder keeps every setting it recorded.
_LEGACY_FIELDS = ("z_dim", "data_root", "binarize", "data_options", "em_max_iter",
                  "eval_samples", "eval_points")


def _upgrade_config(d: Mapping[str, Any]) -> Dict[str, Any]:
    d = dict(d)
    if not any(key in d for key in _LEGACY_FIELDS):
        return d
    options = dict(d.get("model_options", {}))
    if d.get("z_dim") is not None:
        options.setdefault("z_dim", d["z_dim"])
    data = dict(d.pop("data_options", None) or {})
    if d.get("data_root") is not None:
        data.setdefault("root", d["data_root"])
    if d.get("dataset") in ("mnist", "fashion-mnist", "binarized-mnist") and "binarize" in d:
        data.setdefault("binarize", d["binarize"])
    fit = dict(d.get("fit", {}))
    d["seed"] = int(fit.pop("seed", d.get("seed", 0)))
    d["model_options"], d["dataset_options"], d["fit"] = options, data, fit
    if d.get("method") == "em":
        d["method_options"] = {"max_iter": d.get("em_max_iter", 500)}
    d["eval"] = {**EvalSettings().to_dict(), "num_samples": d.get("eval_samples", 1000),
                 "max_points": d.get("eval_points")}
    for key in _LEGACY_FIELDS:
        d.pop(key, None)
    return d


@dataclass
class RunResult:
    """What a run leaves: the trained model and everything measured."""

    spec: RunSpec
    model: Any  # the trained model (a scikit-learn estimator for method "sklearn")
    history: pd.DataFrame  # one row per epoch (SVI) or iteration (EM)
    evaluation: Optional[Evaluation]  # held-out metrics (None for method "sklearn")
    metrics: Dict[str, Any]  # every number of the run, by benchmark column name
    notes: List[str]  # what could not be measured, and why
    figures: List[Path]
    out: Optional[Path]
    latents: Optional[LatentStats] = None  # KL per latent dimension and activity ("latents")
    gap: Optional[InferenceGap] = None  # the inference gap per held-out point ("gap")
    files: List[Path] = field(default_factory=list)  # the run folder's files, figures aside


# -- steps ----------------------------------------------------------------------------


@functools.lru_cache(maxsize=16)
def _load_split(name: str, split: str, options_json: str) -> ArrayDataset:
    """Named data sets are read once per process (MNIST takes a second or
    two); the cached split is never modified, only sliced and copied."""
    return load_dataset(name, split=split, **json.loads(options_json))


def load_data(spec: RunSpec) -> Tuple[ArrayDataset, ArrayDataset]:
    """The train and held-out splits of a run, on its device."""
    options = dict(spec.dataset_options)
    if spec.dataset.endswith(".csv"):
        if not Path(spec.dataset).exists():
            raise FileNotFoundError(f"no CSV file at {spec.dataset}")
        train = load_csv(spec.dataset, split=spec.train_split, **options)
        test = load_csv(spec.dataset, split=spec.test_split, **options)
    else:
        loader = DATASETS.get_checked(spec.dataset)
        accepted, _ = signature_options(loader, PIPELINE_DATASET_OPTIONS)
        if accepted is not None:
            unknown = sorted(set(options) - set(accepted))
            if unknown:
                raise ValueError(f"unknown options {unknown} for data set {spec.dataset!r}; "
                                 f"it accepts {sorted(accepted)}")
        key = json.dumps(options, sort_keys=True, default=str)
        train = _load_split(spec.dataset, spec.train_split, key)
        test = _load_split(spec.dataset, spec.test_split, key)
    if spec.train_size is not None:
        train = train.subset(spec.train_size)
    if spec.test_size is not None:
        test = test.subset(spec.test_size)
    if spec.device != "cpu":
        train, test = train.to(spec.device), test.to(spec.device)
    return train, test


def model_options(spec: RunSpec, x_dim: int, n_train: int) -> Dict[str, Any]:
    """The builder kwargs of a run: the spec's, plus what the run knows better
    than a default (``num_data``, the model's own ``seed``) when not given."""
    options = dict(spec.model_options)
    accepted, _ = builder_options(MODELS.get_checked(spec.model))
    # Models with global latents scale a mini-batch's likelihood by
    # num_data / batch size: the training-set size is the right value.
    for name, value in (("num_data", n_train), ("seed", spec.seed)):
        if accepted is not None and name in accepted and name not in options:
            options[name] = value
    return options


def build_model(name: str, x_dim: int, options: Optional[Mapping[str, Any]] = None, *,
                seed: int = 0, device: str = "cpu") -> Any:
    """Build the registered model ``name`` with builder kwargs ``options``;
    ``seed`` decides its initial weights."""
    options = dict(options or {})
    build = MODELS.get_checked(name)
    try:
        with seeded(seed):
            model = build(x_dim, **options)
    except TypeError as err:
        raise ValueError(f"bad options for model {name!r}: {err}") from None
    if device != "cpu" and isinstance(model, torch.nn.Module):
        model = model.to(device)
    return model


def _train_svi(spec: RunSpec, model: Any, train: ArrayDataset, test: ArrayDataset,
               resume: bool, progress: Optional[bool], metadata: Dict[str, Any],
               callbacks: Optional[List[Any]] = None) -> Dict[str, Any]:
    config = spec.fit_config(resume)
    if progress is not None:
        config = replace(config, progress=progress)
    result = fit(model, train, test, config=config, metadata=metadata, callbacks=callbacks)
    history = result.history
    # Training time of this run only: on resume the history starts earlier.
    seconds = float(history["seconds"].iloc[-1]) if len(history) else 0.0
    return {
        "history": history, "objective": result.objective, "config": result.config,
        "steps": result.steps, "epochs": int(history["epoch"].iloc[-1]) if len(history) else 0,
        "train_seconds": seconds,
        "ms_per_step": 1000.0 * seconds / result.steps if result.steps else NAN,
        "last_train_elbo": float(history["train_elbo"].iloc[-1]) if len(history) else NAN,
        "stopped": result.stopped,
    }


def _train_em(spec: RunSpec, model: Any, train: ArrayDataset) -> Dict[str, Any]:
    fit_em = capability(model, "fit_em")
    if fit_em is None:
        raise ValueError(f"model {spec.model!r} has no EM algorithm; use method 'svi'")
    accepted, _ = signature_options(fit_em, ())
    options = dict(spec.method_options)
    if (accepted is None or "seed" in accepted) and "seed" not in options:
        options["seed"] = spec.seed
    x = train.fixed(spec.eval.seed)
    t0 = time.perf_counter()
    result = fit_em(x, **options)
    seconds = time.perf_counter() - t0
    steps = int(getattr(result, "n_iter", 0) or 0)
    history = getattr(result, "history", None)
    return {
        "history": history if isinstance(history, pd.DataFrame) else pd.DataFrame(),
        "steps": steps, "epochs": steps, "train_seconds": seconds,
        "ms_per_step": 1000.0 * seconds / steps if steps else NAN,
    }


def sklearn_estimator(model: str) -> type:
    """The scikit-learn estimator class standing in for ``model``."""
    import importlib

    module_name, cls_name = SKLEARN_MODELS[model].rsplit(".", 1)
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        raise ValueError("method 'sklearn' needs scikit-learn: pip install 'pyrovae[sklearn]'") \
            from None
    return getattr(module, cls_name)


def _sklearn_options(spec: RunSpec) -> Dict[str, Any]:
    """Map the pyrovae model's options onto its scikit-learn counterpart."""
    _, defaults = builder_options(MODELS[spec.model])
    opts = {**defaults, **spec.model_options}
    if spec.model in ("fa", "ppca"):
        out = {"n_components": opts.get("z_dim")}
    else:  # gmm
        out = {"n_components": opts.get("K") or opts.get("z_dim") or 2}
        cov = opts.get("covariance")
        if cov is not None:
            out["covariance_type"] = {"diagonal": "diag"}.get(cov, cov)
    if spec.model in ("fa", "gmm"):
        out["random_state"] = spec.seed
    return {**{k: v for k, v in out.items() if v is not None}, **spec.method_options}


def _run_sklearn(spec: RunSpec, train: ArrayDataset, test: ArrayDataset) -> Tuple[Any, Dict[str, Any]]:
    import numpy as np

    estimator = sklearn_estimator(spec.model)(**_sklearn_options(spec))
    ev = spec.eval
    x_train = train.fixed(ev.seed).cpu().double().numpy()
    x_test = test.fixed(ev.seed).cpu().double().numpy()[: ev.max_points]
    t0 = time.perf_counter()
    estimator.fit(x_train)
    seconds = time.perf_counter() - t0
    steps = int(np.max(getattr(estimator, "n_iter_", 0)))
    ll_test = estimator.score_samples(x_test)
    ll_train = estimator.score_samples(x_train[: ev.max_points])
    return estimator, {
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
    with seeded(seed, x.device), torch.no_grad():
        for _ in range(repeats):
            values.append(objective.loss(model.model, model.guide, x))
    # Models with global latents scale the likelihood to num_data points (as
    # in training), so their bound is per num_data points, not per batch point.
    per = num_data(model) or x.shape[0]
    return -sum(values) / len(values) / per


def _gradient_columns(spec: RunSpec, model: Any, objective: Any, x: torch.Tensor,
                      prefix: str) -> Dict[str, Any]:
    from pyrovae.infer.diagnostics import gradient_stats

    frame = gradient_stats(model, None, objective, x, num_draws=spec.eval.grad_draws,
                           seed=spec.eval.seed)
    out: Dict[str, Any] = {"grad_draws": spec.eval.grad_draws}
    for group in ("encoder", "decoder"):
        rows = frame[frame["group"] == group]
        if len(rows):
            out[f"{prefix}_{group}_snr"] = float(rows["mean_snr"].iloc[0])
            out[f"{prefix}_{group}_var"] = float(rows["mean_variance"].iloc[0])
    return out


def _initial_gradients(spec: RunSpec, train: ArrayDataset, test: ArrayDataset,
                       options: Dict[str, Any]) -> Dict[str, Any]:
    """Gradient statistics of the run's objective at the initial parameters.

    Every run with the same model and seed starts from the same weights, so
    these compare estimators at one common point, free of how far each one's
    training got. A separate, identically seeded instance is used, so the
    model that is trained never sees the held-out batch.
    """
    model = build_model(spec.model, train.dim, options, seed=spec.seed, device=spec.device)
    objective = _svi_objective(spec)
    if objective is None:
        return {}
    x = test.fixed(spec.eval.seed)[: spec.eval.grad_batch]
    return _gradient_columns(spec, model, objective, x, "grad_init")


def _svi_objective(spec: RunSpec) -> Any:
    fit = spec.fit
    elbo = fit.get("elbo")
    if elbo is None or not isinstance(elbo, str):
        return None
    return make_objective(elbo, fit.get("num_particles", 1), fit.get("vectorize_particles"),
                          **fit.get("elbo_options", {}))


def _score(spec: RunSpec, model: Any, train: ArrayDataset, test: ArrayDataset,
           objective: Any, metrics: Dict[str, Any], notes: List[str],
           diagnostics: Tuple[str, ...] = ()
           ) -> Tuple[Evaluation, Optional[LatentStats], Optional[InferenceGap]]:
    """Held-out (and, when asked for, training) metrics of a trained model,
    and the latent diagnostics named in ``diagnostics`` (see
    :func:`_diagnostics`) on the held-out points evaluated."""
    ev = spec.eval
    wanted = set(spec.metrics)
    k = ev.num_samples if "iwae" in wanted else 0
    res = evaluate(model, test, num_samples=k, elbo_particles=ev.elbo_particles,
                   max_points=ev.max_points, seed=ev.seed)
    metrics.update(test_elbo=res.elbo, test_elbo_se=res.elbo_se, n_eval=res.n)
    if k and res.log_likelihood_method.startswith("posterior predictive"):
        # Global latents: the second estimate is the posterior predictive
        # density, not an importance-sampled bound.
        metrics.update(test_predictive=res.iwae, num_samples=k)
    elif k:
        metrics.update(test_iwae=res.iwae, test_iwae_se=res.iwae_se, num_samples=k)
    if "exact" in wanted:
        metrics.update(test_exact=res.exact, test_exact_se=res.exact_se)
        log_predictive = capability(model, "log_predictive")
        if (math.isnan(res.exact) and log_predictive is not None
                and math.isnan(metrics.get("test_predictive", NAN))):
            # Bayesian models: the posterior predictive density stands in for the likelihood.
            gen = torch.Generator(device="cpu").manual_seed(ev.seed)
            with torch.no_grad():
                lp = log_predictive(test.fixed(ev.seed)[: ev.max_points], generator=gen)
            metrics["test_predictive"] = lp.double().mean().item()
    if "elbo" in wanted:
        train_res = evaluate(model, train, num_samples=0, elbo_particles=ev.elbo_particles,
                             max_points=ev.max_points, seed=ev.seed)
        metrics.update(train_elbo=train_res.elbo)
        if "exact" in wanted:
            metrics.update(train_exact=train_res.exact)
    if "objective" in wanted and objective is not None:
        x_eval = test.fixed(ev.seed)[: ev.max_points]
        try:
            metrics["test_objective"] = _objective_value(objective, model, x_eval,
                                                         ev.objective_repeats, ev.seed)
        except (ValueError, NotImplementedError) as err:
            notes.append(f"objective value unavailable: {err}")
    if "gradients" in wanted and objective is not None:
        metrics.update(_gradient_columns(spec, model, objective,
                                         test.fixed(ev.seed)[: ev.grad_batch], "grad"))
    latents = gap = None
    x_eval = test.fixed(ev.seed)[: ev.max_points]
    if "latents" in diagnostics:
        latents = latent_stats(model, x_eval, num_samples=ev.latent_samples, seed=ev.seed)
        metrics.update(latents.summary())
    if "gap" in diagnostics:
        gap = inference_gap(model, x_eval, num_points=ev.gap_points, steps=ev.gap_steps,
                            lr=ev.gap_lr, num_samples=ev.gap_samples, seed=ev.seed)
        metrics.update(gap.summary())
    return res, latents, gap


# -- files ----------------------------------------------------------------------------


def versions() -> Dict[str, str]:
    return {"pyrovae_version": __version__, "torch_version": torch.__version__,
            "pyro_version": pyro.__version__}


def _write_figures(spec: RunSpec, model: Any, history: pd.DataFrame, train: ArrayDataset,
                   test: ArrayDataset, out: Path,
                   latents: Optional[LatentStats] = None) -> List[Path]:
    from pyrovae.viz import FIGURES
    from pyrovae.viz.figures import loss_curves

    paths: List[Path] = []
    if spec.method == "svi" and len(history) and history["train_elbo"].notna().any():
        paths.append(loss_curves(history, out / "loss_curves.png"))
    if spec.model in FIGURES:
        figure_set = FIGURES[spec.model]
        accepted, _ = signature_options(figure_set, ())
        # A figure set that draws latent statistics takes the run's own.
        extra = ({"latents": latents} if latents is not None
                 and (accepted is None or "latents" in accepted) else {})
        paths += figure_set(model, train, test, out, **extra)
    return paths


LATENTS_FILE = "latents.csv"
GAP_FILE = "gap.csv"
RUN_FILES = (CONFIG_FILE, CHECKPOINT_FILE, "history.csv", "metrics.csv", LATENTS_FILE, GAP_FILE)
# What a resumed run cannot change: its data, its model, its method and seed.
FIXED_ON_RESUME = ("model", "model_options", "dataset", "dataset_options", "train_split",
                   "test_split", "train_size", "test_size", "method", "seed", "device")
FIXED_FIT_ON_RESUME = ("optimizer",)
# Settings that change nothing of a run's numbers.
IGNORED_ON_RESUME = ("progress",)


def _saved_spec(out: Path) -> Optional[RunSpec]:
    """The spec a run folder was trained with: the checkpoint's copy (written
    with the weights, so the two always belong together), else config.json."""
    if (out / CHECKPOINT_FILE).exists():
        saved = load_checkpoint(out / CHECKPOINT_FILE).get("metadata", {}).get("spec")
        if saved:
            return RunSpec.from_dict(saved)
    if (out / CONFIG_FILE).exists():
        return read_spec(out)
    return None


def resume_changes(saved: RunSpec, spec: RunSpec, out: Path) -> List[str]:
    """The differences between a saved run and the spec resuming it, one line
    each; raises ``ValueError`` listing those that cannot apply."""
    refused, applied = [], []
    for name in FIXED_ON_RESUME:
        old, new = getattr(saved, name), getattr(spec, name)
        if old != new:
            refused.append(f"{name} {old!r} -> {new!r}")
    for key in sorted(set(saved.fit) | set(spec.fit)):
        old, new = saved.fit.get(key), spec.fit.get(key)
        if old == new or key in IGNORED_ON_RESUME:
            continue
        (refused if key in FIXED_FIT_ON_RESUME else applied).append(f"fit.{key} {old!r} -> {new!r}")
    for f in fields(EvalSettings):
        old, new = getattr(saved.eval, f.name), getattr(spec.eval, f.name)
        if old != new:
            applied.append(f"eval.{f.name} {old!r} -> {new!r}")
    if tuple(saved.metrics) != tuple(spec.metrics):
        applied.append(f"metrics {list(saved.metrics)} -> {list(spec.metrics)}")
    if refused:
        raise ValueError(
            f"{out} holds a run that differs in what cannot change on resume: "
            f"{'; '.join(refused)}; resume with the run's own settings, or start a new run "
            "in another --out (or replace this one with --overwrite)"
        )
    return [f"resume: {line} (applied)" for line in applied]


def _check_out(spec: RunSpec, resume: bool, overwrite: bool,
               evaluate_only: bool) -> Tuple[Optional[Path], List[str]]:
    """The run folder and what resuming changes, checked before anything is written."""
    if resume and overwrite:
        raise ValueError("--resume continues a run and --overwrite replaces it; choose one")
    if spec.out is None:
        if resume or evaluate_only:
            raise ValueError("resuming or re-evaluating a run needs its folder (out)")
        return None, []
    out = check_writable(spec.out)
    existing = out.is_dir() and any((out / name).exists() for name in RUN_FILES)
    if evaluate_only:
        if not (out / CONFIG_FILE).exists():
            raise FileNotFoundError(f"{out} is not a pyrovae run folder: no {CONFIG_FILE}")
        saved = read_spec(out)
        if saved.method != "sklearn" and not (out / CHECKPOINT_FILE).exists():
            raise FileNotFoundError(f"{out} has no {CHECKPOINT_FILE}: the run never finished "
                                    "an epoch; train it again")
        return out, []
    if resume:
        if spec.method != "svi":
            raise ValueError(f"--resume continues SVI training; a {spec.method} run starts anew "
                             "(use --overwrite)")
        if not (out / CHECKPOINT_FILE).exists():
            raise ValueError(f"nothing to resume in {out}: no {CHECKPOINT_FILE} there; check "
                             "--out, or start the run without --resume")
        saved = _saved_spec(out)
        return out, ([] if saved is None else resume_changes(saved, spec, out))
    if existing and not overwrite:
        saved = None
        try:
            saved = _saved_spec(out)
        except (ValueError, FileNotFoundError):
            pass
        what = f"a run of {saved.model} on {saved.dataset}" if saved is not None else "a run"
        raise ValueError(f"{out} already holds {what}; add --resume to continue it, "
                         "--overwrite to replace it, or choose another --out")
    return out, []


def _clear_run(out: Path) -> None:
    for name in RUN_FILES:
        with contextlib.suppress(FileNotFoundError):
            (out / name).unlink()
    for png in out.glob("*.png"):
        png.unlink()


def _check_splits(model: Any, train: ArrayDataset, test: ArrayDataset, seed: int) -> None:
    """Both splits as the model will see them: finite, and scorable by its likelihood."""
    check_data = capability(model, "check_data") if model is not None else None
    for name, split in (("the training split", train), ("the test split", test)):
        x = split.fixed(seed)
        check_finite(x, name)
        if check_data is not None:
            try:
                check_data(x)
            except ValueError as err:
                raise ValueError(f"{name}: {err}") from None


# -- the pipeline ---------------------------------------------------------------------


def run(spec: RunSpec, *, resume: bool = False, overwrite: bool = False,
        evaluate_only: bool = False, progress: Optional[bool] = None,
        callbacks: Optional[List[Any]] = None) -> RunResult:
    """Take ``spec`` to a finished run.

    Everything is checked (the spec, both data splits, the model, the run
    folder) before anything is written: a run that fails a check leaves no
    folder behind and changes nothing in an existing one. Files are written
    atomically, under a lock on the folder that makes a second writer fail at
    once.

    Args:
        spec: the run. With ``spec.out`` the run writes its folder.
        resume: continue SVI training from ``spec.out``'s last checkpoint;
            changes that can apply (learning rate, epochs, evaluation) are
            applied and listed in ``RunResult.notes``, others refused.
        overwrite: replace a finished run in ``spec.out`` (without it, an
            existing run folder is refused).
        evaluate_only: load the trained model from ``spec.out`` instead of
            training, then evaluate it with ``spec.eval`` (``pyrovae eval``).
        progress: show progress bars (default: the spec's ``fit.progress``).
        callbacks: loggers and monitors for SVI training
            (:mod:`pyrovae.infer.callbacks`); they watch, the spec decides.
    """
    spec = spec.check()
    if spec.method == "svi" and not evaluate_only and worker_process(spec.fit_config(resume)):
        return _run_worker(spec, resume, progress)
    out, notes = _check_out(spec, resume, overwrite, evaluate_only)
    t0 = time.perf_counter()
    train, test = load_data(spec)
    if train.dim != test.dim:
        raise ValueError(f"the train split has {train.dim} columns but the test split "
                         f"{test.dim}")
    metrics: Dict[str, Any] = {"n_train": len(train), "n_test": len(test)}
    options = model_options(spec, train.dim, len(train))
    model = None
    if spec.method != "sklearn":
        model = build_model(spec.model, train.dim, options, seed=spec.seed, device=spec.device)
    _check_splits(model, train, test, spec.eval.seed)
    diagnostics = _diagnostics(spec, train.dim, options, test, notes)
    with contextlib.ExitStack() as stack:
        if out is not None:
            stack.enter_context(FolderLock(out, what="run"))
            remove_stale_temporaries(out)
            if overwrite:
                _clear_run(out)
        return _execute(spec, out, model, options, train, test, metrics, notes, resume,
                        evaluate_only, progress, t0, callbacks, diagnostics)


def _diagnostics(spec: RunSpec, x_dim: int, options: Dict[str, Any], test: ArrayDataset,
                 notes: List[str]) -> Tuple[str, ...]:
    """The latent diagnostics ("latents", "gap") the run measures: those its
    metrics name that apply to the model. With the default metrics, one that
    does not apply is left out with a note; named explicitly, it is refused
    here, before anything is written or trained.

    Whether they apply shows when the programs run, so they run here on a
    separate, identically built instance: a model that initializes itself
    from the first data it sees (a mixture's k-means start) must first see
    the training data, and the run's random streams are left as they were.
    """
    wanted = [m for m in ("latents", "gap") if m in spec.metrics]
    explicit = tuple(spec.metrics) != DEFAULT_METRICS
    x = test.fixed(spec.eval.seed)
    n = len(x) if spec.eval.max_points is None else min(len(x), spec.eval.max_points)
    probe = None
    measured = []
    for metric in wanted:
        reason = None
        if spec.method == "sklearn":
            reason = f"method {spec.method!r} keeps no Pyro model"
        elif metric == "latents" and n < 2:
            reason = f"the activity is a variance over held-out points, and {n} is evaluated"
        else:
            if probe is None:
                probe = build_model(spec.model, x_dim, options, seed=spec.seed,
                                    device=spec.device)
            with seeded(spec.eval.seed, x.device):
                if metric == "latents" and not continuous_local_latents(probe, x):
                    reason = ("the model has no continuous local latent variables (guide "
                              "sample sites inside pyro.plate('data'))")
                elif metric == "gap":
                    try:
                        check_inference_gap(probe, x)
                    except ValueError as err:
                        reason = str(err)
        if reason is None:
            measured.append(metric)
        elif explicit or metric == "gap":
            raise ValueError(f"metric {metric!r} does not apply to model {spec.model!r}: "
                             f"{reason}; leave it out of the metrics")
        else:
            notes.append(f"{metric} not measured: {reason}")
    return tuple(measured)


def _run_worker(spec: RunSpec, resume: bool, progress: Optional[bool]) -> RunResult:
    """A rank other than 0 of a multi-process run (``fit.devices`` x
    ``fit.num_nodes`` > 1): it builds the same model, trains alongside rank 0
    and writes nothing; rank 0 checks and writes the run folder and evaluates."""
    train, test = load_data(spec)
    options = model_options(spec, train.dim, len(train))
    model = build_model(spec.model, train.dim, options, seed=spec.seed, device=spec.device)
    fitted = _train_svi(spec, model, train, test, resume, progress, metadata={})
    history = fitted.pop("history")
    for key in ("objective", "config", "stopped"):
        fitted.pop(key)
    return RunResult(spec=spec, model=model, history=history, evaluation=None, metrics=fitted,
                     notes=[], figures=[], out=None)


def _execute(spec: RunSpec, out: Optional[Path], model: Any, options: Dict[str, Any],
             train: ArrayDataset, test: ArrayDataset, metrics: Dict[str, Any],
             notes: List[str], resume: bool, evaluate_only: bool,
             progress: Optional[bool], t0: float, callbacks: Optional[List[Any]],
             diagnostics: Tuple[str, ...] = ()) -> RunResult:
    history = pd.DataFrame()
    objective = None
    evaluation = None
    latents: Optional[LatentStats] = None
    gap: Optional[InferenceGap] = None
    config = {**spec.to_dict(), "x_dim": train.dim, "built_options": options, **versions()}
    if out is not None and not evaluate_only:
        write_atomic(out / CONFIG_FILE, json.dumps(config, indent=2, default=str))
    if spec.method == "sklearn":
        model, fitted = _run_sklearn(spec, train, test)
        metrics.update(fitted)
    else:
        if evaluate_only:
            _load_state(model, out)
            history_path = out / "history.csv"
            if history_path.exists():
                history = pd.read_csv(history_path)
            if spec.method == "svi":
                objective = _svi_objective(spec)
        elif spec.method == "em":
            fitted = _train_em(spec, model, train)
            history = fitted.pop("history")
            metrics.update(fitted)
            if out is not None:
                save_checkpoint(out / CHECKPOINT_FILE, {
                    "format": CHECKPOINT_FORMAT, "model_state": model.state_dict(),
                    "config": {"method": "em"}, "epoch": 0, "step": metrics["steps"],
                    "metadata": {"spec": spec.to_dict()}, "versions": versions(),
                })
        else:
            if "gradients" in spec.metrics:
                metrics.update(_initial_gradients(spec, train, test, options))
            try:
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always", RuntimeWarning)
                    fitted = _train_svi(spec, model, train, test, resume, progress,
                                        metadata={"spec": spec.to_dict(), "x_dim": train.dim,
                                                  "built_options": options},
                                        callbacks=callbacks)
            except TrainingDiverged as err:
                if out is not None and len(err.history):
                    write_atomic(out / "history.csv", err.history.to_csv(index=False))
                raise
            for w in caught:
                if issubclass(w.category, RuntimeWarning) and "exploding" in str(w.message):
                    notes.append(str(w.message))
                else:
                    warnings.showwarning(w.message, w.category, w.filename, w.lineno)
            history = fitted.pop("history")
            objective = fitted.pop("objective")
            fitted.pop("config")
            stopped = fitted.pop("stopped")
            if stopped:
                notes.append(stopped)
            metrics.update(fitted)
        evaluation, latents, gap = _score(spec, model, train, test, objective, metrics, notes,
                                          diagnostics)
    if "elbo" in spec.metrics and math.isnan(metrics.get("train_elbo", NAN)):
        metrics["train_elbo"] = metrics.get("last_train_elbo", NAN)
    metrics.pop("last_train_elbo", None)
    exact = metrics.get("test_exact", NAN)
    for metric, column in (("test_elbo", "elbo_gap"), ("test_iwae", "iwae_gap"),
                           ("test_objective", "objective_gap")):
        metrics[column] = metrics.get(metric, NAN) - exact
    metrics["wall_seconds"] = time.perf_counter() - t0
    figures: List[Path] = []
    files: List[Path] = []
    if out is not None:
        if not evaluate_only and len(history):
            write_atomic(out / "history.csv", history.to_csv(index=False))
        if evaluation is not None:
            columns = {**(latents.summary() if latents is not None else {}),
                       **(gap.summary() if gap is not None else {})}
            frame = evaluation.to_frame().assign(**columns)
        else:
            frame = pd.DataFrame([{k: v for k, v in metrics.items()}])
        write_atomic(out / "metrics.csv", frame.to_csv(index=False))
        # A table this evaluation did not measure would contradict metrics.csv.
        for name, table in ((LATENTS_FILE, None if latents is None else latents.dims),
                            (GAP_FILE, None if gap is None else gap.points)):
            if table is not None:
                write_atomic(out / name, table.to_csv(index=False))
            else:
                with contextlib.suppress(FileNotFoundError):
                    (out / name).unlink()
        if spec.method != "sklearn":
            figures = _write_figures(spec, model, history, train, test, out, latents)
        files = [out / name for name in RUN_FILES if (out / name).exists()]
    return RunResult(spec=spec, model=model, history=history, evaluation=evaluation,
                     metrics=metrics, notes=notes, figures=figures, out=out, latents=latents,
                     gap=gap, files=files)


# -- trained models back --------------------------------------------------------------


def _load_state(model: Any, folder: Path) -> None:
    state = load_checkpoint(folder / CHECKPOINT_FILE)
    if isinstance(model, torch.nn.Module):
        load_weights(model, state["model_state"], folder / CHECKPOINT_FILE)
        model.eval()
    else:
        model.load_state_dict(state["model_state"])


def read_spec(folder: Union[str, Path]) -> RunSpec:
    """The spec of a run folder written by :func:`run`."""
    path = Path(folder) / CONFIG_FILE
    if not path.exists():
        raise FileNotFoundError(f"{folder} is not a pyrovae run folder: no {CONFIG_FILE}")
    try:
        saved = json.loads(path.read_text())
        if not isinstance(saved, dict):
            raise TypeError(f"expected a JSON object, got a {type(saved).__name__}")
        return RunSpec.from_dict(saved)
    except (json.JSONDecodeError, TypeError, OSError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not a readable pyrovae run config: {err}") from None


def _registered_classes() -> Dict[str, type]:
    found: Dict[str, type] = {}
    stack = [LatentModel]
    while stack:
        cls = stack.pop()
        stack.extend(cls.__subclasses__())
        if cls.__module__.startswith("pyrovae."):
            found[f"{cls.__module__}.{cls.__qualname__}"] = cls
    return found


def load_run(folder: Union[str, Path]) -> Any:
    """The trained model of a folder, ready for ``evaluate``, ``sample`` and
    ``encode``.

    Works on a run folder written by :func:`run` (``pyrovae train``) and on a
    folder written by ``fit(checkpoint_dir=...)`` for a pyrovae model; a
    model class of your own is rebuilt by you and given its weights with
    ``model.load_state_dict(load_checkpoint(folder)["model_state"])``.
    """
    folder = Path(folder)
    if (folder / CONFIG_FILE).exists():
        spec = read_spec(folder)
        saved = json.loads((folder / CONFIG_FILE).read_text())
        if spec.method == "sklearn":
            raise ValueError(f"{folder} holds a scikit-learn run, which keeps no model")
        if isinstance(saved.get("x_dim"), bool) or not isinstance(saved.get("x_dim"), int):
            raise ValueError(f"{folder / CONFIG_FILE} has no x_dim (the data dimension), so the "
                             "model cannot be rebuilt; restore the file or train again")
        options = saved.get("built_options", spec.model_options)
        model = build_model(spec.model, saved["x_dim"], options, seed=spec.seed)
        _load_state(model, folder)
        return model
    state = load_checkpoint(folder / CHECKPOINT_FILE)
    name = state.get("model_class")
    cls = _registered_classes().get(name or "")
    if cls is None:
        raise ValueError(
            f"{folder} holds a checkpoint of {name or 'an unnamed model'}, which is not a "
            "pyrovae model: rebuild it yourself and load the weights with "
            "model.load_state_dict(pyrovae.infer.fit.load_checkpoint(folder)['model_state'])"
        )
    model = cls(**state.get("model_config", {}))
    load_weights(model, state["model_state"], folder / CHECKPOINT_FILE)
    model.eval()
    return model
