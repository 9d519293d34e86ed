"""Run folders never lose work: checks before writes, no silent overwrite,
atomic files under a lock, resume that says what it does, divergence that
keeps the last good checkpoint, and kills at any instant."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pyro
import pytest
import torch

from pyrovae import VAE, evaluate, fit
from pyrovae.cli import main
from pyrovae.data import load_dataset
from pyrovae.files import LOCK_FILE, FolderLock
from pyrovae.infer.fit import TrainingDiverged, load_checkpoint

FA = ["train", "fa", "--dataset", "bfi", "--z-dim", "3", "--elbo", "Trace_ELBO",
      "--batch-size", "64", "--lr", "0.01", "--seed", "1", "--eval-samples", "5",
      "--eval-points", "50", "--no-progress"]


def _snapshot(folder: Path):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def _one_error_line(capsys):
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


def test_a_finished_run_is_never_overwritten_silently(tmp_path, capsys):
    out = tmp_path / "run"
    assert main([*FA, "--epochs", "1", "--out", str(out)]) == 0
    before = _snapshot(out)
    capsys.readouterr()
    assert main([*FA, "--epochs", "1", "--out", str(out)]) == 2
    line = _one_error_line(capsys)
    assert "already holds a run of fa on bfi" in line and "--resume" in line
    assert main(["train", "gmm", "--dataset", "faithful", "--out", str(out), "--no-progress"]) == 2
    capsys.readouterr()
    # Failed validation changes nothing: a bad learning rate, a bad model option.
    assert main([*FA, "--epochs", "1", "--lr", "-1", "--out", str(out), "--overwrite"]) == 2
    assert main([*FA, "--epochs", "1", "--set", "noise=3", "--out", str(out),
                 "--overwrite"]) == 2
    capsys.readouterr()
    assert _snapshot(out) == before
    # A mistyped --resume folder has nothing to resume and is not created.
    assert main([*FA, "--epochs", "2", "--out", str(tmp_path / "typo"), "--resume"]) == 2
    assert "nothing to resume" in _one_error_line(capsys)
    assert not (tmp_path / "typo").exists()
    # A failed check on a new folder leaves no stub behind.
    assert main([*FA, "--epochs", "1", "--set", "hidden=[0]", "--out", str(tmp_path / "new")]) == 2
    assert not (tmp_path / "new").exists()
    capsys.readouterr()
    # --overwrite replaces the run on purpose.
    assert main([*FA, "--epochs", "2", "--out", str(out), "--overwrite"]) == 0
    assert pd.read_csv(out / "history.csv")["epoch"].tolist() == [1, 2]


def test_resume_applies_what_it_can_and_refuses_the_rest(tmp_path, capsys):
    out = tmp_path / "run"
    assert main([*FA, "--epochs", "2", "--out", str(out)]) == 0
    before = _snapshot(out)
    capsys.readouterr()
    # An architecture change cannot apply: refused before anything is written.
    assert main([*FA[:5], "4", *FA[6:], "--epochs", "3", "--out", str(out), "--resume"]) == 2
    line = _one_error_line(capsys)
    assert "model_options" in line and "'z_dim': 3" in line and "'z_dim': 4" in line
    assert _snapshot(out) == before
    # A lower learning rate and more epochs apply, and the history records the rate.
    lr_at = FA.index("--lr") + 1
    lowered = [*FA[:lr_at], "0.001", *FA[lr_at + 1:]]
    assert main([*lowered, "--epochs", "4", "--out", str(out), "--resume"]) == 0
    printed = capsys.readouterr().out
    assert "resume: fit.epochs 2 -> 4 (applied)" in printed
    assert "resume: fit.lr 0.01 -> 0.001 (applied)" in printed
    history = pd.read_csv(out / "history.csv")
    assert history["epoch"].tolist() == [1, 2, 3, 4]
    assert history["lr"].tolist()[2:] == [0.001, 0.001]
    assert json.loads((out / "config.json").read_text())["fit"]["lr"] == 0.001


def _runaway_programs():
    def model(x):
        loc = pyro.param("loc", torch.tensor(0.0))
        with pyro.plate("data", x.shape[0]):
            pyro.factor("f", torch.exp(loc * 10.0) * x.squeeze(-1))

    def guide(x):
        pass

    return model, guide


@pytest.mark.filterwarnings("ignore:Encountered")
def test_divergence_names_step_and_epoch_and_keeps_the_last_good_checkpoint(tmp_path):
    model, guide = _runaway_programs()
    x = torch.ones(64, 1)
    with pytest.raises(TrainingDiverged, match=r"the loss became (nan|-inf) at step 2 \(epoch 1\)"):
        fit(model, x, guide=guide, epochs=5, batch_size=16, lr=0.1, optimizer="sgd",
            progress=False, checkpoint_dir=str(tmp_path))
    assert not (tmp_path / "checkpoint.pt").exists()  # no epoch finished: nothing to keep
    pyro.clear_param_store()
    result = fit(model, x, guide=guide, epochs=2, batch_size=16, lr=0.1, optimizer="sgd",
                 progress=False, skip_nonfinite=True)
    assert result.history["skipped"].tolist() == [3, 4]


@pytest.mark.filterwarnings("ignore:Encountered")
@pytest.mark.filterwarnings("ignore:the loss is exploding")
def test_divergence_after_an_epoch_keeps_its_checkpoint(tmp_path):
    model, guide = _runaway_programs()
    x = torch.ones(64, 1)
    with pytest.raises(TrainingDiverged, match=r"at step 11 \(epoch 3\); the checkpoint of epoch 2") as info:
        fit(model, x, guide=guide, epochs=20, batch_size=16, lr=1e-4, optimizer="sgd",
            progress=False, checkpoint_dir=str(tmp_path))
    assert info.value.history["epoch"].tolist() == [1, 2]
    kept = load_checkpoint(tmp_path)
    assert kept["epoch"] == 2 and torch.isfinite(kept["param_store"]["loc"]).all()


def test_nan_parameters_are_named_not_dumped_by_pyro():
    x = load_dataset("bfi", split="train").x[:256]
    model = VAE(x.shape[1], z_dim=2, hidden=[8], likelihood="gaussian")
    with torch.no_grad():
        model.decoder.raw_scale.fill_(float("nan"))
    with pytest.raises(ValueError, match=r"parameters \['decoder.raw_scale'\] hold NaN"):
        fit(model, x, epochs=1, batch_size=64, progress=False)


def test_a_second_writer_is_refused_at_once(tmp_path, capsys):
    out = tmp_path / "run"
    assert main([*FA, "--epochs", "1", "--out", str(out)]) == 0
    before = _snapshot(out)
    capsys.readouterr()
    with FolderLock(out):
        assert main([*FA, "--epochs", "1", "--out", str(out), "--overwrite"]) == 2
        line = _one_error_line(capsys)
    assert f"is being written by process {os.getpid()}" in line
    after = _snapshot(out)
    after.pop(LOCK_FILE, None), before.pop(LOCK_FILE, None)
    assert after == before


def test_crafted_and_damaged_checkpoints_are_refused(tmp_path, capsys):
    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'ran'}",))

    out = tmp_path / "run"
    assert main([*FA, "--epochs", "1", "--out", str(out)]) == 0
    capsys.readouterr()
    good = (out / "checkpoint.pt").read_bytes()
    for content in (None, good[: len(good) // 2], b"garbage"):
        if content is None:
            torch.save({"format": 1, "model_state": Payload()}, out / "checkpoint.pt")
        else:
            (out / "checkpoint.pt").write_bytes(content)
        assert main(["eval", str(out), "--num-samples", "3"]) == 2
        line = _one_error_line(capsys)
        assert "was not loaded" in line and "weights_only" not in line
        assert not (tmp_path / "ran").exists()


def test_evaluate_checks_the_data_it_scores():
    x = (load_dataset("digits", split="train").x[:64] > 0).float()
    vae = VAE(x.shape[1], z_dim=2, hidden=[8])
    for bad, message in ((x * 0.5, "binary"), (x * 5.0, "binary"), (-x, "binary")):
        with pytest.raises(ValueError, match=message):
            evaluate(vae, bad, num_samples=2)
    nan = x.clone()
    nan[3, 4] = float("nan")
    with pytest.raises(ValueError, match="row 3, column 4"):
        evaluate(vae, nan, num_samples=2)
    with pytest.raises(ValueError, match="columns"):
        evaluate(vae, x[:, :10], num_samples=2)
    from pyrovae import FactorAnalysis

    fa = FactorAnalysis(3, 1)
    with pytest.raises(ValueError, match="non-finite result"):
        evaluate(fa, torch.full((4, 3), 1e30), num_samples=2)


# -- kills at any instant ---------------------------------------------------------------

_KILL_IN_SAVE = """
import os, signal, sys, torch
import pyrovae.infer.fit as fit_module
from pyrovae.cli import main
calls = {"n": 0}
real_save = torch.save

