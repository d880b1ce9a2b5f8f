"""Compositional scenes (``data.scenes``): drawing, the held-out combinations, the caption grammar, the
ruler that scores samples (checked on shapes whose answer is known), and a tiny text-conditioned pixel
run on scenes. The text encoder is a deterministic stand-in (``FakeEncoder`` of test_text_latent), so
these tests run without the ``text`` extra."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_text_latent import FAKE

from diffusekit.data import scenes as S

pytest.importorskip("mlxtend")
pytest.importorskip("skimage")


@pytest.fixture(scope="module")
def test_table():
    return S.scene_table("test", 120, 0, 32)


def _bar(width: int, shear: float = 0.0, size: int = 28) -> torch.Tensor:
    """A vertical bar of ``width`` pixels, rows shifted right by -shear * (row - centre) (top to the right)."""
    ink = torch.zeros(size, size, dtype=torch.float64)
    for row in range(4, size - 4):
        centre = size / 2 - shear * (row - size / 2)
        left = round(centre - width / 2)
        ink[row, left:left + width] = 1.0
    return ink


def test_scenes_are_drawn_deterministically_on_the_8_bit_grid(test_table):
    again = S.make_scenes(__import__("diffusekit.data.images", fromlist=["x"]).load_mnist("test"), 120,
                          S._split_seed(0, "test"), 32)
    torch.testing.assert_close(again[0], test_table.x, rtol=0, atol=0)
    x = test_table.x
    assert x.shape == (120, 1, 32, 32) and x.dtype == torch.float32
    levels = (x + 1) / 2 * 255
    assert torch.allclose(levels, levels.round(), atol=1e-4) and x.min() >= -1 and x.max() <= 1
    counts = [len(s.digits) for s in test_table.scenes]
    assert set(counts) == {1, 2}
    for scene in test_table.scenes:
        if len(scene.digits) == 2:
            assert tuple(d.position for d in scene.digits) in S.PAIRS or \
                tuple(d.position for d in reversed(scene.digits)) in S.PAIRS


def test_each_digit_is_drawn_at_its_anchor_with_its_size(test_table):
    """The ink-mass centre of every digit lies within 2.5 pixels of its anchor, and the longer side of its ink
    box is about 20/28 of its frame."""
    src = __import__("diffusekit.data.images", fromlist=["x"]).load_mnist("test")
    for scene in test_table.scenes[:40]:
        for d in scene.digits:
            fx, fy = S.POSITIONS[d.position]
            assert abs(d.centre[0] - fx * 32) <= 1 and abs(d.centre[1] - fy * 32) <= 1  # the jitter
            assert d.side == S._frame_side(d.size, 32)
    assert len(src) == 1000


def test_training_scenes_never_hold_a_held_out_combination_and_the_test_prompts_always_do():
    train = S.scene_table("train", S.THRESHOLD_SCENES, 0, 32)
    seen = {(d.label, d.position, d.size) for s in train.scenes for d in s.digits}
    for digit, (position, size) in S.HELDOUT_COMBOS.items():
        assert (digit, position, size) not in seen
        assert any((digit, position, other) in seen for other in S.SIZES if other != size) or position == "centre"
    _, combos = S.heldout_combo_scenes(30)
    for scene in combos:
        first = scene.digits[0]
        assert S.HELDOUT_COMBOS[first.label] == (first.position, first.size)


def test_thresholds_are_the_terciles_of_the_training_digits():
    train = S.scene_table("train", S.THRESHOLD_SCENES, 0, 32)
    th = train.thresholds
    thickness = np.array([d.thickness for s in train.scenes for d in s.digits])
    assert abs((thickness < th.thin).mean() - 1 / 3) < 0.01 and abs((thickness > th.thick).mean() - 1 / 3) < 0.01
    assert th.thin < th.thickness_mid < th.thick and th.upright < th.slant_mid < th.slanted


def test_captions_state_every_attribute_in_disjoint_wordings(test_table):
    th = test_table.thresholds
    train_words = {w for v in S._WORDS["train"].values() for w in v}
    heldout_words = {w for v in S._WORDS["heldout"].values() for w in v}
    assert not train_words & heldout_words
    assert not {p for v in S._PLACES["train"].values() for p in v} & {p for v in S._PLACES["heldout"].values() for p in v}
    rng = np.random.default_rng(0)
    for scene in test_table.scenes[:30]:
        for wording in ("train", "heldout"):
            text = S.caption(scene, th, wording, rng)
            for d in scene.digits:
                assert str(d.label) in text.split() or S._NUMBER_WORDS[d.label] in text.split()
                assert any(p in text for p in S._PLACES[wording][d.position])
                assert any(w in text.split() for w in S._WORDS[wording][d.size])
                stated = th.thickness_word(d.thickness)
                if stated:
                    assert any(w in text.split() for w in S._WORDS[wording][stated])
            other = heldout_words if wording == "train" else train_words
            assert not set(text.split()) & other
    assert S.caption(test_table.scenes[0], th, "train") == S.caption(test_table.scenes[0], th, "train")
    with pytest.raises(ValueError, match="wording"):
        S.caption(test_table.scenes[0], th, "secret")


def test_measure_digit_on_bars_of_known_width_and_slant():
    for width in (2, 3, 5):
        thickness, slant = S.measure_digit(_bar(width))
        assert thickness == pytest.approx(width, rel=0.15) and abs(slant) < 1e-9
    _, right = S.measure_digit(_bar(3, shear=0.4))
    _, left = S.measure_digit(_bar(3, shear=-0.4))
    assert right == pytest.approx(0.4, abs=0.05) and left == pytest.approx(-0.4, abs=0.05)


def test_locate_digits_splits_two_blobs_whatever_the_order_of_the_anchors():
    ink = torch.zeros(32, 32, dtype=torch.float64)
    ink[10:20, 4:8] = 1.0  # left
    ink[10:20, 24:28] = 1.0  # right
    parts = S.locate_digits(ink, [(8.0, 16.0), (24.0, 16.0)])
    assert (parts[10:20, 4:8] == 0).all() and (parts[10:20, 24:28] == 1).all() and (parts[ink == 0] == -1).all()
    swapped = S.locate_digits(ink, [(24.0, 16.0), (8.0, 16.0)])
    assert (swapped[10:20, 4:8] == 1).all() and (swapped[10:20, 24:28] == 0).all()
    assert (S.locate_digits(torch.zeros(32, 32), [(8.0, 8.0)]) == -1).all()


class ConstantClassifier(torch.nn.Module):
    def __init__(self, label: int):
        super().__init__()
        self.label = label

    def forward(self, x):
        return torch.nn.functional.one_hot(torch.full((x.shape[0],), self.label), 10).float()


def test_the_ruler_scores_real_scenes_right_and_wrong_scenes_wrong(test_table):
    """On real scenes the attributes known by construction (position, size) and measured (thickness, slant)
    score near 1; mirrored scenes fail position where it changes; an empty canvas fails everything; the
    digit rate is exactly the fraction of digits the classifier names."""
    x, scenes, th = test_table.x, test_table.scenes, test_table.thresholds
    r = S.adherence(x, scenes, th, ConstantClassifier(3))
    assert r["position"] >= 0.97 and r["size"] >= 0.9 and r["thickness"] >= 0.85 and r["slant"] >= 0.9
    threes = np.mean([d.label == 3 for s in scenes for d in s.digits])
    assert r["digit"] == pytest.approx(threes)
    assert r["n_scenes"] == 120 and r["by_digits"]["1"]["n_scenes"] + r["by_digits"]["2"]["n_scenes"] == 120
    # a mirrored one-digit scene has its digit on the other side unless it sat on the middle column (a
    # mirrored pair puts a digit at each asked place: the digit check, not the position check, catches it)
    mirrored = S.adherence(x.flip(-1), scenes, th, ConstantClassifier(3))["by_digits"]["1"]
    middle = np.mean([S.POSITIONS[s.digits[0].position][0] == 0.5 for s in scenes if len(s.digits) == 1])
    assert mirrored["position"] <= middle + 0.05
    empty = S.adherence(-torch.ones_like(x), scenes, th, ConstantClassifier(3))
    assert empty["position"] == 0 and empty["size"] == 0 and empty["all_right"] == 0
    with pytest.raises(ValueError, match="images for"):
        S.adherence(x[:3], scenes, th, ConstantClassifier(3))


def test_scenes_config_errors_name_the_key():
    from diffusekit.config import load_config
    from diffusekit.errors import ConfigError

    with pytest.raises(ConfigError, match="data.hflip"):
        load_config("configs/text2img_scenes.toml", ["data.hflip=true"])
    with pytest.raises(ConfigError, match="data.image_size"):
        load_config("configs/text2img_scenes.toml", ["data.image_size=40"])
    with pytest.raises(ConfigError, match="model.num_classes"):
        from diffusekit.families.text_latent import check_config
        check_config(load_config("configs/text2img_scenes.toml", ["model.num_classes=10"]))


@pytest.fixture()
def fake_encoder(monkeypatch):
    monkeypatch.setattr("diffusekit.text.load_text_encoder", lambda: FAKE)
    monkeypatch.setattr("diffusekit.families.text_latent.load_text_encoder", lambda: FAKE)


def test_a_tiny_pixel_text_run_on_scenes_trains_samples_and_is_scored(tmp_path, fake_encoder, monkeypatch):
    from diffusekit.config import load_config
    from diffusekit.data.registry import load_dataset
    from diffusekit.families import open_run
    from diffusekit.families.text_latent import CAPTIONS_PER_SCENE, TextLatentObjective, evaluate_scenes, sample_prompts
    from diffusekit.sampling.settings import SampleSettings
    from diffusekit.train.trainer import train

    cfg = load_config("configs/text2img_scenes.toml", [
        "data.n_train=24", "data.n_test=8", "model.base_channels=8", "model.attn_resolutions=[8]",
        "model.num_heads=1", "train.steps=2", "train.batch_size=4", "train.checkpoint_every=2",
        "train.log_every=1", "train.n_sample=2", "train.time_limit_s=0"])
    train(cfg, tmp_path / "run", progress=False)
    model = open_run(tmp_path / "run")
    obj = TextLatentObjective(cfg, load_dataset(cfg.data, "train"))
    labels = torch.arange(24)
    obj_rows = obj.caption_rows(labels, torch.Generator().manual_seed(0))
    null = obj_rows == obj.captions.null_row
    kept = ~null
    assert (obj_rows[kept] // CAPTIONS_PER_SCENE == labels[kept]).all()
    settings = SampleSettings(sampler="ddim", steps=3, seeds=[0, 1], batch_size=2, guidance=2.0)
    x = sample_prompts(model, ["a 3 on the left", "a big 7 at the top"], settings, encoder=FAKE)
    assert x.shape == (2, 1, 32, 32) and torch.isfinite(x).all()
    alone = sample_prompts(model, ["a big 7 at the top"], settings.replace(seeds=[1]), encoder=FAKE)
    torch.testing.assert_close(alone[0], x[1])  # a sample depends on its seed and prompt only
    ruler = ConstantClassifier(3)  # not the trained scene classifier: this test checks the plumbing
    ruler.test_accuracy = 0.1
    monkeypatch.setattr("diffusekit.families.text_latent.load_feature_net", lambda name: ruler)
    result = evaluate_scenes(model, settings, n_samples=4, encoder=FAKE)
    assert result["scene_classifier_test_accuracy"] == 0.1
    for name in ("train_wording", "heldout_wording", "heldout_combos"):
        assert 0 <= result[name]["adherence"]["position"] <= 1
        assert result[name]["real"]["position"] >= 0.5
        assert result[name]["sliced_wasserstein_ratio"] > 0


def test_the_latent_vs_pixel_bench_prices_tiny_runs(tmp_path, fake_encoder, monkeypatch):
    """bench/latent_vs_pixel.py on tiny scenes runs: per-step seconds of each, the cost ratio and the encoder's
    share add up from their own parts."""
    import importlib
    import json
    import sys
    from pathlib import Path

    from diffusekit.config import load_config
    from diffusekit.train.trainer import train

    small = ["data.n_train=16", "data.n_test=8", "train.steps=2", "train.batch_size=4", "train.checkpoint_every=2",
             "train.log_every=1", "train.n_sample=2", "train.time_limit_s=0"]
    train(load_config("configs/autoencoder_scenes.toml", [*small, "model.base_channels=8"]), tmp_path / "ae",
          progress=False)
    net = ["model.base_channels=8", "model.num_heads=1"]
    train(load_config("configs/text2img_scenes.toml", [*small, *net, "model.attn_resolutions=[8]"]),
          tmp_path / "pixel", progress=False)
    codec = f'latent.autoencoder_run="{tmp_path / "ae"}"'
    train(load_config("configs/text2img_scenes_latent.toml", [*small, *net, codec]), tmp_path / "latent",
          progress=False)
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "bench"))
    bench = importlib.import_module("latent_vs_pixel")
    out = tmp_path / "bench.json"
    assert bench.main(["--pixel", str(tmp_path / "pixel"), "--latent", str(tmp_path / "latent"), "--autoencoder",
                       str(tmp_path / "ae"), "--train-steps", "1", "--repeats", "1", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    t = r["training"]
    assert all(t[k]["steps"] == 2 and t[k]["seconds_per_step"] > 0 for k in ("pixel", "latent", "autoencoder"))
    assert r["latent_total_seconds"] == pytest.approx(t["latent"]["seconds"] + t["autoencoder"]["seconds"])
    assert r["cost_ratio_latent_to_pixel"] == pytest.approx(r["latent_total_seconds"] / t["pixel"]["seconds"])
    assert 0 < r["encode_share"] < 1
    sys.modules.pop("latent_vs_pixel", None)


def test_partial_captions_name_one_digit_and_leave_the_default_captions_unchanged(test_table):
    from diffusekit.families.text_latent import training_caption

    th = test_table.thresholds
    two = [s for s in test_table.scenes if len(s.digits) == 2][:20]
    for seed in range(3):  # partial = 0 draws exactly what the captions drew before the switch existed
        a, b = np.random.default_rng(seed), np.random.default_rng(seed)
        assert [training_caption(s, th, a, 0.0) for s in test_table.scenes[:30]] == \
            [S.caption(s, th, "train", b, p_state=0.8) for s in test_table.scenes[:30]]
    rng = np.random.default_rng(0)
    halves = [training_caption(s, th, rng, 1.0) for s in two]
    distinct = 0
    for caption, scene in zip(halves, two):  # a one-digit frame naming one digit of its scene
        assert " and " not in caption and caption.count(",") <= 1, caption  # the one-digit frames
        words = set(caption.replace(",", " ").split())
        named = {d.label for d in scene.digits if words & {str(d.label), S._NUMBER_WORDS[d.label]}}
        assert len(named) == 1, caption
        distinct += scene.digits[0].label != scene.digits[1].label
    assert distinct >= 10  # most pairs hold two different digits, so "only one named" is a real check
    from diffusekit.config import load_config
    from diffusekit.errors import ConfigError

    with pytest.raises(ConfigError, match="data.partial_captions"):
        load_config("configs/text2img_scenes.toml", ["data.partial_captions=1.5"])


def test_composed_prompts_sample_per_seed_and_evaluate_one_clause_per_digit(tmp_path, fake_encoder, monkeypatch):
    from diffusekit.config import load_config
    from diffusekit.families import open_run
    from diffusekit.families.text_latent import evaluate_scenes, sample_prompts, scene_prompts
    from diffusekit.sampling.settings import SampleSettings
    from diffusekit.train.trainer import train

    cfg = load_config("configs/text2img_scenes.toml", [
        "data.n_train=24", "data.n_test=8", "data.partial_captions=0.5", "model.base_channels=8",
        "model.attn_resolutions=[8]", "model.num_heads=1", "train.steps=2", "train.batch_size=4",
        "train.checkpoint_every=2", "train.log_every=1", "train.n_sample=2", "train.time_limit_s=0"])
    train(cfg, tmp_path / "run", progress=False)
    model = open_run(tmp_path / "run")
    settings = SampleSettings(sampler="ddim", steps=3, seeds=[0, 1, 2], batch_size=3, guidance=2.0)
    prompts = ["a 3 on the left AND a big 7 on the right", "a 5 at the top", "a 1 AND a 2 AND a 4"]
    x = sample_prompts(model, prompts, settings, encoder=FAKE)
    assert x.shape == (3, 1, 32, 32) and torch.isfinite(x).all()
    alone = sample_prompts(model, prompts[:1], settings.replace(seeds=[0]), encoder=FAKE)
    torch.testing.assert_close(alone[0], x[0])  # a composed sample depends on its seed and prompt only
    plain = sample_prompts(model, prompts[1:2], settings.replace(seeds=[1]), encoder=FAKE)
    torch.testing.assert_close(plain[0], x[1], rtol=1e-4, atol=1e-4)  # a one-clause prompt is its plain self
    composed, scenes, _, _ = scene_prompts(cfg.data, 8, "train_wording", compose=True)
    plain = scene_prompts(cfg.data, 8, "train_wording")[0]
    for p, q, scene in zip(composed, plain, scenes):
        assert p.count(" AND ") == len(scene.digits) - 1
        assert (p == q) == (len(scene.digits) == 1)  # a one-digit scene is asked exactly as without --compose
    ruler = ConstantClassifier(3)
    ruler.test_accuracy = 0.1
    monkeypatch.setattr("diffusekit.families.text_latent.load_feature_net", lambda name: ruler)
    result = evaluate_scenes(model, settings, n_samples=4, encoder=FAKE, compose=True)
    assert result["composed"] is True
    assert any(" AND " in p for p in result["train_wording"]["examples"])
