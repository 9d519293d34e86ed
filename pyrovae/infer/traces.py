"""Per-data-point importance log-weights from a (model, guide) pair.

For a model whose latent variables are local to data points,

.. math::

    p(x, z) = \\prod_{n=1}^N p(x_n, z_n), \\qquad
    q(z \\mid x) = \\prod_{n=1}^N q(z_n \\mid x_n),

a trace of the guide and the model replayed against it gives, for every data
point n and particle k with :math:`z_{nk} \\sim q(z_n \\mid x_n)`, the log
importance weight

.. math::

    \\log w_{nk} = \\log p(x_n, z_{nk}) - \\log q(z_{nk} \\mid x_n).

The helpers here reduce each sample site's ``log_prob`` to a ``(K, N)`` tensor:
they keep the particle dimension (Pyro's vectorized particle plate) and the
dimension of the plate named ``"data"`` and sum every other dimension (nested
plates such as pixels or time steps, and event dimensions, already summed by
``log_prob``). A latent site outside the data plate is global: it couples all
data points, so no per-data-point weight exists, and the helpers raise
``ValueError``.

Subsampling: a data plate ``pyro.plate("data", N, subsample_size=B)`` scales
every ``log_prob`` inside it by ``N / B``. That factor belongs outside any
per-data-point non-linearity (a log-mean-exp), so the helpers divide it out and
report it as :attr:`PointwiseLogWeights.scale`; objectives multiply the summed
per-data-point bound by it.

Path-derivative ("sticking the landing") estimators [1] need log q(z | x)
evaluated with the guide's parameters held fixed while z keeps its
reparameterized dependence on them. :func:`importance_traces` computes that by
re-running the guide on detached copies of its sampled values: the score
function term :math:`\\partial_\\phi \\log q_\\phi(z)|_{z\\ \\text{fixed}}` is then
subtracted from the gradient, exactly, also for hierarchical guides where
q(z_2 | z_1) depends on z_1 (detaching the distributions' parameters instead
would also cut that dependence and bias the estimator). Guides must be
deterministic given their sampled values (no dropout) for the re-run to
reproduce them.

References

[1] G. Roeder, Y. Wu and D. Duvenaud, "Sticking the Landing: Simple,
    Lower-Variance Gradient Estimators for Variational Inference", NeurIPS 2017.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import pyro
import pyro.poutine as poutine
import torch
from pyro.distributions.score_parts import ScoreParts
from pyro.infer.enum import get_importance_trace
from pyro.poutine.trace_struct import Trace
from pyro.poutine.util import prune_subsample_sites

#: Name of the plate Pyro's ``ELBO(vectorize_particles=True)`` wraps around
#: model and guide; :func:`pointwise_log_weights` keeps its dimension.
PARTICLE_PLATE = "num_particles_vectorized"


@dataclass
class PointwiseLogWeights:
    """Log densities per particle and data point.

    Each tensor has shape ``(K, N)`` for K particles and N data points (``(N,)``
    when the trace was not vectorized over particles). Data-plate subsampling
    is divided out of all three and reported as ``scale``.
    """

    log_joint: torch.Tensor  #: log p(x_n, z_nk): every model site in the data plate
    log_guide: torch.Tensor  #: log q(z_nk | x_n)
    log_lik: torch.Tensor  #: log p(x_n | z_nk): the observed model sites only
    scale: float  #: full size / subsample size of the data plate (1.0 without subsampling)

    @property
    def log_w(self) -> torch.Tensor:
        """log p(x_n, z_nk) - log q(z_nk | x_n)."""
        return self.log_joint - self.log_guide


def _is_subsample(site: Dict[str, Any]) -> bool:
    return type(site["fn"]).__name__ == "_Subsample"


def _sample_sites(trace: Trace) -> Iterable[Tuple[str, Dict[str, Any]]]:
    for name, site in trace.nodes.items():
        if site["type"] == "sample" and not _is_subsample(site):
            yield name, site


def _detached_values(trace: Trace) -> Trace:
    """A copy of ``trace`` whose sample values are detached (the original is untouched)."""
    copy = Trace(graph_type=trace.graph_type)
    for name, site in trace.nodes.items():
        if site["type"] == "sample" and isinstance(site["value"], torch.Tensor):
            site = dict(site, value=site["value"].detach())
        copy.nodes[name] = site
    return copy


def importance_traces(
    model: Callable,
    guide: Callable,
    args: Sequence[Any],
    kwargs: Dict[str, Any],
    *,
    max_plate_nesting: float = math.inf,
    path_derivative: bool = False,
) -> Tuple[Trace, Trace]:
    """Run ``guide``, replay ``model`` against it, and compute log-probabilities.

    Pyro's :func:`pyro.infer.enum.get_importance_trace` with
    ``graph_type="flat"`` does the work: both traces come back without
    subsample sites, with ``log_prob`` and ``log_prob_sum`` at every sample
    site and ``score_parts`` at the guide's.

    With ``path_derivative=True`` every guide site's ``log_prob``,
    ``log_prob_sum`` and ``score_parts`` are replaced by a tensor with the same
    value whose gradient is the path derivative only:
    ``log q(z) - (log q'(z') - stopgrad(log q'(z')))`` where q' is the guide
    re-run on detached values z'. Its gradient with respect to the guide
    parameters flows through z alone. Every guide site must then be
    reparameterized.
    """
    # The guide runs inside a second tracer that keeps its subsample sites,
    # so the path-derivative re-run below sees the same mini-batch.
    recorder = poutine.trace(guide)
    model_trace, guide_trace = get_importance_trace(
        "flat", max_plate_nesting, model, recorder, args, kwargs
    )
    score_trace = None
    if path_derivative:
        for name, site in _sample_sites(guide_trace):
            if not site["fn"].has_rsample:
                raise ValueError(
                    f"guide site {name!r} ({type(site['fn']).__name__}) is not "
                    "reparameterizable; path-derivative (STL / DReG) gradients need "
                    "every guide site to be reparameterized. Use Trace_ELBO / "
                    "TraceGraph_ELBO for discrete latents."
                )
        score_trace = poutine.trace(
            poutine.replay(guide, trace=_detached_values(recorder.trace))
        ).get_trace(*args, **kwargs)
        score_trace = prune_subsample_sites(score_trace)
        score_trace.compute_log_prob()

    if score_trace is not None:
        for name, site in _sample_sites(guide_trace):
            score = score_trace.nodes[name]["log_prob"]
            # Same value as log q(z); gradient = total minus score function term.
            path = site["log_prob"] - (score - score.detach())
            site["log_prob"] = path
            site["log_prob_sum"] = path.sum()
            site["score_parts"] = ScoreParts(log_prob=path, score_function=0, entropy_term=path)
    return model_trace, guide_trace


def _frame(site: Dict[str, Any], name: str):
    for frame in site["cond_indep_stack"]:
        if frame.name == name:
            return frame
    return None


def pointwise_log_prob(
    site_name: str, site: Dict[str, Any], data_plate: str, particle_plate: str
) -> Tuple[torch.Tensor, float]:
    """Reduce a site's ``log_prob`` to (K, N) or (N,); return it with the data-plate scale."""
    data = _frame(site, data_plate)
    if data is None or data.dim is None:
        where = "outside" if data is None else "in a sequential (non-vectorized)"
        raise ValueError(
            f"sample site {site_name!r} is {where} pyro.plate({data_plate!r}); "
            "per-data-point importance weights need every sample site inside one "
            f"vectorized pyro.plate({data_plate!r}, N). Global latent variables "
            "(shared by all data points) are not supported: use Trace_ELBO, or "
            "make the variable local to each data point."
        )
    particle = _frame(site, particle_plate)
    keep: List[int] = [data.dim] if particle is None else [particle.dim, data.dim]
    log_prob = site["log_prob"]
    if not isinstance(log_prob, torch.Tensor):
        log_prob = torch.as_tensor(log_prob)
    width = max(-min(keep), log_prob.dim())
    log_prob = log_prob.reshape((1,) * (width - log_prob.dim()) + tuple(log_prob.shape))
    others = [d for d in range(-width, 0) if d not in keep]
    if others:
        log_prob = log_prob.sum(others)
    # Only the kept dimensions remain, in increasing order (particle before data).
    sizes = [data.size] if particle is None else [particle.size, data.size]
    log_prob = log_prob.expand(sizes)
    scale = 1.0
    if data.full_size is not None and data.size:
        scale = float(data.full_size) / float(data.size)
    return log_prob / scale if scale != 1.0 else log_prob, scale


