"""The ladder variational autoencoder [1]: a hierarchical VAE [4] with top-down inference.

Generative process, for each data point n (the index n is left out), with L
stochastic layers z_1, ..., z_L of sizes d_1, ..., d_L:

.. math::

    z_L \\sim \\mathcal{N}(0, I), \\qquad
    z_l \\mid z_{l+1} \\sim \\mathcal{N}\\big(\\mu_{p,l}(z_{l+1}),
        \\mathrm{diag}\\,\\sigma_{p,l}(z_{l+1})^2\\big) \\quad (l = L-1, \\dots, 1),

    x \\mid z_1 \\sim \\mathrm{Bernoulli}(\\sigma(f(z_1)))
    \\ \\text{or}\\ \\mathcal{N}(f(z_1), \\mathrm{diag}\\,s^2).

Inference [1]. A deterministic bottom-up pass
:math:`d_1 = g_1(x),\\ d_l = g_l(d_{l-1})` gives each layer a Gaussian
"likelihood term" :math:`(\\hat\\mu_l, \\hat\\sigma_l)` read off :math:`d_l`. The
guide then runs top-down, in the same order as the model:

.. math::

    q(z_L \\mid x) = \\mathcal{N}(\\hat\\mu_L, \\hat\\sigma_L^2), \\qquad
    q(z_l \\mid z_{l+1}, x) = \\mathcal{N}(\\mu_{q,l}, \\sigma_{q,l}^2),

    \\sigma_{q,l}^2 = \\frac{1}{\\hat\\sigma_l^{-2} + \\sigma_{p,l}^{-2}}, \\qquad
    \\mu_{q,l} = \\big(\\hat\\mu_l \\hat\\sigma_l^{-2}
        + \\mu_{p,l} \\sigma_{p,l}^{-2}\\big)\\, \\sigma_{q,l}^2,

where :math:`(\\mu_{p,l}, \\sigma_{p,l})` is the generative model's own
conditional p(z_l | z_{l+1}) at the guide's draw of z_{l+1}: q is the
normalized product :math:`\\mathcal{N}(\\hat\\mu_l, \\hat\\sigma_l^2)\\, p(z_l
\\mid z_{l+1})` (precision weighting), and the top-down networks are shared by
the model and the guide.

Binary latents (``latent="bernoulli"``). Every z_l is a vector of bits:
p(z_L) = Bernoulli(1/2), p(z_l | z_{l+1}) = Bernoulli(sigmoid(lambda_{p,l}(z_{l+1}))),
and the bottom-up pass gives logits :math:`\\hat\\lambda_l`. The normalized
product of two Bernoulli distributions with logits a and b is the Bernoulli
with logits a + b, so precision weighting becomes a sum of logits:
:math:`q(z_l \\mid z_{l+1}, x) = \\mathrm{Bernoulli}(\\sigma(\\hat\\lambda_l +
\\lambda_{p,l}(z_{l+1})))` and :math:`q(z_L \\mid x) =
\\mathrm{Bernoulli}(\\sigma(\\hat\\lambda_L))`. The guide draws the bits with
the straight-through Gumbel-sigmoid estimator [2, 3]
(:class:`pyro.distributions.RelaxedBernoulliStraightThrough` at the given
``temperature``): exact 0/1 draws forward, the gradient of the relaxed draw
backward, so every reparameterized objective trains it (with the
straight-through bias). Its ``log_prob`` here is the Bernoulli probability of
the drawn bits, not the relaxed density Pyro's class reports, so that log q and
log p score the same discrete variable: a loss is then an unbiased estimate of
the discrete model's ELBO and an importance-sampled log-likelihood is a valid
one.

References

[1] C. K. Sonderby, T. Raiko, L. Maaloe, S. K. Sonderby and O. Winther,
    "Ladder Variational Autoencoders", NeurIPS 2016.
[2] C. J. Maddison, A. Mnih and Y. W. Teh, "The Concrete Distribution: A
    Continuous Relaxation of Discrete Random Variables", ICLR 2017.
[3] E. Jang, S. Gu and B. Poole, "Categorical Reparameterization with
    Gumbel-Softmax", ICLR 2017.
[4] D. P. Kingma and M. Welling, "Auto-Encoding Variational Bayes", ICLR 2014.
"""

