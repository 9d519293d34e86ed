"""Data-parallel SVI on Lightning Fabric: ``fit(..., devices=N, num_nodes=M)``.

Lightning Fabric (``pip install 'pyrovae[distributed]'``) starts the
processes (or joins the ones torchrun or SLURM started), sets up the process
group and wraps the trained module in PyTorch's ``DistributedDataParallel``;
pyrovae keeps its own loop, objectives, history, checkpoints and callbacks.

One step on W = devices x num_nodes processes:

- **data**: every rank draws the same seeded permutation of the epoch (the
  epoch's generator, as one process does) and the same global batches of
  ``batch_size``; rank r takes rows ``r*b .. (r+1)*b`` of each,
  ``b = batch_size / W`` (:meth:`ArrayDataset.batches`). Partial batches are
  dropped, so every rank takes the same number of steps, and together the
  ranks see exactly the data stream of one process at ``batch_size``.
- **gradients**: :class:`ObjectiveModule` makes the objective an
  ``nn.Module`` (as Pyro's ``ELBOModule``): ``forward(x)`` is
  ``objective.differentiable_loss(model, guide, x)``, computed on ``fit``'s
  fast path where it applies (:class:`~pyrovae.infer.fastpath.FastELBO`, its
  recorded graph included; every rank checks its graph at the epoch's end,
  and if one is out of date all stop). ``fabric.setup`` wraps
  it in DDP, whose gradient hooks all-reduce (average) the gradients during
  ``fabric.backward``. Each rank's loss is first scaled by
  ``size(B) / size(b)`` (W for a data plate over the batch, 1 for a plate
  scaled to ``num_data``), so the averaged gradient is the gradient of the
  global batch's objective: the one a single process takes at
  ``batch_size``, and the learning rate means the same.
- **history**: the epoch's loss and size sums are all-reduced at its end, so
  ``train_elbo`` is the objective per data point over all ranks. Within the
  epoch the one collective of a step is DDP's: a rank whose loss is not finite
  (or whose programs failed) adds NaN to its gradient, so the all-reduced
  gradients give every rank the same verdict, and all skip or stop together.
  Per-step figures (``FitState.loss`` for callbacks, the progress display)
  are rank 0's share of the step.
- **seeds**: the programs are read and the parameters made under ``seed`` on
  every rank (DDP broadcasts rank 0's parameters at setup in any case); then
  rank r draws its Pyro noise from ``derive_seed(seed, RANK_SALT, r)``, so
  no two ranks draw the same noise.
- **rank 0** alone evaluates on held-out data, runs the callbacks (loggers,
  early stopping, the progress display), writes checkpoints and, in the
  pipeline, the run folder; its epoch row, stop decision and clock (for
  ``max_seconds``) are broadcast, so all ranks stop together. A checkpoint
  records the world size and every rank's random state; it resumes with the
  same number of processes only.

The single-process path of :func:`pyrovae.infer.fit` never imports the
engine: Lightning is imported inside :func:`fit_distributed` only. This
module builds on :mod:`pyrovae.infer.fit` and registers the loop in its
``PARALLEL_ENGINES`` (importing :mod:`pyrovae.infer` does), so ``fit``
reaches it without importing it.
"""

from __future__ import annotations

import io
import math
import os
import sys
import time
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import pandas as pd
import pyro
import torch
from torch import nn
from tqdm.auto import tqdm

from pyrovae.data.core import ArrayDataset
from pyrovae.infer.callbacks import Callbacks, EarlyStopping, EpochLines, FitState, schedule_factor
from pyrovae.infer.fit import (CHECKPOINT_FORMAT, HISTORY_COLUMNS, NONFINITE_FIX,
                               OVERFLOW_FIX, PARALLEL_ENGINES, RESUME_KEYS, FitConfig, FitResult,
                               TrainingDiverged, check_world_size, diverged, exploding,
                               load_checkpoint, load_weights, make_optimizer, optimizer_settings,
                               save_checkpoint, step_problem)
