"""One reading of a (model, guide) pair, shared by fit, evaluate, diagnostics
and the objectives.

:func:`resolve` takes a model object (with ``model(x)`` and ``guide(x)``
methods) or two Pyro callables, runs the guide once and the model replayed
against it on a small batch, and records what every later step needs to know
about the programs:

- the deepest vectorized plate nesting of their sample sites, which Pyro's
  ELBOs otherwise guess on their first call (and ``TraceEnum_ELBO`` needs);
- the model's latent sites that are marked for parallel enumeration and have
  no guide site (a mixture assignment summed out exactly);
- the guide's latent sites outside ``pyro.plate("data")`` (*global* latents,
  shared by all data points, such as a Bayesian model's weights) and inside
  it (*local* latents, one per data point);
- the model's latent sites that the guide does not sample and that are not
  enumerated (drawn from their prior, which is then their proposal);
- the trainable tensors: the parameters of the model object's modules and of
  every ``pyro.param`` site the programs touch.

The probe runs without gradients and with the model object's modules in
evaluation mode, so it changes no running statistics; it draws from the
global random number generator like any run of the programs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import pyro.poutine as poutine
import torch
from pyro.poutine.util import site_is_subsample
from torch import nn

from pyrovae.models.base import default_elbo, num_data

#: The name of the plate every per-data-point site lives in.
DATA_PLATE = "data"


def split_programs(model: Any, guide: Optional[Callable] = None) -> Tuple[Callable, Callable]:
    """The two Pyro callables of a model object, or ``(model, guide)`` as given."""
    if guide is not None:
        if not callable(guide):
            raise TypeError(f"guide must be callable, got {type(guide).__name__}")
        fn = model.model if hasattr(model, "model") and not callable(model) else model
        if not callable(fn):
            raise TypeError(f"model must be callable, got {type(model).__name__}")
        return fn, guide
    if callable(getattr(model, "model", None)) and callable(getattr(model, "guide", None)):
        return model.model, model.guide
    raise TypeError(
        "pass a model object with model(x) and guide(x) methods, "
        "or a Pyro model callable together with guide=..."
    )


def without_trace_shapes(err: BaseException) -> BaseException:
    """The error a model or guide raised, without the table of trace shapes
    that each enclosing ``poutine.trace`` appends to its message (Pyro re-raises
    a copy whose cause is the original)."""
    while (err.__cause__ is not None and type(err.__cause__) is type(err)
           and str(err).startswith(f"{err.__cause__}\n")):
        err = err.__cause__
    return err


def first_line(err: Any, limit: int = 200) -> str:
    """The first line of an error (or message), at most ``limit`` characters."""
    text = (str(err).strip().splitlines() or [type(err).__name__])[0]
    return text if len(text) <= limit else text[: limit - 3] + "..."


def describe_error(err: BaseException) -> str:
    """An error met while running the programs, in a few words: torch's check
    of a distribution's parameters as "the scale of a Normal is out of its
    range", anything else as its first line (200 characters at most)."""
    text = str(without_trace_shapes(err)).strip()
    found = re.match(r"Expected parameter (\w+) .*?of distribution (\w+)", text, re.S)
    if found:
        return f"the {found[1]} of a {found[2]} is out of its range (NaN, inf or not positive)"
    return first_line(text) if text else type(err).__name__


def module_of(obj: Any) -> Optional[nn.Module]:
    """The ``nn.Module`` behind a model object or one of its bound methods."""
    target = getattr(obj, "__self__", obj)
    return target if isinstance(target, nn.Module) else None


def _in_data_plate(site: Dict[str, Any]) -> bool:
    return any(f.name == DATA_PLATE for f in site["cond_indep_stack"])


def _latent_sites(trace: poutine.Trace):
    for name, site in trace.nodes.items():
        if (site["type"] == "sample" and not site["is_observed"] and not site_is_subsample(site)
                and not site["infer"].get("_deterministic")):
            yield name, site


