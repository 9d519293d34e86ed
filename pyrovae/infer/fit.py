"""Training: stochastic variational inference over epochs, with checkpoints.

``fit`` runs any objective from :mod:`pyrovae.infer.objectives` (Pyro's ELBOs or
pyrovae's own) on a model object or on a pair of Pyro callables.
:func:`pyrovae.infer.program.resolve` reads the programs once: their
parameters (the model object's ``nn.Module`` parameters and every ``param``
site, as :class:`pyro.infer.SVI` finds them), plate nesting, and the model's
own objective, used when none is named. A plain ``torch.optim`` optimizer
updates the parameters. The result is returned, not printed.

Seeds: ``seed`` decides the order of the batches, every draw the programs
make and the initial value of every ``pyro.param`` created during the run. A
module's weights were drawn when it was built, before ``fit``: build it with
:func:`pyrovae.build_model` (``seed=``) or inside :func:`pyrovae.seeded` to
make them reproducible too, as ``pyrovae train`` and suite cells do.
"""

from __future__ import annotations

import importlib.util
import inspect
import math
import sys
import time
import warnings
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import pandas as pd
import pyro
import torch
from tqdm.auto import tqdm

from pyrovae.data.core import ArrayDataset, as_dataset, check_finite
from pyrovae.files import atomic_path
from pyrovae.infer.callbacks import Callbacks, EarlyStopping, EpochLines, FitState, schedule_factor
from pyrovae.infer.fastpath import FastELBO
from pyrovae.infer.objectives import make_objective
from pyrovae.infer.program import (data_placement, describe_error, first_line, module_of,
                                   resolve, without_trace_shapes)
from pyrovae.models.base import capability
from pyrovae.seeding import derive_seed, seeded

CHECKPOINT_FORMAT = 1
OPTIMIZERS = {
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
    "sgd": torch.optim.SGD,
    "rmsprop": torch.optim.RMSprop,
}
#: How each optimizer updates many tensors at once where torch can: in one
#: fused kernel per tensor (Adam, AdamW, SGD), else with its multi-tensor
#: ("foreach") kernels, instead of about ten operations per tensor and step.
_BATCHED_UPDATE = {"adam": "fused", "adamw": "fused", "sgd": "fused", "rmsprop": "foreach"}


#: Constructor arguments pyrovae sets itself (``lr`` has its own field).
_OWN_OPTIMIZER_ARGS = ("params", "lr", "fused", "foreach", "capturable", "differentiable",
                       "maximize")


def optimizer_option_names(name: str) -> List[str]:
    """The options ``optimizer_options`` may set for optimizer ``name``
    (for Adam: betas, eps, weight_decay, amsgrad)."""
    return [p for p in inspect.signature(OPTIMIZERS[name]).parameters
            if p not in _OWN_OPTIMIZER_ARGS]


