"""Latent-variable diagnostics: posterior collapse and the inference gap.

**Posterior collapse.** For a local latent site z (one value per data point,
inside ``pyro.plate("data")``) with D scalar dimensions, guide
q(z | x, pa) and prior p(z | pa) (``pa``: the latent sites sampled before it,
empty for a flat VAE), :func:`latent_stats` reports per dimension d

.. math::

    \\mathrm{KL}_d = \\mathbb{E}_{x}\\, \\mathbb{E}_{q(\\mathrm{pa} \\mid x)}\\,
        \\mathrm{KL}\\left(q(z_d \\mid x, \\mathrm{pa}) \\,\\|\\, p(z_d \\mid \\mathrm{pa})\\right),
    \\qquad
    A_d = \\mathrm{Cov}_x\\left(\\mathbb{E}_{q(z \\mid x)}[z_d]\\right),

the expected KL of q to the prior and the *activity* of [1]; the unit is
active when A_d exceeds a threshold (0.01 in [1]). Summed over dimensions the
KLs give the site's expected KL when q and p factorize over dimensions, and
summed over sites (the chain rule of KL) the KL term of the ELBO,
E_q[log q(z | x) - log p(z)].

How each number is computed, from one vectorized pass of the guide over S
draws per data point and the model replayed against it:

- A distribution that factorizes over dimensions (``Independent`` of a
  scalar family, e.g. ``Normal(loc, scale).to_event(1)``) gives per-dimension
  densities ``base_dist.log_prob(z)``. KL_d is analytic
  (:func:`torch.distributions.kl_divergence` of the two scalar families)
  when torch registers the pair, else a Monte Carlo average over the S draws
  (with q's entropy in closed form where it exists).
- A ``MixtureSameFamily`` whose components factorize (a VampPrior [3], a
  mixture-of-Gaussians prior) gives per dimension its *marginal*
  :math:`p(z_d) = \\sum_c \\pi_c\\, p_c(z_d)`. KL_d is then the KL to that
  marginal, by Monte Carlo: the dimensions of a mixture are dependent, so
  these KLs do not sum to the site's joint KL (which is always reported
  separately, per site).
- Any other distribution (a full-covariance Normal, a normalizing flow:
  a ``TransformedDistribution``) has no per-dimension density: KL_d is NaN
  and the site's KL is estimated from the joint densities (analytic when
  torch registers the pair of site distributions, else Monte Carlo).
- E_q[z | x] is the distribution's ``mean`` where it has one, else the
  average of the S draws. The activity estimate subtracts the Monte Carlo
  variance of that average, :math:`\\mathbb{E}_x \\widehat{\\mathrm{Var}}/S`,
  so it is unbiased for A_d either way (it can then be slightly negative for
  a dead unit).

**The inference gap** [2]. For a data point x, the amortized guide
q_phi(z | x), and q*_x, the best member of the guide's family for that x
alone,

.. math::

    \\log p(x) - \\mathcal{L}[q_\\phi]
      = \\underbrace{\\log p(x) - \\mathcal{L}[q^*_x]}_{\\text{approximation gap}}
      + \\underbrace{\\mathcal{L}[q^*_x] - \\mathcal{L}[q_\\phi]}_{\\text{amortization gap}},

where :math:`\\mathcal{L}` is the ELBO. The family is read from the model's
encoder (:class:`~pyrovae.guides.encoder.AmortizedEncoder`): the
distributions reached by some raw network output r, q_r = guide(params(r)).
:func:`inference_gap` finds q*_x by optimizing r per data point, starting
from the encoder's own output, with the model's parameters (and any flow or
network inside ``params``) held fixed.

References

[1] Y. Burda, R. Grosse and R. Salakhutdinov, "Importance Weighted
    Autoencoders", ICLR 2016 (section 5.2, active units).
[2] C. Cremer, X. Li and D. Duvenaud, "Inference Suboptimality in
    Variational Autoencoders", ICML 2018.
[3] J. M. Tomczak and M. Welling, "VAE with a VampPrior", AISTATS 2018.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import pandas as pd
import pyro
import pyro.poutine as poutine
import torch
from pyro.distributions.torch_distribution import ExpandedDistribution
from pyro.infer import Trace_ELBO, TraceEnum_ELBO
from pyro.poutine.util import prune_subsample_sites
from torch import nn
from torch.distributions import Distribution, Independent, MixtureSameFamily, kl_divergence

from pyrovae.data.core import ArrayDataset, as_dataset, check_finite
from pyrovae.guides.encoder import AmortizedEncoder
from pyrovae.infer.evaluate import elbo_terms, importance_log_likelihood
from pyrovae.infer.program import DATA_PLATE, Program, data_placement, module_of, resolve
from pyrovae.models.base import capability
from pyrovae.seeding import seeded

#: Activity above which a unit counts as active [1].
ACTIVITY_THRESHOLD = 0.01
#: Name of the plate that vectorizes the draws per data point.
DRAWS_PLATE = "latent_draws"

DIM_COLUMNS = ["site", "dim", "kl", "activity", "active", "kl_method"]
SITE_COLUMNS = ["site", "dims", "kl", "kl_se", "kl_method", "kl_dims", "per_dim",
                "active_units"]
POINT_COLUMNS = ["point", "log_px", "log_px_amortized", "log_px_optimized", "elbo_amortized",
                 "elbo_optimized", "approximation_gap", "amortization_gap", "inference_gap"]

Data = Union[ArrayDataset, torch.Tensor, Any]


# -- checks ----------------------------------------------------------------------------


def _count(name: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    return value


def _positive(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or \
            not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def _as_points(model: Any, data: Data, seed: int, max_points: Optional[int]) -> torch.Tensor:
    """Data as evaluation sees it: the model's dtype and device, one fixed
    binarization drawn with ``seed``, the first ``max_points`` rows."""
    dtype, device = data_placement(model, data)
    x = as_dataset(data, "data", dtype=dtype, device=device).fixed(seed)
    if max_points is not None:
        x = x[:max_points]
    check_finite(x, "the data")
    check_data = capability(model, "check_data")
    if check_data is not None:
        check_data(x)
    return x


@contextlib.contextmanager
def _state_kept(model: Any) -> Iterator[None]:
    """Evaluation mode for the model object's modules, and afterwards their
    modes back and Pyro's parameter store without the names added meanwhile."""
    store = pyro.get_param_store()
    names = set(store.keys())
    module = module_of(model)
    modes = [] if module is None else [(m, m.training) for m in module.modules()]
    for m, _ in modes:
        m.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.train(training)
        for name in set(store.keys()) - names:
            del store[name]


