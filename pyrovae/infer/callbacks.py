"""Hooks into :func:`pyrovae.infer.fit`: see training while it runs and act on it.

A callback is any object with some of these methods; ``fit`` calls the ones
it has, in the order the callbacks were given, with one :class:`FitState`:

- ``on_fit_start(state)``: parameters, optimizer and history are ready
  (after a resume too);
- ``on_step(state)``: after every optimizer step (``state.loss`` is that
  step's loss per data point);
- ``on_evaluation(state)``: after a held-out evaluation (``state.row`` has
  ``test_elbo``, ``test_recon``, ``test_kl``);
- ``on_epoch_end(state)``: after the epoch's history row is complete and
  before its checkpoint is written;
- ``on_fit_end(state)``: after training, also when it was stopped early.

A callback asks ``fit`` to stop by setting ``state.stop = True``; the epoch
in progress is finished and checkpointed first. What changes the numbers
of a run (learning-rate schedule, early stopping, gradient clipping) is a
:class:`~pyrovae.infer.fit.FitConfig` field, so it is saved in checkpoints and
resumes exactly; the loggers here only watch.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Union

import torch

HOOKS = ("on_fit_start", "on_step", "on_evaluation", "on_epoch_end", "on_fit_end")


@dataclass
class FitState:
    """What a callback sees of a training run."""

    model: Any  #: the model object (or model callable)
    optimizer: torch.optim.Optimizer
    config: Any  #: the run's FitConfig
    epoch: int = 0  #: epochs completed
    step: int = 0  #: optimizer steps taken
    total_steps: int = 0  #: steps the run will take at most
    loss: float = math.nan  #: the last step's loss per data point (negative ELBO)
    row: Dict[str, Any] = field(default_factory=dict)  #: the current epoch's history row
    history: List[Dict[str, Any]] = field(default_factory=list)  #: completed epochs' rows
    stop: bool = False  #: set by a callback to end training after this epoch
    stop_reason: str = ""  #: why, for the history and the logs


class Callbacks:
    """Calls each hook on every callback that has it."""

    def __init__(self, callbacks: Optional[List[Any]] = None) -> None:
        self.callbacks = list(callbacks or [])
        for cb in self.callbacks:
            if not any(callable(getattr(cb, hook, None)) for hook in HOOKS):
                raise TypeError(f"{type(cb).__name__} is not a callback: it has none of the "
                                f"methods {', '.join(HOOKS)}")

    def wants(self, hook: str) -> bool:
        """Whether some callback has ``hook``."""
        return any(callable(getattr(cb, hook, None)) for cb in self.callbacks)

    def __call__(self, hook: str, state: FitState) -> None:
        for cb in self.callbacks:
            method = getattr(cb, hook, None)
            if callable(method):
                method(state)


# -- schedules and stopping (decided by FitConfig fields) ---------------------------------


def schedule_factor(schedule: Optional[str], epoch: int, epochs: int) -> float:
    """The factor on the base learning rate for ``epoch`` (0-based) of ``epochs``.

    ``schedule`` is None (constant), ``"cosine"`` (cosine decay to 0 over the
    run), ``"step:N:G"`` (times G every N epochs), ``"exponential:G"`` (times
    G every epoch), ``"warmup:N"`` (linear from 1/N to 1 over N epochs) or
    ``"stages:B:G"`` (times G^i in stage i = 0, 1, ..., which lasts B^i
    epochs: ``stages:3:0.7196856730011519``, G = 10^(-1/7), is the schedule of
    Burda et al. 2016, 3,280 epochs over i = 0..7). A function of the epoch
    alone, so a resumed run continues it exactly.
    """
    if schedule is None:
        return 1.0
    name, *args = schedule.split(":")
    try:
        values = [float(a) for a in args]
    except ValueError:
        values = []
    if name == "cosine" and not args:
        return 0.5 * (1.0 + math.cos(math.pi * epoch / max(epochs, 1)))
    if name == "step" and len(values) == 2 and values[0] >= 1 and values[1] > 0:
        return values[1] ** (epoch // int(values[0]))
    if name == "exponential" and len(values) == 1 and values[0] > 0:
        return values[0] ** epoch
    if name == "warmup" and len(values) == 1 and values[0] >= 1:
        return min(1.0, (epoch + 1) / values[0])
    if (name == "stages" and len(values) == 2 and values[0] >= 1
            and values[0] == int(values[0]) and values[1] > 0):
        stage, start, base = 0, 0, int(values[0])
        while epoch >= start + base ** stage:
            start += base ** stage
            stage += 1
        return values[1] ** stage
    raise ValueError(
        f"unknown learning-rate schedule {schedule!r}; use cosine, step:N:GAMMA, "
        "exponential:GAMMA, warmup:N or stages:B:GAMMA"
    )


class EarlyStopping:
    """Stop when the held-out ELBO has not improved by more than ``min_delta``
    for ``patience`` evaluations in a row."""

    def __init__(self, patience: int, min_delta: float = 0.0) -> None:
        if int(patience) != patience or patience < 1:
            raise ValueError(f"early-stopping patience must be an integer >= 1, got {patience!r}")
        self.patience, self.min_delta = int(patience), float(min_delta)

    def on_fit_start(self, state: FitState) -> None:
        # Rebuilt from the history, so a resumed run stops where an
        # uninterrupted one would.
        self.best, self.waited = -math.inf, 0
        for row in state.history:
            self._update(row.get("test_elbo", math.nan))

    def _update(self, value: float) -> None:
        if math.isnan(value):
            return
        if value > self.best + self.min_delta:
            self.best, self.waited = value, 0
        else:
            self.waited += 1

    def on_evaluation(self, state: FitState) -> None:
        self._update(state.row.get("test_elbo", math.nan))
        if self.waited >= self.patience:
            state.stop = True
            state.stop_reason = (f"early stopping: no held-out ELBO gain for {self.patience} "
                                 f"evaluations (best {self.best:.4f})")


# -- display ---------------------------------------------------------------------------


class EpochLines:
    """One line per epoch on a stream: the progress display when the output
    is a log file or CI output rather than a terminal."""

    def __init__(self, stream: Any = None) -> None:
        self.stream = stream

    def on_epoch_end(self, state: FitState) -> None:
        row = state.row
        parts = [f"epoch {row['epoch']}/{state.config.epochs}", f"step {row['step']}",
                 f"train_elbo {row['train_elbo']:.4f}"]
        if not math.isnan(row.get("test_elbo", math.nan)):
            parts.append(f"test_elbo {row['test_elbo']:.4f}")
        parts.append(f"lr {row['lr']:.3g}")
        parts.append(f"{row['seconds']:.1f} s")
        print("fit: " + ", ".join(parts), file=self.stream or sys.stderr, flush=True)


# -- loggers ---------------------------------------------------------------------------


class TensorBoardLogger:
    """Scalars per step and per epoch, and a figure of the ELBO curves per
    evaluation, in TensorBoard event files under ``log_dir`` (needs the
    ``tensorboard`` package: ``pip install 'pyrovae[logging]'``)."""

    def __init__(self, log_dir: Union[str, Path], every_steps: int = 10) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ValueError("TensorBoard logging needs the tensorboard package: "
                             "pip install 'pyrovae[logging]'") from None
        self._writer_cls = SummaryWriter
        self.log_dir, self.every_steps = str(log_dir), int(every_steps)
        self.writer = None

    def on_fit_start(self, state: FitState) -> None:
        self.writer = self._writer_cls(self.log_dir)

    def on_step(self, state: FitState) -> None:
        if state.step % self.every_steps == 0:
            self.writer.add_scalar("step/train_elbo", -state.loss, state.step)

    def on_epoch_end(self, state: FitState) -> None:
        for key, value in state.row.items():
            if key not in ("epoch", "step") and isinstance(value, (int, float)) \
                    and not math.isnan(value):
                self.writer.add_scalar(f"epoch/{key}", value, state.row["epoch"])
        self.writer.flush()

    def on_evaluation(self, state: FitState) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rows = [*state.history, state.row]
        fig, ax = plt.subplots(figsize=(5, 3.2))
        ax.plot([r["epoch"] for r in rows], [r["train_elbo"] for r in rows], label="train")
        ax.plot([r["epoch"] for r in rows], [r.get("test_elbo", math.nan) for r in rows],
                label="held-out")
        ax.set_xlabel("epoch")
        ax.set_ylabel("ELBO per data point")
        ax.legend()
        self.writer.add_figure("elbo", fig, state.row["epoch"], close=True)

    def on_fit_end(self, state: FitState) -> None:
        if self.writer is not None:
            self.writer.close()


class MLflowLogger:
    """The run's parameters, per-epoch metrics and (at the end) the files of
    ``artifact_dir`` in an MLflow run (needs ``mlflow``: ``pip install
    'pyrovae[logging]'``). ``tracking_uri`` as MLflow takes it (a folder
    ``file:/path``, a server URL); None uses MLflow's default or
    ``$MLFLOW_TRACKING_URI``."""

    def __init__(self, tracking_uri: Optional[str] = None, experiment: str = "pyrovae",
                 run_name: Optional[str] = None, params: Optional[Dict[str, Any]] = None,
                 artifact_dir: Optional[Union[str, Path]] = None,
                 end_with_fit: bool = True) -> None:
        try:
            import mlflow  # noqa: F401  (fail at construction, not mid-run)
        except ImportError:
            raise ValueError("MLflow logging needs the mlflow package: "
                             "pip install 'pyrovae[logging]'") from None
        self.tracking_uri, self.experiment, self.run_name = tracking_uri, experiment, run_name
        try:  # reach the store now, so a bad URI fails before training, not after
            from mlflow.tracking import MlflowClient

            MlflowClient(tracking_uri).search_experiments(max_results=1)
        except Exception as err:  # noqa: BLE001  (MLflow raises many kinds)
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ValueError(f"MLflow tracking store {tracking_uri or '(default)'} cannot be "
                             f"used: {first}") from None
        self.params = dict(params or {})
        self.artifact_dir = artifact_dir
        # The pipeline ends the run itself, after the run folder is complete.
        self.end_with_fit = end_with_fit
        self.run_id: Optional[str] = None

    def on_fit_start(self, state: FitState) -> None:
        import mlflow

        if self.tracking_uri is not None:
            mlflow.set_tracking_uri(self.tracking_uri)
        mlflow.set_experiment(self.experiment)
        run = mlflow.start_run(run_name=self.run_name)
        self.run_id = run.info.run_id
        params = {**state.config.to_dict(), **self.params}
        mlflow.log_params({k: str(v)[:500] for k, v in params.items()})

    def on_epoch_end(self, state: FitState) -> None:
        import mlflow

        metrics = {k: float(v) for k, v in state.row.items()
                   if k not in ("epoch", "step") and isinstance(v, (int, float))
                   and math.isfinite(v)}
        mlflow.log_metrics(metrics, step=int(state.row["epoch"]))

    def on_fit_end(self, state: FitState) -> None:
        if self.end_with_fit:
            self.finish(failed=math.isnan(state.loss))

    def finish(self, metrics: Optional[Dict[str, Any]] = None,
               artifact_dir: Optional[Union[str, Path]] = None, failed: bool = False) -> None:
        """Log final ``metrics`` and the files of ``artifact_dir``, and end the run."""
        import mlflow

        if self.run_id is None:
            return
        if metrics:
            mlflow.log_metrics({f"final_{k}": float(v) for k, v in metrics.items()
                                if isinstance(v, (int, float)) and not isinstance(v, bool)
                                and math.isfinite(v)})
        folder = artifact_dir if artifact_dir is not None else self.artifact_dir
        if folder is not None and Path(folder).is_dir():
            for path in sorted(Path(folder).iterdir()):
                if path.is_file() and not path.name.startswith("."):
                    mlflow.log_artifact(str(path))
        mlflow.end_run("FAILED" if failed else "FINISHED")
        self.run_id = None


__all__ = [
    "FitState", "Callbacks", "EarlyStopping", "EpochLines", "TensorBoardLogger",
    "MLflowLogger", "schedule_factor", "HOOKS",
]

# Kept for type checkers of user callbacks: a callable taking the state.
Hook = Callable[[FitState], None]
