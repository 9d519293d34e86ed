"""The ladder VAE: exact identities first (one layer is the flat VAE; precision
weighting is the normalized product of two Gaussians; the guide's wiring),
then the capabilities' shapes and ranges, then short training runs with every
objective and a run of the pipeline."""

import math

import pyro.distributions as dist
import pyro.poutine as poutine
import pytest
import torch
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO
from torch import nn

from pyrovae.infer import ELBOS, fit
from pyrovae.infer.program import resolve
from pyrovae.infer.traces import sample_log_weights
from pyrovae.models import MODELS, VAE, LadderVAE
from pyrovae.models.ladder import LadderEncoder, StraightThroughBernoulli, precision_weighted
from pyrovae.pipeline import EvalSettings, RunSpec, load_run, run
from pyrovae.seeding import seeded

D = 12


def _binary(n=16, d=D, seed=0):
    return torch.bernoulli(torch.rand(n, d, generator=torch.Generator().manual_seed(seed)))


def _ladder(**options):
    options = {"z_dims": (3, 2), "hidden": (10, 8), "block_depth": 1, **options}
    with seeded(0):
        return LadderVAE(D, **options)


def _traces(model, guide, x, seed=0):
    with seeded(seed):
        guide_trace = poutine.trace(guide).get_trace(x)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(x)
    guide_trace.compute_log_prob()
    model_trace.compute_log_prob()
    return model_trace, guide_trace


# -- exact identities -------------------------------------------------------------------
@pytest.mark.parametrize("likelihood, depth, act", [("bernoulli", 1, "softplus"),
                                                    ("gaussian", 2, "tanh")])
def test_one_layer_ladder_is_the_flat_vae(likelihood, depth, act):
    h, k = 9, 3
    with seeded(0):
        ladder = LadderVAE(D, z_dims=(k,), hidden=(h,), block_depth=depth, activation=act,
                           likelihood=likelihood)
        vae = VAE(D, z_dim=k, hidden=(h,) * depth, activation=act, likelihood=likelihood)
    # The flat VAE's MLPs are Sequential(Linear, act, Linear, act, ..., Linear): the
    # linear layers sit at even positions. The ladder's encoder is one block of
    # `depth` (Linear, act) pairs plus a read-out head; its decoder is the same
    # Sequential layout as the VAE's.
    pairs = [(vae.encoder.net[2 * i], ladder.encoder.blocks[0][2 * i]) for i in range(depth)]
    pairs.append((vae.encoder.net[2 * depth], ladder.encoder.heads[0]))
    pairs += [(vae.decoder[2 * i], ladder.decoder[2 * i]) for i in range(depth + 1)]
    with torch.no_grad(), seeded(1):
        for flat, lad in pairs:
            assert isinstance(flat, nn.Linear) and isinstance(lad, nn.Linear)
            flat.weight.copy_(torch.randn_like(flat.weight))
            flat.bias.copy_(torch.randn_like(flat.bias))
            lad.weight.copy_(flat.weight)
            lad.bias.copy_(flat.bias)
        if likelihood == "gaussian":
            vae.decoder.raw_scale.copy_(torch.randn(D))
            ladder.decoder.raw_scale.copy_(vae.decoder.raw_scale)

    x = _binary() if likelihood == "bernoulli" else torch.randn(16, D, generator=torch.Generator().manual_seed(0))
    lad_model, lad_guide = _traces(ladder.model, ladder.guide, x)
    vae_model, vae_guide = _traces(vae.model, vae.guide, x)
    torch.testing.assert_close(lad_guide.nodes["z1"]["value"], vae_guide.nodes["z"]["value"])
    torch.testing.assert_close(lad_guide.nodes["z1"]["log_prob"], vae_guide.nodes["z"]["log_prob"])
    for lad_site, vae_site in (("z1", "z"), ("x", "x")):
        torch.testing.assert_close(lad_model.nodes[lad_site]["log_prob"],
                                   vae_model.nodes[vae_site]["log_prob"])
    with seeded(1):
        lad_loss = Trace_ELBO().loss(ladder.model, ladder.guide, x)
    with seeded(1):
        vae_loss = Trace_ELBO().loss(vae.model, vae.guide, x)
    assert lad_loss == pytest.approx(vae_loss, rel=1e-6)


