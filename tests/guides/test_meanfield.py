"""Mean-field and full-rank guides over global latents.

Closed-form answers on a Gaussian target (Bayesian linear regression with a
correlated posterior): the full-rank guide recovers the exact posterior
covariance, the mean-field guide the exact mean and the variances
1 / Lambda_jj (the known mean-field underestimate), not the marginal
variances. Exact identities for the densities of constrained sites, and
isolation of the parameters of two instances.
"""

import math

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import pytest
import torch
from pyro.distributions.transforms import biject_to

from pyrovae.guides import GUIDES, FullRank, MeanField
from pyrovae.infer import fit

F64 = torch.float64
NOISE_SD = 0.5



def regression_data(n=20, seed=0):
    """Design rows at angles near 45 degrees, so the two coefficients have a
    posterior correlation of about -0.83."""
    gen = torch.Generator().manual_seed(seed)
    phi = 0.25 * math.pi + 0.3 * torch.randn(n, generator=gen, dtype=F64)
    a = torch.stack([phi.cos(), phi.sin()], -1)
    y = a @ torch.tensor([0.5, -1.0], dtype=F64) + NOISE_SD * torch.randn(n, generator=gen, dtype=F64)
    precision = torch.eye(2, dtype=F64) + a.T @ a / NOISE_SD**2
    cov = torch.linalg.inv(precision)
    return torch.cat([a, y[:, None]], -1), cov @ a.T @ y / NOISE_SD**2, cov, precision


def regression(x):
    theta = pyro.sample("theta", dist.Normal(x.new_zeros(2), 1.0).to_event(1))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("y", dist.Normal((x[:, :2] * theta).sum(-1), NOISE_SD), obs=x[:, 2])


def train(guide, x):
    # a large then a small learning rate; many (vectorized, so nearly free)
    # particles keep the final jitter small
    for lr, epochs in ((0.05, 200), (0.01, 150)):
        fit(regression, x, guide=guide, epochs=epochs, batch_size=len(x), lr=lr,
            num_particles=256, vectorize_particles=True, eval_every=0, progress=False,
            elbo_options={"max_plate_nesting": 1})


def test_mean_field_finds_exact_mean_and_conditional_variances():
    x, mean, cov, precision = regression_data()
    guide = MeanField(regression).setup(x, seed=0)
    train(guide, x)
    torch.testing.assert_close(guide.loc("theta").detach(), mean, rtol=0, atol=0.05)
    # optimum of KL(q || p) over factorized Gaussians: sd_j = Lambda_jj^{-1/2}
    conditional_sd = precision.diagonal().rsqrt()
    torch.testing.assert_close(guide.scale("theta").detach(), conditional_sd, rtol=0.1, atol=0)
    # ... which is far below the marginal sd sqrt(Sigma_jj) here
    assert bool((conditional_sd < 0.7 * cov.diagonal().sqrt()).all())


def test_full_rank_recovers_the_exact_posterior_covariance():
    x, mean, cov, _ = regression_data()
    guide = FullRank(regression).setup(x, seed=0)
    train(guide, x)
    q = guide.joint()
    torch.testing.assert_close(q.loc.detach(), mean, rtol=0, atol=0.05)
    q_cov = q.covariance_matrix.detach()
    torch.testing.assert_close(q_cov.diagonal().sqrt(), cov.diagonal().sqrt(), rtol=0.1, atol=0)
    corr = q_cov[0, 1] / q_cov.diagonal().prod().sqrt()
    assert corr.item() == pytest.approx(-0.83, abs=0.05)


# -- constrained sites, plates, and the densities the ELBOs see ----------------------
def constrained_model(x):
    scale = pyro.sample("scale", dist.LogNormal(0.0, 1.0))
    weights = pyro.sample("weights", dist.Dirichlet(torch.ones(3)))
    with pyro.plate("components", 3):  # two sites share this plate
        locs = pyro.sample("locs", dist.Normal(0.0, 2.0))
        spread = pyro.sample("spread", dist.Gamma(4.0, 4.0))
    with pyro.plate("data", x.shape[0]):
        mix = dist.MixtureSameFamily(dist.Categorical(weights), dist.Normal(locs, scale * spread))
        pyro.sample("x", mix, obs=x)


def test_mean_field_density_of_constrained_sites_is_the_change_of_variables():
    x = torch.randn(30)
    guide = MeanField(constrained_model, init_scale=0.3).setup(x, seed=1)
    trace = poutine.trace(guide).get_trace(x)
    trace.compute_log_prob()
    # positive site: log q(s) = log N(log s; m, sd) - log s
    s = trace.nodes["scale"]["value"]
    expected = dist.Normal(guide.loc("scale"), guide.scale("scale")).log_prob(s.log()) - s.log()
    torch.testing.assert_close(trace.nodes["scale"]["log_prob"], expected)
    # simplex site: stick-breaking from R^2, one density for the whole vector
    w = trace.nodes["weights"]["value"]
    assert w.shape == (3,) and bool((w > 0).all()) and w.sum().item() == pytest.approx(1.0, abs=1e-6)
    t = biject_to(dist.constraints.simplex)
    u = t.inv(w)
    expected = (
        dist.Normal(guide.loc("weights"), guide.scale("weights")).log_prob(u).sum()
        - t.log_abs_det_jacobian(u, w)
    )
    torch.testing.assert_close(trace.nodes["weights"]["log_prob"], expected)
    # a site in a (non-data) plate keeps its batch shape, as the model's does
    assert trace.nodes["locs"]["fn"].batch_shape == (3,)
    assert trace.nodes["locs"]["log_prob"].shape == (3,)
    # real sites use a plain Normal, so TraceMeanField_ELBO can use analytic KL
    assert isinstance(guide.distribution("locs"), dist.Normal)
    assert trace.nodes["spread"]["log_prob"].shape == (3,)
    assert set(guide.median()) == {"scale", "weights", "locs", "spread"}


