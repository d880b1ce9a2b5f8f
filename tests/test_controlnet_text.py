"""ControlNet over a text-conditioned pixel base, and the hints that leave freedom.

The hints and the measures are checked on shapes whose answer is known (a box of a known blob, the skeleton
of a bar, the low-resolution edges of a step, distances of known points); the family on a tiny text_unet
base trained 2 steps on scenes: exact identity at initialisation whatever the control, the loss per example
and equal to the base's at initialisation, per-seed sampling, scale 0 = the base bit for bit, the
evaluation's plumbing, and one-line errors. The text encoder is the deterministic stand-in of
test_text_latent and the scene classifier a constant one, so no extra is needed but scikit-image and mlxtend.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from test_scenes import ConstantClassifier
from test_text_latent import FAKE

from diffusekit.errors import ConfigError
from diffusekit.families import controlnet as C

pytest.importorskip("mlxtend")
pytest.importorskip("skimage")


def image(ink: torch.Tensor) -> torch.Tensor:
    """(H, W) ink in [0, 1] -> a (1, 1, H, W) image in [-1, 1]."""
    return (ink * 2 - 1)[None, None].float()


# -- hints on known shapes --------------------------------------------------------------------------
def test_layout_of_one_blob_is_its_frame_and_specks_get_none():
    ink = torch.zeros(32, 32)
    ink[10:20, 14:19] = 1.0  # ink box 10 x 5: frame side round(10 * 28 / 20) = 14, centred on the box
    expected = torch.zeros(1, 1, 32, 32)
    expected[..., 8:22, 10:24] = 1.0  # centre (row 15, col 16.5): top 15 - 7 = 8, left round(9.5) = 10
    assert torch.equal(C.layout_map(image(ink)), expected)
    assert C.ink_frames(ink) == [(8, 10, 22, 24)]
    corner = torch.zeros(32, 32)
    corner[0:12, 0:3] = 1.0  # frame side 17 would stick out: moved inside the canvas
    assert C.ink_frames(corner) == [(0, 0, 17, 17)]
    speck = torch.zeros(32, 32)
    speck[3:5, 3:6] = 1.0  # 6 pixels < LAYOUT_MIN_PIXELS
    assert C.ink_frames(speck) == [] and C.layout_map(image(speck)).sum() == 0
    assert C.hint_boxes(expected[0]) == [(8, 10, 22, 24)]


def test_layout_of_real_scenes_matches_their_true_frames():
    from diffusekit.data.images import load_mnist
    from diffusekit.data.scenes import make_scenes

    x, scenes = make_scenes(load_mnist("test"), 60, 0, 32)
    ours, truth = C.layout_map(x), C.scene_layout(scenes, 32)
    iou = (ours * truth).sum((1, 2, 3)) / ((ours + truth) > 0).float().sum((1, 2, 3))
    assert iou.mean() > 0.8
    one_each = [len(C.ink_frames((image[0] + 1) / 2)) == len(s.digits) for image, s in zip(x, scenes)]
    assert np.mean(one_each) >= 0.85
    assert set(ours.unique().tolist()) == {0.0, 1.0} and ours.shape == (60, 1, 32, 32)


def test_skeleton_of_a_3_pixel_bar_is_one_pixel_wide_and_as_long():
    for vertical in (False, True):
        ink = torch.zeros(16, 16)
        ink[7:10, 2:14] = 1.0  # 3 x 12
        if vertical:
            ink = ink.T
        skel = C.skeleton_map(image(ink))[0, 0]
        skel = skel.T if vertical else skel
        assert set(skel.unique().tolist()) <= {0.0, 1.0}
        assert (skel.sum(0) <= 1).all()  # one pixel wide: at most one per column along the bar
        assert 10 <= skel.sum() <= 12 and (skel[:7].sum() + skel[10:].sum()) == 0  # the bar's length, inside it
    assert C.skeleton_map(-torch.ones(2, 1, 8, 8)).sum() == 0


def test_lowres_edges_of_a_step():
    x = torch.ones(1, 1, 8, 8)
    x[..., :4] = -1.0  # a vertical step of height 2 between columns 3 and 4
    expected = torch.zeros(1, 1, 8, 8)
    expected[..., 2:6] = 2.0  # at half resolution the step lies between pooled columns 1 and 2, each 2 wide
    assert torch.equal(C.lowres_edges(x, 2), expected)
    assert torch.equal(C.make_hint("edges_lowres", x, 2), expected)
    assert torch.equal(C.make_hint("edges", x), C.sobel_edges(x))
    with pytest.raises(ConfigError, match="controlnet.lowres_factor = 4 must divide") as err:
        C.lowres_edges(torch.zeros(1, 1, 6, 6), 4)
    assert "\n" not in str(err.value)


def test_unknown_hints_are_one_line_config_errors():
    from diffusekit.config import load_config

    with pytest.raises(ConfigError, match="controlnet.hint = 'depth' is unknown"):
        C.make_hint("depth", torch.zeros(1, 1, 8, 8))
    for bad, key in (("controlnet.hint='depth'", "controlnet.hint"), ("controlnet.lowres_factor=3",
                                                                       "controlnet.lowres_factor")):
        with pytest.raises(ConfigError, match=key) as err:
            load_config("configs/controlnet_scenes.toml", [bad])
        assert "\n" not in str(err.value)


# -- measures -----------------------------------------------------------------------------------------
def test_layout_adherence_on_known_samples():
    boxes = torch.zeros(1, 1, 32, 32)
    boxes[..., 2:14, 2:14] = 1.0
    boxes[..., 18:30, 18:30] = 1.0
    inside = torch.zeros(32, 32)
    inside[4:12, 6:9] = 1.0  # a digit in the first box only
    both = inside.clone()
    both[20:28, 22:25] = 1.0
    outside = torch.zeros(32, 32)
    outside[20:28, 4:7] = 1.0
    samples = torch.cat([image(both), image(inside), image(outside), image(torch.zeros(32, 32))])
    r = C.layout_adherence(samples, boxes.expand(4, -1, -1, -1))
    assert r["ink_inside"].tolist() == [1.0, 1.0, 0.0, 0.0]
    assert r["boxes_filled"].tolist() == [1.0, 0.5, 0.0, 0.0]
    assert C.layout_adherence(samples[:1], torch.zeros(1, 1, 32, 32))["boxes_filled"].tolist() == [1.0]
    with pytest.raises(ValueError, match="same B, H, W"):
        C.layout_adherence(samples, boxes)


def test_skeleton_agreement_tolerates_one_pixel():
    ink = torch.zeros(16, 16)
    ink[7:10, 2:14] = 1.0
    hint = C.skeleton_map(image(ink))
    near, far = torch.zeros(16, 16), torch.zeros(16, 16)
    near[8:11, 2:14] = 1.0  # moved one pixel
    far[11:14, 2:14] = 1.0  # moved four
    samples = torch.cat([image(ink), image(near), image(far), image(torch.zeros(16, 16))])
    r = C.skeleton_agreement(samples, hint.expand(4, -1, -1, -1))
    assert r["f1"][:2].tolist() == [1.0, 1.0] and r["f1"][2:].tolist() == [0.0, 0.0]
    empty = C.skeleton_agreement(image(torch.zeros(16, 16)), torch.zeros(1, 1, 16, 16))
    assert empty["f1"].tolist() == [1.0]  # nothing asked, nothing drawn
    assert C.hint_adherence("skeleton", samples[:1], hint)["f1"].tolist() == [1.0]


def test_edge_adherence_and_diversity():
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(3, 1, 8, 8, generator=gen) * 2 - 1
    for kind in ("edges", "edges_lowres"):
        r = C.hint_adherence(kind, x, C.make_hint(kind, x, 2), lowres_factor=2)
        torch.testing.assert_close(r["correlation"], torch.ones(3, dtype=torch.float64))
    points = torch.zeros(1, 3, 2)
    points[0, 1, 0], points[0, 2, 1] = 3.0, 4.0  # distances 3, 4, 5
    torch.testing.assert_close(C.pairwise_diversity(points), torch.tensor([4.0], dtype=torch.float64))
    same = x[:1].expand(4, -1, -1, -1)[None]
    assert C.pairwise_diversity(same).tolist() == [0.0]
    with pytest.raises(ValueError, match="K >= 2"):
        C.pairwise_diversity(x[None, :1])


# -- the family over a tiny text_unet base ------------------------------------------------------------
BASE = ["data.n_train=24", "data.n_test=8", "model.base_channels=8", "model.attn_resolutions=[8]", "model.num_heads=1",
        "diffusion.T=50", "train.steps=2", "train.batch_size=4", "train.checkpoint_every=2", "train.log_every=1",
        "train.n_sample=2", "train.time_limit_s=0"]


def control_cfg(base, *extra):
    from diffusekit.config import load_config

    return load_config("configs/controlnet_scenes.toml", [
        f"controlnet.base_run={str(base)!r}", "data.n_train=24", "data.n_test=8", "train.steps=2", "train.batch_size=4",
        "train.warmup_steps=1", "train.checkpoint_every=2", "train.log_every=1", "train.n_sample=2",
        "train.time_limit_s=0", *extra])


def use_fake_encoder(mp: pytest.MonkeyPatch) -> None:
    """The deterministic stand-in text encoder wherever the families load one."""
    mp.setattr("diffusekit.text.load_text_encoder", lambda: FAKE)
    mp.setattr("diffusekit.families.text_latent.load_text_encoder", lambda: FAKE)


@pytest.fixture(autouse=True)
def fake_encoder(monkeypatch):
    use_fake_encoder(monkeypatch)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(the tiny text_unet base, a ControlNet trained 2 steps over it)."""
    from diffusekit.config import load_config
    from diffusekit.train.trainer import train

    root = tmp_path_factory.mktemp("cn_text")
    with pytest.MonkeyPatch.context() as mp:
        use_fake_encoder(mp)
        train(load_config("configs/text2img_scenes.toml", BASE), root / "base", progress=False)
        train(control_cfg(root / "base"), root / "cn", progress=False)
    return root / "base", root / "cn"


