"""Importance-weighted bounds with per-data-point weights, and path-derivative gradients.

For data points x_1..x_N with local latents and K particles
:math:`z_{n1}, \\dots, z_{nK} \\sim q(z_n \\mid x_n)`, the importance-weighted
autoencoder bound [1] is

.. math::

    \\mathcal{L}_K = \\sum_{n=1}^N \\log \\frac{1}{K} \\sum_{k=1}^K w_{nk},
    \\qquad
    \\log w_{nk} = \\log p(x_n, z_{nk}) - \\log q(z_{nk} \\mid x_n),

with :math:`\\mathbb{E}\\,\\mathcal{L}_1 \\le \\mathbb{E}\\,\\mathcal{L}_K \\le
\\mathbb{E}\\,\\mathcal{L}_{K+1} \\le \\log p(x)` and
:math:`\\mathcal{L}_K \\to \\log p(x)` as K grows. The log-mean-exp runs over
particles of *one* data point; taking it over whole traces (summed over data
points first) gives a different, looser quantity. Weights are computed by
:mod:`pyrovae.infer.traces`, which needs every sample site inside a vectorized
``pyro.plate("data", N)`` and rejects global latent variables.

Gradient estimators, with normalized weights
:math:`\\tilde w_{nk} = w_{nk} / \\sum_j w_{nj}` and reparameterized
:math:`z_{nk} = z(\\epsilon_{nk}; \\phi)`:

``"standard"``
    the reparameterized IWAE gradient,
    :math:`\\sum_k \\tilde w_{nk} \\nabla \\log w_{nk}` (total derivative).
``"stl"``
    sticking the landing [2]: the same with log q evaluated at stop-gradient
    guide parameters, dropping the score term
    :math:`\\nabla_\\phi \\log q_\\phi(z)|_z`. Unbiased for K = 1 (with zero
    variance at the exact posterior); biased for K > 1 [3].
``"dreg"``
    doubly reparameterized [3]: for guide parameters
    :math:`\\sum_k \\tilde w_{nk}^2 \\, \\nabla_\\phi \\log w_{nk}` with the
    gradient flowing through z only; for model parameters the standard
    gradient. Unbiased, and its signal-to-noise ratio does not decay with K
    as the standard guide gradient's does [4].

Guide parameters, for DReG, are the trainable tensors the guide's samples
depend on (found by walking the autograd graph, registered or not); everything
else the loss touches is a model parameter. A parameter that model and guide
share is treated as a guide parameter, so its model-side gradient gets squared
weights too: share no parameters between them when using DReG. :class:`STL_ELBO` is the K-sample ELBO
(mean over particles instead of log-mean-exp) with the STL gradient; it has no
data-plate restriction.

References

[1] Y. Burda, R. Grosse and R. Salakhutdinov, "Importance Weighted
    Autoencoders", ICLR 2016.
[2] G. Roeder, Y. Wu and D. Duvenaud, "Sticking the Landing: Simple,
    Lower-Variance Gradient Estimators for Variational Inference", NeurIPS 2017.
[3] G. Tucker, D. Lawson, S. Gu and C. J. Maddison, "Doubly Reparameterized
    Gradient Estimators for Monte Carlo Objectives", ICLR 2019.
[4] T. Rainforth, A. R. Kosiorek, T. A. Le, C. J. Maddison, M. Igl, F. Wood
    and Y. W. Teh, "Tighter Variational Bounds are Not Necessarily Better",
    ICML 2018.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, List, Tuple

import pyro.poutine as poutine
import torch
from pyro.infer import Trace_ELBO
from pyro.infer.elbo import ELBO
from pyro.infer.util import torch_item
from pyro.poutine.trace_struct import Trace
from pyro.util import check_if_enumerated, warn_if_nan

from pyrovae.infer.objectives import ELBOS, ParticleFallback, build_elbo
from pyrovae.infer.traces import guide_leaves, importance_traces, pointwise_log_weights

ESTIMATORS = ("standard", "stl", "dreg")


def _check_num_particles(num_particles: Any) -> int:
    if isinstance(num_particles, bool) or int(num_particles) != num_particles or num_particles < 1:
        raise ValueError(f"num_particles must be a positive integer, got {num_particles!r}")
    return int(num_particles)


class IWAE(ParticleFallback, ELBO):
    """Importance-weighted bound with per-data-point weights (see module docstring).

    Args:
        num_particles: K, the number of importance samples per data point.
        max_plate_nesting: bound on nested plates; guessed by running model and
            guide once when left infinite and particles are vectorized.
        vectorize_particles: ``True`` draws the K particles in one pass under a
            particle plate at dim ``-(max_plate_nesting + 1)``; ``False`` runs K
            sequential traces (same result, for models that cannot broadcast);
            ``None`` vectorizes when K > 1 and falls back to sequential traces
            if the programs fail vectorized
            (:class:`pyrovae.infer.objectives.ParticleFallback`).
        estimator: ``"standard"``, ``"stl"`` or ``"dreg"``.
        data_plate: name of the plate over data points.

    ``loss`` returns the negative bound summed over the batch (times the data
    plate's subsampling factor), ``differentiable_loss`` a tensor with that
    value whose gradient is the chosen estimator's, and ``loss_and_grads`` the
    float after accumulating that gradient.
    """

    def __init__(
        self,
        num_particles: int = 1,
        max_plate_nesting: float = float("inf"),
        vectorize_particles: bool | None = None,
        estimator: str = "standard",
        data_plate: str = "data",
        strict_enumeration_warning: bool = True,
        retain_graph: bool | None = None,
    ) -> None:
        if estimator not in ESTIMATORS:
            raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
        self.estimator = estimator
        self.data_plate = data_plate
        num_particles = _check_num_particles(num_particles)
        auto = vectorize_particles is None
        vectorize = num_particles > 1 if auto else bool(vectorize_particles)
        super().__init__(
            num_particles=num_particles,
            max_plate_nesting=max_plate_nesting,
            vectorize_particles=vectorize,
            strict_enumeration_warning=strict_enumeration_warning,
            retain_graph=retain_graph,
        )
        self.particle_fallback = auto and vectorize

    # -- hooks -----------------------------------------------------------------
    def _get_trace(self, model: Callable, guide: Callable, args, kwargs):
        # The path-derivative re-run of the guide is only needed for gradients.
        path = self.estimator != "standard" and torch.is_grad_enabled()
        model_trace, guide_trace = importance_traces(
            model, guide, args, kwargs,
            max_plate_nesting=self.max_plate_nesting, path_derivative=path,
        )
        check_if_enumerated(guide_trace)
        if torch.is_grad_enabled():
            for name, site in guide_trace.nodes.items():
                if site["type"] == "sample" and not site["fn"].has_rsample:
                    # Without a score-function term the gradient would be silently biased.
                    raise ValueError(
                        f"guide site {name!r} ({type(site['fn']).__name__}) is not "
                        "reparameterizable; IWAE gradients here need reparameterized "
                        "guide sites (its value, via loss(), works for any guide). Use "
                        "Trace_ELBO / TraceGraph_ELBO for discrete latents."
                    )
        return model_trace, guide_trace

    def _get_traces(self, model: Callable, guide: Callable, args, kwargs):
        if self.vectorize_particles or self.num_particles == 1:
            yield from super()._get_traces(model, guide, args, kwargs)
            return
        # Sequential particles must share one minibatch: a subsampled data plate
        # draws its indices in the first run, and the later runs replay them.
        recorder = poutine.trace(guide)
        yield self._get_trace(model, recorder, args, kwargs)
        subsample = Trace()
        for name, site in recorder.trace.nodes.items():
            if site["type"] == "sample" and type(site["fn"]).__name__ == "_Subsample":
                subsample.nodes[name] = site
        guide = poutine.replay(guide, trace=subsample)
        for _ in range(self.num_particles - 1):
            yield self._get_trace(model, guide, args, kwargs)

    def _reduce(self, log_w: torch.Tensor) -> torch.Tensor:
        """(K, N) log-weights -> (N,) per-data-point bound."""
        return torch.logsumexp(log_w, dim=0) - math.log(log_w.shape[0])

    # -- internals -------------------------------------------------------------
    def _log_weights(
        self, model: Callable, guide: Callable, args, kwargs
    ) -> Tuple[torch.Tensor, float, List[torch.Tensor]]:
        """(K, N) log-weights, the data-plate scale, and the guide's parameters."""
        rows: List[torch.Tensor] = []
        scale = 1.0
        guide_params: Dict[int, torch.Tensor] = {}
        for model_trace, guide_trace in self._get_traces(model, guide, args, kwargs):
            weights = pointwise_log_weights(model_trace, guide_trace, data_plate=self.data_plate)
            rows.append(weights.log_w)
            scale = weights.scale
            if self.estimator == "dreg" and torch.is_grad_enabled():
                for p in guide_leaves(guide_trace):
                    guide_params.setdefault(id(p), p)
        if len(rows) == 1 and rows[0].dim() == 2:  # one vectorized trace
            log_w = rows[0]
        else:
            log_w = torch.stack(rows)
        return log_w, scale, list(guide_params.values())

    def _dreg_surrogate(
        self, log_w: torch.Tensor, guide_params: List[torch.Tensor]
    ) -> torch.Tensor:
        """Scalar whose gradient is the DReG gradient of the summed bound.

        Model parameters get the standard gradient sum_k w_k grad log w_k (log q
        does not depend on them); guide parameters get sum_k w_k^2 grad log w_k,
        through z only (the guide log-probs in ``log_w`` are path-only). Both
        come from one graph: the standard surrogate, plus a linear term that
        swaps the guide parameters' gradient for the DReG one.
        """
        w = torch.softmax(log_w.detach(), dim=0)
        standard = (w * log_w).sum()
        params = [p for p in guide_params if p.requires_grad]
        if not params:
            return standard
        dreg = (w.pow(2) * log_w).sum()
        corrections = torch.autograd.grad(
            dreg - standard, params, retain_graph=True, allow_unused=True
        )
        for p, c in zip(params, corrections):
            if c is not None:
                standard = standard + (p * c).sum()
        return standard

    # -- Pyro's ELBO interface -------------------------------------------------
    def loss(self, model: Callable, guide: Callable, *args: Any, **kwargs: Any) -> float:
        """Negative bound, summed over the batch's data points (no gradients)."""
        return self._with_fallback(self._loss, model, guide, args, kwargs)

    def differentiable_loss(
        self, model: Callable, guide: Callable, *args: Any, **kwargs: Any
    ) -> torch.Tensor:
        """Negative bound as a tensor whose gradient is the chosen estimator's."""
        return self._with_fallback(self._differentiable_loss, model, guide, args, kwargs)

    def _loss(self, model: Callable, guide: Callable, *args: Any, **kwargs: Any) -> float:
        with torch.no_grad():
            log_w, scale, _ = self._log_weights(model, guide, args, kwargs)
            loss = -scale * torch_item(self._reduce(log_w).sum())
        warn_if_nan(loss, "loss")
        return loss

    def _differentiable_loss(
        self, model: Callable, guide: Callable, *args: Any, **kwargs: Any
    ) -> torch.Tensor:
        log_w, scale, guide_params = self._log_weights(model, guide, args, kwargs)
        objective = self._reduce(log_w).sum()
        if self.estimator == "dreg":
            surrogate = self._dreg_surrogate(log_w, guide_params)
            objective = objective.detach() + (surrogate - surrogate.detach())
        # For "stl" the guide log-probs in log_w are already path-only.
        loss = -scale * objective
        warn_if_nan(loss, "loss")
        return loss

    def loss_and_grads(self, model: Callable, guide: Callable, *args: Any, **kwargs: Any) -> float:
        """Negative bound as a float, after accumulating the estimator's gradient."""
        loss = self.differentiable_loss(model, guide, *args, **kwargs)
        if loss.requires_grad:
            loss.backward(retain_graph=self.retain_graph)
        return torch_item(loss)


class STL_ELBO(ParticleFallback, Trace_ELBO):
    """The K-particle ELBO with the sticking-the-landing gradient [2].

    Value as :class:`pyro.infer.Trace_ELBO`:
    :math:`\\frac1K \\sum_k \\log p(x, z_k) - \\log q(z_k \\mid x)`; the gradient
    drops the score term :math:`\\nabla_\\phi \\log q_\\phi(z)|_z`, whose
    expectation is zero, so it is unbiased and vanishes exactly when q is the
    exact posterior. Overrides one hook of ``Trace_ELBO``: the guide trace's
    log-probabilities are replaced by path-derivative ones
    (:func:`pyrovae.infer.traces.importance_traces`). Works with any plate
    structure, global latents included; every guide site must be
    reparameterized. Built directly it draws particles as
    :class:`pyro.infer.Trace_ELBO` does; the ``"STL_ELBO"`` entry of ``ELBOS``
    vectorizes them by default, with the fallback of
    :class:`pyrovae.infer.objectives.ParticleFallback`.
    """

    def _get_trace(self, model: Callable, guide: Callable, args, kwargs):
        model_trace, guide_trace = importance_traces(
            model, guide, args, kwargs,
            max_plate_nesting=self.max_plate_nesting,
            path_derivative=torch.is_grad_enabled(),
        )
        check_if_enumerated(guide_trace)
        return model_trace, guide_trace

    def loss(self, model: Callable, guide: Callable, *args: Any, **kwargs: Any) -> float:
        """Same value as Trace_ELBO's (the path-derivative re-run is skipped)."""
        with torch.no_grad():
            return super().loss(model, guide, *args, **kwargs)


# -- registry entries ----------------------------------------------------------
def _iwae_factory(estimator: str | None, doc: str) -> Callable[..., IWAE]:
    def make(num_particles: int = 1, vectorize_particles: bool | None = None,
             **options: Any) -> IWAE:
        if estimator is not None:
            if "estimator" in options:
                raise TypeError(
                    f"this objective fixes estimator={estimator!r}; use 'IWAE' to choose it"
                )
            options["estimator"] = estimator
        return IWAE(
            num_particles=num_particles, vectorize_particles=vectorize_particles, **options
        )

    make.__doc__ = doc
    return make


ELBOS.register("IWAE")(
    _iwae_factory(
        None, "Per-data-point IWAE bound; options: estimator ('standard' | 'stl' | 'dreg')."
    )
)
ELBOS.register("IWAE-STL")(_iwae_factory("stl", "IWAE bound with the STL gradient (biased for K > 1)."))
ELBOS.register("IWAE-DReG")(_iwae_factory("dreg", "IWAE bound with the DReG gradient."))


@ELBOS.register("STL_ELBO")
def _make_stl_elbo(
    num_particles: int = 1, vectorize_particles: bool | None = None, **options: Any
) -> STL_ELBO:
    """K-sample ELBO with the sticking-the-landing gradient."""
    return build_elbo(STL_ELBO, _check_num_particles(num_particles), vectorize_particles,
                      **options)
