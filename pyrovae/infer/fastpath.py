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

**Capture.** Even that light run spends most of its overhead in Python: the
programs' ``pyro.sample`` and ``plate`` calls, the distribution objects and
their argument handling. When the programs' parameters all live in their
modules, :class:`FastELBO` records, once per input shape, the tensor
operations of one fast-path loss with :func:`torch.fx.experimental.proxy_tensor.make_fx`
(on fake tensors, with the parameters and buffers as inputs) and replays that
graph at every step: the same operations in the same order, random draws
included. The loss is the fast path's bit for bit, and so are the gradients of
the VAE families (tests compare them); where a tensor feeds several
operations, autograd may add its gradient's parts in another order than for
the program (a last-bit difference, seen with a full-covariance guide), so
every step of a capturing run trains on a graph, the first one included, and
a resumed run repeats the uninterrupted one bit for bit. The recorded graph
is simplified (views that change nothing dropped, ``t`` and
``addmm`` joined into ``linear``, values that depend on no input computed
once), which keeps every result bit for bit. A program whose operations
depend on the data's values (a branch on a tensor, ``.item()``) cannot be
recorded this way and keeps the fast path. A graph cannot see Python state,
so it is checked against the program on the same draws when it is recorded,
at the start of every epoch (where a callback may have changed the model:
the graph is recorded again) and at the end of every epoch (where a
difference means the epoch replayed an outdated computation:
:meth:`FastELBO.check` names it, and ``fit`` refuses to go on, before the
epoch's checkpoint is written). Each check runs the program and the graph
once without gradients.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import pyro
import torch
from torch import nn
from pyro.distributions.util import scale_and_mask
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO
from pyro.infer.enum import get_importance_trace
from pyro.poutine import Trace
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample
from torch.distributions import kl_divergence

from pyrovae.infer.program import first_line
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
    # A distribution made before the step (a prior kept by the model) may
    # check its sample's support, which the first step did already; it is
    # skipped here, as for the distributions the step makes.
    checking = []
    fn = site["fn"]
    while fn is not None:
        if getattr(fn, "_validate_args", False):
            checking.append(fn)
            fn._validate_args = False
        fn = getattr(fn, "base_dist", None)
    try:
        log_p = site["fn"].log_prob(site["value"], *site["args"], **site["kwargs"])
    finally:
        for fn in checking:
            fn._validate_args = True
    return scale_and_mask(log_p, site["scale"], site["mask"])


def _structure(sites: Sites) -> Tuple[Tuple[str, bool], ...]:
    """Names and observedness of the sample sites, in order, subsample sites left out."""
    return tuple((name, bool(site["is_observed"])) for name, site in sites.items()
                 if not site_is_subsample(site))


def _devices(x: torch.Tensor) -> List[int]:
    return [x.device.index or 0] if x.is_cuda else []



class _Holder(nn.Module):
    """The programs' modules under one root, so that ``functional_call`` can
    put their parameters and buffers in as the graph's inputs. ``tensors``
    and ``key`` are what every replayed step needs; they are gathered again
    by ``refresh`` (at every epoch's start), not at every step."""

    def __init__(self, modules: Sequence[nn.Module]) -> None:
        super().__init__()
        self.parts = nn.ModuleList(list({id(m): m for m in modules}.values()))
        self.refresh()

    def forward(self, x: torch.Tensor, fn: Callable) -> torch.Tensor:
        return fn(x)

    def refresh(self) -> None:
        named = [*self.named_parameters(), *self.named_buffers()]
        self.input_names = [n for n, _ in named]
        self.tensors = [t for _, t in named]
        self._submodules = list(self.modules())

    def key(self, x: torch.Tensor) -> Tuple[Any, ...]:
        """What a recorded graph is specific to: the input's shape, dtype and
        device, and the modules' training flags."""
        return (x.shape, x.dtype, x.device, tuple(m.training for m in self._submodules))


_ATEN = torch.ops.aten
#: Operations that make a tensor from another one's shape, dtype and device only.
_CREATION = {_ATEN.new_zeros.default, _ATEN.new_ones.default, _ATEN.new_full.default,
             _ATEN.zeros.default, _ATEN.ones.default, _ATEN.full.default,
             _ATEN.scalar_tensor.default, _ATEN.lift_fresh_copy.default}
#: Views that are no-ops when the shape does not change.
_RESHAPES = {_ATEN.expand.default, _ATEN.view.default, _ATEN.reshape.default,
             _ATEN._unsafe_view.default}


def _value(node: Any) -> Any:
    return node.meta.get("val") if hasattr(node, "meta") else None


def _simplify(module: nn.Module, tensors: List[torch.Tensor], x: torch.Tensor) -> None:
    """Three rewrites of a recorded graph that keep every result bit for bit
    and save Python calls at every replay: views to the shape a tensor already
    has are dropped; ``addmm(b, x, t(w))`` becomes ``linear(x, w, b)`` (which
    is that ``addmm``); and the values that depend on neither the inputs'
    values nor the random draws (a prior's constant scale, its logarithm)
    are computed once. Graphs that change a tensor in place (other than
    filling a fresh one with random draws) are left as they are."""
    from torch.fx import Interpreter

    graph = module.graph
    random_fills = set()
    for node in graph.nodes:
        if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
            continue
        schema = node.target._schema
        if schema.is_mutable:
            fresh = node.args and getattr(node.args[0], "target", None) is _ATEN.empty.memory_format
            if torch.Tag.nondeterministic_seeded in node.target.tags and fresh:
                random_fills.add(node)
                continue
            return
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        if node.target in _RESHAPES:
            source = node.args[0]
            before, after = _value(source), _value(node)
            if isinstance(before, torch.Tensor) and isinstance(after, torch.Tensor) \
                    and before.shape == after.shape and before.stride() == after.stride():
                node.replace_all_uses_with(source)
                graph.erase_node(node)
        elif node.target is _ATEN.addmm.default and len(node.args) == 3 and not node.kwargs:
            bias, inputs, transposed = node.args
            if getattr(transposed, "target", None) is _ATEN.t.default \
                    and len(transposed.users) == 1:
                with graph.inserting_before(node):
                    linear = graph.call_function(_ATEN.linear.default,
                                                 (inputs, transposed.args[0], bias))
                linear.meta = dict(node.meta)
                node.replace_all_uses_with(linear)
                graph.erase_node(node)
                graph.erase_node(transposed)
    # Constants: attributes, creation from a shape, and pure operations on constants.
    constant = set()
    for node in graph.nodes:
        if node.op == "get_attr":
            constant.add(node)
        elif node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload) \
                and node not in random_fills and not node.target._schema.is_mutable \
                and torch.Tag.nondeterministic_seeded not in node.target.tags:
            inputs = node.all_input_nodes
            if node.target in _CREATION:
                inputs = inputs[1:] if node.target.__name__.startswith("new_") else inputs
            elif not inputs:  # a fresh buffer (the target of a random fill) stays fresh
                continue
            if all(i in constant for i in inputs):
                constant.add(node)
    folded = [n for n in constant if n.op == "call_function"
              and any(u not in constant for u in n.users)]
    if folded:
        wanted = set(folded)
        values: Dict[Any, torch.Tensor] = {}

        class _Catch(Interpreter):
            def run_node(self, n: Any) -> Any:
                out = super().run_node(n)
                if n in wanted:
                    values[n] = out
                return out

        _Catch(module).run(tensors, x)
        for i, node in enumerate(folded):
            name = f"_folded_{i}"
            module.register_buffer(name, values[node], persistent=False)
            with graph.inserting_before(node):
                attr = graph.get_attr(name)
            attr.meta = dict(node.meta)
            node.replace_all_uses_with(attr)
    graph.eliminate_dead_code()
    graph.lint()
    module.recompile()


