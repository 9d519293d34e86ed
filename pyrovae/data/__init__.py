"""Data sets (image and tabular, real and synthetic) held as single tensors."""

from __future__ import annotations

from typing import Any

from pyrovae.data.core import ArrayDataset, as_dataset, as_tensor
from pyrovae.data.registry import DATASETS
from pyrovae.data import images  # noqa: F401  (registers the image data sets)
from pyrovae.data import tabular  # noqa: F401  (registers the tabular data sets)
from pyrovae.data import synthetic  # noqa: F401  (registers the synthetic data sets)
from pyrovae.data.images import data_root
from pyrovae.data.tabular import load_csv


def load_dataset(name: str, split: str = "train", **options: Any) -> ArrayDataset:
    """Load the data set registered as ``name`` (see ``DATASETS``)."""
    return DATASETS.get_checked(name)(split=split, **options)


__all__ = ["ArrayDataset", "as_dataset", "as_tensor", "DATASETS", "data_root", "load_csv", "load_dataset"]