def perturb(module: torch.nn.Module, seed: int, std: float = 0.2) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * std)


def text_inputs(batch: int = 3):
    feats = FAKE.encode(["a 3 on the left", "a big 7 at the top and a thin 1 in the bottom right", ""])
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(batch, 1, 32, 32, generator=gen)
    return x, torch.linspace(-8.0, 8.0, batch), feats.tokens[:batch], feats.mask[:batch]


def test_at_initialisation_the_controlled_text_unet_is_the_base_for_any_control(runs):
    from diffusekit.nn.controlnet import ControlledUNet, ControlNet
    from diffusekit.nn.unet import AttentionBlock

    objective = C.build_objective(control_cfg(runs[0]), __import__("conftest").fake_data((1, 32, 32)))
    base = objective.module.base
    perturb(base, seed=1)  # stand-in for trained weights (the zero-initialised output conv would hide everything)
    model = ControlledUNet(base, ControlNet(base))
    x, logsnr, context, mask = text_inputs()
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():
        expected = base(x, logsnr, context=context, context_mask=mask)
        for control in (torch.rand(3, 1, 32, 32, generator=gen), torch.zeros(3, 1, 32, 32)):
            assert torch.equal(model(x, logsnr, control=control, context=context, context_mask=mask), expected)
        assert not torch.allclose(expected, base(x, logsnr, context=context.roll(1, 0), context_mask=mask.roll(1, 0)))
    # the copy holds the base's cross-attention, and the branch reads the caption
    cross = [m for m in model.controlnet.modules() if isinstance(m, AttentionBlock) and m.context_dim is not None]
    assert cross and all(torch.equal(a.kv_cross.weight, b.kv_cross.weight) for a, b in zip(
        cross, [m for m in base.modules() if isinstance(m, AttentionBlock) and m.context_dim is not None]))
    perturb(model.controlnet, seed=3)
    with torch.no_grad():
        control = torch.rand(3, 1, 32, 32, generator=gen)
        a = model.controlnet(x, logsnr, control, context=context, context_mask=mask)
        b = model.controlnet(x, logsnr, control, context=context.roll(1, 0), context_mask=mask.roll(1, 0))
    assert not all(torch.allclose(u, v) for u, v in zip(a, b))
    with pytest.raises(ValueError, match="context must have shape"):
        model(x, logsnr, control=control, context=context[:, :, :5])


