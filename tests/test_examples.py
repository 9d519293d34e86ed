"""The README's custom-model example runs as written."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.mnist
def test_custom_model_example_trains_plain_pyro_programs():
    done = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "custom_model.py"), "--epochs", "2",
         "--train-size", "1000"],
        capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    lines = [line.split() for line in done.stdout.splitlines()]
    epochs = [row for row in lines if len(row) == 9 and row[0] in ("1", "2")]
    assert len(epochs) == 2
    # Held-out ELBO improves between the two epochs.
    assert float(epochs[1][3]) > float(epochs[0][3])
