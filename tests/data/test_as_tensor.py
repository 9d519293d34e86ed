"""The one rule for data entering pyrovae: ``as_tensor`` (and ``as_dataset``)."""

import numpy as np
import pandas as pd
import pytest
import torch

from pyrovae.data import ArrayDataset, as_dataset, as_tensor

VALUES = [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]]


@pytest.mark.parametrize(
    "data",
    [
        torch.tensor(VALUES),
        torch.tensor(VALUES, dtype=torch.float64),
        torch.tensor(VALUES, dtype=torch.int64),
        torch.tensor(VALUES, dtype=torch.uint8),
        torch.tensor(VALUES, dtype=torch.float16),
        np.array(VALUES),
        np.array(VALUES, dtype=np.int32),
        np.array(VALUES, dtype=np.uint16),
        np.array(VALUES, dtype=np.float32),
        np.asfortranarray(VALUES),
        pd.DataFrame(VALUES, columns=["a", "b", "c"]),
        pd.DataFrame({"a": [0, 3], "b": [1.0, 4.0], "c": pd.array([2, 5], dtype="Int64")}),
        VALUES,
        [(0, 1, 2), (3, 4, 5)],
    ],
    ids=lambda d: type(d).__name__ + str(getattr(d, "dtype", "")),
)
def test_numbers_of_any_container_and_dtype_become_the_same_tensor(data):
    x = as_tensor(data)
    assert x.dtype == torch.get_default_dtype()
    torch.testing.assert_close(x, torch.tensor(VALUES), rtol=0, atol=0)


def test_bool_data_and_requested_dtype_and_device():
    x = as_tensor(np.array([[True, False], [False, True]]), dtype=torch.float64, device="cpu")
    assert x.dtype == torch.float64 and x.device.type == "cpu"
    assert x.tolist() == [[1.0, 0.0], [0.0, 1.0]]
    assert as_tensor(torch.tensor([[True], [False]])).tolist() == [[1.0], [0.0]]
    assert as_tensor(pd.DataFrame({"flag": [True, False]})).tolist() == [[1.0], [0.0]]


def test_one_dimensional_input_is_n_scalar_observations_everywhere():
    for data in (torch.arange(4.0), np.arange(4), pd.Series([0.0, 1.0, 2.0, 3.0]), [0, 1, 2, 3]):
        x = as_tensor(data)
        assert x.shape == (4, 1)
        assert x[:, 0].tolist() == [0.0, 1.0, 2.0, 3.0]
    assert as_dataset(np.arange(4.0)).x.shape == (4, 1)


def test_images_are_flattened():
    assert as_tensor(torch.zeros(3, 1, 4, 5)).shape == (3, 20)
    assert as_tensor(np.zeros((3, 4, 5), dtype=np.uint8)).shape == (3, 20)


def test_nan_and_inf_pass_through():
    x = as_tensor([[float("nan"), float("inf")]])
    assert torch.isnan(x[0, 0]) and torch.isinf(x[0, 1])
    # pandas' missing values become NaN (check_data reports them).
    assert torch.isnan(as_tensor(pd.DataFrame({"a": pd.array([1, None], dtype="Int64")}))[1, 0])


def _one_line_error(kind, data, *needles):
    with pytest.raises(kind) as info:
        as_tensor(data)
    message = str(info.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message, message
    return message


def test_non_numeric_data_is_refused_with_one_line_naming_the_fix():
    frame = pd.DataFrame({"age": [30, 40], "name": ["ann", "bob"]})
    _one_line_error(ValueError, frame, "DataFrame column 'name' of dtype", "drop or encode")
    _one_line_error(ValueError, pd.DataFrame({"c": pd.Categorical(["a", "b"])}), "'c'", "category", "encode")
    _one_line_error(ValueError, pd.Series(["a", "b"], name="s"), "Series 's'", "encode")
    _one_line_error(ValueError, np.array([["a", "b"]]), "expected numbers", "convert it to numbers")
    _one_line_error(ValueError, np.array([[1, None]], dtype=object), "dtype object", "convert")
    _one_line_error(ValueError, [["a", 1.0]], "nested list", "convert")
    _one_line_error(ValueError, [[1.0, 2.0], [3.0]], "ragged", "same number of values")


def test_complex_data_is_refused():
    _one_line_error(ValueError, torch.ones(2, 2, dtype=torch.complex64), "complex", "real part")
    _one_line_error(ValueError, np.ones((2, 2), dtype=complex), "complex", "real")
    _one_line_error(ValueError, pd.DataFrame({"z": [1 + 2j, 3j]}), "'z'", "complex")


def test_empty_and_scalar_data_are_refused():
    for empty in (torch.zeros(0, 3), np.zeros((4, 0)), [], pd.DataFrame(), torch.zeros(2, 0, 5)):
        _one_line_error(ValueError, empty, "empty", "at least one row")
    _one_line_error(ValueError, torch.tensor(1.0), "scalar", "[[value]]")


def test_other_types_are_refused_with_the_accepted_ones_listed():
    _one_line_error(TypeError, {"a": [1.0]}, "torch.Tensor, numpy array, pandas DataFrame", "dict")
    _one_line_error(TypeError, "1,2,3", "got str")
    _one_line_error(TypeError, ArrayDataset(torch.zeros(2, 2)), "data.x")
    with pytest.raises(TypeError, match="^train: expected"):
        as_tensor(None, name="train")


def test_as_dataset_converts_but_keeps_the_dataset_fields():
    data = ArrayDataset(torch.rand(6, 4), y=torch.arange(6), name="d", image_shape=(1, 2, 2),
                        binarize="dynamic")
    assert as_dataset(data) is data
    assert as_dataset(data, dtype=torch.float32) is data
    converted = as_dataset(data, dtype=torch.float64)
    assert converted.x.dtype == torch.float64
    assert (converted.name, converted.image_shape, converted.binarize) == ("d", (1, 2, 2), "dynamic")
    assert torch.equal(converted.y, data.y)
    # dtype=None: float tensors keep their precision; array inputs take the default dtype.
    assert as_dataset(torch.zeros(3, 2, dtype=torch.float64)).x.dtype == torch.float64
    assert as_dataset(np.zeros((3, 2))).x.dtype == torch.get_default_dtype()
    assert as_dataset(np.zeros((3, 2)), dtype=torch.float64).x.dtype == torch.float64
    with pytest.raises(ValueError, match="^train: expected numbers"):
        as_dataset(np.array([["a"]]), "train")
