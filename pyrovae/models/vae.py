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
from pyrovae.models.registry import MODELS
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
        return dist.Normal(out, self.noise_scale(out).expand_as(out)).to_event(1)

    def noise_scale(self, like: torch.Tensor) -> torch.Tensor:
        """Standard deviation of the Gaussian likelihood, shape (D,) or a scalar
        (dtype and device of ``like``)."""
        if self.fixed_scale is None:
            return softplus(self.decoder.raw_scale) + 1e-3
        return like.new_tensor(self.fixed_scale)

    def check_data(self, x: torch.Tensor) -> None:
        """Raise a clear error for data the likelihood cannot score."""
        x = self.as_data(x)  # converts, flattens images and checks the columns
        if not bool(torch.isfinite(x).all()):
            raise ValueError("the data has NaN or infinite values; drop or impute those rows first")
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
        """Posterior mean of q(z | x), shape (N, z_dim)."""
        x = self.as_data(x)
        return self.finite_result(self.encoder(x)[0], x, "encode")

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """Mean of p(x | z) at z = encode(x), shape (N, D)."""
        return self.decode(self.encode(x))

    @torch.no_grad()
    def sample_mean(self, n: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Means of p(x | z) (pixel probabilities for the Bernoulli likelihood)
        for ``n`` draws z ~ p(z), shape (n, D)."""
        ref = next(self.parameters())
        z = torch.randn(n, self.z_dim, generator=generator, dtype=ref.dtype, device=_where(generator, ref))
        return self.decode(z.to(ref.device))

    @torch.no_grad()
    def sample(self, n: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """``n`` draws x ~ p(x): z ~ p(z), then x ~ p(x | z) (0/1 values for the
        Bernoulli likelihood), shape (n, D). For the means use :meth:`sample_mean`."""
        mean = self.sample_mean(n, generator)
        where = _where(generator, mean)
        if self.likelihood == "bernoulli":
            return torch.bernoulli(mean.to(where), generator=generator).to(mean.device)
        noise = torch.randn(mean.shape, generator=generator, dtype=mean.dtype, device=where)
        return mean + self.noise_scale(mean) * noise.to(mean.device)


def _where(generator: Optional[torch.Generator], like: torch.Tensor) -> torch.device:
    """Random draws happen on the generator's device (then move to the model's)."""
    return like.device if generator is None else generator.device
