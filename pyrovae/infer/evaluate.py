"""Evaluation: held-out ELBO, importance-sampled log-likelihood, exact
log-likelihood when the model has one.

Everything here works per data point. For data point x_n and draws
z_1..z_K ~ q(z | x_n) the log importance weights are

.. math::  \\log w_{nk} = \\log p(x_n, z_k) - \\log q(z_k \\mid x_n),

the ELBO is their mean and the importance-sampled log-likelihood [1] is

.. math::  \\hat{\\ell}_K(x_n) = \\log \\frac{1}{K} \\sum_k w_{nk} \\le \\log p(x_n),

which rises towards log p(x_n) as K grows. Both are reported in nats per data
point, with the standard error of their mean over data points.

References

[1] Y. Burda, R. Grosse and R. Salakhutdinov, "Importance Weighted
    Autoencoders", ICLR 2016.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import pandas as pd
import pyro
import pyro.poutine as poutine
import torch
from pyro.infer import Trace_ELBO
from pyro.poutine.util import prune_subsample_sites, site_is_subsample

from pyrovae.data.core import ArrayDataset, as_dataset
from pyrovae.infer.fit import _module_of, _programs
from pyrovae.infer.traces import PARTICLE_PLATE, pointwise_log_prob, sample_log_weights

# Upper bound on (particles x data points x data dimension) held at once, which
# keeps memory bounded for K = 5000 on a full test set.
ELEMENT_BUDGET = 2**23


def _weighting(model: Callable, guide: Callable, x: torch.Tensor) -> Tuple[int, List[str]]:
    """One trace of guide and model: the deepest plate nesting of their sample
    sites, and the latent sites that only the model samples and marks for
    parallel enumeration (``infer={"enumerate": "parallel"}``), such as a
    mixture assignment whose guide is empty."""
    with torch.no_grad(), poutine.block():
        guide_trace = poutine.trace(guide).get_trace(x)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(x)
    depth = 0
    for trace in (guide_trace, model_trace):
        for site in trace.nodes.values():
            if site["type"] == "sample":
                for frame in site["cond_indep_stack"]:
                    if frame.vectorized and frame.dim is not None:
                        depth = max(depth, -frame.dim)
    enumerated = [
        name for name, site in model_trace.nodes.items()
        if site["type"] == "sample" and not site["is_observed"] and name not in guide_trace.nodes
        and site["infer"].get("enumerate") == "parallel"
    ]
    return depth, enumerated


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
    model: Callable,
    guide: Callable,
    x: torch.Tensor,
    num_samples: int,
    nesting: Optional[int] = None,
    enumerate_sites: Optional[bool] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-data-point log weights from ``num_samples`` vectorized guide draws.

    Returns ``(log_w, log_lik, log_ratio)``, each of shape (K, N):
    ``log_w = log_lik + log_ratio`` with ``log_lik = log p(x_n | z_k)`` and
    ``log_ratio = log p(z_k) - log q(z_k | x_n)``. Latent sites that only the
    model samples are summed out exactly when marked for parallel enumeration
    (``enumerate_sites``, detected when None); otherwise they are drawn from
    their prior, which is then their proposal, so their densities cancel and
    are left out. Every observed site and every latent site of the guide must
    be inside ``pyro.plate("data", N)``.
    """
    if nesting is None or enumerate_sites is None:
        depth, enumerated = _weighting(model, guide, x[:2])
        nesting = depth if nesting is None else nesting
        enumerate_sites = bool(enumerated) if enumerate_sites is None else enumerate_sites
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


def global_latent_sites(model: Callable, guide: Callable, x: torch.Tensor) -> List[str]:
    """Names of the guide's latent sites outside the ``"data"`` plate: global
    variables, such as the weights of a Bayesian model, shared by all points."""
    with torch.no_grad(), poutine.block():
        trace = poutine.trace(guide).get_trace(x)
    return [
        name for name, site in trace.nodes.items()
        if site["type"] == "sample" and not site["is_observed"] and not site_is_subsample(site)
        and not any(f.name == "data" for f in site["cond_indep_stack"])
    ]


@torch.no_grad()
def elbo_terms(
    model: Callable,
    guide: Callable,
    x: torch.Tensor,
    num_particles: int = 1,
    batch_size: int = 500,
    num_data: Optional[int] = None,
) -> Dict[str, torch.Tensor]:
    """Per-data-point ELBO, reconstruction term E_q log p(x | z) and KL term
    E_q [log q(z | x) - log p(z)], each of shape (N,).

    With global latent variables the ELBO does not split over data points:
    then ``elbo`` holds one value, the whole-batch ELBO divided by ``num_data``
    (the size the model's data plate scales to) or by N, and the two terms are
    NaN.
    """
    if global_latent_sites(model, guide, x[:2]):
        loss = Trace_ELBO(num_particles=num_particles).loss(model, guide, x)
        nan = x.new_full((1,), math.nan)
        return {"elbo": x.new_full((1,), -loss / (num_data or x.shape[0])), "recon": nan, "kl": nan}
    nesting, enumerated = _weighting(model, guide, x[:2])
    enumerate_sites = bool(enumerated)
    parts: Dict[str, list] = {"elbo": [], "recon": [], "kl": []}
    for start in range(0, x.shape[0], batch_size):
        log_w, log_lik, log_ratio = log_importance_weights(
            model, guide, x[start : start + batch_size], num_particles, nesting, enumerate_sites
        )
        parts["elbo"].append(log_w.mean(0))
        parts["recon"].append(log_lik.mean(0))
        parts["kl"].append(-log_ratio.mean(0))
    return {k: torch.cat(v) for k, v in parts.items()}


