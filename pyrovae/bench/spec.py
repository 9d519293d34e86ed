"""Benchmark suite files: loading, validation and the grid of cells.

A suite is a TOML file with one ``[suite]`` table and one or more ``[[grid]]``
tables. Each grid crosses its lists -- methods x models x guides x objectives
(each with its list of particle counts) x data sets x budgets x seeds -- into
*cells*, one training run each. The format is documented with examples in
``benchmarks/README.md``; in short::

    [suite]
    name = "quick"
    metrics = ["elbo", "iwae", "exact", "latents"]

    [suite.eval]
    num_samples = 100          # K of the importance-sampled log-likelihood

    [[grid]]
    models = [{ name = "vae", z_dim = 10, hidden = [200] }]
    objectives = ["Trace_ELBO", { name = "IWAE", num_particles = [1, 5] }]
    datasets = [{ name = "mnist", train_size = 1000, test_size = 500 }]
    budgets = [{ steps = 50 }]
    seeds = [0, 1]

    [grid.fit]
    batch_size = 100

Every name is checked against its registry (``MODELS``, ``GUIDES``,
``ELBOS``, ``DATASETS``) and every option against the signature of the thing
it configures, so a typo fails before any training starts, with one error
that lists every problem, the key where it sits and the allowed values.

A cell is identified by a hash of its full configuration (everything that can
change its numbers, nothing that only labels it), which is what lets an
interrupted suite resume without redoing finished cells.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import itertools
import json
import math
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the same parser, from PyPI
    import tomli as tomllib

from pyrovae.pipeline import METRICS, SKLEARN_MODELS, EvalSettings, sklearn_estimator
from pyrovae.registry import (OptionType, builder_options, option_types, signature_options,
                              type_hints, value_problems)

SUITE_KEYS = ("name", "description", "metrics", "eval")
# A suite scores what a run can (the pipeline's METRICS); by default the
# three that every cell of the earlier suites had, so their cells keep their keys.
DEFAULT_METRICS = ("elbo", "iwae", "exact")
GRID_KEYS = (
    "name", "methods", "models", "guides", "objectives", "datasets", "budgets", "seeds",
    "fit", "em", "sklearn", "device",
)
METHODS = ("svi", "em", "sklearn")
OBJECTIVE_KEYS = ("name", "num_particles", "vectorize_particles")
DATASET_KEYS = ("name", "train_size", "test_size", "train_split", "test_split")
BUDGET_KEYS = ("steps", "epochs", "seconds")
# Options of a data set loader that the runner sets itself.
RUNNER_DATASET_OPTIONS = ("split", "device")
# FitConfig fields that the grid axes and the runner decide; [grid.fit] may set the rest.
RUNNER_FIT_FIELDS = (
    "elbo", "num_particles", "vectorize_particles", "elbo_options", "epochs", "max_steps",
    "max_seconds", "seed", "eval_every", "eval_size", "checkpoint_dir", "resume", "progress",
    # Each cell trains in one process (of the runner's own pool).
    "devices", "num_nodes", "strategy", "accelerator",
)


@dataclass
class Cell:
    """One fully specified run: what is trained, on what, for how long, and how
    it is scored. ``key`` hashes everything but the labels."""

    suite: str
    grid: str
    method: str
    model: str
    model_options: Dict[str, Any]
    guide: str
    objective: str
    num_particles: int
    vectorize_particles: bool
    objective_options: Dict[str, Any]
    dataset: str
    dataset_options: Dict[str, Any]
    train_size: Optional[int]
    test_size: Optional[int]
    train_split: str
    test_split: str
    budget: Dict[str, Union[int, float]]
    seed: int
    fit_options: Dict[str, Any]
    method_options: Dict[str, Any]
    device: str
    metrics: Tuple[str, ...]
    eval: EvalSettings

    LABEL_FIELDS = ("suite", "grid")

    def config(self) -> Dict[str, Any]:
        """Everything that decides the cell's numbers (the hashed part)."""
        d = self.to_dict()
        for name in self.LABEL_FIELDS:
            d.pop(name)
        return d

    def to_dict(self) -> Dict[str, Any]:
        d = {f.name: copy.deepcopy(getattr(self, f.name)) for f in fields(self)}
        d["metrics"] = list(self.metrics)
        d["eval"] = self.eval.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Cell":
        d = dict(d)
        d["metrics"] = tuple(d["metrics"])
        d["eval"] = EvalSettings(**d["eval"])
        return cls(**d)

    @property
    def key(self) -> str:
        return cell_key(self.config())

    @property
    def budget_label(self) -> str:
        return budget_label(self.budget)


