"""Guides over a model's global latent variables: mean-field and full-rank Gaussians.

Each latent site theta_j of the model (with support S_j) is mapped to an
unconstrained vector u_j = T_j^{-1}(theta_j) by ``biject_to(S_j)``, and the guide
is a Gaussian in u:

* :class:`MeanField`: q(u) = prod_j N(u_j; m_j, diag s_j^2), a fully factorized
  ("mean-field") Gaussian [1, 2];
* :class:`FullRank`: q(u) = N(u; m, L L^T) over all sites jointly, with L lower
  triangular, which captures posterior correlations between sites [2].

The density of theta = T(u) follows by the change of variables
q(theta) = q(u) |det dT^{-1}/dtheta|. For sites with real support T is the
identity and :class:`MeanField` samples a plain ``Normal``, so
``TraceMeanField_ELBO`` uses the analytic KL divergence there.

Both are written here rather than wrapping ``pyro.infer.autoguide.AutoNormal``
/ ``AutoMultivariateNormal`` because those keep their parameters in Pyro's
global parameter store under a name derived from the class name, so two
instances in one process would share parameters. Here the parameters are
ordinary ``nn.Parameter`` attributes of the guide module, exposed to Pyro
through ``pyro.module`` under a name unique to each instance. The site
discovery and the Delta-site construction of :class:`FullRank` follow
Pyro's autoguides.

Only global latents are covered: a site inside the ``"data"`` plate (or any
subsampled plate) is a local latent whose guide should be amortized (an
encoder); the constructor's ``hide`` argument leaves such sites to another
guide.

References

[1] M. I. Jordan, Z. Ghahramani, T. S. Jaakkola and L. K. Saul, "An
    introduction to variational methods for graphical models", Machine
    Learning 37, 1999.
[2] A. Kucukelbir, D. Tran, R. Ranganath, A. Gelman and D. M. Blei,
    "Automatic differentiation variational inference", JMLR 18(14), 2017.
"""

from __future__ import annotations

import itertools
import math
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import torch
from pyro.distributions.transforms import biject_to
from pyro.distributions.util import sum_rightmost
from pyro.infer.autoguide.initialization import InitMessenger, init_to_median
from pyro.poutine.util import site_is_subsample
from torch import nn
from torch.nn.functional import softplus

from pyrovae.models.base import register_module

DATA_PLATE = "data"
_instance_ids = itertools.count()


@dataclass
class _Site:
    name: str
    key: str  # parameter key (site names may contain dots, which nn.ParameterDict forbids)
    support: Any
    event_dim: int  # event dims of the constrained value
    shape: torch.Size  # constrained value shape, plate dims included
    unconstrained_shape: torch.Size
    unconstrained_event_dim: int
    frames: List[Tuple[str, int, Optional[int]]]  # (name, size, dim) of the plates around it
    identity: bool  # real support: no transform needed


def _inverse_softplus(y: float) -> float:
    return y + math.log(-math.expm1(-y))