def optimizer_settings(options: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    """``optimizer_options`` as the optimizer keeps them (``betas`` a tuple)."""
    settings = dict(options or {})
    if "betas" in settings:
        settings["betas"] = tuple(settings["betas"])
    return settings


def make_optimizer(name: str, params: List[torch.Tensor], lr: float,
                   options: Optional[Dict[str, Any]] = None) -> torch.optim.Optimizer:
    """``OPTIMIZERS[name]`` on ``params`` with ``options`` (``eps``, ``betas``,
    ``weight_decay``, ``momentum``, ...), in torch's fused (or multi-tensor)
    implementation where every parameter is a floating-point tensor on a CPU
    or CUDA device. The update is the optimizer's, the same rule computed in
    fewer kernels (the last bits may differ from the one-tensor-at-a-time
    loop); a checkpoint keeps the choice, so a resumed run computes as the
    run it continues."""
    cls = OPTIMIZERS[name]
    options = optimizer_settings(options)
    batched = _BATCHED_UPDATE.get(name)
    if batched and params and all(p.is_floating_point() and p.device.type in ("cpu", "cuda")
                                  for p in params):
        options[batched] = True
    return cls(params, lr=lr, **options)


HISTORY_COLUMNS = [
    "epoch", "step", "train_elbo", "test_elbo", "test_recon", "test_kl", "seconds", "lr",
    "skipped",
]
# A per-point loss this many times larger than at the start (plus a margin for
# losses near zero) means training is running away.
EXPLOSION_FACTOR = 1e3
#: Multi-process training loops, used when devices * num_nodes > 1.
#: pyrovae.infer.distributed builds on this module and registers "fabric"
#: itself (as pyrovae's objectives fill ELBOS); importing pyrovae.infer does it.
PARALLEL_ENGINES: Dict[str, Callable[..., Any]] = {}


class TrainingDiverged(FloatingPointError):
    """The loss or a gradient became NaN or infinite.

    ``history`` holds the epochs completed before; the last checkpoint, if
    any, is the one of the last completed epoch.
    """

    def __init__(self, message: str, history: pd.DataFrame) -> None:
        super().__init__(message)
        self.history = history


def _versions() -> Dict[str, str]:
    from pyrovae.version import __version__

    return {"pyrovae": str(__version__), "torch": str(torch.__version__), "pyro": str(pyro.__version__)}



@dataclass
class FitConfig:
    """Everything that decides a training run; stored in every checkpoint."""

    elbo: Any = None  # objective name in ELBOS or an ELBO object (None: the model's default_elbo)
    num_particles: int = 1  # samples per data point in each gradient estimate
    # Draw the particles in one batched pass (None: batched when num_particles
    # > 1 and the programs allow it, see pyrovae.infer.objectives).
    vectorize_particles: Optional[bool] = None
    elbo_options: Dict[str, Any] = field(default_factory=dict)  # extra objective kwargs
    # Extra optimizer arguments: eps, betas, weight_decay, amsgrad (Adam, AdamW),
    # momentum, nesterov (SGD), alpha, centered (RMSprop).
    optimizer_options: Dict[str, Any] = field(default_factory=dict)
    epochs: int = 10  # passes over the training set
    max_steps: Optional[int] = None  # stop early after this many steps in total
    max_seconds: Optional[float] = None  # stop once training time passes this (wall-clock budget)
    batch_size: int = 128  # data points per step; the last partial batch is dropped
    lr: float = 1e-3  # learning rate
    optimizer: str = "adam"  # one of OPTIMIZERS
    seed: int = 0  # seeds batching, every Pyro draw and lazily created pyro.param values
    eval_every: int = 1  # epochs between held-out evaluations (0: never)
    eval_size: int = 2000  # held-out points used in those evaluations
    checkpoint_dir: Optional[str] = None  # where checkpoint.pt goes (None: nowhere)
    resume: bool = False  # continue from checkpoint_dir/checkpoint.pt if present
    progress: bool = True  # show a progress bar
    skip_nonfinite: bool = False  # skip (and count) batches with a NaN/inf loss or gradient
    lr_schedule: Optional[str] = None  # cosine | step:N:GAMMA | exponential:GAMMA | warmup:N
    early_stopping: Optional[int] = None  # stop after N evaluations without held-out gain
    clip_grad: Optional[float] = None  # clip the gradient's total norm to this value
    # Steps between reads of the loss back to the host (None: every step on a
    # CPU, where a read costs nothing, and every 50 on a GPU, where each read
    # stalls the device). Between reads, NaN/inf losses and gradients are
    # caught at the next read, naming the first bad step.
    sync_every: Optional[int] = None
    # Skip Pyro's per-step trace bookkeeping for programs whose sites do not
    # change (Trace_ELBO and TraceMeanField_ELBO; same loss and gradients).
    fast_path: bool = True
    # On the fast path, record each input shape's loss as a graph of tensor
    # operations and replay it (same loss and gradients, without Python's
    # per-step cost), checked against the program at every epoch's start and
    # end; turn it off for programs whose computation reads Python state that
    # changes during training.
    capture: bool = True
    # Data-parallel training (pyrovae.infer.distributed, needs pyrovae[distributed]):
    # used when devices * num_nodes > 1, where batch_size is the global batch.
    devices: int = 1  # processes (one per device) on each machine
    num_nodes: int = 1  # machines (started by torchrun, SLURM or one command per node)
    strategy: str = "auto"  # Lightning Fabric strategy: ddp, ddp_spawn, ... (auto: ddp)
    accelerator: str = "auto"  # Fabric accelerator: cpu, gpu, cuda, auto

    def __post_init__(self) -> None:
        checks = [
            (self.num_particles >= 1, "num_particles must be >= 1"),
            (self.vectorize_particles in (None, True, False),
             "vectorize_particles must be true, false or None (batched where possible)"),
            (self.epochs >= 0, "epochs must be >= 0"),
            (self.max_steps is None or self.max_steps >= 0, "max_steps must be >= 0"),
            (self.max_seconds is None or self.max_seconds > 0, "max_seconds must be > 0"),
            (self.batch_size >= 1, "batch_size must be >= 1"),
            (self.lr > 0, "lr must be > 0"),
            (self.eval_every >= 0, "eval_every must be >= 0"),
            (self.eval_size >= 1, "eval_size must be >= 1"),
            (self.optimizer in OPTIMIZERS,
             f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}"),
            (not self.resume or self.checkpoint_dir, "resume=True needs a checkpoint_dir"),
            (self.early_stopping is None or (isinstance(self.early_stopping, int)
                                             and self.early_stopping >= 1),
             "early_stopping must be an integer >= 1 (evaluations without gain)"),
            (self.sync_every is None or (not isinstance(self.sync_every, bool)
                                         and isinstance(self.sync_every, int)
                                         and self.sync_every >= 1),
             "sync_every must be an integer >= 1 (steps between reads of the loss)"),
            (self.clip_grad is None or (isinstance(self.clip_grad, (int, float))
                                        and math.isfinite(self.clip_grad) and self.clip_grad > 0),
             "clip_grad must be a finite number > 0"),
            *[(not isinstance(getattr(self, name), bool) and isinstance(getattr(self, name), int)
               and getattr(self, name) >= 1, f"{name} must be an integer >= 1")
              for name in ("devices", "num_nodes")],
            *[(isinstance(getattr(self, name), str) and getattr(self, name),
               f"{name} must be a name such as {example}")
              for name, example in (("strategy", "'ddp'"), ("accelerator", "'cpu' or 'gpu'"))],
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"FitConfig: {message}")
        world = self.devices * self.num_nodes
        if world > 1 and importlib.util.find_spec("lightning") is None:
            raise ValueError(f"FitConfig: devices x num_nodes = {world} trains on Lightning "
                             "Fabric, which is not installed: pip install 'pyrovae[distributed]'")
        if world > 1 and self.batch_size % world:
            raise ValueError(f"FitConfig: batch_size {self.batch_size} is the global batch and "
                             f"must divide evenly over devices x num_nodes = {world} processes")
        schedule_factor(self.lr_schedule, 0, max(self.epochs, 1))  # raises for a bad name
        if not isinstance(self.optimizer_options, dict):
            raise ValueError("FitConfig: optimizer_options must be a mapping such as "
                             "{'eps': 1e-4}")
        if "lr" in self.optimizer_options:
            raise ValueError("FitConfig: the learning rate is lr (--lr), not an optimizer option")
        betas = self.optimizer_options.get("betas", (0.9, 0.999))
        if not (isinstance(betas, (list, tuple)) and len(betas) == 2):
            raise ValueError(f"FitConfig: optimizer option betas must be two numbers such as "
                             f"[0.9, 0.999], got {betas!r}")
        unknown = sorted(set(self.optimizer_options) - set(optimizer_option_names(self.optimizer)))
        if unknown:
            raise ValueError(f"FitConfig: optimizer {self.optimizer} takes no option "
                             f"{', '.join(unknown)}; it takes "
                             f"{', '.join(optimizer_option_names(self.optimizer))}")
        try:  # the values, checked by the optimizer itself on a stand-in tensor
            make_optimizer(self.optimizer, [torch.zeros(1, requires_grad=True)], self.lr,
                           self.optimizer_options)
        except (ValueError, TypeError, IndexError) as err:
            raise ValueError(f"FitConfig: optimizer_options {self.optimizer_options}: "
                             f"{first_line(err)}") from None

    def to_dict(self) -> Dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["elbo_options"] = dict(self.elbo_options)
        d["optimizer_options"] = dict(self.optimizer_options)
        if not isinstance(d["elbo"], str):
            d["elbo"] = type(self.elbo).__name__
        return d


@dataclass
class FitResult:
    """What a training run leaves: the trained programs and their history."""

    model: Any
    guide: Callable
    history: pd.DataFrame
    config: FitConfig
    objective: Any
    checkpoint: Optional[Path] = None
    steps: int = 0
    stopped: str = ""  # why a callback ended training early ("" when it ran its budget)

    @property
    def final(self) -> pd.Series:
        return self.history.iloc[-1]



def diverged(what: str, step: int, epoch: int, ckpt_path: Optional[Path], lr: float,
             fix: str, history: pd.DataFrame) -> TrainingDiverged:
    """The one-line error of a run that diverged at ``step`` during epoch
    ``epoch + 1``, naming the checkpoint that is kept."""
    where = (f"; the checkpoint of epoch {epoch} in {ckpt_path.parent} is kept"
             if ckpt_path is not None and epoch > 0 else "")
    return TrainingDiverged(
        f"{what} at step {step} (epoch {epoch + 1}){where}; lower the learning rate "
        f"(now {lr}) and resume, {fix}", history)


#: The advice of a diverged step, and of an update that overflowed the parameters.
NONFINITE_FIX = "check the data for NaN/inf, or skip such batches with skip_nonfinite"
OVERFLOW_FIX = "or clip the gradients (clip_grad)"


def exploding(loss: float, start_loss: float, step: int, lr: float) -> Optional[str]:
    """A warning when the per-point ``loss`` is far beyond the one at the start."""
    if abs(loss) > EXPLOSION_FACTOR * (abs(start_loss) + 1.0):
        return (f"the loss is exploding: {loss:.4g} per data point at step {step} against "
                f"{start_loss:.4g} at the start; lower the learning rate (now {lr})")
    return None


def step_problem(loss: float, step: int, start_step: int, params: List[torch.Tensor],
                 config: "FitConfig", x: torch.Tensor, grads_finite: Callable[[], bool],
                 on_error: Callable[[], Any], history: Callable[[], pd.DataFrame]) -> Optional[str]:
    """What went wrong in a training step, in words (None when nothing did).

    Raises, after ``on_error()`` cleans up, for what skipping a batch cannot
    mend: programs whose parameters get no gradient, and a loss that is not
    finite before any update, where the data rather than the learning rate
    is the cause.
    """
    if step == start_step and math.isfinite(loss) and not any(p.grad is not None for p in params):
        raise ValueError(
            "the objective produced no gradients for the parameters: register "
            "networks with pyro.module(name, net) (LatentModel.register) inside "
            "model/guide, or use pyro.param"
        )
    if math.isfinite(loss):
        return None if grads_finite() else "a gradient became NaN or infinite"
    if not all(bool(torch.isfinite(p).all()) for p in params):
        return "a parameter became NaN or infinite"
    if step == 0 and not config.skip_nonfinite:
        on_error()
        raise TrainingDiverged(
            f"the loss was {loss} at step 1, before any update, so the learning "
            f"rate is not the cause: the data (largest |x| = "
            f"{x.abs().max().item():.3g}) is likely too large for this model "
            f"in {x.dtype}; standardize it, or check the initial parameters", history())
    return f"the loss became {loss}"


def _finite_gradients(params: List[torch.Tensor]) -> bool:
    """Whether every gradient is finite, exactly (one reduction, one host sync)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return True
    return bool(torch.stack([torch.isfinite(g).all() for g in grads]).all())


def gradients_finite_flag(params: List[torch.Tensor]) -> torch.Tensor:
    """A 0-dim boolean tensor on the parameters' device, False when some
    gradient may hold a NaN or infinity; nothing is read back to the host.

    A NaN or infinity in any gradient reaches the sum of all gradient sums, so
    True is exact. False is exact too, except when finite gradients are so
    large (about 1e38 in float32) that the sum overflows; callers that must
    know confirm a False with :func:`_finite_gradients`. One summation per
    tensor costs a thirtieth of ``isfinite(g).all()`` on a CPU.
    """
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.ones((), dtype=torch.bool, device=params[0].device if params else None)
    return torch.isfinite(torch.stack([g.sum() for g in grads]).sum())


def _loss_and_grads(objective: Any, loss_fn: Callable, model_fn: Callable, guide_fn: Callable,
                    x: torch.Tensor) -> torch.Tensor:
    """One gradient evaluation; returns the loss as a detached 0-dim tensor
    (read it back when needed: on a GPU every read is a host synchronization).
    ``loss_fn(x)`` is the objective's differentiable loss (see :class:`FastELBO`).
    ``differentiable_loss`` reaches every tensor the programs use; Pyro's
    ``loss_and_grads`` only runs backward when the trace has ``param`` sites,
    so it is the fallback for objectives without the former (TraceGraph_ELBO,
    RenyiELBO)."""
    if hasattr(objective, "differentiable_loss"):
        loss = loss_fn(x)
        loss.backward()
        return loss.detach()
    return torch.as_tensor(objective.loss_and_grads(model_fn, guide_fn, x))


def device_rng_state(device: torch.device) -> Dict[str, Any]:
    """The CUDA generator's state of the device training runs on, for a
    checkpoint (empty on a CPU): Pyro's draws on a GPU come from it, so a
    resumed GPU run needs it to continue exactly."""
    if device.type != "cuda":
        return {}
    index = device.index if device.index is not None else torch.cuda.current_device()
    return {"cuda_rng": torch.cuda.get_rng_state(index), "cuda_device": index}


def restore_device_rng(state: Dict[str, Any], device: torch.device, path: Any) -> None:
    """Put back the CUDA generator saved by :func:`device_rng_state`.

    A checkpoint written on a GPU and resumed on a CPU (or the reverse)
    continues with other draws; that is said in a warning rather than
    silently."""
    saved = "cuda_rng" in state
    if device.type == "cuda" and saved:
        index = device.index if device.index is not None else torch.cuda.current_device()
        torch.cuda.set_rng_state(state["cuda_rng"], index)
    elif device.type == "cuda" or saved:
        warnings.warn(
            f"{path} was written by a run on {'a GPU' if saved else 'the CPU'} and resumes on "
            f"{device}: training continues, with other random draws than the uninterrupted "
            "run would have made", RuntimeWarning, stacklevel=3)


class _Ledger:
    """The losses of the epoch's finished steps, as read back to the host, and
    the one warning of a loss far beyond the first one."""

    def __init__(self, start_loss: Optional[float], lr: float) -> None:
        self.start_loss, self.lr = start_loss, lr
        self.warned = False
        self.losses: List[float] = []
        self.sizes: List[int] = []

    def new_epoch(self) -> None:
        self.losses, self.sizes = [], []

    def record(self, loss: float, size: int, step: int) -> None:
        self.losses.append(loss)
        self.sizes.append(size)
        if self.start_loss is None:
            self.start_loss = loss / size
        elif not self.warned and (message := exploding(loss / size, self.start_loss, step,
                                                       self.lr)):
            self.warned = True
            warnings.warn(message, RuntimeWarning, stacklevel=4)


def save_checkpoint(path: Path, state: Dict[str, Any]) -> None:
    """Write atomically and durably (a unique temporary file, fsynced, then
    renamed): a crash mid-write never corrupts the last checkpoint, and two
    writers never share a temporary file."""
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: Union[str, Path]) -> Dict[str, Any]:
    """Load a checkpoint with ``weights_only=True``: tensors and plain
    containers only, so no code in the file ever runs."""
    path = Path(path)
    if path.is_dir():
        path = path / "checkpoint.pt"
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001  (torch raises many kinds for bad files)
        kind = "holds objects other than tensors and plain containers" \
            if "weights_only" in str(err) or "Unpickl" in type(err).__name__ \
            else "is damaged or truncated"
        raise ValueError(
            f"{path} {kind}, so it was not loaded: pyrovae only reads checkpoints it "
            "wrote, and never runs code from one; restore the file from a backup or "
            "train again"
        ) from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"{path} is not a pyrovae checkpoint (format {found})")
    if not isinstance(state.get("model_state"), dict):
        raise ValueError(f"{path} has no model_state (the trained weights), so it is not a "
                         "complete pyrovae checkpoint; restore it from a backup or train again")
    return state


#: What a checkpoint needs besides the weights to continue training.
RESUME_KEYS = ("param_store", "optimizer", "epoch", "step", "seconds", "history", "torch_rng",
               "generator_rng")


def check_world_size(state: Dict[str, Any], path: Union[str, Path], world_size: int) -> None:
    """Refuse to resume a checkpoint written by another number of processes:
    its random streams and batch shards belong to that number."""
    saved = state.get("world_size", 1)
    if saved != world_size:
        raise ValueError(
            f"{path} was written by a run on {saved} process{'es' if saved != 1 else ''} and "
            f"this one has {world_size}: resume it with devices x num_nodes = {saved}, or start "
            "a new run"
        )


def load_weights(module: torch.nn.Module, state: Dict[str, Any], path: Union[str, Path]) -> None:
    """``module.load_state_dict(state)``, with one clear line when the weights
    of checkpoint ``path`` do not fit the module or are not finite."""
    own = module.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    reshaped = [k for k in own if k in state
                and tuple(getattr(state[k], "shape", ())) != tuple(own[k].shape)]
    if missing or unexpected or reshaped:
        parts = [f"{label} {keys[:3]}" for label, keys in (
            ("missing", missing), ("unexpected", unexpected), ("other shapes for", reshaped))
            if keys]
        raise ValueError(
            f"{path} does not fit this {type(module).__name__} ({'; '.join(parts)}): it was "
            "written for another model or other options (z_dim, hidden, ...); use the options "
            "it was trained with, or train again"
        )
    bad = [k for k, v in state.items() if isinstance(v, torch.Tensor) and v.is_floating_point()
           and not bool(torch.isfinite(v).all())]
    if bad:
        raise ValueError(f"{path} holds NaN or infinite weights {bad[:3]}; restore it from a "
                         "backup or train again")
    module.load_state_dict(state)


def fit(
    model: Any,
    train: Union[ArrayDataset, torch.Tensor],
    test: Union[ArrayDataset, torch.Tensor, None] = None,
    *,
    guide: Optional[Callable] = None,
    config: Optional[FitConfig] = None,
    metadata: Optional[Dict[str, Any]] = None,
    callbacks: Optional[List[Any]] = None,
    **overrides: Any,
) -> FitResult:
    """Train ``model`` (and its guide) with SVI.

    Args:
        model: a model object with ``model(x)`` and ``guide(x)`` methods (for
            example :class:`pyrovae.VAE`), or a Pyro model callable with
            ``guide`` given.
        train: training data, ``ArrayDataset`` or an (N, D) tensor.
        test: held-out data for the per-epoch held-out ELBO (optional).
        guide: the guide callable when ``model`` is a bare callable.
        config: a :class:`FitConfig`; keyword ``overrides`` replace its fields.
        metadata: plain data stored in every checkpoint (a run's spec).
        callbacks: objects with any of the hooks of
            :mod:`pyrovae.infer.callbacks` (loggers, your own monitors).

    On resume the optimizer state is restored and then the configured
    learning rate and ``optimizer_options`` applied, so a lowered ``lr`` takes
    effect; ``history`` records the rate of every epoch.

    Raises :class:`TrainingDiverged` when the loss or a gradient becomes NaN
    or infinite (unless ``skip_nonfinite``), naming the step and epoch; the
    checkpoint of the last completed epoch stays as it was.

    Returns:
        :class:`FitResult` whose ``history`` has one row per epoch: ``epoch``,
        ``step``, ``train_elbo`` (mean per data point over the epoch's batches),
        ``test_elbo``, ``test_recon`` (E_q log p(x | z)), ``test_kl``
        (E_q log q(z | x) - log p(z)), all in nats per data point, and
        cumulative training ``seconds`` (evaluation time excluded).
    """
    from pyrovae.infer.evaluate import elbo_terms  # evaluate builds on fit's results

    config = config or FitConfig()
    if overrides:
        valid = {f.name for f in fields(FitConfig)}
        unknown = sorted(set(overrides) - valid)
        if unknown:
            raise ValueError(f"unknown fit options {unknown}; valid: {sorted(valid)}")
        config = replace(config, **overrides)
    dtype, device = data_placement(model, train)
    train = as_dataset(train, "train", dtype=dtype, device=device)
    test = None if test is None else as_dataset(test, "test", dtype=dtype, device=device)
    if train.dim != (test.dim if test is not None else train.dim):
        raise ValueError(f"train data has {train.dim} columns but test data has {test.dim}")
    check_finite(train.x, "the training data")
    if test is not None:
        check_finite(test.x, "the test data")
    check_data = capability(model, "check_data")
    if check_data is not None:
        check_data(train.x[:1000] if train.binarize != "dynamic" else train.fixed()[:1000])
        if test is not None:  # the held-out ELBO of every epoch scores it too
            try:
                check_data(test.x[:1000] if test.binarize != "dynamic" else test.fixed()[:1000])
            except ValueError as err:
                raise ValueError(f"the test data: {err}") from None
    if config.devices * config.num_nodes > 1:
        # Data-parallel training on Lightning Fabric; the loop below stays the
        # single-process path, with no Lightning import and no wrapper.
        return PARALLEL_ENGINES["fabric"](model, train, test, guide=guide, config=config,
                                          metadata=metadata, callbacks=callbacks)
    ckpt_path = None
    if config.checkpoint_dir:
        Path(config.checkpoint_dir).mkdir(parents=True, exist_ok=True)
        ckpt_path = Path(config.checkpoint_dir) / "checkpoint.pt"
    if config.early_stopping is not None and (test is None or not config.eval_every):
        raise ValueError("early_stopping watches the held-out ELBO: pass test data and "
                         "eval_every >= 1")
    steps_per_epoch = train.steps_per_epoch(config.batch_size)
    test_x = None if test is None else test.fixed(seed=config.seed)[: config.eval_size]

    owner = module_of(model)
    if owner is not None:
        bad = [n for n, p in owner.named_parameters() if not bool(torch.isfinite(p).all())]
        if bad:
            raise ValueError(f"the model's parameters {bad[:3]} hold NaN or infinite values "
                             "before training; rebuild the model or load a good checkpoint")
    with seeded(config.seed, train.x.device):
        gen = torch.Generator(device=train.x.device).manual_seed(config.seed)
        program = resolve(model, guide, train.x[: config.batch_size], require_params=True)
        model_fn, guide_fn, module = program.model, program.guide, program.module
        params, store_only = list(program.params), program.store_params
        num_data = program.num_data
        if config.elbo is None:
            config = replace(config, elbo=program.default_elbo)
        objective = (
            make_objective(config.elbo, config.num_particles, config.vectorize_particles,
                           **{"max_plate_nesting": program.max_plate_nesting,
                              **config.elbo_options})
            if isinstance(config.elbo, str)
            else config.elbo
        )
        loss_fn = FastELBO(objective, model_fn, guide_fn, program.max_plate_nesting,
                           enabled=config.fast_path, capture=config.capture,
                           modules=[module] if module is not None else [], params=params)
        optim = make_optimizer(config.optimizer, params, config.lr, config.optimizer_options)
        optim.zero_grad(set_to_none=True)  # no stale gradients from earlier calls
        history: List[Dict[str, Any]] = []
        epoch, step, seconds = 0, 0, 0.0
        if config.resume and ckpt_path is not None and ckpt_path.exists():
            state = load_checkpoint(ckpt_path)
            lacking = [k for k in RESUME_KEYS if k not in state]
            if lacking:
                raise ValueError(f"{ckpt_path} lacks {lacking}, which training needs to "
                                 "continue (an EM run's checkpoint, or a damaged one); start "
                                 "a new run instead of resuming")
            check_world_size(state, ckpt_path, 1)
            if module is not None:
                load_weights(module, state["model_state"], ckpt_path)
            for name, value in state["param_store"].items():
                if name in store_only:
                    store_only[name].data.copy_(value)
            optim.load_state_dict(state["optimizer"])
            for group in optim.param_groups:  # the configured rate and options apply
                group["lr"] = config.lr
                group.update(optimizer_settings(config.optimizer_options))
            epoch, step, seconds = state["epoch"], state["step"], state["seconds"]
            history = [{"lr": float("nan"), "skipped": 0,
                        **dict(zip(state["history"]["columns"], row))}
                       for row in state["history"]["rows"]]
            torch.set_rng_state(state["torch_rng"])
            gen.set_state(state["generator_rng"])
            restore_device_rng(state, train.x.device, ckpt_path)

        total = config.epochs * steps_per_epoch
        if config.max_steps is not None:
            total = min(total, config.max_steps)
        # A bar on a terminal; one line per epoch in a log file or CI output.
        interactive = config.progress and sys.stderr.isatty()
        bar = tqdm(total=total, initial=min(step, total), disable=not interactive,
                   desc="fit", unit="step", leave=False)
        extra = []
        if config.early_stopping is not None:
            extra.append(EarlyStopping(config.early_stopping))
        if config.progress and not interactive:
            extra.append(EpochLines())
        hooks = Callbacks([*extra, *(callbacks or [])])
        fit_state = FitState(model=model, optimizer=optim, config=config, epoch=epoch, step=step,
                             total_steps=total, history=history)
        hooks("on_fit_start", fit_state)
        on_step = getattr(objective, "on_step", None)
        sync_every = config.sync_every or (50 if train.x.is_cuda else 1)
        if config.skip_nonfinite or hooks.wants("on_step"):
            sync_every = 1  # both need each step's loss on the host at once
        start_step = step
        start_loss: Optional[float] = None if not history else state.get("start_loss")
        ledger = _Ledger(start_loss, config.lr)
        # Steps whose loss and gradient flag still live on the device.
        pending: List[Tuple[int, torch.Tensor, torch.Tensor, int]] = []

        def read_back() -> None:
            """Read the pending steps' losses in one transfer and check them."""
            if not pending:
                return
            values = torch.stack([torch.stack([l.to(g.device, torch.float64), g.to(torch.float64)])
                                  for _, l, g, _ in pending]).tolist()
            for (at, _, _, size), (loss, grads_fine) in zip(pending, values):
                bad = step_problem(loss, at, start_step, params, config, train.x,
                                   grads_finite=lambda: bool(grads_fine),
                                   on_error=lambda: bar.close(),
                                   history=lambda: pd.DataFrame(history, columns=HISTORY_COLUMNS))
                if bad is not None:
                    bar.close()
                    raise diverged(bad, at + 1, epoch, ckpt_path, config.lr, NONFINITE_FIX,
                                   pd.DataFrame(history, columns=HISTORY_COLUMNS))
                ledger.record(loss, size, at + 1)
            pending.clear()

        out_of_time = False
        while epoch < config.epochs and step < total and not out_of_time and not fit_state.stop:
            program.train()
            lr = config.lr * schedule_factor(config.lr_schedule, epoch, config.epochs)
            for group in optim.param_groups:
                group["lr"] = lr
            t0 = time.perf_counter()
            ledger.new_epoch()
            loss_fn.new_epoch()
            skipped = 0
            for xb in train.batches(config.batch_size, gen):
                if step >= total:
                    break
                if config.max_seconds is not None and step % 10 == 0:
                    if seconds + time.perf_counter() - t0 > config.max_seconds:
                        out_of_time = True
                        break
                if on_step is not None:
                    on_step(step)
                try:
                    loss_t = _loss_and_grads(objective, loss_fn, model_fn, guide_fn, xb)
                except ValueError as err:
                    # Pyro's argument validation is where NaN parameters
                    # usually surface; name the divergence, not the symptom.
                    original = without_trace_shapes(err)
                    if all(bool(torch.isfinite(p).all()) for p in params):
                        if step == start_step:  # the programs never ran: not a divergence
                            if original is err:
                                raise
                            raise original from None
                        # They ran before at this shape: training took a parameter
                        # out of its range (a zero or infinite scale).
                        bar.close()
                        raise TrainingDiverged(
                            f"the model became invalid at step {step + 1} (epoch {epoch + 1}): "
                            f"{describe_error(original)}; lower the learning rate (now "
                            f"{config.lr}) or clip the gradients (clip_grad)",
                            pd.DataFrame(history, columns=HISTORY_COLUMNS),
                        ) from None
                    loss_t = torch.tensor(float("nan"))
                size = num_data or xb.shape[0]
                grads_ok = gradients_finite_flag(params)
                if sync_every == 1 or step == start_step:
                    loss, grads_fine = (v for v in torch.stack(
                        [loss_t.to(grads_ok.device, torch.float64),
                         grads_ok.to(torch.float64)]).tolist())
                    bad = step_problem(
                        loss, step, start_step, params, config, train.x,
                        # A False flag may be an overflowing sum: confirm it exactly.
                        grads_finite=lambda: bool(grads_fine) or _finite_gradients(params),
                        on_error=lambda: (optim.zero_grad(set_to_none=True), bar.close()),
                        history=lambda: pd.DataFrame(history, columns=HISTORY_COLUMNS))
                    if bad is not None:
                        optim.zero_grad(set_to_none=True)
                        if config.skip_nonfinite:
                            skipped += 1
                            step += 1
                            bar.update(1)
                            continue
                        bar.close()
                        raise diverged(bad, step + 1, epoch, ckpt_path, config.lr, NONFINITE_FIX,
                                       pd.DataFrame(history, columns=HISTORY_COLUMNS))
                    ledger.record(loss, size, step + 1)
                else:
                    pending.append((step, loss_t, grads_ok, size))
                if config.clip_grad is not None:
                    torch.nn.utils.clip_grad_norm_(params, config.clip_grad)
                optim.step()
                optim.zero_grad(set_to_none=True)
                step += 1
                bar.update(1)
                if len(pending) >= sync_every:
                    read_back()
                if hooks.callbacks:
                    fit_state.step = step
                    if sync_every == 1:
                        fit_state.loss = ledger.losses[-1] / size
                    hooks("on_step", fit_state)
                if step % 20 == 0 and ledger.losses:
                    bar.set_postfix(elbo=f"{-ledger.losses[-1] / ledger.sizes[-1]:.2f}")
            read_back()
            stale = loss_fn.check()
            if stale:  # before the epoch's evaluation, callbacks and checkpoint
                bar.close()
                raise ValueError(stale)
            losses, sizes = ledger.losses, ledger.sizes
            if losses and not all(bool(torch.isfinite(p).all()) for p in params):
                # The epoch's last update overflowed: stop before an evaluation or a
                # checkpoint sees the parameters.
                bar.close()
                raise diverged("a parameter became NaN or infinite", step, epoch, ckpt_path,
                               config.lr, OVERFLOW_FIX,
                               pd.DataFrame(history, columns=HISTORY_COLUMNS))
            seconds += time.perf_counter() - t0
            epoch += 1
            row = {
                "epoch": epoch, "step": step,
                "train_elbo": -sum(losses) / max(sum(sizes), 1) if losses else float("nan"),
                "test_elbo": float("nan"), "test_recon": float("nan"), "test_kl": float("nan"),
                "seconds": seconds, "lr": lr, "skipped": skipped,
            }
            fit_state.epoch, fit_state.step, fit_state.row = epoch, step, row
            last = epoch >= config.epochs or step >= total or out_of_time
            if test_x is not None and config.eval_every and (epoch % config.eval_every == 0 or last):
                program.eval()
                # Evaluation draws from its own stream: whether and how often
                # the held-out ELBO is computed never changes the training.
                with seeded(derive_seed(config.seed, epoch), train.x.device):
                    try:
                        terms = elbo_terms(program, None, test_x)
                    except ValueError as err:  # parameters out of range (a zero scale)
                        bar.close()
                        raise TrainingDiverged(
                            f"the held-out evaluation after epoch {epoch} failed: "
                            f"{describe_error(err)}; training took the "
                            f"parameters out of range: lower the learning rate (now "
                            f"{config.lr}) or clip the gradients (clip_grad)",
                            pd.DataFrame(history, columns=HISTORY_COLUMNS),
                        ) from None
                row.update({f"test_{k}": v.mean().item() for k, v in terms.items()})
                if not math.isfinite(row["test_elbo"]):
                    bar.close()
                    raise TrainingDiverged(
                        f"the held-out ELBO after epoch {epoch} is {row['test_elbo']}: the test "
                        f"data (largest |x| = {test_x.abs().max().item():.3g}) is far outside "
                        f"what the model can score in {test_x.dtype}, or training took the "
                        "parameters out of range; standardize the data, or lower the learning "
                        f"rate (now {config.lr})",
                        pd.DataFrame(history, columns=HISTORY_COLUMNS),
                    )
                bar.set_postfix(elbo=f"{row['train_elbo']:.2f}", test=f"{row['test_elbo']:.2f}")
                hooks("on_evaluation", fit_state)
            hooks("on_epoch_end", fit_state)
            history.append(row)
            if ckpt_path is not None:
                save_checkpoint(ckpt_path, {
                    "format": CHECKPOINT_FORMAT,
                    "model_state": module.state_dict() if module is not None else {},
                    "model_name": type(module).__name__ if module is not None else None,
                    # What load_run needs to rebuild a registered model.
                    "model_class": (f"{type(module).__module__}.{type(module).__qualname__}"
                                    if module is not None else None),
                    "model_config": module.config() if hasattr(module, "config") else {},
                    "param_store": {k: v.detach().clone() for k, v in store_only.items()},
                    "optimizer": optim.state_dict(),
                    "epoch": epoch, "step": step, "seconds": seconds,
                    "history": {"columns": HISTORY_COLUMNS,
                                "rows": [[r[c] for c in HISTORY_COLUMNS] for r in history]},
                    "torch_rng": torch.get_rng_state(),
                    **device_rng_state(train.x.device),
                    "generator_rng": gen.get_state(),
                    "config": config.to_dict(),
                    "start_loss": ledger.start_loss,
                    "versions": _versions(),
                    "metadata": metadata or {},
                })
        bar.close()
        hooks("on_fit_end", fit_state)
    program.eval()
    return FitResult(
        model=model, guide=guide_fn, history=pd.DataFrame(history, columns=HISTORY_COLUMNS),
        config=config, objective=objective, checkpoint=ckpt_path, steps=step,
        stopped=fit_state.stop_reason if fit_state.stop else "",
    )
