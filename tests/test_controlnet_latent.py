"""ControlNet over a latent text base (``model.kind = "latent_unet"``), Stable Diffusion's setting.

The hint stays an image-sized map and the hint encoder downsamples it to the latents' resolution. Checked
on a tiny autoencoder, a tiny latent base and a ControlNet trained 2 steps over it: the hint encoder's
shapes and zero start; the controlled network equals the base exactly at initialisation for any control;
the training rows are the codec's latents and the hints of the same images; the loss equals the latent
base's loss with the same draws; sampling is per seed, decoded, and scale 0 is the latent base's own
sample bit for bit; evaluation and one-line errors. The text encoder is test_text_latent's stand-in.
"""

from __future__ import annotations

import pytest
import torch
from test_controlnet_text import control_cfg, perturb, text_inputs, use_fake_encoder
from test_scenes import ConstantClassifier
from test_text_latent import FAKE

from diffusekit.errors import ConfigError
from diffusekit.families import controlnet as C
from diffusekit.nn.controlnet import ControlledUNet, ControlNet, HintEncoder

pytest.importorskip("mlxtend")
pytest.importorskip("skimage")

SMALL = ["data.n_train=24", "data.n_test=8", "train.steps=2", "train.batch_size=4", "train.checkpoint_every=2",
         "train.log_every=1", "train.n_sample=2", "train.time_limit_s=0"]


