"""Tuned time grids (issue 15, part 2): the parametrisation, the search on exact oracle denoisers, grids.json
(round trip, merge, damaged and hostile files), and ``tune-grid`` -> ``sample --grid tuned`` on a tiny run."""

import json
import math

import numpy as np
import pytest
import torch
from test_cli import TINY, assert_one_line_error, run_cli

from diffusekit.cli import main
from diffusekit.errors import CheckpointError, ConfigError
from diffusekit.oracle import mixture_family
from diffusekit.runs import grids as run_grids
from diffusekit.runs.grids import GRIDS_FILE, TuneSettings, read_grids, write_grids
from diffusekit.sampling import tune
from diffusekit.sampling.catalog import GRIDS, TUNABLE_SAMPLERS
from diffusekit.sampling.generate import generate
from diffusekit.sampling.noise import PerSampleNoise
from diffusekit.sampling.ode import sample_rk45, time_grid
from diffusekit.sampling.settings import SampleSettings
from diffusekit.sampling.tune import (
    grid_from_params,
    ode_map_error,
    params_from_grid,
    steps_for_nfe,
    tune_grid,
    valid_grid,
)
from diffusekit.schedules import make_schedule
from diffusekit.sde import vp_from_schedule

F64 = torch.float64


# ---------------------------------------------------------------------------------------------------------
# the parametrisation and the budget
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_every_parameter_vector_gives_a_valid_grid(schedule):
    sde = vp_from_schedule(make_schedule(schedule, 1000))
    g = torch.Generator().manual_seed(0)
    for n in (1, 2, 5, 10, 30):
        for scale in (0.0, 1.0, 10.0, 1e3, 1e8):
            z = (scale * torch.randn(n, generator=g, dtype=F64)).numpy()
            t = grid_from_params(sde, z)
            assert t.dtype == F64 and t.numel() == n + 1 and valid_grid(sde, t), (n, scale, t)
            assert float(t[0]) == sde.t_max and bool((t[1:] > sde.t_min).all())
    t = grid_from_params(sde, np.full(9, -1e9))  # every increment at its smallest: still apart
    assert valid_grid(sde, t)


def test_named_grids_round_trip_through_the_parameters():
    sde = vp_from_schedule(make_schedule("linear", 1000))
    for grid in ("logsnr_trailing", "karras_trailing", "time_trailing"):
        t = time_grid(sde, 8, grid)
        assert torch.allclose(grid_from_params(sde, params_from_grid(sde, t)), t, rtol=1e-9, atol=1e-12)


def test_budgets_follow_the_catalog_calls_rule():
    assert steps_for_nfe("unipc", 10) == 10 and steps_for_nfe("euler", 1) == 1
    assert steps_for_nfe("heun", 5) == 3 and steps_for_nfe("heun", 1) == 1
    with pytest.raises(ValueError, match="nearest budgets are 9 or 11"):
        steps_for_nfe("heun", 10)
    with pytest.raises(ValueError, match="euler, heun, dpmpp_2m, unipc"):
        steps_for_nfe("ddim", 5)
    with pytest.raises(ValueError, match="1.."):
        steps_for_nfe("unipc", 0)
    assert set(TUNABLE_SAMPLERS) == {"euler", "heun", "dpmpp_2m", "unipc"}


# ---------------------------------------------------------------------------------------------------------
# the search, on exact denoisers
# ---------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def oracle():
    return mixture_family()["2d-default"], make_schedule("linear", 1000)


@pytest.mark.parametrize("sampler,nfe,gain", [("unipc", 5, 0.5), ("heun", 5, 0.5), ("dpmpp_2m", 4, 0.8)])
def test_tuned_grid_is_closer_to_the_exact_map_on_held_out_draws(oracle, sampler, nfe, gain):
    mix, sch = oracle
    r = tune_grid(mix.denoiser, sch, sampler, nfe, (2,), examples=48, heldout=48, seed=3, max_evals=25, dtype=F64)
    assert r.steps == steps_for_nfe(sampler, nfe) and len(r.times) == r.steps and not r.fell_back
    assert r.heldout_error["tuned"] <= r.heldout_error["default"]
    # the defaults are far from the best at 4-5 calls here (issue 15): tuning must gain a factor, not noise
    assert r.heldout_error["tuned"] < gain * r.heldout_error["default"], r.heldout_error
    # the reported error is the distance to the exact map, recomputed here independently
    sde = vp_from_schedule(sch)
    settings = SampleSettings(sampler=sampler, steps=r.steps, grid="tuned", times=r.times,
                              seeds=list(range(3 + 48, 3 + 96)), batch_size=96)
    x = generate(mix.denoiser, sch, (2,), settings, progress=False, dtype=F64)
    x_T = sde.prior_sample(PerSampleNoise(settings.seeds, (2,), dtype=F64)())  # what generate starts from
    exact = sample_rk45(mix.denoiser, sde, x_T, rtol=1e-9, atol=1e-9)[0]
    assert ode_map_error(x, exact) == pytest.approx(r.heldout_error["tuned"], rel=1e-3)


