"""The contract every pyrovae model meets.

Required. A model object has two Pyro programs of the same signature:
``model(x)`` defines p(x, z) and ``guide(x)`` defines q(z | x). Data sites
live under ``pyro.plate("data", ...)`` and event dimensions use
``.to_event``. (A user may instead hand fit/evaluate any two Pyro callables.)

Optional capabilities. Each has one name, a signature and a meaning, declared
together in :data:`CAPABILITIES` (listed at the end of this docstring). A
model offers a method capability by defining a method of that name; a
subclass that inherits one it cannot honour sets it to ``None``. Attribute
capabilities (``num_data``, ``default_elbo``) have their defaults on
:class:`LatentModel`. Code never probes with ``getattr(model, name, None)``:
it asks

- :func:`capability` ``(model, name)``: the bound method, or ``None``;
- :func:`num_data` ``(model)``: the training-set size the data plate scales
  to, or ``None``;
- :func:`default_elbo` ``(model)``: the name of the objective that suits it.

All three work for :class:`LatentModel` subclasses and for duck-typed objects
that are not.

Data in. Every public method of a model that takes data (all capabilities
above, ``predict``, ``init_from_data`` ...) starts with
:meth:`LatentModel.as_data`, which applies the package's one rule for data
(:func:`pyrovae.data.core.as_tensor`: tensors, numpy arrays, DataFrames and
nested lists; 1-D is (N, 1); images are flattened) in the model's dtype and
on its device, and checks the number of columns. ``model(x)`` and
``guide(x)`` do not: they stay fast, and fit/evaluate convert before calling
them.

Parameters live in the module. Pyro's ELBOs find trainable tensors through
``pyro.param`` sites, so each model registers its sub-modules with
``pyro.module`` under a name unique to the instance: the global parameter store
only holds references, and two models can be trained side by side in one
process.
"""

from __future__ import annotations

import contextlib
import contextvars
import itertools
import operator
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, Optional

import pyro
import torch
from torch import nn

from pyrovae.data.core import as_tensor, check_finite

_instance_ids = itertools.count()

#: The objective a model gets when it names none.
DEFAULT_ELBO = "Trace_ELBO"


@dataclass(frozen=True)
class Capability:
    """One optional part of the model contract.

    Attributes:
        name: the method or attribute name, the only one it goes by.
        signature: how it is called (methods) or typed (attributes).
        semantics: what it returns and what it must mean.
        attribute: ``True`` for a value (ask :func:`num_data` /
            :func:`default_elbo`), ``False`` for a method (ask
            :func:`capability`).
    """

    name: str
    signature: str
    semantics: str
    attribute: bool = False


