"""The command line: one-line errors naming the file, key or flag; train -> sample -> evaluate."""

import json

import numpy as np
import pytest

from diffusekit.cli import main

TINY = ["--set", "data.name=digits", "--set", "model.base_channels=8", "--set", "model.norm_groups=4",
        "--set", "diffusion.T=20", "--set", "train.steps=3", "--set", "train.batch_size=8",
        "--set", "train.sample_every=0", "--set", "train.n_sample=4", "--set", "train.log_every=1"]


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, err, *needles):
    assert code == 2
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


@pytest.mark.parametrize("argv,needles", [
    (["train", "--config", "nope.toml"], ["nope.toml"]),
    (["train", "--set", "train.lrr=1"], ["train.lrr"]),
    (["train", "--set", "train.steps=-5"], ["train.steps"]),
    (["train", "--set", "train.batch_size=0"], ["train.batch_size"]),
    (["train", "--set", "train.lr=nan"], ["train.lr"]),
    (["train", "--set", "model.kind=transformer"], ["model.kind"]),
    (["train", "--set", "trainlr"], ["trainlr"]),
    (["train", "--resume", "--out", "no/such/run"], ["--resume"]),
    (["sample", "--run", "no/such/run"], ["no/such/run"]),
    (["evaluate", "--run", "no/such/run"], ["no/such/run"]),
])
def test_bad_input_is_one_line_naming_the_culprit(capsys, tmp_path, argv, needles):
    code, _, err = run_cli(capsys, *argv)
    assert_one_line_error(code, err, *needles)


def test_bad_config_file_names_the_file_and_line(capsys, tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[train]\nsteps = = 3\n")
    code, _, err = run_cli(capsys, "train", "--config", bad)
    assert_one_line_error(code, err, "bad.toml")


def test_bad_image_in_a_folder_names_the_file(capsys, tmp_path):
    from PIL import Image

    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(3):
        Image.fromarray((np.random.default_rng(i).random((16, 16)) * 255).astype(np.uint8)).save(folder / f"ok{i}.png")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 10)
    code, _, err = run_cli(capsys, "train", "--set", f"data.path={folder}", "--set", "data.name=folder",
                           "--set", "data.image_size=16", "--out", tmp_path / "run", "--no-progress")
    assert_one_line_error(code, err, "broken.png")


def test_dry_run_prints_the_resolved_config(capsys):
    code, out, _ = run_cli(capsys, "train", "--set", "train.lr=0.0002", "--dry-run")
    assert code == 0 and "lr = 0.0002" in out and "[model]" in out


def test_train_sample_evaluate_end_to_end(capsys, tmp_path):
    run = tmp_path / "run"
    code, out, err = run_cli(capsys, "train", *TINY, "--out", run, "--no-progress")
    assert code == 0, err
    code, out, err = run_cli(capsys, "sample", "--run", run, "--seeds", "0-5", "--sampler", "ddim", "--steps", "5",
                             "--out", tmp_path / "s1", "--no-progress")
    assert code == 0, err
    data = np.load(tmp_path / "s1" / "samples.npz")
    assert data["x"].shape == (6, 1, 8, 8) and list(data["seeds"]) == list(range(6))
    assert (tmp_path / "s1" / "grid.png").is_file() and (tmp_path / "s1" / "sample_5.png").is_file()
    # re-running from the recorded settings reproduces the samples exactly
    code, _, err = run_cli(capsys, "sample", "--run", run, "--settings", tmp_path / "s1" / "settings.json",
                           "--out", tmp_path / "s2", "--no-progress")
    assert code == 0, err
    assert np.array_equal(np.load(tmp_path / "s2" / "samples.npz")["x"], data["x"])
    code, out, err = run_cli(capsys, "evaluate", "--run", run, "--metrics", "bpd", "--strata", "4", "--json",
                             "--no-progress")
    assert code == 0, err
    result = json.loads(out)
    assert result["bpd"]["bits_per_dim"] > 0 and "categorical_per_pixel" in result["bpd"]["baselines"]
    # the default bound fits the reverse variances on the train split and also reports the fixed ones
    assert result["bpd"]["variance"].startswith("fitted") and result["bpd"]["bits_per_dim_beta_tilde"] > 0
    assert len(json.loads((run / "eval" / "reverse_log_variances.json").read_text())["log_variance_t0_to_T"]) == 21
    assert (run / "eval" / "report.md").is_file()
    for name in ("diffusion_kernel", "noising", "trajectory"):
        assert (run / "eval" / f"{name}.png").is_file(), name
    # the default 50 strata on a run of T = 20 steps: one stratum per t, not an error
    code, out, err = run_cli(capsys, "evaluate", "--run", run, "--metrics", "bpd", "--variance", "beta_tilde",
                             "--json", "--no-progress")
    assert code == 0, err
    assert json.loads(out)["bpd"]["mode"] == "stratified (20 strata x 2)"


