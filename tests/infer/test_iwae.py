"""IWAE bound and its gradient estimators on a linear-Gaussian model.

Model, per data point n: z_n ~ N(0, I_2), x_n | z_n ~ N(W_n z_n + b_n, s_n^2 I_3),
so p(x_n) = N(b_n, W_n W_n^T + s_n^2 I) and p(z_n | x_n) = N(mu_n, Sigma_n) with
Sigma_n = (I + W_n^T W_n / s_n^2)^-1, mu_n = Sigma_n W_n^T (x_n - b_n) / s_n^2.
Guide: q(z_n) = N(m_n, L_n L_n^T), its own parameters per data point.

Every parameter has one row per data point. With R copies of the same x and the
same parameters, the gradient with respect to row r depends only on copy r's
particles, so one backward pass gives R independent gradient draws. Statistical
checks compare means within 4 standard errors and use paired differences (the
same seed for both estimators), which cancels most of the noise.
"""

import itertools
import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import RenyiELBO, Trace_ELBO
from torch import nn

from pyrovae.infer.iwae import IWAE, STL_ELBO
from pyrovae.infer.objectives import ELBOS, make_objective
from pyrovae.infer.traces import sample_log_weights

D, Z = 3, 2
DTYPE = torch.float64
_ids = itertools.count()



class LinearGaussian:
    """The model and guide above, with per-data-point parameter rows."""

    def __init__(self, x, W, b, s, loc, tril, subsample_size=None):
        def rows(t):  # every tensor arrives with one row per data point
            assert t.shape[0] == x.shape[0]
            return nn.Parameter(t.detach().clone().contiguous())

        self.x = x
        self.decoder = nn.Module()
        self.decoder.W = rows(W)
        self.decoder.b = rows(b)
        self.decoder.log_s = rows(s.log())
        self.encoder = nn.Module()
        self.encoder.loc = rows(loc)
        self.encoder.tril = rows(tril)
        self.name = f"lg{next(_ids)}"
        self.subsample_size = subsample_size
        self.record = []  # (indices, z) of every guide run

    def _plate(self, x):
        return pyro.plate("data", x.shape[0], subsample_size=self.subsample_size)

    def model(self, x):
        pyro.module(f"{self.name}.decoder", self.decoder)
        with self._plate(x) as idx:
            W, b, s = self.decoder.W[idx], self.decoder.b[idx], self.decoder.log_s[idx].exp()
            z = pyro.sample("z", dist.Normal(x.new_zeros(Z), 1.0).to_event(1))
            mean = (W @ z.unsqueeze(-1)).squeeze(-1) + b
            pyro.sample("x", dist.Normal(mean, s.unsqueeze(-1).expand_as(mean)).to_event(1),
                        obs=x[idx])

    def guide(self, x):
        pyro.module(f"{self.name}.encoder", self.encoder)
        with self._plate(x) as idx:
            tril = self.encoder.tril[idx]
            z = pyro.sample("z", dist.MultivariateNormal(self.encoder.loc[idx], scale_tril=tril,
                                                         validate_args=False))
        self.record.append((idx, z.detach()))

    # -- closed forms ------------------------------------------------------------
    def log_marginal(self):
        W, b, s = self.decoder.W, self.decoder.b, self.decoder.log_s.exp()
        cov = W @ W.transpose(-1, -2) + s[:, None, None] ** 2 * torch.eye(D, dtype=DTYPE)
        return dist.MultivariateNormal(b, cov).log_prob(self.x).detach()

    def hand_log_w(self, idx, z):
        """log p(x_n, z) - log q(z) by hand, for recorded draws z of shape (..., len(idx), Z)."""
        W, b, s = self.decoder.W[idx], self.decoder.b[idx], self.decoder.log_s[idx].exp()
        loc, tril = self.encoder.loc[idx], self.encoder.tril[idx]
        mean = (W @ z.unsqueeze(-1)).squeeze(-1) + b
        log_p = (torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(-1)
                 + torch.distributions.Normal(mean, s[:, None]).log_prob(self.x[idx]).sum(-1))
        log_q = torch.distributions.MultivariateNormal(loc, scale_tril=tril).log_prob(z)
        return (log_p - log_q).detach()