def _continuous(trace: poutine.Trace, names: Sequence[str]) -> Tuple[List[str], List[str]]:
    keep, skip = [], []
    for name in names:
        (skip if trace.nodes[name]["fn"].support.is_discrete else keep).append(name)
    return keep, skip


def continuous_local_latents(model: Any, x: torch.Tensor, *,
                             guide: Optional[Callable] = None) -> Tuple[str, ...]:
    """The guide's continuous latent sites inside ``pyro.plate("data")``: the
    sites :func:`latent_stats` reports on (empty when it does not apply).

    Runs the programs once on the first two rows of ``x``.
    """
    xs = x[:2]
    with _state_kept(model), torch.no_grad(), poutine.block():
        program = resolve(model, guide, xs)
        if not program.local_latents:
            return ()
        trace = poutine.trace(program.guide).get_trace(xs)
    return tuple(_continuous(trace, program.local_latents)[0])


def _no_local_latents(program: Program) -> ValueError:
    where = (f"its guide samples only global latent variables {list(program.global_latents)} "
             "(outside pyro.plate('data'))" if program.global_latents else
             "its guide samples no latent variable inside pyro.plate('data')")
    return ValueError(
        f"latent diagnostics need local latent variables with continuous values (guide "
        f"sample sites inside pyro.plate('data')), but {where}; they apply to VAEs, factor "
        "analysis and other models with one latent vector per data point"
    )


# -- per-dimension densities -----------------------------------------------------------


