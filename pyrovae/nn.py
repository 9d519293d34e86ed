"""Shared network blocks."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

ACTIVATIONS = {
    "relu": nn.ReLU,
    "softplus": nn.Softplus,
    "tanh": nn.Tanh,
    "elu": nn.ELU,
    "gelu": nn.GELU,
    "leaky_relu": nn.LeakyReLU,
}


def activation(name: str) -> nn.Module:
    try:
        return ACTIVATIONS[name]()
    except KeyError:
        raise ValueError(
            f"unknown activation {name!r}; choose one of {', '.join(sorted(ACTIVATIONS))}"
        ) from None


class MLP(nn.Sequential):
    """``in_dim -> hidden[0] -> ... -> hidden[-1] -> out_dim`` with an activation
    after every hidden layer and none after the last."""

    def __init__(
        self, in_dim: int, hidden: Sequence[int], out_dim: int, act: str = "softplus"
    ) -> None:
        layers: list[nn.Module] = []
        sizes = [in_dim, *hidden]
        for a, b in zip(sizes[:-1], sizes[1:]):
            layers += [nn.Linear(a, b), activation(act)]
        layers.append(nn.Linear(sizes[-1], out_dim))
        super().__init__(*layers)


class SplitHead(nn.Module):
    """A trunk followed by ``chunks`` equal heads: returns a tuple of tensors."""

    def __init__(self, trunk: nn.Module, chunks: int) -> None:
        super().__init__()
        self.trunk = trunk
        self.chunks = chunks

    def forward(self, x: torch.Tensor):
        return self.trunk(x).chunk(self.chunks, dim=-1)