def pointwise_log_weights(
    model_trace: Trace,
    guide_trace: Trace,
    *,
    data_plate: str = "data",
    particle_plate: str = PARTICLE_PLATE,
    prior_proposal: bool = False,
) -> PointwiseLogWeights:
    """Per-particle, per-data-point log p(x, z), log q(z | x) and log p(x | z).

    The traces come from :func:`importance_traces` (or
    :func:`pyro.infer.enum.get_importance_trace`), with log-probabilities
    computed. Raises ``ValueError`` for a sample site outside the data plate,
    for a model latent site the guide does not sample (unless
    ``prior_proposal``) and for a guide site the model lacks.

    With ``prior_proposal=True`` a model latent site that the guide does not
    sample was drawn from its prior, which is then its proposal: its density
    cancels from the weight and is left out. The weights stay unbiased; their
    gradients would need score-function terms, so objectives keep the default.
    """
    log_joint = log_guide = log_lik = None
    scales = set()
    for name, site in _sample_sites(model_trace):
        if site["infer"].get("_deterministic"):
            continue  # pyro.deterministic records a value with zero log-density
        if not site["is_observed"] and name not in guide_trace.nodes:
            if prior_proposal:
                continue
            raise ValueError(
                f"model latent site {name!r} has no guide site: importance weights "
                "need the guide to sample every latent variable of the model"
            )
        term, scale = pointwise_log_prob(name, site, data_plate, particle_plate)
        scales.add(scale)
        log_joint = term if log_joint is None else log_joint + term
        if site["is_observed"]:
            log_lik = term if log_lik is None else log_lik + term
    for name, site in _sample_sites(guide_trace):
        if name not in model_trace.nodes:
            raise ValueError(
                f"guide site {name!r} is not in the model: importance weights need "
                "every guide variable to have a density under the model "
                "(auxiliary guide variables are not supported)"
            )
        term, scale = pointwise_log_prob(name, site, data_plate, particle_plate)
        scales.add(scale)
        log_guide = term if log_guide is None else log_guide + term
    if log_joint is None:
        raise ValueError("the model has no sample sites; nothing to weight")
    if len(scales) > 1:
        raise ValueError(
            f"sites disagree on the subsampling scale of pyro.plate({data_plate!r}): "
            f"{sorted(scales)}; model and guide must use the same data plate"
        )
    zero = torch.zeros_like(log_joint)
    return PointwiseLogWeights(
        log_joint=log_joint,
        log_guide=zero if log_guide is None else log_guide.expand_as(log_joint),
        log_lik=zero if log_lik is None else log_lik.expand_as(log_joint),
        scale=scales.pop(),
    )


