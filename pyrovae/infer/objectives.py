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

Particles. With K > 1 particles an objective averages K independent estimates
(or, for the importance-weighted bounds, takes the log-mean-exp of K weights).
Drawn one at a time they cost K runs of the model and the guide; drawn in one
vectorized pass (Pyro's ``vectorize_particles``) they cost one run on tensors
with an extra particle dimension at ``-(max_plate_nesting + 1)``, the same
estimate for the same draws. ``vectorize_particles=None`` (the default of every
factory here) vectorizes whenever K > 1 and falls back to sequential particles
when the programs cannot broadcast over that dimension (Python control flow on
a sampled value, indexing from the left, a ``view`` to a fixed shape): the
first call that fails vectorized is run again with sequential particles, with
a warning, and so is every later call (:class:`ParticleFallback`). ``True``
insists on vectorized particles (errors propagate), ``False`` draws them one at
a time. A program that broadcasts without error but mixes particles (a sum or
a mean over dimension 0, say) gives wrong values vectorized, as with Pyro's own
flag: pass ``False`` for it.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Callable, Dict, Optional

import pyro.infer as infer

from pyrovae.registry import Registry

ELBOS = Registry("objective")

#: What a program that cannot broadcast over the particle dimension raises
#: (shape mismatches, a tensor used as a Python bool or scalar, Pyro's shape checks).
VECTORIZATION_ERRORS = (RuntimeError, ValueError, IndexError, TypeError)

#: Instance caches of compiled (JIT) losses, traced with the particle plate.
_COMPILED_CACHES = ("_loss_and_surrogate_loss", "_differentiable_loss",
                    "_jit_loss_and_surrogate_loss", "_compiled_for")


class ParticleFallback:
    """Mixin for Pyro ELBOs: vectorized particles that fall back to sequential ones.

    While :attr:`particle_fallback` is true, a call of ``loss``,
    ``loss_and_grads`` or ``differentiable_loss`` that raises one of
    ``VECTORIZATION_ERRORS`` with vectorized particles switches the objective
    to sequential particles (``vectorize_particles=False``, its plate nesting
    back to the programs' own) and runs again; an error that remains is the
    programs' own and propagates. The first call that succeeds ends the trial.
    The factories of ``ELBOS`` set the flag when ``vectorize_particles`` is
    ``None`` and K > 1; it is ``False`` on a class built directly, which then
    behaves exactly as its Pyro base class.
    """

    #: Fall back to sequential particles if the next call fails vectorized.
    particle_fallback: bool = False

    def _with_fallback(self, method: Callable[..., Any], model: Callable, guide: Callable,
                       args: Any, kwargs: Any) -> Any:
        if not (self.particle_fallback and self.vectorize_particles):
            return method(model, guide, *args, **kwargs)
        try:
            result = method(model, guide, *args, **kwargs)
        except VECTORIZATION_ERRORS as err:
            failure = err
        else:
            self.particle_fallback = False
            return result
        # Outside the handler, so that an error of the sequential run is raised
        # as the programs' own, not as one met while handling the first.
        vectorized = dict(self.__dict__)
        self._use_sequential_particles()
        try:
            result = method(model, guide, *args, **kwargs)
        except BaseException:
            # Not a matter of vectorization: try vectorized again next time.
            self.__dict__.clear()
            self.__dict__.update(vectorized)
            raise
        first = (str(failure).strip().splitlines() or [type(failure).__name__])[0][:200]
        warnings.warn(
            f"{type(self).__name__}: the model and guide do not run vectorized over "
            f"{self.num_particles} particles ({first}); the particles are drawn one at a "
            "time. Pass vectorize_particles=False to skip the attempt.",
            RuntimeWarning,
            stacklevel=3,
        )
        return result

    def _use_sequential_particles(self) -> None:
        self.vectorize_particles = False
        self.particle_fallback = False
        # ELBO.__init__ (or its guess) added one plate for the particles.
        if self.num_particles > 1 and self.max_plate_nesting != math.inf:
            self.max_plate_nesting -= 1
        for name in _COMPILED_CACHES:
            self.__dict__.pop(name, None)

    def loss(self, model: Callable, guide: Callable, *args: Any, **kwargs: Any) -> float:
        """The base class's ``loss``, with the fallback above."""
        return self._with_fallback(super().loss, model, guide, args, kwargs)

    def loss_and_grads(self, model: Callable, guide: Callable, *args: Any, **kwargs: Any) -> float:
        """The base class's ``loss_and_grads``, with the fallback above."""
        return self._with_fallback(super().loss_and_grads, model, guide, args, kwargs)

    def differentiable_loss(self, model: Callable, guide: Callable, *args: Any, **kwargs: Any):
        """The base class's ``differentiable_loss``, with the fallback above."""
        return self._with_fallback(super().differentiable_loss, model, guide, args, kwargs)


_fallback_classes: Dict[type, type] = {}


def _fallback_class(cls: type) -> type:
    """``cls`` with :class:`ParticleFallback` mixed in (``cls`` itself if it has it)."""
    if issubclass(cls, ParticleFallback):
        return cls
    if cls not in _fallback_classes:
        _fallback_classes[cls] = type(cls.__name__, (ParticleFallback, cls),
                                      {"__module__": __name__, "__doc__": cls.__doc__})
    return _fallback_classes[cls]


def build_elbo(cls: type, num_particles: int = 1, vectorize_particles: Optional[bool] = None,
               **options: Any) -> Any:
    """``cls(num_particles=..., vectorize_particles=..., **options)`` for a Pyro
    ELBO class, with ``vectorize_particles=None`` meaning: vectorized when
    ``num_particles > 1``, falling back to sequential particles when the programs
    cannot run vectorized (see the module docstring). With one particle there is
    nothing to vectorize and ``cls`` itself is built."""
    if vectorize_particles is None and num_particles > 1:
        elbo = _fallback_class(cls)(num_particles=num_particles, vectorize_particles=True,
                                    **options)
        elbo.particle_fallback = True
        return elbo
    return cls(num_particles=num_particles, vectorize_particles=bool(vectorize_particles),
               **options)


def _pyro_elbo(cls: type, **fixed: Any) -> Callable[..., infer.ELBO]:
    def make(num_particles: int = 1, vectorize_particles: Optional[bool] = None,
             **options: Any):
        return build_elbo(cls, num_particles, vectorize_particles, **{**fixed, **options})

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
    vectorize_particles: Optional[bool] = None,
    max_plate_nesting: Optional[int] = None,
    **options: Any,
):
    """Build the objective registered as ``name``.

    ``vectorize_particles``: ``None`` draws the particles in one vectorized
    pass when ``num_particles > 1`` and the programs allow it, else one at a
    time (see the module docstring); ``True`` / ``False`` force either.
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
