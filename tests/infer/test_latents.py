"""Latent diagnostics: KL per dimension and active units against closed
forms, the mixture-marginal and non-factorized cases, and the inference gap
on a linear-Gaussian model (exact log p(x)) and a small trained VAE."""

import math
from dataclasses import replace

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.distributions.transforms import AffineTransform

from pyrovae import PPCA, VAE, FactorAnalysis, fit
from pyrovae.data import load_dataset
from pyrovae.infer import active_units, inference_gap, latent_stats
from pyrovae.infer.evaluate import elbo_terms, importance_log_likelihood
from pyrovae.infer.latents import _FreeEncoder, _swapping_guide
from pyrovae.infer.program import resolve

D = 3


def _data(n=200, seed=0):
    return torch.randn(n, D, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _model(prior):
    def model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", prior(x))
            pyro.sample("x", dist.Normal(z, 1.0).to_event(1), obs=x)
    return model


def _guide(q):
    def guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", q(x))
    return guide


PRIOR_LOC = torch.tensor([0.5, -1.0, 0.0], dtype=torch.float64)
PRIOR_SCALE = torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64)


def _normal_prior(x):
    return dist.Normal(PRIOR_LOC, PRIOR_SCALE).to_event(1)


def _affine_q(a, b, s):
    return lambda x: dist.Normal(a * x + b, s).to_event(1)


# -- exact identities and closed forms ------------------------------------------------


def test_per_dimension_kl_and_activity_match_the_closed_form():
    x = _data()
    a = torch.tensor([2.0, 0.5, 0.0], dtype=torch.float64)
    b = torch.tensor([0.1, 0.2, 0.3], dtype=torch.float64)
    s = torch.tensor([0.3, 1.5, 0.5], dtype=torch.float64)
    stats = latent_stats(_model(_normal_prior), x, guide=_guide(_affine_q(a, b, s)),
                         num_samples=1)
    m = a * x + b
    closed = (torch.log(PRIOR_SCALE / s) + (s**2 + (m - PRIOR_LOC) ** 2) / (2 * PRIOR_SCALE**2)
              - 0.5).mean(0)
    dims = stats.dims
    assert dims["site"].tolist() == ["z"] * D and dims["dim"].tolist() == [0, 1, 2]
    assert torch.allclose(torch.tensor(dims["kl"].to_numpy()), closed, rtol=0, atol=1e-12)
    assert (dims["kl_method"] == "analytic").all()
    # Activity = Cov_x(E_q[z_d | x]) = a_d^2 Var(x_d) exactly (unbiased sample variance).
    assert torch.allclose(torch.tensor(dims["activity"].to_numpy()), a**2 * x.var(0), atol=1e-12)
    assert dims["active"].tolist() == [True, True, False]
    # Factorized q and p: the per-dimension KLs sum to the site's KL (analytic too).
    (site,) = stats.sites.itertuples(index=False)
    assert site.per_dim == "joint" and site.kl_method == "analytic" and site.dims == D
    assert site.kl == pytest.approx(site.kl_dims, rel=1e-12)
    assert site.kl == pytest.approx(closed.sum().item(), rel=1e-12)
    assert stats.kl == site.kl and stats.active_units == 2 == site.active_units
    assert stats.summary() == {"active_units": 2, "latent_dims": D, "latent_kl": site.kl,
                               "active_units_z": 2, "kl_z": site.kl}


def test_a_guide_that_ignores_x_has_no_active_units_and_separated_means_have_all():
    x = _data()
    constant = _guide(lambda x: dist.Normal(torch.full_like(x, 0.7), 0.2).to_event(1))
    separated = _guide(_affine_q(3.0, 0.0, 0.1))
    assert active_units(_model(_normal_prior), x, guide=constant) == 0
    assert active_units(_model(_normal_prior), x, guide=separated) == D
    # The threshold decides: activity 9 Var(x_d) is about 9.
    assert active_units(_model(_normal_prior), x, guide=separated, threshold=100.0) == 0


