"""Real tabular data sets: CSV files under the data root, scikit-learn's
bundled sets, and any CSV file by path.

Every loader returns one split of a deterministic train/test split: the rows
are permuted with ``numpy.random.default_rng(seed)`` and the last
``round(test_fraction * N)`` rows of the permutation form the test split, so
the same ``seed`` and ``test_fraction`` always give the same rows, and the
train and test splits are disjoint and cover the data set. With
``standardize=True`` (the default for every tabular loader) each column is
centred and scaled by the mean and standard deviation of the *train* split,
whichever split is returned, so the test split carries no information into the
scaling. Columns that are constant on the train split are only centred.

``split="all"`` returns every row (in file order), scaled by the same train
statistics.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence, Tuple

import numpy as np
import pandas as pd
import torch

from pyrovae.data.core import ArrayDataset
from pyrovae.data.images import data_root
from pyrovae.data.registry import DATASETS

SPLITS = ("train", "test", "all")
# Row-name columns written by R (Rdatasets) and by pandas' to_csv.
ROW_NAME_COLUMNS = ("rownames", "Unnamed: 0", "")
BFI_ITEMS = tuple(f"{trait}{i}" for trait in "ACENO" for i in range(1, 6))


def split_indices(n: int, test_fraction: float = 0.2, seed: int = 0) -> Tuple[np.ndarray, np.ndarray]:
    """Row indices of the train and test splits of ``n`` rows.

    The train split gets ``n - round(test_fraction * n)`` rows (at least one
    row goes to each side), both index arrays are sorted.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be strictly between 0 and 1, got {test_fraction}")
    if n < 2:
        raise ValueError(f"a train/test split needs at least 2 rows, got {n}")
    n_test = min(max(int(round(test_fraction * n)), 1), n - 1)
    order = np.random.default_rng(seed).permutation(n)
    return np.sort(order[: n - n_test]), np.sort(order[n - n_test :])


def train_statistics(x_train: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Column means and standard deviations (ddof=0) used for standardization;
    a zero standard deviation is replaced by 1 so constant columns stay finite."""
    mean = x_train.mean(axis=0)
    std = x_train.std(axis=0)
    std = np.where(std > 0, std, 1.0)
    return mean, std


def make_split(
    x: np.ndarray,
    y: Optional[np.ndarray] = None,
    *,
    name: str,
    split: str = "train",
    seed: int = 0,
    test_fraction: float = 0.2,
    standardize: bool = True,
    image_shape: Optional[Tuple[int, ...]] = None,
    device: str | torch.device = "cpu",
) -> ArrayDataset:
    """Turn a full (N, D) array into one split (see the module docstring)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"expected a 2-D table of shape (N, D), got shape {x.shape}")
    train_idx, test_idx = split_indices(len(x), test_fraction, seed)
    rows = {"train": train_idx, "test": test_idx, "all": np.arange(len(x))}[split]
    out = x[rows]
    if standardize:
        mean, std = train_statistics(x[train_idx])
        out = (out - mean) / std
    labels = None if y is None else torch.as_tensor(np.asarray(y)[rows], device=device)
    return ArrayDataset(
        torch.as_tensor(out, dtype=torch.float32, device=device), labels,
        name=name, image_shape=image_shape,
    )


def _read_csv(path: Path, what: str) -> pd.DataFrame:
    if not path.exists():
        raise FileNotFoundError(
            f"{what} is not in {path.parent}: expected the file {path.name} there. "
            "Point root= / --data-root / PYROVAE_DATA at the data folder that holds tabular/."
        )
    try:
        return pd.read_csv(path)
    except (ValueError, OSError) as err:  # empty, binary, malformed, a folder
        reason = " ".join(str(err).split()) or type(err).__name__
        raise ValueError(f"{path} is not a readable CSV file ({reason}); it needs a header "
                         "line and comma-separated numeric columns") from None


def _drop_row_names(frame: pd.DataFrame) -> pd.DataFrame:
    first = frame.columns[0]
    if first in ROW_NAME_COLUMNS:
        return frame.drop(columns=first)
    return frame


