"""Bad input from a hostile and careless user.

The rule: bad input gets ONE clear line that says what is wrong and how to
fix it, never a traceback from Pyro or torch internals and never a silently
wrong number. Property-based tests throw malformed data at ``fit``,
``evaluate`` and the models' public methods, malformed argument lists at
``pyrovae train | eval | bench run`` and malformed suite files at
``load_suite``; example-based tests pin the cases of the issue.

A result is accepted when it is finite. An error is accepted when it is one
of the types the API promises (``ValueError``, ``TypeError``,
``FileNotFoundError``, ``TrainingDiverged``, ``FolderLockedError``), its
message is one line, and the frame that raised it is inside ``pyrovae/``
(not torch, Pyro, numpy or pandas). On the command line: exit status 0, or 2
with exactly one line on stderr, ``pyrovae <command>: error: ...``.
"""

from __future__ import annotations

import json
import math
import re
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import pyrovae
from pyrovae import VAE, FactorAnalysis, GaussianMixture, evaluate, fit, seeded
from pyrovae.bench import load_suite
from pyrovae.bench.spec import SpecError
from pyrovae.cli import main
from pyrovae.data import ArrayDataset
from pyrovae.data.tabular import split_indices
from pyrovae.files import FolderLockedError
from pyrovae.infer.fit import TrainingDiverged, load_checkpoint

PACKAGE = Path(pyrovae.__file__).resolve().parent
API_ERRORS = (ValueError, TypeError, FileNotFoundError, TrainingDiverged, FolderLockedError)
# Text that only Pyro's or torch's own messages carry.
INTERNALS = ("Trace Shapes", "Expected parameter", "Traceback", "site-packages")
D = 3  # columns of the data the small models expect

# 30 examples a property keeps the file well under a minute; hunt longer with
# PYROVAE_BAD_INPUT_EXAMPLES=1000.
PROPERTY = settings(max_examples=int(os.environ.get("PYROVAE_BAD_INPUT_EXAMPLES", 30)),
                    deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture,
                                           HealthCheck.too_slow, HealthCheck.data_too_large])


# -- what an outcome must look like ------------------------------------------------------


def _raised_in(err: BaseException) -> Path:
    tb = err.__traceback__
    last = None
    while tb is not None:
        last, tb = tb.tb_frame, tb.tb_next
    return Path(last.f_code.co_filename).resolve()


def assert_clean_error(err: BaseException) -> None:
    assert isinstance(err, API_ERRORS), f"{type(err).__name__}: {err}"
    message = str(err)
    assert message.strip(), f"{type(err).__name__} without a message"
    assert "\n" not in message, f"a message of several lines: {message!r}"
    assert not any(text in message for text in INTERNALS), message
    where = _raised_in(err)
    assert PACKAGE in where.parents, f"raised in {where}, not in pyrovae: {message}"


def assert_finite(value: Any, what: str) -> None:
    if value is None:
        return
    if isinstance(value, torch.distributions.Distribution):
        value = value.probs if isinstance(value, torch.distributions.Categorical) else value.mean
    if isinstance(value, torch.Tensor):
        assert bool(torch.isfinite(value).all()), f"{what} returned NaN/inf silently"
    elif isinstance(value, (int, float)):
        assert math.isfinite(value), f"{what} returned {value} silently"


def outcome(call, what: str) -> Any:
    """Run ``call``; a result must be finite, an error clean."""
    try:
        result = call()
    except Exception as err:  # noqa: BLE001  (judged below)
        assert_clean_error(err)
        return err
    assert_finite(result, what)
    return result


# -- malformed data ----------------------------------------------------------------------

MODEL_KINDS = ("fa", "gmm", "vae-bernoulli", "vae-gaussian")


def build(kind: str):
    with seeded(0):
        return {
            "fa": lambda: FactorAnalysis(D, 1),
            "gmm": lambda: GaussianMixture(2, D),
            "vae-bernoulli": lambda: VAE(D, z_dim=2, hidden=[4]),
            "vae-gaussian": lambda: VAE(D, z_dim=2, hidden=[4], likelihood="gaussian"),
        }[kind]()


@st.composite
def spoiled(draw) -> np.ndarray:
    """A clean (N, D) array with one thing done to it."""
    n = draw(st.integers(1, 8))
    x = draw(hnp.arrays(np.float64, (n, D), elements=st.floats(-3, 3)))
    how = draw(st.sampled_from(["clean", "nan", "inf", "-inf", "huge", "overflow", "grey",
                                "binary", "wide", "narrow", "3d", "1d", "empty", "no-columns",
                                "transposed"]))
    i, j = draw(st.integers(0, n - 1)), draw(st.integers(0, D - 1))
    if how in ("nan", "inf", "-inf"):
        x[i, j] = float(how)
    elif how == "huge":
        x = x * draw(st.sampled_from([1e20, 1e30, 1e38, -1e38]))
    elif how == "overflow":  # finite in float64, inf in float32
        x[i, j] = draw(st.sampled_from([1e39, -1e300, 1.7e308]))
    elif how == "grey":
        x = draw(hnp.arrays(np.float64, (n, D), elements=st.floats(0, 1)))
    elif how == "binary":
        x = (x > 0).astype(np.float64)
    elif how == "wide":
        x = np.concatenate([x, x], axis=1)
    elif how == "narrow":
        x = x[:, :1]
    elif how == "3d":
        x = np.stack([x, x], axis=-1)
    elif how == "1d":
        x = x[:, 0]
    elif how == "empty":
        x = x[:0]
    elif how == "no-columns":
        x = x[:, :0]
    elif how == "transposed":
        x = x.T
    return x