def test_full_rank_density_is_joint_gaussian_plus_log_jacobians():
    x = torch.randn(30)
    guide = FullRank(constrained_model, init_scale=0.3).setup(x, seed=1)
    with torch.no_grad():  # correlate the coordinates so the joint density matters
        guide.raw_tril.normal_(0, 0.2)
    trace = poutine.trace(guide).get_trace(x)
    trace.compute_log_prob()
    total = sum(site["log_prob"].sum() for site in trace.nodes.values() if site["type"] == "sample")
    u = trace.nodes[f"_{guide.pyro_name}_latent"]["value"]
    s, w = trace.nodes["scale"]["value"], trace.nodes["weights"]["value"]
    t = biject_to(dist.constraints.simplex)
    spread = trace.nodes["spread"]["value"]
    expected = (
        guide.joint().log_prob(u) - s.log() - t.log_abs_det_jacobian(t.inv(w), w) - spread.log().sum()
    )
    torch.testing.assert_close(total, expected)
    assert u.shape == (1 + 2 + 3 + 3,)
    assert trace.nodes["locs"]["fn"].batch_shape == (3,)


def test_elbos_train_a_mixture_with_constrained_globals():
    # every Pyro ELBO of the pyrovae registry accepts both guides; a few steps
    # raise the ELBO from the prior-median start
    gen = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(60, generator=gen) - 3, torch.randn(40, generator=gen) + 3])
    for family, elbo in ((MeanField, "TraceMeanField_ELBO"), (FullRank, "Trace_ELBO")):
        guide = family(constrained_model).setup(x, seed=0)
        result = fit(_column(constrained_model), x[:, None], guide=_column(guide),
                     elbo=elbo, epochs=100, batch_size=100, lr=0.05, eval_every=0, progress=False)
        h = result.history["train_elbo"]  # nats per data point
        assert h.iloc[-10:].mean() > h.iloc[:10].mean() + 2


def _column(fn):
    """Adapt a program on a vector of scalars to fit's (N, 1) data."""
    def wrapped(x):
        return fn(x[:, 0])

    return wrapped


# -- bookkeeping ----------------------------------------------------------------------
def test_two_instances_share_no_parameters():
    x, *_ = regression_data()
    a = MeanField(regression).setup(x, seed=0)
    b = MeanField(regression).setup(x, seed=0)
    assert a.pyro_name != b.pyro_name
    torch.testing.assert_close(a.loc("theta"), b.loc("theta"))  # same seed, same start
    before = b.loc("theta").detach().clone()
    fit(regression, x, guide=a, epochs=20, batch_size=len(x), lr=0.1, eval_every=0, progress=False)
    torch.testing.assert_close(b.loc("theta").detach(), before, rtol=0, atol=0)
    assert not torch.equal(a.loc("theta").detach(), before)
    store = pyro.get_param_store()
    names = [n for n in store.keys() if n.startswith((a.pyro_name, b.pyro_name))]
    assert any(n.startswith(a.pyro_name) for n in names)


def test_setup_seed_is_reproducible_and_leaves_global_rng_alone():
    x = torch.randn(5)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    g1 = MeanField(constrained_model).setup(x, seed=7)
    assert torch.equal(torch.get_rng_state(), state)
    g2 = MeanField(constrained_model).setup(x, seed=7)
    torch.testing.assert_close(g1.loc("locs"), g2.loc("locs"))


def test_set_median_round_trip():
    x = torch.randn(10)
    for family in (MeanField, FullRank):
        guide = family(constrained_model).setup(x, seed=0)
        target = {"scale": torch.tensor(2.5), "weights": torch.tensor([0.2, 0.3, 0.5])}
        guide.set_median(target)
        med = guide.median()
        torch.testing.assert_close(med["scale"], target["scale"])
        torch.testing.assert_close(med["weights"], target["weights"])


def local_latent_model(x):
    loc = pyro.sample("loc", dist.Normal(0.0, 1.0))
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Normal(loc, 1.0))
        pyro.sample("x", dist.Normal(z, 1.0), obs=x)


def test_local_latents_are_refused_with_a_hint_and_can_be_hidden():
    x = torch.randn(8)
    with pytest.raises(ValueError, match=r"local latent.*hide=\['z'\]"):
        MeanField(local_latent_model).setup(x)
    guide = MeanField(local_latent_model, hide=["z"]).setup(x)
    assert guide.site_names() == ["loc"]
    with pytest.raises(ValueError, match="no latent sample sites"):
        MeanField(local_latent_model, hide=["z", "loc"]).setup(x)
    with pytest.raises(RuntimeError, match="not set up"):
        MeanField(local_latent_model).median()
    assert "linear" in GUIDES and "mlp" in GUIDES
