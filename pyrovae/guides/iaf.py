"""Inverse autoregressive flow (IAF) on top of an amortized Gaussian guide.

The encoder gives, from one unconstrained output per data point, a mean
mu(x), a scale sigma(x) and a context h(x). The guide draws

.. math::

    z_0 = \\mu(x) + \\sigma(x) \\odot \\epsilon, \\quad \\epsilon \\sim \\mathcal{N}(0, I),
    \\qquad
    z_t = m_t(z_{t-1}, h) + s_t(z_{t-1}, h) \\odot z_{t-1}, \\quad t = 1..T,

where component i of m_t and s_t = exp(l_t) depends only on components before i
of z_{t-1} (in step t's ordering) and on h: a MADE network [2] per step,
Pyro's ``ConditionalAutoRegressiveNN``. The Jacobian of each step is
triangular, so

.. math::

    \\log q(z_T \\mid x) = \\log \\mathcal{N}(z_0; \\mu, \\mathrm{diag}\\,\\sigma^2)
        - \\sum_{t=1}^T \\sum_i l_{t,i}(z_{t-1}, h)

in one pass per step when sampling [1]. Each step is Pyro's
``ConditionalAffineAutoregressive`` (equation 10 of [1]; ``log s`` clipped to
[-5, 3]); the guide's distribution is their ``ConditionalTransformedDistribution``
conditioned on h, with event dimension 1.

Orderings. Step t orders the latent coordinates in reverse of step t - 1 (the
networks' ``permutation`` argument), the permutation between steps that [1]
uses; the coordinates themselves are not moved, so the flow is the identity
map when every step is.

Initialization. The last layer of every autoregressive network starts at
zero, so every step starts as the identity (m = 0, s = 1) and q(z | x) starts
as the Gaussian guide exactly; [1] recommends starting each step near the
identity. The zero layer still gets gradients, so the steps move away from the
identity from the first update.

Density of a point the flow did not draw: inverting a step takes one network
pass per latent coordinate, so objectives that re-score detached samples
(STL, DReG) cost z_dim passes per step for those scores.

References

[1] D. P. Kingma, T. Salimans, R. Jozefowicz, X. Chen, I. Sutskever and
    M. Welling, "Improved Variational Inference with Inverse Autoregressive
    Flow", NeurIPS 2016.
[2] M. Germain, K. Gregor, I. Murray and H. Larochelle, "MADE: Masked
    Autoencoder for Distribution Estimation", ICML 2015.
"""

from __future__ import annotations

from typing import Sequence

import pyro.distributions as dist
import torch
from pyro.distributions.transforms import ComposeTransform, ConditionalAffineAutoregressive
from pyro.nn import ConditionalAutoRegressiveNN
from torch import nn

from pyrovae.nn import activation


class IAF(nn.Module):
    """``steps`` conditional affine autoregressive steps, q(z | x) = flow of
    N(mu, diag sigma^2) conditioned on h (see the module docstring).

    Args:
        z_dim: latent dimension (at least 2: with one coordinate there is no
            autoregressive structure; use an affine map instead).
        context_dim: size of the context h.
        steps: number of IAF steps, at least 1.
        hidden: hidden layer sizes of each step's autoregressive network, each
            at least ``z_dim`` (MADE needs that many units to connect every
            output); empty: one layer of ``2 * z_dim + context_dim`` units.
        act: the networks' nonlinearity (a name in ``pyrovae.nn.ACTIVATIONS``).
    """

    def __init__(
        self,
        z_dim: int,
        context_dim: int,
        steps: int,
        hidden: Sequence[int] = (),
        act: str = "relu",
    ) -> None:
        super().__init__()
        if z_dim < 2:
            raise ValueError(f"an IAF needs z_dim >= 2 (its steps are autoregressive over the "
                             f"latent coordinates), got z_dim={z_dim}; use flows=0")
        if steps < 1 or context_dim < 1:
            raise ValueError(f"an IAF needs steps >= 1 and context_dim >= 1, got steps={steps}, "
                             f"context_dim={context_dim}")
        hidden = [int(h) for h in hidden] or [2 * z_dim + context_dim]
        if min(hidden) < z_dim:
            raise ValueError(f"flow_hidden sizes must each be at least z_dim={z_dim} (MADE "
                             f"needs that many units), got {hidden}")
        forward = torch.arange(z_dim)
        self.z_dim, self.context_dim = z_dim, context_dim
        self.steps = nn.ModuleList(
            ConditionalAffineAutoregressive(ConditionalAutoRegressiveNN(
                z_dim, context_dim, hidden,
                permutation=forward if t % 2 == 0 else forward.flip(0),
                nonlinearity=activation(act),
            ))
            for t in range(steps)
        )
        self.identity_init()

    @torch.no_grad()
    def identity_init(self) -> "IAF":
        """Zero the last layer of every step's network: each step, and so the
        flow, becomes the identity map (the guide equals its Gaussian base)."""
        for step in self.steps:
            last = step.nn.layers[-1]
            last.weight.zero_()
            last.bias.zero_()
        return self

    def transform(self, context: torch.Tensor) -> ComposeTransform:
        """The flow z_0 -> z_T for contexts ``context`` (..., context_dim)."""
        return ComposeTransform([step.condition(context) for step in self.steps])

    def distribution(self, base: dist.Distribution, context: torch.Tensor,
                     ) -> dist.TransformedDistribution:
        """q(z | x): ``base`` (event dimension 1, batch shape (N,)) pushed
        through the flow conditioned on ``context`` (N, context_dim)."""
        return dist.ConditionalTransformedDistribution(base, list(self.steps)).condition(context)

    def extra_repr(self) -> str:
        return f"z_dim={self.z_dim}, context_dim={self.context_dim}, steps={len(self.steps)}"