def _frame_with(x: np.ndarray, column: str):
    frame = pd.DataFrame(x).rename(columns=str)
    n = len(frame)
    if column == "text":
        frame["0"] = ["a"] * n
    elif column == "category":
        frame["0"] = pd.Categorical(["a"] * n)
    elif column == "dates":
        frame["0"] = pd.date_range("2020-01-01", periods=n)
    elif column == "nullable":
        frame["0"] = pd.array([1] + [None] * (n - 1), dtype="Int64")
    elif column == "complex":
        frame["0"] = frame["0"].astype(complex)
    elif column == "bool":
        frame["0"] = frame["0"] > 0
    return frame


@st.composite
def wrapped(draw):
    """A spoiled array in one of the accepted containers."""
    x = draw(spoiled())
    how = draw(st.sampled_from(["numpy", "float32", "int", "list", "tensor", "tensor64",
                                "int-tensor", "frame", "series", "dataset"]))
    if how == "float32":
        with np.errstate(over="ignore"):
            return x.astype(np.float32)
    if how == "int":
        return np.nan_to_num(x).clip(-2**62, 2**62).astype(np.int64)
    if how == "list":
        return x.tolist()
    if how == "tensor":
        return torch.from_numpy(x).float()
    if how == "tensor64":
        return torch.from_numpy(x)
    if how == "int-tensor":
        return torch.from_numpy(np.nan_to_num(x).clip(-2**62, 2**62).astype(np.int64))
    if how == "frame" and x.ndim == 2:
        return pd.DataFrame(x)
    if how == "series" and x.ndim == 1:
        return pd.Series(x)
    if how == "dataset" and x.ndim == 2:
        return ArrayDataset(torch.from_numpy(x).float())
    return x


other_dtypes = st.sampled_from([np.complex128, np.complex64, np.float16, np.uint8, np.int8,
                                np.bool_, np.dtype("U3"), np.dtype("S2"), np.dtype("M8[D]"),
                                np.dtype("m8[s]"), np.dtype(object)])

bad_data = st.one_of(
    wrapped(),
    hnp.arrays(other_dtypes, st.one_of(st.tuples(st.integers(0, 6), st.just(D)),
                                       hnp.array_shapes(min_dims=0, max_dims=3, min_side=0,
                                                        max_side=4))),
    hnp.arrays(hnp.floating_dtypes() | hnp.integer_dtypes(),
               hnp.array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=5)),
    st.builds(_frame_with, hnp.arrays(np.float64, st.tuples(st.integers(1, 6), st.just(D)),
                                      elements=st.floats(allow_nan=True)),
              st.sampled_from(["text", "category", "dates", "nullable", "complex", "bool"])),
    st.lists(st.lists(st.floats() | st.integers(-10, 10) | st.text(max_size=2) | st.none(),
                      max_size=4), max_size=5),  # ragged, empty, strings, None
    st.lists(st.integers(-5, 5), max_size=6),
    st.dictionaries(st.text(max_size=3), st.floats(), max_size=3),
    st.sets(st.integers(), max_size=3),
    st.none(), st.text(max_size=5), st.binary(max_size=5), st.floats(), st.integers(),
    st.just(object()), st.just(torch.zeros(2, D, dtype=torch.complex64)),
    st.just(torch.zeros(2, D, dtype=torch.uint8)),
    st.just(pd.DataFrame()), st.just(pd.Series([], dtype=float)),
    st.just(np.zeros((2, D))[:, ::2]),  # a non-contiguous view
)


@PROPERTY
@given(data=bad_data)
def test_model_methods_take_bad_data_cleanly(data):
    for kind in MODEL_KINDS:
        model = build(kind)
        for name in ("log_marginal", "encode", "posterior", "check_data"):
            method = getattr(model, name, None)
            if callable(method):
                outcome(lambda: method(data), f"{kind}.{name}")


@PROPERTY
@given(data=bad_data, kind=st.sampled_from(MODEL_KINDS))
def test_evaluate_takes_bad_data_cleanly(data, kind):
    result = outcome(lambda: evaluate(build(kind), data, num_samples=2), "evaluate")
    if not isinstance(result, Exception):
        assert_finite(result.elbo, "evaluate: elbo")
        assert_finite(result.log_likelihood, "evaluate: log_likelihood")


