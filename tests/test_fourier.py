"""Fourier features of the input (model.fourier_features; Kingma et al. 2021, appendix C) against exact answers."""

import math

import pytest
import torch

from diffusekit.config import load_config
from diffusekit.continuous.module import build_continuous_module
from diffusekit.errors import ConfigError
from diffusekit.nn.build import build_network
from diffusekit.nn.controlnet import ControlNet
from diffusekit.nn.embeddings import input_fourier_features
from diffusekit.nn.mlp import MLPDenoiser
from diffusekit.nn.unet import UNet

SMALL_UNET = {"image_size": 8, "base_channels": 8, "channel_mult": (1, 2), "norm_groups": 4, "attn_resolutions": (4,)}


def _randomize(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter random (the output layers start at zero, which would hide the input)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=g))
    return module


def test_channels_are_x_then_sin_and_cos_of_2_to_the_k_pi_x():
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    out = input_fourier_features(x, (0, 3))
    assert out.shape == (2, 3 * 5, 4, 4)
    expected = [x, torch.sin(math.pi * x), torch.cos(math.pi * x), torch.sin(8 * math.pi * x), torch.cos(8 * math.pi * x)]
    for i, want in enumerate(expected):
        torch.testing.assert_close(out[:, 3 * i:3 * (i + 1)], want, rtol=0, atol=1e-6)
    assert torch.equal(out[:, :3], x)
    assert input_fourier_features(x, ()) is x


def test_on_the_data_grid_the_finest_features_are_constant():
    """17 levels in [-1, 1] sit 1/8 apart: sin(2^4 pi x) = 0 and cos(2^4 pi x) = 1 on every level, so the
    k = 4 channels show only the noise's offset from the grid (what VDM's appendix C uses them for)."""
    levels = torch.linspace(-1, 1, 17, dtype=torch.float64)[None, :]
    out = input_fourier_features(levels, (4,))
    torch.testing.assert_close(out[:, 17:34], torch.zeros_like(levels), rtol=0, atol=1e-12)
    torch.testing.assert_close(out[:, 34:], torch.ones_like(levels), rtol=0, atol=1e-12)


def test_unet_reads_the_features_through_its_first_conv():
    """A U-Net with exponents is exactly a U-Net on the (1 + 2K) feature channels."""
    torch.manual_seed(0)
    fourier = _randomize(UNet(in_channels=1, fourier_exponents=(2, 4), **SMALL_UNET))
    assert fourier.conv_in.in_channels == 5
    plain = UNet(in_channels=5, out_channels=1, **SMALL_UNET)
    plain.load_state_dict(fourier.state_dict())
    x = torch.randn(3, 1, 8, 8)
    c = torch.linspace(-5, 5, 3)
    assert torch.equal(fourier(x, c), plain(input_fourier_features(x, (2, 4)), c))


def test_mlp_reads_the_features_through_its_input_layer():
    fourier = _randomize(MLPDenoiser(dim=2, hidden=16, depth=2, fourier_exponents=(1,)))
    plain = MLPDenoiser(dim=6, hidden=16, depth=2, out_dim=2)
    plain.load_state_dict(fourier.state_dict())
    x, c = torch.randn(5, 2), torch.linspace(-3, 3, 5)
    assert torch.equal(fourier(x, c), plain(input_fourier_features(x, (1,)), c))


def test_default_is_todays_network():
    net = build_network(load_config(None).model, (1, 8, 8))
    assert net.fourier_exponents == () and net.conv_in.weight.shape == (32, 1, 3, 3)
    cfg = load_config(None, ["model.fourier_features=[3, 4]"])
    assert build_network(cfg.model, (1, 8, 8)).conv_in.weight.shape == (32, 5, 3, 3)


def test_continuous_family_and_controlnet_take_the_features():
    cfg = load_config("configs/digits_continuous.toml", ["model.fourier_features=[4]", "model.base_channels=8",
                                                         "model.norm_groups=4"])
    module = build_continuous_module(cfg, (1, 8, 8), 17)
    assert module.net.conv_in.in_channels == 3
    base = _randomize(UNet(in_channels=1, fourier_exponents=(4,), **SMALL_UNET))
    control = ControlNet(base)
    x = torch.randn(2, 1, 8, 8)
    residuals = control(x, torch.zeros(2), torch.randn(2, 1, 8, 8))
    assert [tuple(r.shape) for r in residuals] == base.residual_shapes(2)
    assert base(x, torch.zeros(2), residuals=residuals).shape == x.shape


@pytest.mark.parametrize("override,key", [
    ("model.fourier_features=[3, 3]", "model.fourier_features"),
    ("model.fourier_features=[17]", "model.fourier_features"),
    ("model.fourier_features=[-1]", "model.fourier_features"),
    ("model.fourier_features=[1, 2, 3, 4, 5, 6, 7, 8, 9]", "model.fourier_features"),
    ("model.fourier_features=1", "model.fourier_features"),
])
def test_bad_keys_are_one_line_errors(override, key):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert key in str(err.value) and "\n" not in str(err.value)


def test_only_unet_and_mlp_take_fourier_features():
    with pytest.raises(ConfigError, match=r"model.fourier_features must be \[\] for model.kind = 'vae'"):
        load_config(None, ["model.kind=vae", "model.fourier_features=[2]"])