def load_csv(
    path: str | os.PathLike,
    columns: Optional[Sequence[str]] = None,
    label: Optional[str] = None,
    *,
    split: str = "train",
    seed: int = 0,
    test_fraction: float = 0.2,
    standardize: bool = True,
    name: Optional[str] = None,
    device: str | torch.device = "cpu",
) -> ArrayDataset:
    """Any CSV file with a header line as a tabular data set.

    Args:
        path: the CSV file.
        columns: the feature columns; ``None`` takes every column except
            ``label`` and a leading row-name column (``rownames`` as R writes
            it, or pandas' unnamed index column). All features must be numeric.
        label: optional column returned as ``y`` (integer codes, in order of
            first appearance, when it is not numeric).
        split, seed, test_fraction, standardize: see the module docstring;
            standardization uses train-split statistics.
        name: data set name for reports (default: the file stem).

    Rows with a missing value in any used column are dropped before splitting.
    """
    path = Path(path).expanduser()
    frame = _drop_row_names(_read_csv(path, f"the CSV file {path.name}"))
    if columns is None:
        columns = [c for c in frame.columns if c != label]
    columns = list(columns)
    used = columns + ([label] if label is not None else [])
    missing = [c for c in used if c not in frame.columns]
    if missing:
        raise ValueError(f"{path.name} has no column(s) {missing}; its columns are {list(frame.columns)}")
    frame = frame[used].dropna()
    if frame.empty:
        raise ValueError(f"{path.name} has no rows with a value in every used column {used}; "
                         "add data rows, or choose columns=[...] that are filled in")
    features = frame[columns]
    non_numeric = [c for c in columns if not pd.api.types.is_numeric_dtype(features[c])]
    if non_numeric:
        raise ValueError(
            f"columns {non_numeric} of {path.name} are not numeric; pass columns=[...] with "
            "numeric columns only, or label=<column> for a class column"
        )
    y = None
    if label is not None:
        y_col = frame[label]
        y = y_col.to_numpy() if pd.api.types.is_numeric_dtype(y_col) else pd.factorize(y_col)[0]
    return make_split(
        features.to_numpy(dtype=np.float64), y, name=name or path.stem, split=split,
        seed=seed, test_fraction=test_fraction, standardize=standardize, device=device,
    )


@DATASETS.register("faithful")
def faithful(
    split: str = "train",
    root: Optional[str] = None,
    seed: int = 0,
    test_fraction: float = 0.2,
    standardize: bool = True,
    device: str | torch.device = "cpu",
) -> ArrayDataset:
    """Old Faithful geyser eruptions [1, 2]: 272 rows of (eruption minutes,
    waiting minutes), from ``<root>/tabular/faithful.csv``; two clear clusters.

    Split and standardization (by train statistics, on by default) as in the
    module docstring.

    References

    [1] W. Härdle, "Smoothing Techniques with Implementation in S", Springer, 1991.
    [2] A. Azzalini and A. W. Bowman, "A Look at Some Data on the Old Faithful
        Geyser", Applied Statistics 39(3), 357-365, 1990.
    """
    return load_csv(
        data_root(root) / "tabular" / "faithful.csv", ["eruptions", "waiting"],
        split=split, seed=seed, test_fraction=test_fraction, standardize=standardize,
        name="faithful", device=device,
    )


@DATASETS.register("bfi")
def bfi(
    split: str = "train",
    root: Optional[str] = None,
    seed: int = 0,
    test_fraction: float = 0.2,
    standardize: bool = True,
    device: str | torch.device = "cpu",
) -> ArrayDataset:
    """Big Five Inventory items from Revelle's ``psych`` package [1], from
    ``<root>/tabular/bfi.csv``.

    Only the 25 item columns A1..A5, C1..C5, E1..E5, N1..N5, O1..O5 (6-point
    Likert answers) are used; ``gender``, ``education`` and ``age`` are not.
    Respondents with a missing answer on any of the 25 items are dropped
    (2800 rows in the file, 2436 complete ones), before the split.
    Standardization (by train statistics, on by default) as in the module
    docstring.

    References

    [1] W. Revelle, "psych: Procedures for Psychological, Psychometric, and
        Personality Research", R package, Northwestern University.
    """
    return load_csv(
        data_root(root) / "tabular" / "bfi.csv", list(BFI_ITEMS),
        split=split, seed=seed, test_fraction=test_fraction, standardize=standardize,
        name="bfi", device=device,
    )


def _sklearn_loader(function: str, name: str, image_shape: Optional[Tuple[int, ...]] = None):
    def load(
        split: str = "train",
        root: Optional[str] = None,
        seed: int = 0,
        test_fraction: float = 0.2,
        standardize: bool = True,
        device: str | torch.device = "cpu",
    ) -> ArrayDataset:
        # scikit-learn is an optional extra; import it only when asked for.
        try:
            import sklearn.datasets as skd
        except ImportError:
            raise ImportError(
                f"the {name!r} data set ships with scikit-learn, which is not installed; "
                "install it with `pip install pyrovae[sklearn]` (or `pip install scikit-learn`)"
            ) from None
        bunch = getattr(skd, function)()
        return make_split(
            bunch.data, bunch.target, name=name, split=split, seed=seed,
            test_fraction=test_fraction, standardize=standardize, image_shape=image_shape,
            device=device,
        )

    load.__doc__ = (
        f"scikit-learn's bundled ``{function}()`` data with its class labels as ``y`` "
        "(needs scikit-learn; ``root`` is accepted for a uniform interface and unused). "
        "Split and standardization (by train statistics, on by default) as in the "
        "module docstring."
    )
    return load


DATASETS.register("iris")(_sklearn_loader("load_iris", "iris"))
DATASETS.register("wine")(_sklearn_loader("load_wine", "wine"))
DATASETS.register("breast-cancer")(_sklearn_loader("load_breast_cancer", "breast-cancer"))
DATASETS.register("digits")(_sklearn_loader("load_digits", "digits", image_shape=(1, 8, 8)))
