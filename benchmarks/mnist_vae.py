"""The README's MNIST results table, reproducible with one command:

    python benchmarks/mnist_vae.py --out benchmarks/results/mnist-vae

MNIST with dynamic binarization, MLP VAE 784-400-50 (softplus), batch 128,
Adam 1e-3. Reports held-out ELBO and importance-sampled log-likelihood after
1 and 10 epochs, seconds per epoch, and the time of one pyrovae training step
relative to a hand-written PyTorch VAE of the same architecture, both timed in
this run, interleaved, on the same batches.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch
from torch import nn
from torch.nn.functional import binary_cross_entropy_with_logits, softplus

from pyrovae import VAE, evaluate, fit, load_dataset, make_objective
from pyrovae.nn import MLP


class HandWrittenVAE(nn.Module):
    """The same networks as pyrovae's VAE, trained with the textbook loss:
    Bernoulli log-likelihood from one reparameterized draw plus analytic KL."""

    def __init__(self, x_dim=784, z_dim=50, hidden=(400,)):
        super().__init__()
        self.encoder = MLP(x_dim, hidden, 2 * z_dim, "softplus")
        self.decoder = MLP(z_dim, hidden[::-1], x_dim, "softplus")

    def loss(self, x):
        loc, raw = self.encoder(x).chunk(2, -1)
        scale = softplus(raw) + 1e-4
        z = loc + scale * torch.randn_like(loc)
        rec = binary_cross_entropy_with_logits(self.decoder(z), x, reduction="sum")
        kl = 0.5 * (loc.pow(2) + scale.pow(2) - 1).sum() - scale.log().sum()
        return rec + kl


def time_steps(step, batches, repeats):
    """Median seconds per step over ``repeats`` blocks of len(batches) steps."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for xb in batches:
            step(xb)
        times.append((time.perf_counter() - t0) / len(batches))
    return times


def step_time_ratio(train, steps=50, rounds=5, seed=0):
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    batches = [b for _, b in zip(range(steps), train.batches(128, gen))]
    hand = HandWrittenVAE()
    hand_opt = torch.optim.Adam(hand.parameters(), lr=1e-3)

    def hand_step(xb):
        loss = hand.loss(xb)
        loss.backward()
        hand_opt.step()
        hand_opt.zero_grad(set_to_none=True)

    rows = {"hand-written PyTorch": []}
    contenders = {}
    for name in ("Trace_ELBO", "TraceMeanField_ELBO", "JitTraceMeanField_ELBO"):
        model = VAE(784, 50, hidden=(400,))
        objective = make_objective(name)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)

        def step(xb, model=model, objective=objective, opt=opt):
            objective.loss_and_grads(model.model, model.guide, xb)
            opt.step()
            opt.zero_grad(set_to_none=True)

        step(batches[0])  # JIT compiles on first call
        contenders[f"pyrovae {name}"] = step
        rows[f"pyrovae {name}"] = []
    hand_step(batches[0])
    # Interleave the contenders so that drifts in machine load hit all alike.
    for _ in range(rounds):
        rows["hand-written PyTorch"] += time_steps(hand_step, batches, 1)
        for name, step in contenders.items():
            rows[name] += time_steps(step, batches, 1)
    base = statistics.median(rows["hand-written PyTorch"])
    return pd.DataFrame(
        [{"implementation": k, "ms_per_step": 1e3 * statistics.median(v),
          "ratio_to_hand_written": statistics.median(v) / base} for k, v in rows.items()]
    )


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
    timing = step_time_ratio(train, seed=args.seed)
    timing.to_csv(out / "step_time.csv", index=False)
    print(timing.to_markdown(index=False, floatfmt=".3f"))

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
    (out / "results.md").write_text(
        table.to_markdown(index=False, floatfmt=".2f") + "\n\n"
        + timing.to_markdown(index=False, floatfmt=".3f") + "\n"
    )
    print(table.to_markdown(index=False, floatfmt=".2f"))


if __name__ == "__main__":
    main()