def canonical_json(obj: Any) -> str:
    """JSON with sorted keys and no spaces: equal configs give equal strings."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def cell_key(config: Mapping[str, Any]) -> str:
    return hashlib.sha256(canonical_json(config).encode()).hexdigest()[:16]


def budget_label(budget: Mapping[str, Any]) -> str:
    if not budget:
        return "converged"
    return ",".join(f"{k}={budget[k]:g}" for k in BUDGET_KEYS if k in budget)


@dataclass
class Grid:
    """One ``[[grid]]`` table after validation: lists to be crossed."""

    name: str
    methods: List[str]
    models: List[Tuple[str, Dict[str, Any]]]
    guides: List[Optional[str]]
    objectives: List[Tuple[str, List[int], bool, Dict[str, Any]]]
    datasets: List[Dict[str, Any]]
    budgets: List[Dict[str, Union[int, float]]]
    seeds: List[int]
    fit: Dict[str, Any]
    em: Dict[str, Any]
    sklearn: Dict[str, Any]
    device: str


@dataclass
class Suite:
    """A validated suite: its settings and grids; ``cells()`` crosses them."""

    name: str
    description: str
    metrics: Tuple[str, ...]
    eval: EvalSettings
    grids: List[Grid]
    source: str = "<suite>"
    text: str = ""  # the TOML as read, kept with the results for provenance
    overrides: List[str] = field(default_factory=list)

    def cells(self) -> List[Cell]:
        """Every cell of every grid, in file order, without duplicates."""
        out: Dict[str, Cell] = {}
        for grid in self.grids:
            for cell in _grid_cells(self, grid):
                out.setdefault(cell.key, cell)
        return list(out.values())


class SpecError(ValueError):
    """A suite file that cannot be run; the message lists every problem."""

    def __init__(self, source: str, problems: Sequence[str]) -> None:
        self.source = source
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"invalid benchmark suite {source}:\n{lines}")


# -- loading ---------------------------------------------------------------------


def load_suite(path: Union[str, Path], overrides: Sequence[str] = ()) -> Suite:
    """Read, override and validate a suite file.

    Args:
        path: the TOML file.
        overrides: ``"dotted.key=value"`` strings applied to the parsed file
            before validation (see :func:`apply_overrides`).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no suite file at {path}")
    text = path.read_text()
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise SpecError(str(path), [f"not valid TOML: {err}"]) from None
    suite = parse_suite(apply_overrides(raw, overrides), source=str(path))
    suite.text = text
    suite.overrides = list(overrides)
    return suite


