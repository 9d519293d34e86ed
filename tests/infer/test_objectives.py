"""The objectives registry."""

import pytest
import torch
from pyro.infer import TraceMeanField_ELBO

from pyrovae import VAE
from pyrovae.infer.objectives import ELBOS, make_objective


def test_registry_has_pyro_elbos_and_rejects_unknown_names():
    for name in ("Trace_ELBO", "TraceMeanField_ELBO", "TraceGraph_ELBO", "RenyiELBO",
                 "JitTrace_ELBO", "JitTraceMeanField_ELBO", "JitTraceGraph_ELBO"):
        assert name in ELBOS
    with pytest.raises(ValueError, match="known objectives: .*Trace_ELBO"):
        make_objective("Trace_ELBOO")
    with pytest.raises(ValueError, match="num_particles"):
        make_objective("Trace_ELBO", num_particles=0)
    with pytest.raises(ValueError, match="bad options for objective 'Trace_ELBO'"):
        make_objective("Trace_ELBO", alpha=0.5)
    assert make_objective("RenyiELBO", alpha=0.5).alpha == 0.5


def test_jit_mean_field_compiles_once_and_matches_the_plain_loss():
    torch.manual_seed(0)
    model = VAE(6, z_dim=2, hidden=(5,))
    x = torch.bernoulli(torch.full((8, 6), 0.3))
    jit = make_objective("JitTraceMeanField_ELBO")
    model_fn, guide_fn = model.model, model.guide
    values = []
    for _ in range(4):
        torch.manual_seed(1)
        values.append(jit.loss_and_grads(model_fn, guide_fn, x))
    # One compiled graph, reused: Pyro 1.9's own class compiles on every call.
    assert len(jit._differentiable_loss.compiled) == 1
    torch.manual_seed(1)
    plain = TraceMeanField_ELBO().loss(model_fn, guide_fn, x)
    assert values[-1] == pytest.approx(plain, rel=1e-5)