from pyrovae.infer.fastpath import FastELBO
from pyrovae.infer.objectives import make_objective
from pyrovae.infer.program import (describe_error, first_line, module_of, resolve,
                                   split_programs, without_trace_shapes)
from pyrovae.models.base import default_elbo
from pyrovae.seeding import derive_seed, seeded
from pyrovae.version import __version__

#: Salt of the per-rank seeds (kept apart from the per-epoch evaluation seeds).
RANK_SALT = 0x5EED
#: Fabric strategies whose gradients are DDP's all-reduce: the ones this loop is written for.
STRATEGY_HINT = "ddp, ddp_spawn, ddp_fork, ddp_notebook or ddp_find_unused_parameters_true"
# Variables a launcher sets in the processes it starts: torchrun (RANK),
# Fabric's child processes (NODE_RANK, LOCAL_RANK), SLURM's srun (SLURM_PROCID).
_RANK_VARIABLES = ("RANK", "NODE_RANK", "LOCAL_RANK")



def _finite_gradients(params: List[torch.Tensor]) -> bool:
    grads = [p.grad for p in params if p.grad is not None]
    return not grads or bool(torch.stack([torch.isfinite(g).all() for g in grads]).all())


def _versions() -> Dict[str, str]:
    return {"pyrovae": str(__version__), "torch": str(torch.__version__),
            "pyro": str(pyro.__version__)}


def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, "") or default)
    except ValueError:
        return default


def world_size(config: FitConfig) -> int:
    """The number of training processes a config asks for."""
    return config.devices * config.num_nodes


def worker_process(config: FitConfig) -> bool:
    """Whether this process is a rank other than 0 of a multi-process run, as
    its launcher (torchrun, SLURM's srun, Fabric's child processes) announced
    in the environment. The process that launches the others is rank 0."""
    if world_size(config) == 1:
        return False
    names = [*_RANK_VARIABLES, *(["SLURM_PROCID"] if _env_int("SLURM_NTASKS", 1) > 1 else [])]
    return any(_env_int(name, 0) > 0 for name in names)


def rank_seed(seed: int, rank: int) -> int:
    """The seed of rank ``rank``'s draws in a run seeded with ``seed``."""
    return derive_seed(seed, RANK_SALT, rank)


class ObjectiveModule(nn.Module):
    """An objective on a (model, guide) pair as an ``nn.Module``, as Pyro's
    ``ELBOModule``: ``forward(x)`` is ``objective.differentiable_loss(model,
    guide, x)`` (the negative ELBO of the batch) and ``parameters()`` are the
    programs' modules' parameters. An engine that wraps modules (DDP) then
    trains it like any network.

    A ``ValueError`` from the programs (Pyro's argument checks, where NaN
    parameters surface) is kept in ``error`` and a NaN loss that reaches
    every parameter is returned instead: every rank must take part in each
    gradient all-reduce (or the others would wait for it forever), and the
    NaN gradients it adds tell every rank that the step failed.
    """

    def __init__(self, modules: List[nn.Module], objective: Any, model: Callable,
                 guide: Callable, loss_fn: Optional[Callable] = None) -> None:
        super().__init__()
        self.programs = nn.ModuleList(modules)
        self.objective, self.model_fn, self.guide_fn = objective, model, guide
        # The same loss, computed another way (fit's fast path, :class:`FastELBO`).
        self.loss_fn = loss_fn
        self.error: Optional[BaseException] = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.error = None
        try:
            if self.loss_fn is not None:
                return self.loss_fn(x)
            return self.objective.differentiable_loss(self.model_fn, self.guide_fn, x)
        except ValueError as err:
            self.error = err
            return self.nan_on_every_parameter()

    def nan_on_every_parameter(self) -> torch.Tensor:
        """NaN, as a function of every parameter: its gradient is NaN everywhere."""
        return torch.stack([p.sum() for p in self.parameters()]).sum() * math.nan