class _GlobalGuide(nn.Module):
    """Shared machinery: discover the model's latent sites from one prototype run."""

    def __init__(
        self,
        model: Callable,
        *,
        init_loc_fn: Callable = init_to_median,
        init_scale: float = 0.1,
        hide: Sequence[str] = (),
    ) -> None:
        super().__init__()
        if not callable(model):
            raise TypeError(f"model must be a callable Pyro program, got {type(model).__name__}")
        if not init_scale > 0:
            raise ValueError(f"init_scale must be positive, got {init_scale}")
        # Bypass nn.Module registration: a model that is itself a module (or a
        # bound method of the module that owns this guide) must not become a
        # sub-module, which would create a reference cycle in state_dict().
        object.__setattr__(self, "_model", model)
        self.init_loc_fn = init_loc_fn
        self.init_scale = float(init_scale)
        self.hide = tuple(hide)
        self.pyro_name = f"{type(self).__name__.lower()}{next(_instance_ids)}"
        self.sites: List[_Site] = []

    @property
    def is_setup(self) -> bool:
        return bool(self.sites)

    def setup(self, *args: Any, seed: Optional[int] = None, **kwargs: Any) -> "_GlobalGuide":
        """Run the model once on ``args`` to find its latent sites and create
        the parameters. Called automatically on the first guide call; call it
        explicitly to create parameters before building an optimizer, or to
        seed the initial locations (``seed``; global RNG state is restored)."""
        if seed is None:
            self._setup(*args, **kwargs)
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                self._setup(*args, **kwargs)
        return self

    def _setup(self, *args: Any, **kwargs: Any) -> None:
        model = InitMessenger(self.init_loc_fn)(self._model)
        if self.hide:
            model = poutine.block(model, hide=list(self.hide))
        # The outer block keeps the prototype's sites out of any trace the
        # guide is being run under (setup may happen inside an ELBO call).
        trace = poutine.block(poutine.trace(model).get_trace)(*args, **kwargs)
        sites = []
        latent = [(n, s) for n, s in trace.iter_stochastic_nodes() if not site_is_subsample(s)]
        for i, (name, site) in enumerate(latent):
            frames = []
            for frame in site["cond_indep_stack"]:
                if not frame.vectorized:
                    raise NotImplementedError(
                        f"site {name!r} is inside a sequential plate; {type(self).__name__} "
                        "supports vectorized pyro.plate only"
                    )
                full = frame.full_size or frame.size
                if frame.name == DATA_PLATE or full != frame.size:
                    raise ValueError(
                        f"site {name!r} is a local latent (inside the subsampled or "
                        f"{DATA_PLATE!r} plate {frame.name!r}); {type(self).__name__} covers "
                        f"global latents only. Pass hide=[{name!r}] and guide it with an "
                        "amortized encoder, or integrate it out in the model."
                    )
                frames.append((frame.name, frame.size, frame.dim))
            value = site["value"].detach()
            support = site["fn"].support
            transform = biject_to(support)
            u = transform.inv(value)
            sites.append(_Site(
                name=name, key=f"site{i}", support=support, event_dim=site["fn"].event_dim,
                shape=value.shape, unconstrained_shape=u.shape,
                unconstrained_event_dim=site["fn"].event_dim + u.dim() - value.dim(),
                frames=frames, identity=_is_identity(transform),
            ))
            self._init_site(sites[-1], u)
        if not sites:
            raise ValueError(
                f"the model has no latent sample sites for {type(self).__name__} to cover "
                f"(hidden: {list(self.hide)})"
            )
        self.sites = sites
        self._finish_setup()

    def _init_site(self, site: _Site, unconstrained: torch.Tensor) -> None:
        raise NotImplementedError

    def _finish_setup(self) -> None:
        pass

    def _create_plates(self) -> Dict[str, pyro.plate]:
        # One plate object per name and call: each pyro.plate records a
        # subsample site, so a plate shared by several sites is built once
        # and entered for each of them.
        plates: Dict[str, pyro.plate] = {}
        for s in self.sites:
            for name, size, dim in s.frames:
                if name not in plates:
                    plates[name] = pyro.plate(name, size, dim=dim)
        return plates

    @staticmethod
    def _enter(plates: Dict[str, pyro.plate], site: _Site) -> ExitStack:
        stack = ExitStack()
        for name, _, _ in site.frames:
            stack.enter_context(plates[name])
        return stack

    def _check_setup(self, *args: Any, **kwargs: Any) -> None:
        if not self.is_setup:
            self.setup(*args, **kwargs)

    def site_names(self) -> List[str]:
        return [s.name for s in self.sites]

    def _unconstrained_median(self) -> Dict[str, torch.Tensor]:
        raise NotImplementedError

    @torch.no_grad()
    def median(self) -> Dict[str, torch.Tensor]:
        """The image T_j(m_j) of each site's Gaussian centre, in constrained
        space. For coordinate-wise monotone transforms (identity, exp, ...)
        this is exactly the median of q(theta_j)."""
        self._require_setup()
        return {
            s.name: biject_to(s.support)(u)
            for s, u in zip(self.sites, self._unconstrained_median().values())
        }

    def _require_setup(self) -> None:
        if not self.is_setup:
            raise RuntimeError(
                f"{type(self).__name__} is not set up yet: call it once with the model's "
                "arguments, or call .setup(*args)"
            )

    def _site(self, name: str) -> _Site:
        for s in self.sites:
            if s.name == name:
                return s
        raise KeyError(f"no site {name!r}; the guide covers {self.site_names()}")