@dataclass(frozen=True)
class Program:
    """What :func:`resolve` found out about a (model, guide) pair."""

    owner: Any  #: the model object, or the model callable when two callables were given
    model: Callable  #: the Pyro model program
    guide: Callable  #: the Pyro guide program
    module: Optional[nn.Module]  #: the module holding the parameters, if any
    max_plate_nesting: int  #: deepest vectorized plate dimension of any sample site
    enumerated: Tuple[str, ...]  #: model-only latents marked for parallel enumeration
    global_latents: Tuple[str, ...]  #: guide latents outside the data plate
    local_latents: Tuple[str, ...]  #: guide latents inside the data plate
    prior_latents: Tuple[str, ...]  #: model-only latents neither guided nor enumerated
    params: Tuple[torch.Tensor, ...] = field(repr=False)  #: trainable tensors
    store_params: Dict[str, torch.Tensor] = field(repr=False)  #: pyro.param sites outside the module
    num_data: Optional[int] = None  #: training-set size the data plate scales to
    default_elbo: str = "Trace_ELBO"  #: the objective the model names for itself

    @property
    def has_global_latents(self) -> bool:
        return bool(self.global_latents)

    def train(self) -> None:
        if self.module is not None:
            self.module.train()

    def eval(self) -> None:
        if self.module is not None:
            self.module.eval()


def resolve(model: Any, guide: Optional[Callable] = None, x: Optional[torch.Tensor] = None,
            *, require_params: bool = False) -> Program:
    """Read a model object or a (model, guide) pair once, on the batch ``x``.

    Args:
        model: a model object with ``model(x)``/``guide(x)``, or a Pyro model
            callable together with ``guide``.
        guide: the guide callable when ``model`` is a bare callable.
        x: a small batch the programs run on (required).
        require_params: raise when the programs have no trainable tensors.
    """
    model_fn, guide_fn = split_programs(model, guide)
    if x is None:
        raise ValueError("resolve needs a batch of data to run the programs on")
    module = module_of(model)
    modules = [m for m in {id(m): m for m in (module, module_of(guide_fn), module_of(model_fn))
                           if m is not None}.values()]
    modes = [(m, m.training) for mod in modules for m in mod.modules()]
    for mod in modules:
        mod.eval()
    try:
        with torch.no_grad(), poutine.block(), poutine.trace(param_only=True) as capture:
            guide_trace = poutine.trace(guide_fn).get_trace(x)
            model_trace = poutine.trace(poutine.replay(model_fn, trace=guide_trace)).get_trace(x)
    except (ValueError, RuntimeError) as err:
        original = without_trace_shapes(err)
        if original is err:
            raise
        raise original from None
    finally:
        for m, training in modes:
            m.train(training)

    depth = 0
    for trace in (guide_trace, model_trace):
        for site in trace.nodes.values():
            if site["type"] == "sample":
                for frame in site["cond_indep_stack"]:
                    if frame.vectorized and frame.dim is not None:
                        depth = max(depth, -frame.dim)
    guided = dict(_latent_sites(guide_trace))
    enumerated, prior = [], []
    for name, site in _latent_sites(model_trace):
        if name in guided:
            continue
        (enumerated if site["infer"].get("enumerate") == "parallel" else prior).append(name)
    global_latents = tuple(n for n, s in guided.items() if not _in_data_plate(s))
    local_latents = tuple(n for n, s in guided.items() if _in_data_plate(s))

    params: List[torch.Tensor] = []
    for mod in modules:
        params += list(mod.parameters())
    seen = {id(p) for p in params}
    store_params: Dict[str, torch.Tensor] = {}
    for name, site in capture.trace.nodes.items():
        p = site["value"].unconstrained()
        if id(p) not in seen:
            seen.add(id(p))
            params.append(p)
            store_params[name] = p
    params = [p for p in {id(p): p for p in params}.values() if p.requires_grad]
    if require_params and not params:
        raise ValueError(
            "found no trainable parameters: register modules with pyro.module (or "
            "LatentModel.register) or use pyro.param inside model/guide"
        )
    return Program(
        owner=model, model=model_fn, guide=guide_fn, module=module, max_plate_nesting=depth,
        enumerated=tuple(enumerated), global_latents=global_latents, local_latents=local_latents,
        prior_latents=tuple(prior), params=tuple(params), store_params=store_params,
        num_data=num_data(model), default_elbo=default_elbo(model),
    )


def data_placement(model: Any, data: Any = None) -> Tuple[torch.dtype, Optional[torch.device]]:
    """The dtype and device data must have to enter ``model``: those of its
    first floating-point parameter or buffer. Programs without any (plain
    Pyro callables with constants) take a floating-point tensor as it is and
    anything else in torch's default dtype."""
    module = module_of(model)
    if module is not None:
        for t in (*module.parameters(), *module.buffers()):
            if t.is_floating_point():
                return t.dtype, t.device
    x = getattr(data, "x", data)
    if isinstance(x, torch.Tensor) and x.is_floating_point():
        return x.dtype, x.device
    return torch.get_default_dtype(), None
