"""The README's MNIST results table, reproducible with one command:

    python benchmarks/mnist_vae.py --out benchmarks/results/mnist-vae

MNIST with dynamic binarization, MLP VAE 784-400-50 (softplus), batch 128,
Adam 1e-3. Reports held-out ELBO and importance-sampled log-likelihood after
1 and 10 epochs, and seconds per epoch. The time of a training step against a
hand-written PyTorch VAE is ``python benchmarks/speed.py --part train``.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import pandas as pd
import torch

from pyrovae import VAE, evaluate, fit, load_dataset


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="benchmarks/results/mnist-vae")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--elbo", default="TraceMeanField_ELBO")
    p.add_argument("--eval-samples", type=int, default=1000, help="K for the IS log-likelihood")
    p.add_argument("--eval-points", type=int, default=10000, help="test points evaluated")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-root", default=None)
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(max(1, torch.get_num_threads()))

    train = load_dataset("mnist", "train", binarize="dynamic", root=args.data_root)
    test = load_dataset("mnist", "test", binarize="dynamic", root=args.data_root)
    torch.manual_seed(args.seed)
    model = VAE(784, 50, hidden=(400,), activation="softplus")
    rows = []
    with tempfile.TemporaryDirectory() as ckpt:
        for epochs in sorted({1, args.epochs}):
            res = fit(model, train, test, elbo=args.elbo, epochs=epochs, batch_size=128, lr=1e-3,
                      seed=args.seed, checkpoint_dir=ckpt, resume=True, eval_size=10000,
                      progress=False)
            ev = evaluate(model, test, num_samples=args.eval_samples,
                          max_points=args.eval_points, seed=args.seed)
            rows.append({
                "epochs": epochs, "objective": args.elbo, "seed": args.seed,
                "test_elbo": ev.elbo, "test_elbo_se": ev.elbo_se,
                "test_log_likelihood": ev.iwae, "test_log_likelihood_se": ev.iwae_se,
                "K": ev.num_samples, "test_points": ev.n,
                "seconds_per_epoch": res.history["seconds"].iloc[-1] / epochs,
            })
            print(pd.DataFrame(rows[-1:]).to_markdown(index=False, floatfmt=".2f"), flush=True)
    table = pd.DataFrame(rows)
    table.to_csv(out / "results.csv", index=False)
    (out / "results.md").write_text(table.to_markdown(index=False, floatfmt=".2f") + "\n")
    print(table.to_markdown(index=False, floatfmt=".2f"))


if __name__ == "__main__":
    main()
