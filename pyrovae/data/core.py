"""In-memory data sets, batching by index permutation, and the one rule for
data entering pyrovae.

A whole split is one tensor on the training device. Batches are slices taken
through a random permutation, so the hot path has no per-sample Python work
and no DataLoader transforms.

Data in: :func:`as_tensor` is the single rule every entry point applies
(``as_dataset`` for fit/evaluate, ``LatentModel.as_data`` for a model's own
methods):

- accepted: torch tensors, numpy arrays, pandas DataFrames and Series, and
  nested lists/tuples of numbers;
- bool, integer and floating values are converted to ``dtype`` (default
  ``torch.get_default_dtype()``) on ``device`` (default: a tensor stays where
  it is, anything else goes to the default device);
- shape: (N, D) is N data points of D columns; a 1-D input is N scalar
  observations and becomes (N, 1); more than 2 dimensions (images) are
  flattened to (N, -1);
- refused, with one line saying what is wrong and how to fix it: complex,
  object, string, date or categorical values, scalars, ragged lists, empty data
  (N = 0 or D = 0) and any other type (``ValueError`` for bad values or shapes,
  ``TypeError`` for an unsupported type);
- refused too: finite values that the conversion to ``dtype`` would turn
  into inf (1e300 in float32);
- not checked here: NaN and infinite values (a model's ``check_data`` and
  evaluation do that).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Iterator, Optional, Tuple

import numpy as np
import pandas as pd
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
            # One uniform draw and a comparison: the same Bernoulli(x) bits as
            # torch.bernoulli, at a quarter of its cost on a CPU.
            u = torch.rand(x.shape, generator=generator, dtype=x.dtype, device=x.device)
            return (u < x).to(x.dtype)
        return x

    def batches(
        self,
        batch_size: int,
        generator: Optional[torch.Generator] = None,
        shuffle: bool = True,
        drop_last: bool = True,
        rank: int = 0,
        world_size: int = 1,
    ) -> Iterator[torch.Tensor]:
        """One epoch of batches; with ``drop_last`` every batch has the same
        shape, which JIT-compiled objectives need.

        With ``world_size`` > 1 (data-parallel training) every process passes
        the same ``generator`` state and its own ``rank``: the epoch's
        permutation and batches of ``batch_size`` (the global batch) are the
        ones a single process draws, and process ``rank`` gets rows
        ``rank * b .. (rank + 1) * b`` of each, ``b = batch_size / world_size``.
        Dynamically binarized data is drawn for the whole batch on every
        process, so the generators stay in step and the processes together
        see the single-process stream.
        """
        n = len(self)
        if world_size > 1 and (batch_size > n or batch_size % world_size or not drop_last):
            raise ValueError(f"a batch of {batch_size} cannot be split over {world_size} "
                             f"processes on {n} data points: it must divide evenly and fit, "
                             "and partial batches are dropped")
        if batch_size > n:
            batch_size = n
        if shuffle:
            # The permutation is drawn where the generator lives, then moved.
            where = generator.device if generator is not None else "cpu"
            order = torch.randperm(n, generator=generator, device=where).to(self.x.device)
        else:
            order = torch.arange(n, device=self.x.device)
        stop = n - n % batch_size if drop_last else n
        if world_size > 1:
            yield from self._shard(order, stop, batch_size, generator, rank, world_size)
            return
        for start in range(0, stop, batch_size):
            yield self._draw(self.x[order[start : start + batch_size]], generator)

    def _shard(self, order: torch.Tensor, stop: int, batch_size: int,
               generator: Optional[torch.Generator], rank: int,
               world_size: int) -> Iterator[torch.Tensor]:
        lo = rank * (batch_size // world_size)
        hi = lo + batch_size // world_size
        for start in range(0, stop, batch_size):
            if self.binarize == "dynamic":
                yield self._draw(self.x[order[start : start + batch_size]], generator)[lo:hi]
            else:
                yield self.x[order[start + lo : start + hi]]

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


_ACCEPTED = "a torch.Tensor, numpy array, pandas DataFrame/Series or nested list of numbers"


def _is_integer(dtype: torch.dtype) -> bool:
    try:
        torch.iinfo(dtype)
    except TypeError:
        return False
    return True


def _numeric_numpy(arr: np.ndarray, name: str, what: str) -> np.ndarray:
    """``arr`` as a numpy array torch can take, or one clear error."""
    kind = arr.dtype.kind
    if kind == "c":
        raise ValueError(
            f"{name}: expected real numbers, got {what} of complex dtype {arr.dtype}; "
            "pass the real part, or real and imaginary parts as separate columns"
        )
    if kind not in "biuf":
        raise ValueError(
            f"{name}: expected numbers, got {what} of dtype {arr.dtype} (strings, dates or mixed "
            "objects); convert it to numbers first, e.g. arr.astype(float), encoding or dropping "
            "the non-numeric values"
        )
    if arr.dtype not in (np.float32, np.float64):  # bool, integers, float16, longdouble
        arr = arr.astype(np.float64)
    if not arr.flags.c_contiguous:
        arr = np.ascontiguousarray(arr)
    if not arr.flags.writeable:  # torch.from_numpy warns on read-only memory
        arr = arr.copy()
    return arr


def _pandas_to_numpy(data: Any, name: str) -> np.ndarray:
    if isinstance(data, pd.Series):
        frame = data.to_frame()
        labels = ["a Series" if data.name is None else f"a Series {data.name!r}"]
    else:
        frame = data
        labels = [f"a DataFrame column {column!r}" for column in frame.columns]
    for what, dtype in zip(labels, frame.dtypes):
        if pd.api.types.is_complex_dtype(dtype):
            raise ValueError(
                f"{name}: expected real numbers, got {what} of complex dtype {dtype}; "
                "pass the real part, or real and imaginary parts as separate columns"
            )
        if not pd.api.types.is_numeric_dtype(dtype):
            raise ValueError(
                f"{name}: expected numbers, got {what} of dtype {dtype}; drop or encode "
                "non-numeric columns (e.g. df.select_dtypes('number') or pd.get_dummies(df))"
            )
    # float64 holds every bool, integer and float32 value exactly; pandas'
    # missing values (pd.NA) become NaN, which check_data reports.
    arr = frame.to_numpy(dtype=np.float64, na_value=np.nan)
    return arr if arr.flags.writeable else arr.copy()  # copy-on-write pandas hands out read-only views


def as_tensor(
    data: Any,
    *,
    dtype: Optional[torch.dtype] = None,
    device: Optional[torch.device | str] = None,
    name: str = "data",
) -> torch.Tensor:
    """The one rule for data entering pyrovae: ``data`` as an (N, D) tensor.

    Accepts torch tensors, numpy arrays, pandas DataFrames/Series and nested
    lists of numbers. Bool, integer and floating values become ``dtype``
    (default ``torch.get_default_dtype()``) on ``device`` (default: a tensor
    stays on its device, other inputs go to the default device). A 1-D input
    is N scalar observations, shape (N, 1); an input with more than two
    dimensions (images) is flattened to (N, -1). Complex, object, string,
    date or categorical values, scalars, ragged lists, empty data (N = 0 or
    D = 0) and other types raise a one-line ``ValueError`` (``TypeError`` for
    an unsupported type) saying what to do. NaN and inf are not checked here.

    Args:
        data: the data.
        dtype: floating dtype of the result.
        device: device of the result.
        name: what the data is called in error messages.
    """
    dtype = torch.get_default_dtype() if dtype is None else dtype
    if isinstance(data, torch.Tensor):
        if data.dtype.is_complex:
            raise ValueError(
                f"{name}: expected real numbers, got a tensor of complex dtype {data.dtype}; "
                "pass the real part (x.real), or real and imaginary parts as separate columns"
            )
        if data.is_quantized or not (data.dtype.is_floating_point or data.dtype == torch.bool
                                     or _is_integer(data.dtype)):
            raise ValueError(f"{name}: expected numbers, got a tensor of dtype {data.dtype}; "
                             "convert it to a floating-point tensor first")
        x = data
    elif isinstance(data, (pd.DataFrame, pd.Series)):
        x = torch.from_numpy(_pandas_to_numpy(data, name))
    elif isinstance(data, np.ndarray):
        x = torch.from_numpy(_numeric_numpy(data, name, "an array"))
    elif isinstance(data, (list, tuple)):
        try:
            arr = np.asarray(data)
        except ValueError:
            raise ValueError(
                f"{name}: the nested list is ragged (rows of different lengths); give every row "
                "the same number of values"
            ) from None
        x = torch.from_numpy(_numeric_numpy(arr, name, "a nested list"))
    else:
        hint = ""
        if isinstance(data, ArrayDataset):
            hint = "; pass its tensor: data.x, or data.fixed(seed) when dynamically binarized"
        raise TypeError(f"{name}: expected {_ACCEPTED}, got {type(data).__name__}{hint}")
    if x.dim() == 0:
        raise ValueError(
            f"{name}: expected data of shape (N, D) or (N,), got a scalar; wrap one data point as [[value]]"
        )
    if x.numel() == 0:
        raise ValueError(
            f"{name} is empty (shape {tuple(x.shape)}); it needs at least one row (data point) "
            "and one column"
        )
    if x.dim() == 1:
        x = x.unsqueeze(-1)
    elif x.dim() > 2:
        x = x.reshape(x.shape[0], -1)
    out = x.to(dtype=dtype, device=device)
    if (x.is_floating_point() and out.is_floating_point()
            and torch.finfo(out.dtype).max < torch.finfo(x.dtype).max
            and bool(torch.isinf(out).any()) and not bool(torch.isinf(x).any())):
        raise ValueError(
            f"{name} has values up to {x.abs().max().item():.3g}, beyond the range of {out.dtype} "
            f"(largest {torch.finfo(out.dtype).max:.3g}); rescale or standardize it first"
        )
    return out


def as_dataset(
    data: Any,
    name: str = "",
    dtype: Optional[torch.dtype] = None,
    device: Optional[torch.device | str] = None,
) -> ArrayDataset:
    """Accept anything :func:`as_tensor` accepts wherever a data set is expected.

    An :class:`ArrayDataset` is kept (labels, ``binarize`` and
    ``image_shape`` included) and only converted to ``dtype``/``device`` when
    they are given and differ. Otherwise ``data`` goes through
    :func:`as_tensor`, with one difference for ``dtype=None``: a
    floating-point torch tensor keeps its precision (a float64 tensor given to
    a float64 program stays float64); numpy, pandas and list inputs, whose
    float64 is usually incidental, become the default dtype.
    """
    if isinstance(data, ArrayDataset):
        x = data.x.to(dtype=dtype or data.x.dtype, device=device or data.x.device)
        if x is data.x:
            return data
        return replace(data, x=x, y=None if data.y is None else data.y.to(x.device))
    if dtype is None and isinstance(data, torch.Tensor) and data.is_floating_point():
        dtype = data.dtype
    return ArrayDataset(as_tensor(data, dtype=dtype, device=device, name=name or "data"), name=name)


def check_finite(x: torch.Tensor, name: str = "data") -> None:
    """Raise ``ValueError`` naming the first NaN or infinite value of ``x``."""
    bad = ~torch.isfinite(x)
    if bool(bad.any()):
        row, col = (int(i) for i in bad.nonzero()[0].tolist()[:2]) if x.dim() == 2 \
            else (int(bad.nonzero()[0][0]), 0)
        raise ValueError(
            f"{name} has {int(bad.sum())} NaN or infinite values (the first in row {row}, "
            f"column {col}: {x[row, col].item() if x.dim() == 2 else x[row].item()}); "
            "drop or impute them first"
        )