def _is_identity(transform: torch.distributions.transforms.Transform) -> bool:
    """True for ``biject_to`` of real (vector) supports: an empty composition,
    possibly wrapped in ``IndependentTransform``."""
    if isinstance(transform, torch.distributions.transforms.IndependentTransform):
        return _is_identity(transform.base_transform)
    return isinstance(transform, torch.distributions.transforms.ComposeTransform) and not transform.parts


class MeanField(_GlobalGuide):
    """Mean-field Gaussian guide over a model's global latents.

    q(theta) = prod_j T_j# N(m_j, diag s_j^2): independent Normals in
    unconstrained space, pushed through each site's bijection to its support.

    Args:
        model: the Pyro model (for a pyrovae model object, its ``.model``).
        init_loc_fn: Pyro initialization strategy for the locations m_j
            (default ``init_to_median``: the median of a few prior draws,
            which breaks the symmetry of exchangeable parameters such as
            factor loadings, unlike the prior mean).
        init_scale: initial s_j for every coordinate. A small value (0.1)
            starts close to a point estimate, so early gradients are not
            swamped by sampling noise; it grows where the posterior is wide.
        hide: site names to leave out (for example local latents guided by
            an encoder).

    Calling the guide returns a dict of the sampled values. Parameters are
    created on the first call (or by :meth:`setup`).
    """

    def _init_site(self, site: _Site, unconstrained: torch.Tensor) -> None:
        if not hasattr(self, "locs"):
            self.locs = nn.ParameterDict()
            self.raw_scales = nn.ParameterDict()
        self.locs[site.key] = nn.Parameter(unconstrained.clone())
        self.raw_scales[site.key] = nn.Parameter(
            torch.full_like(unconstrained, _inverse_softplus(self.init_scale))
        )

    def scale(self, name: str) -> torch.Tensor:
        """The standard deviations s_j of site ``name`` in unconstrained space."""
        return softplus(self.raw_scales[self._site(name).key])

    def loc(self, name: str) -> torch.Tensor:
        """The locations m_j of site ``name`` in unconstrained space."""
        return self.locs[self._site(name).key]

    def distribution(self, name: str) -> dist.Distribution:
        """q of site ``name`` in constrained space (without plate dims folded in)."""
        s = self._site(name)
        base = dist.Normal(self.locs[s.key], softplus(self.raw_scales[s.key])).to_event(
            s.unconstrained_event_dim
        )
        if s.identity:
            return base
        return dist.TransformedDistribution(base, biject_to(s.support))

    def forward(self, *args: Any, **kwargs: Any) -> Dict[str, torch.Tensor]:
        self._check_setup(*args, **kwargs)
        register_module(self.pyro_name, self)
        plates = self._create_plates()
        out = {}
        for s in self.sites:
            with self._enter(plates, s):
                out[s.name] = pyro.sample(s.name, self.distribution(s.name))
        return out

    def _unconstrained_median(self) -> Dict[str, torch.Tensor]:
        return {s.name: self.locs[s.key].detach() for s in self.sites}

    @torch.no_grad()
    def set_median(self, values: Dict[str, torch.Tensor]) -> None:
        """Move the locations so the guide's median of each named site equals
        the given constrained value (for example a classical point estimate)."""
        self._require_setup()
        for name, value in values.items():
            s = self._site(name)
            self.locs[s.key].copy_(biject_to(s.support).inv(value.to(self.locs[s.key])))


