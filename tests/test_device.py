"""The device a run asks for: refused in one line where this machine lacks it."""

import pytest
import torch

from pyrovae.cli import main
from pyrovae.pipeline import check_device


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_cuda_is_refused_in_one_line_before_anything_is_written(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["train", "fa", "--dataset", "bfi", "--epochs", "1",
                 "--device", "cuda", "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err == ["pyrovae train: error: device 'cuda' asked for, but torch sees no CUDA "
                   "device on this machine; use --device cpu"]
    assert not out.exists()
    with pytest.raises(ValueError, match="sees no CUDA device"):
        check_device("cuda:0")


def test_cpu_is_always_there():
    assert check_device("cpu") == torch.device("cpu")
