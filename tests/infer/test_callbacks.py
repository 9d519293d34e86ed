"""Callbacks in fit: schedules, early stopping, clipping, TensorBoard and
MLflow logs, and the progress display of a non-terminal."""

import math

import pandas as pd
import pyro
import pytest
import torch

from pyrovae import FactorAnalysis, fit
from pyrovae.cli import main
from pyrovae.data import load_dataset
from pyrovae.infer.callbacks import EarlyStopping, FitState, TensorBoardLogger, schedule_factor


@pytest.fixture(scope="module")
def bfi():
    return load_dataset("bfi", split="train").x[:512], load_dataset("bfi", split="test").x[:256]


def test_schedules_are_functions_of_the_epoch():
    assert schedule_factor(None, 7, 10) == 1.0
    assert schedule_factor("cosine", 0, 10) == 1.0
    assert schedule_factor("cosine", 5, 10) == pytest.approx(0.5)
    assert schedule_factor("step:3:0.1", 2, 10) == 1.0
    assert schedule_factor("step:3:0.1", 3, 10) == pytest.approx(0.1)
    assert schedule_factor("exponential:0.5", 2, 10) == 0.25
    assert schedule_factor("warmup:4", 1, 10) == 0.5
    # Burda et al. (2016): stage i lasts 3^i epochs at 10^(-i/7), 3,280 epochs in all.
    burda = [schedule_factor("stages:3:0.7196856730011519", e, 3280) for e in range(3280)]
    stages = [round(-7 * math.log10(f)) for f in burda]
    assert [stages.count(i) for i in range(8)] == [3 ** i for i in range(8)]
    assert stages == sorted(stages) and burda[-1] == pytest.approx(1e-1)
    for bad in ("linear", "step:0:0.5", "exponential:-1", "cosine:2", "stages:0:0.5",
                "stages:2.5:0.5", "stages:3"):
        with pytest.raises(ValueError, match="schedule"):
            schedule_factor(bad, 0, 10)


def test_schedule_in_history_and_exact_on_resume(bfi, tmp_path):
    train, test = bfi
    opts = dict(epochs=4, batch_size=128, lr=0.02, lr_schedule="cosine", progress=False, seed=2)
    torch.manual_seed(0)
    whole = FactorAnalysis(train.shape[1], 3)
    start = {k: v.clone() for k, v in whole.state_dict().items()}
    result = fit(whole, train, test, **opts)
    expected = [0.02 * schedule_factor("cosine", e, 4) for e in range(4)]
    assert result.history["lr"].tolist() == pytest.approx(expected)
    part = FactorAnalysis(train.shape[1], 3)
    part.load_state_dict(start)
    # Stopped after two of the four epochs (8 steps of 128), as a kill would.
    fit(part, train, test, **opts, max_steps=8, checkpoint_dir=str(tmp_path))
    # Resuming with the full budget continues the same schedule.
    fit(part, train, test, **opts, checkpoint_dir=str(tmp_path), resume=True)
    assert all(torch.equal(a, b) for a, b in zip(whole.state_dict().values(),
                                                 part.state_dict().values()))


def test_early_stopping_counts_evaluations_without_gain():
    stop = EarlyStopping(patience=2, min_delta=0.1)
    state = FitState(model=None, optimizer=None, config=None)
    stop.on_fit_start(state)
    for value, stopped in ((-5.0, False), (-4.0, False), (-3.95, False), (-3.92, True)):
        state.row = {"test_elbo": value}
        stop.on_evaluation(state)
        assert state.stop is stopped
    # Rebuilt from a resumed run's history: two evaluations without gain already.
    resumed = FitState(model=None, optimizer=None, config=None,
                       history=[{"test_elbo": v} for v in (-5.0, -4.0, -3.95, -3.92)])
    stop.on_fit_start(resumed)
    resumed.row = {"test_elbo": -3.99}
    stop.on_evaluation(resumed)
    assert resumed.stop