def _unwrap(d: Distribution) -> Distribution:
    while isinstance(d, (Independent, ExpandedDistribution)):
        d = d.base_dist
    return d


@dataclass
class _PerDim:
    """Per-dimension view of a site distribution: ``kind`` is "factorized"
    (``dist`` a scalar family whose log_prob is per dimension), "mixture" (a
    MixtureSameFamily with factorized components: per-dimension marginals) or
    "joint" (no per-dimension density)."""

    kind: str
    dist: Optional[Distribution]

    @classmethod
    def of(cls, fn: Distribution) -> "_PerDim":
        d = _unwrap(fn)
        if d.event_shape == torch.Size():
            return cls("factorized", d)
        if isinstance(d, MixtureSameFamily) and _unwrap(d.component_distribution).event_shape \
                == torch.Size():
            return cls("mixture", d)
        return cls("joint", None)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        """Log density of each scalar dimension of ``value`` (its shape)."""
        if self.kind == "factorized":
            return self.dist.log_prob(value)
        mix = self.dist
        r = len(mix.event_shape)
        components = _unwrap(mix.component_distribution)
        # Components sit at dim -(r + 1) of the scalar family's batch shape.
        lp = components.log_prob(value.unsqueeze(-1 - r))
        log_w = mix.mixture_distribution.logits  # normalized by Categorical
        log_w = log_w.reshape(log_w.shape + (1,) * r)
        return torch.logsumexp(lp + log_w, dim=-1 - r)


def _entropy(d: _PerDim) -> Optional[torch.Tensor]:
    if d.kind != "factorized":
        return None
    try:
        return d.dist.entropy()
    except NotImplementedError:
        return None


def _analytic_kl(q: Distribution, p: Distribution) -> Optional[torch.Tensor]:
    try:
        return kl_divergence(q, p)
    except NotImplementedError:
        return None


def _mean(fn: Distribution) -> Optional[torch.Tensor]:
    try:
        mean = fn.mean
    except NotImplementedError:
        return None
    return mean if bool(torch.isfinite(mean).all()) else None


# -- layout: (draws, points, dimensions) ------------------------------------------------


def _data_dim(name: str, site: Dict[str, Any]) -> int:
    for frame in site["cond_indep_stack"]:
        if frame.name == DATA_PLATE:
            if frame.dim is None:
                raise ValueError(f"site {name!r} is in a sequential pyro.plate('data'); latent "
                                 "diagnostics need the vectorized form pyro.plate('data', N)")
            return frame.dim
    raise ValueError(f"site {name!r} is not inside pyro.plate('data') in both model and guide")


def _arrange(t: torch.Tensor, shape: torch.Size, batch_nd: int, data_dim: int,
             nesting: int) -> torch.Tensor:
    """``t``, broadcast to ``shape`` (``batch_nd`` batch dimensions, then
    event dimensions), as (draws, points, rest)."""
    t = torch.broadcast_to(t, shape)
    particle_axis = batch_nd - (nesting + 1)
    t = t.movedim((particle_axis, batch_nd + data_dim), (0, 1))
    return t.reshape(t.shape[0], t.shape[1], -1)


@dataclass
class _SiteAccumulator:
    """Running per-point results of one site over chunks of data points."""

    name: str
    per_dim: str = "joint"
    dim_method: str = "not factorized"
    site_method: str = "analytic"
    kl_dims: List[torch.Tensor] = field(default_factory=list)  # (N, D) each
    kl_total: List[torch.Tensor] = field(default_factory=list)  # (N,) each
    means: List[torch.Tensor] = field(default_factory=list)  # (N, D): E_q[z | x]
    mc_var: List[torch.Tensor] = field(default_factory=list)  # (N, D): Var of that average


