"""Deeper VAEs on MNIST at one training budget: flat, convolutional, ladder, IAF.

    python benchmarks/vae_families.py --out benchmarks/results/vae-families

Four models on dynamically binarized MNIST, each trained with the same
objective, epochs, batch size, optimizer and learning rate:

* ``vae``: the MLP VAE (:class:`pyrovae.VAE`) 784-400-32, softplus;
* ``vae-iaf``: the same VAE with a 2-step IAF guide (``flows=2``);
* ``ladder``: the 2-layer ladder VAE (``MODELS["ladder-vae"]``), z_1 of 32 and
  z_2 of 16 units, deterministic blocks of 400 and 200 leaky-ReLU units (its
  default nonlinearity; ``--models ladder-softplus`` adds the same ladder with
  softplus units, which learns far more slowly at this budget);
* ``conv``: the convolutional VAE (``MODELS["conv-vae"]``), 32 latent units,
  the library's default 32/64-channel networks.

The MLP models have 0.67M to 0.77M parameters (the table states each);
the conv VAE, at its default channels, has 0.37M.

Per model, on the test set: held-out ELBO; the importance-sampled
log-likelihood log p(x) with K draws from the guide (Burda et al. 2016); the
number of active units (activity Cov_x E_q[z_d | x] > 0.01, Burda et al.) and
the KL of q to the prior (:func:`pyrovae.infer.latents.latent_stats`); and on
the first ``--gap-points`` test points the approximation and amortization
gaps of Cremer et al. (2018) (:func:`pyrovae.infer.latents.inference_gap`),
whose sum is the ELBO gap log p(x) - ELBO. Seconds per training epoch are
the median over epochs of the training history (evaluation excluded; the
median, because a shared machine has slow spells), beside the total.

Two expectations are tested; the verdicts are printed and written to
``claims.csv`` and ``results.md``: "the ladder beats the flat VAE in
log-likelihood" and "the
IAF guide narrows the ELBO gap". Each difference is computed on the gap
points, paired point by point (both models score the same binarized
digits), with its standard error; a claim is *confirmed* when the difference
exceeds two standard errors in the expected direction, *refuted* when it
exceeds two in the other, else *not resolved*. The full-set difference is
shown beside it with the standard errors of the two means combined as if
independent, which overstates its error when the two models' values on the
shared digits rise and fall together, as they do.

Resuming: every model trains into ``OUT/models/NAME`` with checkpoints
each epoch (``fit(..., checkpoint_dir=..., resume=True)``) and stores its
evaluation there; a rerun with the same ``--out`` continues an interrupted
model at its last epoch and reuses the evaluations whose settings match.

Cost on 2 CPU cores shared with other jobs (so noisy: the same epoch took
from 4 to 107 s): an epoch of 60,000 digits at batch 100 takes 4-5 s for the
three MLP models and 18 s for the conv VAE when the cores are free, 5-15 s
and 100-200 s under load; the evaluation (K = 1000 on 2000 test digits, the
latent statistics, the gaps on 100 digits) took 95 s (VAE), 45 s (IAF),
25 s (ladder) and 520 s (conv), all with 2 torch threads.
``--epochs 5 --eval-points 2000`` ran in 28 minutes; the defaults (10
epochs, all 10,000 test digits) need about an hour of free cores. On a busy
machine one torch thread (``--threads 1``, the default) is the fast choice:
with the cores taken by other jobs, 30 training steps of the MLP VAE took
1.2 s on one thread and 20-28 s on two.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import pandas as pd
import torch

from pyrovae import build_model, evaluate, fit, load_dataset
from pyrovae.infer.latents import inference_gap, latent_stats

#: Columns of ``results.csv``, in order.
COLUMNS = [
    "model", "description", "registry_name", "model_options", "parameters", "latent_dims",
    "objective", "epochs", "batch_size", "optimizer", "lr", "seed", "train_size",
    "seconds_per_epoch", "train_seconds", "train_elbo", "eval_points", "K", "test_elbo",
    "test_elbo_se", "test_log_likelihood", "test_log_likelihood_se", "elbo_gap", "kl", "kl_se",
    "active_units", "active_units_by_site", "gap_points", "gap_steps", "gap_log_px",
    "gap_elbo", "approximation_gap", "approximation_gap_se", "amortization_gap",
    "amortization_gap_se", "inference_gap", "inference_gap_se", "eval_seconds", "threads",
    "notes",
]
CLAIM_COLUMNS = [
    "claim", "measure", "a", "b", "paired_difference", "paired_se", "gap_points",
    "full_set_difference", "full_set_se", "eval_points", "verdict", "seed",
]
#: Columns of the markdown table (the CSV has them all).
SHOWN = [
    "model", "parameters", "latent_dims", "epochs", "seconds_per_epoch", "test_elbo",
    "test_log_likelihood", "elbo_gap", "kl", "active_units", "approximation_gap",
    "amortization_gap", "inference_gap", "seed",
]


@dataclass
class Contender:
    """One model of the comparison: a name in ``MODELS`` and its options."""

    name: str
    registry_name: str
    options: Dict[str, Any]
    description: str


CONTENDERS: List[Contender] = [
    Contender("vae", "vae", {"z_dim": 32, "hidden": [400], "activation": "softplus"},
              "MLP VAE 784-400-32"),
    Contender("vae-iaf", "vae",
              {"z_dim": 32, "hidden": [400], "activation": "softplus", "flows": 2},
              "MLP VAE 784-400-32, IAF guide (2 steps)"),
    Contender("ladder", "ladder-vae",
              {"z_dims": [32, 16], "hidden": [400, 200], "block_depth": 1,
               "activation": "leaky_relu"},
              "ladder VAE, z 32 + 16, blocks 400 / 200, leaky ReLU"),
    Contender("conv", "conv-vae", {"z_dim": 32}, "conv VAE, channels 32 / 64, z 32"),
    # Not run by default: the ladder with the flat VAE's softplus units, which
    # trains far more slowly than with leaky ReLU units at this budget.
    Contender("ladder-softplus", "ladder-vae",
              {"z_dims": [32, 16], "hidden": [400, 200], "block_depth": 1,
               "activation": "softplus"},
              "ladder VAE, z 32 + 16, blocks 400 / 200, softplus"),
]
#: The models run when ``--models`` is not given.
DEFAULT_MODELS = ["vae", "vae-iaf", "ladder", "conv"]


@dataclass
class Budget:
    """The training and evaluation settings shared by every model."""

    elbo: str
    epochs: int
    batch_size: int
    optimizer: str
    lr: float
    seed: int
    train_size: Optional[int]
    eval_points: int
    k: int
    elbo_particles: int
    latent_samples: int
    gap_points: int
    gap_steps: int
    gap_lr: float
    data: Dict[str, Any] = field(default_factory=dict)

    def evaluation_key(self) -> Dict[str, Any]:
        """What decides a trained model's evaluation (stored beside it)."""
        keys = ("elbo", "epochs", "batch_size", "optimizer", "lr", "seed", "train_size",
                "eval_points", "k", "elbo_particles", "latent_samples", "gap_points",
                "gap_steps", "gap_lr")
        return {k: getattr(self, k) for k in keys}