def test_evaluate_quality_and_report(capsys, tmp_path, monkeypatch, digits_cache):
    monkeypatch.setenv("DIFFUSEKIT_CACHE", str(digits_cache.parent))
    run = tmp_path / "run"
    assert run_cli(capsys, "train", *TINY, "--out", run, "--no-progress")[0] == 0
    code, out, err = run_cli(capsys, "evaluate", "--run", run, "--metrics", "fd", "--n-samples", "40", "--sampler",
                             "ddim", "--steps", "5", "--json", "--no-progress")
    assert code == 0, err
    q = json.loads(out)["quality"]
    assert q["n_samples"] == 40 and sum(q["class_histogram"]) == 40 and q["fd"] > 0 and q["fd_train_test"] > 0
    assert q["fd_ratio"] == pytest.approx(q["fd"] / q["fd_train_test"]) and 0 < q["confidence"] <= 1
    report = (run / "eval" / "report.md").read_text()
    assert "fd_ratio" in report and "![classes](classes.png)" in report and (run / "eval" / "classes.png").is_file()
    code, out, err = run_cli(capsys, "evaluate", "--run", run, "--metrics", "bpd,fid", "--no-progress")
    assert_one_line_error(code, err, "--metrics")


def test_sample_flag_errors(capsys, tmp_path):
    run = tmp_path / "run"
    assert run_cli(capsys, "train", *TINY, "--out", run, "--no-progress")[0] == 0
    code, _, err = run_cli(capsys, "sample", "--run", run, "--seeds", "3-x", "--no-progress")
    assert_one_line_error(code, err, "--seeds")
    code, _, err = run_cli(capsys, "sample", "--run", run, "--eta", "nan", "--no-progress")
    assert_one_line_error(code, err, "--eta")
    for flag, value in (("--classes", "3"), ("--guidance", "2")):  # an unconditional run takes neither
        code, _, err = run_cli(capsys, "sample", "--run", run, flag, value, "--no-progress")
        assert_one_line_error(code, err, flag, "unconditional")
    code, _, err = run_cli(capsys, "evaluate", "--run", run, "--metrics", "fd", "--guidance", "2", "--no-progress")
    assert_one_line_error(code, err, "--guidance", "unconditional")


@pytest.fixture(scope="module")
def class_run(tmp_path_factory):
    """A tiny class-conditional digits run (10 classes, null label 10), trained once for this module."""
    run = tmp_path_factory.mktemp("class") / "run"
    assert main(["train", *TINY, "--set", "model.num_classes=10", "--set", "train.class_dropout=0.2",
                 "--out", str(run), "--no-progress"]) == 0
    return run


def test_sample_with_classes_and_guidance(capsys, tmp_path, class_run):
    code, out, err = run_cli(capsys, "sample", "--run", class_run, "--seeds", "0-11", "--sampler", "ddim", "--steps",
                             "4", "--guidance", "2.5", "--classes", "3,7", "--out", tmp_path / "g", "--no-progress")
    assert code == 0, err
    saved = json.loads((tmp_path / "g" / "settings.json").read_text())
    assert saved["guidance"] == 2.5 and saved["classes"] == [3, 7]
    # reproduces from settings.json, and the labels matter: class 3 everywhere gives other samples
    code, _, err = run_cli(capsys, "sample", "--run", class_run, "--settings", tmp_path / "g" / "settings.json",
                           "--out", tmp_path / "g2", "--no-progress")
    assert code == 0, err
    x = np.load(tmp_path / "g" / "samples.npz")["x"]
    assert np.array_equal(np.load(tmp_path / "g2" / "samples.npz")["x"], x)
    code, _, err = run_cli(capsys, "sample", "--run", class_run, "--seeds", "0-11", "--sampler", "ddim", "--steps",
                           "4", "--guidance", "2.5", "--classes", "3", "--out", tmp_path / "g3", "--no-progress")
    assert code == 0, err
    x3 = np.load(tmp_path / "g3" / "samples.npz")["x"]
    assert np.array_equal(x3[0::2], x[0::2]) and not np.allclose(x3[1::2], x[1::2])
    # the default cycles through every class, recorded explicitly; the grid has one class per column
    code, _, err = run_cli(capsys, "sample", "--run", class_run, "--seeds", "0-19", "--sampler", "ddim", "--steps",
                           "2", "--out", tmp_path / "d", "--no-progress")
    assert code == 0, err
    saved = json.loads((tmp_path / "d" / "settings.json").read_text())
    assert saved["classes"] == list(range(10)) and saved["guidance"] == 1.0
    from PIL import Image

    tile = 8 * 4 + 1  # 8x8 digits upscaled to 32 px, 1 px padding
    assert Image.open(tmp_path / "d" / "grid.png").size == (10 * tile + 1, 2 * tile + 1)