def _problem(seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(D, Z, generator=g, dtype=DTYPE)
    b = torch.randn(D, generator=g, dtype=DTYPE)
    s = torch.tensor(0.8, dtype=DTYPE).reshape(1)[0]
    return W, b, s


def _posterior(W, b, s, x):
    prec = torch.eye(Z, dtype=DTYPE) + W.T @ W / s**2
    cov = torch.linalg.inv(prec)
    mu = (x - b) @ W @ cov.T / s**2  # rows: Sigma W^T (x_n - b) / s^2
    return mu, torch.linalg.cholesky(cov)


def _build(x, exact=False, subsample_size=None, offset=0.4, widen=1.4):
    """Linear-Gaussian with the exact posterior as guide, or a nearby wrong one."""
    W, b, s = _problem()
    mu, chol = _posterior(W, b, s, x)
    if not exact:
        mu = mu + offset
        chol = widen * chol
    n = x.shape[0]
    return LinearGaussian(x, W.expand(n, D, Z), b.expand(n, D), s.expand(n), mu,
                          chol.expand(n, Z, Z), subsample_size=subsample_size)


def _data(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, D, generator=g, dtype=DTYPE) * 1.5


def _grads(lg, objective, x, seed):
    """Per-row gradients of the loss (rows are independent draws)."""
    pyro.set_rng_seed(seed)
    params = {"W": lg.decoder.W, "b": lg.decoder.b, "loc": lg.encoder.loc, "tril": lg.encoder.tril}
    for p in params.values():
        p.grad = None
    objective.loss_and_grads(lg.model, lg.guide, x)
    return {k: p.grad.detach().clone() for k, p in params.items()}


# -- the bound's value --------------------------------------------------------------
@pytest.mark.parametrize("vectorize", [False, True])
@pytest.mark.parametrize("estimator", ["standard", "stl", "dreg"])
def test_exact_posterior_guide_gives_log_marginal_for_every_k(vectorize, estimator):
    x = _data(5)
    lg = _build(x, exact=True)
    exact = lg.log_marginal().sum().item()
    for k in (1, 3, 20):
        objective = IWAE(num_particles=k, vectorize_particles=vectorize, estimator=estimator)
        assert objective.loss(lg.model, lg.guide, x) == pytest.approx(-exact, abs=1e-9)
        loss = objective.differentiable_loss(lg.model, lg.guide, x)
        assert loss.item() == pytest.approx(-exact, abs=1e-9)


def test_expected_bound_increases_with_k_towards_log_marginal():
    # 3000 copies of one data point: each copy's bound is an independent draw.
    x = _data(1).expand(3000, D).contiguous()
    lg = _build(x)
    log_px = lg.log_marginal()[0].item()
    means, ses = [], []
    with torch.no_grad():
        for k in (1, 4, 16, 64):
            pyro.set_rng_seed(k)
            log_w = sample_log_weights(lg.model, lg.guide, x, num_particles=k,
                                       max_plate_nesting=1).log_w
            bounds = torch.logsumexp(log_w, 0) - math.log(k)
            means.append(bounds.mean().item())
            ses.append(bounds.std().item() / math.sqrt(len(bounds)))
            # The objective's value is the sum of exactly these per-point bounds.
            pyro.set_rng_seed(k)
            objective = IWAE(num_particles=k, vectorize_particles=True, max_plate_nesting=1)
            assert objective.loss(lg.model, lg.guide, x) == pytest.approx(
                -bounds.sum().item(), rel=1e-12)
    gaps = [log_px - m for m in means]
    for i in range(3):
        assert means[i + 1] - means[i] > 4 * math.hypot(ses[i], ses[i + 1])
    assert all(g > -4 * se for g, se in zip(gaps, ses))  # a lower bound, within noise
    assert gaps[0] > 0.3  # the guide is visibly off ...
    assert gaps[-1] < 0.1 * gaps[0]  # ... and 64 particles close most of the gap


def test_log_mean_exp_is_per_data_point_and_matches_hand_computation():
    x = _data(4)
    lg = _build(x)
    k = 6
    pyro.set_rng_seed(0)
    loss = IWAE(num_particles=k, vectorize_particles=True).loss(lg.model, lg.guide, x)
    idx, z = lg.record[-1]
    assert z.shape == (k, 4, Z)
    log_w = lg.hand_log_w(idx, z)  # (K, N)
    per_point = (torch.logsumexp(log_w, 0) - math.log(k)).sum().item()
    whole_trace = (torch.logsumexp(log_w.sum(1), 0) - math.log(k)).item()
    assert -loss == pytest.approx(per_point, abs=1e-10)
    assert abs(per_point - whole_trace) > 0.05
    # Pyro's RenyiELBO(alpha=0) keeps plate dims common to all sites, so on
    # this model (every site in the data plate, no subsampling) it agrees.
    pyro.set_rng_seed(0)
    ours = IWAE(num_particles=k, vectorize_particles=False).loss(lg.model, lg.guide, x)
    pyro.set_rng_seed(0)
    renyi = RenyiELBO(alpha=0, num_particles=k).loss(lg.model, lg.guide, x)
    assert ours == pytest.approx(renyi, abs=1e-10)


@pytest.mark.parametrize("vectorize", [False, True])
def test_subsampled_data_plate_scales_the_bound_not_the_weights(vectorize):
    x = _data(8)
    lg = _build(x, subsample_size=3)
    k, scale = 5, 8 / 3
    pyro.set_rng_seed(0)
    loss = IWAE(num_particles=k, vectorize_particles=vectorize, max_plate_nesting=1).loss(
        lg.model, lg.guide, x)
    idx = lg.record[0][0]
    # Sequential particles replay the first one's minibatch.
    assert all(torch.equal(i, idx) for i, _ in lg.record)
    z = lg.record[0][1] if vectorize else torch.stack([z for _, z in lg.record])
    log_w = lg.hand_log_w(idx, z)
    assert log_w.shape == (k, 3)
    expected = scale * (torch.logsumexp(log_w, 0) - math.log(k)).sum().item()
    assert -loss == pytest.approx(expected, abs=1e-10)
    if vectorize:
        # RenyiELBO multiplies each log-weight by N/B before the log-mean-exp:
        # a different, tempered quantity.
        pyro.set_rng_seed(0)
        renyi = RenyiELBO(alpha=0, num_particles=k, vectorize_particles=True,
                          max_plate_nesting=1).loss(lg.model, lg.guide, x)
        tempered = (torch.logsumexp(scale * log_w, 0) - math.log(k)).sum().item()
        assert -renyi == pytest.approx(tempered, abs=1e-10)
        assert abs(renyi - loss) > 0.1


# -- errors ---------------------------------------------------------------------------
def test_global_latent_is_rejected_with_a_clear_error():
    x = _data(3).float()

    def model(x):
        mu = pyro.sample("mu", dist.Normal(torch.zeros(D), 1.0).to_event(1))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("x", dist.Normal(mu, 1.0).to_event(1), obs=x)

    def guide(x):
        pyro.sample("mu", dist.Normal(torch.zeros(D), 1.0).to_event(1))

    with pytest.raises(ValueError, match=r"'mu' is outside pyro.plate\('data'\).*Global"):
        IWAE(num_particles=2).loss(model, guide, x)
    # STL_ELBO has no such restriction.
    assert math.isfinite(STL_ELBO().loss(model, guide, x))


def test_model_latent_without_guide_site_and_discrete_guide_are_rejected():
    x = _data(3).float()

    def model(x):
        with pyro.plate("data", x.shape[0]):
            c = pyro.sample("c", dist.Bernoulli(0.5 * torch.ones(())))
            z = pyro.sample("z", dist.Normal(c, 1.0))
            pyro.sample("x", dist.Normal(z.unsqueeze(-1), 1.0).to_event(1), obs=x)

    def guide_without_c(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(0.0, 1.0))

    def guide_discrete(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("c", dist.Bernoulli(0.5 * torch.ones(())))
            pyro.sample("z", dist.Normal(0.0, 1.0))

    with pytest.warns(UserWarning), pytest.raises(ValueError, match="'c' has no guide site"):
        IWAE(num_particles=2).loss(model, guide_without_c, x)
    # The standard estimator's value works with a discrete guide; gradients through
    # the path derivative do not exist.
    assert math.isfinite(IWAE(num_particles=2).loss(model, guide_discrete, x))
    for estimator in ("standard", "dreg"):
        with pytest.raises(ValueError, match="'c' .* not reparameterizable"):
            IWAE(num_particles=2, estimator=estimator).differentiable_loss(
                model, guide_discrete, x)


def test_bad_options_and_registry_names():
    with pytest.raises(ValueError, match="estimator must be one of"):
        IWAE(estimator="vimco")
    with pytest.raises(ValueError, match="num_particles must be a positive integer"):
        IWAE(num_particles=0)
    for name, estimator in (("IWAE", "standard"), ("IWAE-STL", "stl"), ("IWAE-DReG", "dreg")):
        objective = make_objective(name, num_particles=4, vectorize_particles=True)
        assert isinstance(objective, IWAE)
        assert (objective.estimator, objective.num_particles) == (estimator, 4)
    assert make_objective("IWAE", 2, estimator="dreg").estimator == "dreg"
    with pytest.raises(ValueError, match="fixes estimator='dreg'"):
        make_objective("IWAE-DReG", 2, estimator="stl")
    assert isinstance(ELBOS["STL_ELBO"](num_particles=3), STL_ELBO)


# -- gradients: exact identities -----------------------------------------------------
def test_one_particle_identities():
    x = _data(6)
    lg = _build(x)
    trace_elbo = _grads(lg, Trace_ELBO(), x, seed=3)
    standard = _grads(lg, IWAE(num_particles=1, estimator="standard"), x, seed=3)
    stl = _grads(lg, IWAE(num_particles=1, estimator="stl"), x, seed=3)
    dreg = _grads(lg, IWAE(num_particles=1, estimator="dreg"), x, seed=3)
    stl_elbo = _grads(lg, STL_ELBO(), x, seed=3)
    for key in trace_elbo:
        # K = 1: IWAE is the ELBO, and DReG (weights 1) is STL.
        torch.testing.assert_close(standard[key], trace_elbo[key], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(stl[key], stl_elbo[key], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(dreg[key], stl_elbo[key], rtol=1e-10, atol=1e-12)
    # STL only changes the guide's gradient.
    for key in ("W", "b"):
        torch.testing.assert_close(stl_elbo[key], trace_elbo[key], rtol=1e-10, atol=1e-12)
    assert not torch.allclose(stl_elbo["loc"], trace_elbo["loc"])


@pytest.mark.parametrize("vectorize", [False, True])
def test_dreg_gives_model_parameters_the_standard_gradient(vectorize):
    x = _data(6)
    lg = _build(x)
    standard = _grads(lg, IWAE(num_particles=5, vectorize_particles=vectorize), x, seed=4)
    dreg = _grads(lg, IWAE(num_particles=5, vectorize_particles=vectorize, estimator="dreg"),
                  x, seed=4)
    for key in ("W", "b"):
        torch.testing.assert_close(dreg[key], standard[key], rtol=1e-10, atol=1e-12)
    assert not torch.allclose(dreg["loc"], standard["loc"])


def test_path_derivative_guide_gradients_vanish_at_the_exact_posterior():
    x = _data(6)
    lg = _build(x, exact=True)
    for objective in (STL_ELBO(num_particles=3), IWAE(num_particles=5, estimator="stl"),
                      IWAE(num_particles=5, vectorize_particles=True, estimator="dreg")):
        g = _grads(lg, objective, x, seed=5)
        assert g["loc"].abs().max() < 1e-12 and g["tril"].abs().max() < 1e-12
        assert g["W"].abs().max() > 1e-3  # model gradients are still there
    g = _grads(lg, IWAE(num_particles=5), x, seed=5)
    assert g["loc"].abs().max() > 1e-2  # the standard estimator is noisy even here


def test_path_derivative_keeps_dependence_between_guide_sites():
    # z1 ~ N(0, 1), z2 | z1 ~ N(z1, 1), x | z2 ~ N(z2, 1). Exact posterior:
    # z1 | x ~ N(x / 3, 2 / 3), z2 | z1, x ~ N((z1 + x) / 2, 1 / 2). The guide
    # q(z1) q(z2 | z1) has that form; at the exact values log p(x, z) - log q(z)
    # is constant in z, so path derivatives vanish only if d log q(z2 | z1) / d z1
    # is kept (detaching q(z2 | z1)'s parameters would drop it).
    x = torch.tensor([0.5, -1.0, 2.0], dtype=DTYPE)
    exact = {"a": x / 3, "log_s1": torch.full_like(x, 0.5 * math.log(2 / 3)),
             "c": torch.full_like(x, 0.5), "log_s2": torch.full_like(x, 0.5 * math.log(0.5))}
    params = {k: v.clone().requires_grad_() for k, v in exact.items()}  # not registered

    def model(x):
        with pyro.plate("data", 3):
            z1 = pyro.sample("z1", dist.Normal(torch.zeros(3, dtype=DTYPE), 1.0))
            z2 = pyro.sample("z2", dist.Normal(z1, 1.0))
            pyro.sample("x", dist.Normal(z2, 1.0), obs=x)

    def guide(x):
        with pyro.plate("data", 3):
            z1 = pyro.sample("z1", dist.Normal(params["a"], params["log_s1"].exp()))
            pyro.sample("z2", dist.Normal(params["c"] * z1 + 0.5 * x, params["log_s2"].exp()))

    for objective in (STL_ELBO(), IWAE(num_particles=4, vectorize_particles=True,
                                       estimator="dreg")):
        pyro.set_rng_seed(9)
        loss = objective.differentiable_loss(model, guide, x)
        grads = torch.autograd.grad(loss, list(params.values()))
        assert max(g.abs().max().item() for g in grads) < 1e-12
    pyro.set_rng_seed(9)
    grads = torch.autograd.grad(Trace_ELBO().differentiable_loss(model, guide, x),
                                list(params.values()))
    assert max(g.abs().max().item() for g in grads) > 1e-2


class Unregistered(LinearGaussian):
    """The same guide with its parameters hidden from Pyro's param store."""

    def guide(self, x):
        with self._plate(x) as idx:
            pyro.sample("z", dist.MultivariateNormal(self.encoder.loc[idx],
                                                     scale_tril=self.encoder.tril[idx],
                                                     validate_args=False))


def test_dreg_finds_guide_parameters_that_are_not_registered():
    x = _data(6)
    registered = _build(x)
    hidden = Unregistered(x, registered.decoder.W, registered.decoder.b,
                          registered.decoder.log_s.exp(), registered.encoder.loc,
                          registered.encoder.tril)
    objective = IWAE(num_particles=5, vectorize_particles=True, max_plate_nesting=1,
                     estimator="dreg")
    want = _grads(registered, objective, x, seed=10)
    got = _grads(hidden, objective, x, seed=10)
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-10, atol=1e-12)


# -- gradients: unbiasedness and variance ----------------------------------------------
def _components(g):
    """(R, C) draws of the guide gradient's non-trivial components."""
    flat = torch.cat([g["loc"], g["tril"].tril().flatten(1)], dim=1)
    return flat[:, flat.var(0) > 0]


def _paired(a, b):
    """Per-component |mean(a - b)| / its standard error."""
    d = a - b
    return d.mean(0).abs() / (d.std(0) / math.sqrt(d.shape[0]))


REPLICAS = 4000


@pytest.fixture(scope="module")
def replicated():
    x = _data(1).expand(REPLICAS, D).contiguous()
    pyro.clear_param_store()
    return x, _build(x)


def test_dreg_is_unbiased_with_lower_variance_than_standard_iwae(replicated):
    x, lg = replicated
    k = 8
    std = _components(_grads(lg, IWAE(num_particles=k, vectorize_particles=True), x, seed=6))
    dreg = _components(_grads(
        lg, IWAE(num_particles=k, vectorize_particles=True, estimator="dreg"), x, seed=6))
    assert _paired(dreg, std).max() < 4
    ratio = dreg.var(0) / std.var(0)
    assert (ratio < 0.2).all(), ratio  # about 0.03-0.08 per component


def test_stl_elbo_is_unbiased_with_lower_variance_than_the_reparameterized_elbo(replicated):
    x, lg = replicated
    std = _components(_grads(lg, Trace_ELBO(), x, seed=7))
    stl = _components(_grads(lg, STL_ELBO(), x, seed=7))
    assert _paired(stl, std).max() < 4
    ratio = stl.var(0) / std.var(0)
    assert (ratio < 0.7).all(), ratio  # about 0.24-0.52 per component


def test_stl_for_iwae_with_several_particles_is_biased(replicated):
    x, lg = replicated
    k = 8
    std = _components(_grads(lg, IWAE(num_particles=k, vectorize_particles=True), x, seed=8))
    stl = _components(_grads(
        lg, IWAE(num_particles=k, vectorize_particles=True, estimator="stl"), x, seed=8))
    assert _paired(stl, std).max() > 10