class FullRank(_GlobalGuide):
    """Full-rank Gaussian guide over all global latents jointly.

    q(u) = N(u; m, L L^T) over the concatenated unconstrained vector u of
    every site, with L = tril(R, -1) + diag(softplus(r)). The joint draw is an
    auxiliary site; each model site then receives T_j(u_j) through a ``Delta``
    carrying the log-Jacobian, so Pyro's ELBOs see the correct density
    q(theta) (the construction of ``AutoMultivariateNormal``).

    Same arguments as :class:`MeanField`. It has P(P+3)/2 parameters for P
    unconstrained coordinates, against 2P for the mean-field guide.
    """

    def _init_site(self, site: _Site, unconstrained: torch.Tensor) -> None:
        if not hasattr(self, "_init_parts"):
            self._init_parts: List[torch.Tensor] = []
        self._init_parts.append(unconstrained.reshape(-1))

    def _finish_setup(self) -> None:
        init = torch.cat(self._init_parts)
        del self._init_parts
        p = init.numel()
        self.latent_dim = p
        self.loc = nn.Parameter(init.clone())
        self.raw_tril = nn.Parameter(init.new_zeros(p, p))
        self.raw_diag = nn.Parameter(init.new_full((p,), _inverse_softplus(self.init_scale)))

    def scale_tril(self) -> torch.Tensor:
        return torch.tril(self.raw_tril, -1) + torch.diag_embed(softplus(self.raw_diag))

    def joint(self) -> dist.MultivariateNormal:
        """q(u) over the concatenated unconstrained coordinates."""
        self._require_setup()
        return dist.MultivariateNormal(self.loc, scale_tril=self.scale_tril())

    def _unpack(self, latent: torch.Tensor):
        batch_shape = latent.shape[:-1]  # particle plates added outside setup
        pos = 0
        for s in self.sites:
            size = math.prod(s.unconstrained_shape)
            shape = torch.broadcast_shapes(
                s.unconstrained_shape, batch_shape + (1,) * s.unconstrained_event_dim
            )
            yield s, latent[..., pos : pos + size].reshape(shape)
            pos += size

    def forward(self, *args: Any, **kwargs: Any) -> Dict[str, torch.Tensor]:
        self._check_setup(*args, **kwargs)
        register_module(self.pyro_name, self)
        latent = pyro.sample(f"_{self.pyro_name}_latent", self.joint(), infer={"is_auxiliary": True})
        plates = self._create_plates()
        out = {}
        for s, u in self._unpack(latent):
            transform = biject_to(s.support)
            value = transform(u)
            if poutine.get_mask() is False:
                log_density = 0.0
            else:
                # log q(theta) = log q(u) + log |d u / d theta|
                log_density = transform.inv.log_abs_det_jacobian(value, u)
                log_density = sum_rightmost(log_density, log_density.dim() - value.dim() + s.event_dim)
            with self._enter(plates, s):
                out[s.name] = pyro.sample(
                    s.name, dist.Delta(value, log_density=log_density, event_dim=s.event_dim)
                )
        return out

    def _unconstrained_median(self) -> Dict[str, torch.Tensor]:
        return {s.name: u for s, u in self._unpack(self.loc.detach())}

    @torch.no_grad()
    def set_median(self, values: Dict[str, torch.Tensor]) -> None:
        """Move the location so the guide's median of each named site equals
        the given constrained value."""
        self._require_setup()
        pos = 0
        for s in self.sites:
            size = math.prod(s.unconstrained_shape)
            if s.name in values:
                u = biject_to(s.support).inv(values[s.name].to(self.loc))
                self.loc[pos : pos + size] = u.reshape(-1)
            pos += size
        unknown = set(values) - set(self.site_names())
        if unknown:
            raise KeyError(f"no sites {sorted(unknown)}; the guide covers {self.site_names()}")
