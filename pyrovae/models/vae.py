"""Variational autoencoders with MLP encoder and decoder.

Generative process, for each data point n:

.. math::

    z_n \\sim \\mathcal{N}(0, I_d), \\qquad
    x_n \\mid z_n \\sim \\mathrm{Bernoulli}(\\sigma(f_\\theta(z_n)))
    \\ \\text{or}\\ \\mathcal{N}(f_\\theta(z_n), \\mathrm{diag}\\,s^2),

with the amortized guide q(z_n | x_n) = N(mu_phi(x_n), diag sigma_phi(x_n)^2)
[1].

References

[1] D. P. Kingma and M. Welling, "Auto-Encoding Variational Bayes", ICLR 2014.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import pyro
import pyro.distributions as dist
import torch
from torch import nn
from torch.nn.functional import softplus

from pyrovae.guides import GUIDES, encoder_distribution
from pyrovae.models import MODELS
from pyrovae.models.base import LatentModel
from pyrovae.nn import MLP

LIKELIHOODS = ("bernoulli", "gaussian")


@MODELS.register("vae")
class VAE(LatentModel):
    """VAE with an MLP decoder and an amortized diagonal-Normal guide.

    Args:
        x_dim: data dimension (784 for flattened MNIST).
        z_dim: latent dimension.
        hidden: hidden layer sizes of the decoder; the encoder mirrors them.
        activation: nonlinearity of both networks (see ``pyrovae.nn.ACTIVATIONS``).
        likelihood: ``"bernoulli"`` for binary data, ``"gaussian"`` otherwise.
        scale: for the Gaussian likelihood, ``"learned"`` (one learned standard
            deviation per data dimension) or a fixed positive float.
        encoder: name of the encoder in ``pyrovae.guides.GUIDES``.
    """

    def __init__(
        self,
        x_dim: int,
        z_dim: int = 50,
        hidden: Sequence[int] = (400,),
        activation: str = "softplus",
        likelihood: str = "bernoulli",
        scale: Union[str, float] = "learned",
        encoder: str = "mlp",
    ) -> None:
        super().__init__()
        if likelihood not in LIKELIHOODS:
            raise ValueError(f"likelihood must be one of {LIKELIHOODS}, got {likelihood!r}")
        if not (scale == "learned" or (isinstance(scale, (int, float)) and scale > 0)):
            raise ValueError(f"scale must be 'learned' or a positive number, got {scale!r}")
        hidden = tuple(int(h) for h in hidden)
        self._config = dict(
            x_dim=x_dim, z_dim=z_dim, hidden=list(hidden), activation=activation,
            likelihood=likelihood, scale=scale, encoder=encoder,
        )
        self.x_dim, self.z_dim = x_dim, z_dim
        self.likelihood = likelihood
        self.decoder = MLP(z_dim, hidden[::-1], x_dim, activation)
        if likelihood == "gaussian" and scale == "learned":
            self.decoder.raw_scale = nn.Parameter(torch.full((x_dim,), math.log(math.e - 1)))
            self.fixed_scale: Optional[float] = None
        else:
            self.fixed_scale = float(scale) if likelihood == "gaussian" else None
        self.encoder = GUIDES.get_checked(encoder)(x_dim, z_dim, hidden, activation)

    # -- the two Pyro programs -------------------------------------------------
    def model(self, x: torch.Tensor) -> None:
        self.register("decoder", self.decoder)
        with pyro.plate("data", x.shape[0]):
            prior = dist.Normal(x.new_zeros(self.z_dim), 1.0).to_event(1)
            z = pyro.sample("z", prior)
            pyro.sample("x", self.likelihood_dist(z), obs=x)

    def guide(self, x: torch.Tensor) -> None:
        self.register("encoder", self.encoder)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", encoder_distribution(self.encoder, x))

    # -- helpers -----------------------------------------------------------------
    def likelihood_dist(self, z: torch.Tensor) -> dist.Distribution:
        out = self.decoder(z)
        if self.likelihood == "bernoulli":
            # Dynamic binarization feeds exact 0/1 data; skipping the support
            # check keeps the hot path free of a full-tensor comparison.
            return dist.Bernoulli(logits=out, validate_args=False).to_event(1)
        if self.fixed_scale is None:
            scale = softplus(self.decoder.raw_scale) + 1e-3
        else:
            scale = out.new_tensor(self.fixed_scale)
        return dist.Normal(out, scale.expand_as(out)).to_event(1)

    def check_data(self, x: torch.Tensor) -> None:
        """Raise a clear error for data the likelihood cannot score."""
        if x.dim() != 2 or x.shape[-1] != self.x_dim:
            raise ValueError(
                f"VAE expects data of shape (N, {self.x_dim}); got {tuple(x.shape)}. "
                "Flatten images first (pyrovae.data loaders do)."
            )
        if self.likelihood == "bernoulli":
            if not bool(((x == 0) | (x == 1)).all()):
                raise ValueError(
                    "the Bernoulli likelihood needs binary data, but the data has values "
                    "strictly between 0 and 1; binarize it (binarize='dynamic' or "
                    "'static') or use likelihood='gaussian'"
                )

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Mean of p(x | z): pixel probabilities or Gaussian means."""
        out = self.decoder(z)
        return torch.sigmoid(out) if self.likelihood == "bernoulli" else out

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Posterior mean of q(z | x)."""
        return self.encoder(x)[0]

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))

    @torch.no_grad()
    def sample(self, n: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Means of p(x | z) for ``n`` draws z ~ p(z)."""
        device = next(self.parameters()).device
        z = torch.randn(n, self.z_dim, generator=generator, device=device)
        return self.decode(z)
