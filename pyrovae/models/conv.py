"""Convolutional VAE for images.

The model and guide are those of :class:`pyrovae.models.vae.VAEBase` (prior
N(0, I) or VampPrior, Bernoulli or Gaussian likelihood, Gaussian or IAF
guide); only the networks differ. Images come flattened, (N, C*H*W), as for
every model, and are reshaped inside the networks. The encoder
(:class:`pyrovae.guides.ConvEncoder`) applies stride-2 convolutions, each
halving the height and width, then fully connected layers to the guide's
parameters; the decoder (:class:`pyrovae.nn.DeconvNet`) mirrors it with
stride-2 transposed convolutions. Strided convolutions take the place of
pooling and upsampling as in [1]; the 4x4 kernels are divisible by the
stride, which keeps transposed convolutions free of checkerboard patterns [2].

References

[1] A. Radford, L. Metz and S. Chintala, "Unsupervised Representation
    Learning with Deep Convolutional Generative Adversarial Networks", ICLR
    2016.
[2] A. Odena, V. Dumoulin and C. Olah, "Deconvolution and Checkerboard
    Artifacts", Distill, 2016.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

from pyrovae.guides import ConvEncoder
from pyrovae.models.registry import MODELS
from pyrovae.models.vae import VAEBase
from pyrovae.nn import DeconvNet, image_shape_of


@MODELS.register("conv-vae")
class ConvVAE(VAEBase):
    """VAE with convolutional encoder and transposed-convolutional decoder.

    Args:
        x_dim: pixels per image, C * H * W (784 for flattened MNIST).
        z_dim: latent dimension.
        channels: output channels of the encoder's convolutions in order
            (1 -> 32 -> 64 for MNIST with the default); the decoder runs
            through them in reverse back to C.
        hidden: fully connected layers between the convolutions and the
            latent code (empty: one linear map each way).
        activation: nonlinearity of both networks and the flow.
        image_shape: (C, H, W) or (H, W); ``None``: square single-channel
            images (784 -> 28 x 28).
        likelihood, scale: as for :class:`pyrovae.models.vae.VAE`.
        flows, flow_hidden, context_dim: the IAF guide (``flows = 0``: none),
            see :class:`pyrovae.models.vae.VAEBase`.
        prior, pseudo_inputs: ``"normal"`` or ``"vamp"`` with K pseudo-inputs,
            see :class:`pyrovae.models.vae.VAEBase`.
    """

    def __init__(
        self,
        x_dim: int,
        z_dim: int = 50,
        channels: Sequence[int] = (32, 64),
        hidden: Sequence[int] = (),
        activation: str = "relu",
        image_shape: Optional[Sequence[int]] = None,
        likelihood: str = "bernoulli",
        scale: Union[str, float] = "learned",
        flows: int = 0,
        flow_hidden: Sequence[int] = (),
        context_dim: int = 32,
        prior: str = "normal",
        pseudo_inputs: int = 500,
    ) -> None:
        super().__init__(
            x_dim, z_dim, activation=activation, likelihood=likelihood, scale=scale,
            flows=flows, flow_hidden=flow_hidden, context_dim=context_dim, prior=prior,
            pseudo_inputs=pseudo_inputs,
        )
        shape = image_shape_of(x_dim, image_shape)
        channels, hidden = [int(c) for c in channels], [int(h) for h in hidden]
        self.image_shape = shape
        self._config.update(channels=channels, hidden=hidden,
                            image_shape=None if image_shape is None else list(shape))
        decoder = DeconvNet(z_dim, channels, shape, hidden[::-1], activation)
        encoder = self.make_encoder(ConvEncoder, x_dim, z_dim, hidden, activation,
                                    channels=channels, image_shape=shape)
        self.set_networks(decoder, encoder)