def _site_chunk(acc: _SiteAccumulator, q_site: Dict[str, Any], p_site: Dict[str, Any],
                nesting: int) -> None:
    z = q_site["value"]
    q_fn, p_fn = q_site["fn"], p_site["fn"]
    batch_nd = z.dim() - len(q_fn.event_shape)
    data_dim = _data_dim(acc.name, q_site)
    _data_dim(acc.name, p_site)

    def cells(t: torch.Tensor) -> torch.Tensor:  # per scalar dimension: (S, N, D)
        return _arrange(t, z.shape, batch_nd, data_dim, nesting)

    def points(t: torch.Tensor) -> torch.Tensor:  # per site: (S, N)
        return _arrange(t, z.shape[:batch_nd], batch_nd, data_dim, nesting).sum(-1)

    total = _analytic_kl(q_fn, p_fn)
    if total is None:
        acc.site_method = "monte carlo"
        total = q_fn.log_prob(z) - p_fn.log_prob(z)
    acc.kl_total.append(points(total).mean(0))

    q_dim, p_dim = _PerDim.of(q_fn), _PerDim.of(p_fn)
    kl = None
    if "joint" in (q_dim.kind, p_dim.kind):
        acc.per_dim = "none"
    else:
        acc.per_dim = "joint" if q_dim.kind == p_dim.kind == "factorized" else "marginal"
        if acc.per_dim == "joint":
            kl = _analytic_kl(q_dim.dist, p_dim.dist)
            acc.dim_method = "analytic"
        if kl is None:
            # The entropy in closed form leaves only the cross term to sampling.
            entropy = _entropy(q_dim)
            log_q = -entropy if entropy is not None else q_dim.log_prob(z)
            kl = log_q - p_dim.log_prob(z)
            acc.dim_method = ("monte carlo" if acc.per_dim == "joint"
                              else "monte carlo, mixture marginal")
        kl = cells(kl).mean(0)
    mean = _mean(q_fn)
    m = cells(z if mean is None else mean)
    if kl is None:
        kl = m.new_full(m.shape[1:], math.nan)
    acc.kl_dims.append(kl)
    acc.means.append(m.mean(0))
    s = m.shape[0]
    acc.mc_var.append(m.var(0) / s if s > 1 else torch.zeros_like(m[0]))


# -- posterior collapse ----------------------------------------------------------------


@dataclass
class LatentStats:
    """What :func:`latent_stats` found, per dimension and per site.

    ``dims`` has one row per (site, dimension) with columns ``site``, ``dim``
    (index into the site's flattened value), ``kl`` (nats per data point;
    NaN where q or p does not factorize), ``activity``, ``active`` and
    ``kl_method`` ("analytic", "monte carlo", "monte carlo, mixture
    marginal" or "not factorized"). ``sites`` has one row per site: ``dims``,
    ``kl`` (the site's expected KL, nats per data point) and its standard
    error ``kl_se`` over data points, ``kl_method``, ``kl_dims`` (the sum of
    the per-dimension KLs), ``per_dim`` ("joint": they sum to ``kl``;
    "marginal": KLs to per-dimension marginals of a mixture, which do not;
    "none": not available) and ``active_units``.
    """

    dims: pd.DataFrame
    sites: pd.DataFrame
    threshold: float  #: activity above which a unit is active
    num_points: int  #: data points averaged over
    num_samples: int  #: draws per data point
    skipped: Tuple[str, ...] = ()  #: discrete local sites, left out

    @property
    def active_units(self) -> int:
        """Number of active units over all sites."""
        return int(self.dims["active"].sum())

    @property
    def kl(self) -> float:
        """Expected KL of q to the prior, summed over sites (nats per data point)."""
        return float(self.sites["kl"].sum())

    def summary(self) -> Dict[str, Any]:
        """One flat record: ``active_units``, ``latent_dims``, ``latent_kl``,
        and per site ``active_units_<site>`` and ``kl_<site>``."""
        out: Dict[str, Any] = {"active_units": self.active_units,
                               "latent_dims": int(len(self.dims)), "latent_kl": self.kl}
        for row in self.sites.itertuples(index=False):
            out[f"active_units_{row.site}"] = int(row.active_units)
            out[f"kl_{row.site}"] = float(row.kl)
        return out


