"""Export of guide draws to ArviZ: shapes, seeding, agreement of the draws with
the guide's own parameters, and that ArviZ's summary and plots run on factor
loadings and on mixture parameters."""

import math

import matplotlib
import pytest
import torch

matplotlib.use("Agg")

import arviz as az  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import pyro.distributions as dist  # noqa: E402

from pyrovae.data import load_dataset  # noqa: E402
from pyrovae.infer import fit  # noqa: E402
from pyrovae.infer.posterior import to_inference_data  # noqa: E402
from pyrovae.models import BayesianFactorAnalysis, FactorAnalysis  # noqa: E402



@pytest.fixture(scope="module")
def data():
    return load_dataset("synthetic-fa", n=200, x_dim=4, z_dim=2, seed=0)


@pytest.fixture(scope="module")
def bfa(data):
    return BayesianFactorAnalysis(4, 2, init_scale=0.1).init_from_data(data.x)


def test_groups_and_shapes(bfa, data):
    idata = to_inference_data(bfa, data=data, num_samples=50, seed=0)
    assert set(idata.groups()) == {"posterior", "observed_data"}
    post = idata.posterior
    assert post["weight"].shape == (1, 50, 4, 2)
    assert post["loc"].shape == (1, 50, 4)
    assert post["noise"].shape == (1, 50, 4)
    assert bool((post["noise"] > 0).all())
    torch.testing.assert_close(torch.as_tensor(idata.observed_data["x"].values), data.x)


def test_seed_reproduces_draws_and_global_rng_is_untouched(bfa, data):
    torch.manual_seed(5)
    state = torch.get_rng_state()
    a = to_inference_data(bfa, data=data, num_samples=20, seed=3)
    assert torch.equal(torch.get_rng_state(), state)
    b = to_inference_data(bfa, data=data, num_samples=20, seed=3)
    c = to_inference_data(bfa, data=data, num_samples=20, seed=4)
    assert (a.posterior["weight"].values == b.posterior["weight"].values).all()
    assert not (a.posterior["weight"].values == c.posterior["weight"].values).all()


def test_draws_follow_the_guide(bfa, data):
    s = 1000
    idata = to_inference_data(bfa, data=data, num_samples=s, seed=0)
    draws = torch.as_tensor(idata.posterior["weight"].values[0]).double()
    loc = bfa.global_guide.loc("weight").detach().double()
    scale = bfa.global_guide.scale("weight").detach().double()
    # real-valued site: the draws are N(loc, scale^2) per coordinate
    assert bool(((draws.mean(0) - loc).abs() < 4 * scale / math.sqrt(s)).all())
    # sd of a sample sd is ~ sd / sqrt(2 s) (~2.2% here)
    torch.testing.assert_close(draws.std(0), scale, rtol=0.1, atol=0)
    # positive site: the median of the draws is exp(loc)
    noise = torch.as_tensor(idata.posterior["noise"].values[0]).double()
    median = bfa.global_guide.median()["noise"].double()
    torch.testing.assert_close(noise.median(0).values, median, rtol=0.05, atol=0)


def test_arviz_summary_and_plot_on_loadings(bfa, data, tmp_path):
    idata = to_inference_data(
        bfa, data=data, num_samples=200, seed=0, dims={"weight": ["item", "factor"]},
        coords={"item": ["a", "b", "c", "d"], "factor": [0, 1]},
    )
    summary = az.summary(idata, var_names=["weight"], kind="stats")
    assert len(summary) == 8 and "weight[a, 0]" in summary.index
    means = idata.posterior["weight"].values[0].mean(0)
    assert summary.loc["weight[b, 1]", "mean"] == pytest.approx(means[1, 1], abs=1e-3)
    axes = az.plot_posterior(idata, var_names=["weight"])
    assert axes.size == 8  # one panel per loading
    path = tmp_path / "loadings.png"
    axes.ravel()[0].figure.savefig(path)
    plt.close("all")
    assert path.stat().st_size > 0


def test_log_likelihood_group_matches_the_model(bfa, data):
    idata = to_inference_data(bfa, data=data, num_samples=5, seed=0, log_likelihood=True)
    ll = idata.log_likelihood["x"].values
    assert ll.shape == (1, 5, len(data))
    post = idata.posterior
    w, loc, noise = (torch.as_tensor(post[k].values[0, 2]) for k in ("weight", "loc", "noise"))
    expected = dist.LowRankMultivariateNormal(loc, w, noise).log_prob(data.x)
    torch.testing.assert_close(torch.as_tensor(ll[0, 2]), expected)


def test_full_rank_guide_exports_model_sites_not_the_auxiliary_one(data):
    model = BayesianFactorAnalysis(4, 2, guide="fullrank").init_from_data(data.x)
    idata = to_inference_data(model, data=data, num_samples=10, seed=0)
    assert set(idata.posterior.data_vars) == {"weight", "loc", "noise"}


def test_mixture_parameters_export():
    mixture = pytest.importorskip("pyrovae.models.mixture")
    train = load_dataset("synthetic-gmm", n=200, K=2, x_dim=2, seed=0)
    model = mixture.BayesianGaussianMixture(2, 2, covariance="full")
    fit(model, train, epochs=30, batch_size=200, lr=0.05, eval_every=0, progress=False)
    idata = to_inference_data(model, data=train, num_samples=100, seed=0)
    assert idata.posterior["weights"].shape == (1, 100, 2)
    assert idata.posterior["loc"].shape == (1, 100, 2, 2)
    summary = az.summary(idata, var_names=["weights"], kind="stats")
    assert summary["mean"].sum() == pytest.approx(1.0, abs=1e-4)


def test_local_latents_and_errors(data):
    fa = FactorAnalysis(4, 2).init_from_data(data.x)
    with pytest.raises(ValueError, match="include_local=True"):
        to_inference_data(fa, data=data, num_samples=3)
    idata = to_inference_data(fa, data=data, num_samples=3, include_local=True)
    assert idata.posterior["z"].shape == (1, 3, len(data), 2)
    bfa = BayesianFactorAnalysis(4, 2)
    with pytest.raises(ValueError, match="no exportable site"):
        to_inference_data(bfa, data=data, num_samples=3, var_names=["loadings"])
    with pytest.raises(ValueError, match="data is required"):
        to_inference_data(bfa, num_samples=3)
    only = to_inference_data(bfa, data=data, num_samples=3, var_names=["noise"])
    assert set(only.posterior.data_vars) == {"noise"}
