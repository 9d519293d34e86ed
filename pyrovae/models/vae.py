"""Variational autoencoders: the shared machinery and the MLP VAE.

Generative process, for each data point n:

.. math::

    z_n \\sim p(z), \\qquad
    x_n \\mid z_n \\sim \\mathrm{Bernoulli}(\\sigma(f_\\theta(z_n)))
    \\ \\text{or}\\ \\mathcal{N}(f_\\theta(z_n), \\mathrm{diag}\\,s^2),

with the amortized guide q(z_n | x_n) = N(mu_phi(x_n), diag sigma_phi(x_n)^2)
[1], optionally pushed through an inverse autoregressive flow conditioned on a
context h_phi(x_n) [2] (:class:`pyrovae.guides.IAF`).

The prior p(z) is N(0, I), or the VampPrior [3], the mixture of the guide's
Gaussians at K learned pseudo-inputs u_1..u_K:

.. math::

    p_\\lambda(z) = \\frac{1}{K} \\sum_{k=1}^K
        \\mathcal{N}(z; \\mu_\\phi(u_k), \\mathrm{diag}\\,\\sigma_\\phi(u_k)^2),

the prior that maximizes the ELBO averaged over the data, with the average
over data replaced by one over pseudo-inputs [3]. The pseudo-inputs are
parameters of the model; the mixture shares the encoder with the guide.

:class:`VAEBase` holds everything but the networks (prior, likelihood, guide,
encode / decode / sample); :class:`VAE` (MLP networks) and
:class:`pyrovae.models.conv.ConvVAE` (convolutional networks) only build
their encoder and decoder.

References

[1] D. P. Kingma and M. Welling, "Auto-Encoding Variational Bayes", ICLR 2014.
[2] D. P. Kingma, T. Salimans, R. Jozefowicz, X. Chen, I. Sutskever and
    M. Welling, "Improved Variational Inference with Inverse Autoregressive
    Flow", NeurIPS 2016.
[3] J. M. Tomczak and M. Welling, "VAE with a VampPrior", AISTATS 2018.
"""

from __future__ import annotations

import inspect
import math
from typing import Any, Callable, Optional, Sequence, Tuple, Union

import pyro
import pyro.distributions as dist
import torch
from torch import nn
from torch.nn.functional import hardtanh, softplus

from pyrovae.guides import GUIDES, IAF, gaussian_distribution
from pyrovae.models.registry import MODELS
from pyrovae.models.base import LatentModel
from pyrovae.nn import MLP

LIKELIHOODS = ("bernoulli", "gaussian")
PRIORS = ("normal", "vamp")
#: Draws of z per data point in the Monte Carlo mean :meth:`VAEBase.encode`
#: gives for a flow guide.
ENCODE_SAMPLES = 100
#: Mean and standard deviation of the pseudo-inputs' initial values, as in
#: the reference implementation of [3] for binary images.
PSEUDO_INIT = (0.05, 0.01)


class VampPrior(nn.Module):
    """p(z) = (1/K) sum_k q(z | u_k): the guide's Gaussian at K learned
    pseudo-inputs u_k (see the module docstring).

    Args:
        x_dim: data dimension, the size of each pseudo-input.
        components: K, the number of pseudo-inputs.
        bounded: keep the pseudo-inputs in [0, 1], the range of binary data
            (u = hardtanh(raw) as in [3]); otherwise they are unconstrained.

    The pseudo-inputs start at N(0.05, 0.01^2) entrywise (``PSEUDO_INIT``).
    For a flow guide the components are the Gaussian part of q (the flow's
    base) at u_k, not the flow: the mixture's density then costs one encoder
    pass over the K pseudo-inputs, where scoring z under K flows would need
    every flow step inverted for every (z, u_k) pair, one network pass per
    latent coordinate each.
    """

    def __init__(self, x_dim: int, components: int, bounded: bool) -> None:
        super().__init__()
        mean, std = PSEUDO_INIT
        self.raw_inputs = nn.Parameter(mean + std * torch.randn(components, x_dim))
        self.bounded = bounded

    @property
    def inputs(self) -> torch.Tensor:
        """The pseudo-inputs u, shape (K, x_dim)."""
        return hardtanh(self.raw_inputs, 0.0, 1.0) if self.bounded else self.raw_inputs

    def components(self, encoder: nn.Module) -> Tuple[torch.Tensor, ...]:
        """The encoder's outputs at the pseudo-inputs: (loc, scale, ...), each with
        leading dimension K."""
        return encoder(self.inputs)

    def distribution(self, encoder: nn.Module) -> dist.MixtureSameFamily:
        """p(z) as a ``MixtureSameFamily`` with equal weights, event dimension 1."""
        params = self.components(encoder)
        comps = gaussian_distribution(encoder, params)
        mix = dist.Categorical(logits=params[0].new_zeros(params[0].shape[0]))
        return dist.MixtureSameFamily(mix, comps)


