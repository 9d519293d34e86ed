"""The VAE variants (convolutional networks, IAF guide, VampPrior) under
every objective, and rebuilt from their checkpoints.

Smoke tier: each registered objective trains each variant for two steps on
random binary 8 x 8 images; the loss must stay finite and every parameter
(the flow's and the pseudo-inputs' included) must move. Importance-weighted
objectives draw their particles vectorized, so the networks, the flow and
the VampPrior also see latents with a leading particle dimension.
"""

import math

import pytest
import torch

from pyrovae import load_run, seeded
from pyrovae.infer import ELBOS, fit
from pyrovae.models import MODELS

X_DIM = 64  # 8 x 8 images
VARIANTS = {
    "conv-vae": ("conv-vae", dict(z_dim=2, channels=[2, 4])),
    "vae-iaf": ("vae", dict(z_dim=2, hidden=[8], flows=2, context_dim=3)),
    "vae-vamp": ("vae", dict(z_dim=2, hidden=[8], prior="vamp", pseudo_inputs=5)),
    "conv-vae-iaf-vamp": ("conv-vae", dict(z_dim=2, channels=[2, 4], flows=1, context_dim=2,
                                           prior="vamp", pseudo_inputs=3)),
}
# Every objective registered in ELBOS fits continuous latents; importance-
# weighted ones get two (vectorized) particles so that their weights are
# not trivial.
MULTI = ("RenyiELBO", "IWAE", "IWAE-STL", "IWAE-DReG")


def data(n=64):
    return torch.bernoulli(torch.full((n, X_DIM), 0.3), generator=torch.Generator().manual_seed(0))


def build(variant):
    name, options = VARIANTS[variant]
    with seeded(0):
        return MODELS[name](X_DIM, **options)


@pytest.mark.filterwarnings("ignore")  # the Jit objectives' tracer warnings
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_objective_trains_every_variant(variant):
    x = data()
    for elbo in sorted(ELBOS):
        model = build(variant)
        before = {k: p.detach().clone() for k, p in model.named_parameters()}
        result = fit(model, x, elbo=elbo, max_steps=2, batch_size=32, progress=False,
                     eval_every=0, num_particles=2 if elbo in MULTI else 1,
                     vectorize_particles=elbo in MULTI)
        assert result.steps == 2, elbo
        assert math.isfinite(float(result.history["train_elbo"].iloc[-1])), elbo
        frozen = [k for k, p in model.named_parameters() if torch.equal(p.detach(), before[k])]
        assert not frozen, f"{elbo} left {frozen} unchanged"


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_load_run_rebuilds_each_variant_from_its_checkpoint(variant, tmp_path):
    model = build(variant)
    x = data(32)
    fit(model, x, max_steps=1, batch_size=32, progress=False, eval_every=0,
        checkpoint_dir=str(tmp_path))
    loaded = load_run(tmp_path)
    assert type(loaded) is type(model) and loaded.config() == model.config()
    state, again = model.state_dict(), loaded.state_dict()
    assert set(state) == set(again) and all(torch.equal(state[k], again[k]) for k in state)
    assert torch.equal(loaded.encode(x), model.encode(x))
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    assert torch.equal(loaded.sample(3, generator=gen()), model.sample(3, generator=gen()))
