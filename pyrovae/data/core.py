"""In-memory data sets and batching by index permutation.

A whole split is one tensor on the training device. Batches are slices taken
through a random permutation, so the hot path has no per-sample Python work
and no DataLoader transforms.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Iterator, Optional, Tuple

import torch

BINARIZE = (None, "dynamic", "static")


@dataclass
class ArrayDataset:
    """A split held as one tensor.

    Attributes:
        x: data, shape (N, D), float.
        y: optional labels, shape (N,).
        name: data set name, for reports.
        image_shape: (C, H, W) when rows are flattened images.
        binarize: ``"dynamic"`` draws x ~ Bernoulli(x) afresh for every batch
            (the standard VAE benchmark setting); ``"static"`` and ``None``
            leave x as stored.
    """

    x: torch.Tensor
    y: Optional[torch.Tensor] = None
    name: str = ""
    image_shape: Optional[Tuple[int, ...]] = None
    binarize: Optional[str] = None

    def __post_init__(self) -> None:
        if self.binarize not in BINARIZE:
            raise ValueError(f"binarize must be one of {BINARIZE}, got {self.binarize!r}")
        if self.x.dim() != 2:
            raise ValueError(f"x must have shape (N, D), got {tuple(self.x.shape)}")
        if self.y is not None and len(self.y) != len(self.x):
            raise ValueError(f"x has {len(self.x)} rows but y has {len(self.y)}")

    def __len__(self) -> int:
        return self.x.shape[0]

    @property
    def dim(self) -> int:
        return self.x.shape[1]

    def to(self, device: torch.device | str) -> "ArrayDataset":
        y = None if self.y is None else self.y.to(device)
        return replace(self, x=self.x.to(device), y=y)

    def subset(self, n: int) -> "ArrayDataset":
        """The first ``n`` rows (all rows when ``n`` is larger)."""
        y = None if self.y is None else self.y[:n]
        return replace(self, x=self.x[:n], y=y)

    def _draw(self, x: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
        if self.binarize == "dynamic":
            return torch.bernoulli(x, generator=generator)
        return x

    def batches(
        self,
        batch_size: int,
        generator: Optional[torch.Generator] = None,
        shuffle: bool = True,
        drop_last: bool = True,
    ) -> Iterator[torch.Tensor]:
        """One epoch of batches; with ``drop_last`` every batch has the same
        shape, which JIT-compiled objectives need."""
        n = len(self)
        if batch_size > n:
            batch_size = n
        if shuffle:
            # The permutation is drawn where the generator lives, then moved.
            where = generator.device if generator is not None else "cpu"
            order = torch.randperm(n, generator=generator, device=where).to(self.x.device)
        else:
            order = torch.arange(n, device=self.x.device)
        stop = n - n % batch_size if drop_last else n
        for start in range(0, stop, batch_size):
            yield self._draw(self.x[order[start : start + batch_size]], generator)

    def fixed(self, seed: int = 0) -> torch.Tensor:
        """The data as evaluated: for dynamic binarization, one binarization
        drawn with ``seed`` and kept, so every evaluation sees the same bits."""
        if self.binarize != "dynamic":
            return self.x
        gen = torch.Generator(device=self.x.device).manual_seed(seed)
        return torch.bernoulli(self.x, generator=gen)

    def steps_per_epoch(self, batch_size: int, drop_last: bool = True) -> int:
        bs = min(batch_size, len(self))
        return len(self) // bs if drop_last else -(-len(self) // bs)


def as_dataset(data: "ArrayDataset | torch.Tensor", name: str = "") -> ArrayDataset:
    """Accept a tensor wherever a data set is expected."""
    if isinstance(data, ArrayDataset):
        return data
    if isinstance(data, torch.Tensor):
        x = data if data.is_floating_point() else data.float()
        if x.dim() == 1:
            x = x.unsqueeze(-1)
        return ArrayDataset(x.reshape(len(x), -1), name=name)
    raise TypeError(
        f"expected a torch.Tensor of shape (N, D) or a pyrovae ArrayDataset, got {type(data).__name__}"
    )