def test_a_grid_worse_on_held_out_draws_falls_back_to_the_default(oracle, monkeypatch):
    mix, sch = oracle
    bad = np.array([8.0, -8.0, -8.0, -8.0])  # one jump to near the data, then tiny steps: "perfect" when tuning
    monkeypatch.setattr(tune, "compass_search", lambda f, z0, max_evals, **kw: (bad, 0.0, 1))
    r = tune_grid(mix.denoiser, sch, "unipc", 5, (2,), examples=16, heldout=16, dtype=F64)
    sde = vp_from_schedule(sch)
    assert r.fell_back and r.start == "logsnr_trailing"
    assert r.times == time_grid(sde, 5, "logsnr_trailing").tolist()
    assert r.heldout_error["tuned"] == r.heldout_error["default"]


def test_one_step_has_nothing_to_tune(oracle):
    mix, sch = oracle
    r = tune_grid(mix.denoiser, sch, "euler", 1, (2,), examples=4, heldout=4, dtype=F64)
    assert r.times == [1.0] and r.heldout_error["tuned"] == r.heldout_error["default"]


def test_settings_times_are_checked_and_used():
    base = {"sampler": "unipc", "steps": 3, "grid": "tuned", "seeds": [0, 1]}
    s = SampleSettings(**base, times=[1, 0.5, 0.25])
    assert s.times == [1.0, 0.5, 0.25] and SampleSettings.from_json(s.to_json()) == s
    for times in ([1.0, 0.5], [1.0, 0.5, 0.5], [1.0, 0.5, 0.0], [2.0, 0.5, 0.1], [1.0, float("nan"), 0.1],
                  ["1", 0.5, 0.1], [True, 0.5, 0.1]):
        with pytest.raises(ConfigError, match="times"):
            SampleSettings(**base, times=times)
    with pytest.raises(ConfigError, match="times"):
        SampleSettings(**{**base, "grid": "auto"}, times=[1.0, 0.5, 0.25])
    with pytest.raises(ConfigError, match="grid"):
        SampleSettings(sampler="ddim", steps=3, grid="tuned")
    with pytest.raises(ConfigError, match="grids.json"):  # a tuned grid without its times cannot be walked
        generate(mixture_family()["1d-narrow"].denoiser, make_schedule("linear", 20), (1,),
                 SampleSettings(**base), progress=False)


# ---------------------------------------------------------------------------------------------------------
# grids.json
# ---------------------------------------------------------------------------------------------------------
def entry(sampler="unipc", order=2, nfe=3, times=(1.0, 0.5, 0.2), step=7):
    return {"sampler": sampler, "order": order, "nfe": nfe, "steps": len(times) if sampler != "heun" else (nfe + 1) // 2,
            "times": list(times), "step": step, "checkpoint": f"step-{step:08d}",
            "heldout_error": {"tuned": 0.01, "default": 0.02}, "settings": {"examples": 8}}


def test_grids_file_round_trip_and_merge(tmp_path):
    assert read_grids(tmp_path) == {}
    write_grids(tmp_path, [entry(), entry(nfe=2, times=(1.0, 0.3))])
    write_grids(tmp_path, [entry(times=(1.0, 0.6, 0.1)), entry("heun", None, 3, (1.0, 0.4))])
    grids = read_grids(tmp_path)
    assert set(grids) == {"unipc-order2", "heun"} and set(grids["unipc-order2"]) == {"2", "3"}
    assert grids["unipc-order2"]["3"]["times"] == [1.0, 0.6, 0.1]  # replaced; the other kept
    t = [1.0, 0.8123456789012345, 0.1000000000000001]
    write_grids(tmp_path, [entry(times=t)])
    assert read_grids(tmp_path)["unipc-order2"]["3"]["times"] == t  # float64 exactly


