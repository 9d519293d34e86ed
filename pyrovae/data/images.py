"""MNIST, Fashion-MNIST (through torchvision) and Larochelle's statically
binarized MNIST, each loaded whole into one tensor."""

from __future__ import annotations

import gzip
import os
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from pyrovae.data.core import ArrayDataset
from pyrovae.data.registry import DATASETS

IDX_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


def data_root(root: Optional[str | os.PathLike] = None) -> Path:
    """The data root: the argument, else ``$PYROVAE_DATA``, else
    ``~/.cache/pyrovae/data`` (``$XDG_CACHE_HOME`` respected)."""
    if root is not None:
        return Path(root).expanduser()
    env = os.environ.get("PYROVAE_DATA")
    if env:
        return Path(env).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME", str(Path.home() / ".cache"))
    return Path(cache) / "pyrovae" / "data"


def _check_split(split: str, allowed: tuple) -> None:
    if split not in allowed:
        raise ValueError(f"split must be one of {allowed}, got {split!r}")


def _torchvision_images(cls_name: str, folder: str, root: Path, train: bool):
    import torchvision.datasets as tvd

    cls = getattr(tvd, cls_name)
    try:
        return cls(str(root), train=train, download=False)
    except RuntimeError:
        pass
    try:  # downloads, or only unpacks .gz files that are already there
        return cls(str(root), train=train, download=True)
    except Exception as err:  # network errors come in many types
        raw = root / folder / "raw"
        files = ", ".join(f + ".gz" for f in IDX_FILES)
        raise FileNotFoundError(
            f"{cls_name} is not in {raw} and could not be downloaded ({type(err).__name__}). "
            f"Put the four files {files} (or their uncompressed forms) in {raw}, "
            "or point --data-root / PYROVAE_DATA at a folder that has them."
        ) from None


def _mnist_like(cls_name: str, folder: str, name: str):
    def load(
        split: str = "train",
        root: Optional[str] = None,
        binarize: Optional[str] = "dynamic",
        device: str | torch.device = "cpu",
    ) -> ArrayDataset:
        _check_split(split, ("train", "test"))
        if binarize == "static":
            raise ValueError(
                f"static binarization exists only as the fixed 'binarized-mnist' data set; "
                f"for {name} use binarize='dynamic' or None"
            )
        ds = _torchvision_images(cls_name, folder, data_root(root), split == "train")
        x = ds.data.reshape(len(ds.data), -1).to(torch.float32).div_(255.0)
        return ArrayDataset(
            x.to(device), ds.targets.to(device), name=name, image_shape=(1, 28, 28),
            binarize=binarize,
        )

    load.__doc__ = (
        f"{cls_name} as (N, 784) floats in [0, 1] with labels; ``binarize='dynamic'`` "
        "draws fresh binary images every batch."
    )
    return load


DATASETS.register("mnist")(_mnist_like("MNIST", "MNIST", "mnist"))
DATASETS.register("fashion-mnist")(_mnist_like("FashionMNIST", "FashionMNIST", "fashion-mnist"))


@DATASETS.register("binarized-mnist")
def binarized_mnist(
    split: str = "train",
    root: Optional[str] = None,
    binarize: Optional[str] = "static",
    device: str | torch.device = "cpu",
) -> ArrayDataset:
    """Larochelle's statically binarized MNIST (50k/10k/10k, no labels) [1].

    References

    [1] H. Larochelle and I. Murray, "The Neural Autoregressive Distribution
        Estimator", AISTATS 2011.
    """
    _check_split(split, ("train", "valid", "test"))
    if binarize not in ("static", None):
        raise ValueError("binarized-mnist is already binary: use binarize='static' (or None)")
    folder = data_root(root) / "binarized_mnist"
    path = folder / f"binarized_mnist_{split}.amat.gz"
    plain = folder / f"binarized_mnist_{split}.amat"
    if path.exists():
        raw = gzip.decompress(path.read_bytes())
    elif plain.exists():
        raw = plain.read_bytes()
    else:
        raise FileNotFoundError(
            f"binarized MNIST split {split!r} is not in {folder}: expected "
            f"binarized_mnist_{{train,valid,test}}.amat.gz (or .amat). "
            "Point --data-root / PYROVAE_DATA at the folder that holds binarized_mnist/."
        )
    # Each line is 784 digits separated by single spaces and ended by a newline,
    # so the digits are exactly the even-offset bytes.
    bits = np.frombuffer(raw, dtype=np.uint8)[::2] - ord("0")
    if bits.size % 784 or bits.max(initial=0) > 1:
        raise ValueError(f"{path} is not in the .amat layout (784 space-separated 0/1 per line)")
    x = torch.from_numpy(bits.reshape(-1, 784).astype(np.float32))
    return ArrayDataset(x.to(device), None, name="binarized-mnist", image_shape=(1, 28, 28),
                        binarize="static")
