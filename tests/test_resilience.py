"""Faults: crashes while checkpointing, kill-and-resume, SIGTERM, missing pieces, non-finite values.

The fault-injection tests run real subprocesses and kill them (``@pytest.mark.resilience``); the
crash-point enumeration does the same deterministically in-process by failing each file operation
of ``save_checkpoint`` in turn.
"""

import json
import multiprocessing as mp
import os
import random
import signal
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save as st_save

from diffusekit.config import load_config
from diffusekit.errors import CheckpointError, TrainingError
from diffusekit.io import atomic as ck
from diffusekit.io.checkpoint import (
    clean_leftovers,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    record_hash,
    save_checkpoint,
)
from diffusekit.train.trainer import Trainer, train

TOY = ["data.name=moons", "data.n_train=96", "data.n_test=32", "model.kind=mlp", "model.hidden=16",
       "model.depth=1", "model.dropout=0.1", "diffusion.T=20", "train.batch_size=16", "train.log_every=1",
       "train.sample_every=0", "train.checkpoint_every=2", "train.n_sample=4", "train.warmup_steps=2"]


def _cfg(*extra):
    return load_config(None, TOY + list(extra))


def _assert_same_run(a: Path, b: Path):
    """Weights, EMA, optimizer moments, every RNG state, data position and the loss log are equal."""
    ta, ra = load_checkpoint(a)
    tb, rb = load_checkpoint(b)
    assert ra["step"] == rb["step"]
    assert sorted(ta) == sorted(tb)
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k
    for key in ("data_position", "ema_updates"):
        assert ra["meta"][key] == rb["meta"][key], key

    def log(run):
        return [(r["step"], r["loss"], r["grad_norm"], r["lr"]) for r in
                map(json.loads, (run / "log.jsonl").read_text().splitlines())]

    assert log(a) == log(b)


# -- crash points of save_checkpoint, enumerated ------------------------------------------------
class Crash(Exception):
    pass


def _tensors(step):
    return {"w": torch.full((64, 64), float(step)), "step": torch.tensor(step)}


def test_a_crash_at_any_file_operation_leaves_a_loadable_latest(tmp_path, monkeypatch):
    """Fail the n-th write/rename/unlink of save_checkpoint (n = 0, 1, ...) mid-operation, as a kill
    would: latest is always a complete checkpoint (old or new), leftovers are ignored by readers and
    removed by the next save."""
    real_replace, real_unlink = os.replace, Path.unlink
    n = 0
    while True:
        run = tmp_path / f"run{n}"
        for step in (1, 2):
            save_checkpoint(run, step, _tensors(step), {"step": step})
        ops = {"count": 0}

        def maybe_crash():
            ops["count"] += 1
            if ops["count"] == n + 1:
                raise Crash

        def replace(src, dst):
            maybe_crash()  # the temporary file exists, the rename never happens
            real_replace(src, dst)

        def unlink(self, missing_ok=False):
            maybe_crash()
            real_unlink(self, missing_ok=missing_ok)

        monkeypatch.setattr(ck.os, "replace", replace)
        monkeypatch.setattr(Path, "unlink", unlink)
        crashed = False
        try:
            save_checkpoint(run, 3, _tensors(3), {"step": 3})
        except Crash:
            crashed = True
        monkeypatch.setattr(ck.os, "replace", real_replace)
        monkeypatch.setattr(Path, "unlink", real_unlink)
        tensors, record = load_checkpoint(run)
        assert record["step"] in (2, 3) and torch.equal(tensors["w"], _tensors(record["step"])["w"])
        if not crashed:
            break
        save_checkpoint(run, 4, _tensors(4), {"step": 4})  # the next writer cleans up
        assert not list((run / "checkpoints").glob(".*.tmp"))
        assert load_checkpoint(run)[1]["step"] == 4
        assert sorted(p.name for p in (run / "checkpoints").iterdir()) == sorted(
            ["latest.json"] + [f"{name}{s}" for name in list_checkpoints(run) for s in (".json", ".safetensors")])
        n += 1
    assert n >= 5  # tensor file, record, pointer, and pruning both files of the oldest checkpoint