def guess_max_plate_nesting(
    model: Callable, guide: Callable, args: Sequence[Any], kwargs: Dict[str, Any]
) -> int:
    """Deepest plate dimension used by ``model`` or ``guide`` (runs each once)."""
    with poutine.block():
        guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(
            *args, **kwargs
        )
    dims = [
        frame.dim
        for trace in (model_trace, guide_trace)
        for site in trace.nodes.values()
        if site["type"] == "sample"
        for frame in site["cond_indep_stack"]
        if frame.vectorized
    ]
    return -min(dims) if dims else 0


def sample_log_weights(
    model: Callable,
    guide: Callable,
    *args: Any,
    num_particles: int,
    data_plate: str = "data",
    max_plate_nesting: Optional[int] = None,
    prior_proposal: bool = False,
    **kwargs: Any,
) -> PointwiseLogWeights:
    """Draw ``num_particles`` particles per data point in one vectorized pass.

    Returns :class:`PointwiseLogWeights` with ``(num_particles, N)`` tensors,
    drawn under a particle plate at dim ``-(max_plate_nesting + 1)``, like
    Pyro's ``vectorize_particles``. ``max_plate_nesting`` is guessed by running
    model and guide once when not given. Gradients are kept; wrap the call in
    ``torch.no_grad()`` for evaluation. ``prior_proposal`` as in
    :func:`pointwise_log_weights`.
    """
    if int(num_particles) != num_particles or num_particles < 1:
        raise ValueError(f"num_particles must be a positive integer, got {num_particles!r}")
    if max_plate_nesting is None:
        max_plate_nesting = guess_max_plate_nesting(model, guide, args, kwargs)
    nesting = max_plate_nesting + 1
    particles = pyro.plate(PARTICLE_PLATE, int(num_particles), dim=-nesting)
    model_trace, guide_trace = importance_traces(
        particles(model), particles(guide), args, kwargs, max_plate_nesting=nesting
    )
    # A particle plate of size 1 still has a frame, so the tensors are (K, N) for every K.
    return pointwise_log_weights(
        model_trace, guide_trace, data_plate=data_plate, particle_plate=PARTICLE_PLATE,
        prior_proposal=prior_proposal,
    )


def autograd_leaves(roots: Iterable[Any]) -> List[torch.Tensor]:
    """Leaf tensors that require grad and that ``roots`` depend on, in discovery order.

    Walks the autograd graph back from each root, so it finds every trainable
    tensor a computation used, whether or not it was registered with
    ``pyro.param`` / ``pyro.module`` (Pyro's param store may hold a copy of a
    non-contiguous module parameter rather than the parameter itself).
    """
    leaves: Dict[int, torch.Tensor] = {}
    seen = set()
    stack = []
    for root in roots:
        if isinstance(root, torch.Tensor) and root.requires_grad:
            if root.grad_fn is None:
                leaves.setdefault(id(root), root)
            else:
                stack.append(root.grad_fn)
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)  # AccumulateGrad: a leaf
        if isinstance(variable, torch.Tensor):
            leaves.setdefault(id(variable), variable)
        stack.extend(fn for fn, _ in node.next_functions)
    return list(leaves.values())


def guide_leaves(guide_trace: Trace) -> List[torch.Tensor]:
    """Trainable tensors the guide's samples and log-densities depend on."""
    roots: List[Any] = []
    for _, site in _sample_sites(guide_trace):
        roots.append(site["value"])
        roots.append(site.get("log_prob"))
    return autograd_leaves(roots)