def latent_stats(
    model: Any,
    x: Data,
    *,
    guide: Optional[Callable] = None,
    num_samples: int = 16,
    threshold: float = ACTIVITY_THRESHOLD,
    batch_size: int = 250,
    max_points: Optional[int] = None,
    seed: int = 0,
) -> LatentStats:
    """Per-dimension KL to the prior and activity of every local latent site.

    Args:
        model: a model object with ``model(x)``/``guide(x)``, or a Pyro model
            callable together with ``guide``.
        x: the data (tensor, array, DataFrame or ArrayDataset; dynamically
            binarized data is binarized once with ``seed``), at least 2 points.
        guide: the guide callable when ``model`` is a bare callable.
        num_samples: draws S of the guide per data point, vectorized. The
            analytic parts of a flat Gaussian VAE are exact with S = 1; Monte
            Carlo parts (mixtures, flows, hierarchies) improve with S.
        threshold: activity above which a unit counts as active.
        batch_size: data points per vectorized pass.
        max_points: use only the first ``max_points`` points.
        seed: seeds every draw; the global random state is restored afterwards.

    Returns:
        :class:`LatentStats` (see the module docstring for the mathematics).
        Only continuous latent sites inside ``pyro.plate("data")`` count;
        discrete ones are listed in ``skipped``. With global latent
        variables, the numbers are conditional on draws of them from the
        guide. Model-only latent sites are drawn from their prior.

    Raises:
        ValueError: for a program without continuous local latent sites, or
            bad arguments.
    """
    _count("num_samples", num_samples, 1)
    _count("batch_size", batch_size, 1)
    if max_points is not None:
        _count("max_points", max_points, 2)
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or \
            not (math.isfinite(threshold) and threshold >= 0):
        raise ValueError(f"threshold must be a finite number >= 0, got {threshold!r}")
    points = _as_points(model, x, seed, max_points)
    if points.shape[0] < 2:
        raise ValueError(f"the activity is a variance over data points: pass at least 2 points, "
                         f"got {points.shape[0]}")
    with seeded(seed, points.device), torch.no_grad(), _state_kept(model), poutine.block():
        program = resolve(model, guide, points[:2])
        if not program.local_latents:
            raise _no_local_latents(program)
        nesting = program.max_plate_nesting
        draws = pyro.plate(DRAWS_PLATE, num_samples, dim=-(nesting + 1))
        accumulators: Dict[str, _SiteAccumulator] = {}
        skipped: List[str] = []
        for start in range(0, points.shape[0], batch_size):
            xb = points[start: start + batch_size]
            guide_trace = prune_subsample_sites(
                poutine.trace(draws(program.guide)).get_trace(xb))
            model_trace = prune_subsample_sites(poutine.trace(
                poutine.replay(draws(program.model), trace=guide_trace)).get_trace(xb))
            if not accumulators:
                keep, skipped = _continuous(guide_trace, program.local_latents)
                if not keep:
                    raise _no_local_latents(program)
                accumulators = {name: _SiteAccumulator(name) for name in keep}
            for name, acc in accumulators.items():
                if name not in model_trace.nodes:
                    raise ValueError(f"guide site {name!r} is not a site of the model: its "
                                     "KL to a prior does not exist")
                _site_chunk(acc, guide_trace.nodes[name], model_trace.nodes[name], nesting)
    return _collect(accumulators, float(threshold), points.shape[0], num_samples, skipped)


def _collect(accumulators: Dict[str, _SiteAccumulator], threshold: float, n: int,
             num_samples: int, skipped: Sequence[str]) -> LatentStats:
    dim_rows, site_rows = [], []
    for name, acc in accumulators.items():
        kl = torch.cat(acc.kl_dims).double().mean(0)
        means = torch.cat(acc.means).double()
        activity = means.var(0) - torch.cat(acc.mc_var).double().mean(0)
        total = torch.cat(acc.kl_total).double()
        active = activity > threshold
        for d in range(kl.numel()):
            dim_rows.append({"site": name, "dim": d, "kl": kl[d].item(),
                             "activity": activity[d].item(), "active": bool(active[d]),
                             "kl_method": acc.dim_method})
        site_rows.append({
            "site": name, "dims": int(kl.numel()), "kl": total.mean().item(),
            "kl_se": total.std().item() / math.sqrt(n), "kl_method": acc.site_method,
            "kl_dims": kl.sum().item() if acc.per_dim != "none" else math.nan,
            "per_dim": acc.per_dim, "active_units": int(active.sum()),
        })
    return LatentStats(dims=pd.DataFrame(dim_rows, columns=DIM_COLUMNS),
                       sites=pd.DataFrame(site_rows, columns=SITE_COLUMNS),
                       threshold=threshold, num_points=n, num_samples=num_samples,
                       skipped=tuple(skipped))


