"""Mixed precision (``train.precision``, ``sample.precision``; ``diffusekit.speed``) on the CPU, where bf16
and fp16 autocast run: bf16 training stays near fp32, resumes bit for bit, fp16 overflows are skipped by
the gradient scaler (whose state the checkpoint keeps), and bf16 sampling stays near fp32 sampling."""

import json

import numpy as np
import pytest
import torch
from conftest import assert_same_checkpoints

from diffusekit.config import load_config
from diffusekit.errors import CheckpointError, ConfigError, TrainingError
from diffusekit.families.base import EvaluateSettings
from diffusekit.io.checkpoint import load_checkpoint, record_hash
from diffusekit.runs.evaluate import evaluate_run
from diffusekit.runs.sample import sample_run
from diffusekit.sampling.settings import SampleSettings
from diffusekit.train import trainer as trainer_module
from diffusekit.train.trainer import Trainer, train

TINY = ["data.name=digits", "model.base_channels=8", "model.norm_groups=4", "diffusion.T=50", "train.batch_size=32",
        "train.lr=2e-3", "train.warmup_steps=5", "train.log_every=5", "train.sample_every=0",
        "train.checkpoint_every=20", "train.n_sample=4", "train.steps=40"]

# what bf16 may change in a 40-step run against fp32 (measured here: logged losses within 0.04%, the bound
# 4.8326 vs 4.8330 bits/dim, fd_ratio 42.94 vs 42.86 of so short a run); the tolerances leave room for other
# machines' kernels
LOSS_RTOL, BPD_ATOL, FD_RATIO_RTOL = 0.02, 0.05, 0.25


def _cfg(*extra):
    return load_config(None, TINY + list(extra))


