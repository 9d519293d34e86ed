"""Evaluation: held-out ELBO, importance-sampled log-likelihood, exact
log-likelihood when the model has one.

Everything here works per data point. For data point x_n and draws
z_1..z_K ~ q(z | x_n) the log importance weights are

.. math::  \\log w_{nk} = \\log p(x_n, z_k) - \\log q(z_k \\mid x_n),

the ELBO is their mean and the importance-sampled log-likelihood [1] is

.. math::  \\hat{\\ell}_K(x_n) = \\log \\frac{1}{K} \\sum_k w_{nk} \\le \\log p(x_n),

which rises towards log p(x_n) as K grows. Both are reported in nats per data
point, with the standard error of their mean over data points.

Memory. :func:`importance_log_likelihood` streams over chunks of (data points x
particles): each chunk is one vectorized trace of the guide and the model, and
its log-sum-exp over particles is added into a running one per point,

.. math::  s_n \\leftarrow \\log(e^{s_n} + \\textstyle\\sum_{k \\in \\text{chunk}} w_{nk}),

so no tensor ever holds all K particles. The chunk is the largest that keeps the
chunk's tensors under ``max_memory`` bytes, whatever K and N are.

Speed. For a Bernoulli likelihood whose logits are an MLP of z (a model object
whose ``decoder`` is an ``nn.Sequential`` of ``nn.Linear`` layers and
elementwise activations, such as :class:`pyrovae.models.VAE`) the log-weights
of a chunk come from one fused function instead of Pyro's replay of the model:
with logits l = decoder(z),

.. math::

    \\log p(x_n \\mid z) = \\sum_d x_{nd} l_d - \\mathrm{softplus}(l_d)
      = \\sum_d \\big(x_{nd} l_d - \\max(l_d, 0)\\big)
        - \\sum_{g} \\log \\prod_{d \\in g} (1 + e^{-|l_d|}),

where the last sum runs over groups g of 16 pixels (each factor lies in (1, 2],
so a group's product cannot overflow) and costs one logarithm per group instead
of one per pixel; the hidden softplus activations are
:math:`\\max(a, 0) + \\log(1 + e^{-|a|})`. On CPU both replace torch's log1p,
whose kernel is several times slower than its log; each factor's rounding
errs by at most half an ulp of 1, so the log-likelihood of D pixels by at
most D/2 ulps of 1 (5e-5 nats for float32 MNIST). The prior (a Normal shared
by all points) and a Normal guide's log-densities are summed in the same
function. The guide runs as a Pyro trace once per block of points, and each
chunk's particles are drawn from its site's distribution broadcast to (K, N)
and called, as Pyro does under a particle plate: the same draws as the generic
path for the same seed and chunks. The fast path is checked against Pyro's
log-densities on the first two points before it is used; any program it does
not recognise runs the generic path. Large evaluations compile the fused
function with ``torch.compile``.

References

[1] Y. Burda, R. Grosse and R. Salakhutdinov, "Importance Weighted
    Autoencoders", ICLR 2016.
"""

from __future__ import annotations

import contextlib
import functools
import math
import operator
import sys
import time
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, Optional, Tuple, Union

import pandas as pd
import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import torch
from pyro.infer import Trace_ELBO
from pyro.poutine.util import prune_subsample_sites
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from pyrovae.data.core import ArrayDataset, as_dataset, check_finite
from pyrovae.infer.program import (Program, data_placement, describe_error, module_of,
                                   resolve, without_trace_shapes)
from pyrovae.infer.traces import PARTICLE_PLATE, pointwise_log_prob, sample_log_weights
from pyrovae.models.base import capability
from pyrovae.seeding import seeded

#: Default bound, in bytes, on the tensors one chunk of (data points x
#: particles) of the importance-sampled log-likelihood holds at once.
MAX_MEMORY = 2**26

#: Tensors of the data's width alive per (point, particle) pair in the generic
#: path: the likelihood's parameters and the temporaries of torch's log_prob.
GENERIC_ROW_WIDTHS = 6

#: Number of (point, particle) pairs from which the fused kernel is compiled
#: (``compile_kernel=None``): compiling takes tens of seconds, which this much
#: work repays several times over.
COMPILE_MIN_DRAWS = 2**22

#: Pixels whose factors (1 + exp(-|l|)) are multiplied before one logarithm.
_GROUP = 16

#: Modules a decoder body may hold for the fused kernel: linear maps and
#: elementwise activations.
_DECODER_LAYERS = (nn.Linear, nn.Softplus, nn.ReLU, nn.Tanh, nn.ELU, nn.GELU, nn.LeakyReLU,
                   nn.Sigmoid, nn.SiLU, nn.Identity)


@contextlib.contextmanager
def _scoring(x: torch.Tensor) -> Iterator[None]:
    """Turn torch's check of a distribution's parameters (a zero or infinite
    scale met while scoring) into one line that says what to do."""
    try:
        yield
    except ValueError as err:
        original = without_trace_shapes(err)
        if not str(original).startswith("Expected parameter"):
            raise
        raise ValueError(
            f"the model cannot score this data ({describe_error(original)}): its parameters "
            f"are degenerate (a zero or infinite scale), or the data (largest |x| = "
            f"{x.abs().max().item():.3g}) is far outside what it can score in {x.dtype}; "
            "standardize the data, or train again with a lower learning rate"
        ) from None


