"""Factor analysis on the Big Five items (bfi): pyrovae's EM and SVI against
scikit-learn's FactorAnalysis, in one run:

    python benchmarks/classical_fa.py --out benchmarks/results/classical-fa

bfi: 25 items, rows with a missing value dropped, 80/20 train/test split with
the given seed, standardized by train statistics. Five factors by default.
Fits, all of the same maximum-likelihood model:

* ``sklearn (defaults)``: ``sklearn.decomposition.FactorAnalysis`` as it comes
  (randomized SVD, ``tol=1e-2`` on the total log-likelihood);
* ``sklearn (converged)``: the same with exact SVD and ``tol=1e-8``;
* ``pyrovae EM``: :meth:`pyrovae.FactorAnalysis.fit_em` (float64, PCA start,
  stop when a step gains < 1e-8 nats per data point);
* ``pyrovae SVI, PCA start``: the linear-Gaussian guide (the exact posterior
  is in its family), parameters started at the PCA solution and the guide at
  its exact posterior, then full-batch Adam on the single-sample
  ``Trace_ELBO`` for ``--svi-steps`` steps, the first half at lr 0.01 and the
  second at 0.002 (a constant rate leaves a jitter of a few thousandths of a
  nat in the held-out log-likelihood);
* ``pyrovae SVI, random start``: the same guide from a random start, with
  mini-batches of 100 for ``--svi-epochs`` epochs (Adam, lr 0.01 for the
  first 80%, then 0.002).

Reported: mean exact log-likelihood per data point on the train and held-out
splits (nats), the held-out difference to the converged scikit-learn fit, the
number of iterations or steps, and wall-clock fitting seconds (the median of
``--repeats`` identical fits for the EM and scikit-learn rows, one run for the
SVI rows; data loading and evaluation excluded). Both libraries run with
``--threads`` threads (torch intra-op threads and the BLAS pool numpy uses),
1 by default: on 25 x 25 problems extra threads only add contention, and on a
shared machine they make timings erratic. Loadings are identified only up to
rotation, so only likelihoods are compared.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Callable, Dict, List, Tuple

import pandas as pd
import torch

from sklearn.decomposition import FactorAnalysis as SklearnFA
# Imported before threadpool_limits is entered, which only limits the BLAS
# libraries already loaded.
from threadpoolctl import threadpool_limits

from pyrovae import FactorAnalysis, fit, load_dataset


def markdown(table: pd.DataFrame, digits: int = 4) -> str:
    """A GitHub markdown table (no optional dependency)."""
    def cell(v):
        return f"{v:.{digits}f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(table.columns) + " |", "| " + " | ".join("---" for _ in table.columns) + " |"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join(lines)


def timed(run: Callable[[], Tuple[object, int]], repeats: int) -> Tuple[object, int, float]:
    """Run ``repeats`` times; keep the last result and the median seconds."""
    seconds = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        result, iterations = run()
        seconds.append(time.perf_counter() - t0)
    return result, iterations, statistics.median(seconds)


def sklearn_fa(train: torch.Tensor, k: int, seed: int, converged: bool):
    options = dict(svd_method="lapack", tol=1e-8, max_iter=10_000) if converged else {}
    est = SklearnFA(k, random_state=seed, **options).fit(train.numpy())
    return est, est.n_iter_


def run(z_dim: int, seed: int, repeats: int, svi_steps: int, svi_epochs: int) -> List[Dict]:
    train = load_dataset("bfi", split="train", seed=seed)
    test = load_dataset("bfi", split="test", seed=seed)
    x64, t64 = train.x.double(), test.x.double()
    rows = []

    def record(method, train_ll, test_ll, iterations, seconds):
        rows.append(dict(method=method, z_dim=z_dim, seed=seed, n_train=len(train), n_test=len(test),
                         train_ll=train_ll, test_ll=test_ll, iterations=iterations, seconds=seconds))

    for converged, label in ((False, "sklearn (defaults)"), (True, "sklearn (converged)")):
        est, its, sec = timed(lambda: sklearn_fa(x64, z_dim, seed, converged), repeats)
        record(label, est.score(x64.numpy()), est.score(t64.numpy()), its, sec)

    def em():
        model = FactorAnalysis(25, z_dim).double()
        result = model.fit_em(x64, tol=1e-8, max_iter=10_000)
        return model, result.n_iter

    model, its, sec = timed(em, repeats)
    record("pyrovae EM", model.log_marginal(x64).mean().item(), model.log_marginal(t64).mean().item(), its, sec)

    torch.manual_seed(seed)
    model = FactorAnalysis(25, z_dim)
    t0 = time.perf_counter()
    model.init_from_data(train.x)
    steps = 0
    for lr, epochs in ((0.01, svi_steps // 2), (0.002, svi_steps - svi_steps // 2)):
        steps += fit(model, train, epochs=epochs, batch_size=len(train), lr=lr, eval_every=0,
                     progress=False, seed=seed).steps
    sec = time.perf_counter() - t0
    with torch.no_grad():
        record("pyrovae SVI, PCA start", model.log_marginal(train.x).mean().item(),
               model.log_marginal(test.x).mean().item(), steps, sec)

    torch.manual_seed(seed)
    model = FactorAnalysis(25, z_dim)
    t0 = time.perf_counter()
    first = int(0.8 * svi_epochs)
    steps = 0
    for lr, epochs in ((0.01, first), (0.002, svi_epochs - first)):
        steps += fit(model, train, epochs=epochs, batch_size=100, lr=lr, eval_every=0,
                     progress=False, seed=seed).steps
    sec = time.perf_counter() - t0
    with torch.no_grad():
        record("pyrovae SVI, random start", model.log_marginal(train.x).mean().item(),
               model.log_marginal(test.x).mean().item(), steps, sec)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for results.csv and results.md")
    parser.add_argument("--z-dim", type=int, default=5, help="number of factors")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="split and training seeds")
    parser.add_argument("--repeats", type=int, default=3, help="timing repeats of the EM/sklearn fits")
    parser.add_argument("--svi-steps", type=int, default=300, help="full-batch steps from the PCA start")
    parser.add_argument("--svi-epochs", type=int, default=100, help="epochs of batch-100 SVI from a random start")
    parser.add_argument("--threads", type=int, default=1, help="torch and BLAS threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    with threadpool_limits(args.threads):
        for seed in args.seeds:
            rows += run(args.z_dim, seed, args.repeats, args.svi_steps, args.svi_epochs)
    table = pd.DataFrame(rows)
    reference = table[table["method"] == "sklearn (converged)"].set_index("seed")["test_ll"]
    table.insert(table.columns.get_loc("test_ll") + 1, "test_ll_minus_sklearn",
                 table["test_ll"] - table["seed"].map(reference))
    # Speed as a ratio to scikit-learn's converged fit timed in the same run.
    sk_seconds = table[table["method"] == "sklearn (converged)"].set_index("seed")["seconds"]
    table["time_vs_sklearn"] = table["seconds"] / table["seed"].map(sk_seconds)
    table["threads"] = args.threads
    args.out.mkdir(parents=True, exist_ok=True)
    table.to_csv(args.out / "results.csv", index=False)
    shown = table[["method", "seed", "train_ll", "test_ll", "test_ll_minus_sklearn", "iterations", "seconds",
                   "time_vs_sklearn"]]
    text = markdown(shown)
    (args.out / "results.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
