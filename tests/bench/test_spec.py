"""Suite files: validation errors name the key and the allowed values; the
grid crosses into cells with stable keys; overrides; the shipped suites load."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from pyrovae.bench.spec import (
    METRICS,
    SpecError,
    apply_overrides,
    cell_key,
    load_suite,
    parse_suite,
)
from pyrovae.infer.objectives import ELBOS
from pyrovae.models import MODELS

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"

BASE = {
    "suite": {"name": "t", "metrics": ["elbo", "iwae"], "eval": {"num_samples": 10}},
    "grid": [
        {
            "models": [{"name": "vae", "z_dim": 4, "hidden": [16]}],
            "objectives": ["Trace_ELBO", {"name": "IWAE", "num_particles": [1, 5]}],
            "datasets": [{"name": "mnist", "train_size": 100, "test_size": 50}],
            "budgets": [{"steps": 5}, {"seconds": 1.5}],
            "seeds": [0, 1, 2],
            "fit": {"batch_size": 20, "lr": 1e-3},
        }
    ],
}


def doc(**changes):
    """BASE with grid[0] keys replaced (None deletes)."""
    d = copy.deepcopy(BASE)
    for k, v in changes.items():
        if v is None:
            d["grid"][0].pop(k, None)
        else:
            d["grid"][0][k] = v
    return d


def problems(raw) -> str:
    with pytest.raises(SpecError) as info:
        parse_suite(raw, "test.toml")
    return str(info.value)


# -- the grid ------------------------------------------------------------------------


def test_cells_are_the_cross_product():
    suite = parse_suite(BASE)
    cells = suite.cells()
    # 1 model x (1 + 2) objective/particle pairs x 1 data set x 2 budgets x 3 seeds
    assert len(cells) == 3 * 2 * 3
    assert len({c.key for c in cells}) == len(cells)
    assert {(c.objective, c.num_particles) for c in cells} == {
        ("Trace_ELBO", 1), ("IWAE", 1), ("IWAE", 5)
    }
    assert {c.budget_label for c in cells} == {"steps=5", "seconds=1.5"}
    c = cells[0]
    assert c.guide == "mlp"  # the VAE's default encoder, recorded
    assert c.fit_options == {"batch_size": 20, "lr": 1e-3}
    assert c.eval.num_samples == 10 and c.eval.max_points == 1000  # default kept


def test_key_hashes_the_configuration_but_not_labels():
    a = parse_suite(BASE).cells()[0]
    renamed = copy.deepcopy(BASE)
    renamed["suite"]["name"] = "other"
    renamed["grid"][0]["name"] = "renamed"
    b = parse_suite(renamed).cells()[0]
    assert a.key == b.key
    assert cell_key(a.config()) == a.key
    changed = copy.deepcopy(BASE)
    changed["grid"][0]["fit"]["lr"] = 2e-3
    assert parse_suite(changed).cells()[0].key != a.key
    more_samples = copy.deepcopy(BASE)
    more_samples["suite"]["eval"]["num_samples"] = 11
    assert parse_suite(more_samples).cells()[0].key != a.key


def test_em_and_sklearn_cells_ignore_objectives_and_budgets():
    raw = doc(
        methods=["svi", "em", "sklearn"],
        models=[{"name": "fa", "z_dim": 2}],
        datasets=[{"name": "synthetic-fa", "n": 100}],
        seeds=[0, 1],
    )
    cells = parse_suite(raw).cells()
    by_method = {m: [c for c in cells if c.method == m] for m in ("svi", "em", "sklearn")}
    assert len(by_method["svi"]) == 3 * 2 * 2
    assert len(by_method["em"]) == len(by_method["sklearn"]) == 2  # one per seed
    assert all(c.objective == "" and c.budget == {} for c in by_method["em"])


def test_duplicate_cells_across_grids_run_once():
    raw = copy.deepcopy(BASE)
    raw["grid"].append(copy.deepcopy(raw["grid"][0]))
    assert len(parse_suite(raw).cells()) == len(parse_suite(BASE).cells())


# -- errors name the key and the allowed values -------------------------------------


def test_unknown_keys_are_listed_with_the_allowed_keys():
    raw = copy.deepcopy(BASE)
    raw["suite"]["nmae"] = "x"
    raw["grid"][0]["objectivs"] = []
    raw["extra"] = 1
    msg = problems(raw)
    assert "suite.nmae: unknown key 'nmae'; allowed keys: description, eval, metrics, name" in msg
    assert "grid[0].objectivs: unknown key" in msg and "objectives" in msg
    assert "<top level>.extra: unknown key 'extra'; allowed keys: grid, suite" in msg


def test_unknown_names_list_the_registry():
    msg = problems(doc(
        models=[{"name": "vea"}],
        objectives=["Trace_ELBOO"],
        datasets=["mnits"],
        guides=["mpl"],
    ))
    assert f"grid[0].models[0].name: unknown model 'vea'; allowed: " in msg
    assert all(name in msg for name in MODELS)
    assert "grid[0].objectives[0].name: unknown objective 'Trace_ELBOO'" in msg
    assert all(name in msg for name in ELBOS)
    assert "grid[0].datasets[0].name: unknown data set 'mnits'" in msg
    assert "grid[0].guides[0]: unknown guide 'mpl'; allowed: " in msg and "linear" in msg


def test_options_are_checked_against_signatures():
    msg = problems(doc(
        models=[{"name": "vae", "z_dimm": 3}],
        datasets=[{"name": "mnist", "binarise": "dynamic"}],
        objectives=[{"name": "Trace_ELBO", "alpha": 0.5}],
    ))
    assert "grid[0].models[0].z_dimm: unknown key 'z_dimm'; allowed keys: " in msg
    assert "hidden" in msg and "likelihood" in msg
    assert "grid[0].datasets[0].binarise: unknown key" in msg and "binarize" in msg
    assert "grid[0].objectives[0]: the options ['alpha'] do not fit objective 'Trace_ELBO'" in msg


def test_builder_functions_expose_their_class_options():
    # "gmm" is a builder function passing **options to GaussianMixture.
    msg = problems(doc(models=[{"name": "gmm", "K": 2, "covariances": "full"}]))
    assert "grid[0].models[0].covariances: unknown key" in msg and "covariance" in msg


def test_bad_values():
    raw = doc(
        budgets=[{"steps": 0}, {"minutes": 3}, {"seconds": -1}, "fast"],
        seeds=[-1, "a"],
        objectives=[{"name": "IWAE", "num_particles": [0, 2.5]}],
        fit={"lr": -1.0, "epochs": 3},
        methods=["svi", "mcmc"],
    )
    raw["suite"]["metrics"] = ["elbo", "accuracy"]
    raw["suite"]["eval"] = {"num_samples": -5, "grad_draws": "many"}
    msg = problems(raw)
    expected = [
        "grid[0].budgets[0].steps: must be an integer >= 1, got 0",
        "grid[0].budgets[1].minutes: unknown key 'minutes'; allowed keys: epochs, seconds, steps",
        "grid[0].budgets[2].seconds: must be a finite number > 0, got -1",
        "grid[0].budgets[3]: must be a table",
        "grid[0].seeds[0]: must be an integer >= 0, got -1",
        "grid[0].seeds[1]: must be an integer >= 0, got 'a'",
        "grid[0].objectives[0].num_particles[0]: must be an integer >= 1, got 0",
        "grid[0].objectives[0].num_particles[1]: must be an integer >= 1, got 2.5",
        "grid[0].fit.epochs: unknown key 'epochs'",  # budgets decide it
        "grid[0].fit.lr: must be a number > 0, got -1.0",
        "grid[0].methods[1]: unknown method 'mcmc'; allowed: em, sklearn, svi",
        f"suite.metrics[1]: unknown metric 'accuracy'; allowed: {', '.join(sorted(METRICS))}",
        "suite.eval.num_samples: must be an integer >= 0, got -5",
        "suite.eval.grad_draws: must be an integer >= 1, got 'many'",
    ]
    for line in expected:
        assert line in msg, line


def test_option_values_are_type_checked_with_the_key_named():
    # Each of these used to pass validation and fail in every cell.
    raw = doc(
        models=[{"name": "vae", "z_dim": 2.5, "hidden": [0], "likelihood": 3},
                {"name": "gmm", "K": 0, "covariance": 1}],
        fit={"batch_size": "64", "lr": -1, "optimizer": 5},
        objectives=[{"name": "IWAE", "num_particles": [2], "estimator": 1},
                    {"name": "RenyiELBO", "alpha": "half"},
                    {"name": "BetaELBO", "beta": "1", "warmup_steps": 2.5}],
        datasets=[{"name": "synthetic-fa", "x_dim": 0, "noise_range": 0.3},
                  {"name": "faithful", "standardize": "yes", "test_fraction": "0.2"}],
    )
    with pytest.raises(SpecError) as info:
        parse_suite(raw, "test.toml")
    expected = [
        "grid[0].models[0].z_dim: must be an integer >= 1, got 2.5",
        "grid[0].models[0].hidden[0]: must be an integer >= 1, got 0",
        "grid[0].models[0].likelihood: must be a string, got 3",
        "grid[0].models[1].K: must be an integer >= 1, got 0",
        "grid[0].models[1].covariance: must be a string, got 1",  # the class behind the builder
        "grid[0].fit.batch_size: must be an integer >= 1, got '64'",
        "grid[0].fit.lr: must be a number > 0, got -1",
        "grid[0].fit.optimizer: must be a string, got 5",
        "grid[0].objectives[0].estimator: must be a string, got 1",
        "grid[0].objectives[1].alpha: must be a number, got 'half'",  # Pyro: from the default
        "grid[0].objectives[2].beta: must be a number, got '1'",
        "grid[0].objectives[2].warmup_steps: must be an integer, got 2.5",
        "grid[0].datasets[0].x_dim: must be an integer >= 1, got 0",
        "grid[0].datasets[0].noise_range: must be a list of numbers, got 0.3",
        "grid[0].datasets[1].standardize: must be true or false, got 'yes'",
        "grid[0].datasets[1].test_fraction: must be a number, got '0.2'",
    ]
    assert [line for line in expected if line not in info.value.problems] == []
    # every problem in one error, each named once
    assert len(info.value.problems) == len(set(info.value.problems)) == len(expected)


def test_well_typed_values_pass():
    ok = doc(
        models=[{"name": "vae", "z_dim": 2, "hidden": [8, 4], "scale": 0.5},  # Union[str, float]
                {"name": "vae", "z_dim": 2, "scale": "learned"}],
        fit={"batch_size": 64, "lr": 1},  # an integer is a number
        objectives=[{"name": "RenyiELBO", "alpha": 0.5, "num_particles": [2]},
                    {"name": "TraceEnum_ELBO", "max_plate_nesting": 1}],
        datasets=[{"name": "synthetic-fa", "noise_range": [0.1, 1]}],
    )
    assert len(parse_suite(ok).cells()) == 2 * 2 * 2 * 3  # models, objectives, budgets, seeds


def test_em_and_sklearn_values_are_type_checked():
    raw = doc(methods=["svi", "em", "sklearn"], models=[{"name": "fa", "z_dim": 2}],
              datasets=["synthetic-fa"], em={"max_iter": 0, "tol": "small"},
              sklearn={"max_iter": 2.5, "svd_method": "lapack"})
    msg = problems(raw)
    assert "grid[0].em.max_iter: must be an integer >= 1, got 0" in msg
    assert "grid[0].em.tol: must be a number, got 'small'" in msg
    assert "grid[0].sklearn.max_iter: The 'max_iter' parameter of FactorAnalysis must be" in msg
    assert "svd_method" not in msg
    # a builder's class (gmm -> GaussianMixture) has its fit_em options checked too
    msg = problems(doc(methods=["em"], models=[{"name": "gmm", "K": 2}], datasets=["faithful"],
                       em={"n_init": 1.5, "max_iterr": 3}))
    assert "grid[0].em.n_init: must be an integer >= 1, got 1.5" in msg
    assert "grid[0].em.max_iterr: unknown key" in msg


def test_required_parts():
    assert "suite: a [suite] table" in problems({"grid": BASE["grid"]})
    assert "grid: at least one [[grid]] table is required" in problems({"suite": {"name": "x"}})
    assert "grid[0].models: is required" in problems(doc(models=None))
    assert "grid[0].budgets: is required" in problems(doc(budgets=None))


def test_method_constraints():
    msg = problems(doc(methods=["sklearn"]))
    assert "method 'sklearn' has no counterpart of model 'vae'; models with one: fa, gmm, ppca" in msg
    msg = problems(doc(methods=["em"]))
    assert "method 'em' needs a model with a fit_em method; 'vae' has none" in msg
    msg = problems(doc(models=[{"name": "vae", "encoder": "mlp"}], guides=["mlp"]))
    assert "sets encoder itself" in msg


def test_toml_syntax_error_is_a_spec_error(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[suite\nname = 1\n")
    with pytest.raises(SpecError, match="not valid TOML"):
        load_suite(path)


# -- overrides ---------------------------------------------------------------------------


def test_overrides():
    raw = copy.deepcopy(BASE)
    raw["grid"].append(copy.deepcopy(raw["grid"][0]))
    out = apply_overrides(raw, [
        "grid.fit.lr=0.5", "grid.1.seeds=[7]", "suite.eval.num_samples=3",
        "grid.budgets=[{epochs = 2}]", "grid.device=cuda",
    ])
    assert [g["fit"]["lr"] for g in out["grid"]] == [0.5, 0.5]
    assert out["grid"][0]["seeds"] == [0, 1, 2] and out["grid"][1]["seeds"] == [7]
    assert out["suite"]["eval"]["num_samples"] == 3
    assert out["grid"][0]["budgets"] == [{"epochs": 2}]
    assert out["grid"][1]["device"] == "cuda"  # a bare word is a string
    assert raw["grid"][0]["fit"]["lr"] == 1e-3  # the input is not modified
    with pytest.raises(ValueError, match="must look like key=value"):
        apply_overrides(raw, ["grid.fit.lr"])
    with pytest.raises(ValueError, match="grid 5 does not exist"):
        apply_overrides(raw, ["grid.5.seeds=[1]"])


# -- the shipped suites ------------------------------------------------------------------


@pytest.mark.parametrize("name", ["quick", "elbo-estimators", "vae-mnist", "classical"])
def test_shipped_suites_validate(name):
    suite = load_suite(BENCHMARKS / f"{name}.toml")
    cells = suite.cells()
    assert suite.name == name and cells
    assert len({c.key for c in cells}) == len(cells)


def test_quick_suite_covers_every_trainable_objective():
    cells = load_suite(BENCHMARKS / "quick.toml").cells()
    used = {c.objective for c in cells}
    # JIT variants compile the same objectives; they are left to longer suites.
    assert {n for n in ELBOS if not n.startswith("Jit")} <= used
    assert {"svi", "em", "sklearn"} <= {c.method for c in cells}