@PROPERTY
@given(data=bad_data, kind=st.sampled_from(MODEL_KINDS), role=st.sampled_from(["train", "test"]))
def test_fit_takes_bad_data_cleanly(data, kind, role):
    good = torch.randn(16, D, generator=torch.Generator().manual_seed(0))
    if kind == "vae-bernoulli":
        good = (good > 0).float()
    train, test = (data, good) if role == "train" else (good, data)
    result = outcome(lambda: fit(build(kind), train, test, epochs=1, batch_size=8,
                                 progress=False), "fit")
    if not isinstance(result, Exception):
        assert_finite(result.history["train_elbo"].iloc[-1], "fit: train_elbo")
        if test is not None:  # without held-out data there is no held-out ELBO
            assert_finite(result.history["test_elbo"].iloc[-1], "fit: test_elbo")


@PROPERTY
@given(x=hnp.arrays(np.float64, st.tuples(st.integers(1, 8), st.just(D)),
                    elements=st.floats(-2, 2)))
def test_a_bernoulli_vae_refuses_anything_but_zeros_and_ones(x):
    binary = bool(np.isin(x.astype(np.float32), (0.0, 1.0)).all())  # as the model sees it
    for call in (lambda: build("vae-bernoulli").check_data(x),
                 lambda: evaluate(build("vae-bernoulli"), x, num_samples=2),
                 lambda: fit(build("vae-bernoulli"), x, epochs=1, progress=False)):
        result = outcome(call, "bernoulli")
        if not binary:
            assert isinstance(result, ValueError) and "binary" in str(result)


def test_the_models_name_what_is_wrong_with_data():
    fa, vae = build("fa"), build("vae-bernoulli")
    nan = np.zeros((4, D))
    nan[2, 1] = np.nan
    for call, words in (
        (lambda: fa.log_marginal(nan), "row 2, column 1"),
        (lambda: vae.encode(nan), "NaN or infinite"),
        (lambda: fa.posterior(np.full((2, D), 1e300)), "beyond the range of torch.float32"),
        (lambda: fa.log_marginal(np.full((2, D), 1e30)), "non-finite result"),
        (lambda: fa.encode(np.zeros((2, D + 1))), "expects data with 3 columns"),
        (lambda: fa.encode(np.array([["a", "b", "c"]])), "expected numbers"),
        (lambda: fa.encode([[1, 2, 3], [1, 2]]), "ragged"),
        (lambda: fa.encode({"a": 1}), "got dict"),
        (lambda: fa.encode(None), "got NoneType"),
        (lambda: fa.encode(np.zeros((0, D))), "is empty"),
        (lambda: fa.encode(np.zeros((2, D), dtype=complex)), "complex"),
        (lambda: evaluate(GaussianMixture(3, D), np.zeros((50, D)), num_samples=2),
         "fewer than its K=3 components"),
    ):
        with pytest.raises(API_ERRORS, match=words) as info:
            call()
        assert_clean_error(info.value)


def test_a_first_step_that_diverges_blames_the_data_not_the_learning_rate():
    model = build("vae-gaussian")
    with pytest.raises(TrainingDiverged, match="before any update.*standardize") as info:
        fit(model, torch.full((8, D), 1e30), epochs=1, progress=False)
    assert_clean_error(info.value)
    # The failed call leaves no NaN gradient behind to poison the next one.
    result = fit(model, torch.randn(8, D), epochs=1, progress=False)
    assert math.isfinite(result.history["train_elbo"].iloc[-1])


# -- the command line ----------------------------------------------------------------------

BASE = ["--dataset", "faithful", "--epochs", "1", "--train-size", "64", "--eval-samples", "2",
        "--eval-points", "16", "--no-progress"]