def save(obj, path, *a, **k):
    calls["n"] += 1
    if calls["n"] == 3:  # half of the third checkpoint reaches the disk, then the process dies
        real_save(obj, path, *a, **k)
        data = open(path, "rb").read()
        open(path, "wb").write(data[: len(data) // 2])
        os.kill(os.getpid(), signal.SIGKILL)
    return real_save(obj, path, *a, **k)

torch.save = save
sys.exit(main(sys.argv[1:]))
"""


def _cli(args, **kw):
    return subprocess.run([sys.executable, "-m", "pyrovae", *args], capture_output=True,
                          text=True, timeout=300, **kw)


def _same_run(a: Path, b: Path) -> None:
    sa, sb = load_checkpoint(a)["model_state"], load_checkpoint(b)["model_state"]
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    for name in ("history.csv", "metrics.csv"):
        fa, fb = (pd.read_csv(f / name).drop(columns="seconds") for f in (a, b))
        pd.testing.assert_frame_equal(fa, fb, check_exact=True)


def test_sigkill_during_training_and_during_a_checkpoint_write_then_resume(tmp_path):
    args = [*FA, "--epochs", "6"]
    whole = tmp_path / "whole"
    assert _cli([*args, "--out", str(whole)]).returncode == 0

    # Killed while training, as soon as the first checkpoint is on disk.
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "pyrovae", *args, "--out", str(killed)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (killed / "checkpoint.pt").exists() and time.time() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert load_checkpoint(killed)["epoch"] < 6
    done = _cli([*args, "--out", str(killed), "--resume"])
    assert done.returncode == 0, done.stderr
    _same_run(whole, killed)

    # Killed in the middle of writing the third checkpoint.
    torn = tmp_path / "torn"
    dead = subprocess.run([sys.executable, "-c", _KILL_IN_SAVE, *args, "--out", str(torn)],
                          capture_output=True, text=True, timeout=300)
    assert dead.returncode == -signal.SIGKILL
    assert load_checkpoint(torn)["epoch"] == 2  # the last whole checkpoint
    assert list(torn.glob(".*.tmp"))  # the torn temporary file
    done = _cli([*args, "--out", str(torn), "--resume"])
    assert done.returncode == 0, done.stderr
    assert not list(torn.glob(".*.tmp"))
    _same_run(whole, torn)
