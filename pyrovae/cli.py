"""Command line: ``pyrovae train | eval | bench``. Thin: parsing and printing
only; the work is in :mod:`pyrovae.pipeline` and :mod:`pyrovae.bench`."""

from __future__ import annotations

import argparse
import json
import math
import sys
import traceback
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

from pyrovae.bench.command import add_bench_commands
from pyrovae.files import FolderLockedError
from pyrovae.guides import GUIDES
from pyrovae.infer.objectives import ELBOS
from pyrovae.models import MODELS
from pyrovae.nn import ACTIVATIONS
from pyrovae.version import __version__


def _parse_set(items: List[str]) -> Dict[str, Any]:
    options: Dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"expected KEY=VALUE, got {item!r}")
        try:
            options[key.replace("-", "_")] = json.loads(raw)
        except json.JSONDecodeError:
            options[key.replace("-", "_")] = raw
    return options


def _binarize(value: str) -> Optional[str]:
    return None if value == "none" else value


def _integer(low: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    parse.__name__ = f"integer >= {low}"
    return parse


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


POSITIVE, COUNT = _integer(1), _integer(0)


def _metric_names(values: List[str]) -> List[str]:
    """``--metrics`` values, space- or comma-separated, in order, once each."""
    names = [name.strip() for value in values for name in value.split(",") if name.strip()]
    return list(dict.fromkeys(names))


def _add_metric_options(p: argparse.ArgumentParser, default: str) -> None:
    from pyrovae.pipeline import METRIC_HELP, EvalSettings

    defaults = EvalSettings()
    costs = "; ".join(f"{name}: {text}" for name, text in METRIC_HELP.items())
    p.add_argument("--metrics", nargs="+", default=None, metavar="NAME",
                   help=f"what to measure, space- or comma-separated (default: {default}). "
                        f"{costs}")
    p.add_argument("--gap-points", type=POSITIVE, default=None, metavar="N",
                   help=f"held-out points whose inference gap is measured (metric gap; "
                        f"default: {defaults.gap_points})")
    p.add_argument("--gap-steps", type=COUNT, default=None, metavar="N",
                   help=f"optimization steps of q per point for the inference gap "
                        f"(default: {defaults.gap_steps})")


def _eval_overrides(args: argparse.Namespace) -> Dict[str, Any]:
    settings: Dict[str, Any] = {}
    if args.gap_points is not None:
        settings["gap_points"] = args.gap_points
    if args.gap_steps is not None:
        settings["gap_steps"] = args.gap_steps
    return settings


class _Parser(argparse.ArgumentParser):
    """argparse, with every usage error on one line: ``PROG: error: ...``."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _add_train(sub) -> None:
    from pyrovae.data import DATASETS

    p = sub.add_parser("train", help="train a model, evaluate it, write metrics and figures",
                       description="Train a model, evaluate it on held-out data, and write "
                       "config.json, checkpoint.pt, history.csv, metrics.csv and figures "
                       "into --out.")
    p.add_argument("model", help=f"model name: {', '.join(sorted(MODELS))}")
    p.add_argument("--dataset", default="mnist",
                   help=f"data set name ({', '.join(sorted(DATASETS))}) or path to a .csv "
                        "file (default: %(default)s)")
    p.add_argument("--data-root", default=None, help="data folder (default: $PYROVAE_DATA)")
    p.add_argument("--binarize", type=_binarize, default="dynamic",
                   choices=["dynamic", "static", None],
                   help="image data: dynamic|static|none (default: %(default)s)")
    p.add_argument("--train-size", type=POSITIVE, default=None,
                   help="use the first N training points")
    p.add_argument("--test-size", type=POSITIVE, default=None,
                   help="use the first N held-out points")
    p.add_argument("--data-opt", dest="data_options", action="append", default=[],
                   metavar="KEY=VALUE", help="extra data-set option (JSON value), repeatable")
    p.add_argument("--z-dim", type=POSITIVE, default=None, help="latent dimension")
    p.add_argument("--hidden", type=POSITIVE, nargs="+", default=None, help="hidden layer sizes")
    p.add_argument("--guide", default=None,
                   help=f"guide (encoder) for models that take one: {', '.join(sorted(GUIDES))} "
                        "(default: the model's)")
    p.add_argument("--activation", default=None,
                   help=f"network nonlinearity: {', '.join(sorted(ACTIVATIONS))} "
                        "(default: the model's)")
    p.add_argument("--likelihood", default=None,
                   help="bernoulli | gaussian, for the VAE (default: bernoulli)")
    p.add_argument("--set", dest="options", action="append", default=[], metavar="KEY=VALUE",
                   help="extra model option (JSON value), repeatable")
    p.add_argument("--method", default="svi", choices=["svi", "em", "sklearn"],
                   help="svi (default), em (the model's EM algorithm) or sklearn "
                        "(its scikit-learn counterpart, for comparison)")
    p.add_argument("--em-max-iter", type=POSITIVE, default=500,
                   help="EM iterations at most (default: %(default)s)")
    p.add_argument("--elbo", default=None,
                   help=f"objective (default: the model's, else Trace_ELBO): {', '.join(sorted(ELBOS))}")
    p.add_argument("--num-particles", type=POSITIVE, default=1,
                   help="samples per data point in each gradient estimate (default: %(default)s)")
    p.add_argument("--vectorize-particles", action=argparse.BooleanOptionalAction, default=None,
                   help="draw the particles in one batched pass, or one at a time with "
                        "--no-vectorize-particles (default: batched where the programs allow)")
    p.add_argument("--no-capture", action="store_true",
                   help="run the programs at every step instead of replaying the recorded "
                        "graph of the training step (for programs whose computation reads "
                        "Python state that changes during training)")
    p.add_argument("--epochs", type=POSITIVE, default=10,
                   help="passes over the training set (default: %(default)s)")
    p.add_argument("--max-steps", type=POSITIVE, default=None,
                   help="stop after this many steps in total")
    p.add_argument("--batch-size", type=POSITIVE, default=128,
                   help="data points per step (default: %(default)s)")
    p.add_argument("--lr", type=_positive_float, default=1e-3,
                   help="learning rate (default: %(default)s)")
    p.add_argument("--optimizer", default="adam", choices=["adam", "adamw", "sgd", "rmsprop"],
                   help="optimizer (default: %(default)s)")
    p.add_argument("--optimizer-opt", dest="optimizer_options", action="append", default=[],
                   metavar="KEY=VALUE",
                   help="optimizer option (JSON value), repeatable: e.g. eps=1e-4 or "
                        "betas=[0.9,0.999] for Adam, momentum=0.9 for SGD")
    p.add_argument("--elbo-opt", dest="elbo_options", action="append", default=[],
                   metavar="KEY=VALUE",
                   help="objective option (JSON value), repeatable: e.g. beta=4 and "
                        "warmup_steps=1000 for BetaELBO, alpha=0.5 for RenyiELBO, "
                        "estimator=dreg for IWAE")
    p.add_argument("--lr-schedule", default=None, metavar="SCHEDULE",
                   help="cosine | step:N:GAMMA | exponential:GAMMA | warmup:N | stages:B:GAMMA "
                        "(stage i: B^i epochs at GAMMA^i; default: constant)")
    p.add_argument("--early-stopping", type=POSITIVE, default=None, metavar="N",
                   help="stop after N held-out evaluations without a gain in ELBO")
    p.add_argument("--clip-grad", type=_positive_float, default=None, metavar="X",
                   help="clip the gradient's total norm to X")
    p.add_argument("--tensorboard", default=None, metavar="DIR",
                   help="write TensorBoard event files (scalars, ELBO figures) into DIR")
    p.add_argument("--mlflow", nargs="?", const="", default=None, metavar="URI",
                   help="log parameters, metrics and the run folder to MLflow (URI: a tracking "
                        "server or store; default: MLflow's own, or $MLFLOW_TRACKING_URI)")
    p.add_argument("--mlflow-experiment", default="pyrovae",
                   help="MLflow experiment name (default: %(default)s)")
    p.add_argument("--skip-nonfinite", action="store_true",
                   help="skip and count batches whose loss or gradient is NaN/inf instead of "
                        "stopping")
    p.add_argument("--seed", type=COUNT, default=0,
                   help="decides initial weights, batching and every draw (default: %(default)s)")
    p.add_argument("--eval-samples", type=COUNT, default=1000,
                   help="K for the importance-sampled log-likelihood, 0 to skip "
                        "(default: %(default)s)")
    p.add_argument("--eval-points", type=POSITIVE, default=None,
                   help="evaluate on the first N test points (default: all)")
    _add_metric_options(p, "elbo iwae exact latents, latents only where the model has "
                           "continuous local latents")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: %(default)s)")
    p.add_argument("--devices", type=POSITIVE, default=None, metavar="N",
                   help="data-parallel training on N processes per machine, one per device; "
                        "--batch-size is the global batch (needs pyrovae[distributed])")
    p.add_argument("--num-nodes", type=POSITIVE, default=None, metavar="M",
                   help="machines taking part, each running this command (or started by "
                        "torchrun or SLURM) with --devices processes")
    p.add_argument("--strategy", default=None,
                   help="Lightning Fabric strategy for --devices/--num-nodes: ddp (default), "
                        "ddp_spawn, ddp_find_unused_parameters_true")
    p.add_argument("--accelerator", default=None,
                   help="Lightning Fabric accelerator for --devices/--num-nodes: cpu, gpu or "
                        "auto (default)")
    p.add_argument("--out", required=True, help="run folder")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its last checkpoint")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a finished run in --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def build_spec(args: argparse.Namespace):
    """The :class:`~pyrovae.pipeline.RunSpec` of a ``pyrovae train`` command."""
    from pyrovae.data import DATASETS
    from pyrovae.pipeline import DEFAULT_METRICS, EvalSettings, RunSpec
    from pyrovae.registry import signature_options

    options = _parse_set(args.options)
    for key in ("z_dim", "hidden", "activation", "likelihood"):
        if getattr(args, key) is not None:
            options[key] = getattr(args, key)
    if args.guide is not None:
        options["encoder"] = args.guide
    data_options = _parse_set(args.data_options)
    # Data-root and binarization flags apply to the loaders that take them.
    accepted = None
    if not args.dataset.endswith(".csv") and args.dataset in DATASETS:
        accepted, _ = signature_options(DATASETS[args.dataset], ("split", "device"))
    for key, value in (("root", args.data_root), ("binarize", args.binarize)):
        if accepted is not None and key in accepted and key not in data_options:
            if key == "root" and value is None:
                continue
            data_options[key] = value
    fit = dict(
        num_particles=args.num_particles, vectorize_particles=args.vectorize_particles,
        epochs=args.epochs, max_steps=args.max_steps, batch_size=args.batch_size, lr=args.lr,
        optimizer=args.optimizer, progress=not args.no_progress,
    )
    if args.skip_nonfinite:
        fit["skip_nonfinite"] = True
    if args.no_capture:
        fit["capture"] = False
    elbo_options = _parse_set(args.elbo_options)
    if elbo_options:
        fit["elbo_options"] = elbo_options
    optimizer_options = _parse_set(args.optimizer_options)
    if optimizer_options:
        fit["optimizer_options"] = optimizer_options
    for key in ("lr_schedule", "early_stopping", "clip_grad", "devices", "num_nodes",
                "strategy", "accelerator"):
        if getattr(args, key) is not None:
            fit[key] = getattr(args, key)
    if args.elbo is not None:
        fit["elbo"] = args.elbo
    metrics = tuple(_metric_names(args.metrics)) if args.metrics else DEFAULT_METRICS
    return RunSpec(
        model=args.model, model_options=options, dataset=args.dataset,
        dataset_options=data_options, train_size=args.train_size, test_size=args.test_size,
        method=args.method,
        method_options={"max_iter": args.em_max_iter} if args.method == "em" else {},
        fit=fit if args.method == "svi" else {}, seed=args.seed,
        eval=EvalSettings(num_samples=args.eval_samples, max_points=args.eval_points,
                          **_eval_overrides(args)),
        metrics=metrics, device=args.device, out=args.out,
    )


def _train(args: argparse.Namespace) -> int:
    from pyrovae.pipeline import run

    from pyrovae.infer.callbacks import MLflowLogger, TensorBoardLogger

    spec = build_spec(args)
    callbacks: List[Any] = []
    if args.tensorboard is not None:
        callbacks.append(TensorBoardLogger(args.tensorboard))
    mlflow_logger = None
    if args.mlflow is not None:
        mlflow_logger = MLflowLogger(args.mlflow or None, experiment=args.mlflow_experiment,
                                     run_name=Path(args.out).name, params={"model": args.model,
                                     "dataset": args.dataset, "seed": args.seed},
                                     end_with_fit=False)
        callbacks.append(mlflow_logger)
    try:
        result = run(spec, resume=args.resume, overwrite=args.overwrite, callbacks=callbacks)
    except KeyboardInterrupt:
        if mlflow_logger is not None:
            mlflow_logger.finish(failed=True)
        print(f"\ninterrupted; the last completed epoch is saved in {args.out}. "
              f"Continue with the same command plus --resume.", file=sys.stderr)
        return 130
    except BaseException:
        if mlflow_logger is not None:
            mlflow_logger.finish(failed=True)
        raise
    if mlflow_logger is not None:
        mlflow_logger.finish(metrics=result.metrics, artifact_dir=result.out)
    if result.out is None and spec.out is not None:
        return 0  # a rank > 0 of a multi-process run: rank 0 wrote the folder and reports
    _report(result)
    return 0


def _report(result) -> None:
    if len(result.history):
        print(result.history.tail(5).to_string(index=False))
    if result.evaluation is not None:
        print(result.evaluation.to_frame().T.to_string(header=False))
    for note in result.notes:
        print(f"note: {note}")
    if result.latents is not None:
        print(f"active units: {result.latents.active_units} of {len(result.latents.dims)}")
    if result.gap is not None:
        gap = result.gap.summary()
        print(f"approximation gap: {gap['approximation_gap']:.3f} nats, amortization gap: "
              f"{gap['amortization_gap']:.3f} nats ({gap['gap_points']} points)")
    names = ", ".join(path.name for path in result.files if path.suffix == ".csv")
    print(f"wrote {names} in {result.out} and {len(result.figures)} figures:")
    for path in result.figures:
        print(f"  {path}")


def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="evaluate a trained run folder again",
                       description="Evaluate the trained model of a run folder again and "
                       "rewrite its metrics.csv and figures.")
    p.add_argument("run", help="run folder written by pyrovae train")
    p.add_argument("--num-samples", type=COUNT, default=None,
                   help="K for the importance-sampled log-likelihood (default: the run's)")
    p.add_argument("--eval-points", type=POSITIVE, default=None,
                   help="evaluate on the first N test points (default: the run's)")
    p.add_argument("--seed", type=COUNT, default=0, help="seeds the evaluation draws")
    _add_metric_options(p, "the run's own")


def _eval(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from pyrovae.pipeline import read_spec, run

    spec = read_spec(args.run)
    settings = {"seed": args.seed}
    if args.num_samples is not None:
        settings["num_samples"] = args.num_samples
    if args.eval_points is not None:
        settings["max_points"] = args.eval_points
    settings.update(_eval_overrides(args))
    spec = replace(spec, out=args.run, eval=replace(spec.eval, **settings))
    if args.metrics:
        spec = replace(spec, metrics=tuple(_metric_names(args.metrics)))
    _report(run(spec, evaluate_only=True))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="pyrovae", description="Latent-variable generative models on Pyro: "
                     "train, evaluate and benchmark them.")
    parser.add_argument("--version", action="version", version=f"pyrovae {__version__}")
    parser.add_argument("--debug", action="store_true",
                        help="show the full traceback when a command fails")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _add_train(sub)
    _add_eval(sub)
    add_bench_commands(sub)
    return parser


HANDLERS = {"train": _train, "eval": _eval}
# Errors that carry a message meant for the user.
USER_ERRORS = (ValueError, TypeError, KeyError, FileNotFoundError, FloatingPointError,
               FolderLockedError, PermissionError, NotADirectoryError, IsADirectoryError)


def _one_line(text: str) -> str:
    return " ".join(text.split())


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as done:  # --help, --version, or a usage error already printed
        return done.code if isinstance(done.code, int) else 2
    handler = HANDLERS.get(args.command) or getattr(args, "handler", None)
    try:
        return handler(args)
    except KeyboardInterrupt:
        print(f"pyrovae {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001  (every failure ends in one line; see --debug)
        if args.debug:
            traceback.print_exc()
        if isinstance(err, USER_ERRORS):
            # KeyError's str() adds quotes; an OSError's (or UnicodeError's)
            # args[0] is a bare number or codec name, its str() the sentence.
            message = str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)
        else:
            first = str(err).strip().splitlines()[0] if str(err).strip() else ""
            message = (f"unexpected {type(err).__name__}: {first} (rerun with --debug for the "
                       "traceback and report it)")
        print(f"pyrovae {args.command}: error: {_one_line(message)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