def cli(argv: List[str], capsys) -> tuple:
    capsys.readouterr()
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def one_error_line(err: str, command: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got:\n{err}"
    line = lines[0]
    assert line.startswith(f"pyrovae {command}") and ": error: " in line, line
    message = line.split(": error: ", 1)[1]
    assert message.strip(), line
    # "unexpected <Error>: ..." is how the CLI reports an error nobody anticipated.
    assert "Traceback" not in err and not message.startswith("unexpected "), line
    assert not any(text in line for text in INTERNALS), line
    return line


def assert_cli_outcome(code: int, err: str, command: str) -> None:
    assert code in (0, 2), f"exit status {code}; stderr:\n{err}"
    if code == 2:
        one_error_line(err, command)


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A folder with the files bad arguments point at; also the working
    directory, so that nothing lands in the repository."""
    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(0)
    frame = pd.DataFrame(rng.normal(size=(80, 3)), columns=list("abc"))
    frame.to_csv(tmp_path / "good.csv", index=False)
    text = frame.astype({"c": str})
    text.loc[3, "c"] = "oops"
    text.to_csv(tmp_path / "text.csv", index=False)
    _, test_rows = split_indices(80)
    holes = frame.copy()
    holes.loc[test_rows[:2], "b"] = np.nan  # empty cells in the rows of the test split
    holes.to_csv(tmp_path / "holes.csv", index=False)
    infinite = frame.copy()
    infinite.loc[test_rows[0], "b"] = np.inf
    infinite.to_csv(tmp_path / "inf.csv", index=False)
    (tmp_path / "empty.csv").write_text("")
    (tmp_path / "header.csv").write_text("a,b,c\n")
    (tmp_path / "binary.csv").write_bytes(b"\x00\xff\xfe\x01")
    (tmp_path / "folder.csv").mkdir()
    (tmp_path / "a-file").write_text("not a folder")
    return tmp_path


def _place(value: str, where: Path) -> str:
    """Pool values name files by placeholders: ``@name`` is ``where/name``."""
    return str(where / value[1:]) if value.startswith("@") else value


TRAIN_MODELS = ["gmm", "vae", "fa", "ppca", "bayes-gmm", "nope", "", "VAE"]
TRAIN_POOLS: Dict[str, List[str]] = {
    "--train-size": ["-1", "0", "1", "x", "nan", "inf", "1e3", "2.5", "99999999999999999999", ""],
    "--z-dim": ["0", "-3", "2.5", "x", "1", "300"],
    "--hidden": ["0", "-1", "x", "4"],
    "--batch-size": ["0", "-1", "x", "1", "1000000000"],
    "--epochs": ["0", "-1", "x", "1e9"],
    "--max-steps": ["0", "-1", "x"],
    "--lr": ["0", "-1", "nan", "inf", "-inf", "x", "1e30", "1e-320"],
    "--eval-samples": ["-1", "x", "0", "nan"],
    "--eval-points": ["0", "-1", "1", "x"],
    "--seed": ["-1", "x", "1.5", "18446744073709551616"],
    "--num-particles": ["0", "-1", "x"],
    "--em-max-iter": ["0", "x"],
    "--early-stopping": ["0", "-1", "x"],
    "--clip-grad": ["0", "-1", "nan", "inf", "x"],
    "--lr-schedule": ["nope", "step:0:0.5", "step:x", "exponential:-1", "warmup:0", ""],
    "--set": ["z_dim=2.5", "hidden=[0]", 'hidden="x"', "hidden=x", "nokey=1", "=3", "z_dim",
              "K=0", 'covariance="nope"', "likelihood=3", "scale=-1", 'encoder="nope"',
              "z_dim=NaN", "z_dim=true", "z_dim=1e400", "hidden={}", "init=5"],
    "--data-opt": ["seed=x", "test_fraction=2", 'test_fraction="x"', "standardize=5",
                   "nokey=1", "root=/nonexistent", "split=1"],
    "--elbo-opt": ["beta=-1", 'alpha="x"', "nokey=1", "=1"],
    "--device": ["cuda", "tpu", "cuda:7", "", "meta", "mps"],
    "--elbo": ["Nope", "TraceEnum_ELBO", "RenyiELBO", "IWAE", ""],
    "--method": ["em", "sklearn", "nope"],
    "--optimizer": ["nope", "sgd"],
    "--likelihood": ["nope", "gaussian"],
    "--activation": ["nope", "relu"],
    "--guide": ["nope", "mlp"],
    "--binarize": ["nope", "none"],
    "--dataset": ["@missing.csv", "@text.csv", "@holes.csv", "@inf.csv", "@empty.csv",
                  "@header.csv", "@binary.csv", "@folder.csv", "nope", "", "@good.csv"],
    "--out": ["@a-file", "@a-file/run", "", "@run", "@" + "x" * 300],
}
FLAGS = ["--resume", "--overwrite", "--vectorize-particles", "--skip-nonfinite", "--no-capture"]


@st.composite
def train_argv(draw) -> List[str]:
    model = draw(st.sampled_from(TRAIN_MODELS))
    picks = draw(st.lists(st.sampled_from(sorted(TRAIN_POOLS)), min_size=1, max_size=3,
                          unique=True))
    extra: List[str] = []
    for option in picks:
        extra += [option, draw(st.sampled_from(TRAIN_POOLS[option]))]
    extra += draw(st.lists(st.sampled_from(FLAGS), max_size=2, unique=True))
    return ["train", model, *BASE, "--out", "@fresh", *extra]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished run folder (a mixture on Old Faithful) to copy from."""
    out = tmp_path_factory.mktemp("finished") / "run"
    args = ["train", "gmm", *BASE, "--z-dim", "2", "--out", str(out)]
    assert main(args) == 0
    return out


@PROPERTY
@given(argv=train_argv())
def test_train_with_bad_arguments_fails_in_one_line(argv, workdir, finished_run, capsys):
    where = Path(tempfile.mkdtemp(dir=workdir))
    shutil.copytree(finished_run, where / "run")
    argv = [_place(a, workdir) if a != "@fresh" else str(where / "fresh") for a in argv]
    argv = [str(where / "run") if a == str(workdir / "run") else a for a in argv]
    code, _, err = cli(argv, capsys)
    assert_cli_outcome(code, err, "train")


def _broken_runs(finished_run: Path, where: Path) -> Dict[str, Path]:
    """Copies of a finished run, each damaged in one way."""
    runs = {}

    def copy(name: str) -> Path:
        runs[name] = where / name
        shutil.copytree(finished_run, runs[name])
        return runs[name]

    copy("good")
    (copy("bad-json") / "config.json").write_text("{not json")
    (copy("json-list") / "config.json").write_text("[1, 2]")
    config = copy("no-eval") / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "eval": 3}))
    config = copy("unknown-model") / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "model": "nope"}))
    state = load_checkpoint(finished_run)
    torch.save({k: v for k, v in state.items() if k != "model_state"},
               copy("no-model-state") / "checkpoint.pt")
    torch.save({**state, "model_state": {"x": torch.zeros(1)}},
               copy("other-model") / "checkpoint.pt")
    nan = {k: torch.full_like(v, float("nan")) if v.is_floating_point() else v
           for k, v in state["model_state"].items()}
    torch.save({**state, "model_state": nan}, copy("nan-weights") / "checkpoint.pt")
    torch.save([1, 2], copy("a-list") / "checkpoint.pt")
    ckpt = copy("truncated") / "checkpoint.pt"
    ckpt.write_bytes(ckpt.read_bytes()[:100])
    (copy("no-checkpoint") / "checkpoint.pt").unlink()
    (copy("config-folder") / "config.json").unlink()
    (runs["config-folder"] / "config.json").mkdir()
    (where / "empty").mkdir()
    runs["empty"] = where / "empty"
    return runs