def _modules(model: Any, guide: Optional[Callable]) -> List[nn.Module]:
    """The distinct modules behind a model object and its two programs."""
    model_fn, guide_fn = split_programs(model, guide)
    found: Dict[int, nn.Module] = {}
    for obj in (model, guide_fn, model_fn):
        m = module_of(obj)
        if m is not None:
            found.setdefault(id(m), m)
    return list(found.values())


def _check_supported(model: Any, train: ArrayDataset, test: Optional[ArrayDataset],
                     guide: Optional[Callable], config: FitConfig) -> None:
    """Refuse, in one line and before any process starts, what the
    data-parallel loop cannot train."""
    world = world_size(config)
    if not _modules(model, guide):
        raise ValueError(
            f"devices x num_nodes = {world} trains an nn.Module model object (a pyrovae model, "
            "a PyroModule): DDP averages the gradients of module parameters, and bare model and "
            "guide callables have none"
        )
    elbo = config.elbo if config.elbo is not None else default_elbo(model)
    probe = make_objective(elbo, config.num_particles, config.vectorize_particles,
                           **config.elbo_options) if isinstance(elbo, str) else elbo
    if not callable(getattr(probe, "differentiable_loss", None)):
        name = elbo if isinstance(elbo, str) else type(elbo).__name__
        raise ValueError(
            f"objective {name} has no differentiable_loss, which devices x num_nodes = {world} "
            "needs (DDP averages the gradients of a loss tensor); use Trace_ELBO, "
            "TraceMeanField_ELBO, TraceEnum_ELBO, IWAE or BetaELBO, or train on one process"
        )
    if config.batch_size > len(train):
        raise ValueError(f"batch_size {config.batch_size} is larger than the training set "
                         f"({len(train)} points); lower it to at most {len(train)}")
    if config.early_stopping is not None and (test is None or not config.eval_every):
        raise ValueError("early_stopping watches the held-out ELBO: pass test data and "
                         "eval_every >= 1")
    for m in _modules(model, guide):
        bad = [n for n, p in m.named_parameters() if not bool(torch.isfinite(p).all())]
        if bad:
            raise ValueError(f"the model's parameters {bad[:3]} hold NaN or infinite values "
                             "before training; rebuild the model or load a good checkpoint")
    with seeded(config.seed, train.x.device):
        program = resolve(model, guide, train.x[: config.batch_size], require_params=True)
    if program.store_params:
        raise ValueError(
            f"devices x num_nodes = {world} trains parameters held by modules, and "
            f"{sorted(program.store_params)[:3]} are pyro.param sites outside them: make them "
            "nn.Parameter (or PyroParam) attributes of the model"
        )


def _make_fabric(config: FitConfig) -> Any:
    from lightning.fabric import Fabric
    from lightning.fabric.strategies import DDPStrategy

    try:
        fabric = Fabric(accelerator=config.accelerator, devices=config.devices,
                        num_nodes=config.num_nodes, strategy=config.strategy)
    except Exception as err:  # noqa: BLE001  (Lightning raises several kinds for bad settings)
        raise ValueError(
            f"Lightning Fabric cannot run accelerator={config.accelerator!r}, "
            f"devices={config.devices}, num_nodes={config.num_nodes}, "
            f"strategy={config.strategy!r}: {first_line(err)}"
        ) from None
    if not isinstance(fabric.strategy, DDPStrategy):
        raise ValueError(f"strategy {config.strategy!r} is not data-parallel in the way pyrovae "
                         f"trains (DDP's gradient all-reduce); use {STRATEGY_HINT}")
    return fabric