def test_loss_is_per_example_and_the_text_base_loss_at_initialisation(runs):
    from conftest import fake_data

    from diffusekit.families import open_run
    from diffusekit.losses import diffusion_loss, sample_timesteps

    objective = C.build_objective(control_cfg(runs[0]), fake_data((1, 32, 32)))
    assert objective.text_base and objective.captions.null_row == 24 * 4
    x0 = torch.rand(5, 1, 32, 32) * 2 - 1
    labels = torch.tensor([0, 3, 5, 7, 23])
    ours = objective.loss(objective.module, x0, labels, torch.Generator().manual_seed(3))
    assert ours.shape == (5,) and torch.isfinite(ours).all()
    # the text base's loss with the same draws (caption rows, t, noise)
    base = open_run(runs[0])
    gen = torch.Generator().manual_seed(3)
    text = objective.captions.features.lookup(objective.captions.rows(labels, gen))
    t = sample_timesteps(5, objective.schedule.T, gen, "uniform")
    noise = torch.randn(x0.shape, generator=gen)
    theirs = diffusion_loss(base.denoiser, x0, t, base.schedule, noise, "simple", cond=text.as_cond())
    assert torch.equal(ours, theirs)
    # per example: changing example 4 changes only its loss
    changed = x0.clone()
    changed[4] = -changed[4]
    again = objective.loss(objective.module, changed, labels, torch.Generator().manual_seed(3))
    assert torch.equal(again[:4], ours[:4]) and again[4] != ours[4]
    with pytest.raises(ValueError, match="labels"):
        objective.loss(objective.module, x0, None, torch.Generator().manual_seed(3))