def active_units(model: Any, x: Data, *, guide: Optional[Callable] = None,
                 threshold: float = ACTIVITY_THRESHOLD, num_samples: int = 16,
                 seed: int = 0) -> int:
    """Number of active units [1] over all local latent sites: dimensions
    whose activity Cov_x(E_q[z_d | x]) exceeds ``threshold``. Arguments as in
    :func:`latent_stats`."""
    return latent_stats(model, x, guide=guide, threshold=threshold, num_samples=num_samples,
                        seed=seed).active_units


# -- the inference gap -----------------------------------------------------------------


def check_inference_gap(model: Any, x: torch.Tensor) -> AmortizedEncoder:
    """The amortized encoder :func:`inference_gap` optimizes the output of:
    ``model.encoder``. Raises ``ValueError`` saying why the gap does not
    apply when the model has no :class:`AmortizedEncoder` there, or when its
    guide samples global latent variables (checked by running the programs
    on the first two rows of ``x``)."""
    with _state_kept(model), torch.no_grad():
        return _gap_program(model, x)[0]


def _gap_program(model: Any, x: torch.Tensor) -> Tuple[AmortizedEncoder, Program]:
    if not (callable(getattr(model, "guide", None)) and callable(getattr(model, "model", None))):
        raise ValueError("the inference gap needs a model object with model(x) and guide(x) "
                         "whose guide reads the data through model.encoder, not bare Pyro "
                         "callables")
    encoder = getattr(model, "encoder", None)
    if not isinstance(encoder, AmortizedEncoder):
        found = "it has no attribute 'encoder'" if encoder is None else \
            f"its encoder is a {type(encoder).__name__}"
        raise ValueError(
            f"the inference gap optimizes the raw output of an amortized encoder per data "
            f"point, but {found}, not a pyrovae.guides.AmortizedEncoder (raw(x) and "
            "params(raw)); build the model with such an encoder, e.g. encoder='mlp'"
        )
    program = resolve(model, None, x[:2])
    if program.global_latents:
        raise ValueError(
            f"the inference gap is defined per data point, but the guide samples global "
            f"latent variables {list(program.global_latents)}; it applies to models with "
            "local latent variables only"
        )
    return encoder, program


class _FreeEncoder(nn.Module):
    """Stands in for an amortized encoder while the guide runs: its output for
    data point x_n is ``params(raw[n])``, with ``raw`` free, one row per point
    of ``data``; any other attribute the guide reads comes from the encoder it
    replaces. Evaluation helpers may run the guide on any subset of the
    points (a chunk, a probe on the first rows): rows are found by content."""

    def __init__(self, encoder: AmortizedEncoder, data: torch.Tensor, raw: torch.Tensor) -> None:
        super().__init__()
        self.raw = nn.Parameter(raw)
        # Plain attributes, not a submodule or buffers: Pyro registers only ``raw``.
        object.__setattr__(self, "source", encoder)
        object.__setattr__(self, "data", data.reshape(data.shape[0], -1))
        # Two random projections of each row: a key to look rows up by.
        g = torch.Generator().manual_seed(0)
        probe = torch.randn(self.data.shape[1], 2, generator=g, dtype=torch.float64)
        object.__setattr__(self, "probe", probe.to(data.device))
        object.__setattr__(self, "keys", self.data.double() @ self.probe)

    def rows(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        """Indices into ``data`` of the rows of ``x`` (None: all, in order)."""
        flat = x.reshape(x.shape[0], -1)
        if flat.shape == self.data.shape and torch.equal(flat, self.data):
            return None
        distance = torch.cdist(flat.double() @ self.probe, self.keys)
        index = distance.argmin(1)
        if flat.shape[1] != self.data.shape[1] or not torch.equal(self.data[index], flat):
            raise RuntimeError("the per-point guide was run on data points it was not "
                               "optimized for")
        return index

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        index = self.rows(x)
        return self.source.params(self.raw if index is None else self.raw[index])

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "source"), name)


