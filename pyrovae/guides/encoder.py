"""Amortized Gaussian encoders: networks x -> parameters of q(z | x).

Every amortized encoder splits its forward pass in two (:class:`AmortizedEncoder`):
``raw(x)``, the network, returns one unconstrained tensor per data point, and
``params(raw)`` maps it to the parameters of q (positive scales, flow
contexts). The split names the family of q the guide can express: the
distributions reached by some ``raw``. Diagnostics that optimize q per data
point (the inference gap) optimize ``raw`` directly, whatever the network.
"""

from __future__ import annotations

from typing import Sequence, Tuple

import pyro.distributions as dist
import torch
from torch import nn
from torch.nn.functional import softplus

from pyrovae.guides.registry import GUIDES
from pyrovae.nn import MLP


class AmortizedEncoder(nn.Module):
    """Base of amortized encoders: ``forward(x) = params(raw(x))``.

    Subclasses implement :meth:`raw` (the network: ``x`` of shape (N, ...) to
    an unconstrained tensor of shape (N, R)) and :meth:`params` (that tensor
    to the tuple of parameters the guide reads, each with leading dimension N).
    """

    def raw(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def params(self, raw: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        return self.params(self.raw(x))


@GUIDES.register("mlp")
class DiagNormalEncoder(AmortizedEncoder):
    """q(z | x) = N(z; mu(x), diag sigma(x)^2) with mu, sigma from one MLP.

    The scale goes through a softplus with a small floor, which keeps early
    training stable without the overflow of ``exp``.
    """

    def __init__(
        self,
        x_dim: int,
        z_dim: int,
        hidden: Sequence[int] = (400,),
        activation: str = "softplus",
        min_scale: float = 1e-4,
    ) -> None:
        super().__init__()
        self.net = MLP(x_dim, hidden, 2 * z_dim, activation)
        self.min_scale = min_scale

    def raw(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def params(self, raw: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        loc, raw_scale = raw.chunk(2, dim=-1)
        return loc, softplus(raw_scale) + self.min_scale


def encoder_distribution(encoder: nn.Module, x: torch.Tensor) -> dist.Distribution:
    """q(z | x) from an encoder's output: a full-covariance Normal when the
    encoder's ``scale_kind`` is ``"tril"`` (its second output is a Cholesky
    factor), a diagonal Normal otherwise. Event dimension 1 either way."""
    loc, scale = encoder(x)
    if getattr(encoder, "scale_kind", "diag") == "tril":
        return dist.MultivariateNormal(loc, scale_tril=scale)
    return dist.Normal(loc, scale).to_event(1)
