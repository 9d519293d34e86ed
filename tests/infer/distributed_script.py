"""Run by tests/infer/test_distributed.py in a subprocess: Lightning Fabric's
``ddp`` strategy starts the other ranks by running this file again, which is
fragile inside pytest itself.

Every rank trains a small Gaussian VAE on ``digits`` three times (two epochs
with a checkpoint, one more resumed from it, and three uninterrupted epochs),
then once with a learning rate that diverges, then a model without latent
variables by plain SGD, and saves weights, histories and the divergence
message to ``OUT/rank{r}.pt``.
"""

import argparse
import os
from pathlib import Path

import pyro
import pyro.distributions as dist
import torch
from torch import nn

from pyrovae.data import load_dataset
from pyrovae.infer import fit
from pyrovae.infer.fit import TrainingDiverged
from pyrovae.models import VAE
from pyrovae.seeding import seeded

# The model and settings the test's single-process run uses too.
MODEL = dict(z_dim=8, hidden=(64,), likelihood="gaussian")
SETTINGS = dict(lr=3e-3, eval_size=400, progress=False)


def build(x_dim: int, seed: int) -> VAE:
    with seeded(seed):
        return VAE(x_dim, **MODEL)


class MeanModel(nn.Module):
    """x_n ~ N(loc, I) with loc starting at 1 and no latent variables: the
    loss draws no noise, so two processes must take the steps of one (to
    rounding). With ``num_data`` the data plate scales each batch to the
    whole training set."""

    def __init__(self, dim: int, num_data=None) -> None:
        super().__init__()
        self.loc = nn.Parameter(torch.ones(dim))
        self.num_data = num_data

    def model(self, x):
        with pyro.plate("data", self.num_data or x.shape[0],
                        subsample=torch.arange(x.shape[0])):
            pyro.sample("x", dist.Normal(self.loc, 1.0).to_event(1), obs=x)

    def guide(self, x):
        pass


def train_means(train, common):
    """``loc`` after two epochs of plain SGD, without and with ``num_data``."""
    out = {}
    for num_data, lr in ((None, 1e-3), (len(train), 2e-5)):
        means = MeanModel(train.dim, num_data)
        fit(means, train, epochs=2, **{**common, "optimizer": "sgd", "lr": lr})
        out[str(num_data)] = means.loc.detach().clone()
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--strategy", default="ddp")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    out = Path(args.out)
    train, test = load_dataset("digits", split="train"), load_dataset("digits", split="test")
    common = dict(batch_size=args.batch_size, seed=args.seed, devices=args.devices,
                  strategy=args.strategy, accelerator="cpu", **SETTINGS)

    first = build(train.dim, args.seed)
    fit(first, train, test, epochs=args.epochs - 1, checkpoint_dir=str(out / "ckpt"), **common)
    resumed_model = build(train.dim, args.seed)
    resumed = fit(resumed_model, train, test, epochs=args.epochs, resume=True,
                  checkpoint_dir=str(out / "ckpt"), **common)
    full_model = build(train.dim, args.seed)
    full = fit(full_model, train, test, epochs=args.epochs, **common)
    try:  # a run that diverges stops on every rank, at the same step
        fit(build(train.dim, args.seed), train, epochs=1, **{**common, "lr": 1e4})
        diverged = None
    except TrainingDiverged as err:
        diverged = str(err)

    means = train_means(train, common)

    rank = int(os.environ.get("LOCAL_RANK", "0"))
    torch.save({
        "rank": rank,
        "state": full_model.state_dict(),
        "history": full.history.to_dict(orient="list"),
        "resumed_state": resumed_model.state_dict(),
        "resumed_history": resumed.history.to_dict(orient="list"),
        "diverged": diverged,
        "means": means,
    }, out / f"rank{rank}.pt")


if __name__ == "__main__":
    main()