from __future__ import annotations

import math
import operator
from typing import List, Optional, Sequence, Tuple, Union

import pyro
import pyro.distributions as dist
import torch
from torch import nn
from torch.nn.functional import softplus

from pyrovae.guides.encoder import AmortizedEncoder
from pyrovae.models.base import LatentModel
from pyrovae.models.registry import MODELS
from pyrovae.models.vae import DecoderLikelihood
from pyrovae.nn import activation as make_activation

LIKELIHOODS = ("bernoulli", "gaussian")
LATENTS = ("gaussian", "bernoulli")
#: Layer sizes when neither ``z_dims`` nor ``z_dim`` is given.
DEFAULT_Z_DIMS = (64, 32)
#: Floor of every standard deviation (as :class:`pyrovae.guides.DiagNormalEncoder`):
#: keeps early training stable and the precisions finite.
MIN_SCALE = 1e-4


def precision_weighted(
    loc_hat: torch.Tensor, scale_hat: torch.Tensor, loc_p: torch.Tensor, scale_p: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The normalized product N(loc_hat, scale_hat^2) N(loc_p, scale_p^2), elementwise.

    Returns ``(loc_q, scale_q)`` with
    :math:`\\sigma_q^2 = 1 / (\\hat\\sigma^{-2} + \\sigma_p^{-2})` and
    :math:`\\mu_q = (\\hat\\mu \\hat\\sigma^{-2} + \\mu_p \\sigma_p^{-2}) \\sigma_q^2`;
    the arguments broadcast against each other.
    """
    precision_hat, precision_p = scale_hat.pow(-2), scale_p.pow(-2)
    var_q = 1.0 / (precision_hat + precision_p)
    loc_q = (loc_hat * precision_hat + loc_p * precision_p) * var_q
    return loc_q, var_q.sqrt()


class StraightThroughBernoulli(dist.RelaxedBernoulliStraightThrough):
    """Pyro's straight-through Gumbel-sigmoid draws, scored as Bernoulli bits.

    ``rsample`` is :class:`pyro.distributions.RelaxedBernoulliStraightThrough`'s
    (exact 0/1 values forward, the relaxed sample's gradient backward);
    ``log_prob(value)`` is log Bernoulli(value; logits), the probability of the
    bits themselves. The relaxed density would score a different, continuous
    variable than the Bernoulli prior it is compared with, and it needs the
    relaxed sample attached to the value, which copies (``detach``) lose.
    """

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        return dist.Bernoulli(logits=self.logits, validate_args=False).log_prob(value)


class _BatchNorm(nn.BatchNorm1d):
    """Batch normalization over every leading dimension: inputs (..., C), as
    the top-down networks see them under a vectorized particle plate."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:
            return super().forward(x)
        return super().forward(x.reshape(-1, x.shape[-1])).reshape(x.shape)


def _block(in_dim: int, width: int, depth: int, act: str, batch_norm: bool) -> List[nn.Module]:
    """``depth`` layers of ``Linear -> [BatchNorm] -> activation``, each ``width`` wide."""
    layers: List[nn.Module] = []
    for i in range(depth):
        layers.append(nn.Linear(in_dim if i == 0 else width, width))
        if batch_norm:
            layers.append(_BatchNorm(width))
        layers.append(make_activation(act))
    return layers


class LadderEncoder(AmortizedEncoder):
    """The bottom-up pass of a ladder VAE: x -> each layer's likelihood term.

    ``raw(x)`` runs :math:`d_1 = g_1(x), \\dots, d_L = g_L(d_{L-1})` and
    concatenates every layer's linear read-out of :math:`d_l`, bottom layer
    first, into one tensor of shape (N, R): per layer (mu_hat_l, raw
    sigma_hat_l), R = 2 (d_1 + ... + d_L), for Gaussian latents, the logits
    (R = d_1 + ... + d_L) for binary ones. ``params(raw)`` splits it into the
    flat tuple ``(mu_hat_1, sigma_hat_1, ..., mu_hat_L, sigma_hat_L)`` with
    sigma_hat = softplus(raw) + 1e-4, or ``(logits_1, ..., logits_L)``.

    Args:
        x_dim: data dimension.
        z_dims: stochastic layer sizes, bottom (z_1) to top (z_L).
        hidden: width of each deterministic block g_l, one per layer.
        block_depth: hidden layers in each block.
        activation: nonlinearity (see ``pyrovae.nn.ACTIVATIONS``).
        batch_norm: batch normalization after every hidden linear layer.
        latent: ``"gaussian"`` or ``"bernoulli"``.
    """

    def __init__(
        self,
        x_dim: int,
        z_dims: Sequence[int],
        hidden: Sequence[int],
        block_depth: int = 2,
        activation: str = "leaky_relu",
        batch_norm: bool = False,
        latent: str = "gaussian",
    ) -> None:
        super().__init__()
        if len(z_dims) != len(hidden):
            raise ValueError(f"hidden needs one width per stochastic layer, got z_dims "
                             f"{list(z_dims)} and hidden {list(hidden)}")
        self.z_dims = tuple(z_dims)
        self.per_unit = 2 if latent == "gaussian" else 1
        blocks, heads = [], []
        in_dim = x_dim
        for z_dim, width in zip(self.z_dims, hidden):
            blocks.append(nn.Sequential(*_block(in_dim, width, block_depth, activation, batch_norm)))
            heads.append(nn.Linear(width, self.per_unit * z_dim))
            in_dim = width
        self.blocks, self.heads = nn.ModuleList(blocks), nn.ModuleList(heads)

    def raw(self, x: torch.Tensor) -> torch.Tensor:
        out, d = [], x
        for block, head in zip(self.blocks, self.heads):
            d = block(d)
            out.append(head(d))
        return torch.cat(out, dim=-1)

    def params(self, raw: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        chunks = raw.split([self.per_unit * k for k in self.z_dims], dim=-1)
        if self.per_unit == 1:
            return tuple(chunks)
        out: List[torch.Tensor] = []
        for chunk in chunks:
            loc, raw_scale = chunk.chunk(2, dim=-1)
            out += [loc, softplus(raw_scale) + MIN_SCALE]
        return tuple(out)


@MODELS.register("ladder-vae")
class LadderVAE(DecoderLikelihood, LatentModel):
    """Ladder VAE [1]: L stochastic layers, top-down inference (module docstring).

    Sample sites ``"z1"`` (bottom, next to x) to ``"z<L>"`` (top), then the
    observed ``"x"``, all in ``pyro.plate("data", N)`` with event dimension 1;
    the guide samples the same latent sites in the same order (top first).

    Networks (``h_l`` = ``hidden[l-1]``, each block ``block_depth`` hidden
    layers of that width): the bottom-up pass ``encoder`` (a
    :class:`LadderEncoder`, block l maps d_{l-1} to d_l in width h_l); the
    top-down nets ``top_down[l-1]``: z_{l+1} -> p(z_l | z_{l+1}) in width
    h_{l+1}; the ``decoder``: z_1 -> p(x | z_1) in width h_1. Each link
    between neighbouring layers has the same width both ways. ``top_down`` is
    used, and registered with Pyro, by the model and the guide alike. The
    guide reads the data only through ``encoder(x)``.

    KL warm-up [1]: train with :class:`pyrovae.infer.BetaELBO`, whose weight
    on log p(z) - log q(z | x) of every layer rises linearly from ``beta0``
    to ``beta`` over ``warmup_steps`` optimizer steps: ``pyrovae train
    ladder-vae --elbo BetaELBO --elbo-opt warmup_steps=20000`` or
    ``fit(model, data, elbo="BetaELBO", elbo_options={"warmup_steps": 20000})``.

    Objectives: every reparameterized one applies. ``TraceMeanField_ELBO``
    computes each layer's KL(q(z_l | z_{l+1}, x) || p(z_l | z_{l+1})) in
    closed form for Gaussian latents (the guide has the model's dependency
    structure, which is its condition) and falls back to the sampled
    estimate for binary ones. ``IWAE-DReG`` counts the shared top-down
    parameters as guide parameters (see :mod:`pyrovae.infer.iwae`), so for
    K > 1 their gradient is not the standard one.

    Batch norm [1] (``batch_norm=True``): in training mode each point's
    densities depend on the other points of its batch (batches of one point
    fail), in evaluation mode the running statistics are used. ``fit`` trains
    in training mode and evaluates in evaluation mode, and the program
    resolver probes in evaluation mode, so it changes no running statistic;
    ``decode``, ``sample`` ... use whichever mode the model is in (``fit``
    leaves it in evaluation mode).

    Args:
        x_dim: data dimension (784 for flattened MNIST).
        z_dims: stochastic layer sizes, bottom (z_1) to top (z_L); default
            (64, 32).
        z_dim: size of the top layer, the latent ``encode`` returns (the
            CLI's ``--z-dim``); alone it replaces the last default size, with
            ``z_dims`` it must equal ``z_dims[-1]``.
        hidden: width of the deterministic blocks, one per stochastic layer
            (default 512, 256, 128, ... halving down to 32, as in [1]).
        block_depth: hidden layers in each deterministic block.
        activation: nonlinearity (see ``pyrovae.nn.ACTIVATIONS``).
        batch_norm: batch normalization in the deterministic blocks.
        likelihood: ``"bernoulli"`` for binary data, ``"gaussian"`` otherwise.
        scale: for the Gaussian likelihood, ``"learned"`` (one learned standard
            deviation per data dimension) or a fixed positive float.
        latent: ``"gaussian"`` or ``"bernoulli"`` stochastic layers.
        temperature: temperature of the relaxed draws behind the
            straight-through gradient of binary latents.
    """

    def __init__(
        self,
        x_dim: int,
        z_dims: Optional[Sequence[int]] = None,
        z_dim: Optional[int] = None,
        hidden: Optional[Sequence[int]] = None,
        block_depth: int = 2,
        activation: str = "leaky_relu",
        batch_norm: bool = False,
        likelihood: str = "bernoulli",
        scale: Union[str, float] = "learned",
        latent: str = "gaussian",
        temperature: float = 0.5,
    ) -> None:
        super().__init__()
        x_dim = _positive_int("x_dim", x_dim)
        z_dims = _layer_sizes(z_dims, z_dim)
        num_layers = len(z_dims)
        if hidden is None:
            hidden = tuple(max(512 >> level, 32) for level in range(num_layers))
        hidden = _sizes("hidden", hidden)
        if len(hidden) != num_layers:
            raise ValueError(
                f"hidden needs one width per stochastic layer: {num_layers} for z_dims "
                f"{list(z_dims)}, got {len(hidden)} ({list(hidden)})"
            )
        block_depth = _positive_int("block_depth", block_depth)
        make_activation(activation)  # raises for an unknown name
        if not isinstance(batch_norm, bool):
            raise TypeError(f"batch_norm must be true or false, got {batch_norm!r}")
        if likelihood not in LIKELIHOODS:
            raise ValueError(f"likelihood must be one of {LIKELIHOODS}, got {likelihood!r}")
        if not (scale == "learned" or (_is_number(scale) and scale > 0 and math.isfinite(scale))):
            raise ValueError(f"scale must be 'learned' or a positive number, got {scale!r}")
        if latent not in LATENTS:
            raise ValueError(f"latent must be one of {LATENTS}, got {latent!r}")
        if not (_is_number(temperature) and temperature > 0 and math.isfinite(temperature)):
            raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
        self._config = dict(
            x_dim=x_dim, z_dims=list(z_dims), hidden=list(hidden), block_depth=block_depth,
            activation=activation, batch_norm=batch_norm, likelihood=likelihood, scale=scale,
            latent=latent, temperature=float(temperature),
        )
        self.x_dim, self.z_dims, self.z_dim = x_dim, z_dims, z_dims[-1]
        self.num_layers = num_layers
        self.likelihood, self.latent, self.temperature = likelihood, latent, float(temperature)
        per_unit = 2 if latent == "gaussian" else 1

        self.encoder = LadderEncoder(x_dim, z_dims, hidden, block_depth, activation, batch_norm,
                                     latent)
        self.top_down = nn.ModuleList(
            nn.Sequential(*_block(z_dims[i + 1], hidden[i + 1], block_depth, activation, batch_norm),
                          nn.Linear(hidden[i + 1], per_unit * z_dims[i]))
            for i in range(num_layers - 1)
        )
        self.decoder = nn.Sequential(*_block(z_dims[0], hidden[0], block_depth, activation, batch_norm),
                                     nn.Linear(hidden[0], x_dim))
        if likelihood == "gaussian" and scale == "learned":
            self.decoder.raw_scale = nn.Parameter(torch.full((x_dim,), math.log(math.e - 1)))
            self.fixed_scale: Optional[float] = None
        else:
            self.fixed_scale = float(scale) if likelihood == "gaussian" else None

    # -- the two Pyro programs -------------------------------------------------
    def model(self, x: torch.Tensor) -> None:
        self.register("top_down", self.top_down)
        self.register("decoder", self.decoder)
        with pyro.plate("data", x.shape[0]):
            if self.latent == "gaussian":
                top = dist.Normal(x.new_zeros(self.z_dim), 1.0).to_event(1)
            else:
                top = dist.Bernoulli(logits=x.new_zeros(self.z_dim)).to_event(1)
            z = pyro.sample(f"z{self.num_layers}", top)
            for level in range(self.num_layers - 1, 0, -1):
                z = pyro.sample(f"z{level}", self.conditional_prior(level, z))
            pyro.sample("x", self.likelihood_dist(z), obs=x)

    def guide(self, x: torch.Tensor) -> None:
        self.register("encoder", self.encoder)
        self.register("top_down", self.top_down)
        bottom_up = self.encoder(x)
        k = 2 if self.latent == "gaussian" else 1
        layers = [bottom_up[k * i: k * (i + 1)] for i in range(self.num_layers)]
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample(f"z{self.num_layers}", self._guide_dist(*layers[-1]))
            for level in range(self.num_layers - 1, 0, -1):
                if self.latent == "gaussian":
                    loc_p, scale_p = self._top_down_params(level, z)
                    q = self._guide_dist(*precision_weighted(*layers[level - 1], loc_p, scale_p))
                else:
                    q = self._guide_dist(layers[level - 1][0] + self.top_down[level - 1](z))
                z = pyro.sample(f"z{level}", q)

    # -- distributions -----------------------------------------------------------
    def conditional_prior(self, level: int, z_above: torch.Tensor) -> dist.Distribution:
        """p(z_l | z_{l+1}) for l = ``level``, 1 <= l < L, given z_{l+1} of shape
        (..., d_{l+1})."""
        if self.latent == "gaussian":
            return dist.Normal(*self._top_down_params(level, z_above)).to_event(1)
        return dist.Bernoulli(logits=self.top_down[level - 1](z_above)).to_event(1)

    def _top_down_params(self, level: int, z_above: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        loc, raw_scale = self.top_down[level - 1](z_above).chunk(2, dim=-1)
        return loc, softplus(raw_scale) + MIN_SCALE

    def _guide_dist(self, *params: torch.Tensor) -> dist.Distribution:
        if self.latent == "gaussian":
            return dist.Normal(*params).to_event(1)
        logits = params[0]
        return StraightThroughBernoulli(logits.new_tensor(self.temperature), logits=logits).to_event(1)

    # -- capabilities ------------------------------------------------------------
    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """E_q[z_L | x], shape (N, z_dim): the bottom-up mean of the top layer
        (probabilities of the bits for binary latents)."""
        x = self.as_data(x)
        top = self.encoder(x)[-2 if self.latent == "gaussian" else -1]
        if self.latent == "bernoulli":
            top = torch.sigmoid(top)
        return self.finite_result(top, x, "encode")

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Mean of p(x | z_1), shape (N, D), for top-layer values z of shape
        (N, z_dim), with every z_l below set to its conditional mean
        E[z_l | z_{l+1}] on the way down (bit probabilities for binary latents)."""
        if z.shape[-1:] != (self.z_dim,):
            raise ValueError(f"decode takes values of the top layer, shape (N, {self.z_dim}); "
                             f"got shape {tuple(z.shape)}")
        for level in range(self.num_layers - 1, 0, -1):
            z = self.conditional_prior(level, z).mean
        return self.likelihood_dist(z).mean

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """Mean of p(x | z) at z_L = encode(x) (see :meth:`decode`), shape (N, D)."""
        return self.decode(self.encode(x))

    @torch.no_grad()
    def sample_mean(self, n: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Means of p(x | z_1) (pixel probabilities for the Bernoulli likelihood)
        for ``n`` ancestral draws z_L ~ p(z_L), z_l ~ p(z_l | z_{l+1}), shape (n, D)."""
        return self.likelihood_dist(self._ancestral_z1(n, generator)).mean

    @torch.no_grad()
    def sample(self, n: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """``n`` draws x ~ p(x) (0/1 values for the Bernoulli likelihood), shape
        (n, D): the draws of :meth:`sample_mean` (same generator state, same z),
        then x ~ p(x | z_1). For the means use :meth:`sample_mean`."""
        mean = self.sample_mean(n, generator)
        if self.likelihood == "bernoulli":
            return _bernoulli(mean, generator)
        return mean + self.noise_scale(mean) * _randn(mean.shape, generator, mean)

    def _ancestral_z1(self, n: int, generator: Optional[torch.Generator]) -> torch.Tensor:
        n = _positive_int("n", n)
        ref = next(self.parameters())
        if self.latent == "gaussian":
            z = _randn((n, self.z_dim), generator, ref)
        else:
            z = _bernoulli(ref.new_full((n, self.z_dim), 0.5), generator)
        for level in range(self.num_layers - 1, 0, -1):
            if self.latent == "gaussian":
                loc, scale = self._top_down_params(level, z)
                z = loc + scale * _randn(loc.shape, generator, loc)
            else:
                z = _bernoulli(torch.sigmoid(self.top_down[level - 1](z)), generator)
        return z


# -- helpers -------------------------------------------------------------------------
def _randn(shape: Sequence[int], generator: Optional[torch.Generator],
           like: torch.Tensor) -> torch.Tensor:
    """Standard normal draws in ``like``'s dtype and on its device; drawn on the
    generator's device, so a CPU generator serves a model on any device."""
    where = like.device if generator is None else generator.device
    out = torch.randn(tuple(shape), generator=generator, dtype=like.dtype, device=where)
    return out.to(like.device)


def _bernoulli(probs: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
    where = probs.device if generator is None else generator.device
    return torch.bernoulli(probs.to(where), generator=generator).to(probs.device)


def _is_number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _positive_int(name: str, value: object) -> int:
    try:
        size = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an integer >= 1, got {value!r}") from None
    if isinstance(value, bool) or size < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return size


def _sizes(name: str, values: object) -> Tuple[int, ...]:
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or not values:
        raise TypeError(f"{name} must be a non-empty list of integers >= 1, got {values!r}")
    return tuple(_positive_int(f"{name}[{i}]", v) for i, v in enumerate(values))


def _layer_sizes(z_dims: Optional[Sequence[int]], z_dim: Optional[int]) -> Tuple[int, ...]:
    """The stochastic layer sizes from ``z_dims`` and ``z_dim`` (the top layer)."""
    if z_dims is None:
        if z_dim is None:
            return DEFAULT_Z_DIMS
        return (*DEFAULT_Z_DIMS[:-1], _positive_int("z_dim", z_dim))
    sizes = _sizes("z_dims", z_dims)
    if z_dim is not None and _positive_int("z_dim", z_dim) != sizes[-1]:
        raise ValueError(
            f"z_dim={z_dim} and z_dims={list(sizes)} disagree: z_dim is the size of the top "
            "layer, the last entry of z_dims; give one of them"
        )
    return sizes