@pytest.fixture(autouse=True)
def fake_encoder(monkeypatch):
    use_fake_encoder(monkeypatch)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(a tiny latent_unet base on scenes, a layout ControlNet trained 2 steps over it)."""
    from diffusekit.config import load_config
    from diffusekit.train.trainer import train

    root = tmp_path_factory.mktemp("cn_latent")
    with pytest.MonkeyPatch.context() as mp:
        use_fake_encoder(mp)
        train(load_config("configs/autoencoder_scenes.toml", [*SMALL, "model.base_channels=8"]), root / "ae",
              progress=False)
        train(load_config("configs/text2img_scenes_latent.toml", [
            *SMALL, "model.base_channels=8", "model.num_heads=1", "diffusion.T=50",
            f"latent.autoencoder_run={str(root / 'ae')!r}"]), root / "base", progress=False)
        train(control_cfg(root / "base"), root / "cn", progress=False)
    return root / "base", root / "cn"


def test_the_hint_encoder_downsamples_by_powers_of_two_and_starts_silent():
    gen = torch.Generator().manual_seed(0)
    for f, middle in ((1, 1), (2, 1), (4, 2), (8, 3)):
        enc = HintEncoder(1, 8, width=16, downsample=f)
        strides = [m.stride for m in enc.layers if isinstance(m, torch.nn.Conv2d)]
        assert strides == [(1, 1)] + [(2, 2) if f > 1 else (1, 1)] * middle + [(1, 1)]
        control = torch.rand(2, 1, 32, 32, generator=gen)
        out = enc(control)
        assert out.shape == (2, 8, 32 // f, 32 // f) and torch.equal(out, torch.zeros_like(out))
        perturb(enc, seed=f)
        assert enc(control).abs().max() > 0
    # f = 1 and f = 2 keep the layer names of the pixel hint encoder (older checkpoints load)
    assert set(HintEncoder(1, 8).state_dict()) == set(HintEncoder(1, 8, downsample=2).state_dict())
    for bad in (0, 3, 6, 2.0):
        with pytest.raises(ValueError, match="power of 2"):
            HintEncoder(1, 8, downsample=bad)


def test_over_latents_the_controlled_unet_is_the_base_at_initialisation_for_any_control(runs):
    from conftest import fake_data

    objective = C.build_objective(control_cfg(runs[0]), fake_data((1, 32, 32)))
    assert objective.latent and objective.latent_shape == (4, 8, 8)
    base = objective.module.base
    assert objective.module.controlnet.hint_downsample == 4
    perturb(base, seed=1)  # stand-in for trained weights
    model = ControlledUNet(base, ControlNet(base, hint_downsample=4))
    _, logsnr, context, mask = text_inputs()
    gen = torch.Generator().manual_seed(4)
    z = torch.randn(3, 4, 8, 8, generator=gen)
    with torch.no_grad():
        expected = base(z, logsnr, context=context, context_mask=mask)
        for control in (torch.rand(3, 1, 32, 32, generator=gen), torch.zeros(3, 1, 32, 32)):
            assert torch.equal(model(z, logsnr, control=control, context=context, context_mask=mask), expected)
        perturb(model.controlnet, seed=3)
        a = model(z, logsnr, control=torch.zeros(3, 1, 32, 32), context=context, context_mask=mask)
        b = model(z, logsnr, control=torch.ones(3, 1, 32, 32), context=context, context_mask=mask)
    assert not torch.allclose(a, b)  # after training the control matters
    with pytest.raises(ValueError, match=r"control must have shape \(3, 1, 32, 32\) \(B, hint channels, 4 H, 4 W"):
        model(z, logsnr, control=torch.zeros(3, 1, 8, 8), context=context, context_mask=mask)


def test_training_rows_are_latents_and_hints_and_the_loss_is_the_latent_base_loss_at_initialisation(runs):
    from conftest import fake_data

    from diffusekit.data.registry import load_dataset
    from diffusekit.families import open_run
    from diffusekit.losses import diffusion_loss, sample_timesteps

    cfg = control_cfg(runs[0])
    objective = C.build_objective(cfg, fake_data((1, 32, 32)))
    x = load_dataset(cfg.data, "test").x[:5]
    rows = objective.encode_data(x)
    assert rows.shape == (5, 4 * 8 * 8 + 32 * 32)
    z0, control = objective.split_rows(rows)
    assert torch.equal(z0, objective.codec.encode(x)) and torch.equal(control, objective.hint(x))
    torch.testing.assert_close(objective.encode_data(x, batch_size=2), rows)  # in batches: the same rows
    labels = torch.tensor([0, 3, 5, 7, 23])
    ours = objective.loss(objective.module, rows, labels, torch.Generator().manual_seed(3))
    assert ours.shape == (5,) and torch.isfinite(ours).all()
    base = open_run(runs[0])  # the latent base's own loss with the same draws (caption rows, t, noise)
    assert base.codec.scale == objective.codec.scale
    gen = torch.Generator().manual_seed(3)
    text = objective.captions.features.lookup(objective.captions.rows(labels, gen))
    t = sample_timesteps(5, objective.schedule.T, gen, "uniform")
    noise = torch.randn(z0.shape, generator=gen)
    theirs = diffusion_loss(base.denoiser, z0, t, base.schedule, noise, "simple", cond=text.as_cond())
    assert torch.equal(ours, theirs)
    perturb(objective.module, seed=5)  # per example, once the hint matters: example 4's hint changes its loss only
    ours = objective.loss(objective.module, rows, labels, torch.Generator().manual_seed(3))
    changed = rows.clone()
    changed[4, 256:] = 1 - changed[4, 256:]
    again = objective.loss(objective.module, changed, labels, torch.Generator().manual_seed(3))
    assert torch.equal(again[:4], ours[:4]) and again[4] != ours[4]
    with pytest.raises(ValueError, match="rows of 256 latent and 1024 hint values"):
        objective.split_rows(x)


def test_sampling_is_decoded_per_seed_and_scale_0_is_the_latent_base(runs, tmp_path, monkeypatch):
    from diffusekit.families import open_run
    from diffusekit.families.base import EvaluateSettings, SampleRequest
    from diffusekit.families.text_latent import sample_prompts
    from diffusekit.sampling.settings import SampleSettings

    model = open_run(runs[1])
    assert model.text_base and model.objective.latent
    assert all(c.weight.abs().max() > 0 for c in model.objective.module.controlnet.zero_convs)
    prompts = ["a 3 on the left", "a big 7 at the top"]
    settings = SampleSettings(sampler="ddim", steps=3, seeds=[0, 1], batch_size=2, guidance=2.0)
    request = SampleRequest(prompts=prompts, control_from="test")
    out = C.sample(model, settings, request, progress=False)
    assert out.x.shape == (2, 1, 32, 32) and torch.isfinite(out.x).all() and "ink_inside" in out.note
    assert torch.equal(C.sample(model, settings, request, progress=False).x, out.x)
    alone = C.sample(model, settings.replace(seeds=[1], batch_size=1), SampleRequest(prompts=prompts[1:]),
                     progress=False)
    torch.testing.assert_close(alone.x[0], out.x[1])  # a sample depends on its seed, prompt and hint only
    zero = C.sample(model, settings, SampleRequest(prompts=prompts, control_scale=0.0), progress=False)
    assert torch.equal(zero.x, sample_prompts(open_run(runs[0]), prompts, settings, encoder=FAKE))
    assert not torch.equal(zero.x, out.x)
    ruler = ConstantClassifier(3)
    ruler.test_accuracy = 0.1
    monkeypatch.setattr("diffusekit.families.controlnet.load_feature_net", lambda name: ruler)
    evaluation = C.evaluate(model, EvaluateSettings(n_samples=2, steps=2), tmp_path, progress=False)
    r = evaluation.result
    assert r["prompts"] == 2 and 0 <= r["controlnet"]["hint_adherence"]["ink_inside"] <= 1
    assert (tmp_path / "controlnet.png").is_file()


def test_latents_must_be_the_images_shrunk_by_a_power_of_two():
    assert C.hint_downsample((1, 32, 32), (4, 8, 8), "w") == 4
    assert C.hint_downsample((1, 32, 32), (1, 32, 32), "w") == 1
    for data, latent in (((1, 32, 32), (4, 12, 12)), ((1, 24, 24), (4, 8, 8)), ((1, 32, 32), (4, 8, 16))):
        with pytest.raises(ConfigError, match="^w: the base diffuses .* latents of .* images; .*power of 2$"):
            C.hint_downsample(data, latent, "w")
