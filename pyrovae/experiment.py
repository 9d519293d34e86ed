"""One training run end to end: data -> model -> fit (or EM) -> evaluation ->
files. The CLI's ``train`` and ``eval`` commands are thin wrappers over
:func:`train_run` and :func:`evaluate_run`.

A run folder holds ``config.json`` (everything needed to rebuild the run),
``checkpoint.pt`` (weights-only), ``history.csv``, ``metrics.csv`` and the PNG
figures.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import pandas as pd
import torch

from pyrovae.data import DATASETS, ArrayDataset, load_dataset
from pyrovae.infer.evaluate import Evaluation, evaluate
from pyrovae.infer.fit import FitConfig, fit, load_checkpoint, save_checkpoint, CHECKPOINT_FORMAT
from pyrovae.models import MODELS
from pyrovae.viz import FIGURES
from pyrovae.viz.figures import loss_curves

METHODS = ("svi", "em")


@dataclass
class RunSpec:
    """What ``pyrovae train`` decides; saved as ``config.json`` in the run folder."""

    model: str = "vae"  # name in MODELS
    dataset: str = "mnist"  # name in DATASETS, or a path to a .csv file
    out: str = "runs/vae-mnist"  # run folder
    data_root: Optional[str] = None  # data folder (default: $PYROVAE_DATA or the cache)
    binarize: Optional[str] = "dynamic"  # image data: "dynamic", "static" or None
    train_size: Optional[int] = None  # use only the first N training points
    data_options: Dict[str, Any] = field(default_factory=dict)  # extra loader kwargs
    z_dim: Optional[int] = None  # latent dimension (None: the model's default)
    model_options: Dict[str, Any] = field(default_factory=dict)  # extra model kwargs
    method: str = "svi"  # "svi", or "em" for models with fit_em
    em_max_iter: int = 500  # EM iterations at most
    eval_samples: int = 1000  # K for the importance-sampled log-likelihood
    eval_points: Optional[int] = None  # evaluate on the first N test points only
    device: str = "cpu"  # where data and parameters live
    fit: Dict[str, Any] = field(default_factory=dict)  # FitConfig fields

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        MODELS.get_checked(self.model)
        if not self.dataset.endswith(".csv"):
            DATASETS.get_checked(self.dataset)
        valid = {f.name for f in fields(FitConfig)}
        unknown = sorted(set(self.fit) - valid)
        if unknown:
            raise ValueError(f"unknown fit options {unknown}; valid: {sorted(valid)}")

    def fit_config(self, resume: bool = False, default_elbo: str = "Trace_ELBO") -> FitConfig:
        return FitConfig(**{"elbo": default_elbo, **self.fit, "checkpoint_dir": self.out,
                            "resume": resume})


@dataclass
class RunResult:
    spec: RunSpec
    model: Any
    history: pd.DataFrame
    evaluation: Evaluation
    figures: List[Path]
    out: Path


def load_data(spec: RunSpec) -> Tuple[ArrayDataset, ArrayDataset]:
    """Train and held-out splits for a run."""
    if spec.dataset.endswith(".csv"):
        from pyrovae.data.tabular import load_csv

        train = load_csv(spec.dataset, split="train", **spec.data_options)
        test = load_csv(spec.dataset, split="test", **spec.data_options)
    else:
        loader = DATASETS.get_checked(spec.dataset)
        options: Dict[str, Any] = {"root": spec.data_root, **spec.data_options}
        if spec.dataset in ("mnist", "fashion-mnist", "binarized-mnist"):
            options["binarize"] = spec.binarize
        try:
            train, test = loader(split="train", **options), loader(split="test", **options)
        except TypeError as err:
            raise ValueError(f"bad options for data set {spec.dataset!r}: {err}") from None
    if spec.train_size is not None:
        train = train.subset(spec.train_size)
    return train.to(spec.device), test.to(spec.device)


def build_model(spec: RunSpec, x_dim: int):
    options = dict(spec.model_options)
    if spec.z_dim is not None:
        options["z_dim"] = spec.z_dim
    try:
        return MODELS.get_checked(spec.model)(x_dim, **options).to(spec.device)
    except TypeError as err:
        raise ValueError(f"bad options for model {spec.model!r}: {err}") from None


def _write_figures(spec: RunSpec, model, history, train, test, out: Path) -> List[Path]:
    paths: List[Path] = []
    if len(history) and history["train_elbo"].notna().any():
        paths.append(loss_curves(history, out / "loss_curves.png"))
    if spec.model in FIGURES:
        paths += FIGURES[spec.model](model, train, test, out)
    return paths


def train_run(spec: RunSpec, resume: bool = False) -> RunResult:
    """Train, evaluate and write everything into ``spec.out``.

    With ``resume`` and an existing ``checkpoint.pt``, SVI training continues
    from the last completed epoch.
    """
    out = Path(spec.out)
    out.mkdir(parents=True, exist_ok=True)
    config_path = out / "config.json"
    if resume and config_path.exists():
        saved = json.loads(config_path.read_text())
        if saved.get("model") != spec.model or saved.get("dataset") != spec.dataset:
            raise ValueError(
                f"{out} holds a run of {saved.get('model')} on {saved.get('dataset')}; "
                "resume it with the same model and data set, or choose another --out"
            )
    train, test = load_data(spec)
    model = build_model(spec, train.dim)
    config_path.write_text(json.dumps({**asdict(spec), "x_dim": train.dim}, indent=2))
    if spec.method == "em":
        if not hasattr(model, "fit_em"):
            raise ValueError(f"model {spec.model!r} has no EM algorithm; use --method svi")
        em = model.fit_em(train.x, max_iter=spec.em_max_iter)
        history = em.history
        save_checkpoint(out / "checkpoint.pt", {
            "format": CHECKPOINT_FORMAT, "model_state": model.state_dict(),
            "config": {"method": "em"}, "epoch": 0, "step": len(history),
        })
    else:
        # Models may name the objective that suits them (an enumerating one
        # for discrete latents); --elbo overrides it.
        default = getattr(model, "default_elbo", "Trace_ELBO")
        result = fit(model, train, test, config=spec.fit_config(resume, default))
        history = result.history
    history.to_csv(out / "history.csv", index=False)
    evaluation = evaluate(model, test, num_samples=spec.eval_samples, max_points=spec.eval_points,
                          seed=int(spec.fit.get("seed", 0)))
    evaluation.to_csv(out / "metrics.csv")
    figures = _write_figures(spec, model, history if spec.method == "svi" else pd.DataFrame(
        columns=["train_elbo"]), train, test, out)
    return RunResult(spec, model, history, evaluation, figures, out)


def load_run(out: str | Path):
    """Rebuild the trained model of a run folder: ``(spec, model, train, test)``."""
    out = Path(out)
    config_path = out / "config.json"
    if not config_path.exists():
        raise FileNotFoundError(f"{out} is not a pyrovae run folder: no config.json")
    saved = json.loads(config_path.read_text())
    x_dim = saved.pop("x_dim")
    spec = RunSpec(**{k: v for k, v in saved.items() if k in {f.name for f in fields(RunSpec)}})
    train, test = load_data(spec)
    model = build_model(spec, x_dim)
    state = load_checkpoint(out / "checkpoint.pt")
    model.load_state_dict(state["model_state"])
    model.eval()
    return spec, model, train, test


def evaluate_run(out: str | Path, num_samples: Optional[int] = None,
                 eval_points: Optional[int] = None, seed: int = 0) -> RunResult:
    """Evaluate a finished run again (for example with more importance samples)
    and rewrite its metrics and figures."""
    spec, model, train, test = load_run(out)
    evaluation = evaluate(
        model, test,
        num_samples=spec.eval_samples if num_samples is None else num_samples,
        max_points=spec.eval_points if eval_points is None else eval_points, seed=seed,
    )
    out = Path(out)
    evaluation.to_csv(out / "metrics.csv")
    history_path = out / "history.csv"
    history = pd.read_csv(history_path) if history_path.exists() else pd.DataFrame()
    figures = _write_figures(spec, model, history if spec.method == "svi" else pd.DataFrame(
        columns=["train_elbo"]), train, test, out)
    return RunResult(spec, model, history, evaluation, figures, out)
