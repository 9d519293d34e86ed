"""The convolutional VAE: network shapes for even and odd image sizes, the
model's log-densities against a hand computation, deterministic weights,
the model contract, and clear errors for data that are not images."""

import pyro.poutine as poutine
import pytest
import torch
from torch import nn

from pyrovae import seeded
from pyrovae.models import MODELS, capability
from pyrovae.models.conv import ConvVAE
from pyrovae.nn import ConvNet, DeconvNet, image_shape_of


@pytest.mark.parametrize("shape,channels", [((1, 28, 28), (32, 64)), ((1, 7, 7), (2, 3)),
                                            ((3, 9, 4), (2, 3, 4)), ((1, 1, 1), (2,))])
def test_networks_map_flattened_images_and_back_keeping_leading_dimensions(shape, channels):
    d = shape[0] * shape[1] * shape[2]
    enc, dec = ConvNet(shape, channels, 5), DeconvNet(5, channels, shape)
    x = torch.rand(2, 3, d)
    assert enc(x).shape == (2, 3, 5)
    assert dec(enc(x)).shape == (2, 3, d)
    # Each stride-2 convolution halves height and width, rounding up.
    h, w = shape[1:]
    maps = enc.convs(x.reshape(-1, *shape))
    for _ in channels:
        h, w = (h + 1) // 2, (w + 1) // 2
    assert maps.shape == (6, channels[-1], h, w)
    convs = [m.out_channels for m in enc.convs if isinstance(m, nn.Conv2d)]
    deconvs = [m.out_channels for m in dec.deconvs if isinstance(m, nn.ConvTranspose2d)]
    assert convs == list(channels) and deconvs == [*channels[:-1][::-1], shape[0]]


def test_image_shape_is_inferred_for_square_images_and_checked_otherwise():
    assert image_shape_of(784) == (1, 28, 28)
    assert image_shape_of(12, (3, 4)) == (1, 3, 4)
    with pytest.raises(ValueError, match="not square single-channel images; pass image_shape"):
        ConvVAE(10)
    with pytest.raises(ValueError, match="whose product is the number of columns 12"):
        ConvVAE(12, image_shape=(2, 3, 3))
    with pytest.raises(ValueError, match="channels must be a non-empty list"):
        ConvVAE(16, channels=())


@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian"])
def test_model_log_densities_match_the_decoder_and_encoder_by_hand(likelihood):
    with seeded(0):
        model = ConvVAE(64, z_dim=3, channels=(2, 3), likelihood=likelihood).double()
    x = torch.bernoulli(torch.full((5, 64), 0.3, dtype=torch.float64))
    guide = poutine.trace(model.guide).get_trace(x)
    trace = poutine.trace(poutine.replay(model.model, trace=guide)).get_trace(x)
    guide.compute_log_prob()
    trace.compute_log_prob()
    z = guide.nodes["z"]["value"]
    mean = model.decode(z)
    if likelihood == "bernoulli":
        log_lik = torch.distributions.Bernoulli(probs=mean).log_prob(x).sum(-1)
    else:
        log_lik = torch.distributions.Normal(mean, model.noise_scale(mean)).log_prob(x).sum(-1)
    loc, scale = model.encoder(x)
    normal = torch.distributions.Normal
    torch.testing.assert_close(trace.nodes["x"]["log_prob"], log_lik, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(trace.nodes["z"]["log_prob"], normal(0.0, 1.0).log_prob(z).sum(-1))
    torch.testing.assert_close(guide.nodes["z"]["log_prob"], normal(loc, scale).log_prob(z).sum(-1))
    assert torch.equal(model.encode(x), loc)


def test_weights_are_decided_by_the_seed():
    def weights(seed, **options):
        with seeded(seed):
            return ConvVAE(64, z_dim=2, channels=(2, 3), **options).state_dict()

    a, b, c = weights(0), weights(0), weights(1)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)
    full = dict(flows=2, prior="vamp", pseudo_inputs=3, context_dim=2)
    a, b = weights(0, **full), weights(0, **full)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_conv_vae_meets_the_contract_of_the_vae():
    model = MODELS["conv-vae"](784, z_dim=4, channels=(2, 3))
    offered = {c for c in ("sample", "sample_mean", "encode", "reconstruct", "check_data",
                           "log_marginal", "posterior") if capability(model, c) is not None}
    assert offered == {"sample", "sample_mean", "encode", "reconstruct", "check_data"}
    x = torch.bernoulli(torch.full((3, 1, 28, 28), 0.2))  # images are flattened
    assert model.encode(x).shape == (3, 4) and model.reconstruct(x).shape == (3, 784)
    draws = model.sample(4, generator=torch.Generator().manual_seed(0))
    assert draws.shape == (4, 784) and set(draws.unique().tolist()) <= {0.0, 1.0}
    means = model.sample_mean(4, generator=torch.Generator().manual_seed(0))
    assert bool(((means > 0) & (means < 1)).all())
    with pytest.raises(ValueError, match="needs binary data"):
        model.check_data(torch.full((2, 784), 0.5))
    with pytest.raises(ValueError, match="expects data with 784 columns"):
        model.encode(torch.zeros(2, 100))
    rebuilt = ConvVAE(**model.config())
    rebuilt.load_state_dict(model.state_dict())
    assert torch.equal(rebuilt.encode(x), model.encode(x))
