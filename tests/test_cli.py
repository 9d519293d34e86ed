"""Smoke runs of the command line with tiny budgets."""

import json
import subprocess
import sys

import pandas as pd
import pytest

from pyrovae.cli import main


@pytest.mark.mnist
def test_train_then_eval_writes_metrics_checkpoint_and_figures(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "vae", "--dataset", "mnist", "--z-dim", "2", "--hidden", "32",
            "--epochs", "2", "--train-size", "512", "--batch-size", "64",
            "--elbo", "TraceMeanField_ELBO", "--eval-samples", "20", "--eval-points", "200",
            "--out", str(out), "--no-progress"]
    assert main(args) == 0
    for name in ("config.json", "checkpoint.pt", "history.csv", "metrics.csv", "loss_curves.png",
                 "reconstructions.png", "samples.png", "latent.png", "manifold.png"):
        assert (out / name).stat().st_size > 0, name
    history = pd.read_csv(out / "history.csv")
    assert history["epoch"].tolist() == [1, 2]
    metrics = pd.read_csv(out / "metrics.csv")
    assert metrics["n"].item() == 200 and metrics["elbo"].item() <= metrics["iwae"].item() + 1.0
    assert json.loads((out / "config.json").read_text())["fit"]["elbo"] == "TraceMeanField_ELBO"

    # Resuming a finished run continues from its checkpoint: two more epochs.
    assert main([*args[:args.index("--epochs") + 1], "4", *args[args.index("--epochs") + 2:],
                 "--resume"]) == 0
    assert pd.read_csv(out / "history.csv")["epoch"].tolist() == [1, 2, 3, 4]

    assert main(["eval", str(out), "--num-samples", "10", "--eval-points", "100"]) == 0
    assert pd.read_csv(out / "metrics.csv")["num_samples"].item() == 10
    assert "metrics.csv" in capsys.readouterr().out


def test_bad_input_gives_one_line_error(tmp_path, capsys):
    assert main(["train", "nosuchmodel", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "unknown model 'nosuchmodel'" in err and "vae" in err
    assert "Traceback" not in err
    assert main(["train", "vae", "--elbo", "Nope", "--out", str(tmp_path)]) == 2
    assert "unknown objective 'Nope'" in capsys.readouterr().err
    assert main(["eval", str(tmp_path / "missing")]) == 2
    assert "not a pyrovae run folder" in capsys.readouterr().err


def test_console_entry_point_runs():
    done = subprocess.run([sys.executable, "-m", "pyrovae", "--help"], capture_output=True, text=True)
    assert done.returncode == 0
    assert "train" in done.stdout and "eval" in done.stdout