def fit_distributed(model: Any, train: ArrayDataset, test: Optional[ArrayDataset], *,
                    guide: Optional[Callable], config: FitConfig,
                    metadata: Optional[Dict[str, Any]] = None,
                    callbacks: Optional[List[Any]] = None) -> FitResult:
    """:func:`pyrovae.infer.fit` on ``devices x num_nodes`` processes
    (called by ``fit`` for such a config; the data are already checked).

    With strategy ``ddp`` (the default) Fabric starts the other processes by
    running this program's command again, so call it from a script (under
    ``if __name__ == "__main__":``) or the ``pyrovae`` command; ``ddp_spawn``
    runs the training in fresh processes that receive the model, data and
    callbacks by pickling, and copies the trained weights back. Under
    torchrun or SLURM the processes exist already and are joined.

    Every rank returns a :class:`FitResult` with the same history; rank 0's
    is the one to keep.
    """
    _check_supported(model, train, test, guide, config)
    fabric = _make_fabric(config)
    places = [next(iter(m.parameters()), torch.empty(0)).device for m in _modules(model, guide)]
    # Fabric gives each process cores / processes threads; the caller gets its own back.
    threads, omp = torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")
    try:
        result = fabric.launch(_fit_rank, model, train, test, guide, config, metadata, callbacks,
                               os.getpid())
    finally:
        torch.set_num_threads(threads)
        if omp is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = omp
    if isinstance(result, bytes):
        # Trained in spawned processes: rank 0's weights and history come back here.
        payload = torch.load(io.BytesIO(result), map_location="cpu", weights_only=False)
        for mine, state in zip(_modules(model, guide), payload["states"]):
            mine.load_state_dict(state)
            mine.eval()
        result = replace(payload["result"], model=model, guide=split_programs(model, guide)[1])
    for m, place in zip(_modules(model, guide), places):  # rank 0 trained on its own device
        m.to(place)
    return result


def _resume_payload(path: Path, world: int) -> Tuple[str, Any]:
    """Rank 0's reading of a checkpoint: ("none", None), ("state", state) or
    ("error", message), so every rank can act on it alike."""
    if not path.exists():
        return "none", None
    try:
        state = load_checkpoint(path)
        lacking = [k for k in RESUME_KEYS if k not in state]
        if lacking:
            raise ValueError(f"{path} lacks {lacking}, which training needs to continue (an EM "
                             "run's checkpoint, or a damaged one); start a new run instead of "
                             "resuming")
        check_world_size(state, path, world)
        if len(state.get("rank_rng") or []) != world:
            raise ValueError(f"{path} lacks the random state of each of its {world} processes; "
                             "start a new run instead of resuming")
    except (ValueError, FileNotFoundError) as err:
        return "error", str(err)
    return "state", state


