"""The layer above the math: the sampler table and its dispatch, one settings type validated once whatever
its source, the family table, and the evaluate settings that used to be copied by hand."""

import json

import numpy as np
import pytest
import torch
from conftest import fake_data

from diffusekit.cli import main
from diffusekit.config import load_config
from diffusekit.errors import ConfigError
from diffusekit.oracle import default_mixture
from diffusekit.sampling.catalog import SAMPLERS
from diffusekit.sampling.generate import generate, sampler_function
from diffusekit.sampling.noise import PerSampleNoise
from diffusekit.sampling.settings import SampleSettings
from diffusekit.schedules import make_schedule
from diffusekit.sde import vp_from_schedule

TINY = ["--set", "data.name=digits", "--set", "model.base_channels=8", "--set", "model.norm_groups=4",
        "--set", "diffusion.T=20", "--set", "train.steps=2", "--set", "train.batch_size=8",
        "--set", "train.sample_every=0", "--set", "train.n_sample=4", "--set", "train.log_every=1"]


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_every_catalog_row_dispatches_to_its_function_exactly(name):
    """``generate`` calls each sampler as its row says: the same samples as calling the function by hand
    with the same noise, grid and options (the row is the only place that knows)."""
    spec = SAMPLERS[name]
    mix, schedule = default_mixture(2), make_schedule("cosine", 50)
    settings = SampleSettings(sampler=name, steps=6, seeds=[3, 5, 8], batch_size=3, order=3, snr=0.2,
                              langevin_steps=2, step_size=0.5, rtol=1e-3, atol=1e-3, eta=0.5)
    got = generate(mix.denoiser, schedule, (2,), settings, progress=False, dtype=torch.float64)
    noise = PerSampleNoise([3, 5, 8], (2,), dtype=torch.float64)
    fn = sampler_function(spec)
    options = {kw: getattr(settings, field) for kw, field in spec.options.items()}
    if spec.call == "discrete":
        want = fn(mix.denoiser, schedule, noise(), noise, steps=6, **options)
    else:
        sde = vp_from_schedule(schedule)
        x_T = sde.prior_sample(noise())
        if spec.call == "adaptive":
            want = fn(mix.denoiser, sde, x_T, **options)[0]
        elif spec.call == "levels":
            want = fn(mix.denoiser, sde, x_T, noise, levels=6, **options)
        else:
            from diffusekit.sampling.ode import time_grid

            times = time_grid(sde, 6, spec.grid)
            want = fn(mix.denoiser, sde, x_T, noise, times, **options) if spec.call == "sde" else \
                fn(mix.denoiser, sde, x_T, times, **options)
    assert torch.equal(got, want)


@pytest.mark.parametrize("field,value,says", [
    ("steps", True, "steps"), ("steps", 1.5, "steps"), ("seeds", [1e30], "seeds"), ("seeds", [1, 1], "seeds"),
    ("use_ema", "no", "use_ema"), ("guidance", float("nan"), "guidance"), ("guidance", 1e300, "guidance"),
    ("step_size", 1e300, "step_size"), ("clip_x0", 1e300, "clip_x0"), ("batch_size", 0, "batch_size"),
    ("sampler", "ddpm2", "sampler"), ("order", 4, "order"), ("classes", [-1], "classes"),
])
def test_settings_from_a_file_pass_the_same_checks_as_flags(tmp_path, field, value, says):
    """One validator whatever the source: a settings.json with a bad value is a ConfigError naming the
    file and the key, never a silent acceptance (``use_ema: "no"`` used to be taken as true)."""
    d = SampleSettings().to_dict()
    d[field] = value
    path = tmp_path / "settings.json"
    path.write_text(json.dumps(d))
    with pytest.raises(ConfigError, match=says) as info:
        SampleSettings.from_json(path.read_text(), source=f"--settings {path}")
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_a_run_samples_with_every_field_of_its_sample_config(tmp_path, capsys):
    """``evaluate`` scores samples drawn with the run's [sample] section, all of it: a run whose config says
    sample.order = 3 is scored with UniPC at order 3 (it was order 2), and sample.clip_x0 is kept (it was
    dropped)."""
    run = tmp_path / "run"
    assert main(["train", *TINY, "--set", "sample.sampler=unipc", "--set", "sample.order=3", "--set", "sample.steps=4",
                 "--out", str(run), "--no-progress"]) == 0
    assert main(["evaluate", "--run", str(run), "--metrics", "fd", "--n-samples", "6", "--no-progress"]) == 0
    recorded = json.loads((run / "eval" / "metrics.json").read_text())["settings"]["sampling"]
    assert recorded["sampler"] == "unipc" and recorded["order"] == 3 and recorded["steps"] == 4
    run2 = tmp_path / "run2"
    assert main(["train", *TINY, "--set", "sample.clip_x0=0.5", "--set", "sample.steps=5", "--out", str(run2),
                 "--no-progress"]) == 0
    assert main(["evaluate", "--run", str(run2), "--metrics", "fd", "--n-samples", "6", "--no-progress"]) == 0
    recorded = json.loads((run2 / "eval" / "metrics.json").read_text())["settings"]["sampling"]
    assert recorded["clip_x0"] == 0.5
    # and sample uses the same defaults: the samples of `sample` equal those of `evaluate`'s settings
    assert main(["sample", "--run", str(run), "--seeds", "0-5", "--out", str(tmp_path / "s"), "--no-progress"]) == 0
    saved = json.loads((tmp_path / "s" / "settings.json").read_text())
    assert saved["order"] == 3 and saved["sampler"] == "unipc"


