"""Training on a folder of one's own images: channels, refusals, the decoded-array cache, flips with exact
resume, the attention check and the shipped configs/folder32.toml and configs/folder64.toml.

Every folder is made here with Pillow (odd sizes, PNG and JPEG, gray and colour); the cache lives in a
temporary folder (``DIFFUSEKIT_FOLDER_CACHE``). Networks are tiny (8x8 images, 8 base channels, T = 10).
"""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import assert_same_checkpoints
from PIL import Image
from test_cli import assert_one_line_error, run_cli

from diffusekit.config import load_config
from diffusekit.data import folder as folder_module
from diffusekit.data import load_dataset, load_image_folder
from diffusekit.data.augment import random_hflip
from diffusekit.errors import ConfigError, DataError
from diffusekit.io.checkpoint import load_checkpoint
from diffusekit.train.trainer import train

ROOT = Path(__file__).resolve().parents[1]
TINY = ["data.name=folder", "data.image_size=8", "model.base_channels=8", "model.norm_groups=4",
        "model.channel_mult=[1,2]", "model.attn_resolutions=[4]", "diffusion.T=10", "train.batch_size=4",
        "train.lr=1e-3", "train.warmup_steps=2", "train.log_every=1", "train.sample_every=0",
        "train.checkpoint_every=3", "train.n_sample=2"]


def _flags(overrides):
    return [a for o in overrides for a in ("--set", o)]


def _gray(h, w, seed):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w), dtype=np.uint8), "L")


def _colour(h, w, seed):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")