def _swapping_guide(owner: Any, guide: Callable, free: nn.Module,
                    encoder: nn.Module) -> Callable:
    """``guide`` run with ``owner.encoder`` replaced by ``free``; the model
    keeps the real encoder (a VampPrior encodes its pseudo-inputs with it)."""
    def run(*args: Any, **kwargs: Any) -> Any:
        owner.encoder = free
        try:
            return guide(*args, **kwargs)
        finally:
            owner.encoder = encoder
    return run


@dataclass
class InferenceGap:
    """The inference gap of :func:`inference_gap`, per data point and on average.

    ``points`` has one row per data point (nats): ``log_px`` (the
    log-likelihood used), ``log_px_amortized`` and ``log_px_optimized``
    (importance-sampled with each q as the proposal; NaN when skipped),
    ``elbo_amortized``, ``elbo_optimized``, ``approximation_gap`` =
    log_px - elbo_optimized, ``amortization_gap`` = elbo_optimized -
    elbo_amortized and ``inference_gap``, their sum. ``history`` has the mean
    ELBO estimate per data point at each optimization step.
    """

    points: pd.DataFrame
    history: pd.DataFrame
    log_px_method: str  #: "exact" or "importance (K=..., best of both proposals)"
    steps: int
    lr: float
    num_samples: int
    elbo_particles: int

    def summary(self) -> Dict[str, Any]:
        """Means over data points and their standard errors, one flat record."""
        out: Dict[str, Any] = {"gap_points": int(len(self.points))}
        n = len(self.points)
        for column in ("log_px", "elbo_amortized", "elbo_optimized", "approximation_gap",
                       "amortization_gap", "inference_gap"):
            values = self.points[column].astype(float)
            name = column if column.endswith("gap") else f"gap_{column}"
            out[name] = float(values.mean())
            out[f"{name}_se"] = float(values.std(ddof=1) / math.sqrt(n)) if n > 1 else math.nan
        out["gap_log_px_method"] = self.log_px_method
        return out


