"""Image data sets read from the real files under $PYROVAE_DATA."""

import pytest
import torch

from pyrovae.data import ArrayDataset, load_dataset


@pytest.mark.mnist
def test_mnist_whole_split_as_one_tensor():
    train = load_dataset("mnist", "train", binarize=None)
    test = load_dataset("mnist", "test", binarize=None)
    assert train.x.shape == (60000, 784) and test.x.shape == (10000, 784)
    assert train.x.dtype == torch.float32
    assert 0.0 == train.x.min().item() and train.x.max().item() == 1.0
    # Published MNIST training-set pixel mean, 0.1307 (the torchvision tutorial constant).
    assert train.x.mean().item() == pytest.approx(0.1307, abs=1e-4)
    assert torch.bincount(test.y).tolist()[:3] == [980, 1135, 1032]
    assert test.image_shape == (1, 28, 28)


@pytest.mark.mnist
def test_dynamic_binarization_draws_fresh_bits_each_epoch():
    data = load_dataset("mnist", "test", binarize="dynamic").subset(256)
    gen = torch.Generator().manual_seed(0)
    first = torch.cat(list(data.batches(64, gen, shuffle=False)))
    second = torch.cat(list(data.batches(64, gen, shuffle=False)))
    assert set(first.unique().tolist()) == {0.0, 1.0}
    assert not torch.equal(first, second)
    # Each bit is a Bernoulli draw with the grey level as its mean.
    assert (first.mean() - data.x.mean()).abs() < 0.01
    # Evaluation sees one fixed draw.
    assert torch.equal(data.fixed(3), data.fixed(3))


def test_batches_cover_a_permutation():
    x = torch.arange(10.0).unsqueeze(-1)
    data = ArrayDataset(x)
    gen = torch.Generator().manual_seed(0)
    batches = list(data.batches(3, gen))
    assert [len(b) for b in batches] == [3, 3, 3]  # drop_last keeps shapes fixed
    seen = torch.cat(batches).squeeze(-1)
    assert len(seen.unique()) == 9
    full = torch.cat(list(data.batches(3, gen, drop_last=False))).squeeze(-1)
    assert sorted(full.tolist()) == list(range(10))


def test_static_binarized_mnist_split_sizes_and_means(data_root):
    if not (data_root / "binarized_mnist").exists():
        pytest.skip("binarized MNIST not under $PYROVAE_DATA")
    valid = load_dataset("binarized-mnist", "valid")
    test = load_dataset("binarized-mnist", "test")
    assert valid.x.shape == (10000, 784) and test.x.shape == (10000, 784)
    # Means stated with the published files: valid 0.1311, test 0.1325.
    assert valid.x.mean().item() == pytest.approx(0.1311, abs=1e-4)
    assert test.x.mean().item() == pytest.approx(0.1325, abs=1e-4)
    assert set(test.x.unique().tolist()) == {0.0, 1.0}


def test_missing_files_give_one_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        load_dataset("mnist", "test", root=tmp_path)
    message = str(err.value)
    assert str(tmp_path / "MNIST" / "raw") in message
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                 "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        assert name in message
    with pytest.raises(FileNotFoundError, match="binarized_mnist"):
        load_dataset("binarized-mnist", "test", root=tmp_path)


def test_fashion_mnist_without_images_names_the_folder(data_root):
    # The shared data folder has the Fashion-MNIST labels but not the images.
    if (data_root / "FashionMNIST" / "raw" / "t10k-images-idx3-ubyte.gz").exists():
        pytest.skip("Fashion-MNIST images are present")
    with pytest.raises(FileNotFoundError, match="FashionMNIST"):
        load_dataset("fashion-mnist", "test", root=data_root)


def test_bad_options():
    with pytest.raises(ValueError, match="split must be one of"):
        load_dataset("mnist", "validation")
    with pytest.raises(ValueError, match="unknown data set 'mnsit'"):
        load_dataset("mnsit")
    with pytest.raises(ValueError, match="binarize"):
        ArrayDataset(torch.zeros(2, 2), binarize="sometimes")
