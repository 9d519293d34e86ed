"""A fast path for the ELBO of programs whose structure does not change.

Pyro's :class:`~pyro.infer.Trace_ELBO` and
:class:`~pyro.infer.TraceMeanField_ELBO` rebuild, at every step, everything a
general program might need: a full trace of the guide and of the model with
every ``param`` site, copies of both without the subsample sites, shape and
support checks, score-function terms, and a host read of every site's
log-density (``torch_item``, a device synchronization on a GPU). For a program
whose sites are the same at every step (a VAE, a factor-analysis or mixture
model with a reparameterized guide) the first step has already learned all of
that. :class:`FastELBO` keeps the first step's findings and, at later steps,
runs the guide and the model (without Pyro's argument checks, which the
first step made, and without registering the model's modules with Pyro's
parameter store again) under one light handler that records only the
sample sites and replays the guide's values into the model, and sums the
same terms in the same order as Pyro:

.. math::

    \\mathcal{L} = -\\Big(\\sum_{s \\in \\text{model}} \\log p_s
                         - \\sum_{s \\in \\text{guide}} \\log q_s\\Big)
    \\quad\\text{(Trace\\_ELBO)}, \\qquad
    \\mathcal{L} = -\\Big(\\sum_{\\text{observed}} \\log p_s
                         - \\sum_{\\text{latent}} \\mathrm{KL}(q_s \\,\\|\\, p_s)\\Big)
    \\quad\\text{(TraceMeanField\\_ELBO)},

each term scaled and masked as Pyro scales and masks it, the KL analytic where
Pyro's is and estimated from the draw where it is not. The loss and the
gradients are Pyro's for the same draws (tests compare them); the loss stays
a tensor on the device, so nothing is read back.

The first step looks at the program once with Pyro's own tracing and checks
(the random state is put back afterwards). The fast path applies
when the objective is exactly one of the two classes above with one particle,
every guide site is reparameterized and not enumerated, and every latent model
site is sampled by the guide. Anything else runs plain Pyro throughout. When a
later step's sites differ from the first step's (a program whose structure
depends on the data or on a draw), that step is recomputed with plain Pyro
(with fresh draws) and every later step is too.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Tuple

import pyro
import torch
from pyro.distributions.util import scale_and_mask
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO
from pyro.infer.enum import get_importance_trace
from pyro.poutine import Trace
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample
from torch.distributions import kl_divergence

from pyrovae.models.base import registration_skipped

#: Objectives the fast path reproduces, by exact class (subclasses override hooks).
FAST_OBJECTIVES = (Trace_ELBO, TraceMeanField_ELBO)

Sites = Dict[str, Dict[str, Any]]


class _SampleRecorder(Messenger):
    """Records the sample sites of one run (after every inner handler, as
    ``poutine.trace`` does) and, when given a guide's sites, replays their
    values at the model's unobserved sites (as ``poutine.replay`` does)."""

    def __init__(self, replay: Optional[Sites] = None) -> None:
        super().__init__()
        self.replay = replay
        self.sites: Sites = {}

    def _pyro_sample(self, msg: Dict[str, Any]) -> None:
        if self.replay is None or msg["is_observed"]:
            return
        site = self.replay.get(msg["name"])
        if site is not None:
            msg["done"] = True
            msg["value"] = site["value"]
            msg["infer"] = site["infer"]

    def _pyro_post_sample(self, msg: Dict[str, Any]) -> None:
        self.sites[msg["name"]] = msg.copy()


def _log_prob(site: Dict[str, Any]) -> torch.Tensor:
    log_p = site["fn"].log_prob(site["value"], *site["args"], **site["kwargs"])
    return scale_and_mask(log_p, site["scale"], site["mask"])


def _structure(sites: Sites) -> Tuple[Tuple[str, bool], ...]:
    """Names and observedness of the sample sites, in order, subsample sites left out."""
    return tuple((name, bool(site["is_observed"])) for name, site in sites.items()
                 if not site_is_subsample(site))


def _trace_structure(trace: Trace) -> Tuple[Tuple[str, bool], ...]:
    return tuple((name, bool(site["is_observed"])) for name, site in trace.nodes.items()
                 if site["type"] == "sample" and not site_is_subsample(site))