@torch.no_grad()
def posterior_predictive_log_density(
    model: Callable, guide: Callable, x: torch.Tensor, num_samples: int = 100
) -> torch.Tensor:
    """Per-data-point log (1/S) sum_s p(x_n | theta_s) with theta_s ~ q, for
    models whose guide samples global variables theta, shape (N,).

    Observed sites must be inside the ``"data"`` plate. Local latent variables
    that only the model samples are drawn from their prior, so each term is an
    unbiased one-draw estimate of p(x_n | theta_s).
    """
    draws = []
    for _ in range(num_samples):
        guide_trace = poutine.trace(guide).get_trace(x)
        model_trace = prune_subsample_sites(
            poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(x)
        )
        model_trace.compute_log_prob()
        total = x.new_zeros(x.shape[0])
        for name, site in model_trace.nodes.items():
            if site["type"] == "sample" and site["is_observed"]:
                total = total + pointwise_log_prob(name, site, "data", PARTICLE_PLATE)[0]
        draws.append(total)
    return torch.logsumexp(torch.stack(draws), 0) - math.log(num_samples)


@torch.no_grad()
def importance_log_likelihood(
    model: Callable,
    guide: Callable,
    x: torch.Tensor,
    num_samples: int = 1000,
    batch_size: int = 100,
) -> torch.Tensor:
    """Per-data-point importance-sampled log-likelihood (the K-sample IWAE
    bound), computed in chunks of particles so memory stays bounded."""
    nesting, enumerated = _weighting(model, guide, x[:2])
    enumerate_sites = bool(enumerated)
    out = []
    for start in range(0, x.shape[0], batch_size):
        xb = x[start : start + batch_size]
        chunk = max(1, min(num_samples, ELEMENT_BUDGET // max(1, xb.numel())))
        lse = xb.new_full((xb.shape[0],), -math.inf)
        done = 0
        while done < num_samples:
            k = min(chunk, num_samples - done)
            log_w = log_importance_weights(model, guide, xb, k, nesting, enumerate_sites)[0]
            lse = torch.logaddexp(lse, torch.logsumexp(log_w, 0))
            done += k
        out.append(lse - math.log(num_samples))
    return torch.cat(out)


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
) -> Evaluation:
    """Evaluate a trained model on held-out data.

    Args:
        model: model object (with ``model``/``guide``) or Pyro model callable.
        data: held-out data; dynamically binarized data is binarized once with
            ``seed`` so repeated evaluations see the same bits.
        guide: guide callable when ``model`` is a bare callable.
        num_samples: K for the importance-sampled log-likelihood (0 skips it).
        elbo_particles: draws per data point for the ELBO estimate.
        max_points: evaluate only the first ``max_points`` points.
        seed: seeds every draw; global RNG state is restored afterwards.
    """
    if num_samples < 0:
        raise ValueError(f"num_samples must be >= 0, got {num_samples}")
    data = as_dataset(data, "test")
    model_fn, guide_fn = _programs(model, guide)
    module = _module_of(model)
    if module is not None:
        module.eval()
    x = data.fixed(seed)
    if max_points is not None:
        x = x[:max_points]
    t0 = time.perf_counter()
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        is_global = bool(global_latent_sites(model_fn, guide_fn, x[:2]))
        terms = elbo_terms(model_fn, guide_fn, x, elbo_particles,
                           num_data=getattr(model, "num_data", None))
        elbo, elbo_se = _mean_se(terms["elbo"])
        iwae, iwae_se = float("nan"), float("nan")
        if is_global and num_samples > 0:
            # Global latents: the held-out density is the posterior predictive
            # (1/S) sum_s p(x | theta_s), theta_s ~ q, per data point; a model's
            # own log_predictive (with z summed out exactly) is preferred.
            predictive = getattr(model, "log_predictive", None)
            if callable(predictive):
                values = predictive(x, num_samples=num_samples)
            else:
                values = posterior_predictive_log_density(model_fn, guide_fn, x, num_samples)
            iwae, iwae_se = _mean_se(values)
        elif num_samples > 0:
            iwae, iwae_se = _mean_se(
                importance_log_likelihood(model_fn, guide_fn, x, num_samples, batch_size)
            )
        exact, exact_se = float("nan"), float("nan")
        log_marginal = getattr(model, "log_marginal", None)
        if callable(log_marginal):
            exact, exact_se = _mean_se(log_marginal(x))
        recon_error = float("nan")
        reconstruct = getattr(model, "reconstruct", None)
        if callable(reconstruct):
            recon_error = (reconstruct(x) - x).pow(2).sum(-1).mean().item()
    if not math.isnan(exact):
        ll, ll_se, method = exact, exact_se, "exact"
    elif is_global:
        ll, ll_se, method = iwae, iwae_se, f"posterior predictive (S={num_samples})"
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
