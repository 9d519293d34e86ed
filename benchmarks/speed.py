"""Speed of pyrovae's hot paths on this machine, one command with parts:

    python benchmarks/speed.py --part train       # a fit step against hand-written PyTorch
    python benchmarks/speed.py --part eval        # held-out log-likelihood at K = 5000
    python benchmarks/speed.py --part particles   # one training step per particle count
    python benchmarks/speed.py --part profile     # where a step's time above hand-written goes
    python benchmarks/speed.py --part all --out benchmarks/results/speed

Every part is a function returning rows; the dispatcher writes each part's
rows to ``OUT/<part>.csv`` and ``OUT/<part>.md`` (a markdown table under a
line that gives the command, the machine and the settings). Timings on a shared
machine drift with its load, so each part measures its contenders in
interleaved rounds and reports ratios against a baseline timed in the same
rounds.

Parts:

``eval``
    The importance-sampled log-likelihood with K particles (``--k``, default
    5000) on the first ``--eval-points`` MNIST test images (default: all
    10,000) for the VAE 784-400-50 softplus with a Bernoulli likelihood
    (dynamically binarized test set, binarized once with the seed). The bound
    is the decoder's two matrix multiplies alone (``F.linear`` 50 -> 400 and
    400 -> 784 on a (chunk, 50) input) for exactly the same work: the same
    chunks of (points x particles) as the evaluation, same dtype, same threads.
    The evaluation and the bound alternate slice by slice (``--slice``
    points), and the ratio is evaluation time / bound time. Rows also give
    the generic path (Pyro traces of model and guide, no fused kernel) and the
    fused kernel uncompiled on the first ``--compare-points`` points, timed
    against the bound the same way, and the peak resident memory above the
    resting level of the evaluation of ``--memory-points`` images for K = 1000,
    5000 and 20000 (``--memory-k``), each in a fresh process. The model is freshly
    initialized unless ``--train-epochs`` trains it first (the arithmetic is
    the same either way).
``train``
    One training step of ``fit`` (the whole loop: its checks and bookkeeping)
    against a hand-written PyTorch VAE step: the same networks (784-400-50
    softplus), the same batches (MNIST binarized once, batch 128), the same
    optimizer (Adam 1e-3, torch's fused implementation, which ``fit`` uses;
    the hand-written step with torch's default Adam is shown too); ``fit`` with Trace_ELBO and TraceMeanField_ELBO,
    on its fast path with the recorded graph replayed (the default), on the
    fast path running the programs at every step (``capture=False``), and on
    the plain Pyro path (``fast_path=False``). Blocks of ``--train-steps``
    steps (one ``fit`` call, one epoch), each contender in turn, ``--rounds``
    times; the step is timed from the 6th step to the last, and the ratio to
    the hand-written step is that of the medians. The one-time work of a
    ``fit`` call's first steps (``startup_ms``: the look at the programs, the
    recording and first check of the graph) and the end of its epoch
    (``epoch_end_ms``: the check of the graph against the program, the
    parameters' check) are reported beside it.
``profile``
    Where the time of a training step above the hand-written one goes: the
    loss and its gradients (no optimizer) on one MNIST batch of 128 for the
    hand-written VAE, Trace_ELBO's arithmetic written in plain torch, the same
    with ``torch.distributions`` objects, pyrovae's fast path running the
    programs under one light handler, the recorded graph ``fit`` replays, and
    Pyro's own ``Trace_ELBO.differentiable_loss``; each also without
    gradients. Same weights for all, ``--rounds`` interleaved rounds of 40
    calls, medians and ratios to the hand-written loss.
``particles``
    One ``loss_and_grads`` step on a batch of ``--batch`` MNIST training
    images for Trace_ELBO, TraceMeanField_ELBO, IWAE, IWAE-DReG and STL_ELBO
    with K = 1, 5 and 50 particles, drawn in one vectorized pass and one at a
    time, in interleaved rounds (each a block of 10 / K steps, at least one, of
    each mode): milliseconds per step and per particle (medians over rounds),
    and the median over rounds of the ratio sequential / vectorized.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Tuple

import torch
from torch.nn import functional as F

ROOT = Path(__file__).resolve().parent
DEFAULT_OUT = ROOT / "results" / "speed"


# -- shared set-up ------------------------------------------------------------------------
def _vae(seed: int):
    from pyrovae import VAE
    from pyrovae.seeding import seeded

    with seeded(seed):
        return VAE(784, z_dim=50, hidden=(400,))


def _mnist(split: str, n: int, seed: int) -> torch.Tensor:
    from pyrovae import load_dataset

    data = load_dataset("mnist", split=split, binarize="dynamic")
    return data.fixed(seed)[:n]


def _trained(args: argparse.Namespace):
    """The evaluation's model: fresh, or trained ``--train-epochs`` epochs."""
    model = _vae(args.seed)
    if args.train_epochs:
        from pyrovae import fit, load_dataset

        train = load_dataset("mnist", split="train", binarize="dynamic")
        fit(model, train, epochs=args.train_epochs, batch_size=128, lr=1e-3,
            elbo="TraceMeanField_ELBO", seed=args.seed, eval_every=0, progress=False)
    return model.eval()