class DecoderLikelihood:
    """p(x | z) from a ``decoder`` network, shared by the VAE families: a
    Bernoulli on the decoder's logits, or a Normal around its output with a
    learned per-dimension (``decoder.raw_scale``) or fixed (``fixed_scale``)
    standard deviation. Expects ``decoder``, ``likelihood`` and ``fixed_scale``."""

    decoder: nn.Module
    likelihood: str
    fixed_scale: Optional[float]

    def likelihood_dist(self, z: torch.Tensor) -> dist.Distribution:
        """p(x | z), event dimension 1."""
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
        x = self.as_data(x)  # converts, flattens images, checks columns and finiteness
        if self.likelihood == "bernoulli" and not bool(((x == 0) | (x == 1)).all()):
            raise ValueError(
                "the Bernoulli likelihood needs binary data, but the data has values "
                "strictly between 0 and 1; binarize it (binarize='dynamic' or "
                "'static') or use likelihood='gaussian'"
            )


class VAEBase(DecoderLikelihood, LatentModel):
    """A VAE with amortized Gaussian (or IAF) guide, given its two networks.

    A subclass calls ``super().__init__`` with the options below, adds its own
    to ``self._config``, then :meth:`set_networks` with

    - ``decoder``: z (..., z_dim) -> (..., x_dim), the Bernoulli logits or
      the Gaussian means of p(x | z);
    - ``encoder``: an amortized encoder (``forward(x) = params(raw(x))``,
      :class:`pyrovae.guides.AmortizedEncoder`) returning ``(loc, scale)``, and
      with ``flows > 0`` ``(loc, scale, context)`` of size
      :attr:`context_size`: build it with :meth:`make_encoder`.

    Args:
        x_dim: data dimension.
        z_dim: latent dimension.
        activation: nonlinearity of the networks and the flow.
        likelihood: ``"bernoulli"`` for binary data, ``"gaussian"`` otherwise.
        scale: for the Gaussian likelihood, ``"learned"`` (one learned standard
            deviation per data dimension) or a fixed positive float.
        flows: number of IAF steps on top of the Gaussian guide; 0 is the plain
            diagonal Gaussian guide.
        flow_hidden: hidden layer sizes of each IAF step's autoregressive
            network, each at least ``z_dim``; empty: one layer of
            ``2 * z_dim + context_dim``.
        context_dim: size of the context h(x) the encoder gives the flow (used
            when ``flows > 0``).
        prior: ``"normal"`` (N(0, I)) or ``"vamp"`` (the VampPrior).
        pseudo_inputs: number K of the VampPrior's pseudo-inputs.

    With the VampPrior the encoder's parameters appear in both programs (the
    prior encodes the pseudo-inputs). The DReG estimator
    (:mod:`pyrovae.infer.iwae`) treats a shared parameter as a guide
    parameter, so the prior's part of the encoder's gradient then gets the
    squared importance weights too; every other objective treats the sharing
    exactly.
    """

    def __init__(
        self,
        x_dim: int,
        z_dim: int,
        *,
        activation: str,
        likelihood: str = "bernoulli",
        scale: Union[str, float] = "learned",
        flows: int = 0,
        flow_hidden: Sequence[int] = (),
        context_dim: int = 32,
        prior: str = "normal",
        pseudo_inputs: int = 500,
    ) -> None:
        super().__init__()
        if likelihood not in LIKELIHOODS:
            raise ValueError(f"likelihood must be one of {LIKELIHOODS}, got {likelihood!r}")
        if not (scale == "learned" or (isinstance(scale, (int, float)) and not isinstance(scale, bool)
                                       and scale > 0)):
            raise ValueError(f"scale must be 'learned' or a positive number, got {scale!r}")
        if prior not in PRIORS:
            raise ValueError(f"prior must be one of {PRIORS}, got {prior!r}")
        for name, value, least in (("flows", flows, 0), ("pseudo_inputs", pseudo_inputs, 1),
                                   ("context_dim", context_dim, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"{name} must be an integer >= {least}, got {value!r}")
        flow_hidden = [int(h) for h in flow_hidden]
        self._config = dict(
            x_dim=x_dim, z_dim=z_dim, activation=activation, likelihood=likelihood, scale=scale,
            flows=flows, flow_hidden=flow_hidden, context_dim=context_dim, prior=prior,
            pseudo_inputs=pseudo_inputs,
        )
        self.x_dim, self.z_dim = x_dim, z_dim
        self.likelihood = likelihood
        self.prior_kind = prior
        self.fixed_scale: Optional[float] = (
            float(scale) if likelihood == "gaussian" and scale != "learned" else None)
        self._flow_options = (flows, flow_hidden, context_dim, activation)
        self._pseudo_inputs = pseudo_inputs

    @property
    def context_size(self) -> int:
        """Size of the flow context the encoder must output (0 without flows)."""
        flows, _, context_dim, _ = self._flow_options
        return context_dim if flows else 0

    def make_encoder(self, build: Callable[..., nn.Module], *args: Any, **kwargs: Any) -> nn.Module:
        """``build(*args, **kwargs)``, with ``context_dim`` added when the guide
        has a flow; a clear error when the encoder cannot give a context."""
        if not self.context_size:
            return build(*args, **kwargs)
        try:
            accepts = "context_dim" in inspect.signature(build).parameters
        except (TypeError, ValueError):  # no signature to read: let the call decide
            accepts = True
        if not accepts:
            name = getattr(build, "__name__", repr(build))
            raise ValueError(
                f"flows > 0 needs an encoder that outputs a flow context (context_dim), and "
                f"{name} does not; use a Gaussian encoder such as 'mlp' or 'conv', or flows=0"
            )
        return build(*args, context_dim=self.context_size, **kwargs)

    def set_networks(self, decoder: nn.Module, encoder: nn.Module) -> None:
        """Attach the networks, then build the parts the options ask for: the
        learned Gaussian scale, the flow, the VampPrior's pseudo-inputs."""
        self.decoder = decoder
        if self.likelihood == "gaussian" and self.fixed_scale is None:
            # softplus(log(e - 1)) = 1: unit standard deviation at the start.
            self.decoder.raw_scale = nn.Parameter(torch.full((self.x_dim,), math.log(math.e - 1)))
        self.encoder = encoder
        flows, flow_hidden, context_dim, act = self._flow_options
        self.flow: Optional[IAF] = (
            IAF(self.z_dim, context_dim, flows, flow_hidden, act) if flows else None)
        self.vamp: Optional[VampPrior] = (
            VampPrior(self.x_dim, self._pseudo_inputs, bounded=self.likelihood == "bernoulli")
            if self.prior_kind == "vamp" else None)

    # -- the two Pyro programs -------------------------------------------------
    def model(self, x: torch.Tensor) -> None:
        self.register("decoder", self.decoder)
        if self.vamp is not None:
            # The VampPrior's parameters: the pseudo-inputs and the encoder.
            self.register("prior", self.vamp)
            self.register("encoder", self.encoder)
        prior = self.prior_dist()
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", prior)
            pyro.sample("x", self.likelihood_dist(z), obs=x)

    def guide(self, x: torch.Tensor) -> None:
        self.register("encoder", self.encoder)
        if self.flow is not None:
            self.register("flow", self.flow)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", self.guide_dist(self.encoder(x)))

    # -- helpers -----------------------------------------------------------------
    def prior_dist(self) -> dist.Distribution:
        """p(z), batch shape (), event dimension 1."""
        if self.vamp is not None:
            return self.vamp.distribution(self.encoder)
        ref = next(self.decoder.parameters())
        return dist.Normal(ref.new_zeros(self.z_dim), 1.0).to_event(1)

    def guide_dist(self, params: Sequence[torch.Tensor]) -> dist.Distribution:
        """q(z | x) from the encoder's outputs ``params``: the Gaussian, or with
        a flow the Gaussian pushed through it, conditioned on ``params[2]``."""
        base = gaussian_distribution(self.encoder, params)
        if self.flow is None:
            return base
        return self.flow.distribution(base, params[2])

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Mean of p(x | z): pixel probabilities or Gaussian means."""
        out = self.decoder(z)
        return torch.sigmoid(out) if self.likelihood == "bernoulli" else out

    @torch.no_grad()
    def encode(self, x: torch.Tensor, num_samples: int = ENCODE_SAMPLES) -> torch.Tensor:
        """Mean of q(z | x), shape (N, z_dim).

        For the Gaussian guide, its mean mu(x), exactly. With a flow the mean
        of the pushed-forward Gaussian is not the pushed-forward mean, so it
        is the Monte Carlo mean over ``num_samples`` draws z ~ q(z | x), made
        from the same ``num_samples`` standard-normal draws for every data
        point, taken from a generator seeded with 0: the result is
        deterministic, and a point's code does not depend on the other
        points passed with it. Its error is the posterior standard deviation
        over sqrt(num_samples).
        """
        x = self.as_data(x)
        params = self.encoder(x)
        if self.flow is None:
            return self.finite_result(params[0], x, "encode")
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"num_samples must be an integer >= 1, got {num_samples!r}")
        loc, scale, context = params
        gen = torch.Generator(device=loc.device).manual_seed(0)
        eps = torch.randn(num_samples, 1, self.z_dim, generator=gen, dtype=loc.dtype,
                          device=loc.device)
        flow = self.flow.transform(context)
        total = torch.zeros_like(loc)
        # A few draws at a time bound the memory to that of a few batches.
        for chunk in eps.split(10):
            total += flow(loc + scale * chunk).sum(0)
        return self.finite_result(total / num_samples, x, "encode")

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """Mean of p(x | z) at z = encode(x), shape (N, D)."""
        return self.decode(self.encode(x))

    @torch.no_grad()
    def sample_prior(self, n: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """``n`` draws z ~ p(z), shape (n, z_dim): N(0, I), or for the
        VampPrior a uniformly chosen pseudo-input's Gaussian."""
        ref = next(self.decoder.parameters())
        where = _where(generator, ref)
        eps = torch.randn(n, self.z_dim, generator=generator, dtype=ref.dtype, device=where).to(ref.device)
        if self.vamp is None:
            return eps
        params = self.vamp.components(self.encoder)
        loc, scale = params[0], params[1]
        k = torch.randint(loc.shape[0], (n,), generator=generator, device=where).to(ref.device)
        if getattr(self.encoder, "scale_kind", "diag") == "tril":
            tril = scale[k] if scale.dim() == 3 else scale
            return loc[k] + (tril @ eps.unsqueeze(-1)).squeeze(-1)
        return loc[k] + scale[k] * eps

    @torch.no_grad()
    def sample_mean(self, n: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Means of p(x | z) (pixel probabilities for the Bernoulli likelihood)
        for ``n`` draws z ~ p(z), shape (n, D)."""
        return self.decode(self.sample_prior(n, generator))

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


@MODELS.register("vae")
class VAE(VAEBase):
    """VAE with an MLP decoder and an amortized Gaussian (or IAF) guide.

    Args:
        x_dim: data dimension (784 for flattened MNIST).
        z_dim: latent dimension.
        hidden: hidden layer sizes of the decoder; the encoder mirrors them.
        activation: nonlinearity of both networks (see ``pyrovae.nn.ACTIVATIONS``).
        likelihood: ``"bernoulli"`` for binary data, ``"gaussian"`` otherwise.
        scale: for the Gaussian likelihood, ``"learned"`` (one learned standard
            deviation per data dimension) or a fixed positive float.
        encoder: name of the encoder in ``pyrovae.guides.GUIDES``.
        flows, flow_hidden, context_dim: the IAF guide (``flows = 0``: none),
            see :class:`VAEBase`.
        prior, pseudo_inputs: ``"normal"`` or ``"vamp"`` with K pseudo-inputs,
            see :class:`VAEBase`.
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
        hidden = tuple(int(h) for h in hidden)
        self._config.update(hidden=list(hidden), encoder=encoder)
        decoder = MLP(z_dim, hidden[::-1], x_dim, activation)
        build = GUIDES.get_checked(encoder)
        self.set_networks(decoder, self.make_encoder(build, x_dim, z_dim, hidden, activation))


def _where(generator: Optional[torch.Generator], like: torch.Tensor) -> torch.device:
    """Random draws happen on the generator's device (then move to the model's)."""
    return like.device if generator is None else generator.device
