"""Data-parallel scaling on this machine's CPU, with one command:

    python benchmarks/scaling.py            # writes benchmarks/results/scaling.md

The same model, data, seed and global batch trained three ways: one process
with one thread, one process with two threads, and two processes with one
thread each (``fit(devices=2, strategy="ddp", accelerator="cpu")``, gloo
backend, each rank half of every batch). Reported: training seconds per epoch
(the history's ``seconds``, evaluation excluded), the speed-up against one
process with one thread, the wall time of the whole run (process start-up
and Lightning's import included) and the held-out ELBO reached. Rounds
interleave the configurations and medians are reported, since a shared
machine's load changes while it runs.

Every configuration runs in a fresh process (``--worker``); with ``--devices
2`` Fabric starts the second rank by running that command again.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
# (label, processes, threads per process)
CONFIGS = [("1 process, 1 thread", 1, 1), ("1 process, 2 threads", 1, 2),
           ("2 processes (ddp, gloo), 1 thread each", 2, 1)]


def worker(args: argparse.Namespace) -> None:
    import torch

    from pyrovae import VAE, fit, load_dataset
    from pyrovae.seeding import seeded

    torch.set_num_threads(args.threads)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # what Fabric gives each rank
    train = load_dataset(args.dataset, split="train", binarize="dynamic").subset(args.train_size)
    test = load_dataset(args.dataset, split="test", binarize="dynamic").subset(args.test_size)
    with seeded(args.seed):
        model = VAE(train.dim, z_dim=50, hidden=(400,))
    result = fit(model, train, test, epochs=args.epochs, batch_size=args.batch_size, lr=1e-3,
                 seed=args.seed, eval_size=args.test_size, progress=False,
                 devices=args.devices, strategy="ddp", accelerator="cpu")
    if int(os.environ.get("LOCAL_RANK", "0")) == 0:
        history = result.history
        Path(args.json).write_text(json.dumps({
            "seconds": history["seconds"].tolist(),
            "test_elbo": float(history["test_elbo"].iloc[-1]),
            "train_elbo": float(history["train_elbo"].iloc[-1]),
            "steps": int(history["step"].iloc[-1]),
        }))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="mnist")
    parser.add_argument("--train-size", type=int, default=20000)
    parser.add_argument("--test-size", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=128, help="global batch")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3,
                        help="interleaved rounds; medians are reported")
    parser.add_argument("--out", default=str(ROOT / "results" / "scaling.md"))
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--devices", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--json", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return

    common = ["--dataset", args.dataset, "--train-size", str(args.train_size),
              "--test-size", str(args.test_size), "--batch-size", str(args.batch_size),
              "--epochs", str(args.epochs), "--seed", str(args.seed)]
    runs: dict = {label: [] for label, _, _ in CONFIGS}
    with tempfile.TemporaryDirectory() as tmp:
        # Rounds interleave the configurations, so a change in the machine's
        # load (it is shared) touches all of them alike; medians are reported.
        for round_ in range(args.repeats):
            for label, devices, threads in CONFIGS:
                path = Path(tmp) / f"{round_}-{devices}x{threads}.json"
                env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
                t0 = time.perf_counter()
                done = subprocess.run(
                    [sys.executable, __file__, "--worker", "--devices", str(devices),
                     "--threads", str(threads), "--json", str(path), *common],
                    env=env, capture_output=True, text=True)
                wall = time.perf_counter() - t0
                if done.returncode != 0:
                    sys.exit(f"{label} failed:\n{done.stderr[-3000:]}")
                got = json.loads(path.read_text())
                per_epoch = [b - a for a, b in zip([0.0] + got["seconds"][:-1], got["seconds"])]
                # Epoch 1 includes warm-up; the later epochs give the steady rate.
                steady = per_epoch[1:] if len(per_epoch) > 1 else per_epoch
                runs[label].append({"per_epoch": sum(steady) / len(steady),
                                    "first": per_epoch[0], "wall": wall, **got})
    rows = []
    for label, _, _ in CONFIGS:
        done_runs = runs[label]
        speeds = [r["per_epoch"] for r in done_runs]
        rows.append({"label": label, "per_epoch": statistics.median(speeds),
                     "low": min(speeds), "high": max(speeds),
                     "first": statistics.median(r["first"] for r in done_runs),
                     "wall": statistics.median(r["wall"] for r in done_runs),
                     **{k: done_runs[0][k] for k in ("test_elbo", "train_elbo", "steps")}})
    base = rows[0]["per_epoch"]
    steps = rows[0]["steps"] // args.epochs
    lines = [
        "| configuration | s / epoch | (range) | speed-up | first epoch (s) | run wall time (s) "
        "| held-out ELBO | train ELBO |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(f"| {r['label']} | {r['per_epoch']:.2f} | {r['low']:.2f}-{r['high']:.2f} | "
                     f"{base / r['per_epoch']:.2f}x | {r['first']:.2f} | {r['wall']:.1f} | "
                     f"{r['test_elbo']:.2f} | {r['train_elbo']:.2f} |")
    import torch

    header = (
        f"VAE 784-400-50 on {args.train_size} dynamically binarized {args.dataset} images "
        f"({steps} steps of a global batch of {args.batch_size} per epoch, Adam 1e-3, seed "
        f"{args.seed}, {args.epochs} epochs), held-out ELBO on {args.test_size} test images "
        f"in nats. s / epoch: mean training time of epochs 2-{args.epochs} (evaluation "
        f"excluded), median (and range) over {args.repeats} interleaved rounds; run wall "
        f"time: the whole command, process start-up and imports included (median). "
        f"{os.cpu_count()} CPU cores, {platform.machine()}, Python "
        f"{platform.python_version()}, torch {torch.__version__}; measured "
        f"{time.strftime('%Y-%m-%d')} with `python benchmarks/scaling.py`."
    )
    table = "\n".join(lines)
    print(header + "\n\n" + table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("# Data-parallel scaling (CPU)\n\n" + header + "\n\n" + table + "\n")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
