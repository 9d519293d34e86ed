"""Tabular loaders: deterministic splits, train-statistics standardization,
missing-file errors, the generic CSV loader and the synthetic mixture set."""

import sys

import numpy as np
import pandas as pd
import pytest
import torch

from pyrovae.data import DATASETS, data_root, load_csv, load_dataset
from pyrovae.data.synthetic import gmm_truth
from pyrovae.data.tabular import BFI_ITEMS, split_indices

TABULAR = data_root() / "tabular"
needs_tabular = pytest.mark.skipif(
    not (TABULAR / "faithful.csv").exists() or not (TABULAR / "bfi.csv").exists(),
    reason=f"tabular CSV files not found in {TABULAR}",
)


def test_registered_names():
    for name in ("faithful", "bfi", "iris", "wine", "breast-cancer", "digits", "synthetic-gmm"):
        assert name in DATASETS


def test_split_indices_partition_and_determinism():
    train, test = split_indices(272, 0.2, seed=3)
    assert len(test) == round(0.2 * 272) and len(train) == 272 - len(test)
    assert np.array_equal(np.sort(np.concatenate([train, test])), np.arange(272))
    again = split_indices(272, 0.2, seed=3)
    assert np.array_equal(train, again[0]) and np.array_equal(test, again[1])
    assert not np.array_equal(test, split_indices(272, 0.2, seed=4)[1])
    with pytest.raises(ValueError, match="test_fraction"):
        split_indices(10, 1.0)


@needs_tabular
def test_faithful_standardized_by_train_statistics():
    raw = pd.read_csv(TABULAR / "faithful.csv")[["eruptions", "waiting"]].to_numpy()
    train_idx, test_idx = split_indices(len(raw), 0.2, seed=0)
    mean, std = raw[train_idx].mean(0), raw[train_idx].std(0)
    train = load_dataset("faithful", "train")
    test = load_dataset("faithful", "test")
    assert train.x.shape == (218, 2) and test.x.shape == (54, 2)
    # Train columns are exactly centred and scaled; the test split uses the
    # same (train) statistics, so it is not exactly centred.
    assert torch.allclose(train.x.double().mean(0), torch.zeros(2, dtype=torch.float64), atol=1e-6)
    assert torch.allclose(train.x.double().std(0, unbiased=False), torch.ones(2, dtype=torch.float64), atol=1e-6)
    expected = torch.as_tensor((raw[test_idx] - mean) / std, dtype=torch.float32)
    assert torch.allclose(test.x, expected, atol=1e-6)
    assert test.x.double().mean(0).abs().max() > 1e-3


@needs_tabular
def test_faithful_unstandardized_rows_and_splits_partition_the_file():
    raw = pd.read_csv(TABULAR / "faithful.csv")[["eruptions", "waiting"]].to_numpy()
    everything = load_dataset("faithful", "all", standardize=False)
    assert torch.equal(everything.x, torch.as_tensor(raw, dtype=torch.float32))
    train = load_dataset("faithful", "train", standardize=False, seed=7)
    test = load_dataset("faithful", "test", standardize=False, seed=7)
    rows = torch.cat([train.x, test.x])
    assert sorted(map(tuple, rows.tolist())) == sorted(map(tuple, everything.x.tolist()))
    other = load_dataset("faithful", "test", standardize=False, seed=8)
    assert not torch.equal(test.x, other.x)


@needs_tabular
def test_bfi_items_complete_cases():
    frame = pd.read_csv(TABULAR / "bfi.csv")
    complete = frame[list(BFI_ITEMS)].dropna()
    train = load_dataset("bfi", "train")
    test = load_dataset("bfi", "test")
    assert len(BFI_ITEMS) == 25 and BFI_ITEMS[0] == "A1" and BFI_ITEMS[-1] == "O5"
    assert train.dim == 25 and len(train) + len(test) == len(complete) == 2436
    assert bool(torch.isfinite(train.x).all()) and bool(torch.isfinite(test.x).all())


def test_missing_file_names_folder_and_file(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        load_dataset("faithful", root=str(tmp_path))
    message = str(err.value)
    assert str(tmp_path / "tabular") in message and "faithful.csv" in message
    with pytest.raises(FileNotFoundError, match="bfi.csv"):
        load_dataset("bfi", root=str(tmp_path))


def test_sklearn_sets_have_labels_and_finite_columns():
    pytest.importorskip("sklearn")
    iris = load_dataset("iris")
    assert iris.x.shape == (120, 4) and iris.y.shape == (120,)
    assert set(iris.y.tolist()) <= {0, 1, 2}
    digits = load_dataset("digits", "test")
    # Pixels that are blank on every training image have zero spread; they
    # are only centred, never divided by zero.
    assert digits.image_shape == (1, 8, 8) and bool(torch.isfinite(digits.x).all())
    assert load_dataset("wine").dim == 13 and load_dataset("breast-cancer").dim == 30


def test_sklearn_missing_gives_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(ImportError, match="scikit-learn"):
        load_dataset("iris")


def test_load_csv_columns_label_missing_values_and_errors(tmp_path):
    path = tmp_path / "toy.csv"
    frame = pd.DataFrame({
        "rownames": range(1, 11),
        "a": [float(i) for i in range(10)],
        "b": [2.0 * i for i in range(10)],
        "kind": ["x", "y"] * 5,
    })
    frame.loc[3, "b"] = np.nan
    frame.to_csv(path, index=False)

    full = load_csv(path, label="kind", split="all", standardize=False)
    assert full.x.shape == (9, 2)  # row-name column dropped, the NaN row dropped
    assert full.y.tolist() == [0, 1, 0, 0, 1, 0, 1, 0, 1]
    assert full.name == "toy"
    only_a = load_csv(path, columns=["a"], split="all", standardize=False)
    assert only_a.x.shape == (10, 1)  # the NaN is in a column not used
    train = load_csv(path, columns=["a", "b"], split="train", seed=1)
    test = load_csv(path, columns=["a", "b"], split="test", seed=1)
    assert len(train) + len(test) == 9
    with pytest.raises(ValueError, match="not numeric"):
        load_csv(path)
    with pytest.raises(ValueError, match="no column"):
        load_csv(path, columns=["a", "c"])
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        load_csv(tmp_path / "nope.csv")


def test_synthetic_gmm_known_parameters():
    truth = gmm_truth(3, 2, "full", seed=0)
    train = load_dataset("synthetic-gmm", "train", seed=0)
    test = load_dataset("synthetic-gmm", "test", seed=0)
    assert train.x.shape == (1000, 2) and test.x.shape == (500, 2)
    assert torch.equal(train.x, load_dataset("synthetic-gmm", seed=0).x)
    assert not torch.equal(train.x[:500], test.x)
    assert torch.allclose(truth.weights.sum(), torch.tensor(1.0, dtype=torch.float64))
    gaps = torch.cdist(truth.means, truth.means) + 100 * torch.eye(3)
    assert gaps.min() >= 4.0
    # Each labelled group has the mean of its component: within 4 standard
    # errors of the coordinate's sd / sqrt(n_k).
    for k in range(3):
        xk = train.x[train.y == k].double()
        se = truth.covariances[k].diagonal().sqrt() / len(xk) ** 0.5
        assert ((xk.mean(0) - truth.means[k]).abs() < 4 * se).all()
    diag = gmm_truth(4, 3, "diag", seed=1)
    off_diagonal = diag.covariances - torch.diag_embed(diag.covariances.diagonal(dim1=-2, dim2=-1))
    assert off_diagonal.abs().max() == 0