def test_sampling_is_per_seed_and_scale_0_is_the_text_base(runs):
    from diffusekit.families import open_run
    from diffusekit.families.base import SampleRequest
    from diffusekit.families.text_latent import sample_prompts
    from diffusekit.sampling.settings import SampleSettings

    model = open_run(runs[1])
    assert model.text_base and all(c.weight.abs().max() > 0 for c in model.objective.module.controlnet.zero_convs)
    prompts = ["a 3 on the left", "a big 7 at the top"]
    settings = SampleSettings(sampler="ddim", steps=3, seeds=[0, 1], batch_size=2, guidance=2.0)
    request = SampleRequest(prompts=prompts, control_from="test")
    out = C.sample(model, settings, request, progress=False)
    assert out.x.shape == (2, 1, 32, 32) and torch.isfinite(out.x).all()
    assert out.extra["prompts"] == prompts and out.extra["hint"] == "layout" and "ink_inside" in out.note
    assert torch.equal(C.sample(model, settings, request, progress=False).x, out.x)  # deterministic
    alone = C.sample(model, settings.replace(seeds=[1], batch_size=1), SampleRequest(prompts=prompts[1:]),
                     progress=False)
    torch.testing.assert_close(alone.x[0], out.x[1])  # a sample depends on its seed, prompt and hint only
    zero = C.sample(model, settings, SampleRequest(prompts=prompts, control_scale=0.0), progress=False)
    assert torch.equal(zero.x, sample_prompts(open_run(runs[0]), prompts, settings, encoder=FAKE))
    assert not torch.equal(zero.x, out.x)
    # composed prompts: the control reaches every clause; at scale 0 it is the text base's composed sample
    composed = ["a 3 on the left AND a big 7 at the top", "a 5"]
    both = C.sample(model, settings, SampleRequest(prompts=composed, control_from="test"), progress=False)
    assert torch.isfinite(both.x).all() and both.extra["prompts"] == composed
    zero = C.sample(model, settings, SampleRequest(prompts=composed, control_scale=0.0), progress=False)
    assert torch.equal(zero.x, sample_prompts(open_run(runs[0]), composed, settings, encoder=FAKE))
    with pytest.raises(ConfigError, match="^--prompt: .*empty clause"):
        C.sample(model, settings, SampleRequest(prompts=["a 3 AND "]), progress=False)


