"""The amortized linear-Gaussian encoder.

q(z | x) = N(z; A x + b, S S^T) with A (K x D), b (K,) and one lower-triangular
S (K x K, positive diagonal) shared by all data points. For linear-Gaussian
models (factor analysis, probabilistic PCA) the exact posterior
p(z | x) = N(M^{-1} W^T Psi^{-1} (x - mu), M^{-1}) has exactly this form [1],
so the ELBO can reach log p(x): the gap is KL(q || p) = 0 at
A = M^{-1} W^T Psi^{-1}, b = -A mu, S S^T = M^{-1}.

References

[1] M. E. Tipping and C. M. Bishop, "Probabilistic principal component
    analysis", J. R. Statist. Soc. B 61(3), 1999 (section 3.3).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch
from torch import nn
from torch.nn.functional import softplus

from pyrovae.guides.registry import GUIDES


def _inverse_softplus(y: torch.Tensor) -> torch.Tensor:
    # log(exp(y) - 1), written to stay finite for large y
    return y + torch.log(-torch.expm1(-y))


@GUIDES.register("linear")
class LinearGaussianEncoder(nn.Module):
    """q(z | x) = N(A x + b, S S^T): affine mean, one full covariance.

    ``forward(x)`` returns ``(loc, scale_tril)`` with shapes (N, K) and
    (K, K): the one factor S, which ``MultivariateNormal(loc, scale_tril=S)``
    broadcasts over the batch without a per-point copy (a batched Cholesky
    factor would cost N triangular solves per step). The class attribute
    ``scale_kind = "tril"`` tells guides that the second output is a Cholesky
    factor rather than a diagonal scale.

    Args:
        x_dim, z_dim: data and latent dimensions.
        hidden, activation: accepted so that the encoder can stand in wherever
            a network encoder is built with those arguments; a linear map has
            no hidden layers, so they are ignored.
        init_scale: initial diagonal of S.
        min_scale: floor added to the diagonal of S after the softplus.
    """

    scale_kind = "tril"

    def __init__(
        self,
        x_dim: int,
        z_dim: int,
        hidden: Sequence[int] = (),
        activation: Optional[str] = None,
        init_scale: float = 1.0,
        min_scale: float = 1e-5,
    ) -> None:
        super().__init__()
        if not init_scale > min_scale:
            raise ValueError(f"init_scale must exceed min_scale={min_scale}, got {init_scale}")
        self.z_dim = z_dim
        self.min_scale = min_scale
        self.linear = nn.Linear(x_dim, z_dim)
        # S = tril(raw, -1) + diag(softplus(raw_diag) + min_scale)
        self.raw_tril = nn.Parameter(torch.zeros(z_dim, z_dim))
        self.raw_diag = nn.Parameter(
            torch.full((z_dim,), math.log(math.expm1(init_scale - min_scale)))
        )

    def scale_tril(self) -> torch.Tensor:
        """The shared Cholesky factor S (K x K)."""
        diag = softplus(self.raw_diag) + self.min_scale
        return torch.tril(self.raw_tril, -1) + torch.diag_embed(diag)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.linear(x), self.scale_tril()

    @torch.no_grad()
    def set_posterior(self, weight: torch.Tensor, bias: torch.Tensor, scale_tril: torch.Tensor) -> None:
        """Set A, b and S in place (for example to a model's exact posterior).

        The diagonal of ``scale_tril`` must exceed ``min_scale``.
        """
        diag = torch.diagonal(scale_tril)
        if not bool((diag > self.min_scale).all()):
            raise ValueError(
                f"the diagonal of scale_tril must exceed min_scale={self.min_scale}; "
                f"got minimum {diag.min().item():.3g}"
            )
        self.linear.weight.copy_(weight)
        self.linear.bias.copy_(bias)
        self.raw_tril.copy_(torch.tril(scale_tril, -1))
        self.raw_diag.copy_(_inverse_softplus(diag - self.min_scale))
