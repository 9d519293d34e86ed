"""Batching invariants for any data size and batch size."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pyrovae.data import ArrayDataset, as_dataset


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 120), batch=st.integers(1, 130), seed=st.integers(0, 2**16))
def test_an_epoch_visits_each_point_at_most_once(n, batch, seed):
    data = ArrayDataset(torch.arange(float(n)).unsqueeze(-1))
    gen = torch.Generator().manual_seed(seed)
    full = torch.cat(list(data.batches(batch, gen, drop_last=False))).squeeze(-1)
    assert sorted(full.tolist()) == list(range(n))
    kept = list(data.batches(batch, gen))
    size = min(batch, n)
    assert len(kept) == n // size == data.steps_per_epoch(batch)
    assert all(len(b) == size for b in kept)
    seen = torch.cat(kept).squeeze(-1)
    assert len(seen.unique()) == len(seen)


def test_as_dataset_accepts_array_data_and_rejects_other_types():
    assert as_dataset(torch.zeros(5)).x.shape == (5, 1)
    assert as_dataset(torch.zeros(4, 2, 3)).x.shape == (4, 6)
    assert as_dataset(torch.zeros(3, 2, dtype=torch.int64)).x.dtype == torch.float32
    assert as_dataset([[1.0, 2.0]]).x.shape == (1, 2)
    with pytest.raises(TypeError, match="torch.Tensor"):
        as_dataset({"a": [1.0, 2.0]})