def test_evaluation_reports_prompt_and_hint_adherence_and_diversity(runs, tmp_path, monkeypatch):
    from diffusekit.families import open_run
    from diffusekit.families.base import EvaluateSettings

    ruler = ConstantClassifier(3)
    ruler.test_accuracy = 0.1
    monkeypatch.setattr("diffusekit.families.controlnet.load_feature_net", lambda name: ruler)
    model = open_run(runs[1])
    evaluation = C.evaluate(model, EvaluateSettings(n_samples=2, steps=2), tmp_path, progress=False)
    r = evaluation.result
    assert r["prompts"] == 2 and r["seeds_per_prompt"] == C.SEEDS_PER_PROMPT and r["hint"] == "layout"
    for name in ("base", "controlnet"):
        assert 0 <= r[name]["prompt_adherence"]["position"] <= 1 and r[name]["diversity"] > 0
        assert set(r[name]["hint_adherence"]) == {"ink_inside", "boxes_filled"}
    assert r["base"]["control_scale"] == 0 and r["controlnet"]["control_scale"] == 1
    assert r["real"]["hint_adherence"]["boxes_filled"] == 1.0 and r["real"]["hint_adherence"]["ink_inside"] > 0.99
    assert (tmp_path / "controlnet.png").is_file() and evaluation.pictures["hints"][0] == "controlnet.png"
    assert any("diversity" in k for k, _ in evaluation.rows)


def test_a_control_scale_sweep_reuses_the_seeds_and_keeps_scale_one(runs, monkeypatch, capsys):
    """bench/control_scale.py: evaluate_text at scales 0, 0.5, 1; scales 0 and 1 equal the default evaluation's
    rows exactly (the same prompts, hints and seeds at every scale), and the table has a row per scale."""
    import importlib
    import sys
    from pathlib import Path

    ruler = ConstantClassifier(3)
    ruler.test_accuracy = 0.1
    monkeypatch.setattr("diffusekit.families.controlnet.load_feature_net", lambda name: ruler)
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "bench"))
    bench = importlib.import_module("control_scale")
    try:
        r = bench.main(["--run", str(runs[1]), "--scales", "0,0.5,1", "--n", "2", "--steps", "2"])
        from diffusekit.families import open_run
        from diffusekit.sampling.settings import SampleSettings

        model = open_run(runs[1])
        default, _ = C.evaluate_text(model, SampleSettings.from_config(model.cfg.sample, batch_size=250, steps=2),
                                     n_prompts=2)
        assert r["base"] == default["base"] and r["controlnet"] == default["controlnet"]
        assert r["scale 0.5"]["control_scale"] == 0.5 and r["scale 0.5"]["diversity"] > 0
        table = capsys.readouterr().out.split("| scale |")[1]
        assert [line.split("|")[1].strip() for line in table.splitlines()[2:5]] == ["0", "0.5", "1"]
    finally:
        sys.modules.pop("control_scale", None)