def test_precision_weighting_is_the_normalized_product_of_two_gaussians():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(5, generator=g, dtype=torch.float64), torch.randn(5, generator=g, dtype=torch.float64)
    sa = 0.2 + torch.rand(5, generator=g, dtype=torch.float64)
    sb = 0.2 + torch.rand(5, generator=g, dtype=torch.float64)
    loc, scale = precision_weighted(a, sa, b, sb)
    # Closed form: N(a, A) N(b, B) is proportional to N((aB + bA)/(A + B), AB/(A + B)).
    A, B = sa ** 2, sb ** 2
    torch.testing.assert_close(scale ** 2, A * B / (A + B))
    torch.testing.assert_close(loc, (a * B + b * A) / (A + B))
    # The product's normalizing constant is N(a; b, A + B) for every z.
    z = torch.randn(7, 5, generator=g, dtype=torch.float64)
    normal = torch.distributions.Normal
    log_ratio = normal(a, sa).log_prob(z) + normal(b, sb).log_prob(z) - normal(loc, scale).log_prob(z)
    torch.testing.assert_close(log_ratio, normal(b, (A + B).sqrt()).log_prob(a).expand(7, 5))


@pytest.mark.parametrize("latent", ["gaussian", "bernoulli"])
def test_the_guide_merges_bottom_up_terms_with_the_models_own_top_down_conditionals(latent):
    model = _ladder(z_dims=(4, 3, 2), hidden=(10, 8, 6), latent=latent)
    x = _binary()
    model_trace, guide_trace = _traces(model.model, model.guide, x)
    assert [n for n, s in guide_trace.nodes.items() if s["type"] == "sample" and n != "data"] \
        == ["z3", "z2", "z1"]
    bottom_up = model.encoder(x)
    for l in (2, 1):
        q = guide_trace.nodes[f"z{l}"]["fn"].base_dist
        p = model_trace.nodes[f"z{l}"]["fn"].base_dist  # p(z_l | z_{l+1}) at the guide's draw
        if latent == "gaussian":
            loc, scale = precision_weighted(bottom_up[2 * l - 2], bottom_up[2 * l - 1], p.loc, p.scale)
            torch.testing.assert_close(q.loc, loc)
            torch.testing.assert_close(q.scale, scale)
        else:  # the normalized product of two Bernoullis adds their logits
            torch.testing.assert_close(q.logits, bottom_up[l - 1] + p.logits)
    top = guide_trace.nodes["z3"]["fn"].base_dist
    torch.testing.assert_close(top.loc if latent == "gaussian" else top.logits,
                               bottom_up[4] if latent == "gaussian" else bottom_up[2])
    # The top-down networks are registered in both programs (shared parameters).
    with poutine.trace(param_only=True) as params_model:
        model.model(x)
    with poutine.trace(param_only=True) as params_guide:
        model.guide(x)
    shared = {n for n in params_model.trace.nodes if "top_down" in n}
    assert len(shared) == len(list(model.top_down.parameters())) == 8
    assert shared <= set(params_guide.trace.nodes)


def test_the_guide_reads_the_data_only_through_the_encoder():
    model = _ladder(z_dims=(4, 2), hidden=(10, 8))
    fixed = model.encoder(_binary(seed=1))

    class Replaced(nn.Module):  # what a per-data-point optimization of q puts in place
        def forward(self, x):
            return fixed

    model.encoder = Replaced()
    traces = [_traces(model.model, model.guide, _binary(seed=s))[1] for s in (2, 3)]
    for name in ("z2", "z1"):
        torch.testing.assert_close(traces[0].nodes[name]["log_prob"], traces[1].nodes[name]["log_prob"])