def test_early_stopping_ends_a_run_that_stops_improving(bfi):
    train, test = bfi
    torch.manual_seed(0)
    model = FactorAnalysis(train.shape[1], 3)
    result = fit(model, train, test, epochs=200, batch_size=128, lr=0.05, early_stopping=2,
                 progress=False)
    assert result.stopped.startswith("early stopping")
    assert len(result.history) < 200
    elbo = result.history["test_elbo"].tolist()
    best = max(elbo[:-2])
    assert all(v <= best for v in elbo[-2:])
    with pytest.raises(ValueError, match="early_stopping watches the held-out ELBO"):
        fit(model, train, early_stopping=2, progress=False)


def test_gradient_clipping_bounds_every_step(bfi):
    train, _ = bfi
    model = FactorAnalysis(train.shape[1], 3)
    moves = []

    class Watch:
        def on_fit_start(self, state):
            self.last = torch.cat([p.detach().reshape(-1).clone() for p in model.parameters()])

        def on_step(self, state):
            now = torch.cat([p.detach().reshape(-1).clone() for p in model.parameters()])
            moves.append((now - self.last).norm().item())
            self.last = now

    fit(model, train, epochs=1, batch_size=64, lr=1.0, optimizer="sgd", clip_grad=0.01,
        progress=False, callbacks=[Watch()])
    assert len(moves) == 8
    assert max(moves) <= 0.01 * (1 + 1e-5)
    with pytest.raises(TypeError, match="is not a callback"):
        fit(model, train, epochs=1, progress=False, callbacks=[object()])


def test_tensorboard_event_files(bfi, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train, test = bfi
    model = FactorAnalysis(train.shape[1], 3)
    fit(model, train, test, epochs=3, batch_size=64, lr=0.01, progress=False,
        callbacks=[TensorBoardLogger(tmp_path, every_steps=4)])
    events = EventAccumulator(str(tmp_path), size_guidance={"images": 0})
    events.Reload()
    tags = events.Tags()
    assert [e.step for e in events.Scalars("epoch/train_elbo")] == [1, 2, 3]
    assert [e.step for e in events.Scalars("epoch/test_elbo")] == [1, 2, 3]
    assert [e.step for e in events.Scalars("step/train_elbo")] == [4, 8, 12, 16, 20, 24]
    assert "elbo" in tags["images"] and len(events.Images("elbo")) == 3


def test_cli_logs_to_mlflow_and_prints_a_line_per_epoch(tmp_path, monkeypatch, capsys):
    from mlflow.tracking import MlflowClient

    # MLflow keeps its file store only on request; a local folder is enough here.
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    store = f"file:{tmp_path / 'mlruns'}"
    out = tmp_path / "run"
    argv = ["train", "fa", "--dataset", "bfi", "--z-dim", "3", "--epochs", "3", "--batch-size",
            "128", "--lr", "0.01", "--eval-samples", "5", "--eval-points", "50",
            "--elbo", "BetaELBO", "--elbo-opt", "beta=2", "--lr-schedule", "step:2:0.5",
            "--clip-grad", "100", "--mlflow", store, "--mlflow-experiment", "t", "--out", str(out)]
    assert main(argv) == 0
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("fit: epoch")]
    assert [line.split(",")[0] for line in lines] == ["fit: epoch 1/3", "fit: epoch 2/3",
                                                      "fit: epoch 3/3"]
    assert "\r" not in err
    history = pd.read_csv(out / "history.csv")
    assert history["lr"].tolist() == pytest.approx([0.01, 0.01, 0.005])
    client = MlflowClient(store)
    (experiment,) = [e for e in client.search_experiments() if e.name == "t"]
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.params["elbo"] == "BetaELBO" and run.data.params["model"] == "fa"
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "train_elbo")]
    assert steps == [1, 2, 3]
    assert math.isfinite(run.data.metrics["final_test_elbo"])
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.json", "metrics.csv", "history.csv", "checkpoint.pt"} <= artifacts
    import json
    assert json.loads((out / "config.json").read_text())["fit"]["elbo_options"] == {"beta": 2}
