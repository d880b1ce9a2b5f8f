"""Run folders written before the shell redesign still load, sample, evaluate and resume.

``tests/fixtures/old_runs`` was written by diffusekit at commit 2d0b4bc (tiny models, 12 steps, T = 50):
``unet`` (digits), ``unet_class`` (class-conditional, sample.guidance 2), ``continuous`` (VDM ELBO with
a learned schedule), ``vae`` and ``controlnet`` (over ``unet_class``, recorded as a path relative to
the fixtures folder). ``expected/`` holds what that code produced from them: ``samples.npz`` of
``diffusekit sample --seeds 0-3`` with the flags below and the JSON of ``diffusekit evaluate``. Today's
code must give the same samples and the same bounds. One file was regenerated on purpose since:
``continuous-heun4.npz``, when heun took the exponential-integrator step where Karras' step extrapolates
and its default grid became time_trailing (the few-step sampling work; docs/samplers.md).
"""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from diffusekit.cli import main

FIXTURES = Path(__file__).parent / "fixtures" / "old_runs"

SAMPLES = {
    "unet-ddpm10": ["--run", "unet", "--sampler", "ddpm", "--steps", "10"],
    "unet-ddim5": ["--run", "unet", "--sampler", "ddim", "--steps", "5", "--eta", "0.5"],
    "unet-unipc5": ["--run", "unet", "--sampler", "unipc", "--steps", "5", "--order", "3"],
    "unet_class-ddpm10": ["--run", "unet_class", "--sampler", "ddpm", "--steps", "10", "--classes", "3,7"],
    "continuous-ddpm10": ["--run", "continuous", "--sampler", "ddpm", "--steps", "10"],
    "continuous-heun4": ["--run", "continuous", "--sampler", "heun", "--steps", "4"],
    "vae": ["--run", "vae"],
    "controlnet-ddim5": ["--run", "controlnet", "--sampler", "ddim", "--steps", "5"],
}


@pytest.fixture
def old_runs(tmp_path, monkeypatch):
    """A writable copy of the fixtures, and the working directory there (controlnet's base_run is relative)."""
    root = tmp_path / "old_runs"
    shutil.copytree(FIXTURES, root)
    monkeypatch.chdir(root)
    return root


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_old_run_samples_unchanged(old_runs, name):
    out = old_runs / "out" / name
    assert main(["sample", "--no-progress", "--seeds", "0-3", "--out", str(out), *SAMPLES[name]]) == 0
    got, want = np.load(out / "samples.npz"), np.load(old_runs / "expected" / f"{name}.npz")
    assert got["seeds"].tolist() == want["seeds"].tolist() == [0, 1, 2, 3]
    np.testing.assert_allclose(got["x"], want["x"], rtol=1e-5, atol=1e-5)  # float32, any thread count


@pytest.mark.parametrize("name,flags", [("unet", ["--strata", "5"]), ("continuous", ["--strata", "5"]),
                                        ("vae", ["--iwae-k", "4"])])
def test_old_run_bounds_unchanged(old_runs, name, flags, capsys):
    assert main(["evaluate", "--no-progress", "--run", name, "--metrics", "bpd", "--json", *flags]) == 0
    got = json.loads(capsys.readouterr().out)["bpd"]
    want = json.loads((old_runs / "expected" / f"{name}-eval.json").read_text())["bpd"]
    assert got["bits_per_dim"] == pytest.approx(want["bits_per_dim"], rel=1e-6)
    if "continuous" in want:
        assert got["continuous"]["bits_per_dim"] == pytest.approx(want["continuous"]["bits_per_dim"], rel=1e-6)
    if "iwae_bits_per_dim" in want:
        assert got["iwae_bits_per_dim"] == pytest.approx(want["iwae_bits_per_dim"], rel=1e-6)


@pytest.mark.parametrize("name", ["unet", "continuous", "vae", "controlnet"])
def test_old_run_resumes(old_runs, name):
    assert main(["train", "--no-progress", "--out", name, "--resume", "--set", "train.steps=14"]) == 0
    latest = json.loads((old_runs / name / "checkpoints" / "latest.json").read_text())
    assert latest["step"] == 14


def test_old_records_load_with_a_warning_and_new_ones_are_hashed(old_runs, capsys):
    """Format-1 records (before the record hash) load, with a one-line warning that their record is not
    verified; a resumed run writes format 2, whose record is covered by its hash."""
    import warnings

    from diffusekit.errors import CheckpointFormatWarning
    from diffusekit.io.checkpoint import load_checkpoint, record_hash

    with pytest.warns(CheckpointFormatWarning, match="format 1"):
        load_checkpoint(old_runs / "unet")
    assert main(["sample", "--no-progress", "--seeds", "0", "--run", "unet", "--out", "w"]) == 0
    err = capsys.readouterr().err
    assert "diffusekit: warning:" in err and "format 1" in err and len(err.strip().splitlines()) == 1
    assert main(["train", "--no-progress", "--out", "unet", "--resume", "--set", "train.steps=13"]) == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, record = load_checkpoint(old_runs / "unet")
    assert record["format_version"] == 2 and record["record_sha256"] == record_hash(record)