def test_bad_input_is_one_line(runs, tmp_path):
    from PIL import Image

    from diffusekit.families import open_run
    from diffusekit.families.base import SampleRequest
    from diffusekit.sampling.settings import SampleSettings

    def one_line(exc_type, match, fn):
        with pytest.raises(exc_type, match=match) as err:
            fn()
        assert "\n" not in str(err.value)

    model = open_run(runs[1])
    settings = SampleSettings(sampler="ddim", steps=2, seeds=[0], batch_size=1, guidance=2.0)
    one_line(ConfigError, "--prompt: .* give at least one --prompt",
             lambda: C.sample(model, settings, SampleRequest(control_from="test"), progress=False))
    for name, (height, width) in (("small.png", (28, 28)), ("wide.png", (32, 48))):
        Image.fromarray(np.zeros((height, width), dtype=np.uint8)).save(tmp_path / name)
        request = SampleRequest(prompts=["a 3"], control_images=[tmp_path / name])
        one_line(ConfigError, f"--control-images: .*{name} is {width}x{height} pixels; a hint image must be square "
                 "and at least this run's 32x32", lambda r=request: C.sample(model, settings, r, progress=False))
    big = tmp_path / "drawing.png"  # a larger square drawing is downsampled
    drawing = np.zeros((64, 64), dtype=np.uint8)
    drawing[8:40, 8:40] = 255
    Image.fromarray(drawing).save(big)
    out = C.sample(model, settings, SampleRequest(prompts=["a 3"], control_images=[big]), progress=False)
    assert out.extra["control_from"] == [str(big)] and out.x.shape == (1, 1, 32, 32)
    one_line(ConfigError, "--control-scale", lambda: C.sample(
        model, settings, SampleRequest(prompts=["a 3"], control_scale=float("nan")), progress=False))
    with pytest.raises(ValueError, match="control must have shape"):
        C.controlled_samples(model, ["a 3"], torch.zeros(1, 1, 16, 16), settings)


def test_cli_samples_with_prompts_and_reproduces_from_settings(runs, tmp_path, capsys, monkeypatch):
    """``diffusekit sample`` with --prompt and --control-from on a ControlNet over a text base, and again from its
    settings.json; ``diffusekit evaluate``. The family's row is given prompts and guidance here as
    families/__init__.py should hold it (a no-op once it does)."""
    import dataclasses

    from diffusekit import families
    from diffusekit.cli import main

    rows = tuple(dataclasses.replace(f, conditioning=("prompts", "control_from", "control_images", "control_scale"),
                                     guidance=True) if f.name == "controlnet" else f for f in families.FAMILIES)
    monkeypatch.setattr(families, "FAMILIES", rows)
    ruler = ConstantClassifier(3)
    ruler.test_accuracy = 0.1
    monkeypatch.setattr("diffusekit.families.controlnet.load_feature_net", lambda name: ruler)
    common = ["--sampler", "ddim", "--steps", "2", "--no-progress"]
    assert main(["sample", "--run", str(runs[1]), "--seeds", "0-2", *common, "--prompt", "a 3 on the left",
                 "--prompt", "a big 7 at the top", "--control-from", "test", "--out", str(tmp_path / "s")]) == 0
    settings = json.loads((tmp_path / "s" / "settings.json").read_text())
    assert settings["guidance"] == 3.0 and settings["extra"]["prompts"] == ["a 3 on the left", "a big 7 at the top"]
    assert main(["sample", "--run", str(runs[1]), "--settings", str(tmp_path / "s" / "settings.json"),
                 "--no-progress", "--out", str(tmp_path / "again")]) == 0
    x = [np.load(tmp_path / d / "samples.npz")["x"] for d in ("s", "again")]
    assert x[0].shape == (3, 1, 32, 32) and np.array_equal(x[0], x[1])
    capsys.readouterr()
    assert main(["sample", "--run", str(runs[1]), "--seeds", "0", *common, "--out", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err
    assert "give at least one --prompt" in err and err.count("\n") == 1 and not (tmp_path / "bad").exists()
    assert main(["evaluate", "--run", str(runs[1]), "--n-samples", "2", "--steps", "2", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["prompts"] == 2 and {"base", "controlnet", "real", "chance"} <= set(result)
    assert (runs[1] / "eval" / "controlnet.png").is_file() and (runs[1] / "eval" / "report.md").is_file()