def _peak_rss_reset() -> bool:
    """Reset the kernel's record of this process's peak resident memory."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


# -- part: eval -----------------------------------------------------------------------------
def _decoder_bound(model, plan, n: int, k_total: int, dtype: torch.dtype) -> float:
    """Seconds of the decoder's two matrix multiplies alone over ``plan``'s chunks."""
    first, last = model.decoder[0], model.decoder[-1]
    w1, b1, w2, b2 = first.weight, first.bias, last.weight, last.bias
    z = torch.randn(plan.rows, w1.shape[1], dtype=dtype)
    start_time = time.perf_counter()
    with torch.no_grad():
        for start, stop in plan.blocks(n):
            for k in plan.particle_counts(k_total):
                F.linear(F.linear(z[: (stop - start) * k], w1, b1), w2, b2)
    return time.perf_counter() - start_time


def _timed_eval(model, x: torch.Tensor, k: int, seed: int, **options: Any) -> float:
    from pyrovae.infer.evaluate import importance_log_likelihood
    from pyrovae.seeding import seeded

    with seeded(seed):
        start = time.perf_counter()
        importance_log_likelihood(model, None, x, k, progress=False, **options)
        return time.perf_counter() - start


def _versus_bound(model, x: torch.Tensor, k: int, slice_points: int, seed: int,
                  **options: Any) -> Dict[str, float]:
    """Evaluation and bound, alternating slice by slice (which goes first alternates too)."""
    from pyrovae.infer.evaluate import importance_plan

    fast = options.get("fast", True)
    total_eval = total_bound = 0.0
    ratios = []
    for i, start in enumerate(range(0, x.shape[0], slice_points)):
        xs = x[start:start + slice_points]
        plan = importance_plan(model, None, xs, k, fast=fast)
        if i % 2 == 0:
            e = _timed_eval(model, xs, k, seed + i, **options)
            b = _decoder_bound(model, plan, xs.shape[0], k, xs.dtype)
        else:
            b = _decoder_bound(model, plan, xs.shape[0], k, xs.dtype)
            e = _timed_eval(model, xs, k, seed + i, **options)
        total_eval, total_bound = total_eval + e, total_bound + b
        ratios.append(e / b)
    return {"eval_s": total_eval, "bound_s": total_bound, "ratio": total_eval / total_bound,
            "slice_ratio_median": statistics.median(ratios),
            "slice_ratio_min": min(ratios), "slice_ratio_max": max(ratios),
            "chunk_points": plan.points, "chunk_particles": plan.particles, "method": plan.method}


def _memory_worker(args: argparse.Namespace) -> None:
    """Peak resident memory above the resting level during one evaluation (own process)."""
    model = _trained(args)
    x = _mnist("test", args.memory_points, args.seed)
    fast = args.memory_method != "generic"
    # Warm up (and compile) on two points first, so the peak is the evaluation's.
    _timed_eval(model, x[:3], 7, args.seed, fast=fast, compile_kernel=fast)
    if not _peak_rss_reset():
        print(json.dumps({"peak_mib": float("nan")}))
        return
    rest = _status_kib("VmRSS")
    _timed_eval(model, x, args.k, args.seed, fast=fast, compile_kernel=fast)
    print(json.dumps({"peak_mib": (_status_kib("VmHWM") - rest) / 1024}))


def _peak_memory(args: argparse.Namespace, k: int, method: str) -> float:
    command = [sys.executable, __file__, "--memory-worker", "--k", str(k),
               "--memory-method", method, "--memory-points", str(args.memory_points),
               "--seed", str(args.seed), "--train-epochs", "0", "--threads", str(args.threads)]
    done = subprocess.run(command, capture_output=True, text=True,
                          env={**os.environ, "PYROVAE_DATA": os.environ.get("PYROVAE_DATA", "")})
    if done.returncode != 0:
        raise RuntimeError(f"memory worker failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])["peak_mib"]


def eval_rows(args: argparse.Namespace) -> List[Dict[str, Any]]:
    from pyrovae.infer.evaluate import MAX_MEMORY, importance_log_likelihood

    model = _trained(args)
    x = _mnist("test", args.eval_points, args.seed)
    k = args.k
    start = time.perf_counter()
    # Distinct sizes of points and particles, so that the compiled kernel is
    # general in both from the start.
    importance_log_likelihood(model, None, x[:3], 7, progress=False, compile_kernel=True)
    compile_s = time.perf_counter() - start
    common = {"model": "VAE 784-400-50 softplus, Bernoulli", "trained_epochs": args.train_epochs,
              "K": k, "threads": torch.get_num_threads(), "seed": args.seed,
              "max_memory_mib": MAX_MEMORY / 2**20}
    rows = []
    small = x[: args.compare_points]
    for label, options in (("generic (Pyro traces)", {"fast": False}),
                           ("fused, uncompiled", {"compile_kernel": False})):
        got = _versus_bound(model, small, k, args.slice, args.seed, **options)
        rows.append({**common, "path": label, "points": small.shape[0], **got,
                     "eval_ms_per_point": 1e3 * got["eval_s"] / small.shape[0]})
    for n in sorted({min(args.eval_points, args.slice * 2), args.eval_points}):
        got = _versus_bound(model, x[:n], k, args.slice, args.seed, compile_kernel=True)
        rows.append({**common, "path": "fused, compiled", "points": n, **got,
                     "eval_ms_per_point": 1e3 * got["eval_s"] / n,
                     "compile_s": compile_s})
    for method in ("fused", "generic"):
        for kk in args.memory_k:
            rows.append({**common, "path": f"{method}: peak memory", "K": kk,
                         "points": args.memory_points,
                         "peak_mib": _peak_memory(args, kk, method)})
    return rows


# -- part: train -------------------------------------------------------------------------------
class HandWrittenVAE(torch.nn.Module):
    """The networks of ``pyrovae.VAE`` with the textbook loss: the Bernoulli
    log-likelihood of one reparameterized draw plus the analytic KL."""

    def __init__(self, x_dim: int = 784, z_dim: int = 50, hidden=(400,)) -> None:
        from pyrovae.nn import MLP

        super().__init__()
        self.encoder = MLP(x_dim, hidden, 2 * z_dim, "softplus")
        self.decoder = MLP(z_dim, hidden[::-1], x_dim, "softplus")

    def loss(self, x: torch.Tensor) -> torch.Tensor:
        loc, raw = self.encoder(x).chunk(2, -1)
        scale = F.softplus(raw) + 1e-4
        z = loc + scale * torch.randn_like(loc)
        rec = F.binary_cross_entropy_with_logits(self.decoder(z), x, reduction="sum")
        kl = 0.5 * (loc.pow(2) + scale.pow(2) - 1).sum() - scale.log().sum()
        return rec + kl


class _Clock:
    """Reads the clock when ``fit``'s loop starts, after its first ``warm``
    steps, after its last step, and when it ends. A fit call's first steps
    include its one-time work (the first step's look at the programs, the
    recording and first check of the graph the fast path replays) and the
    end of an epoch its checks (the graph against the program, the
    parameters); a long run spreads both over all its steps."""

    def __init__(self, clock: Callable[[], float], warm: int, last: int) -> None:
        self.clock, self.warm, self.last = clock, warm, last
        self.start = self.warmed = self.stepped = self.end = 0.0

    def on_fit_start(self, state) -> None:
        self.start = self.clock()

    def on_step(self, state) -> None:
        if state.step == self.warm:
            self.warmed = self.clock()
        elif state.step == self.last:
            self.stepped = self.clock()

    def on_fit_end(self, state) -> None:
        self.end = self.clock()


def _train_rows(x: torch.Tensor, *, steps: int = 50, rounds: int = 5, seed: int = 0,
                clock: Callable[[], float] = time.perf_counter, warm: int = 5) -> List[Dict]:
    """Seconds per step of each contender, and the ratio to the hand-written
    step. ``fit`` is timed over its steps after the first ``warm`` (the
    steady step of a long run); the one-time work of its first steps is
    reported apart, as ``startup_ms`` (their time beyond ``warm`` steady
    steps), and so is the end of its epoch, as ``epoch_end_ms`` (from the
    last step to the end of ``fit``)."""
    from pyrovae import VAE, fit
    from pyrovae.data import ArrayDataset

    from pyrovae.infer.fit import make_optimizer

    data = ArrayDataset(x[: steps * 128])
    torch.manual_seed(seed)

    def hand_written(optimizer: Callable[[List[torch.Tensor]], Any]):
        hand = HandWrittenVAE()
        hand_opt = optimizer(list(hand.parameters()))

        def block() -> Tuple[float, float, float]:
            gen = torch.Generator().manual_seed(seed)
            for i, xb in enumerate(data.batches(128, gen)):
                if i == warm:
                    t0 = clock()
                loss = hand.loss(xb)
                loss.backward()
                hand_opt.step()
                hand_opt.zero_grad(set_to_none=True)
            return (clock() - t0) / (steps - warm), 0.0, 0.0

        return block

    # The baseline updates with the same Adam as fit (torch's fused kernel);
    # torch's default CPU Adam, one tensor at a time, is shown beside it.
    contenders: Dict[str, Callable[[], Tuple[float, float, float]]] = {
        "hand-written PyTorch": hand_written(lambda ps: make_optimizer("adam", ps, 1e-3)),
        "hand-written PyTorch, torch.optim.Adam's default (one tensor at a time)":
            hand_written(lambda ps: torch.optim.Adam(ps, lr=1e-3)),
    }
    for elbo in ("Trace_ELBO", "TraceMeanField_ELBO"):
        for fast, capture, label in ((True, True, ""), (True, False, ", fast path uncaptured"),
                                     (False, False, ", plain Pyro path")):
            model = VAE(784, 50, hidden=(400,))

            def block(model=model, elbo=elbo, fast=fast,
                      capture=capture) -> Tuple[float, float, float]:
                timer = _Clock(clock, warm, steps)
                fit(model, data, elbo=elbo, epochs=1, batch_size=128, lr=1e-3, seed=seed,
                    eval_every=0, progress=False, fast_path=fast, capture=capture,
                    callbacks=[timer])
                step = (timer.stepped - timer.warmed) / (steps - warm)
                return (step, timer.warmed - timer.start - warm * step,
                        timer.end - timer.stepped)

            contenders[f"fit, {elbo}{label}"] = block
    for run in contenders.values():  # warm-up: allocator, first-step probes
        run()
    times: Dict[str, List[float]] = {name: [] for name in contenders}
    startup: Dict[str, List[float]] = {name: [] for name in contenders}
    epoch_end: Dict[str, List[float]] = {name: [] for name in contenders}
    for _ in range(rounds):
        for name, run in contenders.items():
            step, first, last = run()
            times[name].append(step)
            startup[name].append(first)
            epoch_end[name].append(last)
    base = statistics.median(times["hand-written PyTorch"])
    return [{"case": name, "ms_per_step": 1e3 * statistics.median(t),
             "ratio_to_hand_written": statistics.median(t) / base,
             "ratio_min": min(a / b for a, b in zip(t, times["hand-written PyTorch"])),
             "ratio_max": max(a / b for a, b in zip(t, times["hand-written PyTorch"])),
             "startup_ms": 1e3 * statistics.median(startup[name]),
             "epoch_end_ms": 1e3 * statistics.median(epoch_end[name]),
             "timed_steps": steps - warm, "rounds": rounds, "threads": torch.get_num_threads(),
             "seed": seed} for name, t in times.items()]


def train_rows(args: argparse.Namespace) -> List[Dict[str, Any]]:
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    rows = _train_rows(_mnist("train", args.train_steps * 128, args.seed),
                       steps=args.train_steps, rounds=args.rounds, seed=args.seed, clock=clock)
    return [{**row, "clock": args.clock} for row in rows]


# -- part: profile -------------------------------------------------------------------------------
def profile_rows(args: argparse.Namespace) -> List[Dict[str, Any]]:
    import math

    import pyro.distributions as dist
    from pyro.infer import Trace_ELBO

    from pyrovae.infer.fastpath import FastELBO

    x = _mnist("train", 128, args.seed)
    torch.manual_seed(args.seed)
    hand = HandWrittenVAE()
    model = _vae(args.seed)
    model.encoder.net.load_state_dict(hand.encoder.state_dict())
    model.decoder.load_state_dict(hand.decoder.state_dict())
    enc, dec = model.encoder, model.decoder
    half_log_2pi = 0.5 * math.log(2 * math.pi)

    def plain_torch(xb: torch.Tensor) -> torch.Tensor:
        loc, scale = enc(xb)
        z = loc + scale * torch.randn_like(loc)
        log_q = (-(z - loc) ** 2 / (2 * scale ** 2) - scale.log() - half_log_2pi).sum()
        log_p = (-z ** 2 / 2 - half_log_2pi).sum()
        log_x = -F.binary_cross_entropy_with_logits(dec(z), xb, reduction="none").sum()
        return -(log_x + log_p - log_q)

    def distributions(xb: torch.Tensor) -> torch.Tensor:
        loc, scale = enc(xb)
        q = dist.Normal(loc, scale).to_event(1)
        z = q.rsample()
        p = dist.Normal(loc.new_zeros(loc.shape[-1]), 1.0).to_event(1)
        likelihood = dist.Bernoulli(logits=dec(z), validate_args=False).to_event(1)
        return -(likelihood.log_prob(xb).sum() + p.log_prob(z).sum() - q.log_prob(z).sum())

    params = list(model.parameters())
    traced = FastELBO(Trace_ELBO(), model.model, model.guide, 1, capture=False)
    recorded = FastELBO(Trace_ELBO(), model.model, model.guide, 1, capture=True,
                        modules=[model], params=params)
    pyro_elbo = Trace_ELBO()
    contenders: Dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
        "hand-written loss": hand.loss,
        "Trace_ELBO's arithmetic in plain torch": plain_torch,
        "the same with torch.distributions objects": distributions,
        "fast path: the programs under one handler": traced,
        "fast path: the recorded graph (fit's default)": recorded,
        "Pyro's Trace_ELBO.differentiable_loss": lambda xb: pyro_elbo.differentiable_loss(
            model.model, model.guide, xb),
    }

    def block(loss: Callable[[torch.Tensor], torch.Tensor], grad: bool) -> float:
        start = time.perf_counter()
        for _ in range(40):
            if grad:
                loss(x).backward()
            else:
                with torch.no_grad():
                    loss(x)
        return (time.perf_counter() - start) / 40

    for loss in contenders.values():  # warm-up (and the graph's recording)
        for _ in range(3):
            loss(x).backward()
    times = {(name, grad): [] for name in contenders for grad in (True, False)}
    for _ in range(args.rounds):
        for name, loss in contenders.items():
            for grad in (True, False):
                times[(name, grad)].append(block(loss, grad))
    rows = []
    for grad in (True, False):
        base = statistics.median(times[("hand-written loss", grad)])
        for name in contenders:
            t = statistics.median(times[(name, grad)])
            rows.append({"what": name, "gradients": grad, "ms": 1e3 * t,
                         "ratio_to_hand_written": t / base,
                         "ms_above_hand_written": 1e3 * (t - base), "rounds": args.rounds,
                         "threads": torch.get_num_threads(), "seed": args.seed})
    return rows


# -- part: particles --------------------------------------------------------------------------
PARTICLE_OBJECTIVES = ("Trace_ELBO", "TraceMeanField_ELBO", "IWAE", "IWAE-DReG", "STL_ELBO")


def particle_rows(args: argparse.Namespace) -> List[Dict[str, Any]]:
    import pyro

    from pyrovae.infer.objectives import make_objective
    from pyrovae.seeding import seeded

    model = _vae(args.seed).train()
    x = _mnist("train", args.batch, args.seed)
    params = list(model.parameters())

    def block(objective: Any, steps: int) -> float:
        start = time.perf_counter()
        for _ in range(steps):
            for p in params:
                p.grad = None
            objective.loss_and_grads(model.model, model.guide, x)
        return (time.perf_counter() - start) / steps

    rows = []
    for name in PARTICLE_OBJECTIVES:
        for k in (1, 5, 50):
            objectives = {
                mode: make_objective(name, k, vectorize_particles=mode == "vectorized",
                                     max_plate_nesting=1)
                for mode in ("vectorized", "sequential")
            }
            steps = max(1, 10 // k)
            times: Dict[str, List[float]] = {mode: [] for mode in objectives}
            ratios = []
            with seeded(args.seed):
                for objective in objectives.values():  # warm-up
                    block(objective, 1)
                for round_ in range(args.rounds):
                    order = list(objectives) if round_ % 2 == 0 else list(objectives)[::-1]
                    for mode in order:
                        times[mode].append(block(objectives[mode], steps))
                    ratios.append(times["sequential"][-1] / times["vectorized"][-1])
            pyro.clear_param_store()
            vec, seq = (statistics.median(times[m]) for m in ("vectorized", "sequential"))
            rows.append({"objective": name, "K": k, "batch": args.batch,
                         "vectorized_ms_per_step": 1e3 * vec,
                         "vectorized_ms_per_particle": 1e3 * vec / k,
                         "sequential_ms_per_step": 1e3 * seq,
                         "sequential_ms_per_particle": 1e3 * seq / k,
                         "sequential_over_vectorized": statistics.median(ratios),
                         "ratio_min": min(ratios), "ratio_max": max(ratios),
                         "rounds": args.rounds, "steps_per_round": steps,
                         "threads": torch.get_num_threads(), "seed": args.seed})
    return rows


# -- the dispatcher ---------------------------------------------------------------------------
PARTS: Dict[str, Callable[[argparse.Namespace], List[Dict[str, Any]]]] = {
    "train": train_rows,
    "eval": eval_rows,
    "particles": particle_rows,
    "profile": profile_rows,
}


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def write_rows(part: str, rows: List[Dict[str, Any]], out: Path, header: str) -> Path:
    """``OUT/<part>.csv`` and ``OUT/<part>.md`` (the header line, then a table)."""
    out.mkdir(parents=True, exist_ok=True)
    columns: List[str] = []
    for row in rows:
        columns += [c for c in row if c not in columns]
    with open(out / f"{part}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    lines = [header, "", "| " + " | ".join(columns) + " |",
             "|" + " --- |" * len(columns)]
    lines += ["| " + " | ".join(_cell(row.get(c, "")) for c in columns) + " |" for row in rows]
    path = out / f"{part}.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def main(argv: List[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", default="all", choices=[*PARTS, "all"])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results folder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="torch threads (default: torch's default)")
    parser.add_argument("--eval-points", type=int, default=10000,
                        help="test images evaluated (default: the full test set)")
    parser.add_argument("--k", type=int, default=5000, help="particles per test image")
    parser.add_argument("--slice", type=int, default=500,
                        help="test images per alternation of evaluation and bound")
    parser.add_argument("--compare-points", type=int, default=100,
                        help="test images for the generic and uncompiled paths")
    parser.add_argument("--memory-points", type=int, default=100,
                        help="test images of each peak-memory measurement")
    parser.add_argument("--memory-k", type=lambda v: [int(k) for k in v.split(",")],
                        default=[1000, 5000, 20000],
                        help="particle counts of the peak-memory measurements (comma-separated)")
    parser.add_argument("--train-epochs", type=int, default=0,
                        help="train the evaluated model first (0: freshly initialized)")
    parser.add_argument("--batch", type=int, default=100, help="batch of the particles part")
    parser.add_argument("--rounds", type=int, default=7,
                        help="interleaved rounds (train, particles, profile)")
    parser.add_argument("--train-steps", type=int, default=50,
                        help="steps per timed block of the train part")
    parser.add_argument("--clock", choices=["wall", "process"], default="wall",
                        help="train part: wall-clock time, or this process's CPU time (steadier "
                             "on a machine shared with other jobs)")
    parser.add_argument("--memory-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--memory-method", default="fused", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.memory_worker:
        _memory_worker(args)
        return
    command = "python benchmarks/speed.py " + " ".join(sys.argv[1:] if argv is None else argv)
    for part in (PARTS if args.part == "all" else [args.part]):
        start, load = time.perf_counter(), os.getloadavg()[0]
        rows = PARTS[part](args)
        # The load average says how busy the (shared) machine was meanwhile.
        header = (f"`{command}` ({part}, {time.perf_counter() - start:.0f} s): "
                  f"{os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), "
                  f"{torch.get_num_threads()} torch threads, torch {torch.__version__}, "
                  f"{time.strftime('%Y-%m-%d %H:%M')}, load average {load:.1f} at the start "
                  f"and {os.getloadavg()[0]:.1f} at the end.")
        path = write_rows(part, rows, args.out, header)
        print(path.read_text())


if __name__ == "__main__":
    main()
