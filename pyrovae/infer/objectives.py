"""Objectives by name: Pyro's ELBOs and pyrovae's own, in one registry.

Every entry of ``ELBOS`` is a factory ``make(num_particles, vectorize_particles,
**options)`` returning an object with Pyro's ELBO interface: ``loss(model,
guide, *args)`` (a float, the negative ELBO summed over the batch) and
``loss_and_grads(model, guide, *args)`` (the same, after accumulating gradients
in every parameter the programs touch). ``fit`` and the benchmark suites need
nothing more, so any Pyro ELBO and any objective written against that interface
trains any model.

pyrovae's own objectives (:mod:`pyrovae.infer.iwae`, :mod:`pyrovae.infer.beta`)
import ``ELBOS`` from here and register themselves; ``pyrovae.infer`` imports
them, so they are registered whenever any part of ``pyrovae.infer`` is loaded.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import pyro.infer as infer

from pyrovae.registry import Registry

ELBOS = Registry("objective")


def _pyro_elbo(cls: type, **fixed: Any) -> Callable[..., infer.ELBO]:
    def make(num_particles: int = 1, vectorize_particles: bool = False, **options: Any):
        return cls(
            num_particles=num_particles,
            vectorize_particles=vectorize_particles,
            **{**fixed, **options},
        )

    make.__doc__ = f"Pyro's :class:`pyro.infer.{cls.__name__}`."
    return make


class JitTraceMeanField_ELBO(infer.JitTraceMeanField_ELBO):
    """Pyro's :class:`~pyro.infer.JitTraceMeanField_ELBO` with a working
    compile cache.

    Pyro 1.9 looks for the compiled function under ``_loss_and_surrogate_loss``
    but stores it under ``_differentiable_loss``, so every call traces and
    compiles the loss again, which makes the "JIT" variant many times slower
    than the plain one. Here the compiled function is kept and reused for as
    long as the same model and guide are passed.
    """

    def differentiable_loss(self, model, guide, *args, **kwargs):
        key = (id(model), id(guide))
        if getattr(self, "_compiled_for", None) != key:
            self._differentiable_loss = None
            self._compiled_for = key
            return super().differentiable_loss(model, guide, *args, **kwargs)
        kwargs["_pyro_model_id"], kwargs["_pyro_guide_id"] = key
        return self._differentiable_loss(*args, **kwargs)


for _name in (
    "Trace_ELBO",
    "TraceMeanField_ELBO",
    "TraceGraph_ELBO",
    "TraceEnum_ELBO",
    "JitTrace_ELBO",
    "JitTraceGraph_ELBO",
    "JitTraceEnum_ELBO",
):
    ELBOS.register(_name)(_pyro_elbo(getattr(infer, _name)))
ELBOS.register("JitTraceMeanField_ELBO")(_pyro_elbo(JitTraceMeanField_ELBO))

# Renyi's alpha-divergence bound. With alpha = 0 it is an importance-weighted
# bound that keeps the plate dimensions shared by every site, so on a full
# batch with all sites in the data plate it equals the per-data-point IWAE;
# with a subsampled data plate it scales each log-weight by N/B before the
# log-mean-exp, and a site outside the data plate makes it a whole-trace bound.
# pyrovae.infer.iwae.IWAE is correct in all three cases.
ELBOS.register("RenyiELBO")(_pyro_elbo(infer.RenyiELBO))


def make_objective(
    name: str,
    num_particles: int = 1,
    vectorize_particles: bool = False,
    max_plate_nesting: Optional[int] = None,
    **options: Any,
):
    """Build the objective registered as ``name``.

    ``max_plate_nesting`` is the plate depth found by
    :func:`pyrovae.infer.program.resolve`; given, the objective does not have
    to guess it by running the programs on its first call.

    Raises ``ValueError`` naming the known objectives when ``name`` is unknown,
    and when the options do not fit the objective.
    """
    factory = ELBOS.get_checked(name)
    if num_particles < 1:
        raise ValueError(f"num_particles must be >= 1, got {num_particles}")
    if max_plate_nesting is not None:
        options.setdefault("max_plate_nesting", max_plate_nesting)
    try:
        return factory(
            num_particles=num_particles, vectorize_particles=vectorize_particles, **options
        )
    except TypeError as err:
        raise ValueError(f"bad options for objective {name!r}: {err}") from None