CAPABILITIES: Dict[str, Capability] = {c.name: c for c in (
    Capability(
        "log_marginal", "log_marginal(x) -> Tensor of shape (N,)",
        "Exact log p(x_n) per data point, z integrated out in closed form. Offered only "
        "where the mathematics gives it; evaluation prefers it to the importance-sampled "
        "estimate and says which it reports.",
    ),
    Capability(
        "posterior", "posterior(x) -> torch.distributions.Distribution, batch shape (N,)",
        "p(z_n | x_n) of the local latents z: exact for models with point-estimated "
        "parameters (FactorAnalysis, PPCA, GaussianMixture); Bayesian models give it at "
        "the plug-in parameters of their guide.",
    ),
    Capability(
        "sample", "sample(n, generator=None) -> Tensor of shape (n, D)",
        "n independent draws x ~ p(x): z ~ p(z), then x ~ p(x | z), noise included (0/1 "
        "values for a Bernoulli likelihood), in the model's dtype and on its device. "
        "Models with global latents draw from the plug-in model their guide summarizes. "
        "Never means: see sample_mean.",
    ),
    Capability(
        "sample_mean", "sample_mean(n, generator=None) -> Tensor of shape (n, D)",
        "The means E[x | z] of p(x | z) for n draws z ~ p(z): noise-free (pixel "
        "probabilities for a Bernoulli VAE), what image grids of samples show.",
    ),
    Capability(
        "encode", "encode(x) -> Tensor of shape (N, K)",
        "A point summary of z given x: the mean of the exact posterior or of the "
        "amortized guide for continuous z; the responsibilities for a mixture.",
    ),
    Capability(
        "reconstruct", "reconstruct(x) -> Tensor of shape (N, D)",
        "The mean of p(x | z) at z = encode(x).",
    ),
    Capability(
        "check_data", "check_data(x) -> None",
        "Raise ValueError with one clear line for data the likelihood cannot score "
        "(wrong number of columns, NaN or inf, non-binary data for a Bernoulli "
        "likelihood); fit calls it before training.",
    ),
    Capability(
        "log_predictive",
        "log_predictive(x, num_samples=100, generator=None) -> Tensor of shape (N,)",
        "For models with global latents theta: the posterior predictive log density "
        "log (1/S) sum_s p(x_n | theta_s), theta_s ~ q, per data point, with the local "
        "latents summed out exactly; evaluation prefers it to the generic estimate.",
    ),
    Capability(
        "fit_em", "fit_em(x, **options) -> pyrovae.infer.em.EMResult",
        "Fit the parameters by expectation-maximization (computed in float64 whatever "
        "the model's dtype), write them into the model and return the result with its "
        "log-likelihood history.",
    ),
    Capability(
        "num_data", "num_data: Optional[int]",
        "The training-set size N the data plate scales a mini-batch of B points to "
        "(likelihood times N / B), for models with global latents; None when the model "
        "has none or each batch is treated as the whole data set.",
        attribute=True,
    ),
    Capability(
        "default_elbo", "default_elbo: str",
        f"Name (in ELBOS) of the objective that suits the model, used when the user names "
        f"none: 'TraceEnum_ELBO' for the enumerated GaussianMixture; {DEFAULT_ELBO!r} by "
        f"default.",
        attribute=True,
    ),
)}

__doc__ = (__doc__ or "") + "\nCapabilities:\n\n" + "\n".join(
    f"- ``{c.signature}``: {c.semantics}" for c in CAPABILITIES.values()
) + "\n"


def _lookup(name: str, attribute: bool) -> Capability:
    spec = CAPABILITIES.get(name)
    if spec is None:
        raise ValueError(f"unknown capability {name!r}; known: {', '.join(CAPABILITIES)}")
    if spec.attribute != attribute:
        ask = f"{name}(model)" if spec.attribute else f"capability(model, {name!r})"
        raise ValueError(f"{name!r} is {'an attribute' if spec.attribute else 'a method'}; ask {ask}")
    return spec


def capability(model: Any, name: str) -> Optional[Callable[..., Any]]:
    """The bound method ``model.<name>`` when ``model`` offers the method
    capability ``name`` (a key of :data:`CAPABILITIES`), else ``None``.

    Works for :class:`LatentModel` subclasses and duck-typed objects alike. A
    value of ``None`` (how a subclass opts out of an inherited capability) or
    a sub-network (an ``nn.Module`` that happens to carry the name) is not an
    implementation. Unknown names raise ``ValueError``.
    """
    _lookup(name, attribute=False)
    method = getattr(model, name, None)
    if method is None or isinstance(method, nn.Module) or not callable(method):
        return None
    return method


def num_data(model: Any) -> Optional[int]:
    """The training-set size the data plate of ``model`` scales a mini-batch
    to, or ``None`` (no global latents, or full-batch semantics)."""
    _lookup("num_data", attribute=True)
    value = getattr(model, "num_data", None)
    if value is None:
        return None
    try:
        size = operator.index(value)
    except TypeError:
        raise TypeError(f"num_data must be a positive integer or None, got {value!r}") from None
    if size < 1:
        raise ValueError(f"num_data must be a positive integer or None, got {size}")
    return size


def default_elbo(model: Any) -> str:
    """The name of the objective that suits ``model`` (``"Trace_ELBO"`` unless
    the model names another)."""
    _lookup("default_elbo", attribute=True)
    value = getattr(model, "default_elbo", None)
    if value is None:
        return DEFAULT_ELBO
    if not isinstance(value, str):
        raise TypeError(f"default_elbo must be the name of an objective, got {value!r}")
    return value


