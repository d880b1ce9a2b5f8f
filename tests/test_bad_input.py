"""Bad input ends the command fast with one line naming the file, key or flag (no traceback).

Images: empty, truncated, random bytes, text with an image extension, too small (1x1), too thin,
decompression bombs (over Pillow's hard limit, and over diffusekit's MAX_PIXELS) are refused naming
the file. Decided and documented in ``diffusekit.data.images``: other modes are converted, not
refused: CMYK/YCbCr -> RGB, 16-bit gray scaled by 255/65535, transparency (RGBA, LA, palette with a
transparent index) composited onto white, palette -> its colours; the file's contents decide its
format, not its extension (a PNG named .jpg is read as the PNG it is).
"""

import io
import struct
import subprocess
import sys
import time
import zlib

import numpy as np
import pytest
from PIL import Image

from diffusekit.cli import main
from diffusekit.errors import DiffusekitError

TOY = ["--set", "data.name=moons", "--set", "data.n_train=64", "--set", "data.n_test=32", "--set", "model.kind=mlp",
       "--set", "model.hidden=16", "--set", "model.depth=1", "--set", "diffusion.T=10", "--set", "train.steps=2",
       "--set", "train.batch_size=16", "--set", "train.sample_every=0", "--set", "train.n_sample=4"]
FOLDER = ["--set", "data.name=folder", "--set", "data.image_size=8", "--set", "model.base_channels=8",
          "--set", "model.norm_groups=4", "--set", "model.channel_mult=[1,2]", "--set", "model.attn_resolutions=[4]",
          "--set", "diffusion.T=10", "--set", "train.steps=1", "--set", "train.batch_size=4",
          "--set", "train.sample_every=0", "--set", "train.n_sample=2"]


def run_cli(capsys, *argv):
    t0 = time.time()
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err, time.time() - t0


def assert_one_line(code, err, seconds, *needles):
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2, (code, err)
    assert len(lines) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    assert seconds < 20, seconds


# -- images ---------------------------------------------------------------------------------------
def _png(w, h, mode="L", **save):
    buf = io.BytesIO()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8), "L").convert(mode).save(buf, "PNG", **save)
    return buf.getvalue()


def _chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _bomb(side):
    """A few dozen bytes of PNG header declaring side x side pixels."""
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0))
            + _chunk(b"IDAT", zlib.compress(b"\0" * 64)) + _chunk(b"IEND", b""))


BAD_IMAGES = {
    "empty.png": lambda: b"",
    "truncated.png": lambda: _png(64, 64)[:300],
    "random.jpg": lambda: np.random.default_rng(1).integers(0, 256, 3000, dtype=np.uint8).tobytes(),
    "notes.png": lambda: b"not an image, just text with an image extension\n" * 20,
    "one_pixel.png": lambda: _png(1, 1),
    "thin.png": lambda: _png(200, 3),
    "bomb_pillow_limit.png": lambda: _bomb(60_000),  # 3.6e9 pixels: over Pillow's own error threshold
    "bomb_our_limit.png": lambda: _bomb(8_000),  # 6.4e7 pixels: over diffusekit's MAX_PIXELS
}


def _folder(tmp_path, extra=None):
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(4):
        (folder / f"good{i}.png").write_bytes(_png(16, 16))
    for name, data in (extra or {}).items():
        (folder / name).write_bytes(data)
    return folder


@pytest.mark.parametrize("name", sorted(BAD_IMAGES))
def test_a_bad_image_stops_training_naming_the_file(capsys, tmp_path, name):
    folder = _folder(tmp_path, {name: BAD_IMAGES[name]()})
    code, _, err, seconds = run_cli(capsys, "train", *FOLDER, "--set", f"data.path={folder}",
                                    "--out", tmp_path / "run", "--no-progress")
    assert_one_line(code, err, seconds, str(folder / name))
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_odd_modes_and_extensions_are_converted_and_train(capsys, tmp_path):
    rgba = Image.new("RGBA", (16, 16), (255, 0, 0, 0))  # fully transparent: becomes white
    palette = Image.new("P", (16, 16))
    palette.putpalette([0, 0, 0, 255, 255, 255] + [0] * 762)
    cmyk = Image.new("CMYK", (16, 16), (0, 0, 0, 0))  # no ink: white
    gray16 = Image.fromarray(np.full((16, 16), 65535, dtype=np.uint16))
    files = {}
    for name, img, fmt in (("rgba.png", rgba, "PNG"), ("palette.png", palette, "PNG"), ("cmyk.jpg", cmyk, "JPEG"),
                           ("gray16.png", gray16, "PNG"), ("png_named.jpg", Image.new("L", (16, 16), 255), "PNG")):
        buf = io.BytesIO()
        img.save(buf, fmt)
        files[name] = buf.getvalue()
    folder = _folder(tmp_path, files)
    from diffusekit.data.images import read_image

    for name in ("rgba.png", "cmyk.jpg", "gray16.png", "png_named.jpg"):
        assert read_image(folder / name, 8, 3).min() >= 250, name  # white stays white
    assert read_image(folder / "palette.png", 8, 3).max() == 0  # index 0 is black in its palette
    code, out, err, _ = run_cli(capsys, "train", *FOLDER, "--set", f"data.path={folder}", "--set", "data.channels=3",
                                "--out", tmp_path / "run", "--no-progress")
    assert code == 0, err


