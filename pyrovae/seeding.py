"""Seeds: one integer decides everything random in a run.

Library code never seeds global state behind the caller's back: a seeded
block forks the generators it touches and restores them on the way out.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional, Sequence

import torch


def _cuda_devices(device: Optional[str | torch.device]) -> Sequence[int]:
    if device is None or torch.device(device).type != "cuda" or not torch.cuda.is_available():
        return []
    index = torch.device(device).index
    return [torch.cuda.current_device() if index is None else index]


@contextlib.contextmanager
def seeded(seed: int, device: Optional[str | torch.device] = None) -> Iterator[None]:
    """Run a block with torch's global generators (CPU, and the CUDA device
    when ``device`` names one) seeded with ``seed``; their previous states
    come back afterwards.

    Use it where random state is consumed outside pyrovae's own seeded
    steps, for example to make a model's initial weights reproducible::

        with seeded(0):
            model = VAE(784)
    """
    if isinstance(seed, bool) or int(seed) != seed:
        raise ValueError(f"seed must be an integer, got {seed!r}")
    devices = _cuda_devices(device)
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(int(seed))
        yield


def derive_seed(seed: int, *salt: int) -> int:
    """A seed for a sub-step (an epoch's evaluation, a restart), decided by
    ``seed`` and ``salt`` and independent of how much randomness came before."""
    g = torch.Generator().manual_seed(int(seed))
    value = int(torch.randint(2**62, (1,), generator=g))
    for s in salt:
        value = int(torch.randint(2**62, (1,), generator=torch.Generator().manual_seed(value ^ int(s))))
    return value