_SKIP_REGISTRATION: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "pyrovae_skip_registration", default=False)


@contextlib.contextmanager
def registration_skipped() -> Iterator[None]:
    """Run model and guide programs without :func:`register_module` (and so
    without :meth:`LatentModel.register`).

    Registration puts a module's parameters in Pyro's parameter store, with
    ``pyro.module``'s default ``update_module_params=False``: it never changes
    a value the programs compute. A caller that already holds the parameters
    (fit's fast path, after the first step registered them) skips its cost.
    """
    token = _SKIP_REGISTRATION.set(True)
    try:
        yield
    finally:
        _SKIP_REGISTRATION.reset(token)


def register_module(name: str, module: nn.Module) -> None:
    """``pyro.module(name, module)``, except inside :func:`registration_skipped`."""
    if not _SKIP_REGISTRATION.get():
        pyro.module(name, module)


class LatentModel(nn.Module):
    """Base class: a unique Pyro name per instance, a config record, the
    defaults of the attribute capabilities and the data rule
    (:meth:`as_data`). See the module docstring for the contract."""

    #: Training-set size the data plate scales to; None: no global latents.
    num_data: Optional[int] = None
    #: Objective used when the user names none.
    default_elbo: str = DEFAULT_ELBO

    def __init__(self) -> None:
        super().__init__()
        self.pyro_name = f"{type(self).__name__.lower()}{next(_instance_ids)}"

    def register(self, part: str, module: nn.Module) -> None:
        """Expose ``module``'s parameters to Pyro as ``<instance>.<part>``
        (Pyro's own ``SVI`` finds what to optimize by these ``param`` sites;
        inside :func:`registration_skipped` nothing is done)."""
        register_module(f"{self.pyro_name}.{part}", module)

    def config(self) -> Dict[str, Any]:
        """Constructor arguments, so a checkpoint can rebuild the model."""
        return dict(getattr(self, "_config", {}))

    def as_data(self, x: Any, *, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """``x`` by the package's data rule (:func:`pyrovae.data.core.as_tensor`)
        in the model's dtype (or ``dtype``, e.g. float64 for EM) and on its
        device, taken from its first floating-point parameter or buffer (the
        default dtype when it has none); then, when the model knows its data
        dimension ``x_dim``, a check of the number of columns, and a check
        that every value is finite (no model scores NaN or inf)."""
        ref = next((t for t in itertools.chain(self.parameters(), self.buffers())
                    if t.is_floating_point()), None)
        if dtype is None:
            dtype = torch.get_default_dtype() if ref is None else ref.dtype
        one_dimensional = getattr(x, "ndim", None) == 1
        shape = tuple(getattr(x, "shape", ()))
        out = as_tensor(x, dtype=dtype, device=None if ref is None else ref.device)
        x_dim = getattr(self, "x_dim", None)
        if isinstance(x_dim, int) and out.shape[1] != x_dim:
            hint = ""
            if one_dimensional and out.shape[0] == x_dim:
                hint = "; a 1-D input is N points of one column, so pass one data point as shape (1, D)"
            elif len(shape) > 2:
                hint = f"; an input of shape {shape} is flattened to one row per data point"
            raise ValueError(
                f"{type(self).__name__} expects data with {x_dim} columns, shape (N, {x_dim}); "
                f"got {out.shape[1]} columns (shape {tuple(out.shape)}){hint}"
            )
        check_finite(out, "the data")
        return out

    @staticmethod
    def finite_result(values: torch.Tensor, x: torch.Tensor, what: str) -> torch.Tensor:
        """``values`` computed from data ``x``, or one clear error when some
        are NaN or infinite (finite data too large for the model's dtype)."""
        if not bool(torch.isfinite(values).all()):
            raise ValueError(
                f"{what} gave a non-finite result (NaN or inf): the data (largest |x| = "
                f"{x.abs().max().item():.3g}) is far outside what this model can score in "
                f"{x.dtype}, or its parameters are degenerate; standardize the data, or "
                "check the parameters"
            )
        return values

    def model(self, x: torch.Tensor) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def guide(self, x: torch.Tensor) -> None:  # pragma: no cover - abstract
        raise NotImplementedError
