"""The trainer: exact resume, loud failures, and the files a run leaves behind."""

import json
from itertools import pairwise

import pytest
import torch

from diffusekit.config import load_config
from diffusekit.errors import CheckpointError, ConfigError, TrainingError
from diffusekit.io.checkpoint import load_checkpoint, record_hash
from diffusekit.train.trainer import DataStream, Trainer, derive_seed, lr_factor, train

TINY_IMAGE = [
    "data.name=digits", "model.base_channels=8", "model.channel_mult=[1,2]", "model.attn_resolutions=[4]",
    "model.norm_groups=4", "diffusion.T=50", "train.batch_size=16", "train.lr=1e-3", "train.warmup_steps=3",
    "train.log_every=2", "train.sample_every=0", "train.checkpoint_every=4", "train.n_sample=4",
    "model.dropout=0.1",
]
TINY_TOY = ["data.name=moons", "data.n_train=256", "data.n_test=64", "model.kind=mlp", "model.hidden=32",
            "model.depth=2", "diffusion.T=40", "train.batch_size=32", "train.log_every=1", "train.sample_every=0",
            "train.checkpoint_every=3", "train.warmup_steps=2", "train.n_sample=8"]


def _cfg(base, *extra):
    return load_config(None, list(base) + list(extra))


def _final_state(run_dir):
    tensors, record = load_checkpoint(run_dir)
    return tensors, record


def test_data_stream_is_a_permutation_per_epoch_and_resumable():
    s = DataStream(10, seed=3)
    first = s.next(7)
    rest = s.next(3)
    assert sorted(torch.cat([first, rest]).tolist()) == list(range(10))
    a = DataStream(10, seed=3, epoch=s.epoch, offset=s.offset).next(15)
    assert torch.equal(a, s.next(15))
    assert derive_seed(0, "noise", 0) != derive_seed(0, "noise", 1)