def test_encoder_raw_is_one_tensor_that_params_splits_per_layer():
    enc = LadderEncoder(D, (4, 2), (10, 8), block_depth=2)
    x = _binary(5)
    raw = enc.raw(x)
    assert raw.shape == (5, 2 * (4 + 2))
    loc1, scale1, loc2, scale2 = enc.params(raw)
    assert [t.shape for t in (loc1, scale1, loc2, scale2)] == [(5, 4), (5, 4), (5, 2), (5, 2)]
    torch.testing.assert_close(loc1, raw[:, :4])
    torch.testing.assert_close(scale2, nn.functional.softplus(raw[:, 10:]) + 1e-4)
    binary = LadderEncoder(D, (4, 2), (10, 8), latent="bernoulli")
    assert binary.raw(x).shape == (5, 6) and [t.shape for t in binary(x)] == [(5, 4), (5, 2)]


def test_binary_latents_are_exact_bits_scored_as_bernoulli_with_a_straight_through_gradient():
    logits = torch.randn(400, 3, requires_grad=True)
    d = StraightThroughBernoulli(torch.tensor(0.5), logits=logits)
    z = d.rsample()
    assert set(z.unique().tolist()) <= {0.0, 1.0}
    torch.testing.assert_close(d.log_prob(z), dist.Bernoulli(logits=logits).log_prob(z))
    torch.testing.assert_close(d.log_prob(z.detach()), d.log_prob(z))  # no hidden state needed
    z.sum().backward()
    # Backward is the relaxed draw's gradient, sigmoid((logits + noise) / T)' >= 0
    # (0 only where float32 underflows), where the hard draw has none.
    assert bool((logits.grad >= 0).all()) and (logits.grad > 0).float().mean() > 0.9
    # The draws are Bernoulli(sigmoid(logits)): mean within 5 standard errors.
    probs = torch.full((20000,), 0.3)
    bits = StraightThroughBernoulli(torch.tensor(0.5), probs=probs).rsample()
    assert abs(bits.mean().item() - 0.3) < 5 * math.sqrt(0.3 * 0.7 / 20000)


def test_mean_field_elbo_uses_closed_form_kl_for_gaussian_layers_and_samples_for_binary():
    x = _binary(4)
    gauss = _ladder()
    with torch.no_grad(), seeded(0):
        # Both estimate the same ELBO; with 4000 particles the Monte Carlo
        # error of the sampled one is far below 0.5 nats per batch.
        sampled = Trace_ELBO(num_particles=4000, vectorize_particles=True).loss(gauss.model, gauss.guide, x)
        analytic = TraceMeanField_ELBO(num_particles=4000, vectorize_particles=True).loss(
            gauss.model, gauss.guide, x)
    assert analytic == pytest.approx(sampled, abs=0.5)
    binary = _ladder(latent="bernoulli")
    with seeded(1):
        sampled = Trace_ELBO().loss(binary.model, binary.guide, x)
    with seeded(1):
        fallback = TraceMeanField_ELBO().loss(binary.model, binary.guide, x)
    assert fallback == pytest.approx(sampled, rel=1e-6)  # no KL in closed form: same draws, same value


