"""Shared network blocks: MLPs and the convolutional stacks of image models.

The convolutional blocks take and return flattened images, shape (..., C*H*W),
so image models keep the (N, D) data convention of every other model; any
leading batch dimensions (Pyro's vectorized particles) are kept.
"""

from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

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

#: Kernel size of the stride-2 convolutions: divisible by the stride, so a
#: transposed convolution covers every output pixel equally often (no
#: checkerboard pattern in decoded images).
KERNEL = 4


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


def image_shape_of(x_dim: int, shape: Optional[Sequence[int]] = None) -> Tuple[int, int, int]:
    """The (C, H, W) shape of flattened images with ``x_dim`` values.

    ``shape`` given (``(H, W)`` or ``(C, H, W)``) is checked against
    ``x_dim``; otherwise the images are taken to be square with one channel
    (784 -> (1, 28, 28)).
    """
    if shape is None:
        side = math.isqrt(x_dim) if x_dim > 0 else 0
        if side * side != x_dim or side == 0:
            raise ValueError(
                f"data with {x_dim} columns are not square single-channel images; pass "
                "image_shape=(C, H, W) with C * H * W equal to the number of columns"
            )
        return (1, side, side)
    dims = tuple(int(s) for s in shape)
    if len(dims) == 2:
        dims = (1, *dims)
    if len(dims) != 3 or min(dims) < 1 or math.prod(dims) != x_dim:
        raise ValueError(
            f"image_shape must be (H, W) or (C, H, W) of positive sizes whose product is the "
            f"number of columns {x_dim}, got {tuple(shape)}"
        )
    return dims  # type: ignore[return-value]


def _halved(size: int) -> Tuple[int, int]:
    """Output size and padding of a stride-2 convolution that maps ``size``
    to ceil(size / 2): padding 1 for even sizes, 2 for odd ones (so that a
    7-pixel map gives 4, and a 1-pixel map stays 1)."""
    pad = 1 if size % 2 == 0 else 2
    return (size + 2 * pad - KERNEL) // 2 + 1, pad


def _conv_plan(shape: Tuple[int, int, int], channels: Sequence[int]):
    """Spatial sizes before each convolution and after the last, and the paddings."""
    sizes: List[Tuple[int, int]] = [shape[1:]]
    pads: List[Tuple[int, int]] = []
    for _ in channels:
        (h, ph), (w, pw) = _halved(sizes[-1][0]), _halved(sizes[-1][1])
        sizes.append((h, w))
        pads.append((ph, pw))
    return sizes, pads


def _check_channels(channels: Sequence[int]) -> Tuple[int, ...]:
    out = tuple(int(c) for c in channels)
    if not out or min(out) < 1:
        raise ValueError(f"channels must be a non-empty list of positive integers, got {list(channels)}")
    return out


class ConvNet(nn.Module):
    """Flattened images (..., C*H*W) -> (..., out_dim).

    Stride-2 convolutions with 4x4 kernels, one per entry of ``channels``
    (each halves the height and width, rounding up), an activation after
    each, then an :class:`MLP` with layers ``hidden`` on the flattened maps.
    """

    def __init__(
        self,
        shape: Sequence[int],
        channels: Sequence[int],
        out_dim: int,
        hidden: Sequence[int] = (),
        act: str = "relu",
    ) -> None:
        super().__init__()
        self.shape = tuple(int(s) for s in shape)
        channels = _check_channels(channels)
        sizes, pads = _conv_plan(self.shape, channels)
        layers: List[nn.Module] = []
        for c_in, c_out, pad in zip((self.shape[0], *channels[:-1]), channels, pads):
            layers += [nn.Conv2d(c_in, c_out, KERNEL, stride=2, padding=pad), activation(act)]
        self.convs = nn.Sequential(*layers)
        self.head = MLP(channels[-1] * sizes[-1][0] * sizes[-1][1], hidden, out_dim, act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        maps = self.convs(x.reshape(-1, *self.shape))
        return self.head(maps.flatten(1)).reshape(*lead, -1)


class DeconvNet(nn.Module):
    """(..., in_dim) -> flattened images (..., C*H*W), mirroring :class:`ConvNet`.

    An :class:`MLP` with layers ``hidden`` to the smallest feature maps
    (``channels[-1]`` of them), an activation, then stride-2 transposed
    convolutions with 4x4 kernels back through ``channels`` in reverse to the
    C output channels at the full size, with no activation after the last.
    """

    def __init__(
        self,
        in_dim: int,
        channels: Sequence[int],
        shape: Sequence[int],
        hidden: Sequence[int] = (),
        act: str = "relu",
    ) -> None:
        super().__init__()
        self.shape = tuple(int(s) for s in shape)
        channels = _check_channels(channels)
        sizes, pads = _conv_plan(self.shape, channels)
        self.start = (channels[-1], *sizes[-1])
        self.head = nn.Sequential(
            MLP(in_dim, hidden, math.prod(self.start), act), activation(act))
        layers: List[nn.Module] = []
        outs = (self.shape[0], *channels[:-1])
        steps = list(zip(channels, outs, pads, sizes[:-1], sizes[1:]))[::-1]
        for i, (c_in, c_out, pad, (h, w), (h_in, w_in)) in enumerate(steps):
            # A stride-2 transposed convolution gives 2 * in - 2 * pad + 2
            # pixels; output_padding adds the one an odd size needs.
            extra = (h - (2 * h_in - 2 * pad[0] + 2), w - (2 * w_in - 2 * pad[1] + 2))
            layers.append(nn.ConvTranspose2d(c_in, c_out, KERNEL, stride=2, padding=pad,
                                             output_padding=extra))
            if i < len(steps) - 1:
                layers.append(activation(act))
        self.deconvs = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        lead = z.shape[:-1]
        maps = self.head(z.reshape(-1, z.shape[-1])).reshape(-1, *self.start)
        return self.deconvs(maps).reshape(*lead, -1)
