"""Smoke runs of the command line with tiny budgets."""

import json
import subprocess
import sys

import pandas as pd
import pytest
import torch

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


@pytest.mark.parametrize(
    "argv, method, figure",
    [
        (["gmm", "--dataset", "faithful", "--z-dim", "2", "--epochs", "30"], "exact", "components.png"),
        (["gmm", "--dataset", "faithful", "--z-dim", "2", "--method", "em"], "exact", "components.png"),
        (["bayes-gmm", "--dataset", "faithful", "--z-dim", "2", "--epochs", "30",
          "--elbo", "TraceMeanField_ELBO"], "posterior predictive", "components.png"),
        (["fa", "--dataset", "bfi", "--z-dim", "5", "--method", "em"], "exact", "loadings.png"),
        (["bayes-fa", "--dataset", "bfi", "--z-dim", "3", "--epochs", "5"], "posterior predictive",
         "loadings.png"),
    ],
)
def test_classical_models_train_from_the_command_line(tmp_path, argv, method, figure):
    out = tmp_path / "run"
    assert main(["train", *argv, "--batch-size", "256", "--lr", "0.05", "--eval-samples", "20",
                 "--out", str(out), "--no-progress"]) == 0
    metrics = pd.read_csv(out / "metrics.csv")
    assert metrics["log_likelihood_method"].item().startswith(method)
    # Standardized 2-D data: a good two-component fit scores about -1.3 nats per point.
    if "faithful" in argv:
        assert -1.6 < metrics["log_likelihood"].item() < -1.1
    if figure:
        assert (out / figure).stat().st_size > 0


def test_train_on_a_csv_file(tmp_path):
    # Two well-separated clusters written as a plain CSV with a header.
    g = torch.Generator().manual_seed(0)
    points = torch.cat([torch.randn(100, 2, generator=g) - 4, torch.randn(100, 2, generator=g) + 4])
    csv = tmp_path / "points.csv"
    pd.DataFrame(points.numpy(), columns=["a", "b"]).to_csv(csv, index=False)
    out = tmp_path / "run"
    assert main(["train", "gmm", "--dataset", str(csv), "--z-dim", "2", "--method", "em",
                 "--out", str(out), "--no-progress"]) == 0
    metrics = pd.read_csv(out / "metrics.csv")
    assert metrics["log_likelihood_method"].item() == "exact"
    assert (out / "components.png").exists()
    assert main(["train", "gmm", "--dataset", str(tmp_path / "missing.csv"), "--out", str(out)]) == 2


@pytest.mark.mnist
def test_train_writes_latent_diagnostics_and_eval_measures_the_inference_gap(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "vae", "--dataset", "mnist", "--set", "z_dim=4", "--hidden", "64",
                 "--epochs", "1", "--train-size", "256", "--test-size", "128",
                 "--eval-samples", "10", "--out", str(out), "--no-progress"]) == 0
    for name in ("traversals.png", "interpolations.png", "kl_per_dimension.png", "latents.csv"):
        assert (out / name).stat().st_size > 0, name
    metrics = pd.read_csv(out / "metrics.csv")
    assert metrics["n"].item() == 128 and metrics["latent_dims"].item() == 4
    assert 0 <= metrics["active_units"].item() <= 4
    assert f"active units: {metrics['active_units'].item()} of 4" in capsys.readouterr().out

    assert main(["eval", str(out), "--metrics", "elbo,gap", "--gap-points", "5",
                 "--gap-steps", "5"]) == 0
    metrics = pd.read_csv(out / "metrics.csv")
    assert metrics["gap_points"].item() == 5 and len(pd.read_csv(out / "gap.csv")) == 5
    assert {"approximation_gap", "amortization_gap"} <= set(metrics.columns)
    # Not measured this time: no latent table left to contradict metrics.csv.
    assert "active_units" not in metrics.columns and not (out / "latents.csv").exists()
    assert "amortization gap" in capsys.readouterr().out

    assert main(["eval", str(out), "--metrics", "gap", "nope"]) == 2
    assert "unknown metrics ['nope']" in capsys.readouterr().err
