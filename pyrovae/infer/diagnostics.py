"""Gradient-estimator diagnostics: variance and signal-to-noise ratio.

At fixed parameters, an objective's gradient estimate g is a random vector.
Over D independent draws :math:`g^{(1)}, \\dots, g^{(D)}`, for each parameter
component j,

.. math::

    \\hat\\mu_j = \\frac1D \\sum_d g^{(d)}_j, \\qquad
    \\hat\\sigma^2_j = \\frac{1}{D-1} \\sum_d \\left(g^{(d)}_j - \\hat\\mu_j\\right)^2,
    \\qquad
    \\mathrm{SNR}_j = \\frac{|\\hat\\mu_j|}{\\hat\\sigma_j},

the signal-to-noise ratio of [1], who show that for the standard IWAE
gradient the guide (encoder) parameters' SNR decays like
:math:`O(1/\\sqrt K)` while the model (decoder) parameters' grows like
:math:`O(\\sqrt K)`; the DReG estimator [2] removes the decay.
:func:`gradient_stats` reports these per group of parameters, aggregated over
components (mean variance, mean |mean|, mean and median SNR).

References

[1] T. Rainforth, A. R. Kosiorek, T. A. Le, C. J. Maddison, M. Igl, F. Wood
    and Y. W. Teh, "Tighter Variational Bounds are Not Necessarily Better",
    ICML 2018.
[2] G. Tucker, D. Lawson, S. Gu and C. J. Maddison, "Doubly Reparameterized
    Gradient Estimators for Monte Carlo Objectives", ICLR 2019.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional

import numpy as np
import pandas as pd
import pyro.poutine as poutine
import torch
from pyro.poutine.util import prune_subsample_sites

from pyrovae.infer.objectives import make_objective
from pyrovae.infer.program import split_programs
from pyrovae.infer.traces import autograd_leaves, guide_leaves

COLUMNS = ["group", "n_params", "mean_variance", "mean_abs_mean", "mean_snr", "median_snr",
           "num_draws"]


def parameter_groups(
    model: Callable, guide: Callable, *args: Any, **kwargs: Any
) -> Dict[str, List[torch.Tensor]]:
    """Split the trainable tensors into ``"encoder"`` and ``"decoder"``.

    Runs the guide once and the model replayed against it. ``"encoder"``: the
    tensors the guide's samples and log-densities depend on; ``"decoder"``: the
    other tensors the model's log-densities depend on. Both are found by walking
    the autograd graph, so parameters count whether or not they are registered
    with ``pyro.param`` / ``pyro.module``; a parameter shared by model and guide
    counts as an encoder parameter.
    """
    with poutine.block():
        guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(
            *args, **kwargs
        )
    guide_trace = prune_subsample_sites(guide_trace)
    model_trace = prune_subsample_sites(model_trace)
    guide_trace.compute_log_prob()
    model_trace.compute_log_prob()
    encoder = guide_leaves(guide_trace)
    in_guide = {id(p) for p in encoder}
    model_roots = [site["log_prob"] for site in model_trace.nodes.values()
                   if site["type"] == "sample"]
    decoder = [p for p in autograd_leaves(model_roots) if id(p) not in in_guide]
    return {"encoder": encoder, "decoder": decoder}


def gradient_stats(
    model: Any,
    guide: Optional[Callable],
    objective: Any,
    x: torch.Tensor,
    *,
    num_draws: int = 100,
    seed: int = 0,
) -> pd.DataFrame:
    """Variance and signal-to-noise ratio of ``objective``'s gradient at fixed parameters.

    Args:
        model: a model object with ``.model`` / ``.guide`` (then ``guide=None``)
            or a Pyro model callable.
        guide: the guide callable, or ``None`` to use ``model.guide``.
        objective: an object with Pyro's ELBO interface (``loss_and_grads``), or
            a name in ``pyrovae.infer.ELBOS`` (built with its defaults).
        x: the batch the gradient is estimated on.
        num_draws: independent gradient draws (at least 2).
        seed: seeds the draws; the global random state is restored afterwards.

    Returns:
        One row per non-empty parameter group (``"encoder"``: the guide's
        parameters, ``"decoder"``: the model's; see :func:`parameter_groups`), with
        columns ``group, n_params`` (scalar components), ``mean_variance``,
        ``mean_abs_mean`` (of |E g_j|), ``mean_snr``, ``median_snr``,
        ``num_draws``. The gradient is that of the objective's loss (the
        negative bound summed over the batch); SNR and variance do not depend
        on the sign. A component with zero variance and zero mean (a parameter
        the loss does not touch, or a gradient that is exactly zero in every
        draw) has no SNR and is left out of the SNR aggregates; zero variance
        with a non-zero mean gives an infinite SNR; a gradient that is zero up
        to rounding (e.g. STL at the exact posterior) gives an SNR of rounding
        noise, so read ``mean_variance`` there. The measured parameters'
        ``.grad`` fields are restored afterwards.
    """
    if isinstance(num_draws, bool) or int(num_draws) != num_draws or num_draws < 2:
        raise ValueError(f"num_draws must be an integer >= 2, got {num_draws!r}")
    num_draws = int(num_draws)
    if isinstance(objective, str):
        objective = make_objective(objective)
    if not callable(getattr(objective, "loss_and_grads", None)):
        raise TypeError(
            f"objective must have Pyro's ELBO interface (loss_and_grads), got {type(objective)}"
        )
    model_fn, guide_fn = split_programs(model, guide)

    devices = [x.device.index or 0] if x.is_cuda else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        groups = {k: v for k, v in parameter_groups(model_fn, guide_fn, x).items() if v}
        params = [p for ps in groups.values() for p in ps]
        saved = [p.grad for p in params]
        # Welford's running mean and sum of squared deviations, per component.
        mean = {k: torch.zeros(sum(p.numel() for p in ps), dtype=torch.float64, device=x.device)
                for k, ps in groups.items()}
        m2 = {k: torch.zeros_like(v) for k, v in mean.items()}
        try:
            for draw in range(1, num_draws + 1):
                for p in params:
                    p.grad = None
                objective.loss_and_grads(model_fn, guide_fn, x)
                for k, ps in groups.items():
                    g = torch.cat([
                        (p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                        for p in ps
                    ]).to(torch.float64)
                    delta = g - mean[k]
                    mean[k] += delta / draw
                    m2[k] += delta * (g - mean[k])
        finally:
            for p, grad in zip(params, saved):
                p.grad = grad

    rows = []
    for k in groups:
        var = m2[k] / (num_draws - 1)
        abs_mean = mean[k].abs()
        std = var.sqrt()
        snr = torch.where(
            std > 0, abs_mean / std.clamp_min(torch.finfo(std.dtype).tiny),
            torch.where(abs_mean > 0, torch.full_like(std, float("inf")),
                        torch.full_like(std, float("nan"))),
        )
        finite_or_inf = snr[~snr.isnan()]
        rows.append({
            "group": k,
            "n_params": int(var.numel()),
            "mean_variance": var.mean().item(),
            "mean_abs_mean": abs_mean.mean().item(),
            "mean_snr": finite_or_inf.mean().item() if finite_or_inf.numel() else float("nan"),
            # numpy's median averages the two middle values (torch's takes the lower).
            "median_snr": (float(np.median(finite_or_inf.cpu().numpy()))
                           if finite_or_inf.numel() else float("nan")),
            "num_draws": num_draws,
        })
    return pd.DataFrame(rows, columns=COLUMNS)