@pytest.mark.parametrize("override,key", [
    ("model.channel_mult=[1,2,2,2]", "model.channel_mult"),  # halves 3 times: 12 is not divisible by 8
    ("model.norm_groups=3", "model.norm_groups"),
    ("model.num_heads=3", "model.num_heads"),
    ("model.attn_resolutions=[5]", "model.attn_resolutions"),
])
def test_a_network_that_cannot_take_the_images_is_named(capsys, tmp_path, override, key):
    folder = _folder(tmp_path)
    code, _, err, seconds = run_cli(capsys, "train", *FOLDER, "--set", f"data.path={folder}",
                                    "--set", "data.image_size=12", "--set", "model.attn_resolutions=[6]",
                                    "--set", override, "--out", tmp_path / "run",
                                    "--no-progress")
    assert_one_line(code, err, seconds, key)


# -- configs and flags ----------------------------------------------------------------------------
@pytest.mark.parametrize("argv,needle", [
    (["train", "--set", "train.lerning_rate=1"], "train.lerning_rate"),
    (["train", "--set", "train.steps=ten"], "train.steps"),
    (["train", "--set", "train.steps=1.5"], "train.steps"),
    (["train", "--set", "train.steps=-5"], "train.steps"),
    (["train", "--set", "train.batch_size=0"], "train.batch_size"),
    (["train", "--set", "train.grad_accum=0"], "train.grad_accum"),
    (["train", "--set", "sample.eta=nan"], "sample.eta"),
    (["train", "--set", "train.lr=inf"], "train.lr"),
    (["train", "--set", "train.device=tpu"], "train.device"),
    (["train", "--resume", "--out", "no/such/run"], "--resume"),
    (["train", "--config", "no/such.toml"], "no/such.toml"),
    (["train", *TOY, "--set", "model.num_classes=10"], "model.num_classes"),
    (["train", "--set", "data.name=digits", "--set", "model.num_classes=3"], "model.num_classes"),
    (["train", "--set", "data.name=folder"], "data.path"),
    (["train", "--set", "data.name=folder", "--set", "data.path=no/such/folder"], "no/such/folder"),
    (["sample", "--run", "no/such/run"], "no/such/run"),
    (["sample", "--run", "x", "--steps", "abc"], "--steps"),
    (["sample", "--run", "x", "--batch-size", "many"], "--batch-size"),
    (["evaluate", "--run", "x", "--strata", "0"], "--strata"),
    (["bogus"], "bogus"),
])
def test_bad_config_or_flag_is_one_line_naming_it(capsys, tmp_path, argv, needle):
    code, _, err, seconds = run_cli(capsys, *argv, *(["--out", tmp_path / "run"] if argv[0] == "train"
                                                     and "--out" not in argv else []))
    assert_one_line(code, err, seconds, needle)


def test_bad_config_file_names_the_file_and_key(capsys, tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[train]\nsteps = 10\nbatchsize = 3\n")
    code, _, err, seconds = run_cli(capsys, "train", "--config", bad)
    assert_one_line(code, err, seconds, "bad.toml", "train.batchsize", "train.batch_size")


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("toy") / "run"
    assert main(["train", *TOY, "--out", str(run), "--no-progress"]) == 0
    return run


@pytest.mark.parametrize("flags,needle", [
    (["--eta", "nan"], "--eta"), (["--eta", "1.5"], "--eta"), (["--steps", "-1"], "--steps"),
    (["--steps", "11"], "--steps"), (["--batch-size", "0"], "--batch-size"), (["--seeds", "5-2"], "--seeds"),
    (["--clip-x0", "nan"], "--clip-x0"), (["--settings", "no/such.json"], "--settings"),
])
def test_bad_sample_flags_on_a_real_run(capsys, toy_run, tmp_path, flags, needle):
    code, _, err, seconds = run_cli(capsys, "sample", "--run", toy_run, *flags, "--out", tmp_path / "s", "--no-progress")
    assert_one_line(code, err, seconds, needle)
    assert not (tmp_path / "s").exists()


def test_debug_shows_the_traceback(capsys):
    with pytest.raises(DiffusekitError, match="train.batch_size"):
        main(["train", "--set", "train.batch_size=0", "--debug"])


def test_through_a_real_process(tmp_path):
    """``python -m diffusekit`` as a user runs it: exit status 2, one line on stderr naming the file."""
    folder = _folder(tmp_path, {"broken.png": BAD_IMAGES["truncated.png"]()})
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "diffusekit", "train", *FOLDER, "--set", f"data.path={folder}",
                           "--out", str(tmp_path / "run"), "--no-progress"],
                          capture_output=True, text=True, timeout=120, env={"OMP_NUM_THREADS": "1", "PATH": ""})
    seconds = time.time() - t0
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert str(folder / "broken.png") in lines[0]
    assert seconds < 60, seconds  # a few seconds on an idle machine, most of it importing torch
