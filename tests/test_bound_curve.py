"""``train.bound_every`` (the held-out bound along training, bound.jsonl and bound_curve.png) and
``train.cpu_limit_s`` (a budget in CPU seconds, held-out bounds left out)."""

import json

import pytest
import torch
from test_cli import TINY

from diffusekit.cli import main
from diffusekit.config import load_config
from diffusekit.continuous import continuous_bound
from diffusekit.data.registry import load_dataset
from diffusekit.errors import ConfigError
from diffusekit.evaluate import diffusion as diffusion_metrics
from diffusekit.evaluate.diffusion import FIT_VALUES
from diffusekit.families import open_run, read_run
from diffusekit.families.base import EvaluateSettings
from diffusekit.likelihood import fit_reverse_log_variances, vlb_estimate
from diffusekit.runs.evaluate import evaluate_run
from diffusekit.train.trainer import read_records, train

CURVE = [*TINY, "--set", "train.steps=5", "--set", "train.bound_every=2", "--set", "train.bound_examples=16",
         "--set", "train.checkpoint_every=2"]


@pytest.fixture(scope="module")
def curve_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("curve") / "run"
    assert main(["train", *CURVE, "--set", "model.bound_clip=true", "--out", str(out), "--no-progress"]) == 0
    return out


def test_the_bound_is_logged_every_n_steps_and_at_the_end(curve_run):
    recs = read_records(curve_run / "bound.jsonl")
    assert [r["step"] for r in recs] == [2, 4, 5]
    assert all(r["n_examples"] == 16 and r["variance"] == "fitted" and r["x0_clipped"] for r in recs)
    cpu = [r["cpu_s"] for r in recs]
    assert 0 < cpu[0] < cpu[1] < cpu[2]
    assert (curve_run / "bound_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_last_record_is_the_bound_of_the_final_ema_weights_recomputed(curve_run):
    """Recomputed from the checkpoint with the likelihood functions themselves: variances fitted on the
    first training images as evaluate sizes the fit, 50 strata (at most T), the record's seed."""
    model = open_run(curve_run)
    cfg = model.cfg
    x = load_dataset(cfg.data, "test").x[:16]
    train_x = load_dataset(cfg.data, "train").x
    seed = cfg.train.seed
    table = fit_reverse_log_variances(model.denoiser, train_x[:max(8, -(-FIT_VALUES // x[0].numel()))], model.schedule,
                                      model.levels, seed=seed, clip=True)
    b = vlb_estimate(model.denoiser, x, model.schedule, model.levels, n_strata=min(50, model.schedule.T), seed=seed,
                     variance=table, clip=True)
    last = read_records(curve_run / "bound.jsonl")[-1]
    assert last["bits_per_dim"] == pytest.approx(b.bits_per_dim, rel=1e-9)
    assert last["stderr_bits_per_dim"] == pytest.approx(b.stderr_bits_per_dim, rel=1e-9)


def test_logging_the_bound_leaves_training_unchanged(curve_run, tmp_path):
    """The same run without the curve ends with the same weights: the estimate draws its own noise."""
    plain = tmp_path / "plain"
    assert main(["train", *TINY, "--set", "train.steps=5", "--set", "train.checkpoint_every=2",
                 "--set", "model.bound_clip=true", "--out", str(plain), "--no-progress"]) == 0
    a, b = open_run(curve_run), open_run(plain)
    for (k, v), (k2, w) in zip(a.denoiser.state_dict().items(), b.denoiser.state_dict().items()):
        assert k == k2 and torch.equal(v, w), k


def test_resume_drops_bound_records_after_the_checkpoint(curve_run, tmp_path):
    import shutil

    run = tmp_path / "copy"
    shutil.copytree(curve_run, run)
    (run / ".diffusekit-lock").unlink(missing_ok=True)
    ckpts = sorted((run / "checkpoints").glob("step-*.safetensors"))
    for p in ckpts:  # keep the step-4 checkpoint only: resuming from 4 drops the record at 5, then makes it again
        if "00000004" not in p.name:
            p.unlink()
            p.with_suffix(".json").unlink()
    (run / "checkpoints" / "latest.json").unlink(missing_ok=True)
    assert main(["train", "--config", str(run / "config.toml"), "--out", str(run), "--resume", "--no-progress"]) == 0
    assert [r["step"] for r in read_records(run / "bound.jsonl")] == [2, 4, 5]


def test_a_continuous_run_logs_its_continuous_elbo(tmp_path):
    cfg = load_config(None, ["data.name=digits", "model.base_channels=8", "model.norm_groups=4", "diffusion.T=20",
                             "train.steps=2", "train.batch_size=8", "train.sample_every=0", "train.n_sample=4",
                             "loss.objective=continuous", "loss.weighting=elbo", "diffusion.learned_schedule=true",
                             "train.bound_every=2", "train.bound_examples=8"])
    train(cfg, tmp_path / "c", progress=False)
    rec = read_records(tmp_path / "c" / "bound.jsonl")
    assert [r["step"] for r in rec] == [2] and rec[0]["variance"] == "continuous ELBO"
    model = open_run(tmp_path / "c")
    x = load_dataset(model.cfg.data, "test").x[:8]
    b = continuous_bound(model.denoiser, model.logsnr_schedule, x, model.levels, n_draws=8,
                         seed=0)
    assert rec[0]["bits_per_dim"] == pytest.approx(b.bits_per_dim, rel=1e-9)


def test_the_cpu_limit_stops_a_run_with_a_checkpoint(tmp_path, capsys):
    out = tmp_path / "r"
    assert main(["train", *TINY, "--set", "train.steps=100000", "--set", "train.cpu_limit_s=0.000001",
                 "--out", str(out), "--no-progress"]) == 0
    assert "trained to step 1 (cpu_limit)" in capsys.readouterr().out
    log = read_records(out / "log.jsonl")
    assert log[-1]["step"] == 1 and log[-1]["cpu_s"] > 0
    assert json.loads((out / "checkpoints" / "latest.json").read_text())


@pytest.mark.parametrize("overrides,message", [
    (["model.kind=img2img", "train.bound_every=2"], "train.bound_every = 2: the held-out bound along training"),
    (["data.name=moons", "model.kind=mlp", "train.bound_every=2"], "the discrete bound needs data on discrete levels"),
])
def test_bound_every_where_there_is_no_bound_is_a_one_line_error(tmp_path, overrides, message):
    cfg = load_config(None, ["diffusion.T=20", "train.steps=1", "train.batch_size=8", "model.base_channels=8",
                             "model.norm_groups=4", "model.hidden=16", *overrides])
    with pytest.raises(ConfigError, match=message) as err:
        train(cfg, tmp_path / "x", progress=False)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("override,key", [("train.bound_every=-1", "train.bound_every"),
                                          ("train.bound_examples=1", "train.bound_examples"),
                                          ("train.cpu_limit_s=-2", "train.cpu_limit_s"),
                                          ("train.cpu_limit_s=inf", "train.cpu_limit_s")])
def test_bad_values_name_their_key(override, key):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert key in str(err.value) and "\n" not in str(err.value)


# -- bench/likelihood.py: the table of runs side by side ----------------------------------------------------
def _bench(monkeypatch):
    import importlib
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "bench"))
    return importlib.import_module("likelihood")


def test_the_likelihood_bench_reports_evaluates_numbers(curve_run, tmp_path, monkeypatch, capsys):
    """Its bound column is evaluate's bound (same seed, strata, variances and clipping); the training CPU
    seconds are the log's; the ODE rows run with the exact trace on 8x8 digits; the figure is drawn."""
    bench = _bench(monkeypatch)
    result = bench.main(["--runs", f"clip={curve_run}", "--strata", "5", "--ode-examples", "2", "--n-samples", "0",
                         "--dequantizations", "uniform,importance", "--dequant-samples", "2",
                         "--figure", str(tmp_path / "curves.png"), "--no-progress"])
    row = result["rows"][0]
    evaluation, _ = evaluate_run(curve_run, EvaluateSettings(metrics=("bpd",), strata=5), progress=False,
                                 out_dir=tmp_path / "eval")
    assert row["bound"]["bits_per_dim"] == pytest.approx(evaluation.result["bpd"]["bits_per_dim"], rel=1e-12)
    assert row["bound"]["x0_clipped"] and "x0 clipped" in row["switches"]
    log = read_records(curve_run / "log.jsonl")
    assert row["training"] == {"steps": 5, "seconds": round(log[-1]["cpu_s"], 1), "clock": "cpu"}
    assert row["ode"]["uniform"]["trace"] == "exact" and row["ode"]["importance"]["dequant_samples"] == 2
    assert [p["step"] for p in row["curve"]] == [2, 4, 5]
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"
    out = capsys.readouterr().out
    assert "| clip |" in out and "per-pixel categorical" in out


def test_a_resumed_runs_cpu_seconds_add_up(tmp_path, monkeypatch):
    bench = _bench(monkeypatch)
    (tmp_path / "log.jsonl").write_text("\n".join(json.dumps(r) for r in [
        {"step": 1, "loss": 1.0, "cpu_s": 2.0}, {"step": 2, "loss": 1.0, "cpu_s": 5.0},
        {"step": 3, "loss": 1.0, "cpu_s": 1.5}, {"step": 4, "loss": 1.0, "cpu_s": 4.0}]) + "\nnot json\n")
    assert bench.training_cpu(tmp_path) == {"steps": 4, "seconds": 9.0, "clock": "cpu"}


@pytest.mark.parametrize("argv,message", [
    (["--runs", "nolabel"], "--runs wants LABEL=RUN_FOLDER items"),
    (["--runs", "a=x", "a=y"], "the label 'a' is given twice"),
    (["--runs", "a=x", "--dequantizations", "gauss"], "comma-separated list of uniform"),
    (["--runs", "a=x", "--strata", "0"], "--strata must be in 1..1000"),
    (["--runs", "a=x", "--examples", "-1"], "--examples must be in 0..1000000"),
    (["--runs", "a=x", "--split", "val"], "invalid choice: 'val'"),
])
def test_bad_bench_arguments_are_one_line_errors(monkeypatch, capsys, argv, message):
    bench = _bench(monkeypatch)
    with pytest.raises(SystemExit) as exit_:
        bench.main(argv)
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_also_clipped_adds_the_runs_clipped_bound(digits_run, tmp_path, monkeypatch):
    bench = _bench(monkeypatch)
    result = bench.main(["--runs", f"plain={digits_run}", "--also-clipped", "plain", "--strata", "5",
                         "--ode-examples", "1", "--dequantizations", "uniform", "--n-samples", "0", "--no-progress"])
    plain, clipped = result["rows"]
    assert clipped["label"] == "plain, clipped at evaluation" and clipped["bound"]["x0_clipped"]
    on, _ = evaluate_run(digits_run, EvaluateSettings(metrics=("bpd",), strata=5, bound_clip=True), progress=False,
                         out_dir=tmp_path / "on")
    assert clipped["bound"]["bits_per_dim"] == pytest.approx(on.result["bpd"]["bits_per_dim"], rel=1e-12)
    assert clipped["bound"]["bits_per_dim"] <= plain["bound"]["bits_per_dim"] + 1e-9
    with pytest.raises(SystemExit):
        bench.main(["--runs", f"plain={digits_run}", "--also-clipped", "other"])


def test_earlier_rows_join_the_table(curve_run, tmp_path, monkeypatch, capsys):
    bench = _bench(monkeypatch)
    first = tmp_path / "first.json"
    bench.main(["--runs", f"one={curve_run}", "--strata", "2", "--ode-examples", "1", "--dequantizations", "uniform",
                "--n-samples", "0", "--json", str(first), "--no-progress"])
    joined = bench.main(["--from-json", str(first), "--runs", f"two={curve_run}", "--strata", "2", "--ode-examples", "1",
                         "--dequantizations", "uniform", "--n-samples", "0", "--no-progress"])
    assert [r["label"] for r in joined["rows"]] == ["one", "two"]
    assert joined["rows"][0]["bound"]["bits_per_dim"] == joined["rows"][1]["bound"]["bits_per_dim"]  # same run, seed
    (tmp_path / "bad.json").write_text("[1, 2]")
    with pytest.raises(SystemExit):
        bench.main(["--from-json", str(tmp_path / "bad.json")])
    assert "not a JSON file written by this bench" in capsys.readouterr().err


def test_examples_and_split_score_the_first_images_of_the_split(curve_run, monkeypatch):
    """``--examples 6 --split train``: the bound of the first 6 training images, as the likelihood functions
    give it on those images directly (the same seed, strata, variances and clipping)."""
    bench = _bench(monkeypatch)
    result = bench.main(["--runs", f"clip={curve_run}", "--examples", "6", "--split", "train", "--strata", "3",
                         "--ode-examples", "0", "--n-samples", "0", "--no-progress"])
    row = result["rows"][0]
    assert result["split"] == "train" and result["examples"] == 6 and row["bound"]["n_examples"] == 6
    family, source = read_run(curve_run)
    model = family.load(source, True, "cpu")
    first = load_dataset(model.cfg.data, "train").subset(torch.arange(6))
    direct = diffusion_metrics.bound(model, first, False, 3, 0, False, "fitted", None, True)
    assert row["bound"]["bits_per_dim"] == pytest.approx(direct["bits_per_dim"], rel=1e-12)


@pytest.mark.parametrize("overrides, words", [
    ([], "simple loss, beta_1 = 0.0001"),
    (["diffusion.schedule=\"logsnr_linear\"", "diffusion.logsnr_min=-11", "diffusion.logsnr_max=6.5"],
     "simple loss, log-SNR linear [-11, 6.5]"),
    (["diffusion.schedule=\"cosine\""], "simple loss, cosine schedule"),
])
def test_the_likelihood_bench_names_the_schedule(monkeypatch, overrides, words):
    bench = _bench(monkeypatch)
    assert bench.switches(load_config(None, overrides)).startswith(words + ", width")