def _file(grids):
    return json.dumps({"format": "diffusekit-grids", "version": 1, "grids": grids})


@pytest.mark.parametrize("text,needle", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "not a diffusekit grids file"),
    (json.dumps({"format": "other", "version": 1, "grids": {}}), "not a diffusekit grids file"),
    (_file({"unipc-order2": {"3": {**entry(), "times": [1.0, 0.2, 0.5]}}}), "times"),
    (_file({"unipc-order2": {"3": {**entry(), "times": [1.0, 0.5, -0.1]}}}), "times"),
    (_file({"unipc-order2": {"3": {**entry(), "times": [1.0, 0.5]}}}), "times"),
    (_file({"unipc-order2": {"3": entry()}}).replace("0.2", "NaN"), "not valid JSON"),
    (_file({"unipc-order2": {"4": entry()}}), "nfe"),
    (_file({"dpmpp_2m": {"3": entry()}}), "filed under"),
    (_file({"ddim": {"3": {**entry(), "sampler": "ddim"}}}), "sampler 'ddim'"),
    (_file({"unipc-order2": {"3": {**entry(), "step": "7"}}}), "step"),
    (_file({"unipc-order2": {"3": {**entry(), "heldout_error": {"tuned": 1e400}}}}), "Infinity"),
    (_file({"unipc-order2": {"3": {**entry(), "heldout_error": {"tuned": -1.0, "default": 1.0}}}}), "heldout_error"),
    (_file({"unipc-order2": {"3": "x"}}), "not an object"),
    (_file({"unipc-order2": {str(n): entry() for n in range(1001)}}), "more than 1000"),
    ("[" * 100_000 + "]" * 100_000, "grids"),
])
def test_a_damaged_or_hostile_grids_file_is_one_line_and_never_overwritten(tmp_path, text, needle):
    path = tmp_path / GRIDS_FILE
    path.write_text(text)
    with pytest.raises(CheckpointError) as info:
        read_grids(tmp_path)
    message = str(info.value)
    assert "\n" not in message and GRIDS_FILE in message and needle in message, message
    with pytest.raises(CheckpointError):
        write_grids(tmp_path, [entry()])
    assert path.read_text() == text


def test_an_oversized_grids_file_is_refused_unread(tmp_path):
    (tmp_path / GRIDS_FILE).write_bytes(b" " * (run_grids.MAX_GRIDS_BYTES + 1))
    with pytest.raises(CheckpointError, match="too large"):
        read_grids(tmp_path)


def test_tune_settings_are_checked_naming_the_flag():
    key = {"nfes": "--nfe", "examples": "--examples", "sampler": "--sampler"}.get
    with pytest.raises(ConfigError, match="--nfe.*9 or 11"):
        TuneSettings(sampler="heun", nfes=(10,), key=lambda f: key(f, f))
    with pytest.raises(ConfigError, match="--sampler 'ddim'"):
        TuneSettings(sampler="ddim", key=lambda f: key(f, f))
    with pytest.raises(ConfigError, match="--examples"):
        TuneSettings(examples=0, key=lambda f: key(f, f))


def test_diffusers_folders_and_other_families_are_refused(tmp_path, capsys):
    folder = tmp_path / "foreign"
    folder.mkdir()
    (folder / "scheduler_config.json").write_text("{}")
    (folder / "config.json").write_text("{}")
    before = sorted(p.name for p in folder.iterdir())
    code, _, err = run_cli(capsys, "tune-grid", "--run", folder, "--nfe", "5", "--no-progress")
    assert_one_line_error(code, err, "diffusers folder", "never written")
    assert sorted(p.name for p in folder.iterdir()) == before
    for family in ("diffusers", "vae", "text_latent", "controlnet"):
        with pytest.raises(ConfigError, match="diffusers folder|diffusion runs"):
            run_grids.tuned_settings(family, None, SampleSettings(sampler="unipc", steps=3, grid="tuned"), folder,
                                     str)


# ---------------------------------------------------------------------------------------------------------
# the command line, on a tiny trained run
# ---------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("tune") / "run"
    assert main(["train", *TINY, "--out", str(run), "--no-progress"]) == 0
    return run


