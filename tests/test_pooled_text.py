"""The pooled caption embedding (``model.pooled_text``): the mean of the caption's real tokens, through a linear
map, added to the noise-level embedding beside cross-attention.

Checked against the hand computation; padding (with garbage features) changes nothing; a U-Net without any
attention block still reads the caption through it; a ControlNet copies it and equals its base at
initialisation; a tiny text_unet run with the key trains, reloads and samples from prompts through the command
line; the key on another family, and the module argument without ``context_dim``, are one-line errors.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from test_controlnet_text import use_fake_encoder
from test_text_latent import FAKE

from diffusekit.errors import ConfigError
from diffusekit.nn import UNet
from diffusekit.nn.embeddings import add_pooled_context


@pytest.fixture(autouse=True)
def fake_encoder(monkeypatch):
    use_fake_encoder(monkeypatch)


def _net(attention: bool = True, seed: int = 0) -> UNet:
    torch.manual_seed(seed)
    net = UNet(in_channels=2, image_size=8, base_channels=8, channel_mult=(1, 2),
               attn_resolutions=(4,) if attention else (), mid_attention=attention, norm_groups=4, num_heads=2,
               context_dim=6, pooled_context=True)
    with torch.no_grad():  # the zero-initialised output conv would hide everything
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return net


def test_the_pooled_embedding_is_the_mean_of_the_real_tokens():
    net = _net()
    context = torch.randn(3, 4, 6)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]], dtype=torch.bool)
    emb = torch.randn(3, 32)
    means = torch.stack([context[0, :2].mean(0), context[1].mean(0), context[2, 0]])
    expected = emb + means @ net.pooled_embed.weight.T + net.pooled_embed.bias
    torch.testing.assert_close(add_pooled_context(net, emb, context, mask), expected)
    torch.testing.assert_close(add_pooled_context(net, emb, context, None),
                               emb + context.mean(1) @ net.pooled_embed.weight.T + net.pooled_embed.bias)
    # no context (an unconditional call) or no pooled_embed: the embedding is left as it is
    assert add_pooled_context(net, emb, None, None) is emb
    assert add_pooled_context(UNet(base_channels=8, norm_groups=4, context_dim=6), emb, context, mask) is emb


def test_padding_does_not_change_a_pooled_network_and_without_attention_the_caption_still_counts():
    for attention in (True, False):
        net = _net(attention)
        x, logsnr = torch.randn(3, 2, 8, 8), torch.tensor([-2.0, 0.0, 3.0])
        context = torch.randn(3, 4, 6)
        mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]], dtype=torch.bool)
        out = net(x, logsnr, context=context, context_mask=mask)
        longer = torch.cat([context, 9 * torch.randn(3, 5, 6)], dim=1)
        longer[0, 2:4] = 50.0  # garbage where there was padding already
        longer_mask = torch.cat([mask, torch.zeros(3, 5, dtype=torch.bool)], dim=1)
        torch.testing.assert_close(net(x, logsnr, context=longer, context_mask=longer_mask), out, atol=1e-5, rtol=1e-5)
        # the caption moves the output, with attention or through the pooled embedding alone
        assert (net(x, logsnr, context=context.roll(1, 0), context_mask=mask.roll(1, 0)) - out).abs().max() > 1e-3
    no_attention = _net(attention=False)
    assert not any("attn" in name for name, _ in no_attention.named_parameters())


def test_pooled_context_needs_a_context_and_the_key_needs_a_text_family():
    from diffusekit.config import load_config

    with pytest.raises(ValueError, match="pooled_context needs context_dim"):
        UNet(base_channels=8, norm_groups=4, pooled_context=True)
    with pytest.raises(ConfigError, match=r"^model.pooled_text") as err:
        load_config(None, ["model.kind=unet", "model.pooled_text=true"])
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="model.pooled_text"):
        load_config(None, ["model.kind=unet", "model.pooled_text=3"])


def test_a_controlnet_copies_the_pooled_embedding_and_starts_as_its_base():
    from diffusekit.nn.controlnet import ControlledUNet, ControlNet

    base = _net()
    model = ControlledUNet(base, ControlNet(base, hint_channels=1))
    assert torch.equal(model.controlnet.pooled_embed.weight, base.pooled_embed.weight)
    assert model.controlnet.pooled_embed.weight.data_ptr() != base.pooled_embed.weight.data_ptr()
    x, logsnr, context = torch.randn(2, 2, 8, 8), torch.tensor([-1.0, 2.0]), torch.randn(2, 3, 6)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.bool)
    with torch.no_grad():
        expected = base(x, logsnr, context=context, context_mask=mask)
        assert torch.equal(model(x, logsnr, control=torch.rand(2, 1, 8, 8), context=context, context_mask=mask),
                           expected)
        # once trained (here: every parameter moved, so the zero convolutions no longer hide it), the copy's
        # residuals depend on the caption
        a = model.controlnet(x, logsnr, torch.rand(2, 1, 8, 8), context=context, context_mask=mask)
        for p in model.controlnet.parameters():
            p.add_(0.05)
        b = model.controlnet(x, logsnr, torch.zeros(2, 1, 8, 8), context=context, context_mask=mask)
        c = model.controlnet(x, logsnr, torch.zeros(2, 1, 8, 8), context=context.roll(1, 0),
                             context_mask=mask.roll(1, 0))
    assert len(a) == len(b) and not all(torch.allclose(u, v) for u, v in zip(b, c))


def test_a_pooled_text_run_trains_reloads_and_samples_prompts(tmp_path, capsys):
    from test_controlnet_text import BASE

    from diffusekit.cli import main
    from diffusekit.config import load_config
    from diffusekit.families import open_run
    from diffusekit.train.trainer import train

    run = tmp_path / "base"
    train(load_config("configs/text2img_scenes.toml", [*BASE, "model.pooled_text=true"]), run, progress=False)
    loaded = open_run(run)
    net = next(m for m in loaded.denoiser.modules() if isinstance(m, UNet))
    assert net.pooled_embed is not None and net.pooled_embed.in_features == FAKE.dim
    common = ["--sampler", "ddim", "--steps", "2", "--no-progress", "--seeds", "0-1"]
    assert main(["sample", "--run", str(run), *common, "--prompt", "a 3 on the left", "--out", str(tmp_path / "s")]) == 0
    assert main(["sample", "--run", str(run), "--settings", str(tmp_path / "s" / "settings.json"), "--no-progress",
                 "--out", str(tmp_path / "again")]) == 0
    x = [np.load(tmp_path / d / "samples.npz")["x"] for d in ("s", "again")]
    assert x[0].shape == (2, 1, 32, 32) and np.isfinite(x[0]).all() and np.array_equal(x[0], x[1])
    assert load_config(run / "config.toml").model.pooled_text is True
    saved = load_file(next((run / "checkpoints").glob("step-*.safetensors")))
    assert any(k.endswith("pooled_embed.weight") for k in saved)

    # a ControlNet trained over the pooled base saves its copy of the map, reloads and samples
    from test_controlnet_text import control_cfg

    train(control_cfg(run), tmp_path / "cn", progress=False)
    saved = load_file(next((tmp_path / "cn" / "checkpoints").glob("step-*.safetensors")))
    assert any("controlnet" in k and k.endswith("pooled_embed.weight") for k in saved)
    assert main(["sample", "--run", str(tmp_path / "cn"), *common, "--prompt", "a 3 on the left", "--control-from",
                 "test", "--out", str(tmp_path / "cs")]) == 0
    assert np.isfinite(np.load(tmp_path / "cs" / "samples.npz")["x"]).all()
