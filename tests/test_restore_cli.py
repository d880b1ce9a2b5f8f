"""``diffusekit restore`` (cli/restore.py, runs/restore.py) on tiny trained runs: every task
writes its picture, arrays and settings; the measurement holds in the outputs; settings.json
reproduces a restoration bit for bit; bad input is one line naming the flag or file."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from diffusekit.cli import main as cli_main
from diffusekit.cli.restore import format_metrics
from diffusekit.evaluate.features import correct, load_feature_net
from diffusekit.runs.restore import make_masks, noise_seed, psnr


def run(argv) -> int:
    """``diffusekit restore ARGV``; a bad flag returns 2 after its one-line message."""
    try:
        return cli_main(["restore", *[str(a) for a in argv]])
    except SystemExit as exc:  # argparse: a bad flag (one line already printed) or --help
        return int(exc.code or 0)

TINY = ["--set", "model.base_channels=8", "--set", "model.norm_groups=4", "--set", "diffusion.T=20",
        "--set", "train.steps=3", "--set", "train.batch_size=8", "--set", "train.sample_every=0",
        "--set", "train.n_sample=4", "--set", "train.log_every=1"]
FAST = ["--steps", "5", "--no-progress"]


@pytest.fixture(scope="module")
def colour_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("colour")
    folder = root / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray((rng.random((16, 16, 3)) * 255).astype(np.uint8)).save(folder / f"c{i}.png")
    out = root / "run"
    colour = ["--set", "data.name=folder", "--set", f"data.path={folder}", "--set", "data.channels=3", "--set",
              "data.image_size=16", "--set", "model.attn_resolutions=[8]"]
    assert cli_main(["train", *TINY, *colour, "--out", str(out), "--no-progress"]) == 0
    return out


def _images(folder, n=2, size=8, mode="L"):
    folder.mkdir(exist_ok=True)
    rng = np.random.default_rng(1)
    paths = []
    for i in range(n):
        shape = (size, size) if mode == "L" else (size, size, 3)
        Image.fromarray((rng.random(shape) * 255).astype(np.uint8), mode=mode).save(folder / f"in{i}.png")
        paths.append(str(folder / f"in{i}.png"))
    return paths


def _one_line_error(capsys, argv, *needles):
    code = run([str(a) for a in argv])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def test_inpaint_from_the_test_split_writes_everything_and_reproduces(digits_run, digits_cache, tmp_path, monkeypatch,
                                                                      capsys):
    monkeypatch.setenv("DIFFUSEKIT_CACHE", str(digits_cache.parent))
    out = tmp_path / "r1"
    assert run(["--run", digits_run, "--task", "inpaint", "--n", "3", "--seeds", "4-5", "--resample", "2", "--jump",
                "2", "--out", out, *FAST]) == 0
    assert "PSNR" in capsys.readouterr().out
    assert {p.name for p in out.iterdir()} == {"restore.png", "restored.npz", "settings.json", "metrics.json"}
    d = np.load(out / "restored.npz")
    assert d["restored"].shape == (3, 2, 1, 8, 8) and d["original"].shape == (3, 1, 8, 8)
    known = d["known"]  # the centre 4x4 is unknown
    assert known.shape == (3, 1, 8, 8) and (~known).sum() == 3 * 16 and not known[:, :, 2:6, 2:6].any()
    for s in range(2):  # the known pixels are the originals', bit for bit
        assert np.array_equal(d["restored"][:, s][known], d["original"][known])
    assert list(d["seeds"]) == [4, 5] and d["noise_seeds"][2, 1] == noise_seed(5, 2)
    assert list(d["inputs"]) == ["test:0", "test:1", "test:2"] and (d["labels"] >= 0).all()
    settings = json.loads((out / "settings.json").read_text())
    metrics = settings["extra"]["metrics"]
    assert metrics["nfe"] == 5 + (2 - 1) * 2 * (5 // 2) and metrics["measurement_error"] == 0.0
    assert 0.0 <= metrics["accuracy"] <= 1.0 and metrics["accuracy_original"] > 0.5
    # the gap and its standard error over the 3 inputs, by hand from the classifier's verdicts on the files
    net = load_feature_net("digits")
    labels = torch.from_numpy(d["labels"]).long()
    ok = correct(net, torch.from_numpy(d["restored"]).flatten(0, 1).clamp(-1, 1), labels.repeat_interleave(2))
    gap = correct(net, torch.from_numpy(d["original"]), labels) - ok.view(3, 2).mean(1)
    assert metrics["accuracy_gap"] == pytest.approx(metrics["accuracy_original"] - metrics["accuracy"], abs=1e-12)
    assert metrics["accuracy_gap"] == pytest.approx(gap.mean().item(), abs=1e-12)
    assert metrics["accuracy_gap_stderr"] == pytest.approx(gap.std().item() / 3 ** 0.5, abs=1e-12)
    with Image.open(out / "restore.png") as img:
        assert img.mode == "RGB" and img.size[0] > img.size[1]  # 3 rows of 4 tiles
    # settings.json alone reproduces the restoration, whatever the batch size
    again = tmp_path / "r2"
    assert run(["--run", digits_run, "--settings", out / "settings.json", "--out", again, "--no-progress"]) == 0
    assert np.array_equal(np.load(again / "restored.npz")["restored"], d["restored"])
    small = tmp_path / "r3"
    assert run(["--run", digits_run, "--task", "inpaint", "--n", "3", "--seeds", "4-5", "--resample", "2", "--jump",
                "2", "--batch-size", "1", "--out", small, *FAST]) == 0
    np.testing.assert_allclose(np.load(small / "restored.npz")["restored"], d["restored"], atol=1e-5)


@pytest.mark.parametrize("flags", [["--task", "outpaint"], ["--task", "inpaint", "--mask", "left"],
                                   ["--task", "inpaint", "--mask", "random", "--fraction", "0.25"],
                                   ["--task", "superres"], ["--task", "superres", "--factor", "4"],
                                   ["--task", "inpaint", "--method", "ddnm"]], ids=lambda f: "-".join(f[1::2]))
def test_tasks_on_image_files(digits_run, tmp_path, flags):
    files = _images(tmp_path / "in")
    out = tmp_path / "out"
    assert run(["--run", digits_run, *flags, "--images", *files, "--seeds", "0", "--out", out, *FAST]) == 0
    d = np.load(out / "restored.npz")
    restored, original = torch.from_numpy(d["restored"][:, 0]), torch.from_numpy(d["original"])
    assert restored.shape == original.shape == (2, 1, 8, 8) and list(d["inputs"]) == files
    metrics = json.loads((out / "metrics.json").read_text())
    assert "accuracy" not in metrics  # files carry no labels
    if "superres" in flags:
        f = 4 if "4" in flags else 2
        pool = torch.nn.functional.avg_pool2d
        scale = max(1.0, restored.abs().max().item())  # a 3-step model's outputs are large: float32 rounding
        torch.testing.assert_close(pool(restored, f), pool(original, f), rtol=0, atol=1e-6 * scale)
        assert d["measurement"].shape == (2, 1, 8 // f, 8 // f)
    else:
        known = torch.from_numpy(d["known"])
        assert torch.equal(restored[known], original[known]) and not torch.equal(restored[~known], original[~known])
        if "random" in flags:
            assert ((~known).flatten(1).sum(1) == 16).all() and not torch.equal(known[0], known[1])
        if "outpaint" in flags:
            assert known[:, :, 2:6, 2:6].all() and (~known).sum() == 2 * 48


def test_a_png_mask(digits_run, tmp_path):
    mask = np.zeros((8, 8), np.uint8)
    mask[:, 5:] = 255  # generate the three right-most columns
    Image.fromarray(mask).save(tmp_path / "mask.png")
    out = tmp_path / "out"
    assert run(["--run", digits_run, "--task", "inpaint", "--mask", tmp_path / "mask.png", "--n", "2", "--seeds", "0",
                "--out", out, *FAST]) == 0
    known = np.load(out / "restored.npz")["known"]
    assert known[:, :, :, :5].all() and not known[:, :, :, 5:].any()


def test_colorize_on_a_colour_run(colour_run, tmp_path):
    files = _images(tmp_path / "in", size=20, mode="RGB")  # any size: centre-cropped and resized
    out = tmp_path / "out"
    assert run(["--run", colour_run, "--task", "colorize", "--images", *files, "--seeds", "0-1", "--out", out,
                *FAST]) == 0
    d = np.load(out / "restored.npz")
    restored, original = torch.from_numpy(d["restored"]), torch.from_numpy(d["original"])
    assert restored.shape == (2, 2, 3, 16, 16) and d["measurement"].shape == (2, 1, 16, 16)
    scale = max(1.0, restored.abs().max().item())
    torch.testing.assert_close(restored.mean(2), original.mean(1)[:, None].expand(-1, 2, -1, -1), rtol=0,
                               atol=1e-6 * scale)
    assert (restored.std(2) > 0).any()  # colour was generated, not just the gray copied


@pytest.mark.parametrize("flags,needles", [
    (["--task", "colorize"], ["--task colorize", "1 channel"]),
    (["--task", "superres", "--factor", "3"], ["--factor 3", "8x8"]),
    (["--task", "inpaint", "--images", "no/such.png"], ["no/such.png"]),
    (["--task", "inpaint", "--mask", "WRONG_SIZE"], ["--mask", "mask.png", "16x16", "8x8"]),
    (["--task", "inpaint", "--mask", "no/mask.png"], ["--mask no/mask.png"]),
    (["--task", "inpaint", "--mask", "ALL_KNOWN"], ["--mask", "no pixel"]),
    (["--task", "superres", "--mask", "center"], ["--mask"]),
    (["--task", "inpaint", "--n", "100000"], ["--n 100000"]),
    (["--task", "inpaint", "--fraction", "1.5"], ["--fraction"]),
    (["--task", "inpaint", "--steps", "21"], ["--steps"]),
    (["--task", "inpaint", "--resample", "2", "--jump", "30"], ["--jump 30"]),
    (["--task", "inpaint", "--seeds", "5-1"], ["--seeds"]),
    (["--task", "inpaint", "--method", "magic"], ["--method"]),
    (["--settings", "no/settings.json"], ["--settings no/settings.json"]),
    ([], ["--task"]),
])
def test_bad_input_is_one_line_naming_the_flag_or_file(digits_run, tmp_path, capsys, flags, needles):
    if "WRONG_SIZE" in flags or "ALL_KNOWN" in flags:
        Image.fromarray(np.full((16, 16) if "WRONG_SIZE" in flags else (8, 8), 0, np.uint8)).save(tmp_path / "mask.png")
        flags = [str(tmp_path / "mask.png") if f in ("WRONG_SIZE", "ALL_KNOWN") else f for f in flags]
    _one_line_error(capsys, ["--run", digits_run, *flags, "--out", tmp_path / "out", "--no-progress"], *needles)
    assert not (tmp_path / "out").exists()


def test_a_run_that_does_not_exist(capsys, tmp_path):
    _one_line_error(capsys, ["--run", tmp_path / "nope", "--task", "inpaint"], "nope")


def test_masks_and_psnr():
    center = make_masks("center", 2, (8, 8))
    assert center.shape == (2, 1, 8, 8) and (~center).sum() == 2 * 16 and not center[0, 0, 2:6, 2:6].any()
    assert torch.equal(make_masks("border", 1, (8, 8)), ~make_masks("center", 1, (8, 8)))
    for side, region in [("left", (slice(None), slice(0, 4))), ("right", (slice(None), slice(4, 8))),
                         ("top", (slice(0, 4), slice(None))), ("bottom", (slice(4, 8), slice(None)))]:
        m = make_masks(side, 1, (8, 8))[0, 0]
        assert not m[region].any() and m.sum() == 32
    r1, r2 = make_masks("random", 3, (8, 8), 0.3, mask_seed=1), make_masks("random", 3, (8, 8), 0.3, mask_seed=1)
    assert torch.equal(r1, r2) and ((~r1).flatten(1).sum(1) == 19).all() and not torch.equal(r1[0], r1[1])
    x = torch.zeros(2, 1, 2, 2)
    ref = torch.zeros(2, 1, 2, 2)
    ref[1, 0, 0, 0] = 0.2
    region = torch.tensor([[[[True, False], [False, False]]]]).expand(2, -1, -1, -1)
    # image 1: squared error 0.04 on its one region pixel -> 10 log10(4 / 0.04) = 20 dB; image 0 is exact
    assert psnr(x, ref, region)[1].item() == pytest.approx(20.0)
    assert psnr(x, ref)[1].item() == pytest.approx(10 * np.log10(4 / 0.01))
    assert psnr(torch.full((1, 1, 1, 1), 5.0), torch.ones(1, 1, 1, 1)).item() > 100  # clamped to [-1, 1]


def test_the_accuracy_gap_prints_its_standard_error_only_over_several_inputs():
    m = {"task": "inpaint", "method": "repaint", "resample": 1, "psnr": 20.0, "psnr_pinv": 8.0, "n_samples": 2,
         "nfe": 10, "seconds": 1.0, "accuracy": 0.5, "accuracy_original": 1.0, "accuracy_degraded": 0.0,
         "accuracy_gap": 0.5, "accuracy_gap_stderr": None}
    assert format_metrics(m).count("gap to the originals 0.500)") == 1
    assert "gap to the originals 0.500 ± 0.125)" in format_metrics({**m, "accuracy_gap_stderr": 0.125})
