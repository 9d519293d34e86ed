"""Export draws from a trained guide to ArviZ.

For a model with global latent variables theta (factor loadings, mixture
weights and means, ...) the trained guide q(theta) approximates p(theta | X).
:func:`to_inference_data` draws theta^(s) ~ q, s = 1..S, by tracing the guide,
and returns an ``arviz.InferenceData`` whose ``posterior`` group holds them
(one chain of S draws), so ArviZ's summaries and plots apply [1]:
``az.summary(idata)``, ``az.plot_posterior(idata, var_names=["weight"])``.
Draws from a variational guide are independent, so ArviZ's effective sample
size is about S and R-hat about 1 by construction; they describe q, not how
well q matches the posterior.

References

[1] R. Kumar, C. Carroll, A. Hartikainen and O. Martin, "ArviZ a unified
    library for exploratory analysis of Bayesian models in Python", Journal
    of Open Source Software 4(33), 2019.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Union

import numpy as np
import pyro.poutine as poutine
import torch
from pyro.poutine.util import site_is_subsample

from pyrovae.data.core import ArrayDataset, as_dataset
from pyrovae.infer.program import split_programs

DATA_PLATE = "data"


def _is_local(site: Mapping[str, Any]) -> bool:
    return any(f.name == DATA_PLATE for f in site["cond_indep_stack"])


def _latent_sites(trace: poutine.Trace, include_local: bool) -> List[str]:
    names = []
    for name, site in trace.nodes.items():
        if site["type"] != "sample" or site["is_observed"] or site_is_subsample(site):
            continue
        if site["infer"].get("is_auxiliary", False):
            continue
        if _is_local(site) and not include_local:
            continue
        names.append(name)
    return names


def _numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().to("cpu").numpy()


def to_inference_data(
    model: Any,
    guide: Optional[Callable] = None,
    data: Union[ArrayDataset, torch.Tensor, None] = None,
    num_samples: int = 1000,
    seed: int = 0,
    *,
    var_names: Optional[Sequence[str]] = None,
    include_local: bool = False,
    log_likelihood: bool = False,
    coords: Optional[Dict[str, Any]] = None,
    dims: Optional[Dict[str, List[str]]] = None,
):
    """Draw ``num_samples`` latent values from the guide into ``arviz.InferenceData``.

    Args:
        model: a model object with ``model(x)`` and ``guide(x)`` (for example
            :class:`pyrovae.models.linear.BayesianFactorAnalysis` or a Bayesian
            Gaussian mixture), or a Pyro model callable with ``guide`` given.
        guide: the guide callable, when ``model`` is a bare callable.
        data: the data the programs are called with, an ``ArrayDataset`` or
            an (N, D) tensor; it becomes the ``observed_data`` group.
        num_samples: number of draws S (one chain).
        seed: seeds the draws; the global RNG state is restored afterwards.
        var_names: latent sites to export (default: every latent site the
            guide samples, except auxiliary sites and, unless
            ``include_local``, sites inside the ``"data"`` plate).
        include_local: also export per-data-point latents (shape (S, N, ...)).
        log_likelihood: also store log p(x_n | theta^(s)) per draw and data
            point for each observed site (the ``log_likelihood`` group that
            ``az.loo`` and ``az.waic`` read); this runs the model once per draw.
        coords, dims: passed to ``arviz.from_dict`` to name array dimensions
            (for example ``dims={"weight": ["item", "factor"]}``).

    Returns:
        ``arviz.InferenceData`` with groups ``posterior`` (shape (1, S, ...)
        per site), ``observed_data`` and, if asked, ``log_likelihood``.
    """
    import arviz as az

    if data is None:
        raise ValueError("data is required: the guide and model are called as guide(x) and model(x)")
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    model_fn, guide_fn = split_programs(model, guide)
    x = as_dataset(data, "data").fixed(seed)
    draws: Dict[str, List[torch.Tensor]] = {}
    loglik: Dict[str, List[torch.Tensor]] = {}
    observed: Dict[str, torch.Tensor] = {}
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        names: Optional[List[str]] = None
        for _ in range(num_samples):
            guide_trace = poutine.trace(guide_fn).get_trace(x)
            if names is None:
                available = _latent_sites(guide_trace, include_local)
                names = list(available) if var_names is None else list(var_names)
                missing = [n for n in names if n not in available]
                if missing:
                    raise ValueError(
                        f"the guide samples no exportable site(s) {missing}; available: {available}"
                        + ("" if include_local else " (pass include_local=True for sites in the data plate)")
                    )
                if not names:
                    raise ValueError(
                        "the guide samples no global latent sites; pass include_local=True to export "
                        "per-data-point latents"
                    )
            for name in names:
                draws.setdefault(name, []).append(guide_trace.nodes[name]["value"])
            if log_likelihood or not observed:
                model_trace = poutine.trace(poutine.replay(model_fn, trace=guide_trace)).get_trace(x)
                for name, site in model_trace.nodes.items():
                    if site["type"] == "sample" and site["is_observed"]:
                        observed.setdefault(name, site["value"])
                        if log_likelihood:
                            loglik.setdefault(name, []).append(site["fn"].log_prob(site["value"]))
    posterior = {name: _numpy(torch.stack(v))[None] for name, v in draws.items()}
    groups: Dict[str, Any] = {
        "posterior": posterior,
        "observed_data": {name: _numpy(v) for name, v in observed.items()},
    }
    if log_likelihood:
        groups["log_likelihood"] = {name: _numpy(torch.stack(v))[None] for name, v in loglik.items()}
    return az.from_dict(**groups, coords=coords, dims=dims)
