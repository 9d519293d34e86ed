"""The model contract: capabilities asked through ``capability``, consistent
``sample`` semantics, and the data rule at every model method."""

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from pyrovae.models import (
    CAPABILITIES,
    MODELS,
    VAE,
    FactorAnalysis,
    GaussianMixture,
    LatentModel,
    capability,
    default_elbo,
    num_data,
)

D = 4
METHODS = [name for name, spec in CAPABILITIES.items() if not spec.attribute]

# What each registered family offers; a family missing here is still checked
# against its class by the generic test below.
EXPECTED = {
    "vae": {"sample", "sample_mean", "encode", "reconstruct", "check_data"},
    "conv-vae": {"sample", "sample_mean", "encode", "reconstruct", "check_data"},
    "ladder-vae": {"sample", "sample_mean", "encode", "reconstruct", "check_data"},
    "fa": {"log_marginal", "posterior", "sample", "encode", "reconstruct", "check_data", "fit_em"},
    "ppca": {"log_marginal", "posterior", "sample", "encode", "reconstruct", "check_data", "fit_em"},
    "bayes-fa": {"sample", "check_data"},
    "gmm": {"log_marginal", "posterior", "sample", "encode", "check_data", "fit_em"},
    "bayes-gmm": {"posterior", "sample", "encode", "check_data", "log_predictive"},
}


def build(name, **options):
    torch.manual_seed(0)
    return MODELS[name](D, z_dim=2, **options)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_capability_matches_what_the_class_implements(name):
    model = build(name)
    offered = {c for c in METHODS if capability(model, c) is not None}
    implemented = {c for c in METHODS if callable(getattr(type(model), c, None))}
    assert offered == implemented
    if name in EXPECTED:
        assert offered == EXPECTED[name]
    for c in offered:  # the bound method itself
        assert capability(model, c) == getattr(model, c)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_sample_returns_draws_of_shape_n_by_d(name):
    model = build(name)
    x = model.sample(7, generator=torch.Generator().manual_seed(0))
    assert x.shape == (7, D) and x.is_floating_point() and bool(torch.isfinite(x).all())
    again = model.sample(7, generator=torch.Generator().manual_seed(0))
    assert torch.equal(x, again)
    assert not torch.equal(x, model.sample(7, generator=torch.Generator().manual_seed(1)))


def test_vae_sample_draws_and_sample_mean_gives_means():
    vae = VAE(D, z_dim=2, hidden=(8,))
    x = vae.sample(200, generator=torch.Generator().manual_seed(0))
    assert set(x.unique().tolist()) <= {0.0, 1.0}
    mean = vae.sample_mean(200, generator=torch.Generator().manual_seed(0))
    assert mean.shape == (200, D) and bool(((mean > 0) & (mean < 1)).all())

    gauss = VAE(D, z_dim=2, hidden=(8,), likelihood="gaussian", scale=0.5)
    draws = gauss.sample(4000, generator=torch.Generator().manual_seed(0))
    means = gauss.sample_mean(4000, generator=torch.Generator().manual_seed(0))
    # Same generator, same z: the draws are the means plus N(0, 0.5^2) noise.
    assert (draws - means).std().item() == pytest.approx(0.5, rel=0.05)


def test_attribute_capabilities():
    assert default_elbo(build("gmm")) == "TraceEnum_ELBO"
    for name in ("vae", "fa", "bayes-gmm"):
        assert default_elbo(build(name)) == "Trace_ELBO"
    assert num_data(build("fa")) is None
    assert num_data(build("bayes-fa", num_data=100)) == 100
    assert num_data(build("bayes-gmm", num_data=50)) == 50


def test_contract_works_for_duck_typed_objects_and_rejects_unknown_names():
    class Duck:
        num_data = 10

        def model(self, x): ...

        def guide(self, x): ...

        def log_marginal(self, x):
            return x.sum(-1)

    duck = Duck()
    assert capability(duck, "log_marginal") == duck.log_marginal
    assert capability(duck, "sample") is None
    assert capability(lambda x: None, "encode") is None
    assert num_data(duck) == 10 and default_elbo(duck) == "Trace_ELBO"

    class OptedOut(FactorAnalysis):
        log_marginal = None  # a subclass that cannot honour an inherited capability

    class WithNetwork(LatentModel):
        def __init__(self):
            super().__init__()
            self.encode = nn.Linear(2, 2)  # a sub-network, not the encode capability

    assert capability(OptedOut(D, 2), "log_marginal") is None
    assert capability(WithNetwork(), "encode") is None
    with pytest.raises(ValueError, match="unknown capability 'log_likelihood'; known: log_marginal"):
        capability(duck, "log_likelihood")
    with pytest.raises(ValueError, match=r"attribute; ask num_data\(model\)"):
        capability(duck, "num_data")
    Duck.num_data = 0
    with pytest.raises(ValueError, match="positive integer"):
        num_data(duck)


