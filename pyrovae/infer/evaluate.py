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

import contextlib
import math
import time
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, Optional, Tuple, Union

import pandas as pd
import pyro
import pyro.poutine as poutine
import torch
from pyro.infer import Trace_ELBO
from pyro.poutine.util import prune_subsample_sites

from pyrovae.data.core import ArrayDataset, as_dataset, check_finite
from pyrovae.infer.program import (Program, data_placement, describe_error, module_of,
                                   resolve, without_trace_shapes)
from pyrovae.infer.traces import PARTICLE_PLATE, pointwise_log_prob, sample_log_weights
from pyrovae.models.base import capability
from pyrovae.seeding import seeded

# Upper bound on (particles x data points x data dimension) held at once, which
# keeps memory bounded for K = 5000 on a full test set.
ELEMENT_BUDGET = 2**23


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


def _local_log_weights(program: Program, x: torch.Tensor, num_samples: int,
                       batch_size: int) -> torch.Tensor:
    """log of (1/K) sum_k w_nk per data point, K = ``num_samples``, in chunks
    of data points and of particles so memory stays bounded, shape (N,)."""
    enumerate_sites = bool(program.enumerated)
    out = []
    for start in range(0, x.shape[0], batch_size):
        xb = x[start : start + batch_size]
        chunk = max(1, min(num_samples, ELEMENT_BUDGET // max(1, xb.numel())))
        lse = xb.new_full((xb.shape[0],), -math.inf)
        done = 0
        while done < num_samples:
            k = min(chunk, num_samples - done)
            log_w = log_importance_weights(program.model, program.guide, xb, k,
                                           program.max_plate_nesting, enumerate_sites)[0]
            lse = torch.logaddexp(lse, torch.logsumexp(log_w, 0))
            done += k
        out.append(lse - math.log(num_samples))
    return torch.cat(out)


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


@torch.no_grad()
def importance_log_likelihood(
    model: Any,
    guide: Optional[Callable],
    x: torch.Tensor,
    num_samples: int = 1000,
    batch_size: int = 100,
) -> torch.Tensor:
    """Per-data-point importance-sampled log-likelihood (the K-sample IWAE
    bound), computed in chunks of particles so memory stays bounded."""
    program = _program(model, guide, x)
    if program.global_latents:
        raise ValueError(
            f"the guide samples global latent variables {list(program.global_latents)} "
            "(outside pyro.plate('data')): a per-data-point importance-sampled likelihood "
            "does not exist; use posterior_predictive_log_density"
        )
    return _local_log_weights(program, x, num_samples, batch_size)


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

    The log-likelihood reported is, in this order of preference: the model's
    exact ``log_marginal``; for models with global latents, the model's own
    ``log_predictive`` or the generic posterior predictive density (local
    latents importance-weighted inside each draw); else the
    importance-sampled estimate. ``log_likelihood_method`` says which.
    """
    if isinstance(num_samples, bool) or int(num_samples) != num_samples or num_samples < 0:
        raise ValueError(f"num_samples must be an integer >= 0, got {num_samples!r}")
    for name, value in (("elbo_particles", elbo_particles), ("batch_size", batch_size),
                        ("local_samples", local_samples)):
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
            iwae, iwae_se = _mean_se(
                importance_log_likelihood(program, None, x, num_samples, batch_size)
            )
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