def test_per_dimension_kl_to_a_mixture_prior_is_against_its_marginals():
    # p(z) = 0.3 N(mu_1, diag s_1^2) + 0.7 N(mu_2, diag s_2^2): the dimensions
    # are dependent, so each KL is to the marginal sum_c pi_c N(z_d; mu_cd, s_cd).
    pi = torch.tensor([0.3, 0.7], dtype=torch.float64)
    mu = torch.tensor([[-1.0, 2.0], [1.5, -0.5]], dtype=torch.float64)
    sd = torch.tensor([[0.5, 1.0], [1.0, 0.7]], dtype=torch.float64)

    def prior(x):
        return dist.MixtureSameFamily(dist.Categorical(probs=pi), dist.Normal(mu, sd).to_event(1))

    def model(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", prior(x))

    x = torch.tensor([[0.0, 0.0], [1.0, -1.0], [-1.0, 2.0]], dtype=torch.float64)
    q_loc, q_sd = 0.8 * x, torch.tensor([0.6, 0.9], dtype=torch.float64)
    guide = _guide(lambda x: dist.Normal(0.8 * x, q_sd).to_event(1))
    stats = latent_stats(model, x, guide=guide, num_samples=20000)

    # By hand: quadrature on a fine grid, per point and dimension, then jointly in 2-D.
    grid = torch.linspace(-12, 12, 4001, dtype=torch.float64)
    h = grid[1] - grid[0]
    by_hand = torch.zeros(2, dtype=torch.float64)
    for n in range(3):
        for d in range(2):
            log_q = dist.Normal(q_loc[n, d], q_sd[d]).log_prob(grid)
            log_p = torch.logsumexp(pi.log()[:, None]
                                    + dist.Normal(mu[:, d, None], sd[:, d, None]).log_prob(grid), 0)
            by_hand[d] += (log_q.exp() * (log_q - log_p)).sum() * h / 3
    g2 = torch.linspace(-10, 10, 801, dtype=torch.float64)
    z = torch.stack(torch.meshgrid(g2, g2, indexing="ij"), -1).reshape(-1, 1, 2)
    joint = 0.0
    for n in range(3):
        log_q = dist.Normal(q_loc[n], q_sd).to_event(1).log_prob(z[:, 0])
        log_p = prior(x).log_prob(z[:, 0])
        joint += (log_q.exp() * (log_q - log_p)).sum().item() * (g2[1] - g2[0]).item() ** 2 / 3

    dims = stats.dims
    assert (dims["kl_method"] == "monte carlo, mixture marginal").all()
    # 20000 draws per point: the Monte Carlo standard error is below 0.005 nats.
    assert torch.allclose(torch.tensor(dims["kl"].to_numpy()), by_hand, atol=0.02)
    (site,) = stats.sites.itertuples(index=False)
    assert site.per_dim == "marginal" and site.kl_method == "monte carlo"
    assert site.kl == pytest.approx(joint, abs=0.02)
    # The marginal KLs do not add up to the joint KL here.
    assert abs(site.kl_dims - site.kl) > 0.1


def test_a_flow_guide_has_no_per_dimension_kl_but_a_total_and_unbiased_activity():
    # q(z | x) = N(c * x, diag s^2) written as an affine flow of N(0, I): no
    # per-dimension density and no mean, so the total KL and E_q[z | x] are
    # estimated from draws. c = 0 in the last dimension: a dead unit.
    c = torch.tensor([2.0, 1.0, 0.0], dtype=torch.float64)
    s = torch.tensor([0.5, 1.0, 1.0], dtype=torch.float64)

    def flow(x):
        base = dist.Normal(torch.zeros_like(x), 1.0).to_event(1)
        return dist.TransformedDistribution(base, [AffineTransform(c * x, s, event_dim=1)])

    x = _data(400, seed=1)
    standard = _model(lambda x: dist.Normal(torch.zeros_like(x), 1.0).to_event(1))
    stats = latent_stats(standard, x, guide=_guide(flow), num_samples=100)
    closed = (-torch.log(s) + (s**2 + (c * x) ** 2) / 2 - 0.5).sum(-1)
    (site,) = stats.sites.itertuples(index=False)
    assert site.per_dim == "none" and site.kl_method == "monte carlo" and math.isnan(site.kl_dims)
    assert stats.dims["kl"].isna().all() and (stats.dims["kl_method"] == "not factorized").all()
    # 100 draws for each of 400 points: a standard error of about 0.01 nats.
    assert site.kl == pytest.approx(closed.mean().item(), abs=0.05)
    activity = torch.tensor(stats.dims["activity"].to_numpy())
    assert torch.allclose(activity[:2], c[:2] ** 2 * x[:, :2].var(0), rtol=0.05)
    # Without subtracting the Monte Carlo variance of the mean of 100 draws
    # (1/100 = the threshold) the dead unit would sit at the threshold.
    assert abs(activity[2].item()) < 0.004
    assert stats.dims["active"].tolist() == [True, True, False]


def test_latent_stats_of_a_vae_agree_with_the_elbos_kl_term_and_leave_no_trace():
    torch.manual_seed(0)
    vae = VAE(10, z_dim=3, hidden=[16], likelihood="gaussian")
    vae.train()
    x = torch.randn(100, 10)
    stats = latent_stats(vae, x, num_samples=2)
    assert vae.training and all(m.training for m in vae.modules())
    assert list(pyro.get_param_store().keys()) == []
    assert stats.num_points == 100 and stats.sites["site"].tolist() == ["z"]
    # The ELBO's KL term, E_q[log q - log p], by Monte Carlo: standard error < 0.005.
    kl_mc = elbo_terms(vae, None, x, num_particles=2000)["kl"].double()
    assert stats.kl == pytest.approx(kl_mc.mean().item(), abs=0.02)


def test_programs_without_local_continuous_latents_are_refused():
    def model(x):
        loc = pyro.sample("loc", dist.Normal(0.0, 1.0))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("x", dist.Normal(loc, 1.0), obs=x[:, 0])

    def guide(x):
        pyro.sample("loc", dist.Normal(pyro.param("m", torch.tensor(0.0)), 1.0))

    with pytest.raises(ValueError, match="local latent variables.*global latent variables"):
        latent_stats(model, torch.randn(10, 1), guide=guide)
    with pytest.raises(ValueError, match="at least 2 points"):
        latent_stats(_model(_normal_prior), _data(1), guide=_guide(_affine_q(1.0, 0.0, 1.0)))
    with pytest.raises(ValueError, match="threshold must be"):
        latent_stats(_model(_normal_prior), _data(), guide=_guide(_affine_q(1.0, 0.0, 1.0)),
                     threshold=-1)


# -- the inference gap ------------------------------------------------------------------


def test_approximation_gap_vanishes_when_the_family_holds_the_exact_posterior():
    # Maximum-likelihood PPCA has W^T W diagonal, so p(z | x) is a diagonal
    # Normal: a member of the MLP encoder's family, reached by optimizing its
    # raw output per point. log p(x) is exact.
    x = load_dataset("synthetic-ppca", split="train", n=300, x_dim=6, z_dim=2).x
    model = PPCA(6, z_dim=2, encoder="mlp").fit_closed_form(x)
    w = model.loadings
    assert torch.allclose(w.T @ w, torch.diag(torch.diagonal(w.T @ w)), atol=1e-4)
    gap = inference_gap(model, x, num_points=10, steps=200, lr=0.05, num_samples=0,
                        elbo_particles=200)
    summary = gap.summary()
    assert gap.log_px_method == "exact" and summary["gap_points"] == 10
    assert abs(summary["approximation_gap"]) < 0.05
    # The untrained encoder is far from the posterior: the whole gap is amortization.
    assert summary["amortization_gap"] > 1.0
    points = gap.points
    assert torch.allclose(torch.tensor(points["inference_gap"].to_numpy()),
                          torch.tensor((points["approximation_gap"]
                                        + points["amortization_gap"]).to_numpy()), atol=1e-9)


def test_amortization_gap_of_a_trained_vae_is_non_negative_and_its_state_is_kept():
    x = load_dataset("digits", split="train").x[:256]
    torch.manual_seed(0)
    vae = VAE(64, z_dim=4, hidden=[32], likelihood="gaussian")
    fit(vae, x, epochs=25, batch_size=64, lr=3e-3, seed=0, progress=False)
    vae.train()
    for p in vae.parameters():
        p.grad = torch.full_like(p, 0.5)
    state = {k: v.clone() for k, v in vae.state_dict().items()}
    store = set(pyro.get_param_store().keys())
    encoder = vae.encoder

    gap = inference_gap(vae, x, num_points=20, steps=100, lr=0.05, num_samples=200,
                        elbo_particles=100)
    summary = gap.summary()
    assert summary["amortization_gap"] > -3 * summary["amortization_gap_se"]
    assert summary["approximation_gap"] > -3 * summary["approximation_gap_se"]
    assert gap.log_px_method.startswith("importance (K=200")
    points = gap.points
    assert (points["log_px"] == points[["log_px_amortized", "log_px_optimized"]].max(1)).all()
    assert len(gap.history) == 100
    # Nothing of the model changed: weights, gradients, modes, encoder, param store.
    assert all(torch.equal(v, state[k]) for k, v in vae.state_dict().items())
    assert all(torch.equal(p.grad, torch.full_like(p, 0.5)) for p in vae.parameters())
    assert vae.encoder is encoder and vae.training
    assert set(pyro.get_param_store().keys()) == store


def test_the_per_point_guide_at_the_encoders_output_is_the_amortized_guide_on_any_chunk():
    # Evaluation helpers run the guide on chunks and probes of the points; the
    # per-point guide finds each point's row, so at raw = encoder.raw(x) it
    # is the amortized guide draw for draw.
    torch.manual_seed(0)
    vae = VAE(20, z_dim=3, hidden=[16], likelihood="gaussian")
    x = torch.randn(30, 20)
    program = resolve(vae, None, x[:2])
    free = _FreeEncoder(vae.encoder, x, vae.encoder.raw(x).detach()).eval()
    per_point = replace(program, guide=_swapping_guide(vae, program.guide, free, vae.encoder))
    assert free.rows(x[[5, 3, 29]]).tolist() == [5, 3, 29] and free.rows(x) is None
    for batch_size in (7, 30):
        torch.manual_seed(1)
        ours = importance_log_likelihood(per_point, None, x, 50, batch_size=batch_size)
        torch.manual_seed(1)
        amortized = importance_log_likelihood(program, None, x, 50, batch_size=batch_size)
        assert torch.allclose(ours, amortized, atol=1e-5)
    torch.manual_seed(1)
    ours = elbo_terms(per_point, None, x, 5, batch_size=4)["elbo"]
    torch.manual_seed(1)
    assert torch.equal(ours, elbo_terms(program, None, x, 5, batch_size=4)["elbo"])
    assert vae.encoder is free.source
    with pytest.raises(RuntimeError, match="not optimized for"):
        free(torch.randn(2, 20))


def test_the_inference_gap_needs_an_amortized_encoder():
    x = torch.randn(20, 5)
    with pytest.raises(ValueError, match="LinearGaussianEncoder, not a pyrovae.guides.Amortized"):
        inference_gap(FactorAnalysis(5, z_dim=2), x)
    with pytest.raises(ValueError, match="model object"):
        inference_gap(_model(_normal_prior), x)
    with pytest.raises(ValueError, match="no exact log_marginal"):
        inference_gap(VAE(5, z_dim=2, hidden=[8], likelihood="gaussian"), x, num_samples=0)