def _parse_value(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text  # a bare word such as cuda reads as the string it spells


def apply_overrides(raw: Mapping[str, Any], overrides: Sequence[str]) -> Dict[str, Any]:
    """Set values in a parsed suite from ``"dotted.key=value"`` strings.

    The value is read as a TOML value (``3``, ``1e-3``, ``[1, 5]``,
    ``{ epochs = 100 }``, ``"text"``); anything else is taken as a string.
    ``grid.KEY`` sets KEY in every ``[[grid]]`` table, ``grid.N.KEY`` in the
    N-th only (counting from 0). Example: ``grid.budgets=[{epochs=3280}]``.
    """
    doc = copy.deepcopy(dict(raw))
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like key=value, e.g. grid.fit.lr=1e-3")
        dotted, value_text = item.split("=", 1)
        parts = [p for p in dotted.strip().split(".") if p]
        if not parts:
            raise ValueError(f"override {item!r} has an empty key")
        value = _parse_value(value_text.strip())
        targets: List[Dict[str, Any]]
        if parts[0] == "grid":
            grids = doc.get("grid")
            if not isinstance(grids, list) or not grids:
                raise ValueError(f"override {item!r}: the suite has no [[grid]] tables")
            if len(parts) > 1 and parts[1].isdigit():
                index = int(parts[1])
                if index >= len(grids):
                    raise ValueError(
                        f"override {item!r}: grid {index} does not exist (the suite has "
                        f"{len(grids)} grids, numbered from 0)"
                    )
                targets, parts = [grids[index]], parts[2:]
            else:
                targets, parts = list(grids), parts[1:]
        else:
            targets = [doc]
        if not parts:
            raise ValueError(f"override {item!r} names a table, not a key inside it")
        for target in targets:
            node = target
            for part in parts[:-1]:
                node = node.setdefault(part, {})
                if not isinstance(node, dict):
                    raise ValueError(f"override {item!r}: {part!r} is not a table")
            node[parts[-1]] = value
    return doc


# -- validation --------------------------------------------------------------------


class _Problems:
    def __init__(self) -> None:
        self.items: List[str] = []

    def add(self, where: str, message: str) -> None:
        item = f"{where}: {message}"
        if item not in self.items:  # a grid with two models checks shared tables twice
            self.items.append(item)


def _allowed(values: Iterable[str]) -> str:
    return ", ".join(sorted(values, key=str.lower)) or "(none)"


def _check_keys(p: _Problems, where: str, table: Mapping[str, Any], allowed: Iterable[str]) -> None:
    allowed = list(allowed)
    for key in table:
        if key not in allowed:
            p.add(f"{where}.{key}", f"unknown key {key!r}; allowed keys: {_allowed(allowed)}")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _as_list(p: _Problems, where: str, value: Any, default: Optional[list] = None) -> list:
    if value is None:
        if default is None:
            p.add(where, "is required (a non-empty list)")
            return []
        return list(default)
    if not isinstance(value, list):
        value = [value]
    if not value:
        p.add(where, "must be a non-empty list")
    return value


def _named(p: _Problems, where: str, entry: Any) -> Tuple[Optional[str], Dict[str, Any]]:
    """``"name"`` or ``{ name = "...", option = ... }`` -> (name, options)."""
    if isinstance(entry, str):
        return entry, {}
    if isinstance(entry, dict):
        name = entry.get("name")
        if not isinstance(name, str):
            p.add(f"{where}.name", "is required: a table here needs name = \"...\"")
            return None, {}
        return name, {k: v for k, v in entry.items() if k != "name"}
    p.add(where, f"must be a name or a table with a name, got {entry!r}")
    return None, {}


def _check_values(p: "_Problems", where: str, options: Mapping[str, Any],
                  option_types: Mapping[str, Optional[OptionType]]) -> None:
    """Add a problem for every option whose value does not fit its type."""
    for key, message in value_problems(options, option_types):
        p.add(f"{where}.{key}", message)


def _model_class(entry: Any) -> Optional[type]:
    """The class a ``MODELS`` entry builds: itself, or a builder's return annotation."""
    if isinstance(entry, type):
        return entry
    target = type_hints(entry).get("return")
    return target if isinstance(target, type) else None


def _check_sklearn_values(p: "_Problems", where: str, estimator: type,
                          options: Mapping[str, Any]) -> None:
    """scikit-learn states the type and range of each parameter; ask it, one
    option at a time, so that every bad key is named."""
    if not hasattr(estimator, "_validate_params"):  # scikit-learn < 1.2: the defaults' types
        _check_values(p, where, options, option_types(estimator))
        return
    for key, value in options.items():
        try:
            est = estimator()
            est.set_params(**{key: value})
            est._validate_params()
        except (ValueError, TypeError) as err:
            p.add(f"{where}.{key}", str(err))


def _registries():
    # Imported here so that ``pyrovae.bench`` loads without the whole package
    # and so the registries are as full as the installed extensions make them.
    # Each subpackage fills its own registry when imported (``pyrovae.infer``
    # also registers pyrovae's own objectives in ``ELBOS``).
    from pyrovae.data import DATASETS
    from pyrovae.guides import GUIDES
    from pyrovae.infer import ELBOS
    from pyrovae.models import MODELS

    return MODELS, GUIDES, ELBOS, DATASETS


def _parse_eval(p: _Problems, raw: Any) -> EvalSettings:
    settings = EvalSettings()
    if raw is None:
        return settings
    if not isinstance(raw, dict):
        p.add("suite.eval", "must be a table")
        return settings
    allowed = [f.name for f in fields(EvalSettings)]
    _check_keys(p, "suite.eval", raw, allowed)
    minimum = {"num_samples": 0, "seed": 0}
    for key, value in raw.items():
        if key not in allowed:
            continue
        low = minimum.get(key, 1)
        if not _is_int(value) or value < low:
            p.add(f"suite.eval.{key}", f"must be an integer >= {low}, got {value!r}")
        else:
            setattr(settings, key, value)
    return settings


def parse_suite(raw: Mapping[str, Any], source: str = "<suite>") -> Suite:
    """Validate a parsed suite document; raise :class:`SpecError` listing every problem."""
    MODELS, GUIDES, ELBOS, DATASETS = _registries()
    p = _Problems()
    _check_keys(p, "<top level>", raw, ("suite", "grid"))
    head = raw.get("suite")
    if not isinstance(head, dict):
        p.add("suite", "a [suite] table with at least name = \"...\" is required")
        head = {}
    _check_keys(p, "suite", head, SUITE_KEYS)
    name = head.get("name")
    if not isinstance(name, str) or not name:
        p.add("suite.name", f"must be a non-empty string, got {name!r}")
        name = "suite"
    description = head.get("description", "")
    if not isinstance(description, str):
        p.add("suite.description", "must be a string")
        description = ""
    metrics = _as_list(p, "suite.metrics", head.get("metrics"), list(DEFAULT_METRICS))
    for i, m in enumerate(metrics):
        if m not in METRICS:
            p.add(f"suite.metrics[{i}]", f"unknown metric {m!r}; allowed: {_allowed(METRICS)}")
    eval_settings = _parse_eval(p, head.get("eval"))

    grids_raw = raw.get("grid")
    if isinstance(grids_raw, dict):
        grids_raw = [grids_raw]
    if not isinstance(grids_raw, list) or not grids_raw:
        p.add("grid", "at least one [[grid]] table is required")
        grids_raw = []
    grids = []
    for gi, graw in enumerate(grids_raw):
        where = f"grid[{gi}]"
        if not isinstance(graw, dict):
            p.add(where, "must be a table")
            continue
        grids.append(_parse_grid(p, where, gi, graw, MODELS, GUIDES, ELBOS, DATASETS))
    if p.items:
        raise SpecError(source, p.items)
    suite = Suite(
        name=name, description=description, metrics=tuple(dict.fromkeys(metrics)),
        eval=eval_settings, grids=grids, source=source,
    )
    if not suite.cells():
        raise SpecError(source, ["the grids produce no cells"])
    return suite


def _parse_grid(p, where, index, graw, MODELS, GUIDES, ELBOS, DATASETS) -> Grid:
    _check_keys(p, where, graw, GRID_KEYS)
    gname = graw.get("name", f"grid{index}")
    if not isinstance(gname, str):
        p.add(f"{where}.name", "must be a string")
        gname = f"grid{index}"

    methods = _as_list(p, f"{where}.methods", graw.get("methods"), ["svi"])
    for i, m in enumerate(methods):
        if m not in METHODS:
            p.add(f"{where}.methods[{i}]", f"unknown method {m!r}; allowed: {_allowed(METHODS)}")
    if "sklearn" in methods and importlib.util.find_spec("sklearn") is None:
        p.add(f"{where}.methods", "method 'sklearn' needs scikit-learn: "
              "pip install 'pyrovae[sklearn]' (or scikit-learn)")

    models = []
    for i, entry in enumerate(_as_list(p, f"{where}.models", graw.get("models"))):
        mw = f"{where}.models[{i}]"
        mname, options = _named(p, mw, entry)
        if mname is None:
            continue
        if mname not in MODELS:
            p.add(f"{mw}.name", f"unknown model {mname!r}; allowed: {_allowed(MODELS)}")
            continue
        allowed, _ = builder_options(MODELS[mname])
        if allowed is not None:
            _check_keys(p, mw, options, ["name", *allowed])
        _check_values(p, mw, options, option_types(MODELS[mname], skip=("x_dim",)))
        if "sklearn" in methods and mname not in SKLEARN_MODELS:
            p.add(mw, f"method 'sklearn' has no counterpart of model {mname!r}; models "
                  f"with one: {_allowed(SKLEARN_MODELS)}")
        if ("em" in methods and isinstance(MODELS[mname], type)
                and not callable(getattr(MODELS[mname], "fit_em", None))):
            # Builder functions are checked when the model exists, at run time.
            p.add(mw, f"method 'em' needs a model with a fit_em method; {mname!r} has none")
        models.append((mname, options))

    guides: List[Optional[str]] = []
    for i, g in enumerate(_as_list(p, f"{where}.guides", graw.get("guides"), [None])):
        if g is not None and g not in GUIDES:
            p.add(f"{where}.guides[{i}]", f"unknown guide {g!r}; allowed: {_allowed(GUIDES)}")
            continue
        guides.append(g)
    if any(g is not None for g in guides):
        for mname, options in models:
            allowed, _ = builder_options(MODELS[mname])
            if allowed is not None and "encoder" not in allowed:
                p.add(f"{where}.guides", f"model {mname!r} takes no encoder option, so its "
                      "guide cannot be chosen; remove guides or use another model")
            if "encoder" in options:
                p.add(f"{where}.guides", f"model {mname!r} sets encoder itself; set the "
                      "guide in one place only")

    objectives = []
    if "svi" in methods:
        raw_objectives = _as_list(p, f"{where}.objectives", graw.get("objectives"))
    else:
        raw_objectives = _as_list(p, f"{where}.objectives", graw.get("objectives"), [])
    for i, entry in enumerate(raw_objectives):
        ow = f"{where}.objectives[{i}]"
        oname, options = _named(p, ow, entry)
        if oname is None:
            continue
        if oname not in ELBOS:
            p.add(f"{ow}.name", f"unknown objective {oname!r}; allowed: {_allowed(ELBOS)}")
            continue
        particles = _as_list(p, f"{ow}.num_particles", options.pop("num_particles", None), [1])
        for j, k in enumerate(particles):
            if not _is_int(k) or k < 1:
                p.add(f"{ow}.num_particles[{j}]", f"must be an integer >= 1, got {k!r}")
        vectorize = options.pop("vectorize_particles", False)
        if not isinstance(vectorize, bool):
            p.add(f"{ow}.vectorize_particles", f"must be true or false, got {vectorize!r}")
            vectorize = False
        if not all(_is_int(k) and k >= 1 for k in particles):
            continue
        from pyrovae.infer.objectives import make_objective

        try:  # the class the factory builds says the options' types
            objective_types = option_types(type(make_objective(oname, 1, False)))
        except (ValueError, TypeError):
            objective_types = {}
        before = len(p.items)
        _check_values(p, ow, options, objective_types)
        if len(p.items) > before:
            continue
        try:
            make_objective(oname, particles[0], vectorize, **options)
        except (ValueError, TypeError) as err:
            p.add(ow, f"the options {sorted(options)} do not fit objective {oname!r}: {err}")
            continue
        objectives.append((oname, [int(k) for k in particles], vectorize, options))

    datasets = []
    for i, entry in enumerate(_as_list(p, f"{where}.datasets", graw.get("datasets"))):
        dw = f"{where}.datasets[{i}]"
        dname, options = _named(p, dw, entry)
        if dname is None:
            continue
        if dname not in DATASETS:
            p.add(f"{dw}.name", f"unknown data set {dname!r}; allowed: {_allowed(DATASETS)}")
            continue
        spec = {
            "name": dname,
            "train_size": options.pop("train_size", None),
            "test_size": options.pop("test_size", None),
            "train_split": options.pop("train_split", "train"),
            "test_split": options.pop("test_split", "test"),
        }
        for key in ("train_size", "test_size"):
            v = spec[key]
            if v is not None and (not _is_int(v) or v < 1):
                p.add(f"{dw}.{key}", f"must be an integer >= 1, got {v!r}")
        for key in ("train_split", "test_split"):
            if not isinstance(spec[key], str):
                p.add(f"{dw}.{key}", f"must be a string such as 'train' or 'test', got {spec[key]!r}")
        allowed, _ = signature_options(DATASETS[dname], skip=RUNNER_DATASET_OPTIONS)
        if allowed is not None:
            _check_keys(p, dw, options, [*DATASET_KEYS, *allowed])
        else:
            for key in RUNNER_DATASET_OPTIONS:
                if key in options:
                    p.add(f"{dw}.{key}", "is set by the runner; use train_split/test_split "
                          "and the grid's device key instead")
        _check_values(p, dw, options, option_types(DATASETS[dname], skip=RUNNER_DATASET_OPTIONS))
        spec["options"] = options
        datasets.append(spec)

    budgets = []
    svi = "svi" in methods
    raw_budgets = (_as_list(p, f"{where}.budgets", graw.get("budgets")) if svi
                   else _as_list(p, f"{where}.budgets", graw.get("budgets"), []))
    for i, b in enumerate(raw_budgets):
        bw = f"{where}.budgets[{i}]"
        if not isinstance(b, dict) or not b:
            p.add(bw, f"must be a table with one or more of {_allowed(BUDGET_KEYS)}, "
                  "e.g. { steps = 200 } or { seconds = 30 }")
            continue
        _check_keys(p, bw, b, BUDGET_KEYS)
        ok = True
        for key in BUDGET_KEYS:
            if key not in b:
                continue
            v = b[key]
            good = ((_is_number(v) and math.isfinite(v) and v > 0) if key == "seconds"
                    else (_is_int(v) and v >= 1))
            if not good:
                kind = "a finite number > 0" if key == "seconds" else "an integer >= 1"
                p.add(f"{bw}.{key}", f"must be {kind}, got {v!r}")
                ok = False
        if ok and set(b) <= set(BUDGET_KEYS):
            budgets.append(dict(b))

    seeds = _as_list(p, f"{where}.seeds", graw.get("seeds"), [0])
    for i, s in enumerate(seeds):
        if not _is_int(s) or s < 0:
            p.add(f"{where}.seeds[{i}]", f"must be an integer >= 0, got {s!r}")

    fit_opts = graw.get("fit", {})
    if not isinstance(fit_opts, dict):
        p.add(f"{where}.fit", "must be a table")
        fit_opts = {}
    else:
        from pyrovae.infer.fit import FitConfig

        allowed_fit = [f.name for f in fields(FitConfig) if f.name not in RUNNER_FIT_FIELDS]
        _check_keys(p, f"{where}.fit", fit_opts, allowed_fit)
        before = len(p.items)
        _check_values(p, f"{where}.fit", fit_opts, option_types(FitConfig))
        if len(p.items) == before:  # well-typed values: the rules across them
            try:
                FitConfig(**{k: v for k, v in fit_opts.items() if k in allowed_fit})
            except (ValueError, TypeError) as err:
                p.add(f"{where}.fit", str(err))

    method_tables = {}
    for key in ("em", "sklearn"):
        table = graw.get(key, {})
        if not isinstance(table, dict):
            p.add(f"{where}.{key}", "must be a table of options")
            table = {}
        if table and key not in methods:
            p.add(f"{where}.{key}", f"options for method {key!r}, which methods does not list")
        method_tables[key] = table
    em = method_tables["em"]
    if em and "em" in methods:
        for mname, _ in models:
            fit_em = getattr(_model_class(MODELS.get(mname)), "fit_em", None)
            if callable(fit_em):
                allowed, _ = signature_options(fit_em, skip=("x", "data", "seed"))
                if allowed is not None:
                    _check_keys(p, f"{where}.em", em, allowed)
                _check_values(p, f"{where}.em", em,
                              option_types(fit_em, skip=("x", "data", "seed")))
    skl = method_tables["sklearn"]
    if skl and "sklearn" in methods and importlib.util.find_spec("sklearn") is not None:
        for mname, _ in models:
            if mname in SKLEARN_MODELS:
                estimator = sklearn_estimator(mname)
                allowed = [a for a in estimator._get_param_names() if a != "random_state"]
                _check_keys(p, f"{where}.sklearn", skl, allowed)
                _check_sklearn_values(p, f"{where}.sklearn", estimator,
                                      {k: v for k, v in skl.items() if k in allowed})

    device = graw.get("device", "cpu")
    if not isinstance(device, str) or not re.fullmatch(r"cpu|cuda(:\d+)?", device):
        # Whether the machine has the device is checked where the cell runs.
        p.add(f"{where}.device", f"must be 'cpu', 'cuda' or 'cuda:N', got {device!r}")
        device = "cpu"

    return Grid(
        name=gname, methods=methods, models=models, guides=guides, objectives=objectives,
        datasets=datasets, budgets=budgets, seeds=seeds, fit=fit_opts, em=em, sklearn=skl,
        device=device,
    )


def _resolved_guide(model: str, options: Mapping[str, Any], guide: Optional[str]) -> str:
    """The guide a cell really uses, recorded even when the grid leaves it to the model."""
    if guide is not None:
        return guide
    if "encoder" in options:
        return str(options["encoder"])
    MODELS = _registries()[0]
    _, defaults = builder_options(MODELS[model])
    return str(defaults.get("encoder", "model"))


def _grid_cells(suite: Suite, grid: Grid) -> Iterable[Cell]:
    for method, (model, model_opts), data, seed in itertools.product(
        grid.methods, grid.models, grid.datasets, grid.seeds
    ):
        common = dict(
            suite=suite.name, grid=grid.name, method=method, model=model,
            dataset=data["name"], dataset_options=dict(data["options"]),
            train_size=data["train_size"], test_size=data["test_size"],
            train_split=data["train_split"], test_split=data["test_split"],
            seed=seed, device=grid.device, metrics=suite.metrics, eval=suite.eval,
        )
        if method != "svi":
            # EM and scikit-learn fit to convergence; objectives, guides and budgets do not apply.
            yield Cell(
                model_options=dict(model_opts), guide="", objective="", num_particles=0,
                vectorize_particles=False, objective_options={}, budget={},
                fit_options={}, method_options=dict(getattr(grid, method)), **common,
            )
            continue
        for guide, (objective, particles, vectorize, obj_opts), budget in itertools.product(
            grid.guides, grid.objectives, grid.budgets
        ):
            options = dict(model_opts)
            if guide is not None:
                options["encoder"] = guide
            for k in particles:
                yield Cell(
                    model_options=options, guide=_resolved_guide(model, model_opts, guide),
                    objective=objective, num_particles=k, vectorize_particles=vectorize,
                    objective_options=dict(obj_opts), budget=dict(budget),
                    fit_options=dict(grid.fit), method_options={}, **common,
                )
