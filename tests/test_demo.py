"""The demo's summary opens with a verdict read off the numbers, and its config stays inside the budget
that the verdict and the README promise (5 minutes of training on 2 cores)."""

from __future__ import annotations

from pathlib import Path

from diffusekit.cli.demo import DEMO_CONFIG, QUALITY_TARGET, verdict
from diffusekit.config import load_config

ROOT = Path(__file__).resolve().parents[1]


def result(bpd: float, fd_ratio: float, interval=(0.5, 2.0)) -> dict:
    return {"bpd": {"bits_per_dim": bpd, "n_examples": 360,
                    "baselines": {"categorical_per_pixel": 2.43, "gaussian_full_covariance": 2.94}},
            "quality": {"fd_ratio": fd_ratio, "fd_ratio_interval": list(interval), "kid_excess": 0.04,
                        "kid_excess_stderr": 0.1, "n_samples": 1000, "seconds_per_sample": 0.3,
                        "sampler": "ddpm", "steps": 1000}}


def test_a_bound_below_both_baselines_and_samples_within_the_target_read_as_such():
    lines = verdict(result(1.83, 0.96, (0.16, 2.41)), train_s=262.4, step=3000, steps=3000)
    assert lines[0] == ("likelihood: 1.83 bits/dim on the 360 held-out images, below both baselines "
                        "(per-pixel categorical 2.43, Gaussian 2.94; lower is better)")
    assert lines[1].startswith("samples: fd_ratio 0.96 (95% interval 0.16-2.41; real images score 1.0): "
                               f"within {QUALITY_TARGET}x of real data")
    assert lines[2] == "time: 262 s of training (3000 steps, " + lines[2].split(", ", 1)[1]
    assert "0.30 s per sample (ddpm, 1000 steps)" in lines[2]


def test_a_bound_above_a_baseline_and_poor_samples_are_said_plainly():
    lines = verdict(result(2.87, 2.3), train_s=210, step=1200, steps=1200)
    assert "NOT below the per-pixel categorical baseline" in lines[0]
    assert "Gaussian" in lines[0] and "below both" not in lines[0]
    assert "2.3x as far from the held-out images as real ones" in lines[1]
    worse_than_both = verdict(result(3.5, 1.0), train_s=1, step=1, steps=1)[0]
    assert "NOT below the per-pixel categorical and Gaussian baseline" in worse_than_both


def test_a_run_stopped_by_the_time_limit_says_so():
    line = verdict(result(1.9, 1.0), train_s=300, step=2400, steps=3000)[-1]
    assert "2400 steps, stopped by train.time_limit_s before 3000" in line


def test_the_demo_config_is_the_matched_end_point_model_within_five_minutes():
    cfg = load_config(ROOT / DEMO_CONFIG)
    assert cfg.data.name == "digits" and cfg.model.kind == "unet"
    assert cfg.diffusion.beta_start == 2e-3  # matched to the 17 gray levels (docs/evaluation.md, "The demo")
    assert 0 < cfg.train.time_limit_s <= 300
    lsimple = load_config(ROOT / "configs/digits.toml")  # kept as its own config
    assert lsimple.diffusion.beta_start == 1e-4