# -- capabilities ----------------------------------------------------------------------
@pytest.mark.parametrize("latent", ["gaussian", "bernoulli"])
def test_capabilities_have_the_contract_shapes_and_ranges(latent):
    model = _ladder(z_dims=(4, 3, 2), hidden=(10, 8, 6), latent=latent)
    x = _binary(7)
    z = model.encode(x)
    assert z.shape == (7, 2) and model.z_dim == 2
    if latent == "bernoulli":
        assert bool(((z > 0) & (z < 1)).all())
    mean = model.decode(z)
    assert mean.shape == (7, D) and bool(((mean > 0) & (mean < 1)).all())
    torch.testing.assert_close(model.reconstruct(x), mean)
    # decode sets every lower layer to its conditional mean on the way down
    with torch.no_grad():
        z2 = model.conditional_prior(2, z).mean
        torch.testing.assert_close(mean, model.likelihood_dist(model.conditional_prior(1, z2).mean).mean)
    draws = model.sample(50, generator=torch.Generator().manual_seed(0))
    assert draws.shape == (50, D) and set(draws.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(draws, model.sample(50, generator=torch.Generator().manual_seed(0)))
    means = model.sample_mean(50, generator=torch.Generator().manual_seed(0))
    assert means.shape == (50, D) and bool(((means > 0) & (means < 1)).all())
    model.check_data(x)
    with pytest.raises(ValueError, match="binary data"):
        model.check_data(x * 0.5)
    with pytest.raises(ValueError, match=r"top layer, shape \(N, 2\)"):
        model.decode(torch.zeros(3, 4))
    with pytest.raises(ValueError, match=f"expects data with {D} columns"):
        model.encode(torch.zeros(3, D + 1))


def test_samples_are_ancestral_draws_and_gaussian_noise_has_the_likelihood_scale():
    model = _ladder(likelihood="gaussian", scale=0.5)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        z2 = torch.randn(3000, 2, generator=g)
        p = model.conditional_prior(1, z2).base_dist
        loc, scale = p.loc, p.scale
        z1 = loc + scale * torch.randn(3000, 3, generator=g)
        expected = model.decoder(z1)
    means = model.sample_mean(3000, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(means, expected)
    draws = model.sample(3000, generator=torch.Generator().manual_seed(0))
    assert (draws - means).std().item() == pytest.approx(0.5, rel=0.05)


def test_options_config_and_seeded_construction():
    assert MODELS["ladder-vae"] is LadderVAE
    assert LadderVAE(D).z_dims == (64, 32) and LadderVAE(D, z_dim=2).z_dims == (64, 2)
    assert LadderVAE(D, z_dims=[5, 4, 3], z_dim=3).config()["hidden"] == [512, 256, 128]
    model = _ladder(latent="bernoulli", batch_norm=True, temperature=0.3)
    config = model.config()
    assert config["z_dims"] == [3, 2] and config["temperature"] == 0.3
    with seeded(0):
        again = LadderVAE(**config)
    assert again.config() == config
    state, other = model.state_dict(), again.state_dict()
    assert state.keys() == other.keys() and all(torch.equal(state[k], other[k]) for k in state)
    with seeded(1):
        different = LadderVAE(**config)
    assert not torch.equal(different.decoder[0].weight, model.decoder[0].weight)

    bad = [
        (dict(z_dims=[4, 2], z_dim=3), ValueError, "disagree"),
        (dict(z_dims=[4, 2], hidden=[8]), ValueError, "one width per stochastic layer"),
        (dict(z_dims=[]), TypeError, "non-empty list"),
        (dict(z_dims=[4, 0]), ValueError, r"z_dims\[1\] must be an integer >= 1"),
        (dict(latent="binary"), ValueError, "latent must be one of"),
        (dict(temperature=0), ValueError, "temperature must be"),
        (dict(likelihood="poisson"), ValueError, "likelihood must be one of"),
        (dict(scale=-1.0), ValueError, "scale must be"),
        (dict(activation="swish"), ValueError, "unknown activation"),
        (dict(block_depth=0), ValueError, "block_depth must be"),
        (dict(batch_norm="yes"), TypeError, "batch_norm must be"),
    ]
    for options, error, message in bad:
        with pytest.raises(error, match=message):
            LadderVAE(D, **options)


# -- training --------------------------------------------------------------------------
# The importance-weighted objectives get two vectorized particles, which also
# runs every network under a particle dimension.
PARTICLES = {name: {"num_particles": 2, "vectorize_particles": True}
             for name in ("IWAE", "IWAE-STL", "IWAE-DReG", "RenyiELBO")}


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::torch.jit.TracerWarning")
@pytest.mark.parametrize("latent", ["gaussian", "bernoulli"])
@pytest.mark.parametrize("elbo", sorted(ELBOS))
def test_every_objective_trains_two_layers(elbo, latent):
    # Every objective applies to both variants: the straight-through guide is
    # reparameterized, and TraceMeanField_ELBO falls back to sampling for the
    # binary layers (checked above).
    model = _ladder(latent=latent)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    result = fit(model, _binary(32), epochs=2, batch_size=16, progress=False, eval_every=0,
                 elbo=elbo, **PARTICLES.get(elbo, {}))
    assert result.steps == 4 and math.isfinite(result.final["train_elbo"])
    unchanged = [n for n, p in model.named_parameters() if torch.equal(p, before[n])]
    assert unchanged == []


def test_batch_norm_trains_in_training_mode_and_probes_without_touching_statistics():
    model = _ladder(batch_norm=True)
    bn = model.top_down[0][1]
    assert isinstance(bn, nn.BatchNorm1d)
    x = _binary(32)
    resolve(model, None, x)
    assert bn.num_batches_tracked.item() == 0 and model.training
    # Two vectorized particles put a particle dimension in front of the batch.
    fit(model, x, epochs=1, batch_size=16, progress=False, eval_every=0, elbo="IWAE",
        num_particles=2, vectorize_particles=True)
    assert bn.num_batches_tracked.item() > 0 and not bool(torch.equal(bn.running_mean, torch.zeros(8)))
    assert not model.training  # fit leaves the model in evaluation mode
    assert model.sample(1).shape == (1, D)  # running statistics serve a batch of one


def test_pipeline_trains_saves_and_loads_a_ladder_vae(tmp_path):
    options = {"z_dims": [4, 2], "hidden": [16, 8], "likelihood": "gaussian"}
    spec = RunSpec(model="ladder-vae", model_options=options, dataset="synthetic-ppca",
                   dataset_options={"n": 96, "x_dim": 6},
                   fit={"epochs": 1, "batch_size": 32, "progress": False},
                   eval=EvalSettings(num_samples=10, max_points=32), out=str(tmp_path / "run"))
    result = run(spec)
    assert math.isfinite(result.metrics["test_elbo"]) and math.isfinite(result.metrics["test_iwae"])
    model = load_run(tmp_path / "run")
    assert isinstance(model, LadderVAE) and model.z_dims == (4, 2) and model.likelihood == "gaussian"
    trained = result.model.state_dict()
    assert all(torch.equal(v, trained[k]) for k, v in model.state_dict().items())


def test_binary_latents_give_importance_weights_whose_mean_is_the_exact_likelihood():
    # Two layers of two bits: p(x) sums over the 16 configurations exactly. The
    # guide's draws are scored as the Bernoulli bits they are, so
    # p(x, z) / q(z | x) averages to p(x).
    model = _ladder(z_dims=(2, 2), hidden=(8, 6), latent="bernoulli")
    x = _binary(3)
    bits = torch.tensor([[a, b] for a in (0.0, 1.0) for b in (0.0, 1.0)])
    with torch.no_grad():
        z2, z1 = bits.repeat_interleave(4, 0), bits.repeat(4, 1)  # all 16 pairs
        log_joint = (dist.Bernoulli(probs=0.5).log_prob(z2).sum(-1)
                     + model.conditional_prior(1, z2).log_prob(z1)
                     + model.likelihood_dist(z1.unsqueeze(1)).log_prob(x).T)
        exact = torch.logsumexp(log_joint, dim=-1)  # (3 points, 16 configurations) -> (3,)
        with seeded(0):
            weights = sample_log_weights(model.model, model.guide, x, num_particles=5000)
    estimate = torch.logsumexp(weights.log_w, 0) - math.log(5000)
    # The weights' effective sample size is above 80% of the draws, which puts
    # the estimate within about 0.01 nats. Scoring the draws with Pyro's relaxed
    # (Concrete) density instead is off by about 3 nats here.
    torch.testing.assert_close(estimate, exact, atol=0.05, rtol=0)
    assert bool((weights.log_w.mean(0) < exact).all())  # the ELBO is below log p(x)