EVAL_POOLS = {
    "--num-samples": ["-1", "x", "0", "2", "nan"],
    "--eval-points": ["0", "-1", "1", "x", "16"],
    "--seed": ["-1", "x", "3", "18446744073709551616"],
}
EVAL_RUNS = ["good", "bad-json", "json-list", "no-eval", "unknown-model", "no-model-state",
             "other-model", "nan-weights", "a-list", "truncated", "no-checkpoint",
             "config-folder", "empty", "@missing", "@a-file", ""]


@PROPERTY
@given(run=st.sampled_from(EVAL_RUNS),
       options=st.lists(st.sampled_from([(o, v) for o, vs in EVAL_POOLS.items() for v in vs]),
                        max_size=3))
def test_eval_with_bad_runs_and_arguments_fails_in_one_line(run, options, workdir,
                                                            finished_run, capsys):
    runs = _broken_runs(finished_run, Path(tempfile.mkdtemp(dir=workdir)))
    folder = str(runs[run]) if run in runs else _place(run, workdir)
    argv = ["eval", folder, *[part for option in options for part in option]]
    code, _, err = cli(argv, capsys)
    assert_cli_outcome(code, err, "eval")
    if code == 0:
        assert run == "good"


# -- suite files ---------------------------------------------------------------------------

GOOD_SUITE: Dict[str, Any] = {
    "suite": {"name": "t", "metrics": ["elbo"], "eval": {"num_samples": 2, "max_points": 16}},
    "grid": [{"models": [{"name": "gmm", "K": 2}], "objectives": ["TraceEnum_ELBO"],
              "datasets": [{"name": "faithful", "train_size": 64, "test_size": 16}],
              "budgets": [{"steps": 1}], "seeds": [0]}],
}
NAN, INF = float("nan"), float("inf")
DELETE = object()
# Each value is wrong at its place.
SUITE_MUTATIONS: Dict[tuple, List[Any]] = {
    ("suite", "name"): [5, "", [], True, DELETE],
    ("suite", "metrics"): [["nope"], [1], 5],
    ("suite", "eval"): [5, "x", {"num_samples": -1}, {"zzz": 1}, {"max_points": 0},
                        {"seed": -1}, {"num_samples": 2.5}],
    ("suite", "zzz"): [1],
    ("zzz",): [1],
    ("suite",): [3, "x"],
    ("grid",): ["x", [], 3, DELETE],
    ("grid", 0, "models"): [[], 3, [3], [{"K": 2}], [{"name": "nope"}], [{"name": "gmm", "K": 0}],
                            [{"name": "gmm", "K": 2.5}], [{"name": "gmm", "K": "x"}],
                            [{"name": "gmm", "zzz": 1}], [{"name": "vae", "hidden": [0]}],
                            [{"name": "vae", "hidden": "x"}], [{"name": "vae", "z_dim": NAN}],
                            [{"name": "gmm", "K": -INF}], DELETE],
    ("grid", 0, "objectives"): [[], ["Nope"], [{"name": "IWAE", "num_particles": [0]}],
                                [{"name": "Trace_ELBO", "vectorize_particles": "yes"}],
                                [{"name": "Trace_ELBO", "foo": 1}], [3], DELETE],
    ("grid", 0, "datasets"): [[], ["nope"], [{"name": "faithful", "train_size": 0}],
                              [{"name": "faithful", "test_size": -1}],
                              [{"name": "faithful", "seed": "x"}],
                              [{"name": "faithful", "zzz": 1}],
                              [{"name": "faithful", "train_size": 2.5}], DELETE],
    ("grid", 0, "budgets"): [[], [{}], [{"steps": 0}], [{"steps": -1}], [{"epochs": "x"}],
                             [{"seconds": -1.0}], [{"seconds": NAN}], [{"minutes": 1}]],
    ("grid", 0, "seeds"): [[], [-1], ["a"], [1.5], [True]],
    ("grid", 0, "fit"): ["x", {"lr": -1}, {"lr": NAN}, {"batch_size": 0},
                         {"optimizer": "nope"}, {"zzz": 1}],
    ("grid", 0, "methods"): [["nope"], [], [3]],
    ("grid", 0, "device"): [3, []],
    ("grid", 0, "guides"): [["nope"]],
    ("grid", 0, "zzz"): [1],
}


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        return ("inf" if v > 0 else "-inf") if math.isinf(v) else repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{json.dumps(k)} = {_toml_value(x)}" for k, x in v.items()) + " }"
    raise TypeError(type(v))