@pytest.mark.parametrize("base,grad_accum", [(TINY_IMAGE, 1), (TINY_TOY, 2)])
def test_interrupted_and_resumed_equals_uninterrupted_bit_for_bit(tmp_path, base, grad_accum):
    """Train 10 steps straight; train 6 (checkpoint at 4, 6 is the end), then resume to 10: weights, EMA,
    optimizer moments, RNG states, data position and the loss log must be identical."""
    full = _cfg(base, "train.steps=10", f"train.grad_accum={grad_accum}")
    train(full, tmp_path / "a", progress=False)
    part = _cfg(base, "train.steps=6", f"train.grad_accum={grad_accum}")
    train(part, tmp_path / "b", progress=False)
    train(full, tmp_path / "b", resume=True, progress=False)
    ta, ra = _final_state(tmp_path / "a")
    tb, rb = _final_state(tmp_path / "b")
    assert ra["step"] == rb["step"] == 10
    assert sorted(ta) == sorted(tb)
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k
    assert ra["meta"]["data_position"] == rb["meta"]["data_position"]
    log_a = [json.loads(x)["loss"] for x in (tmp_path / "a" / "log.jsonl").read_text().splitlines()]
    log_b = [json.loads(x)["loss"] for x in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    assert log_a == log_b


def test_resume_after_a_crash_past_the_checkpoint(tmp_path):
    """A crash after checkpoint 4 (log lines written up to 6) resumes from 4 and drops the extra lines."""
    cfg = _cfg(TINY_TOY, "train.steps=8", "train.checkpoint_every=4")
    train(cfg, tmp_path / "a", progress=False)
    trainer = Trainer(_cfg(TINY_TOY, "train.steps=8", "train.checkpoint_every=4"), tmp_path / "b", progress=False)
    for _ in range(4):
        trainer.train_step()
        trainer._log({"step": trainer.step, "loss": 0.0})
    trainer.save()
    for _ in range(2):  # progress after the checkpoint that a crash loses
        trainer.train_step()
        trainer._log({"step": trainer.step, "loss": 123.0})
    trainer.close()  # a crash: the process ends, and with it the run's lock
    resumed = Trainer(cfg, tmp_path / "b", resume=True, progress=False)
    assert resumed.step == 4
    assert all(json.loads(x)["step"] <= 4 for x in (tmp_path / "b" / "log.jsonl").read_text().splitlines())
    resumed.run()
    ta, _ = _final_state(tmp_path / "a")
    tb, _ = _final_state(tmp_path / "b")
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k


def test_non_finite_loss_stops_with_the_step_and_keeps_the_last_checkpoint(tmp_path):
    cfg = _cfg(TINY_TOY, "train.steps=6", "train.checkpoint_every=2")
    trainer = Trainer(cfg, tmp_path, progress=False)
    trainer.run_dir.mkdir(parents=True, exist_ok=True)
    for _ in range(2):
        trainer.train_step()
    trainer.save()
    with torch.no_grad():
        next(trainer.net.parameters()).fill_(float("nan"))
    with pytest.raises(TrainingError, match="step 3"):
        trainer.train_step()
    tensors, record = load_checkpoint(tmp_path)
    assert record["step"] == 2
    assert all(torch.isfinite(v).all() for k, v in tensors.items() if v.dtype.is_floating_point)


def test_fresh_run_refuses_to_overwrite_and_resume_needs_a_checkpoint(tmp_path):
    cfg = _cfg(TINY_TOY, "train.steps=3")
    train(cfg, tmp_path / "run", progress=False)
    with pytest.raises(TrainingError, match="--resume"):
        train(cfg, tmp_path / "run", progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        Trainer(cfg, tmp_path / "empty", resume=True, progress=False)


def test_resume_with_a_missing_piece_is_a_loud_error(tmp_path):
    from safetensors.torch import save

    cfg = _cfg(TINY_TOY, "train.steps=3")
    train(cfg, tmp_path, progress=False)
    tensors, record = load_checkpoint(tmp_path)
    del tensors["rng.noise"]
    stem = tmp_path / "checkpoints" / f"step-{record['step']:08d}"
    import hashlib

    blob = save(tensors)
    stem.with_suffix(".safetensors").write_bytes(blob)
    record.update(sha256=hashlib.sha256(blob).hexdigest(), keys=sorted(tensors))
    record["record_sha256"] = record_hash(record)  # consistent files: the resume checks must find the gap
    stem.with_suffix(".json").write_text(json.dumps(record))
    with pytest.raises(CheckpointError, match="rng.noise"):
        Trainer(_cfg(TINY_TOY, "train.steps=5"), tmp_path, resume=True, progress=False)


def test_a_run_leaves_config_log_pictures_and_summary(tmp_path):
    cfg = _cfg(TINY_IMAGE, "train.steps=4", "train.sample_every=2")
    train(cfg, tmp_path, progress=False)
    for name in ("config.toml", "log.jsonl", "samples.png", "loss_curve.png", "summary.json"):
        assert (tmp_path / name).is_file(), name
    assert (tmp_path / "samples" / "step-00000002.png").is_file()
    assert load_config(tmp_path / "config.toml") == cfg


def test_lr_schedules_warm_up_then_decay_to_zero_at_train_steps():
    """lr_factor against its closed forms: a linear warm-up, then cos or linear decay from 1 to 0."""
    steps, warm = 1000, 100
    for sched in ("constant", "cosine", "linear"):
        assert lr_factor(0, steps, warm, sched) == pytest.approx(1 / warm)
        assert lr_factor(49, steps, warm, sched) == pytest.approx(0.5)
    assert all(lr_factor(s, steps, warm, "constant") == 1.0 for s in (99, 500, 999, 5000))
    mid = warm + (steps - warm) // 2
    assert lr_factor(mid, steps, warm, "cosine") == pytest.approx(0.5)
    assert lr_factor(mid, steps, warm, "linear") == pytest.approx(0.5)
    quarter = warm + (steps - warm) // 4
    assert lr_factor(quarter, steps, warm, "cosine") == pytest.approx(0.5 * (1 + 2 ** -0.5))
    for sched in ("cosine", "linear"):
        assert lr_factor(warm, steps, warm, sched) == 1.0
        assert lr_factor(steps, steps, warm, sched) == 0.0 == lr_factor(2 * steps, steps, warm, sched)
        decay = [lr_factor(s, steps, warm, sched) for s in range(warm, steps)]
        assert all(a > b for a, b in pairwise(decay))
    assert lr_factor(0, 10, 0, "cosine") == 1.0  # no warm-up
    assert lr_factor(5, 10, 50, "linear") == pytest.approx(6 / 50 * 1.0)  # a warm-up longer than the run


def test_the_optimizer_steps_with_the_scheduled_lr(tmp_path):
    cfg = _cfg(TINY_TOY, "train.steps=8", "train.lr_schedule=cosine", "train.lr=0.01")
    trainer = Trainer(cfg, tmp_path, progress=False)
    seen = []
    while trainer.step < 8:
        trainer.train_step()
        seen.append(trainer.optimizer.param_groups[0]["lr"])
    trainer.close()
    assert seen == pytest.approx([0.01 * lr_factor(s, 8, 2, "cosine") for s in range(8)])
    assert seen[1] == pytest.approx(0.01) and seen[-1] < 0.001


def test_a_bad_lr_schedule_names_its_key():
    with pytest.raises(ConfigError, match="train.lr_schedule"):
        _cfg(TINY_TOY, "train.lr_schedule=exponential")
