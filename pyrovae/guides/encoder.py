"""Amortized Gaussian encoders: networks x -> parameters of q(z | x).

Every amortized encoder splits its forward pass in two (:class:`AmortizedEncoder`):
``raw(x)``, the network, returns one unconstrained tensor per data point, and
``params(raw)`` maps it to the parameters of q (positive scales, flow
contexts). The split names the family of q the guide can express: the
distributions reached by some ``raw``. Diagnostics that optimize q per data
point (the inference gap) optimize ``raw`` directly, whatever the network.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import pyro.distributions as dist
import torch
from torch import nn
from torch.nn.functional import softplus

from pyrovae.guides.registry import GUIDES
from pyrovae.nn import MLP, ConvNet, image_shape_of


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


class GaussianEncoder(AmortizedEncoder):
    """Base of the diagonal-Gaussian encoders: ``raw(x)`` has ``2 * z_dim +
    context_dim`` columns, read by :meth:`params` as

    - loc = raw[:, :z_dim];
    - scale = softplus(raw[:, z_dim:2 z_dim]) + min_scale: the softplus with a
      small floor keeps early training stable without the overflow of ``exp``;
    - context h = raw[:, 2 z_dim:], only when ``context_dim > 0``: the input
      of a flow on top of the Gaussian (:class:`pyrovae.guides.iaf.IAF`).

    Subclasses build ``self.net`` (x -> raw) and keep this split.
    """

    def __init__(self, z_dim: int, context_dim: int = 0, min_scale: float = 1e-4) -> None:
        super().__init__()
        if isinstance(context_dim, bool) or not isinstance(context_dim, int) or context_dim < 0:
            raise ValueError(f"context_dim must be an integer >= 0, got {context_dim!r}")
        self.z_dim, self.context_dim, self.min_scale = z_dim, context_dim, min_scale

    @property
    def raw_dim(self) -> int:
        """Columns of ``raw(x)``: ``2 * z_dim + context_dim``."""
        return 2 * self.z_dim + self.context_dim

    def raw(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def params(self, raw: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        """``(loc, scale)``, or ``(loc, scale, context)`` when ``context_dim > 0``."""
        z = self.z_dim
        loc, scale = raw[..., :z], softplus(raw[..., z:2 * z]) + self.min_scale
        if self.context_dim:
            return loc, scale, raw[..., 2 * z:]
        return loc, scale


@GUIDES.register("mlp")
class DiagNormalEncoder(GaussianEncoder):
    """q(z | x) = N(z; mu(x), diag sigma(x)^2) with mu, sigma (and a flow
    context h(x) when ``context_dim > 0``) from one MLP with layers ``hidden``.
    """

    def __init__(
        self,
        x_dim: int,
        z_dim: int,
        hidden: Sequence[int] = (400,),
        activation: str = "softplus",
        min_scale: float = 1e-4,
        context_dim: int = 0,
    ) -> None:
        super().__init__(z_dim, context_dim, min_scale)
        self.net = MLP(x_dim, hidden, self.raw_dim, activation)


@GUIDES.register("conv")
class ConvEncoder(GaussianEncoder):
    """q(z | x) = N(z; mu(x), diag sigma(x)^2) for images, from a
    :class:`pyrovae.nn.ConvNet`: stride-2 convolutions with ``channels``, then
    fully connected layers ``hidden``. Takes flattened images (N, C*H*W).

    Args:
        x_dim: pixels per image, C * H * W.
        z_dim: latent dimension.
        hidden: fully connected layers after the convolutions (empty: one
            linear map to the outputs).
        activation: nonlinearity after every layer but the last.
        channels: output channels of the convolutions, in order.
        image_shape: (C, H, W) or (H, W); ``None``: square single-channel
            images (784 -> 28 x 28).
        min_scale: floor of the scale.
        context_dim: size of the flow context h(x) (0: none).
    """

    def __init__(
        self,
        x_dim: int,
        z_dim: int,
        hidden: Sequence[int] = (),
        activation: str = "relu",
        channels: Sequence[int] = (32, 64),
        image_shape: Optional[Sequence[int]] = None,
        min_scale: float = 1e-4,
        context_dim: int = 0,
    ) -> None:
        super().__init__(z_dim, context_dim, min_scale)
        shape = image_shape_of(x_dim, image_shape)
        self.net = ConvNet(shape, channels, self.raw_dim, hidden, activation)


def gaussian_distribution(encoder: nn.Module, params: Sequence[torch.Tensor]) -> dist.Distribution:
    """The Gaussian given by an encoder's outputs ``params`` (loc and scale
    first; a flow context after them is ignored): a full-covariance Normal when
    the encoder's ``scale_kind`` is ``"tril"`` (the scale is a Cholesky
    factor), a diagonal Normal otherwise. Event dimension 1 either way."""
    loc, scale = params[0], params[1]
    if getattr(encoder, "scale_kind", "diag") == "tril":
        return dist.MultivariateNormal(loc, scale_tril=scale)
    return dist.Normal(loc, scale).to_event(1)


def encoder_distribution(encoder: nn.Module, x: torch.Tensor) -> dist.Distribution:
    """q(z | x) from an encoder's output: :func:`gaussian_distribution` of
    ``encoder(x)`` (for an encoder with a flow context, the flow's base)."""
    return gaussian_distribution(encoder, encoder(x))