class FastELBO:
    """``differentiable_loss(x)`` of ``objective`` on ``(model, guide)``: the
    fast path from the first step when the program allows it (decided by one
    look at its traces), plain Pyro otherwise.

    Args:
        objective: the Pyro objective being trained.
        model, guide: the two programs.
        max_plate_nesting: the programs' plate nesting (from the resolver).
        enabled: ``False`` runs plain Pyro at every step.

    ``fast`` tells whether the fast path is in use (``None`` before the first
    step); ``reason`` says why not, when it is not.
    """

    def __init__(self, objective: Any, model: Callable, guide: Callable,
                 max_plate_nesting: int, enabled: bool = True) -> None:
        self.objective, self.model, self.guide = objective, model, guide
        self.max_plate_nesting = max_plate_nesting
        self.fast: Optional[bool] = None if enabled else False
        self.reason = "" if enabled else "turned off"
        self._structure: Tuple[Tuple[Tuple[str, bool], ...], Tuple[Tuple[str, bool], ...]] = ((), ())
        self._analytic_kl: Dict[str, bool] = {}

    # -- plain Pyro ----------------------------------------------------------------
    def plain(self, x: torch.Tensor) -> torch.Tensor:
        """The objective's own ``differentiable_loss`` (not yet backpropagated)."""
        return self.objective.differentiable_loss(self.model, self.guide, x)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.fast is None:
            return self._first(x)
        if not self.fast:
            return self.plain(x)
        return self._fast_loss(x)

    def _fast_loss(self, x: torch.Tensor) -> torch.Tensor:
        # Pyro's argument and support checks ran at the first step, on the
        # same sites; later steps are checked for a finite loss and gradients.
        with pyro.validation_enabled(False), registration_skipped():
            with _SampleRecorder() as guide_run:
                self.guide(x)
            with _SampleRecorder(replay=guide_run.sites) as model_run:
                self.model(x)
        guide_sites, model_sites = guide_run.sites, model_run.sites
        if (_structure(model_sites), _structure(guide_sites)) != self._structure:
            self.fast = False
            self.reason = "the program's sites changed between steps"
            return self.plain(x)
        return self._loss(model_sites, guide_sites)

    # -- the first step decides ------------------------------------------------------
    def _first(self, x: torch.Tensor) -> torch.Tensor:
        self.reason = self._unsupported_objective()
        if not self.reason:
            # A look at the program's sites, with the random state put back
            # afterwards: the step itself is plain Pyro's, on the same draws
            # as without the fast path.
            devices = [x.device.index or 0] if x.is_cuda else []
            with torch.random.fork_rng(devices=devices), torch.no_grad():
                model_trace, guide_trace = get_importance_trace(
                    "flat", self.max_plate_nesting, self.model, self.guide, (x,), {})
            self.reason = self._unsupported_program(model_trace, guide_trace)
            if not self.reason:
                self._structure = (_trace_structure(model_trace), _trace_structure(guide_trace))
        self.fast = not self.reason
        # Every step of a fast run, the first included, sums its terms the same
        # way, so a run resumed from a checkpoint repeats the uninterrupted one
        # bit for bit.
        return self._fast_loss(x) if self.fast else self.plain(x)

    def _unsupported_objective(self) -> str:
        objective = self.objective
        if type(objective) not in FAST_OBJECTIVES:
            return f"{type(objective).__name__} is not one of the objectives it reproduces"
        if objective.num_particles != 1:
            return "it draws one particle per step"
        return ""

    def _unsupported_program(self, model_trace: Trace, guide_trace: Trace) -> str:
        mean_field = type(self.objective) is TraceMeanField_ELBO
        for name, site in guide_trace.nodes.items():
            if site["type"] != "sample":
                continue
            if site["infer"].get("enumerate"):
                return f"the guide enumerates site {name!r}"
            if not getattr(site["fn"], "has_rsample", False):
                return f"the guide's site {name!r} is not reparameterized"
            if name not in model_trace.nodes:
                return f"the guide's site {name!r} is not in the model"
        for name, site in model_trace.nodes.items():
            if site["type"] != "sample" or site["is_observed"]:
                continue
            if site["infer"].get("enumerate"):
                return f"the model enumerates site {name!r}"
            if name not in guide_trace.nodes:
                return f"the model's latent site {name!r} is not sampled by the guide"
            if mean_field:
                try:
                    kl_divergence(guide_trace.nodes[name]["fn"], site["fn"])
                    self._analytic_kl[name] = True
                except NotImplementedError:
                    self._analytic_kl[name] = False
        return ""

    # -- the two objectives' sums, in Pyro's order -------------------------------------
    def _loss(self, model_sites: Sites, guide_sites: Sites) -> torch.Tensor:
        elbo: Any = 0.0
        if type(self.objective) is Trace_ELBO:
            for site in model_sites.values():
                if not site_is_subsample(site):
                    elbo = elbo + _log_prob(site).sum()
            for site in guide_sites.values():
                if not site_is_subsample(site):
                    elbo = elbo - _log_prob(site).sum()
            return -elbo
        for name, site in model_sites.items():
            if site_is_subsample(site):
                continue
            if site["is_observed"]:
                elbo = elbo + _log_prob(site).sum()
                continue
            guide_site = guide_sites[name]
            if self._analytic_kl[name]:
                kl = scale_and_mask(kl_divergence(guide_site["fn"], site["fn"]),
                                    scale=guide_site["scale"], mask=guide_site["mask"])
                elbo = elbo - kl.sum()
            else:
                elbo = elbo + _log_prob(site).sum() - _log_prob(guide_site).sum()
        return -elbo