@pytest.mark.parametrize("argv,needles", [
    (["--guidance", "nan"], ["--guidance", "nan"]),
    (["--guidance", "inf"], ["--guidance"]),
    (["--guidance", "-1"], ["--guidance"]),
    (["--classes", "10"], ["--classes", "10", "0..9"]),
    (["--classes", "1,x"], ["--classes", "'x'"]),
    (["--classes", "5-2"], ["--classes"]),
])
def test_class_flag_errors(capsys, class_run, argv, needles):
    code, _, err = run_cli(capsys, "sample", "--run", class_run, "--seeds", "0-1", "--steps", "2", *argv,
                           "--no-progress")
    assert_one_line_error(code, err, *needles)


def test_settings_with_a_class_out_of_range_is_one_line(capsys, tmp_path, class_run):
    bad = tmp_path / "settings.json"
    bad.write_text(json.dumps({"sampler": "ddim", "steps": 2, "seeds": [0, 1], "classes": [12]}))
    code, _, err = run_cli(capsys, "sample", "--run", class_run, "--settings", bad, "--no-progress")
    assert_one_line_error(code, err, "classes", "12", "out of range")
    bad.write_text(json.dumps({"sampler": "ddim", "steps": 2, "seeds": [0, 1], "guidance": float("nan")}))
    code, _, err = run_cli(capsys, "sample", "--run", class_run, "--settings", bad, "--no-progress")
    assert_one_line_error(code, err, "--settings", "guidance")


def test_evaluate_class_accuracy_at_the_guidance(capsys, monkeypatch, class_run, digits_cache):
    monkeypatch.setenv("DIFFUSEKIT_CACHE", str(digits_cache.parent))
    code, out, err = run_cli(capsys, "evaluate", "--run", class_run, "--metrics", "bpd,fd", "--n-samples", "20",
                             "--sampler", "ddim", "--steps", "3", "--strata", "3", "--guidance", "3", "--json",
                             "--no-progress")
    assert code == 0, err
    result = json.loads(out)
    q = result["quality"]
    assert q["guidance"] == 3.0 and 0.0 <= q["class_accuracy"] <= 1.0 and q["n_samples"] == 20
    assert result["settings"]["sampling"]["guidance"] == 3.0
    assert result["bpd"]["conditional"]["bits_per_dim"] > 0
    report = (class_run / "eval" / "report.md").read_text()
    assert "class_accuracy" in report and "conditional bound" in report


def test_evaluate_fd_on_a_folder_run_reports_pixel_space_distances(capsys, tmp_path):
    from PIL import Image

    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(20):  # 18 train, 2 test (the folder's fixed 10% holdout)
        Image.fromarray((np.random.default_rng(i).random((8, 8, 3)) * 255).astype(np.uint8)).save(folder / f"{i}.png")
    run = tmp_path / "run"
    tiny = TINY[2:]  # all but data.name=digits
    assert TINY[:2] == ["--set", "data.name=digits"]
    code, _, err = run_cli(capsys, "train", *tiny, "--set", "data.name=folder", "--set", f"data.path={folder}",
                           "--set", "data.image_size=8", "--set", "data.channels=3", "--out", run, "--no-progress")
    assert code == 0, err
    code, out, err = run_cli(capsys, "evaluate", "--run", run, "--metrics", "fd", "--n-samples", "6", "--steps", "3",
                             "--json", "--no-progress")
    assert code == 0, err
    q = json.loads(out)["quality"]
    assert q["feature_space"].startswith("pixels") and q["n_compared"] == 6 and q["sliced_wasserstein_ratio"] > 0
    assert "sliced_wasserstein_ratio" in (run / "eval" / "report.md").read_text()
    (folder / "19.png").unlink()  # 19 images: one test image, too few for the distances: said, not a traceback
    for f in sorted(folder.iterdir())[:9]:
        f.unlink()
    code, out, err = run_cli(capsys, "evaluate", "--run", run, "--metrics", "fd", "--n-samples", "4", "--steps", "3",
                             "--no-progress")
    assert code == 0, err
    assert "pixel-space distances need at least 2" in out