def _program(model: Any, guide: Optional[Callable], x: torch.Tensor) -> Program:
    """``model`` when it is already a resolved :class:`Program`, else read once."""
    if isinstance(model, Program):
        return model
    return resolve(model, guide, x[:2])


def _enumerated_log_weights(
    model: Callable, guide: Callable, x: torch.Tensor, num_samples: int, nesting: int
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Log weights with the model's enumerated sites summed out exactly.

    The model runs under ``poutine.enum`` with enumeration dimensions to the
    left of the particle plate, so the sum of its log-densities is a tensor
    over every joint value of the enumerated variables; its log-sum-exp over
    those dimensions is log p(x_n, z_n) with the enumerated variables
    marginalized, per particle and data point.
    """
    ndim = nesting + 1
    particles = pyro.plate(PARTICLE_PLATE, num_samples, dim=-ndim)
    guide_trace = prune_subsample_sites(poutine.trace(particles(guide)).get_trace(x))
    enumerated = poutine.enum(
        poutine.replay(particles(model), trace=guide_trace), first_available_dim=-(ndim + 1)
    )
    model_trace = prune_subsample_sites(poutine.trace(enumerated).get_trace(x))
    guide_trace.compute_log_prob()
    n = x.shape[0]

    data_dim = None

    def keep_enum_dims(name: str, site: Dict[str, Any]) -> torch.Tensor:
        # Sum the plate dimensions other than particles and data; keep the
        # enumeration dimensions on the left.
        nonlocal data_dim
        data_dims = [f.dim for f in site["cond_indep_stack"] if f.name == "data"]
        if not data_dims:
            raise ValueError(f"site {name!r} is outside pyro.plate('data')")
        data_dim = data_dims[0]
        lp = site["fn"].log_prob(site["value"])
        if site.get("mask") is not None and site["mask"] is not True:
            lp = torch.where(torch.as_tensor(site["mask"]), lp, lp.new_zeros(()))
        lp = lp.reshape((1,) * max(0, ndim - lp.dim()) + tuple(lp.shape))
        others = [d for d in range(-ndim, 0) if d not in (-ndim, data_dim)]
        return lp.sum(others, keepdim=True) if others else lp

    joint = x.new_zeros((1,) * ndim)
    log_prior = x.new_zeros((1,) * ndim)
    for name, site in model_trace.nodes.items():
        if site["type"] != "sample":
            continue
        lp = keep_enum_dims(name, site)
        joint = joint + lp
        if not site["is_observed"] and name in guide_trace.nodes and lp.dim() == ndim:
            log_prior = log_prior + lp
    enum_dims = tuple(range(joint.dim() - ndim))
    if enum_dims:
        joint = joint.logsumexp(enum_dims)
    shape = [1] * ndim
    shape[0], shape[data_dim] = num_samples, n
    log_joint = torch.broadcast_to(joint, shape).reshape(num_samples, n)
    log_prior = torch.broadcast_to(log_prior, shape).reshape(num_samples, n)
    log_q = x.new_zeros(num_samples, n)
    for name, site in guide_trace.nodes.items():
        if site["type"] == "sample" and not site["is_observed"]:
            log_q = log_q + pointwise_log_prob(name, site, "data", PARTICLE_PLATE)[0]
    log_w = log_joint - log_q
    log_ratio = log_prior - log_q
    return log_w, log_w - log_ratio, log_ratio


def log_importance_weights(
    model: Any,
    guide: Optional[Callable],
    x: torch.Tensor,
    num_samples: int,
    nesting: Optional[int] = None,
    enumerate_sites: Optional[bool] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-data-point log weights from ``num_samples`` vectorized guide draws.

    ``model`` is a Pyro model callable (with ``guide``) or a resolved
    :class:`~pyrovae.infer.program.Program`. Returns ``(log_w, log_lik,
    log_ratio)``, each of shape (K, N): ``log_w = log_lik + log_ratio`` with
    ``log_lik = log p(x_n | z_k)`` and ``log_ratio = log p(z_k) - log q(z_k |
    x_n)``. Latent sites that only the model samples are summed out exactly
    when marked for parallel enumeration (``enumerate_sites``, read from the
    programs when None); otherwise they are drawn from their prior, which is
    then their proposal, so their densities cancel and are left out. Every
    observed site and every latent site of the guide must be inside
    ``pyro.plate("data", N)``.
    """
    if nesting is None or enumerate_sites is None:
        program = _program(model, guide, x)
        nesting = program.max_plate_nesting if nesting is None else nesting
        enumerate_sites = bool(program.enumerated) if enumerate_sites is None else enumerate_sites
    if isinstance(model, Program):
        model, guide = model.model, model.guide
    if enumerate_sites:
        return _enumerated_log_weights(model, guide, x, num_samples, nesting)
    with warnings.catch_warnings():
        # Pyro warns about model-only sites; here they are the prior proposal.
        warnings.filterwarnings("ignore", message="Found vars in model but not guide")
        weights = sample_log_weights(
            model, guide, x, num_particles=num_samples, max_plate_nesting=nesting,
            prior_proposal=True,
        )
    log_w = weights.log_w
    return log_w, weights.log_lik, log_w - weights.log_lik


# -- the fused decoder kernel -----------------------------------------------------
def _softplus(a: torch.Tensor) -> torch.Tensor:
    """softplus(a) = max(a, 0) + log(1 + exp(-|a|)): its error is the rounding
    of 1 + exp(-|a|), at most half an ulp of 1 in absolute terms (torch's log1p,
    exact also in relative terms, is the slow kernel this avoids)."""
    return a.clamp(min=0) + torch.log(1 + torch.exp(-a.abs()))


def _softplus_sum(logits: torch.Tensor) -> torch.Tensor:
    """sum_d softplus(l_d) over the last dimension, one logarithm per group of
    ``_GROUP`` pixels (see the module docstring)."""
    factors = 1 + torch.exp(-logits.abs())
    pad = -logits.shape[-1] % _GROUP
    if pad:
        factors = F.pad(factors, (0, pad), value=1.0)
    groups = factors.view(*factors.shape[:-1], -1, _GROUP).prod(-1)
    return logits.clamp(min=0).sum(-1) + groups.log().sum(-1)


def _plain_softplus(layer: nn.Module) -> bool:
    # torch's Softplus returns a itself above its threshold; at the default (20)
    # that equals the exact softplus to float precision, at others it does not.
    return isinstance(layer, nn.Softplus) and layer.beta == 1 and layer.threshold == 20


def _normal_log_density(z: torch.Tensor, loc: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """log N(z; loc, diag scale^2) summed over the last dimension."""
    return torch.distributions.Normal(loc, scale, validate_args=False).log_prob(z).sum(-1)


def _decoder_log_weights(z: torch.Tensor, body: Tuple[nn.Module, ...], weight: torch.Tensor,
                         bias: Optional[torch.Tensor], x: torch.Tensor, prior_loc: torch.Tensor,
                         prior_scale: torch.Tensor, q_loc: Optional[torch.Tensor],
                         q_scale: Optional[torch.Tensor],
                         log_q: Optional[torch.Tensor]) -> torch.Tensor:
    """log sum_k w_kn, shape (n,), for the log-weights log w_kn = log p(x_n |
    z_kn) + log p(z_kn) - log q(z_kn | x_n) of z of shape (k, n, Z), with the
    Bernoulli logits linear(body(z)). q is the Normal (q_loc, q_scale), or its
    log-density is given as ``log_q``."""
    k, n = z.shape[0], z.shape[1]
    h = z.reshape(k * n, z.shape[-1])
    for layer in body:
        h = _softplus(h) if _plain_softplus(layer) else layer(h)
    logits = F.linear(h, weight, bias)
    log_w = ((logits.view(k, n, -1) * x).sum(-1) - _softplus_sum(logits).view(k, n)
             + _normal_log_density(z, prior_loc, prior_scale))
    if log_q is None:
        log_q = _normal_log_density(z, q_loc, q_scale)
    return torch.logsumexp(log_w - log_q, 0)


@functools.lru_cache(maxsize=None)
def _compiled_kernel() -> Callable[..., torch.Tensor]:
    """The fused kernel under ``torch.compile``, built once per process (its
    shapes are symbolic, so chunks of every size share one compilation)."""
    return torch.compile(_decoder_log_weights, dynamic=True)


@dataclass
class _Block:
    """One block of data points, as the fused kernel reads it."""

    x: torch.Tensor  #: the points, (n, D)
    q: dist.Distribution  #: the guide's distribution of z, batch shape (n,)


@dataclass
class _DecoderPath:
    """What the fused kernel needs to know about a recognised program."""

    guide: Callable
    latent: str  #: the one latent site
    body: Tuple[nn.Module, ...]  #: the decoder's layers before the last
    last: nn.Linear  #: the decoder's last layer, whose output is the logits
    prior_loc: torch.Tensor  #: p(z) = N(prior_loc, prior_scale^2), the same for every point
    prior_scale: torch.Tensor
    compiled: bool  #: run the kernel under torch.compile

    def kernel(self, *args: Any) -> torch.Tensor:
        if self.compiled:
            try:
                return _compiled_kernel()(*args)
            except Exception as err:  # noqa: BLE001 - any compiler failure: run eagerly
                warnings.warn(f"torch.compile failed ({describe_error(err)}); the fused "
                              "log-likelihood runs uncompiled", RuntimeWarning)
                self.compiled = False
        return _decoder_log_weights(*args)

    def block(self, x: torch.Tensor) -> _Block:
        """The guide's q(z | x) for the points ``x`` from one Pyro trace (with
        the random state put back: its draw is not used)."""
        devices = [x.device.index or 0] if x.is_cuda else []
        with torch.random.fork_rng(devices=devices), poutine.block():
            trace = poutine.trace(self.guide).get_trace(x)
        return _Block(x=x, q=trace.nodes[self.latent]["fn"])

    def log_sum_weights(self, block: _Block, num_particles: int) -> torch.Tensor:
        """log sum_k w_kn over K fresh draws from the block's q, shape (N,).

        The draws are those of the guide run under a particle plate: Pyro
        broadcasts the site's distribution to batch shape (K, N) and calls it."""
        q = block.q.expand(torch.Size((num_particles, block.x.shape[0])))
        return self.kernel(*self.kernel_args(block.x, q, q()))

    def kernel_args(self, x: torch.Tensor, q: dist.Distribution, z: torch.Tensor) -> Tuple:
        """The fused kernel's arguments for draws z (K, N, Z) from q (batch (K, N))."""
        normal = (isinstance(q, dist.Independent) and q.reinterpreted_batch_ndims == 1
                  and type(q.base_dist) in (dist.Normal, torch.distributions.Normal))
        q_loc, q_scale = (q.base_dist.loc, q.base_dist.scale) if normal else (None, None)
        return (z, self.body, self.last.weight, self.last.bias, x, self.prior_loc,
                self.prior_scale, q_loc, q_scale, None if normal else q.log_prob(z))


def _only_data_plate(site: Dict[str, Any], n: int) -> bool:
    frames = site["cond_indep_stack"]
    return (len(frames) == 1 and frames[0].name == "data" and frames[0].dim == -1
            and frames[0].size == n and site["scale"] == 1.0 and site["mask"] is None)


def _decoder_path(program: Program, x: torch.Tensor, compiled: bool) -> Optional[_DecoderPath]:
    """The fused kernel's view of the programs when it applies to them, else None.

    It applies when the guide samples one latent site z and the model has
    exactly z, with a Normal prior shared by all points, and one observed
    Bernoulli site whose logits are ``decoder(z)`` for the model object's
    ``decoder`` (an ``nn.Sequential`` of linear layers and elementwise
    activations ending in ``nn.Linear``), all in the one data plate. The programs
    run on two points (random state put back afterwards), and the fused
    log-densities must equal Pyro's there.
    """
    if (program.enumerated or program.global_latents or program.prior_latents
            or len(program.local_latents) != 1 or program.max_plate_nesting != 1
            or program.module is None or x.dim() != 2
            or x.dtype not in (torch.float32, torch.float64)):
        return None
    decoder = getattr(program.module, "decoder", None)
    if not isinstance(decoder, nn.Sequential) or len(decoder) == 0:
        return None
    *body, last = list(decoder)
    if (not isinstance(last, nn.Linear) or last.out_features != x.shape[1]
            or not all(type(layer) in _DECODER_LAYERS for layer in body)):
        return None
    latent, xs = program.local_latents[0], x[:2]
    m = xs.shape[0]
    devices = [x.device.index or 0] if x.is_cuda else []
    with torch.random.fork_rng(devices=devices), poutine.block():
        guide_trace = prune_subsample_sites(poutine.trace(program.guide).get_trace(xs))
        model_trace = prune_subsample_sites(
            poutine.trace(poutine.replay(program.model, trace=guide_trace)).get_trace(xs))
    guide_sites = {k: v for k, v in guide_trace.nodes.items() if v["type"] == "sample"}
    model_sites = {k: v for k, v in model_trace.nodes.items() if v["type"] == "sample"}
    observed = [k for k, v in model_sites.items() if v["is_observed"]]
    if (list(guide_sites) != [latent] or len(observed) != 1
            or set(model_sites) != {latent, observed[0]}
            or not all(_only_data_plate(s, m) for s in (*guide_sites.values(),
                                                         *model_sites.values()))):
        return None
    q_site, p_site, x_site = guide_sites[latent], model_sites[latent], model_sites[observed[0]]
    z = q_site["value"]
    prior, likelihood = p_site["fn"], x_site["fn"]
    if (z.shape[:-1] != (m,) or z.dim() != 2
            or not isinstance(prior, dist.Independent) or prior.reinterpreted_batch_ndims != 1
            or type(prior.base_dist) not in (dist.Normal, torch.distributions.Normal)
            or not isinstance(likelihood, dist.Independent)
            or likelihood.reinterpreted_batch_ndims != 1
            or type(likelihood.base_dist) not in (dist.Bernoulli, torch.distributions.Bernoulli)
            or not torch.equal(x_site["value"], xs)):
        return None
    loc = prior.base_dist.loc.expand(m, z.shape[-1])
    scale = prior.base_dist.scale.expand(m, z.shape[-1])
    if not (bool((loc == loc[:1]).all()) and bool((scale == scale[:1]).all())):
        return None
    eps = torch.finfo(x.dtype).eps
    if not torch.allclose(decoder(z), likelihood.base_dist.logits, rtol=64 * eps, atol=64 * eps):
        return None
    if q_site["fn"].batch_shape != (m,) or q_site["fn"].event_shape != z.shape[-1:]:
        return None
    path = _DecoderPath(guide=program.guide, latent=latent, body=tuple(body), last=last,
                        prior_loc=loc[0], prior_scale=scale[0], compiled=compiled)
    q = q_site["fn"]
    # Pyro's own draw as one particle, whose log-sum is its log-weight.
    fused = _decoder_log_weights(*path.kernel_args(xs, q.expand(torch.Size((1, m))), z[None]))
    reference = likelihood.log_prob(xs) + prior.log_prob(z) - q.log_prob(z)
    # Both are sums of D float terms: they agree to about D roundings.
    tol = 4 * eps * (reference.abs() + xs.shape[1] * (1 + likelihood.base_dist.logits.abs().max()))
    if not bool(((fused - reference).abs() <= tol).all()):
        return None
    return path


# -- streaming over (points x particles) -------------------------------------------------
@dataclass(frozen=True)
class ChunkPlan:
    """How :func:`importance_log_likelihood` splits its work."""

    points: int  #: data points per chunk
    particles: int  #: particles per chunk (the last chunk of a point block may have fewer)
    row_bytes: int  #: estimated bytes per (point, particle) pair
    method: str  #: "fused" (the decoder kernel) or "generic" (Pyro traces of both programs)

    @property
    def rows(self) -> int:
        """(point, particle) pairs in a full chunk."""
        return self.points * self.particles

    def blocks(self, num_points: int) -> Iterator[Tuple[int, int]]:
        """``(start, stop)`` of every block of data points."""
        for start in range(0, num_points, self.points):
            yield start, min(num_points, start + self.points)

    def particle_counts(self, num_samples: int) -> Iterator[int]:
        """Particles of each chunk of one block of points."""
        for done in range(0, num_samples, self.particles):
            yield min(self.particles, num_samples - done)


def _plan(num_points: int, num_samples: int, batch_size: int, row_bytes: int,
          max_memory: int, method: str) -> ChunkPlan:
    rows = max(1, max_memory // row_bytes)
    points = max(1, min(batch_size, num_points, rows))
    particles = max(1, min(num_samples, rows // points))
    return ChunkPlan(points=points, particles=particles, row_bytes=row_bytes, method=method)


def _fused_row_bytes(path: _DecoderPath, x: torch.Tensor) -> int:
    # z, its noise and log-density temporaries; every hidden layer's input and
    # output; the logits and their factors.
    hidden = sum(m.out_features for m in path.body if isinstance(m, nn.Linear))
    z_dim = path.prior_loc.shape[-1]
    return x.element_size() * (6 * z_dim + 2 * hidden + 2 * x.shape[1])


def _check_count(name: str, value: Any, minimum: int) -> int:
    try:
        ok = not isinstance(value, bool) and operator.index(value) >= minimum
    except TypeError:
        ok = False
    if not ok:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return operator.index(value)


def _prepare(program: Program, x: torch.Tensor, num_samples: int, batch_size: int,
             max_memory: int, fast: bool, compile_kernel: Optional[bool]
             ) -> Tuple[ChunkPlan, Optional[_DecoderPath]]:
    _check_count("num_samples", num_samples, 1)
    _check_count("batch_size", batch_size, 1)
    _check_count("max_memory", max_memory, 1)
    if compile_kernel is None:
        compile_kernel = x.shape[0] * num_samples >= COMPILE_MIN_DRAWS
    path = _decoder_path(program, x, bool(compile_kernel)) if fast and len(x) else None
    if path is not None:
        return _plan(x.shape[0], num_samples, batch_size, _fused_row_bytes(path, x),
                     max_memory, "fused"), path
    width = max(1, x[:1].numel())
    return _plan(x.shape[0], num_samples, batch_size,
                 x.element_size() * GENERIC_ROW_WIDTHS * width, max_memory, "generic"), None


def _show_progress(progress: Optional[bool]) -> bool:
    return sys.stderr.isatty() if progress is None else bool(progress)


def _local_log_weights(program: Program, x: torch.Tensor, num_samples: int,
                       batch_size: int, max_memory: int = MAX_MEMORY,
                       progress: Optional[bool] = False, fast: bool = False,
                       compile_kernel: Optional[bool] = None) -> torch.Tensor:
    """log of (1/K) sum_k w_nk per data point, K = ``num_samples``, streamed over
    chunks of (points x particles) with a running log-sum-exp, shape (N,)."""
    plan, path = _prepare(program, x, num_samples, batch_size, max_memory, fast, compile_kernel)
    enumerate_sites = bool(program.enumerated)
    out = x.new_empty(x.shape[0])
    bar = tqdm(total=x.shape[0] * num_samples, disable=not _show_progress(progress),
               desc=f"log-likelihood (K={num_samples})", unit="draw", unit_scale=True,
               file=sys.stderr, leave=False)
    with bar:
        for start, stop in plan.blocks(x.shape[0]):
            xb = x[start:stop]
            lse = xb.new_full((xb.shape[0],), -math.inf)
            block = None if path is None else path.block(xb)
            for k in plan.particle_counts(num_samples):
                if block is not None:
                    chunk = path.log_sum_weights(block, k)
                else:
                    chunk = torch.logsumexp(log_importance_weights(
                        program.model, program.guide, xb, k, program.max_plate_nesting,
                        enumerate_sites)[0], 0)
                lse = torch.logaddexp(lse, chunk)
                bar.update(k * xb.shape[0])
            out[start:stop] = lse - math.log(num_samples)
    return out


def _check_global_structure(program: Program, x: torch.Tensor) -> None:
    """Refuse structures whose held-out density this module cannot compute right."""
    if program.global_latents and program.prior_latents:
        with poutine.block():
            trace = poutine.trace(program.model).get_trace(x[:2])
        outside = [n for n in program.prior_latents
                   if not any(f.name == "data" for f in trace.nodes[n]["cond_indep_stack"])]
        if outside:
            raise ValueError(
                f"model latent sites {outside} lie outside pyro.plate('data') and the guide "
                "does not sample them: a held-out density needs the guide to sample every "
                "global latent variable"
            )


def _conditioned(program: Program, values: Dict[str, torch.Tensor]) -> Program:
    """The programs with the global latents fixed at ``values`` and hidden, so
    that only per-data-point sites remain to be weighted."""
    hide = list(values)
    model = poutine.block(poutine.condition(program.model, data=values), hide=hide)
    guide = poutine.block(poutine.condition(program.guide, data=values), hide=hide)
    return replace(program, model=model, guide=guide, global_latents=())


@torch.no_grad()
def elbo_terms(
    model: Any,
    guide: Optional[Callable],
    x: torch.Tensor,
    num_particles: int = 1,
    batch_size: int = 500,
) -> Dict[str, torch.Tensor]:
    """Per-data-point ELBO, reconstruction term E_q log p(x | z) and KL term
    E_q [log q(z | x) - log p(z)], each of shape (N,).

    ``model`` is a model object or callable (with ``guide``), or a resolved
    :class:`~pyrovae.infer.program.Program`. With global latent variables the
    ELBO does not split over data points: then ``elbo`` holds one value, the
    whole-batch ELBO divided by the number of points the data plate scales to
    (the model's ``num_data``, else N), and the two terms are NaN.
    """
    program = _program(model, guide, x)
    if program.global_latents:
        loss = Trace_ELBO(num_particles=num_particles,
                          max_plate_nesting=program.max_plate_nesting).loss(
            program.model, program.guide, x)
        nan = x.new_full((1,), math.nan)
        return {"elbo": x.new_full((1,), -loss / (program.num_data or x.shape[0])),
                "recon": nan, "kl": nan}
    enumerate_sites = bool(program.enumerated)
    parts: Dict[str, list] = {"elbo": [], "recon": [], "kl": []}
    for start in range(0, x.shape[0], batch_size):
        log_w, log_lik, log_ratio = log_importance_weights(
            program.model, program.guide, x[start : start + batch_size], num_particles,
            program.max_plate_nesting, enumerate_sites,
        )
        parts["elbo"].append(log_w.mean(0))
        parts["recon"].append(log_lik.mean(0))
        parts["kl"].append(-log_ratio.mean(0))
    return {k: torch.cat(v) for k, v in parts.items()}


@torch.no_grad()
def posterior_predictive_log_density(
    model: Any,
    guide: Optional[Callable],
    x: torch.Tensor,
    num_samples: int = 100,
    local_samples: int = 100,
    batch_size: int = 100,
) -> torch.Tensor:
    """Per-data-point posterior predictive log-density of a model with global
    latent variables theta, shape (N,):

    .. math::

        \\log \\frac{1}{S} \\sum_s \\hat p(x_n \\mid \\theta_s), \\qquad
        \\theta_s \\sim q(\\theta),

    where p-hat(x_n | theta_s) integrates the local latent variables z_n:
    exactly when there are none or they are enumerated, else by importance
    sampling with ``local_samples`` draws z_nk ~ q(z_n | x_n, theta_s)
    (model-only local latents are drawn from their prior),
    p-hat = (1/K) sum_k p(x_n, z_nk | theta_s) / q(z_nk | x_n, theta_s).
    Each p-hat is unbiased for p(x_n | theta_s), so the average over draws is
    unbiased for the predictive density; its log is a consistent estimate
    that errs low for small S and K, like every importance-sampled bound.
    Drawing z_n from q without the weight would instead score p(x_n | z_n),
    which overstates the density of every point.
    """
    program = _program(model, guide, x)
    if not program.global_latents:
        raise ValueError(
            "the guide samples no latent variable outside pyro.plate('data'); use "
            "importance_log_likelihood for models with local latent variables only"
        )
    _check_global_structure(program, x)
    local = bool(program.local_latents or program.prior_latents)
    k = local_samples if local else 1
    draws = []
    for _ in range(num_samples):
        with poutine.block():
            guide_trace = poutine.trace(program.guide).get_trace(x)
        values = {name: guide_trace.nodes[name]["value"] for name in program.global_latents}
        draws.append(_local_log_weights(_conditioned(program, values), x, k, batch_size))
    return torch.logsumexp(torch.stack(draws), 0) - math.log(num_samples)


def _local_program(model: Any, guide: Optional[Callable], x: torch.Tensor) -> Program:
    program = _program(model, guide, x)
    if program.global_latents:
        raise ValueError(
            f"the guide samples global latent variables {list(program.global_latents)} "
            "(outside pyro.plate('data')): a per-data-point importance-sampled likelihood "
            "does not exist; use posterior_predictive_log_density"
        )
    return program


@torch.no_grad()
def importance_log_likelihood(
    model: Any,
    guide: Optional[Callable],
    x: torch.Tensor,
    num_samples: int = 1000,
    batch_size: int = 100,
    *,
    max_memory: int = MAX_MEMORY,
    progress: Optional[bool] = None,
    fast: bool = True,
    compile_kernel: Optional[bool] = None,
) -> torch.Tensor:
    """Per-data-point importance-sampled log-likelihood (the K-sample IWAE
    bound, see the module docstring), shape (N,).

    Args:
        model: model object or Pyro model callable (with ``guide``), or a
            resolved :class:`~pyrovae.infer.program.Program`.
        guide: guide callable when ``model`` is a bare callable.
        x: data, shape (N, ...).
        num_samples: K, particles per data point.
        batch_size: most data points in one chunk.
        max_memory: bound in bytes on the tensors of one chunk of (points x
            particles); the chunk is the largest under it, whatever K and N are
            (see :func:`importance_plan`). At the default (64 MiB) the MNIST
            VAE 784-400-50 peaked 48-91 MiB above its resting memory (resident
            set, allocator slack included) for K = 1000, 5000 and 20000, with no
            trend in K (``benchmarks/speed.py --part eval``).
        progress: a progress bar on stderr; ``None`` shows it when stderr is
            a terminal.
        fast: use the fused decoder kernel when the programs have the shape it
            handles (module docstring); ``False`` always traces both programs.
            With the same seed and the same chunks both draw the same particles
            (the fused path's smaller tensors allow it bigger chunks, see
            :func:`importance_plan`).
        compile_kernel: run the fused kernel under ``torch.compile``; ``None``
            compiles when N K >= ``COMPILE_MIN_DRAWS``. A compiler failure
            falls back to running it uncompiled, with a warning.
    """
    program = _local_program(model, guide, x)
    return _local_log_weights(program, x, num_samples, batch_size, max_memory, progress,
                              fast, compile_kernel)


@torch.no_grad()
def importance_plan(
    model: Any,
    guide: Optional[Callable],
    x: torch.Tensor,
    num_samples: int = 1000,
    batch_size: int = 100,
    *,
    max_memory: int = MAX_MEMORY,
    fast: bool = True,
) -> ChunkPlan:
    """The chunks :func:`importance_log_likelihood` would use for the same
    arguments, and which method computes them (the programs run on two points,
    with the random state put back afterwards).

    The chunk holds ``max_memory // row_bytes`` (point, particle) pairs, at
    most ``batch_size`` points of them, where ``row_bytes`` counts the
    tensors of one pair: for the fused kernel z and its noise, every hidden
    layer's input and output and the logits; for the generic path
    ``GENERIC_ROW_WIDTHS`` tensors of the data's width.
    """
    program = _local_program(model, guide, x)
    return _prepare(program, x, num_samples, batch_size, max_memory, fast, False)[0]


@dataclass
class Evaluation:
    """Held-out metrics, per data point, in nats (higher is better)."""

    n: int  # data points evaluated
    elbo: float  # mean ELBO
    elbo_se: float  # its standard error over data points
    recon: float  # E_q log p(x | z)
    kl: float  # E_q log q(z | x) - log p(z)
    iwae: float  # importance-sampled log-likelihood with num_samples draws (NaN if skipped);
    # for models with global latents, the posterior predictive log-density
    iwae_se: float
    num_samples: int
    exact: float  # exact log-likelihood (NaN when the model has no log_marginal)
    exact_se: float
    log_likelihood: float  # exact when available, else the importance-sampled one
    log_likelihood_se: float
    log_likelihood_method: str  # "exact" or "importance (K=...)"
    recon_error: float  # squared error of reconstruct(x), summed over dimensions (NaN if absent)
    seconds: float

    def to_frame(self) -> pd.DataFrame:
        return pd.DataFrame([asdict(self)])

    def to_csv(self, path: Union[str, Path]) -> Path:
        path = Path(path)
        self.to_frame().to_csv(path, index=False)
        return path


def _mean_se(v: torch.Tensor) -> Tuple[float, float]:
    v = v.double()
    se = v.std().item() / math.sqrt(len(v)) if len(v) > 1 else float("nan")
    return v.mean().item(), se


def evaluate(
    model: Any,
    data: Union[ArrayDataset, torch.Tensor],
    *,
    guide: Optional[Callable] = None,
    num_samples: int = 1000,
    elbo_particles: int = 1,
    batch_size: int = 100,
    max_points: Optional[int] = None,
    seed: int = 0,
    local_samples: int = 100,
    max_memory: int = MAX_MEMORY,
    progress: Optional[bool] = None,
) -> Evaluation:
    """Evaluate a trained model on held-out data.

    Args:
        model: model object (with ``model``/``guide``) or Pyro model callable.
        data: held-out data (tensor, numpy array, DataFrame or ArrayDataset),
            converted to the model's dtype; dynamically binarized data is
            binarized once with ``seed`` so repeated evaluations see the same bits.
        guide: guide callable when ``model`` is a bare callable.
        num_samples: K for the importance-sampled log-likelihood; for models
            with global latents, the number S of posterior draws of the
            posterior predictive density (0 skips it).
        elbo_particles: draws per data point for the ELBO estimate.
        max_points: evaluate only the first ``max_points`` points.
        seed: seeds every draw; global RNG state is restored afterwards.
        local_samples: for models with global and local latents, the
            importance samples of the local latents inside each posterior draw.
        max_memory: bound in bytes on the tensors of one chunk of (points x
            particles) of the importance-sampled log-likelihood
            (:func:`importance_log_likelihood`).
        progress: a progress bar on stderr for the importance-sampled
            log-likelihood; ``None`` shows it when stderr is a terminal.

    The log-likelihood reported is, in this order of preference: the model's
    exact ``log_marginal``; for models with global latents, the model's own
    ``log_predictive`` or the generic posterior predictive density (local
    latents importance-weighted inside each draw); else the
    importance-sampled estimate. ``log_likelihood_method`` says which.
    """
    if isinstance(num_samples, bool) or int(num_samples) != num_samples or num_samples < 0:
        raise ValueError(f"num_samples must be an integer >= 0, got {num_samples!r}")
    for name, value in (("elbo_particles", elbo_particles), ("batch_size", batch_size),
                        ("local_samples", local_samples), ("max_memory", max_memory)):
        if isinstance(value, bool) or int(value) != value or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if max_points is not None and (int(max_points) != max_points or max_points < 1):
        raise ValueError(f"max_points must be an integer >= 1 or None, got {max_points!r}")
    owner = module_of(model)
    if owner is not None:
        bad = [n for n, p in owner.named_parameters() if not bool(torch.isfinite(p).all())]
        if bad:
            raise ValueError(f"the model's parameters {bad[:3]} hold NaN or infinite values; "
                             "train it again or load a good checkpoint")
    dtype, device = data_placement(model, data)
    data = as_dataset(data, "test", dtype=dtype, device=device)
    x = data.fixed(seed)
    if max_points is not None:
        x = x[:max_points]
    check_finite(x, "the evaluation data")
    check_data = capability(model, "check_data")
    if check_data is not None:
        check_data(x)
    t0 = time.perf_counter()
    with seeded(seed, x.device), torch.no_grad(), _scoring(x):
        program = resolve(model, guide, x[:2])
        program.eval()
        is_global = program.has_global_latents
        terms = elbo_terms(program, None, x, elbo_particles)
        elbo, elbo_se = _mean_se(terms["elbo"])
        iwae, iwae_se = float("nan"), float("nan")
        if is_global and num_samples > 0:
            predictive = capability(model, "log_predictive")
            if predictive is not None:
                values = predictive(x, num_samples=num_samples)
            else:
                values = posterior_predictive_log_density(
                    program, None, x, num_samples, local_samples, batch_size)
            iwae, iwae_se = _mean_se(values)
        elif num_samples > 0:
            iwae, iwae_se = _mean_se(importance_log_likelihood(
                program, None, x, num_samples, batch_size, max_memory=max_memory,
                progress=progress))
        exact, exact_se = float("nan"), float("nan")
        log_marginal = capability(model, "log_marginal")
        if log_marginal is not None:
            exact, exact_se = _mean_se(log_marginal(x))
        recon_error = float("nan")
        reconstruct = capability(model, "reconstruct")
        if reconstruct is not None:
            recon_error = (reconstruct(x) - x).pow(2).sum(-1).mean().item()
    if not all(math.isfinite(v) for v in (elbo, *([iwae] if num_samples else []))) or \
            (log_marginal is not None and not math.isfinite(exact)):
        raise ValueError(
            f"evaluation gave a non-finite result (ELBO {elbo}, log-likelihood "
            f"{exact if log_marginal is not None else iwae}): the data (largest |x| = "
            f"{x.abs().max().item():.3g}) is far outside what this model can score in "
            f"{x.dtype}; standardize it or check the model's parameters"
        )
    if not math.isnan(exact):
        ll, ll_se, method = exact, exact_se, "exact"
    elif is_global:
        local = program.local_latents or program.prior_latents
        detail = f", K={local_samples}" if local and capability(model, "log_predictive") is None else ""
        ll, ll_se, method = iwae, iwae_se, f"posterior predictive (S={num_samples}{detail})"
    else:
        ll, ll_se, method = iwae, iwae_se, f"importance (K={num_samples})"
    return Evaluation(
        n=x.shape[0], elbo=elbo, elbo_se=elbo_se,
        recon=terms["recon"].mean().item(), kl=terms["kl"].mean().item(),
        iwae=iwae, iwae_se=iwae_se, num_samples=num_samples,
        exact=exact, exact_se=exact_se, log_likelihood=ll, log_likelihood_se=ll_se,
        log_likelihood_method=method, recon_error=recon_error,
        seconds=time.perf_counter() - t0,
    )