def _fit_rank(fabric: Any, model: Any, train: ArrayDataset, test: Optional[ArrayDataset],
              guide: Optional[Callable], config: FitConfig, metadata: Optional[Dict[str, Any]],
              callbacks: Optional[List[Any]], caller: int) -> Any:
    """The training loop of one rank (the single-process loop of ``fit``, with
    the collective steps described in the module docstring). Returns the
    :class:`FitResult`, or, in a process spawned for it (not ``caller``),
    the trained weights and the result as bytes: tensors handed back through
    a queue would die with the process."""
    from pyrovae.infer.evaluate import elbo_terms

    rank, world = fabric.global_rank, fabric.world_size
    main = rank == 0
    modules = _modules(model, guide)
    device = fabric.device
    if train.x.device != device:  # one device per rank (GPUs)
        for m in modules:
            m.to(device)
        train = train.to(device)
        test = None if test is None else test.to(device)
    ckpt_path = None
    if config.checkpoint_dir:
        ckpt_path = Path(config.checkpoint_dir) / "checkpoint.pt"
        if main:
            ckpt_path.parent.mkdir(parents=True, exist_ok=True)
    steps_per_epoch = train.steps_per_epoch(config.batch_size)
    test_x = (None if test is None or not main
              else test.fixed(seed=config.seed)[: config.eval_size])

    def frame() -> pd.DataFrame:
        return pd.DataFrame(history, columns=HISTORY_COLUMNS)

    with seeded(config.seed, train.x.device):
        gen = torch.Generator(device=train.x.device).manual_seed(config.seed)
        program = resolve(model, guide, train.x[: config.batch_size], require_params=True)
        model_fn, guide_fn, module = program.model, program.guide, program.module
        params = list(program.params)
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
        # Parameters above were made under the run's seed on every rank; the
        # draws of training are each rank's own.
        torch.manual_seed(rank_seed(config.seed, rank))
        # fit's fast path, the recorded graph included: the same loss and gradients.
        loss_fn = FastELBO(objective, model_fn, guide_fn, program.max_plate_nesting,
                           enabled=config.fast_path, capture=config.capture, modules=modules,
                           params=params)
        loss_module = ObjectiveModule(modules, objective, model_fn, guide_fn, loss_fn)
        optim = make_optimizer(config.optimizer, params, config.lr, config.optimizer_options)
        # The global batch's loss over this rank's share: DDP averages the gradients
        # of the scaled losses into the gradient of the global batch's loss.
        scale = (num_data or config.batch_size) / (num_data or config.batch_size // world)
        history: List[Dict[str, Any]] = []
        epoch, step, seconds = 0, 0, 0.0
        start_loss: Optional[float] = None
        if config.resume and ckpt_path is not None:
            kind, state = fabric.broadcast(_resume_payload(ckpt_path, world) if main else None, 0)
            if kind == "error":
                raise ValueError(state)
            if kind == "state":
                if module is not None:
                    load_weights(module, state["model_state"], ckpt_path)
                optim.load_state_dict(state["optimizer"])
                for group in optim.param_groups:  # the configured rate and options apply
                    group["lr"] = config.lr
                    group.update(optimizer_settings(config.optimizer_options))
                epoch, step, seconds = state["epoch"], state["step"], state["seconds"]
                history = [{"lr": float("nan"), "skipped": 0,
                            **dict(zip(state["history"]["columns"], row))}
                           for row in state["history"]["rows"]]
                torch.set_rng_state(state["rank_rng"][rank])
                gen.set_state(state["generator_rng"])
                start_loss = state.get("start_loss")
        ddp_module, optim = fabric.setup(loss_module, optim)
        optim.zero_grad(set_to_none=True)

        total = config.epochs * steps_per_epoch
        if config.max_steps is not None:
            total = min(total, config.max_steps)
        interactive = main and config.progress and sys.stderr.isatty()
        bar = tqdm(total=total, initial=min(step, total), disable=not interactive,
                   desc=f"fit x{world}", unit="step", leave=False)
        extra: List[Any] = []
        if config.early_stopping is not None:
            extra.append(EarlyStopping(config.early_stopping))
        if config.progress and not interactive:
            extra.append(EpochLines())
        hooks = Callbacks([*extra, *(callbacks or [])])
        if not main:  # loggers and stopping rules run once, on rank 0
            hooks = Callbacks([])
        fit_state = FitState(model=model, optimizer=optim, config=config, epoch=epoch, step=step,
                             total_steps=total, history=history)
        hooks("on_fit_start", fit_state)
        on_step = getattr(objective, "on_step", None)
        start_step = step
        warned = out_of_time = False
        while epoch < config.epochs and step < total and not out_of_time and not fit_state.stop:
            program.train()
            lr = config.lr * schedule_factor(config.lr_schedule, epoch, config.epochs)
            for group in optim.param_groups:
                group["lr"] = lr
            t0 = time.perf_counter()
            losses: List[float] = []
            sizes: List[float] = []
            skipped = 0
            loss_fn.new_epoch()
            for xb in train.batches(config.batch_size, gen, rank=rank, world_size=world):
                if step >= total:
                    break
                if config.max_seconds is not None and step % 10 == 0:
                    # Rank 0's clock decides, so every rank stops at the same step.
                    late = seconds + time.perf_counter() - t0 > config.max_seconds
                    if fabric.broadcast(late, 0):
                        out_of_time = True
                        break
                if on_step is not None:
                    on_step(step)
                loss_t = ddp_module(xb)
                failure = loss_module.error
                mine = math.nan if failure is not None else loss_t.item()
                if failure is None and not math.isfinite(mine):
                    # A NaN gradient on this rank is a NaN gradient on every rank after
                    # the all-reduce: all of them skip or stop at this step together.
                    loss_t = loss_t + loss_module.nan_on_every_parameter()
                fabric.backward(loss_t * scale)
                grads_finite = _finite_gradients(params)  # the same on every rank
                loss = mine
                if not grads_finite:  # every rank: say what went wrong, and where
                    states: List[Any] = [None] * world
                    torch.distributed.all_gather_object(
                        states, (None if failure is None else describe_error(failure), mine))
                    message = next((m for m, _ in states if m), None)
                    loss = next((v for _, v in states if not math.isfinite(v)), mine)
                    if message is not None and all(bool(torch.isfinite(p).all()) for p in params):
                        bar.close()
                        if step == start_step:  # the programs never ran: not a divergence
                            if failure is not None:
                                original = without_trace_shapes(failure)
                                if original is failure:
                                    raise failure
                                raise original from None
                            raise ValueError(message)
                        raise TrainingDiverged(
                            f"the model became invalid at step {step + 1} (epoch {epoch + 1}): "
                            f"{message}; lower the learning rate (now {config.lr}) or clip the "
                            "gradients (clip_grad)", frame())
                bad = step_problem(
                    loss, step, start_step, params, config, train.x,
                    grads_finite=lambda: grads_finite,
                    on_error=lambda: (optim.zero_grad(set_to_none=True), bar.close()),
                    history=frame)
                if bad is not None:
                    optim.zero_grad(set_to_none=True)
                    if config.skip_nonfinite:
                        skipped += 1
                        step += 1
                        bar.update(1)
                        continue
                    bar.close()
                    raise diverged(bad, step + 1, epoch, ckpt_path, config.lr, NONFINITE_FIX,
                                   frame())
                # This rank's share of the step: its loss per data point stands for the
                # step's in the per-step display, callbacks and the explosion warning.
                size = num_data or xb.shape[0]
                if start_loss is None:
                    start_loss = loss / size
                elif main and not warned and (message := exploding(
                        loss / size, start_loss, step + 1, config.lr)):
                    warned = True
                    warnings.warn(message, RuntimeWarning, stacklevel=3)
                if config.clip_grad is not None:
                    torch.nn.utils.clip_grad_norm_(params, config.clip_grad)
                optim.step()
                optim.zero_grad(set_to_none=True)
                losses.append(loss)
                sizes.append(size)
                step += 1
                bar.update(1)
                if hooks.callbacks:
                    fit_state.step, fit_state.loss = step, loss / size
                    hooks("on_step", fit_state)
                if step % 20 == 0:
                    bar.set_postfix(elbo=f"{-loss / size:.2f}")
            # Every rank checks its graph; if one went out of date, all of them stop.
            stale = loss_fn.check()
            if fabric.all_reduce(torch.tensor(float(bool(stale)), device=device),
                                 reduce_op="sum").item() > 0:
                bar.close()
                raise ValueError(stale or "another process: the recorded training step no "
                                 "longer gives the program's loss; train it with "
                                 "capture=False (--no-capture)")
            if losses and not all(bool(torch.isfinite(p).all()) for p in params):
                bar.close()
                raise diverged("a parameter became NaN or infinite", step, epoch, ckpt_path,
                               config.lr, OVERFLOW_FIX, frame())
            seconds += time.perf_counter() - t0
            epoch += 1
            train_elbo = math.nan
            if losses:  # every rank took the same steps: the epoch's sums over all ranks
                summed = fabric.all_reduce(torch.tensor([sum(losses), sum(sizes)],
                                                        dtype=torch.float64, device=device),
                                           reduce_op="sum").tolist()
                train_elbo = -summed[0] / summed[1]
            row = {
                "epoch": epoch, "step": step,
                "train_elbo": train_elbo,
                "test_elbo": float("nan"), "test_recon": float("nan"), "test_kl": float("nan"),
                "seconds": seconds, "lr": lr, "skipped": skipped,
            }
            fit_state.epoch, fit_state.step, fit_state.row = epoch, step, row
            last = epoch >= config.epochs or step >= total or out_of_time
            outcome: Any = None
            failed: Optional[BaseException] = None
            if main:
                try:
                    if (test_x is not None and config.eval_every
                            and (epoch % config.eval_every == 0 or last)):
                        program.eval()
                        with seeded(derive_seed(config.seed, epoch), train.x.device):
                            try:
                                terms = elbo_terms(program, None, test_x)
                            except ValueError as err:  # parameters out of range
                                raise TrainingDiverged(
                                    f"the held-out evaluation after epoch {epoch} failed: "
                                    f"{describe_error(err)}; training took "
                                    f"the parameters out of range: lower the learning rate "
                                    f"(now {config.lr}) or clip the gradients (clip_grad)",
                                    frame()) from None
                        row.update({f"test_{k}": v.mean().item() for k, v in terms.items()})
                        bar.set_postfix(elbo=f"{row['train_elbo']:.2f}",
                                        test=f"{row['test_elbo']:.2f}")
                        hooks("on_evaluation", fit_state)
                    hooks("on_epoch_end", fit_state)
                    outcome = ("ok", row, fit_state.stop, fit_state.stop_reason)
                except Exception as err:  # noqa: BLE001  (told to every rank, then raised)
                    failed = err
                    outcome = ("error", type(err).__name__, str(err))
            outcome = fabric.broadcast(outcome, 0)
            if outcome[0] == "error":
                bar.close()
                if failed is not None:
                    raise failed
                if outcome[1] == "TrainingDiverged":
                    raise TrainingDiverged(outcome[2], frame())
                raise RuntimeError(f"rank 0 stopped with {outcome[1]}: {first_line(outcome[2])}")
            _, row, fit_state.stop, fit_state.stop_reason = outcome
            fit_state.row, seconds = row, row["seconds"]
            history.append(row)
            if ckpt_path is not None:
                rngs: List[Any] = [None] * world
                torch.distributed.all_gather_object(rngs, torch.get_rng_state())
                if main:
                    save_checkpoint(ckpt_path, {
                        "format": CHECKPOINT_FORMAT,
                        "model_state": module.state_dict() if module is not None else {},
                        "model_name": type(module).__name__ if module is not None else None,
                        "model_class": (f"{type(module).__module__}.{type(module).__qualname__}"
                                        if module is not None else None),
                        "model_config": module.config() if hasattr(module, "config") else {},
                        "param_store": {},
                        "optimizer": optim.state_dict(),
                        "epoch": epoch, "step": step, "seconds": seconds,
                        "history": {"columns": HISTORY_COLUMNS,
                                    "rows": [[r[c] for c in HISTORY_COLUMNS] for r in history]},
                        "torch_rng": rngs[0],
                        "rank_rng": rngs,
                        "world_size": world,
                        "generator_rng": gen.get_state(),
                        "config": config.to_dict(),
                        "start_loss": start_loss,
                        "versions": _versions(),
                        "metadata": metadata or {},
                    })
        bar.close()
        hooks("on_fit_end", fit_state)
    program.eval()
    result = FitResult(
        model=model, guide=guide_fn, history=frame(), config=config, objective=objective,
        checkpoint=ckpt_path, steps=step,
        stopped=fit_state.stop_reason if fit_state.stop else "",
    )
    if os.getpid() == caller:
        return result
    buffer = io.BytesIO()
    torch.save({"states": [{k: v.cpu() for k, v in m.state_dict().items()} for m in modules],
                "result": replace(result, model=None, guide=None)}, buffer)
    return buffer.getvalue()


PARALLEL_ENGINES["fabric"] = fit_distributed

__all__ = ["fit_distributed", "ObjectiveModule", "worker_process",
           "world_size", "rank_seed"]