def test_tune_grid_then_sample_with_the_tuned_grid(capsys, tmp_path, tiny_run):
    code, out, err = run_cli(capsys, "tune-grid", "--run", tiny_run, "--sampler", "unipc", "--nfe", "3,4",
                             "--examples", "6", "--max-evals", "6", "--no-progress")
    assert code == 0, err
    assert "unipc-order2" in out and "default" in out and str(tiny_run / GRIDS_FILE) in out
    grids = read_grids(tiny_run)["unipc-order2"]
    assert set(grids) == {"3", "4"} and grids["4"]["step"] == 3 and grids["4"]["checkpoint"].startswith("step-")
    assert grids["4"]["heldout_error"]["tuned"] <= grids["4"]["heldout_error"]["default"]
    code, _, err = run_cli(capsys, "sample", "--run", tiny_run, "--sampler", "unipc", "--steps", "4", "--grid", "tuned",
                           "--seeds", "0-3", "--out", tmp_path / "s1", "--no-progress")
    assert code == 0, err
    saved = json.loads((tmp_path / "s1" / "settings.json").read_text())
    assert saved["grid"] == "tuned" and saved["times"] == grids["4"]["times"]
    # settings.json alone reproduces the samples bit for bit (even with grids.json gone)
    (tiny_run / GRIDS_FILE).rename(tmp_path / "kept.json")
    try:
        code, _, err = run_cli(capsys, "sample", "--run", tiny_run, "--settings", tmp_path / "s1" / "settings.json",
                               "--out", tmp_path / "s2", "--no-progress")
    finally:
        (tmp_path / "kept.json").rename(tiny_run / GRIDS_FILE)
    assert code == 0, err
    x1, x2 = (np.load(tmp_path / s / "samples.npz")["x"] for s in ("s1", "s2"))
    assert np.array_equal(x1, x2)
    # the tuned grid gives other samples than the default grid
    code, _, err = run_cli(capsys, "sample", "--run", tiny_run, "--sampler", "unipc", "--steps", "4", "--seeds", "0-3",
                           "--out", tmp_path / "s3", "--no-progress")
    assert code == 0 and not np.array_equal(np.load(tmp_path / "s3" / "samples.npz")["x"], x1)


def test_tune_grid_and_sample_errors_are_one_line(capsys, tmp_path, tiny_run):
    for argv, needles in (
        (["--nfe", "0"], ["--nfe", "1..200"]),
        (["--nfe", "x"], ["--nfe"]),
        (["--sampler", "heun", "--nfe", "4"], ["--nfe", "3 or 5"]),
        (["--nfe", "3", "--examples", "0"], ["--examples"]),
        (["--nfe", "3", "--seed", "-1"], ["--seed"]),
    ):
        code, _, err = run_cli(capsys, "tune-grid", "--run", tiny_run, *argv, "--no-progress")
        assert_one_line_error(code, err, *needles)
    with pytest.raises(SystemExit) as info:  # argparse's choices: one line naming the flag
        main(["tune-grid", "--run", str(tiny_run), "--sampler", "ddim", "--nfe", "3"])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "--sampler" in err and len(err.strip().splitlines()) == 1
    code, _, err = run_cli(capsys, "sample", "--run", tiny_run, "--sampler", "dpmpp_2m", "--steps", "7", "--grid",
                           "tuned", "--out", tmp_path / "m", "--no-progress")
    assert_one_line_error(code, err, "--grid", f"diffusekit tune-grid --run {tiny_run} --sampler dpmpp_2m --nfe 7")
    code, _, err = run_cli(capsys, "sample", "--run", tiny_run, "--sampler", "unipc", "--order", "3", "--steps", "7",
                           "--grid", "tuned", "--out", tmp_path / "m", "--no-progress")
    assert_one_line_error(code, err, "--order 3 --nfe 7")
    code, _, err = run_cli(capsys, "sample", "--run", tiny_run, "--sampler", "ddim", "--grid", "tuned",
                           "--out", tmp_path / "m", "--no-progress")
    assert_one_line_error(code, err, "--grid", "tuned")
    saved = (tiny_run / GRIDS_FILE).read_text() if (tiny_run / GRIDS_FILE).exists() else None
    (tiny_run / GRIDS_FILE).write_text('{"format": "diffusekit-grids", "version": 1, "grids": {"unipc-order2": 5}}')
    try:
        code, _, err = run_cli(capsys, "sample", "--run", tiny_run, "--sampler", "unipc", "--steps", "4", "--grid",
                               "tuned", "--out", tmp_path / "m", "--no-progress")
        assert_one_line_error(code, err, GRIDS_FILE, "grids.unipc-order2")
        code, _, err = run_cli(capsys, "tune-grid", "--run", tiny_run, "--nfe", "3", "--no-progress")
        assert_one_line_error(code, err, GRIDS_FILE)
    finally:
        if saved is None:
            (tiny_run / GRIDS_FILE).unlink()
        else:
            (tiny_run / GRIDS_FILE).write_text(saved)