def to_toml(doc: Dict[str, Any]) -> str:
    lines = []
    for key, value in doc.items():
        if key == "suite" and isinstance(value, dict):
            lines.append("[suite]")
            lines += [f"{json.dumps(k)} = {_toml_value(v)}" for k, v in value.items()]
        elif (key == "grid" and isinstance(value, list) and value
              and all(isinstance(g, dict) for g in value)):
            for grid in value:
                lines.append("[[grid]]")
                lines += [f"{json.dumps(k)} = {_toml_value(v)}" for k, v in grid.items()]
        else:  # a top-level value must come before the tables
            lines.insert(0, f"{json.dumps(key)} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"


def mutate(doc: Dict[str, Any], path: tuple, value: Any) -> Dict[str, Any]:
    doc = json.loads(json.dumps(doc))
    node = doc
    for part in path[:-1]:
        if not isinstance(node, (dict, list)):
            return doc
        if isinstance(node, dict):
            node = node.setdefault(part, {})
        elif isinstance(part, int) and part < len(node):
            node = node[part]
        else:
            return doc
    if isinstance(node, dict):
        if value is DELETE:
            node.pop(path[-1], None)
        else:
            node[path[-1]] = value
    return doc


suite_mutations = st.lists(
    st.sampled_from([(path, value) for path, values in SUITE_MUTATIONS.items()
                     for value in values]),
    min_size=1, max_size=3)


def test_the_good_suite_is_good(tmp_path):
    path = tmp_path / "good.toml"
    path.write_text(to_toml(GOOD_SUITE))
    assert len(load_suite(path).cells()) == 1


@PROPERTY
@given(mutations=suite_mutations)
def test_bad_suite_files_raise_spec_error(mutations, tmp_path):
    doc = GOOD_SUITE
    for path, value in mutations:
        doc = mutate(doc, path, value)
    suite = tmp_path / "bad.toml"
    suite.write_text(to_toml(doc))
    with pytest.raises(SpecError) as info:
        load_suite(suite)
    assert info.value.problems and all(": " in p for p in info.value.problems)
    assert PACKAGE in _raised_in(info.value).parents


BENCH_SUITES = ["@missing.toml", "@folder.csv", "@binary.csv", "@empty.csv", "@a-file",
                "@bad-model.toml", "@bad-budget.toml", "@good.toml"]
BENCH_POOLS = {
    "--jobs": ["0", "-1", "x", "1.5"],
    "--threads": ["0", "-1", "x"],
    "--set": ["nokey=1", "grid.budgets=[{epochs=-1}]", "noequals", "grid.9.x=1",
              "suite.eval.num_samples=-1", "grid.models=[]", "grid.fit.lr=nan", "=1", "grid="],
    "--out": ["@a-file/sub"],
}


@PROPERTY
@given(suite=st.sampled_from(BENCH_SUITES),
       options=st.lists(st.sampled_from([(o, v) for o, vs in BENCH_POOLS.items() for v in vs]),
                        min_size=1, max_size=3),
       flags=st.lists(st.sampled_from(["--dry-run", "--retry-errors", "--fail-fast"]),
                      max_size=2, unique=True))
def test_bench_run_with_bad_arguments_fails_in_one_line(suite, options, flags, workdir, capsys):
    (workdir / "good.toml").write_text(to_toml(GOOD_SUITE))
    (workdir / "bad-model.toml").write_text(
        to_toml(mutate(GOOD_SUITE, ("grid", 0, "models"), [{"name": "nope"}])))
    (workdir / "bad-budget.toml").write_text(
        to_toml(mutate(GOOD_SUITE, ("grid", 0, "budgets"), [{"steps": -1}])))
    out = Path(tempfile.mkdtemp(dir=workdir)) / "out"
    argv = ["bench", "run", _place(suite, workdir), "--out", str(out), "--no-progress",
            *[_place(part, workdir) for option in options for part in option], *flags]
    code, _, err = cli(argv, capsys)
    assert_cli_outcome(code, err, "bench")


# Values that must fail at load time, naming the key, not in every cell later.
# (Whether a model fits the data, e.g. more factors than columns, needs the
# data and is checked when the cell runs.)
@pytest.mark.parametrize("path, value", [
    (("grid", 0, "device"), "tpu"),
    (("grid", 0, "budgets"), [{"seconds": INF}]),
])
def test_suite_values_that_load_suite_lets_through(path, value, tmp_path):
    suite = tmp_path / "suite.toml"
    suite.write_text(to_toml(mutate(GOOD_SUITE, path, value)))
    with pytest.raises(SpecError):
        load_suite(suite)


def test_budgets_that_are_not_a_list_in_a_grid_without_svi(tmp_path):
    doc = mutate(mutate(GOOD_SUITE, ("grid", 0, "methods"), ["em"]), ("grid", 0, "budgets"), 5)
    suite = tmp_path / "suite.toml"
    suite.write_text(to_toml(doc))
    with pytest.raises(SpecError):
        load_suite(suite)


@pytest.mark.parametrize("out", ["@a-file", ""])
def test_bench_run_refuses_an_out_that_is_a_file_or_empty(out, workdir, capsys):
    (workdir / "good.toml").write_text(to_toml(GOOD_SUITE))
    code, _, err = cli(["bench", "run", str(workdir / "good.toml"), "--out",
                        _place(out, workdir), "--no-progress"], capsys)
    assert code == 2
    one_error_line(err, "bench")


# -- the cases of the issue ----------------------------------------------------------------


@pytest.mark.parametrize("option, value, expected", [
    ("--train-size", "-1", "argument --train-size: must be >= 1, got -1"),
    ("--train-size", "0", "argument --train-size: must be >= 1, got 0"),
    ("--z-dim", "0", "argument --z-dim: must be >= 1, got 0"),
    ("--hidden", "0", "argument --hidden: must be >= 1, got 0"),
    ("--eval-points", "0", "argument --eval-points: must be >= 1, got 0"),
    ("--lr", "nan", "argument --lr: must be a finite number > 0, got nan"),
    ("--seed", "18446744073709551616", "seed must be an integer from 0 to 18446744073709551615"),
    ("--set", "z_dim=2.5", "model 'gmm': z_dim: must be an integer >= 1, got 2.5"),
    ("--set", "hidden=[0]", "unknown options ['hidden'] for model 'gmm'"),
    ("--data-opt", "seed=x", "data set 'faithful': seed: must be an integer, got 'x'"),
    ("--device", "tpu", "device 'tpu' is not a device name; use 'cpu' or 'cuda'"),
    ("--out", "", "--out is empty; give the folder to write to"),
])
def test_issue_cases_name_the_option_the_value_and_the_fix(option, value, expected, workdir,
                                                           capsys):
    code, _, err = cli(["train", "gmm", *BASE, "--out", str(workdir / "run"), option, value],
                       capsys)
    assert code == 2
    assert expected in one_error_line(err, "train")
    assert not (workdir / "run").exists()


def test_vae_options_of_the_wrong_type_are_named(workdir, capsys):
    args = ["train", "vae", *BASE, "--likelihood", "gaussian", "--out", str(workdir / "run")]
    for setting, expected in (("hidden=[0]", r"hidden(\[0\])?: must be .*>= 1, got \[?0"),
                              ('hidden="x"', r"hidden: must be a .*list.*, got 'x'"),
                              ("scale=-1", r"scale must be 'learned' or a positive number")):
        code, _, err = cli([*args, "--set", setting], capsys)
        assert code == 2 and re.search(expected, one_error_line(err, "train"))
    # A positive fixed scale is a valid option (its type is str or float).
    code, _, err = cli([*args, "--set", "scale=0.5"], capsys)
    assert code == 0, err


def test_an_out_that_is_a_file_is_refused(workdir, capsys):
    code, _, err = cli(["train", "gmm", *BASE, "--out", str(workdir / "a-file")], capsys)
    assert code == 2
    assert "is a file, not a folder; choose another --out" in one_error_line(err, "train")


def test_an_out_in_a_read_only_folder_is_refused(workdir, capsys):
    locked = workdir / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("running as root: a read-only folder is still writable")
        code, _, err = cli(["train", "gmm", *BASE, "--out", str(locked / "run")], capsys)
        assert code == 2
        assert "is not writable" in one_error_line(err, "train")
    finally:
        locked.chmod(0o700)


def test_empty_cells_in_the_test_rows_of_a_csv_are_dropped_not_scored(workdir, capsys):
    out = workdir / "run"
    code, _, err = cli(["train", "gmm", *BASE, "--dataset", str(workdir / "holes.csv"),
                        "--out", str(out)], capsys)
    assert code == 0, err
    metrics = pd.read_csv(out / "metrics.csv")
    assert math.isfinite(metrics["elbo"].item()) and math.isfinite(metrics["log_likelihood"].item())
    # An infinite value is not a missing one: it is named, with its row and column.
    code, _, err = cli(["train", "gmm", *BASE, "--dataset", str(workdir / "inf.csv"),
                        "--out", str(workdir / "run2")], capsys)
    assert code == 2
    assert "the test split has 1 NaN or infinite values" in one_error_line(err, "train")


@pytest.mark.parametrize("name, expected", [
    ("text.csv", "columns ['c'] of text.csv are not numeric"),
    ("missing.csv", "no CSV file at"),
    ("empty.csv", "is not a readable CSV file"),
    ("binary.csv", "is not a readable CSV file"),
    ("header.csv", "has no rows with a value in every used column"),
])
def test_bad_csv_files_are_named(name, expected, workdir, capsys):
    code, _, err = cli(["train", "gmm", *BASE, "--dataset", str(workdir / name),
                        "--out", str(workdir / "run")], capsys)
    assert code == 2 and expected in one_error_line(err, "train")


@pytest.mark.parametrize("damage, expected", [
    ("no-model-state", "has no model_state (the trained weights)"),
    ("other-model", "does not fit this GaussianMixture"),
    ("nan-weights", "holds NaN or infinite weights"),
    ("json-list", "is not a readable pyrovae run config: expected a JSON object"),
    ("config-folder", "is not a readable pyrovae run config"),
    ("truncated", "is damaged or truncated"),
])
def test_damaged_run_folders_are_named(damage, expected, workdir, finished_run, capsys):
    runs = _broken_runs(finished_run, workdir / "runs")
    code, _, err = cli(["eval", str(runs[damage])], capsys)
    assert code == 2 and expected in one_error_line(err, "eval")
    if damage in ("no-model-state", "other-model", "nan-weights"):  # resume reads it too
        code, _, err = cli(["train", "gmm", *BASE, "--z-dim", "2", "--epochs", "2",
                            "--out", str(runs[damage]), "--resume"], capsys)
        assert code == 2 and expected in one_error_line(err, "train")
        with pytest.raises(ValueError, match=expected.split(" (")[0]) as info:
            pyrovae.load_run(runs[damage])
        assert_clean_error(info.value)


def test_resume_and_overwrite_mistakes(workdir, finished_run, capsys):
    run = workdir / "run"
    shutil.copytree(finished_run, run)
    args = ["train", "gmm", *BASE, "--z-dim", "2"]
    for extra, expected in (
        (["--out", str(run)], "already holds a run of gmm on faithful; add --resume"),
        (["--out", str(run), "--resume", "--overwrite"], "choose one"),
        (["--out", str(workdir / "typo"), "--resume"], "nothing to resume"),
        (["--out", str(run), "--resume", "--z-dim", "3"], "cannot change on resume"),
        (["--out", str(run), "--resume", "--method", "em"], "a em run starts anew"),
    ):
        code, _, err = cli([*args, *extra], capsys)
        assert code == 2 and expected in one_error_line(err, "train"), extra
    assert not (workdir / "typo").exists()


def test_a_diverging_learning_rate_stops_with_one_line(workdir, capsys):
    code, _, err = cli(["train", "gmm", *BASE, "--lr", "1e30", "--out", str(workdir / "run")],
                       capsys)
    assert code == 2
    assert "lower the learning rate" in one_error_line(err, "train")


# -- signals ---------------------------------------------------------------------------------


def test_sigint_stops_training_with_one_line_and_the_run_resumes(workdir, capsys):
    out = workdir / "run"
    args = ["train", "gmm", "--dataset", "faithful", "--epochs", "100000", "--batch-size", "16",
            "--eval-samples", "2", "--eval-points", "16", "--no-progress", "--out", str(out)]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.Popen([sys.executable, "-m", "pyrovae", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 120
    while not (out / "checkpoint.pt").exists() and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines == [f"interrupted; the last completed epoch is saved in {out}. "
                     "Continue with the same command plus --resume."], err
    epoch = load_checkpoint(out)["epoch"]
    # The same command plus --resume (with a budget that is already spent) finishes the run.
    resumed = [*args[:args.index("--epochs") + 1], str(epoch), *args[args.index("--epochs") + 2:]]
    code, _, err = cli([*resumed, "--resume"], capsys)
    assert code == 0, err
    assert (out / "metrics.csv").exists()
