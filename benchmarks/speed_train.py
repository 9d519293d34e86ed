"""The training step of ``fit`` against a hand-written PyTorch VAE step.

Same networks (784-400-50, softplus), same batches (MNIST binarized once, in
memory, batch 128), same optimizer (Adam 1e-3). The contenders take turns in
blocks of ``steps`` steps, ``rounds`` times, so that drifts in machine load
hit all alike; each block of ``fit`` is timed from its first step to its last
(``on_fit_start`` to ``on_fit_end``: the whole training loop, with its checks
and bookkeeping, without the one-time setup).
"""

from __future__ import annotations

import statistics
import time
from typing import Callable, Dict, List

import torch
from torch import nn
from torch.nn.functional import binary_cross_entropy_with_logits, softplus

from pyrovae import VAE, fit
from pyrovae.data import ArrayDataset
from pyrovae.nn import MLP


class HandWrittenVAE(nn.Module):
    """The networks of ``pyrovae.VAE`` with the textbook loss: the Bernoulli
    log-likelihood of one reparameterized draw plus the analytic KL."""

    def __init__(self, x_dim: int = 784, z_dim: int = 50, hidden=(400,)) -> None:
        super().__init__()
        self.encoder = MLP(x_dim, hidden, 2 * z_dim, "softplus")
        self.decoder = MLP(z_dim, hidden[::-1], x_dim, "softplus")

    def loss(self, x: torch.Tensor) -> torch.Tensor:
        loc, raw = self.encoder(x).chunk(2, -1)
        scale = softplus(raw) + 1e-4
        z = loc + scale * torch.randn_like(loc)
        rec = binary_cross_entropy_with_logits(self.decoder(z), x, reduction="sum")
        kl = 0.5 * (loc.pow(2) + scale.pow(2) - 1).sum() - scale.log().sum()
        return rec + kl


class _Clock:
    """Reads the clock when ``fit``'s loop starts and ends."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self.start = self.end = 0.0

    def on_fit_start(self, state) -> None:
        self.start = self.clock()

    def on_fit_end(self, state) -> None:
        self.end = self.clock()


def train_rows(x: torch.Tensor, *, steps: int = 50, rounds: int = 5, seed: int = 0,
               clock: Callable[[], float] = time.perf_counter) -> List[Dict]:
    """Seconds per step of each contender, and the ratio to the hand-written step."""
    data = ArrayDataset(x[: steps * 128])
    torch.manual_seed(seed)
    hand = HandWrittenVAE()
    hand_opt = torch.optim.Adam(hand.parameters(), lr=1e-3)

    def hand_block() -> float:
        gen = torch.Generator().manual_seed(seed)
        t0 = clock()
        for xb in data.batches(128, gen):
            loss = hand.loss(xb)
            loss.backward()
            hand_opt.step()
            hand_opt.zero_grad(set_to_none=True)
        return (clock() - t0) / steps

    contenders: Dict[str, Callable[[], float]] = {"hand-written PyTorch": hand_block}
    for elbo in ("Trace_ELBO", "TraceMeanField_ELBO"):
        for fast in (True, False):
            model = VAE(784, 50, hidden=(400,))

            def block(model=model, elbo=elbo, fast=fast) -> float:
                timer = _Clock(clock)
                fit(model, data, elbo=elbo, epochs=1, batch_size=128, lr=1e-3, seed=seed,
                    eval_every=0, progress=False, fast_path=fast, callbacks=[timer])
                return (timer.end - timer.start) / steps

            contenders[f"fit, {elbo}" + ("" if fast else ", plain Pyro path")] = block
    for run in contenders.values():  # warm-up: allocator, first-step probes
        run()
    times: Dict[str, List[float]] = {name: [] for name in contenders}
    for _ in range(rounds):
        for name, run in contenders.items():
            times[name].append(run())
    base = statistics.median(times["hand-written PyTorch"])
    return [{"part": "train", "case": name, "ms_per_step": 1e3 * statistics.median(t),
             "ratio": statistics.median(t) / base} for name, t in times.items()]


if __name__ == "__main__":
    import argparse

    from pyrovae import load_dataset

    p = argparse.ArgumentParser()
    p.add_argument("--clock", choices=["wall", "process"], default="wall")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--rounds", type=int, default=5)
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    train = load_dataset("mnist", "train", binarize="dynamic")
    rows = train_rows(train.fixed(0), rounds=a.rounds,
                      clock=time.perf_counter if a.clock == "wall" else time.process_time)
    for r in rows:
        print(f"{r['case']:45s} {r['ms_per_step']:8.2f} ms  {r['ratio']:.3f}")
