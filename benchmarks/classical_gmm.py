"""Gaussian mixtures on real tabular data: pyrovae's EM and enumerated SVI
against scikit-learn's GaussianMixture, in one run:

    python benchmarks/classical_gmm.py --out benchmarks/results/classical-gmm

For each data set (standardized by train statistics, 80/20 split with the
given seed) and covariance type, three fits:

* ``sklearn EM``: ``sklearn.mixture.GaussianMixture`` with k-means starts;
* ``pyrovae EM``: :meth:`pyrovae.GaussianMixture.fit_em` (k-means++ seeding
  refined by k-means);
* ``pyrovae SVI (TraceEnum)``: the same model trained by full-batch Adam on
  ``TraceEnum_ELBO`` with the assignment enumerated. It starts from the best
  of ``--n-init`` k-means initializations and takes one start only, where the
  EM fits make ``--n-init`` restarts.

All three use the same ``--n-init``, tolerance 1e-6 nats per point and
covariance regularizer 1e-6. Reported: mean log-likelihood per data point on
the train and held-out splits (exact, nats), the held-out difference to
scikit-learn, and the median wall-clock seconds of ``--repeats`` identical
fits (data loading and evaluation excluded).

The likelihood of a mixture is multimodal. Where the methods disagree on the
training log-likelihood they have stopped at different local maxima, not at
different answers to the same problem. Polishing the SVI solution with EM
(``fit_mixture_em(..., init_params=svi.mixture_parameters())``) tells which.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import pandas as pd
import torch

from pyrovae import GaussianMixture, fit, load_dataset

DATASETS = {"faithful": 2, "iris": 3, "wine": 3}  # data set -> number of components


def markdown(table: pd.DataFrame, digits: int = 4) -> str:
    """A GitHub markdown table (no optional dependency)."""
    def cell(v):
        return f"{v:.{digits}f}" if isinstance(v, float) else str(v)

    head = "| " + " | ".join(table.columns) + " |"
    rule = "| " + " | ".join("---" for _ in table.columns) + " |"
    rows = ["| " + " | ".join(cell(v) for v in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join([head, rule, *rows])


def timed(fn, repeats: int):
    """The result of the last of ``repeats`` calls and their median seconds;
    every fit is seeded, so the calls return the same answer."""
    times, result = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return result, statistics.median(times)


def run(name: str, K: int, covariance: str, args) -> list[dict]:
    from sklearn.mixture import GaussianMixture as SklearnGMM

    train = load_dataset(name, "train", seed=args.seed, root=args.data_root)
    test = load_dataset(name, "test", seed=args.seed, root=args.data_root)
    x, x_test = train.x.double(), test.x.double()
    rows = []

    def record(method, seconds, train_ll, test_ll, detail):
        rows.append({
            "data": name, "N_train": len(train), "D": train.dim, "K": K, "covariance": covariance,
            "method": method, "train_ll": train_ll, "test_ll": test_ll, "seconds": seconds,
            "detail": detail, "seed": args.seed,
        })

    def sklearn_fit():
        return SklearnGMM(K, covariance_type=covariance, n_init=args.n_init, tol=1e-6,
                          max_iter=500, reg_covar=1e-6, random_state=args.seed).fit(x.numpy())

    sk, seconds = timed(sklearn_fit, args.repeats)
    record("sklearn EM", seconds, sk.score(x.numpy()), sk.score(x_test.numpy()),
           f"{sk.n_iter_} iterations (last start)")

    def em_fit():
        model = GaussianMixture(K, train.dim, covariance, seed=args.seed).double()
        return model, model.fit_em(x, max_iter=500, tol=1e-6, n_init=args.n_init)

    (em, result), seconds = timed(em_fit, args.repeats)
    with torch.no_grad():
        record("pyrovae EM", seconds, em.log_marginal(x).mean().item(),
               em.log_marginal(x_test).mean().item(), f"{result.n_iter} iterations (kept start)")

    def svi_fit():
        model = GaussianMixture(K, train.dim, covariance, seed=args.seed)
        model.initialize(train.x, n_init=args.n_init)
        fit(model, train, elbo="TraceEnum_ELBO", elbo_options={"max_plate_nesting": 1},
            epochs=args.svi_steps, batch_size=len(train), lr=args.lr, seed=args.seed,
            eval_every=0, progress=False)
        return model

    svi, seconds = timed(svi_fit, args.repeats)
    with torch.no_grad():
        record("pyrovae SVI (TraceEnum)", seconds, svi.log_marginal(train.x).mean().item(),
               svi.log_marginal(test.x).mean().item(), f"{args.svi_steps} Adam steps, lr {args.lr}")
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="benchmarks/results/classical-gmm")
    p.add_argument("--data", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    p.add_argument("--n-init", type=int, default=5, help="EM restarts / k-means initializations")
    p.add_argument("--svi-steps", type=int, default=500, help="full-batch Adam steps for SVI")
    p.add_argument("--lr", type=float, default=0.05, help="Adam learning rate for SVI")
    p.add_argument("--threads", type=int, default=1, help="torch and BLAS threads")
    p.add_argument("--repeats", type=int, default=3, help="timed repetitions of each fit (median)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-root", default=None)
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)

    # scikit-learn's BLAS and OpenMP get the same thread budget as torch, so the
    # timings compare the algorithms rather than the thread pools. threadpoolctl
    # only limits libraries already loaded, hence the early import.
    import sklearn.mixture  # noqa: F401
    from threadpoolctl import threadpool_limits

    rows = []
    with threadpool_limits(args.threads):
        for name in args.data:
            for covariance in ("full", "diag"):
                rows += run(name, DATASETS[name], covariance, args)
    table = pd.DataFrame(rows)
    reference = table[table["method"] == "sklearn EM"].set_index(["data", "covariance"])
    for split in ("train", "test"):
        table[f"{split}_ll_minus_sklearn"] = [
            getattr(r, f"{split}_ll") - reference.loc[(r.data, r.covariance), f"{split}_ll"]
            for r in table.itertuples()
        ]
    # Speed as a ratio to scikit-learn's EM timed in the same run on the same data.
    table["time_vs_sklearn"] = [
        r.seconds / reference.loc[(r.data, r.covariance), "seconds"] for r in table.itertuples()
    ]
    columns = ["data", "N_train", "D", "K", "covariance", "method", "train_ll", "test_ll",
               "train_ll_minus_sklearn", "test_ll_minus_sklearn", "seconds", "time_vs_sklearn",
               "detail", "seed"]
    table = table[columns]
    table.to_csv(out / "results.csv", index=False)
    text = markdown(table)
    (out / "results.md").write_text(text + "\n")
    print(text)
    print(f"\nwrote {out / 'results.csv'} and {out / 'results.md'}")


if __name__ == "__main__":
    main()