def _integer_data(n=12, d=D, seed=0):
    return torch.randint(0, 3, (n, d), generator=torch.Generator().manual_seed(seed)).float()


def _same_values_in_other_forms(x):
    return {
        "float64": x.double(),
        "int64": x.long(),
        "numpy": x.numpy().astype(np.float64),
        "numpy int": x.numpy().astype(np.int32),
        "DataFrame": pd.DataFrame(x.numpy(), columns=[f"c{i}" for i in range(x.shape[1])]),
        "list": x.tolist(),
    }


@pytest.mark.parametrize("model", [FactorAnalysis(D, 2), GaussianMixture(2, D, init="random")],
                         ids=["fa", "gmm"])
def test_log_marginal_is_the_same_for_every_form_of_the_same_data(model):
    x = _integer_data()
    expected = model.log_marginal(x)
    assert expected.shape == (len(x),) and expected.dtype == torch.float32
    for form, data in _same_values_in_other_forms(x).items():
        got = model.log_marginal(data)
        assert got.dtype == torch.float32, form
        torch.testing.assert_close(got, expected, msg=form)
    bits = x > 1
    torch.testing.assert_close(model.log_marginal(bits), model.log_marginal(bits.float()))
    # the other data-taking methods follow the same rule
    frame = _same_values_in_other_forms(x)["DataFrame"]
    torch.testing.assert_close(model.encode(frame), model.encode(x))
    model.check_data(frame)


def test_float64_model_takes_float32_data_in_its_own_precision():
    fa = FactorAnalysis(D, 2).double()
    x = _integer_data()
    assert fa.as_data(x).dtype == torch.float64
    torch.testing.assert_close(fa.log_marginal(x), fa.log_marginal(x.double()), rtol=0, atol=0)


def test_one_dimensional_data_is_n_points_of_one_column():
    gmm = GaussianMixture(2, 1, init="random")
    values = np.array([-1.0, 0.0, 0.5, 2.0])
    lm = gmm.log_marginal(values)
    assert lm.shape == (4,)
    torch.testing.assert_close(lm, gmm.log_marginal(torch.tensor(values).float().unsqueeze(-1)))
    assert gmm.predict(pd.Series(values)).shape == (4,)


def test_wrong_number_of_columns_names_expected_and_got():
    fa = FactorAnalysis(5, 2)
    with pytest.raises(ValueError, match=r"^FactorAnalysis expects data with 5 columns, .*got 3 columns"):
        fa.log_marginal(np.zeros((4, 3)))
    with pytest.raises(ValueError, match="pass one data point as shape"):
        fa.log_marginal(np.zeros(5))  # one point given as a 1-D array: N = 5 points of one column
    with pytest.raises(ValueError, match="GaussianMixture expects data with 4 columns"):
        GaussianMixture(2, D).predict(torch.zeros(3, 2))


def test_bad_data_at_a_model_gives_the_data_rule_error():
    fa = FactorAnalysis(D, 2)
    with pytest.raises(ValueError, match="DataFrame column 'name'.*drop or encode"):
        fa.log_marginal(pd.DataFrame({"a": [1.0], "b": [2.0], "c": [3.0], "name": ["x"]}))
    with pytest.raises(ValueError, match="NaN"):
        fa.check_data(np.full((2, D), np.nan))


def test_fit_em_takes_numpy_and_computes_in_float64():
    x = torch.randn(200, D, generator=torch.Generator().manual_seed(0)) @ torch.randn(D, D)
    fa = FactorAnalysis(D, 2)
    result = fa.fit_em(x.double().numpy(), max_iter=30)
    ll = result.history["log_likelihood"].to_numpy()
    assert (np.diff(ll) > -1e-10).all()  # monotone at float64 precision
    assert fa.decoder.weight.dtype == torch.float32
    gmm = GaussianMixture(2, D, seed=0)
    gmm.fit_em(pd.DataFrame(x.numpy()), max_iter=20, n_init=1)
    assert gmm.mixture.loc.dtype == torch.float32