def test_a_tuning_batch_that_cannot_fit_in_memory_is_refused_before_the_work(capsys, tiny_run, monkeypatch):
    import diffusekit.runs.grids as grids_module

    needed = []
    monkeypatch.setattr(grids_module, "fits", lambda n, device="cpu": (needed.append(n) or False, 2**30))
    monkeypatch.setattr(grids_module, "tune_grid", lambda *a, **k: pytest.fail("tuned despite the memory check"))
    code, _, err = run_cli(capsys, "tune-grid", "--run", tiny_run, "--nfe", "3", "--examples", "5000", "--no-progress")
    assert_one_line_error(code, err, "--examples 5000", "GiB")
    assert len(needed) == 1 and needed[0] > 0


def test_a_grid_tuned_on_an_older_checkpoint_warns_in_one_line(capsys, tmp_path, tiny_run):
    saved = (tiny_run / GRIDS_FILE).read_text() if (tiny_run / GRIDS_FILE).exists() else None
    write_grids(tiny_run, [entry(nfe=2, times=(1.0, 0.4), step=1)])
    try:
        code, _, err = run_cli(capsys, "sample", "--run", tiny_run, "--sampler", "unipc", "--steps", "2", "--grid",
                               "tuned", "--seeds", "0-1", "--out", tmp_path / "w", "--no-progress")
    finally:
        if saved is None:
            (tiny_run / GRIDS_FILE).unlink()
        else:
            (tiny_run / GRIDS_FILE).write_text(saved)
    assert code == 0, err
    warning = [ln for ln in err.splitlines() if "warning" in ln]
    assert len(warning) == 1 and "step 1" in warning[0] and "step 3" in warning[0] and "tune-grid" in warning[0]
    assert json.loads((tmp_path / "w" / "settings.json").read_text())["times"] == [1.0, 0.4]


def test_named_grid_errors_are_finite_numbers(oracle):
    """Every named grid is a valid start (the non-trailing ones end at t_min itself)."""
    sde = vp_from_schedule(oracle[1])
    for g in GRIDS:
        assert valid_grid(sde, time_grid(sde, 6, g)), g
    assert math.isfinite(ode_map_error(torch.zeros(3, 2), torch.ones(3, 2)))


def test_evaluate_scores_the_tuned_grid(capsys, tiny_run):
    """``evaluate --grid tuned`` samples on the stored times (recorded in metrics.json) and is refused in
    one line, naming the tune-grid command, where the run has no such grid."""
    saved = (tiny_run / GRIDS_FILE).read_text() if (tiny_run / GRIDS_FILE).exists() else None
    write_grids(tiny_run, [entry(nfe=3, times=(1.0, 0.45, 0.1), step=3)])
    try:
        argv = ["evaluate", "--run", tiny_run, "--metrics", "fd", "--n-samples", "12", "--sampler", "unipc",
                "--grid", "tuned", "--no-progress"]
        code, _, err = run_cli(capsys, *argv, "--steps", "3")
        assert code == 0, err
        sampling = json.loads((tiny_run / "eval" / "metrics.json").read_text())["settings"]["sampling"]
        assert sampling["grid"] == "tuned" and sampling["times"] == [1.0, 0.45, 0.1] and sampling["steps"] == 3
        code, _, err = run_cli(capsys, *argv, "--steps", "5")
        assert_one_line_error(code, err, "--grid", f"diffusekit tune-grid --run {tiny_run} --sampler unipc --nfe 5")
    finally:
        if saved is None:
            (tiny_run / GRIDS_FILE).unlink()
        else:
            (tiny_run / GRIDS_FILE).write_text(saved)