def inference_gap(
    model: Any,
    x: Data,
    *,
    num_points: int = 100,
    steps: int = 300,
    lr: float = 0.01,
    num_samples: int = 1000,
    elbo_particles: int = 100,
    step_particles: int = 4,
    seed: int = 0,
) -> InferenceGap:
    """Approximation and amortization gaps of a model's amortized guide [2].

    For each of the first ``num_points`` data points:

    1. ELBO of the amortized q (``elbo_particles`` draws);
    2. q*: the encoder's raw output r (shape (N, R), ``model.encoder.raw(x)``)
       becomes a free parameter, initialized there, and Adam maximizes the
       ELBO in r for ``steps`` steps (``lr`` decayed to 0 on a cosine, which
       damps the noise of the last iterates), with ``step_particles``
       vectorized draws per step: Pyro's ``Trace_ELBO`` (``TraceEnum_ELBO``
       for models with enumerated sites). The points are optimized together,
       but the loss is a sum over points and Adam acts per coordinate, so
       each point's q* is the one its own optimization gives. Only r moves:
       no model or encoder parameter is stepped;
    3. ELBO of q* (``elbo_particles`` draws);
    4. log p(x): the model's exact ``log_marginal`` when it has one, else the
       larger of the two importance-sampled estimates with K =
       ``num_samples`` draws from the amortized q and from q* (q* is the
       better proposal for most points, having the higher ELBO). Each is a
       stochastic lower bound on log p(x), so the approximation gap is, if
       anything, underestimated (the maximum of two estimates can exceed
       its expectation, but by little at large K).

    The model's modules run in evaluation mode; their parameters, their
    ``.grad`` fields, their training modes, ``model.encoder`` and Pyro's
    parameter store are as before afterwards.

    Args:
        model: a model object whose guide reads the data only through
            ``model.encoder``, an :class:`~pyrovae.guides.encoder.AmortizedEncoder`.
        x: the data (as for :func:`latent_stats`).
        num_points: the first ``num_points`` points are used.
        steps, lr: the per-point optimization.
        num_samples: K of the importance-sampled log p(x) (0: exact only).
        elbo_particles: draws per point for each ELBO estimate.
        step_particles: draws per point in each optimization step.
        seed: seeds every draw; the global random state is restored afterwards.

    Raises:
        ValueError: for a model without an amortized encoder, with global
            latent variables, without an exact log-likelihood when
            ``num_samples`` is 0, or bad arguments.
    """
    _count("num_points", num_points, 1)
    _count("steps", steps, 0)
    lr = _positive("lr", lr)
    _count("num_samples", num_samples, 0)
    _count("elbo_particles", elbo_particles, 1)
    _count("step_particles", step_particles, 1)
    log_marginal = capability(model, "log_marginal")
    if num_samples == 0 and log_marginal is None:
        raise ValueError("num_samples=0 leaves no estimate of log p(x): the model has no exact "
                         "log_marginal; give num_samples > 0 (e.g. 1000)")
    points = _as_points(model, x, seed, num_points)
    n = points.shape[0]
    with seeded(seed, points.device), _state_kept(model):
        encoder, program = _gap_program(model, points)
        with torch.no_grad():
            raw = encoder.raw(points).detach().clone()
        free = _FreeEncoder(encoder, points, raw).eval()
        optimized = replace(program, guide=_swapping_guide(model, program.guide, free, encoder))
        history = _optimize(optimized, free, points, steps, lr, step_particles)
        amortized_elbo = elbo_terms(program, None, points, elbo_particles)["elbo"]
        optimized_elbo = elbo_terms(optimized, None, points, elbo_particles)["elbo"]
        ll_amortized = ll_optimized = points.new_full((n,), math.nan)
        if num_samples:
            ll_amortized = importance_log_likelihood(program, None, points, num_samples)
            ll_optimized = importance_log_likelihood(optimized, None, points, num_samples)
        if log_marginal is not None:
            with torch.no_grad():
                log_px = log_marginal(points)
            method = "exact"
        else:
            log_px = torch.maximum(ll_amortized, ll_optimized)
            method = f"importance (K={num_samples}, best of amortized and optimized q)"
    columns = {
        "point": torch.arange(n), "log_px": log_px, "log_px_amortized": ll_amortized,
        "log_px_optimized": ll_optimized, "elbo_amortized": amortized_elbo,
        "elbo_optimized": optimized_elbo, "approximation_gap": log_px - optimized_elbo,
        "amortization_gap": optimized_elbo - amortized_elbo,
        "inference_gap": log_px - amortized_elbo,
    }
    frame = pd.DataFrame({k: v.detach().double().cpu().numpy() for k, v in columns.items()},
                         columns=POINT_COLUMNS)
    frame["point"] = frame["point"].astype(int)
    return InferenceGap(points=frame, history=history, log_px_method=method, steps=steps,
                        lr=lr, num_samples=num_samples, elbo_particles=elbo_particles)


def _optimize(program: Program, free: _FreeEncoder, x: torch.Tensor, steps: int, lr: float,
              particles: int) -> pd.DataFrame:
    """Adam on the free raw outputs; returns the mean ELBO per point per step."""
    objective = (TraceEnum_ELBO if program.enumerated else Trace_ELBO)(
        num_particles=particles, vectorize_particles=True,
        max_plate_nesting=program.max_plate_nesting)
    optimizer = torch.optim.Adam([free.raw], lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(steps, 1))
    values = []
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        loss = objective.differentiable_loss(program.model, program.guide, x)
        # Only the free outputs receive a gradient: every model parameter's
        # .grad stays as it was.
        loss.backward(inputs=[free.raw])
        optimizer.step()
        schedule.step()
        values.append(-loss.item() / x.shape[0])
    return pd.DataFrame({"step": range(1, steps + 1), "elbo": values}, columns=["step", "elbo"])