def _parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _latent_dims(options: Dict[str, Any]) -> int:
    return int(sum(options["z_dims"])) if "z_dims" in options else int(options["z_dim"])


def _claim_folder(folder: Path, c: Contender, budget: Budget) -> None:
    """Record what trains in ``folder``; refuse a folder whose checkpoint
    belongs to another model or training setup (resuming it would continue
    those weights silently). Only ``--epochs`` may change between runs."""
    setup = {"model": c.registry_name, "options": c.options,
             **{k: v for k, v in budget.evaluation_key().items()
                if k in ("elbo", "batch_size", "optimizer", "lr", "seed", "train_size")}}
    path = folder / "setup.json"
    if path.exists() and (folder / "checkpoint.pt").exists():
        saved = json.loads(path.read_text())
        if saved != setup:
            raise SystemExit(
                f"{folder} holds a checkpoint of another setup ({saved}); this run trains "
                f"{setup}: use another --out, or delete that folder to start over")
    path.write_text(json.dumps(setup, indent=1))


def _timing(folder: Path) -> Dict[str, float]:
    """Training time from the stored history: the median seconds of one
    epoch (robust to a busy machine's slow spells) and the total."""
    path = folder / "history.csv"
    history = pd.read_csv(path) if path.exists() else pd.DataFrame()
    if not len(history):
        return {"seconds_per_epoch": math.nan, "train_seconds": math.nan}
    per_epoch = history["seconds"].diff().fillna(history["seconds"].iloc[0])
    return {"seconds_per_epoch": float(per_epoch.median()),
            "train_seconds": float(history["seconds"].iloc[-1])}