def _checkpoint_forever(run, conn):
    start = load_checkpoint(run)[1]["step"] + 1 if latest_checkpoint(run) else 1
    conn.send("ready")
    for step in range(start, start + 10**6):
        save_checkpoint(run, step, {"w": torch.full((512, 1024), float(step))}, {"step": step})


FORK = pytest.mark.skipif("forkserver" not in mp.get_all_start_methods(), reason="needs a fork server")


def _context():
    """Children fork from a clean single-threaded server that imported torch and diffusekit once
    (forking the test process itself can deadlock on locks its other threads hold)."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "torch._dynamo", "torch.nn.parallel", "diffusekit.train.trainer",
                                "diffusekit.data", "sklearn.datasets"])
    return ctx


@pytest.mark.resilience
@FORK
def test_sigkill_at_random_moments_while_checkpointing(tmp_path):
    """A child process checkpoints 2 MB tensors in a loop; SIGKILL it at random moments, 6 times:
    latest always loads and is self-consistent, and leftovers never confuse the next writer."""
    run = tmp_path / "run"
    rng = random.Random(0)
    last = 0
    ctx = _context()
    for _ in range(6):
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_checkpoint_forever, args=(run, child))
        proc.start()
        assert parent.poll(30) and parent.recv() == "ready"
        time.sleep(rng.uniform(0.02, 0.3))
        os.kill(proc.pid, signal.SIGKILL)
        proc.join(10)
        assert proc.exitcode == -signal.SIGKILL
        if latest_checkpoint(run) is None:
            continue
        tensors, record = load_checkpoint(run)
        assert record["step"] >= last and record["meta"]["step"] == record["step"]
        assert torch.equal(tensors["w"], torch.full((512, 1024), float(record["step"])))
        last = record["step"]
    assert last > 0
    clean_leftovers(run)
    assert not list((run / "checkpoints").glob(".*.tmp"))


# -- kill and resume ------------------------------------------------------------------------------
def _train_announcing(overrides, run, pause, conn, gate_step=None):
    """Train in a child process, sending each finished step number (then the result) to ``conn``;
    after step ``gate_step`` wait until the parent says "go" (so a signal lands exactly there)."""
    step_once = Trainer.train_step

    def announced_step(self):
        out = step_once(self)
        conn.send(self.step)
        if self.step == gate_step:
            assert conn.recv() == "go"
        time.sleep(pause)
        return out

    Trainer.train_step = announced_step
    conn.send(train(load_config(None, overrides), run, progress=False))


def _start(overrides, run, pause=0.02, gate_step=None):
    ctx = _context()
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_train_announcing, args=(overrides, run, pause, child, gate_step))
    proc.start()
    return proc, parent


def _wait_for_step(conn, k):
    while conn.poll(60):
        if conn.recv() == k:
            return
    raise AssertionError(f"no step {k} within 60 s")


@pytest.mark.resilience
@FORK
@pytest.mark.parametrize("grad_accum,seed", [(1, 1), (2, 2)])
def test_sigkill_at_a_random_step_then_resume_is_bit_exact(tmp_path, grad_accum, seed):
    overrides = TOY + ["train.steps=12", f"train.grad_accum={grad_accum}"]
    train(load_config(None, overrides), tmp_path / "straight", progress=False)
    rng = random.Random(seed)
    k = rng.randint(3, 10)
    proc, conn = _start(overrides, tmp_path / "killed")
    _wait_for_step(conn, k)
    time.sleep(rng.uniform(0.0, 0.03))  # anywhere in the next step, checkpoint writes included
    os.kill(proc.pid, signal.SIGKILL)
    proc.join(10)
    resumed_from = load_checkpoint(tmp_path / "killed")[1]["step"]
    assert resumed_from <= k
    train(load_config(None, overrides), tmp_path / "killed", resume=True, progress=False)
    _assert_same_run(tmp_path / "straight", tmp_path / "killed")


@pytest.mark.resilience
@FORK
def test_sigterm_checkpoints_at_the_step_boundary_and_resume_is_exact(tmp_path):
    overrides = TOY + ["train.steps=10", "train.checkpoint_every=4"]
    train(load_config(None, overrides), tmp_path / "straight", progress=False)
    proc, conn = _start(overrides, tmp_path / "stopped", gate_step=5)
    _wait_for_step(conn, 5)
    os.kill(proc.pid, signal.SIGTERM)  # the child waits after step 5 until "go": the signal lands there
    time.sleep(0.2)
    conn.send("go")
    assert conn.poll(60)
    result = conn.recv()
    proc.join(30)
    assert proc.exitcode == 0
    assert result == {**result, "step": 5, "stopped": "sigterm"}
    assert load_checkpoint(tmp_path / "stopped")[1]["step"] == 5  # not a checkpoint_every multiple
    train(load_config(None, overrides), tmp_path / "stopped", resume=True, progress=False)
    _assert_same_run(tmp_path / "straight", tmp_path / "stopped")


# -- missing pieces -------------------------------------------------------------------------------
def _drop(run: Path, tensor_prefix: str | None = None, meta_key: str | None = None):
    tensors, record = load_checkpoint(run)
    if tensor_prefix:
        first = next(k for k in sorted(tensors) if k.startswith(tensor_prefix))
        tensors = {k: v for k, v in tensors.items() if k != first}
    if meta_key:
        del record["meta"][meta_key]
    import hashlib

    blob = st_save(tensors)
    stem = run / "checkpoints" / f"step-{record['step']:08d}"
    stem.with_suffix(".safetensors").write_bytes(blob)
    record.update(sha256=hashlib.sha256(blob).hexdigest(), keys=sorted(tensors))
    record["record_sha256"] = record_hash(record)  # a consistent record: the resume checks must find the gap
    stem.with_suffix(".json").write_text(json.dumps(record))


@pytest.mark.parametrize("tensor_prefix,meta_key,needle", [
    ("rng.torch", None, "rng.torch"), ("rng.noise", None, "rng.noise"), ("ema.", None, "EMA weights"),
    ("model.", None, "model weights"), ("optim.", None, "optim"),
    (None, "data_position", "meta.data_position"), (None, "ema_updates", "meta.ema_updates"),
    (None, "optimizer_state", "meta.optimizer_state"), (None, "param_groups", "meta.param_groups"),
    (None, "world_size", "meta.world_size"),
])
def test_a_missing_piece_is_a_loud_error(tmp_path, tensor_prefix, meta_key, needle):
    train(_cfg("train.steps=2"), tmp_path, progress=False)
    _drop(tmp_path, tensor_prefix, meta_key)
    with pytest.raises(CheckpointError, match=f"step-00000002.*{needle}"):
        Trainer(_cfg("train.steps=4"), tmp_path, resume=True, progress=False)


def test_resuming_with_another_world_size_is_refused(tmp_path):
    train(_cfg("train.steps=2"), tmp_path, progress=False)
    stem = tmp_path / "checkpoints" / "step-00000002.json"
    record = json.loads(stem.read_text())
    record["meta"]["world_size"] = 2
    record["record_sha256"] = record_hash(record)
    stem.write_text(json.dumps(record))
    with pytest.raises(CheckpointError, match="written by 2 processes"):
        Trainer(_cfg("train.steps=4"), tmp_path, resume=True, progress=False)


# -- non-finite values ----------------------------------------------------------------------------
def _all_finite_on_disk(run: Path):
    for name in list_checkpoints(run):
        tensors, _ = load_checkpoint(run / "checkpoints" / name)  # itself refuses NaN/Inf
        assert all(torch.isfinite(v).all() for v in tensors.values() if v.is_floating_point())
    for line in (run / "log.jsonl").read_text().splitlines():
        assert "NaN" not in line and "Infinity" not in line


@pytest.mark.parametrize("what", ["loss", "gradient"])
def test_injected_non_finite_stops_naming_the_step_and_writes_nothing_bad(tmp_path, what):
    trainer = Trainer(_cfg("train.steps=6", "train.checkpoint_every=1"), tmp_path, progress=False)
    loss_fn = trainer.objective.loss

    def poisoned_loss(module, x0, cond, generator):
        loss = loss_fn(module, x0, cond, generator)
        return loss * float("nan") if trainer.step == 3 else loss  # NaN in the 4th step

    if what == "loss":
        trainer.objective.loss = poisoned_loss
    else:  # a finite loss whose gradient is infinite in the 4th step
        next(trainer.net.parameters()).register_hook(lambda g: g * float("inf") if trainer.step == 3 else g)
    with pytest.raises(TrainingError, match=f"step 4: {'loss' if what == 'loss' else 'gradient norm'} is"):
        trainer.run()
    assert load_checkpoint(tmp_path)[1]["step"] == 3
    _all_finite_on_disk(tmp_path)
    assert [json.loads(x)["step"] for x in (tmp_path / "log.jsonl").read_text().splitlines()] == [1, 2, 3]


# -- reproducibility ------------------------------------------------------------------------------
DIGITS = ["data.name=digits", "model.base_channels=8", "model.norm_groups=4", "model.channel_mult=[1,2]",
          "model.attn_resolutions=[4]", "diffusion.T=20", "train.steps=3", "train.batch_size=8",
          "train.sample_every=0", "train.n_sample=2", "train.log_every=1"]


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("digits") / "run"
    train(load_config(None, DIGITS), run, progress=False)
    return run


@pytest.mark.resilience
def test_same_seeds_same_samples_across_processes_and_batch_sizes(digits_run, tmp_path):
    import subprocess
    import sys

    import numpy as np

    from diffusekit.cli import main

    args = ["sample", "--run", str(digits_run), "--seeds", "3-9", "--sampler", "ddpm", "--steps", "5", "--no-progress"]
    assert main(args + ["--batch-size", "7", "--out", str(tmp_path / "here")]) == 0
    proc = subprocess.run([sys.executable, "-m", "diffusekit", *args, "--batch-size", "2", "--out",
                           str(tmp_path / "there")], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    here, there = np.load(tmp_path / "here" / "samples.npz"), np.load(tmp_path / "there" / "samples.npz")
    assert np.array_equal(here["x"], there["x"]) and list(here["seeds"]) == list(range(3, 10))
    settings = json.loads((tmp_path / "there" / "settings.json").read_text())
    assert settings["seeds"] == list(range(3, 10)) and settings["steps"] == 5 and settings["extra"]["step"] == 3


def test_the_bound_is_deterministic_under_a_seed_and_outputs_record_their_settings(digits_run):
    from diffusekit.families.base import EvaluateSettings
    from diffusekit.runs.evaluate import evaluate_run

    def bound(seed):
        settings = EvaluateSettings(metrics=("bpd",), strata=2, seed=seed, variance="beta_tilde")
        result = evaluate_run(digits_run, settings, progress=False)[0].result
        return result, result["bpd"]["bits_per_dim"]

    first, a = bound(5)
    _, b = bound(5)
    _, c = bound(6)
    assert a == b and a != c
    recorded = json.loads((digits_run / "eval" / "metrics.json").read_text())
    assert recorded["seed"] == 6 and recorded["settings"]["n_strata"] == 2
    assert recorded["settings"]["variance"] == "beta_tilde"
    assert load_config(digits_run / "config.toml") == load_config(None, DIGITS)  # training: the full config
    assert json.loads((digits_run / "summary.json").read_text())["seed"] == 0