def test_the_family_table_finds_every_kind_and_names_unknown_ones():
    from diffusekit.families import FAMILIES, family_for_config

    for family in FAMILIES:
        for kind in family.kinds:
            objective = family.objective or "discrete"
            # progressive distillation's own rules: a v student, the rounds' steps, an EMA shorter than a round
            extra = ["model.prediction=v", "train.steps=2500", "train.ema_decay=0.99"] \
                if objective == "progressive" else []
            assert family_for_config(load_config(None, [f"model.kind={kind}", f"loss.objective={objective}",
                                                        "loss.weighting=elbo", *extra])) is family
    with pytest.raises(ConfigError, match="did you mean 'unet'") as info:
        family_for_config(load_config(None, ["model.kind=unt"]))
    assert "model.kind" in str(info.value)
    with pytest.raises(ConfigError, match="loss.objective"):
        family_for_config(load_config(None, ["model.kind=latent_unet", "loss.objective=continuous",
                                             "loss.weighting=elbo"]))


def test_a_gaussian_decoder_on_discrete_data_is_refused():
    """vae.decoder = 'gaussian' evaluates a density at discrete values: printed as bits/dim beside the
    discrete baselines it could go below zero. Training and the bound refuse it with one line."""
    from diffusekit.train.trainer import build_objective

    cfg = load_config(None, ["model.kind=vae", "vae.decoder=gaussian"])
    with pytest.raises(ConfigError, match="vae.decoder = 'gaussian'") as info:
        build_objective(cfg, fake_data((1, 8, 8), levels=17))
    assert "discretized" in str(info.value)
    build_objective(cfg, fake_data((2,), levels=None))  # continuous data: a density is the right thing


def test_evaluate_settings_are_checked_once_naming_the_flag():
    from diffusekit.families.base import EvaluateSettings

    for kwargs, flag in (({"metrics": ("bpd", "fid")}, "--metrics"), ({"strata": 0}, "--strata"),
                         ({"strata": 10**9}, "--strata"), ({"n_samples": 10**8}, "--n-samples"),
                         ({"iwae_k": 0}, "--iwae-k"), ({"ode_rtol": float("nan")}, "--ode-rtol"),
                         ({"split": "valid"}, "--split")):
        with pytest.raises(ConfigError, match=flag):
            EvaluateSettings(**kwargs)


def test_samples_are_written_with_the_seeds_and_settings_and_nothing_stale(tmp_path):
    """Re-sampling into a folder replaces it whole: stale sample_<seed>.png of an earlier call never sit
    beside a settings.json that does not list them."""
    run = tmp_path / "run"
    assert main(["train", *TINY, "--out", str(run), "--no-progress"]) == 0
    out = tmp_path / "s"
    assert main(["sample", "--run", str(run), "--seeds", "0-9", "--steps", "3", "--out", str(out), "--no-progress"]) == 0
    assert main(["sample", "--run", str(run), "--seeds", "0-2", "--steps", "3", "--out", str(out), "--no-progress"]) == 0
    assert sorted(p.name for p in out.glob("sample_*.png")) == ["sample_0.png", "sample_1.png", "sample_2.png"]
    assert json.loads((out / "settings.json").read_text())["seeds"] == [0, 1, 2]
    assert np.load(out / "samples.npz")["x"].shape[0] == 3