def _diagnostic(what: str, notes: List[str], run, *args, **kwargs):
    """``run(*args, **kwargs)``, or None with the error in ``notes`` (the
    table keeps the other numbers when one diagnostic does not apply)."""
    try:
        return run(*args, **kwargs)
    except (ValueError, RuntimeError, NotImplementedError, TypeError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        notes.append(f"{what} failed: {type(err).__name__}: {first}")
        print(f"  {what} failed: {type(err).__name__}: {first}", flush=True)
        return None


def run_contender(c: Contender, budget: Budget, train, test, folder: Path) -> Dict[str, Any]:
    """Train (or resume) one model, evaluate it, and return its table row.

    The row and the per-point inference gaps are stored in ``folder``; a
    finished model whose stored evaluation has the same settings is read
    back instead of evaluated again.
    """
    folder.mkdir(parents=True, exist_ok=True)
    stored = folder / "result.json"
    key = {"model": c.registry_name, "options": c.options, **budget.evaluation_key()}
    if stored.exists():
        saved = json.loads(stored.read_text())
        if saved.get("key") == key and (folder / "gap_points.csv").exists():
            print(f"[{c.name}] evaluation found in {folder}, reused", flush=True)
            return {**saved["row"], **_timing(folder)}

    _claim_folder(folder, c, budget)
    model = build_model(c.registry_name, train.dim, c.options, seed=budget.seed)
    print(f"[{c.name}] {c.description}: {_parameters(model):,} parameters; training "
          f"{budget.epochs} epochs", flush=True)
    result = fit(
        model, train, test, elbo=budget.elbo, epochs=budget.epochs,
        batch_size=budget.batch_size, optimizer=budget.optimizer, lr=budget.lr,
        seed=budget.seed, checkpoint_dir=str(folder), resume=True,
        # The per-epoch held-out ELBO (a progress monitor) on at most 1000 digits.
        eval_size=min(1000, budget.eval_points), progress=True,
    )
    history = result.history
    history.to_csv(folder / "history.csv", index=False)
    epochs_done = int(history["epoch"].iloc[-1]) if len(history) else 0
    notes: List[str] = []

    t0 = time.perf_counter()
    print(f"[{c.name}] evaluating: K = {budget.k} on {budget.eval_points} test digits", flush=True)
    ev = evaluate(model, test, num_samples=budget.k, max_points=budget.eval_points,
                  elbo_particles=budget.elbo_particles, seed=budget.seed, progress=False)
    print(f"[{c.name}] ELBO {ev.elbo:.2f} +- {ev.elbo_se:.2f}, log p(x) {ev.iwae:.2f} +- "
          f"{ev.iwae_se:.2f} ({ev.seconds:.0f} s)", flush=True)
    stats = _diagnostic("latent_stats", notes, latent_stats, model, test,
                        num_samples=budget.latent_samples, max_points=budget.eval_points,
                        seed=budget.seed)
    print(f"[{c.name}] inference gap on {budget.gap_points} digits, {budget.gap_steps} steps",
          flush=True)
    gap = _diagnostic("inference_gap", notes, inference_gap, model, test,
                      num_points=budget.gap_points, steps=budget.gap_steps, lr=budget.gap_lr,
                      num_samples=budget.k, seed=budget.seed)
    eval_seconds = time.perf_counter() - t0

    nan = math.nan
    row: Dict[str, Any] = {
        "model": c.name, "description": c.description, "registry_name": c.registry_name,
        "model_options": json.dumps(c.options), "parameters": _parameters(model),
        "latent_dims": _latent_dims(c.options), "objective": budget.elbo,
        "epochs": epochs_done, "batch_size": budget.batch_size, "optimizer": budget.optimizer,
        "lr": budget.lr, "seed": budget.seed, "train_size": len(train),
        **_timing(folder),
        "train_elbo": float(history["train_elbo"].iloc[-1]) if len(history) else nan,
        "eval_points": ev.n, "K": ev.num_samples, "test_elbo": ev.elbo,
        "test_elbo_se": ev.elbo_se, "test_log_likelihood": ev.iwae,
        "test_log_likelihood_se": ev.iwae_se, "elbo_gap": ev.iwae - ev.elbo,
        "kl": nan, "kl_se": nan, "active_units": nan, "active_units_by_site": "",
        "gap_points": 0, "gap_steps": budget.gap_steps, "gap_log_px": nan, "gap_elbo": nan,
        "approximation_gap": nan, "approximation_gap_se": nan, "amortization_gap": nan,
        "amortization_gap_se": nan, "inference_gap": nan, "inference_gap_se": nan,
        "eval_seconds": eval_seconds, "threads": torch.get_num_threads(), "notes": "",
    }
    if stats is not None:
        sites = stats.sites
        row.update(
            kl=stats.kl,
            # The sites' KLs are correlated over the same points: the sum of
            # their standard errors bounds the standard error of the total.
            kl_se=float(sites["kl_se"].sum()),
            active_units=stats.active_units,
            active_units_by_site=", ".join(
                f"{s.site}: {int(s.active_units)}/{int(s.dims)}" for s in sites.itertuples()),
        )
    if gap is not None:
        s = gap.summary()
        row.update(
            gap_points=s["gap_points"], gap_log_px=s["gap_log_px"],
            gap_elbo=s["gap_elbo_amortized"],
            approximation_gap=s["approximation_gap"],
            approximation_gap_se=s["approximation_gap_se"],
            amortization_gap=s["amortization_gap"], amortization_gap_se=s["amortization_gap_se"],
            inference_gap=s["inference_gap"], inference_gap_se=s["inference_gap_se"],
        )
        points = gap.points.assign(model=c.name, seed=budget.seed)
    else:
        points = pd.DataFrame(columns=["point", "log_px", "elbo_amortized", "model", "seed"])
    points.to_csv(folder / "gap_points.csv", index=False)
    row["notes"] = "; ".join(notes)
    stored.write_text(json.dumps({"key": key, "row": row}, indent=1, default=float))
    return row


def _paired(a: pd.DataFrame, b: pd.DataFrame, column: str) -> tuple:
    """Mean and standard error of b[column] - a[column] over the points both have."""
    joined = a[["point", column]].merge(b[["point", column]], on="point", suffixes=("_a", "_b"))
    diff = (joined[f"{column}_b"] - joined[f"{column}_a"]).astype(float)
    n = len(diff)
    if n == 0:
        return math.nan, math.nan, 0
    se = float(diff.std(ddof=1) / math.sqrt(n)) if n > 1 else math.nan
    return float(diff.mean()), se, n


def _verdict(diff: float, se: float) -> str:
    if not (math.isfinite(diff) and math.isfinite(se)):
        return "not resolved (missing numbers)"
    if diff > 2 * se:
        return "confirmed"
    if diff < -2 * se:
        return "refuted"
    return "not resolved (within 2 SE)"


def claims(table: pd.DataFrame, out: Path, seed: int) -> pd.DataFrame:
    """The two expected orderings, each as a difference with its standard error."""
    rows = table.set_index("model")

    def gaps(name: str) -> Optional[pd.DataFrame]:
        path = out / "models" / name / "gap_points.csv"
        if name not in rows.index or not path.exists():
            return None
        frame = pd.read_csv(path)
        return frame if len(frame) else None

    found = []
    specs = [
        # (claim, measure, a, b, per-point column whose b - a should be > 0,
        #  full-set value of b - a, its SE)
        ("the ladder beats the flat VAE in log-likelihood", "log p(x), b - a (nats)",
         "vae", "ladder", "log_px",
         lambda r: (r.at["ladder", "test_log_likelihood"] - r.at["vae", "test_log_likelihood"],
                    math.hypot(r.at["ladder", "test_log_likelihood_se"],
                               r.at["vae", "test_log_likelihood_se"]))),
        ("the IAF guide narrows the ELBO gap (log p(x) - ELBO)",
         "ELBO gap, a - b (nats)", "vae-iaf", "vae", "inference_gap",
         lambda r: (r.at["vae", "elbo_gap"] - r.at["vae-iaf", "elbo_gap"],
                    math.hypot(math.hypot(r.at["vae", "test_elbo_se"],
                                          r.at["vae", "test_log_likelihood_se"]),
                               math.hypot(r.at["vae-iaf", "test_elbo_se"],
                                          r.at["vae-iaf", "test_log_likelihood_se"])))),
    ]
    for claim, measure, a, b, column, full in specs:
        pa, pb = gaps(a), gaps(b)
        diff, se, n = (_paired(pa, pb, column) if pa is not None and pb is not None
                       else (math.nan, math.nan, 0))
        if a in rows.index and b in rows.index:
            full_diff, full_se = full(rows)
            eval_points = int(min(rows.at[a, "eval_points"], rows.at[b, "eval_points"]))
        else:
            full_diff, full_se, eval_points = math.nan, math.nan, 0
        found.append({
            "claim": claim, "measure": measure, "a": a, "b": b,
            "paired_difference": diff, "paired_se": se, "gap_points": n,
            "full_set_difference": full_diff, "full_set_se": full_se,
            "eval_points": eval_points, "verdict": _verdict(diff, se), "seed": seed,
        })
    return pd.DataFrame(found, columns=CLAIM_COLUMNS)


def write_tables(rows: Sequence[Dict[str, Any]], out: Path, budget: Budget) -> pd.DataFrame:
    """results.csv, claims.csv and results.md from the rows so far."""
    table = pd.DataFrame(list(rows), columns=COLUMNS)
    table.to_csv(out / "results.csv", index=False)
    verdicts = claims(table, out, budget.seed)
    verdicts.to_csv(out / "claims.csv", index=False)
    shown = table[SHOWN].copy()
    lines = [
        "# Deeper VAEs on dynamically binarized MNIST, one training budget",
        "",
        f"Every model: {budget.elbo}, {budget.epochs} epochs, batch {budget.batch_size}, "
        f"{budget.optimizer} lr {budget.lr:g}, seed {budget.seed}, "
        f"{len(table) and int(table['train_size'].iloc[0])} training digits. Log-likelihood: "
        f"K = {budget.k} importance samples on {budget.eval_points} test digits; active units "
        f"and KL on the same digits; inference gaps (nats) on the first {budget.gap_points} "
        f"with {budget.gap_steps} optimization steps per digit. Nats per digit; "
        "standard errors in results.csv.",
        "",
        shown.to_markdown(index=False, floatfmt=".2f"),
        "",
        "Active units by site: " + "; ".join(
            f"{r.model} ({r.active_units_by_site})" for r in table.itertuples()
            if r.active_units_by_site),
        "",
        "## Expected shape",
        "",
    ]
    for r in verdicts.itertuples():
        lines.append(
            f"- {r.claim}: **{r.verdict}**. {r.measure}: {r.paired_difference:+.2f} +- "
            f"{r.paired_se:.2f} paired over {r.gap_points} test digits; "
            f"{r.full_set_difference:+.2f} +- {r.full_set_se:.2f} on {r.eval_points} "
            f"(means' errors combined as independent).")
    notes = [f"- {r.model}: {r.notes}" for r in table.itertuples() if r.notes]
    if notes:
        lines += ["", "## Notes", "", *notes]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    return verdicts


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="benchmarks/results/vae-families", help="output folder")
    p.add_argument("--models", nargs="+", default=DEFAULT_MODELS,
                   choices=[c.name for c in CONTENDERS], help="models to run, in this order")
    p.add_argument("--epochs", type=int, default=10, help="training epochs, every model")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--optimizer", default="adam")
    p.add_argument("--elbo", default="Trace_ELBO", help="training objective, every model")
    p.add_argument("--train-size", type=int, default=None,
                   help="train on the first N training digits (default: all 60,000)")
    p.add_argument("--eval-points", type=int, default=10000, help="test digits scored")
    p.add_argument("--k", type=int, default=1000,
                   help="importance samples per digit for log p(x) (also the gaps' log p(x))")
    p.add_argument("--elbo-particles", type=int, default=10,
                   help="draws per digit for the held-out ELBO")
    p.add_argument("--latent-samples", type=int, default=16,
                   help="guide draws per digit for the active units and KL")
    p.add_argument("--gap-points", type=int, default=100,
                   help="test digits for the approximation and amortization gaps")
    p.add_argument("--gap-steps", type=int, default=300,
                   help="optimization steps of the per-digit guide q*")
    p.add_argument("--gap-lr", type=float, default=0.01)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: on a busy machine a second thread "
                        "waiting on a busy core slowed training twentyfold here)")
    p.add_argument("--data-root", default=None,
                   help="folder with MNIST (default: $PYROVAE_DATA, else ./data)")
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> pd.DataFrame:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    train = load_dataset("mnist", "train", binarize="dynamic", root=args.data_root)
    test = load_dataset("mnist", "test", binarize="dynamic", root=args.data_root)
    if args.train_size is not None:
        train = train.subset(args.train_size)
    budget = Budget(
        elbo=args.elbo, epochs=args.epochs, batch_size=args.batch_size,
        optimizer=args.optimizer, lr=args.lr, seed=args.seed, train_size=args.train_size,
        eval_points=min(args.eval_points, len(test)), k=args.k,
        elbo_particles=args.elbo_particles, latent_samples=args.latent_samples,
        gap_points=args.gap_points, gap_steps=args.gap_steps, gap_lr=args.gap_lr,
    )
    (out / "config.json").write_text(json.dumps(
        {**budget.evaluation_key(), "models": {c.name: [c.registry_name, c.options]
                                               for c in CONTENDERS if c.name in args.models}},
        indent=1))
    by_name = {c.name: c for c in CONTENDERS}
    rows: List[Dict[str, Any]] = []
    for name in args.models:
        rows.append(run_contender(by_name[name], budget, train, test, out / "models" / name))
        write_tables(rows, out, budget)  # a partial table after every model
    verdicts = write_tables(rows, out, budget)
    print((out / "results.md").read_text(), flush=True)
    print(f"wrote {out / 'results.csv'}, {out / 'claims.csv'} and {out / 'results.md'}")
    return verdicts


if __name__ == "__main__":
    main()
