"""Figures of the VAE families: traversals and interpolations decode the
codes they should, the KL bar plot draws any latent table, and one figure
set serves every VAE family."""

import math

import pandas as pd
import torch

from pyrovae import VAE
from pyrovae.data import load_dataset
from pyrovae.viz import FIGURES
from pyrovae.viz.figures import interpolations, kl_per_dimension, latent_traversals


class _Recorder:
    """A decoder that remembers the codes it was given and draws grey images."""

    def __init__(self):
        self.z = None

    def __call__(self, z):
        self.z = z.clone()
        return torch.full((z.shape[0], 16), 0.5)


def test_traversals_vary_one_unit_per_row_and_hold_the_rest(tmp_path):
    decode = _Recorder()
    code = torch.tensor([0.1, 0.2, 0.3, 0.4])
    values = torch.tensor([[-1.0, 0.0, 1.0], [5.0, 6.0, 7.0]])
    path = latent_traversals(decode, code, [2, 0], values, tmp_path / "t.png", (1, 4, 4))
    assert path.stat().st_size > 0
    z = decode.z.reshape(2, 3, 4)
    assert torch.equal(z[0, :, 2], values[0]) and torch.equal(z[1, :, 0], values[1])
    held = torch.ones(2, 3, 4, dtype=torch.bool)
    held[0, :, 2] = held[1, :, 0] = False
    assert torch.equal(z[held], code.expand(2, 3, 4)[held])


def test_interpolations_run_along_straight_lines_between_the_codes(tmp_path):
    decode = _Recorder()
    start, end = torch.zeros(2, 3), torch.tensor([[1.0, 2.0, 3.0], [-1.0, 0.0, 1.0]])
    interpolations(decode, start, end, tmp_path / "i.png", (1, 4, 4), steps=5,
                   x_start=torch.zeros(2, 16), x_end=torch.ones(2, 16))
    z = decode.z.reshape(2, 5, 3)
    assert torch.equal(z[:, 0], start) and torch.allclose(z[:, -1], end)
    assert torch.allclose(z[:, 2], (start + end) / 2)


def test_kl_bar_plot_draws_sites_side_by_side_and_missing_kls(tmp_path):
    dims = pd.DataFrame({"site": ["z1", "z1", "z2"], "dim": [0, 1, 0],
                         "kl": [0.5, 0.0, math.nan], "activity": [0.8, 1e-5, -1e-4],
                         "active": [True, False, False], "kl_method": ["analytic"] * 3})
    assert kl_per_dimension(dims, tmp_path / "kl.png").stat().st_size > 0
    flow = dims.assign(kl=math.nan)
    assert kl_per_dimension(flow, tmp_path / "flow.png").stat().st_size > 0


def test_the_vae_figure_set_serves_every_vae_family(tmp_path):
    assert FIGURES["vae"] is FIGURES["conv-vae"] is FIGURES["ladder-vae"]
    test = load_dataset("digits", split="test").subset(60)
    torch.manual_seed(0)
    vae = VAE(64, z_dim=2, hidden=[16], likelihood="gaussian")
    names = {p.name for p in FIGURES["vae"](vae, test, test, tmp_path)}
    assert names == {"reconstructions.png", "samples.png", "traversals.png",
                     "interpolations.png", "kl_per_dimension.png", "latent.png", "manifold.png"}
    assert all((tmp_path / name).stat().st_size > 0 for name in names)