def _losses(run):
    return [json.loads(line)["loss"] for line in (run / "log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same 40-step digits run in fp32 and in bf16."""
    root = tmp_path_factory.mktemp("precision")
    for precision in ("fp32", "bf16"):
        train(_cfg(f"train.precision={precision}"), root / precision, progress=False)
    return root / "fp32", root / "bf16"


@pytest.mark.slow  # two 40-step runs, each evaluated (bound and fd_ratio)
def test_bf16_training_stays_within_tolerance_of_fp32(runs, monkeypatch, digits_cache):
    """Loss curve, the bound in bits/dim and fd_ratio of a bf16 run, all evaluated the same way, against fp32."""
    monkeypatch.setenv("DIFFUSEKIT_CACHE", str(digits_cache.parent))
    fp32, bf16 = runs
    a, b = _losses(fp32), _losses(bf16)
    assert len(a) == len(b) == 8 and a != b  # bf16 really ran, and differently
    assert max(abs(x - y) / x for x, y in zip(a, b)) < LOSS_RTOL
    settings = EvaluateSettings(metrics=("bpd", "fd"), strata=10, n_samples=200, sampler="ddim", steps=10)
    results = [evaluate_run(run, settings)[0].result for run in runs]
    (bpd_a, q_a), (bpd_b, q_b) = ((r["bpd"]["bits_per_dim"], r["quality"]["fd_ratio"]) for r in results)
    assert abs(bpd_a - bpd_b) < BPD_ATOL
    assert abs(q_a - q_b) / q_a < FD_RATIO_RTOL


def test_bf16_sampling_stays_near_fp32_and_returns_float32(runs):
    """Only the network runs in bf16: the samples are float32, close to fp32's, and not identical."""
    run = runs[0]
    common = {"sampler": "ddim", "steps": 10, "seeds": list(range(8))}
    fp32 = sample_run(run, common, out=run / "s32", progress=False)
    bf16 = sample_run(run, {**common, "precision": "bf16"}, out=run / "s16", progress=False)
    x32, x16 = (torch.from_numpy(np.load(r.out / "samples.npz")["x"]) for r in (fp32, bf16))
    assert x16.dtype == torch.float32
    assert not torch.equal(x32, x16)
    relative = (x32 - x16).norm() / x32.norm()
    assert 0 < relative < 0.02, relative
    assert json.loads((run / "s16" / "settings.json").read_text())["precision"] == "bf16"


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_resume_is_bit_exact_in_low_precision(tmp_path, precision):
    """10 steps straight equal 6 steps, a checkpoint, and 4 resumed steps: every tensor, the loss log and,
    in fp16, the gradient scaler's state."""
    base = ["train.checkpoint_every=4", "train.log_every=2", f"train.precision={precision}"]
    train(_cfg(*base, "train.steps=10"), tmp_path / "a", progress=False)
    train(_cfg(*base, "train.steps=6"), tmp_path / "b", progress=False)
    train(_cfg(*base, "train.steps=10"), tmp_path / "b", resume=True, progress=False)
    assert_same_checkpoints(tmp_path / "a", tmp_path / "b", 10)
    ra, rb = (load_checkpoint(tmp_path / r)[1] for r in "ab")
    assert _losses(tmp_path / "a") == _losses(tmp_path / "b")
    assert ra["meta"].get("grad_scaler") == rb["meta"].get("grad_scaler")
    assert ("grad_scaler" in ra["meta"]) == (precision == "fp16")


def test_fp16_overflow_is_skipped_by_the_scaler_not_written(tmp_path):
    """A scale so large that the fp16 backward overflows: the step is skipped (weights, EMA and optimizer
    untouched), the scale halves, and the checkpoint holds only finite values and the new scale."""
    trainer = Trainer(_cfg("train.precision=fp16"), tmp_path, progress=False)
    try:
        trainer.run_dir.mkdir(parents=True, exist_ok=True)
        trainer.train_step()  # a normal step first: AdamW has moments to keep
        trainer.scaler.load_state_dict({**trainer.scaler.state_dict(), "scale": 2.0**100})
        before = {k: v.clone() for k, v in trainer.state_tensors().items() if not k.startswith("rng.")}
        loss, norm = trainer.train_step()
        assert torch.isfinite(torch.tensor(loss)) and not torch.isfinite(torch.tensor(norm))
        after = trainer.state_tensors()
        for k, v in before.items():
            assert torch.equal(v, after[k]), k
        assert trainer.scaler.get_scale() == 2.0**99 and trainer.skipped_steps == 1 and trainer.step == 2
        trainer.save()
        tensors, record = load_checkpoint(tmp_path)
        assert all(torch.isfinite(v).all() for v in tensors.values() if v.dtype.is_floating_point)
        assert record["meta"]["grad_scaler"]["scale"] == 2.0**99
        trainer.train_step()  # and it trains on at the lower scale
    finally:
        trainer.close()


def test_fp16_that_overflows_at_every_step_stops_with_one_line(tmp_path, monkeypatch):
    """Gradients that overflow however far the scale falls end the run with one line naming the key,
    after MAX_SKIPPED_IN_A_ROW skipped steps (3 here), instead of idling through train.steps."""
    monkeypatch.setattr(trainer_module, "MAX_SKIPPED_IN_A_ROW", 3)
    trainer = Trainer(_cfg("train.precision=fp16"), tmp_path, progress=False)
    try:
        trainer.run_dir.mkdir(parents=True, exist_ok=True)
        trainer.train_step()
        trainer.scaler.load_state_dict({**trainer.scaler.state_dict(), "scale": 2.0**100})
        trainer.train_step()
        trainer.train_step()
        with pytest.raises(TrainingError, match=r"train.precision = 'fp16'.*3 steps in a row") as info:
            trainer.train_step()
        assert "\n" not in str(info.value) and trainer.skipped_steps == 3
    finally:
        trainer.close()


def test_a_bad_grad_scaler_record_is_a_one_line_error(tmp_path):
    train(_cfg("train.precision=fp16", "train.steps=2"), tmp_path, progress=False)
    _, record = load_checkpoint(tmp_path)
    record["meta"]["grad_scaler"] = {"scale": -1}
    record["record_sha256"] = record_hash(record)  # a consistent record: the resume checks must find it
    (tmp_path / "checkpoints" / f"step-{record['step']:08d}.json").write_text(json.dumps(record))
    with pytest.raises(CheckpointError, match="meta.grad_scaler") as err:
        Trainer(_cfg("train.precision=fp16", "train.steps=4"), tmp_path, resume=True, progress=False)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("override,message", [
    ("train.precision=fp8", "train.precision must be one of"),
    ("sample.precision=half", "sample.precision must be one of"),
    ("train.compile=1", "train.compile must be true or false"),
    ("train.channels_last=yes", "train.channels_last must be one of"),
])
def test_bad_speed_settings_are_one_line_errors(override, message):
    with pytest.raises(ConfigError, match=message) as err:
        load_config(None, [override])
    assert "\n" not in str(err.value)


def test_low_precision_is_refused_where_likelihood_terms_live_in_the_forward():
    with pytest.raises(ConfigError, match="train.precision must be 'fp32' for model.kind = 'vae'"):
        load_config(None, ["model.kind=vae", "train.precision=bf16"])
    with pytest.raises(ConfigError, match="precision must be one of"):
        SampleSettings(precision="fp64")