class _Graph:
    """One recorded loss: the graph, whether it matched the program since the
    last epoch started, and the last input it replayed since it was last
    checked."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.verified = False
        self.used_on: Optional[torch.Tensor] = None


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

        capture: record the fast path's tensor operations per input shape
            and replay them (see the module's text); needs ``modules``.
        modules: the modules holding every parameter the programs train.
        params: the trainable tensors; capture needs all of them in ``modules``.

    ``fast`` tells whether the fast path is in use (``None`` before the first
    step); ``reason`` says why not, when it is not. ``capturing`` tells
    whether graphs are recorded and replayed; ``capture_reason`` says why
    not, when they are not.
    """

    def __init__(self, objective: Any, model: Callable, guide: Callable,
                 max_plate_nesting: int, enabled: bool = True, *, capture: bool = False,
                 modules: Sequence[nn.Module] = (), params: Sequence[torch.Tensor] = ()) -> None:
        self.objective, self.model, self.guide = objective, model, guide
        self.max_plate_nesting = max_plate_nesting
        self.fast: Optional[bool] = None if enabled else False
        self.reason = "" if enabled else "turned off"
        self._structure: Tuple[Tuple[Tuple[str, bool], ...], Tuple[Tuple[str, bool], ...]] = ((), ())
        self._analytic_kl: Dict[str, bool] = {}
        self._holder = _Holder(modules) if modules else None
        held = {id(t) for t in self._holder.parameters()} if self._holder is not None else set()
        outside = [p for p in params if id(p) not in held]
        self.capture_reason = ("the fast path is off" if not enabled else
                               "turned off" if not capture else
                               "the programs have no modules" if self._holder is None else
                               "some parameters live outside the programs' modules "
                               "(pyro.param sites)" if outside else "")
        self.capturing = not self.capture_reason
        self._graphs: Dict[Tuple[Any, ...], _Graph] = {}

    # -- plain Pyro ----------------------------------------------------------------
    def plain(self, x: torch.Tensor) -> torch.Tensor:
        """The objective's own ``differentiable_loss`` (not yet backpropagated)."""
        return self.objective.differentiable_loss(self.model, self.guide, x)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.fast is None:
            self._decide(x)
        if not self.fast:
            return self.plain(x)
        if not self.capturing:
            return self._fast_loss(x)
        key = self._holder.key(x)
        graph = self._graphs.get(key)
        if graph is None or not graph.verified:
            graph = self._ready(x, key, graph)
            if graph is None:  # capture stepped aside at this step
                return self._fast_loss(x) if self.fast else self.plain(x)
        graph.used_on = x
        return graph.module(self._holder.tensors, x)

    # -- capture ------------------------------------------------------------------------
    def _record(self, x: torch.Tensor, key: Tuple[Any, ...]) -> Optional["_Graph"]:
        from torch.fx.experimental.proxy_tensor import make_fx

        holder = self._holder
        holder.refresh()
        names = holder.input_names

        def loss(tensors: List[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
            return torch.func.functional_call(holder, dict(zip(names, tensors)), (x,),
                                              kwargs={"fn": self._fast_loss}, strict=True)

        try:
            with torch.random.fork_rng(devices=_devices(x)):
                module = make_fx(loss, tracing_mode="fake")(
                    [t.detach() for t in holder.tensors], x)
        except Exception as err:  # noqa: BLE001  (any program it cannot record keeps the fast path)
            self.capturing = False
            self.capture_reason = f"the program cannot be recorded: {first_line(err)}"
            return None
        module.graph.eliminate_dead_code()
        module.recompile()
        with torch.random.fork_rng(devices=_devices(x)), torch.no_grad():
            _simplify(module, holder.tensors, x)
        for name, value in module.named_buffers():
            if value.requires_grad:
                self.capturing = False
                self.capture_reason = (f"the program reads the trainable tensor {name} from "
                                       "outside its modules")
                return None
        for attr in dir(module):
            value = getattr(module, attr, None)
            if attr.startswith("_tensor_constant") and isinstance(value, torch.Tensor) \
                    and value.requires_grad:
                self.capturing = False
                self.capture_reason = ("the program reads a trainable tensor from outside "
                                       "its modules")
                return None
        graph = self._graphs[key] = _Graph(module)
        return graph

    def _matches(self, x: torch.Tensor, graph: "_Graph") -> bool:
        """Whether the graph gives the program's loss on the same draws."""
        devices = _devices(x)
        # Buffers a step updates (batch-norm statistics) are put back after each run.
        buffers = [(b, b.clone()) for b in self._holder.buffers()]

        def run(loss: Callable[[], torch.Tensor]) -> torch.Tensor:
            with torch.random.fork_rng(devices=devices), torch.no_grad():
                out = loss()
                for b, saved in buffers:
                    b.copy_(saved)
            return out

        program = run(lambda: self._fast_loss(x))
        replayed = run(lambda: graph.module(self._holder.tensors, x))
        if torch.equal(program, replayed) or bool(torch.isnan(program) & torch.isnan(replayed)):
            return True
        # Unequal. On a device whose kernels are not reproducible (some GPU
        # reductions) the program differs from itself too; there the graph is
        # held to a relative 1e-5 instead.
        if torch.equal(program, run(lambda: self._fast_loss(x))):
            return False
        return bool(torch.isclose(program, replayed, rtol=1e-5, atol=0.0))

    def _ready(self, x: torch.Tensor, key: Tuple[Any, ...],
               graph: Optional["_Graph"]) -> Optional["_Graph"]:
        """The graph for ``x``, checked against the program on the same draws:
        the one recorded before when it still matches, else one recorded now;
        ``None`` (and capture off, with the reason) when a fresh graph does not
        match. Every step of a capturing run trains on a graph, the first one
        included, so a resumed run repeats the uninterrupted one bit for bit."""
        if graph is not None:
            if self._matches(x, graph):
                graph.verified, graph.used_on = True, None
                return graph
            # It matched before: code between epochs (a callback) changed the
            # model. Record it again from the program.
            del self._graphs[key]
        graph = self._record(x, key)
        if graph is None:
            return None
        if not self._matches(x, graph):
            self._graphs.clear()
            self.capturing = False
            self.capture_reason = ("the recorded graph differs from the program on the same "
                                   "draws (its computation depends on Python state)")
            return None
        graph.verified = True
        return graph

    def new_epoch(self) -> None:
        """Check every graph against the program again at its next use (code run
        between epochs, such as a callback, may have changed the model)."""
        if self._holder is not None:
            self._holder.refresh()
        for graph in self._graphs.values():
            graph.verified = False

    def check(self) -> str:
        """Compare every graph replayed since its last check with the program,
        on the last input it replayed; the problem in one line, or ``""``."""
        for key, graph in list(self._graphs.items()):
            if graph.used_on is None:
                continue
            x, graph.used_on = graph.used_on, None
            if not self._matches(x, graph):
                self.capturing = False
                self.capture_reason = "the graph went out of date during an epoch"
                self._graphs.clear()
                return ("the recorded training step no longer gives the program's loss: the "
                        "program's computation depends on Python state that changed during the "
                        "epoch, so the epoch's steps replayed an outdated computation; train "
                        "it with capture=False (--no-capture)")
        return ""

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
    def _decide(self, x: torch.Tensor) -> None:
        """Whether the fast path applies, from one look at the program's sites
        with Pyro's own tracing (the random state is put back afterwards, so
        the first step makes the same draws as without the fast path)."""
        self.reason = self._unsupported_objective()
        if not self.reason:
            with torch.random.fork_rng(devices=_devices(x)), torch.no_grad():
                model_trace, guide_trace = get_importance_trace(
                    "flat", self.max_plate_nesting, self.model, self.guide, (x,), {})
            self.reason = self._unsupported_program(model_trace, guide_trace)
            if not self.reason:
                self._structure = (_trace_structure(model_trace), _trace_structure(guide_trace))
        # Every step of a fast run, the first included, sums its terms the same
        # way, so a run resumed from a checkpoint repeats the uninterrupted one
        # bit for bit.
        self.fast = not self.reason
        if not self.fast and self.capturing:
            self.capturing = False
            self.capture_reason = "the fast path does not apply"

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
