"""The beta-weighted ELBO and KL warm-up.

For a model p(x, z) = p(z) p(x | z) with guide q(z | x),

.. math::

    \\mathcal{L}_\\beta = \\mathbb{E}_{q(z \\mid x)}\\left[\\log p(x \\mid z)
        + \\beta \\left(\\log p(z) - \\log q(z \\mid x)\\right)\\right]
      = \\mathbb{E}_q \\log p(x \\mid z) - \\beta\\, \\mathrm{KL}(q(z \\mid x) \\,\\|\\, p(z)).

beta = 1 is the ELBO; beta > 1 favours disentangled codes [1]; beta < 1, and a
beta rising from a small value to 1 over the first steps of training (KL
warm-up or annealing [2, 3]), keeps the posterior from collapsing onto the
prior before the decoder has learned to use the latents.

"Latent sites" are the model's unobserved sample sites and all of the guide's
sample sites; "observed" are the model's observed sites. The objective is
:class:`pyro.infer.Trace_ELBO` with one hook overridden: the latent sites'
log-probabilities are multiplied by beta after tracing, as
:func:`pyro.poutine.scale` would multiply them (score-function terms of
non-reparameterized guide sites keep weight one, so their learning signal is the
beta-weighted integrand above and the gradient stays unbiased).

References

[1] I. Higgins, L. Matthey, A. Pal, C. Burgess, X. Glorot, M. Botvinick,
    S. Mohamed and A. Lerchner, "beta-VAE: Learning Basic Visual Concepts with a
    Constrained Variational Framework", ICLR 2017.
[2] S. R. Bowman, L. Vilnis, O. Vinyals, A. M. Dai, R. Jozefowicz and
    S. Bengio, "Generating Sentences from a Continuous Space", CoNLL 2016.
[3] C. K. Sonderby, T. Raiko, L. Maaloe, S. K. Sonderby and O. Winther,
    "Ladder Variational Autoencoders", NeurIPS 2016.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional

from pyro.distributions.score_parts import ScoreParts
from pyro.distributions.util import is_identically_zero
from pyro.infer import Trace_ELBO

from pyrovae.infer.objectives import ELBOS, build_elbo


def _check_beta(name: str, value: Any) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a number, got {value!r}") from None
    if not (value >= 0 and math.isfinite(value)):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return value


class BetaELBO(Trace_ELBO):
    """ELBO with the latent term weighted by beta, optionally warmed up.

    Args:
        beta: weight of log p(z) - log q(z | x) once warm-up is over.
        warmup_steps: number of steps over which the weight rises linearly from
            ``beta0`` to ``beta``; 0 means the weight is ``beta`` from the start.
        beta0: weight at step 0 of the warm-up.
        **kwargs: passed to :class:`pyro.infer.Trace_ELBO` (``num_particles``,
            ``vectorize_particles``, ``max_plate_nesting``, ...).

    Schedule: ``beta_at(step) = beta0 + (beta - beta0) * min(step / warmup_steps, 1)``.

    Training-loop hook: call :meth:`on_step` with the number of optimizer
    steps taken so far (0 before the first) before each step; ``pyrovae``'s
    ``fit`` does this for every objective that has an ``on_step`` attribute.
    The weight in use is :attr:`current_beta`.
    """

    def __init__(
        self,
        beta: float = 1.0,
        warmup_steps: int = 0,
        beta0: float = 0.0,
        **kwargs: Any,
    ) -> None:
        self.beta = _check_beta("beta", beta)
        self.beta0 = _check_beta("beta0", beta0)
        if isinstance(warmup_steps, bool) or int(warmup_steps) != warmup_steps or warmup_steps < 0:
            raise ValueError(f"warmup_steps must be an integer >= 0, got {warmup_steps!r}")
        self.warmup_steps = int(warmup_steps)
        self.step = 0
        super().__init__(**kwargs)

    def beta_at(self, step: int) -> float:
        """Weight of the latent term at training step ``step`` (0-based)."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        if self.warmup_steps == 0:
            return self.beta
        frac = min(step / self.warmup_steps, 1.0)
        return self.beta0 + (self.beta - self.beta0) * frac

    @property
    def current_beta(self) -> float:
        """The weight used by the next ``loss`` / ``loss_and_grads`` call."""
        return self.beta_at(self.step)

    def on_step(self, step: int) -> None:
        """Training-loop hook: ``step`` optimizer steps have been taken so far."""
        self.step = int(step)

    def _get_trace(self, model: Callable, guide: Callable, args, kwargs):
        model_trace, guide_trace = super()._get_trace(model, guide, args, kwargs)
        beta = self.current_beta
        if beta != 1.0:
            for trace, is_guide in ((model_trace, False), (guide_trace, True)):
                for site in trace.nodes.values():
                    if site["type"] != "sample" or not (is_guide or not site["is_observed"]):
                        continue
                    site["log_prob"] = site["log_prob"] * beta
                    site["log_prob_sum"] = site["log_prob_sum"] * beta
                    if "score_parts" in site:
                        log_prob, score_function, entropy = site["score_parts"]
                        if not is_identically_zero(entropy):
                            entropy = entropy * beta
                        # As in ScoreParts.scale_and_mask, the score term is not scaled.
                        site["score_parts"] = ScoreParts(log_prob * beta, score_function, entropy)
        return model_trace, guide_trace


@ELBOS.register("BetaELBO")
def _make_beta_elbo(
    num_particles: int = 1, vectorize_particles: Optional[bool] = None, **options: Any
) -> BetaELBO:
    """beta-weighted ELBO; options: beta, warmup_steps, beta0. Particles are
    vectorized where the programs allow, as for every objective."""
    return build_elbo(BetaELBO, num_particles, vectorize_particles, **options)
