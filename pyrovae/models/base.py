"""The contract every pyrovae model meets.

A model object is an ``nn.Module`` with two Pyro programs of the same
signature: ``model(x)`` defines p(x, z) and ``guide(x)`` defines q(z | x).
Data sites live under ``pyro.plate("data", len(x))`` and event dimensions use
``.to_event``. Optional methods, where the mathematics gives them:
``log_marginal(x)`` (exact log p(x) per data point), ``posterior(x)`` (exact
p(z | x) as a distribution), ``sample(n)``, ``encode(x)``, ``reconstruct(x)``.

Parameters live in the module. Pyro's ELBOs find trainable tensors through
``pyro.param`` sites, so each model registers its sub-modules with
``pyro.module`` under a name unique to the instance: the global parameter store
only holds references, and two models can be trained side by side in one
process.
"""

from __future__ import annotations

import itertools
from typing import Any, Dict

import pyro
import torch
from torch import nn

_instance_ids = itertools.count()


class LatentModel(nn.Module):
    """Base class: gives each instance a unique Pyro name and a config record."""

    def __init__(self) -> None:
        super().__init__()
        self.pyro_name = f"{type(self).__name__.lower()}{next(_instance_ids)}"

    def register(self, part: str, module: nn.Module) -> None:
        """Expose ``module``'s parameters to Pyro as ``<instance>.<part>``."""
        pyro.module(f"{self.pyro_name}.{part}", module)

    def config(self) -> Dict[str, Any]:
        """Constructor arguments, so a checkpoint can rebuild the model."""
        return dict(getattr(self, "_config", {}))

    def model(self, x: torch.Tensor) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def guide(self, x: torch.Tensor) -> None:  # pragma: no cover - abstract
        raise NotImplementedError