def make_folder(root: Path, colour: bool = True, n: int = 12) -> Path:
    """``n`` images of odd sizes: gray PNGs, gray JPEGs, gray pictures stored as RGB, and (``colour``) one
    colour JPEG in a subfolder; plus a text file, which is not read."""
    (root / "sub").mkdir(parents=True, exist_ok=True)
    for i in range(n - 1):
        img = _gray(13 + i, 29 - i, i)
        if i % 3 == 0:
            img.save(root / f"g{i:02d}.png")
        elif i % 3 == 1:
            img.save(root / f"g{i:02d}.JPG", quality=90)
        else:
            img.convert("RGB").save(root / f"g{i:02d}_rgb.png")  # gray values in an RGB file: still gray
    (_colour(21, 17, 99) if colour else _gray(21, 17, 99)).save(root / "sub" / "last.jpeg", quality=90)
    (root / "notes.txt").write_text("not an image")
    return root


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {p.relative_to(folder).as_posix(): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*"))}


@pytest.fixture
def cache(tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    monkeypatch.setenv("DIFFUSEKIT_FOLDER_CACHE", str(folder))
    return folder


@pytest.fixture
def decodes(monkeypatch):
    """Counts the image files decoded (a cache hit decodes none)."""
    calls = []
    real = folder_module.decode_image

    def counting(path, *args, **kwargs):
        calls.append(Path(path).name)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(folder_module, "decode_image", counting)
    return calls


# -- channels -------------------------------------------------------------------------------------
def test_channels_are_inferred_from_the_images(tmp_path, cache):
    gray = make_folder(tmp_path / "gray", colour=False)
    x = load_image_folder(gray, 8).x  # channels = 0: every image is gray, so 1 channel
    assert x.shape == (12, 1, 8, 8)
    assert torch.equal(x, load_image_folder(gray, 8, channels=1).x)  # the same values as reading them as gray
    rgb = load_image_folder(gray, 8, channels=3).x  # asked for: the gray value in all three channels
    assert rgb.shape == (12, 3, 8, 8) and torch.equal(rgb, x.expand(-1, 3, -1, -1))

    photos = make_folder(tmp_path / "photos", colour=True)
    x = load_image_folder(photos, 8).x  # one colour image makes the folder RGB
    assert x.shape == (12, 3, 8, 8) and not torch.equal(x[-1, 0], x[-1, 1])
    assert torch.equal(x[0, 0], x[0, 1]) and torch.equal(x, load_image_folder(photos, 8, channels=3).x)
    with pytest.warns(UserWarning, match=r"data\.channels = 1: 1 of 12 images .* have colour \(e\.g\. sub/last\.jpeg\)"):
        assert load_image_folder(photos, 8, channels=1).x.shape == (12, 1, 8, 8)  # asked for: gray, said once


def test_a_run_records_the_channels_it_inferred(tmp_path, cache, capsys):
    folder = make_folder(tmp_path / "imgs")
    run = tmp_path / "run"
    code, _, err = run_cli(capsys, "train", *_flags(TINY + [f"data.path={folder}", "train.steps=1"]), "--out", run,
                             "--no-progress")
    assert code == 0, err
    recorded = load_config(run / "config.toml")
    assert recorded.data.channels == 3 and load_checkpoint(run)[1]["meta"]["config"]["data"]["channels"] == 3
    assert json.loads((run / "summary.json").read_text())["train_examples"] == 11  # 12 images, 1 held out


def test_dry_run_marks_the_keys_a_folder_does_not_read(capsys):
    code, out, err = run_cli(capsys, "train", "--config", ROOT / "configs" / "folder32.toml", "--dry-run")
    assert code == 0, err
    lines = dict(ln.split(" = ", 1) for ln in out.split("[model]")[0].splitlines() if " = " in ln)
    assert lines["n_train"] == '20000  # not used by data.name = "folder"' and "not used" in lines["n_test"]
    assert lines["channels"].startswith("0  # 0: inferred from the images") and "not used" not in lines["hflip"]


# -- refusals -------------------------------------------------------------------------------------
def test_other_image_formats_are_not_read_and_said_so(tmp_path, cache):
    folder = make_folder(tmp_path / "imgs")
    (folder / "sub" / "later.webp").write_bytes(b"RIFF0000WEBP")
    with pytest.warns(UserWarning, match=r"1 image file\(s\) of other formats .*sub/later\.webp.* \.png, \.jpg"):
        assert len(load_image_folder(folder, 8)) == 12


def test_a_damaged_image_is_a_one_line_error_naming_it(tmp_path, cache, capsys):
    folder = make_folder(tmp_path / "imgs")
    good = (folder / "g00.png").read_bytes()
    (folder / "sub" / "broken.png").write_bytes(good[: len(good) // 2])
    code, _, err = run_cli(capsys, "train", *_flags(TINY + [f"data.path={folder}"]), "--out", tmp_path / "run",
                           "--no-progress")
    assert_one_line_error(code, err, str(folder / "sub" / "broken.png"), "truncated or corrupt")
    assert not any(cache.glob("*")), "a failed load caches nothing"


@pytest.mark.parametrize("overrides,needles", [
    (["data.name=moons", "data.hflip=true"], ["data.hflip", "moons"]),
    (["data.name=folder", "data.channels=2"], ["data.channels", "0 (inferred from the images), 1 or 3"]),
    (["data.name=folder", "data.path=no/such/folder"], ["no/such/folder", "data.path"]),
])
def test_bad_data_settings_are_one_line(tmp_path, capsys, overrides, needles):
    code, _, err = run_cli(capsys, "train", *_flags(overrides), "--out", tmp_path / "run", "--no-progress")
    assert_one_line_error(code, err, *needles)


def test_attention_at_a_size_the_unet_lacks_is_refused_in_one_line(tmp_path, cache, capsys):
    """The 8x8-digits default (attention at 4x4, levels 32 and 16 at data.image_size = 32) would train a U-Net
    without the attention its config names: refused, naming the key, the level sizes and the folder configs."""
    folder = make_folder(tmp_path / "imgs")
    code, _, err = run_cli(capsys, "train", "--set", "data.name=folder", "--set", f"data.path={folder}",
                           "--set", "data.image_size=32", "--out", tmp_path / "run", "--no-progress")
    assert_one_line_error(code, err, "model.attn_resolutions = [4]", "level sizes [32, 16]", "configs/folder32.toml")


# -- the cache ------------------------------------------------------------------------------------
def test_cache_hit_invalidation_and_damage(tmp_path, cache, decodes):
    folder = make_folder(tmp_path / "imgs")
    before = snapshot(folder)
    first = load_image_folder(folder, 8)
    assert len(decodes) == 12 and len(list(cache.glob("*.safetensors"))) == 1
    (entry,) = cache.glob("*.safetensors")
    assert torch.equal(load_image_folder(folder, 8).x, first.x) and len(decodes) == 12  # a hit decodes nothing
    load_image_folder(folder, 16)  # other settings: another entry
    assert len(decodes) == 24 and len(list(cache.glob("*.safetensors"))) == 2

    # a file changes (same size, new time) -> the entry is rebuilt in place
    img = np.array(Image.open(folder / "g00.png"))
    Image.fromarray(255 - img).save(folder / "g00.png")
    os.utime(folder / "g00.png", ns=(1, 1))
    changed = load_image_folder(folder, 8)
    assert len(decodes) == 36 and not torch.equal(changed.x[0], first.x[0]) and torch.equal(changed.x[1:], first.x[1:])
    assert len(list(cache.glob("*.safetensors"))) == 2
    # a file removed -> rebuilt
    (folder / "g01.JPG").unlink()
    assert len(load_image_folder(folder, 8)) == 11 and len(decodes) == 47
    after_removal = load_image_folder(folder, 8).x
    assert len(decodes) == 47

    # damaged entries (garbage, cut short, one byte of the pixels flipped) are rebuilt with a warning
    good = entry.read_bytes()
    for damaged in (b"garbage" * 9, good[: len(good) // 2], good[:-40] + bytes([good[-40] ^ 1]) + good[-39:]):
        entry.write_bytes(damaged)
        n = len(decodes)
        with pytest.warns(UserWarning, match="damaged folder cache"):
            assert torch.equal(load_image_folder(folder, 8).x, after_removal)
        assert len(decodes) == n + 11
        assert torch.equal(load_image_folder(folder, 8).x, after_removal) and len(decodes) == n + 11  # healed
    # nothing was ever written into the image folder (only the test's own edits changed it)
    assert set(snapshot(folder)) == set(before) - {"g01.JPG"}


def test_cache_can_be_off_and_is_never_inside_the_image_folder(tmp_path, monkeypatch, decodes):
    folder = make_folder(tmp_path / "imgs")
    before = snapshot(folder)
    monkeypatch.setenv("DIFFUSEKIT_FOLDER_CACHE", "off")
    load_image_folder(folder, 8)
    load_image_folder(folder, 8)
    assert len(decodes) == 24
    monkeypatch.setenv("DIFFUSEKIT_FOLDER_CACHE", str(folder / ".cache"))
    with pytest.warns(UserWarning, match="inside the image folder"):
        load_image_folder(folder, 8)
    assert snapshot(folder) == before
    monkeypatch.delenv("DIFFUSEKIT_FOLDER_CACHE")
    monkeypatch.setenv("DIFFUSEKIT_CACHE", str(tmp_path / "shared"))
    assert folder_module.folder_cache_dir() == tmp_path / "shared" / "folders"


def test_training_and_evaluation_splits_come_from_the_cache(tmp_path, cache, decodes):
    folder = make_folder(tmp_path / "imgs")
    cfg = load_config(None, TINY + [f"data.path={folder}"]).data
    train_x, test_x = load_dataset(cfg, "train").x, load_dataset(cfg, "test").x
    assert len(decodes) == 12 and (len(train_x), len(test_x)) == (11, 1)  # one decode for both splits


# -- horizontal flips -----------------------------------------------------------------------------
def test_random_hflip_is_drawn_from_the_generator():
    x = torch.arange(64 * 2 * 3 * 4, dtype=torch.float32).reshape(64, 2, 3, 4)
    a = random_hflip(x, torch.Generator().manual_seed(5))
    assert torch.equal(a, random_hflip(x, torch.Generator().manual_seed(5)))
    flipped = [bool(torch.equal(a[i], x[i].flip(-1))) for i in range(64)]
    assert all(flipped[i] or torch.equal(a[i], x[i]) for i in range(64)) and 16 < sum(flipped) < 48
    with pytest.raises(ValueError, match="images"):
        random_hflip(torch.zeros(4, 2), torch.Generator())


def test_flipped_run_interrupted_and_resumed_equals_uninterrupted(tmp_path, cache):
    """12 images, batch 4: the 6 steps cross two epochs; the resumed half draws its flips and noise from the
    restored generator, so weights, EMA, optimizer and RNG states end bit-for-bit equal."""
    folder = make_folder(tmp_path / "imgs")
    base = TINY + [f"data.path={folder}", "data.hflip=true"]
    train(load_config(None, base + ["train.steps=6"]), tmp_path / "a", progress=False)
    train(load_config(None, base + ["train.steps=3"]), tmp_path / "b", progress=False)
    train(load_config(None, base + ["train.steps=6"]), tmp_path / "b", resume=True, progress=False)
    ta = assert_same_checkpoints(tmp_path / "a", tmp_path / "b", 6)
    train(load_config(None, TINY + [f"data.path={folder}", "train.steps=6"]), tmp_path / "c", progress=False)
    tc, _ = load_checkpoint(tmp_path / "c")  # the same run without flips: the flips did change the training
    assert any(not torch.equal(ta[k], tc[k]) for k in ta if k.startswith("model."))


# -- the shipped configs --------------------------------------------------------------------------
@pytest.mark.parametrize("name,size", [("folder32.toml", 32), ("folder64.toml", 64)])
def test_shipped_folder_configs_train_on_a_made_up_folder(tmp_path, cache, capsys, name, size):
    folder = make_folder(tmp_path / "imgs")
    before = snapshot(folder)
    run = tmp_path / "run"
    tiny = ["train.steps=2", "model.base_channels=8", "model.norm_groups=4", "diffusion.T=10", "train.batch_size=4",
            "train.n_sample=2", "train.log_every=1", "sample.steps=0"]
    code, _, err = run_cli(capsys, "train", "--config", ROOT / "configs" / name, *_flags(tiny),
                             "--set", f"data.path={folder}", "--out", run, "--no-progress")
    assert code == 0, err
    record = load_checkpoint(run)[1]
    assert record["step"] == 2 and record["meta"]["data"]["shape"] == [3, size, size]
    cfg = load_config(run / "config.toml")
    assert (cfg.data.channels, cfg.data.hflip, cfg.model.attn_resolutions) == (3, True, [16])
    assert (run / "samples.png").is_file() and snapshot(folder) == before
    with pytest.raises(DataError, match="image folder does not exist"):
        load_dataset(load_config(ROOT / "configs" / name).data, "train")  # the placeholder path must be replaced


def test_folder_configs_infer_channels_and_flip():
    for name in ("folder32.toml", "folder64.toml"):
        cfg = load_config(ROOT / "configs" / name)
        assert cfg.data.name == "folder" and cfg.data.channels == 0 and cfg.data.hflip
    with pytest.raises(ConfigError, match="data.hflip"):
        load_config(None, ["data.name=gmm", "data.hflip=true"])
