import os
from pathlib import Path

import pyro
import pytest
import torch

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
if "PYROVAE_DATA" not in os.environ and SHARED.exists():
    os.environ["PYROVAE_DATA"] = str(SHARED)

# The test models are small: one intra-op thread avoids synchronization costs
# that dominate at these sizes, most of all on a busy machine.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _fresh_param_store():
    # Tests that use pyro.param directly start from an empty store.
    pyro.clear_param_store()
    yield
    pyro.clear_param_store()


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
