import os
from pathlib import Path

import pytest
import torch

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
if "PYROVAE_DATA" not in os.environ and SHARED.exists():
    os.environ["PYROVAE_DATA"] = str(SHARED)

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def _has_mnist() -> bool:
    root = Path(os.environ.get("PYROVAE_DATA", ""))
    return (root / "MNIST" / "raw").exists()


def pytest_collection_modifyitems(config, items):
    # Tests marked ``mnist`` read the real MNIST files; without them they are
    # skipped with a reason instead of failing deep inside torchvision.
    if _has_mnist():
        return
    skip = pytest.mark.skip(reason="MNIST files not found under $PYROVAE_DATA")
    for item in items:
        if "mnist" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def data_root() -> Path:
    return Path(os.environ["PYROVAE_DATA"])
