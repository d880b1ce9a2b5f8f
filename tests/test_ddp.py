"""DistributedDataParallel on the CPU with gloo: 2 processes bound to 127.0.0.1.

In-process jobs fork two ranks (fast); one test launches the real thing,
``torchrun --nproc_per_node 2 -m diffusekit train``, and kills a rank.
"""

import json
import multiprocessing as mp
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from diffusekit.config import load_config
from diffusekit.data import load_dataset
from diffusekit.io.checkpoint import load_checkpoint
from diffusekit.train.trainer import DataStream, DistInfo, Trainer, build_objective, derive_seed

pytestmark = [pytest.mark.resilience,
              pytest.mark.skipif("forkserver" not in mp.get_all_start_methods() or not torch.distributed.is_available()
                                 or not torch.distributed.is_gloo_available(), reason="needs a fork server and gloo")]

TOY = ["data.name=moons", "data.n_train=200", "data.n_test=32", "model.kind=mlp", "model.hidden=16",
       "model.depth=1", "diffusion.T=20", "train.batch_size=8", "train.log_every=1", "train.sample_every=0",
       "train.checkpoint_every=5", "train.n_sample=4", "train.warmup_steps=2", "train.device=cpu"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- forked two-rank jobs -------------------------------------------------------------------------
def _grads_job(rank, overrides, run_dir):
    trainer = Trainer(load_config(None, overrides), run_dir, progress=False, dist=DistInfo(rank, 2, rank))
    try:
        trainer.train_step()
        return {n: p.grad.clone() for n, p in trainer.net.named_parameters()}
    finally:
        trainer.close()


def _train_job(rank, overrides, run_dir, resume=False, sigterm_rank1_after=None):
    trainer = Trainer(load_config(None, overrides), run_dir, resume=resume, progress=False,
                      dist=DistInfo(rank, 2, rank))
    if rank == 1 and sigterm_rank1_after:
        step_once = trainer.train_step

        def step_then_signal():
            out = step_once()
            if trainer.step == sigterm_rank1_after:
                os.kill(os.getpid(), signal.SIGTERM)  # only this rank is told to stop
            return out

        trainer.train_step = step_then_signal
    try:
        probe = torch.Generator()
        probe.set_state(trainer.noise_gen.get_state())
        first_noise = torch.randn(8, generator=probe)
        result = trainer.run()
        return {"params": {k: v.clone() for k, v in trainer.net.state_dict().items()},
                "ema": {k: v.clone() for k, v in trainer.ema.shadow.items()}, "noise": first_noise, **result}
    finally:
        trainer.close()


def _to_numpy(value):
    """Tensors cross the pipe as numpy arrays (torch's own pickling would share memory with a process
    that is about to exit)."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy().copy()
    if isinstance(value, dict):
        return {k: _to_numpy(v) for k, v in value.items()}
    return value


def _to_torch(value):
    if isinstance(value, dict):
        return {k: _to_torch(v) for k, v in value.items()}
    return torch.from_numpy(value) if hasattr(value, "dtype") and hasattr(value, "shape") else value


def _entry(job, rank, port, conn, args, timeout_s="60"):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank), DIFFUSEKIT_DIST_TIMEOUT_S=timeout_s)
    try:
        conn.send(("ok", _to_numpy(job(rank, *args))))
    except BaseException as exc:  # report, never hang the parent
        conn.send(("error", f"{type(exc).__name__}: {exc}"))


def _context():
    """A fork server: ranks fork from a clean single-threaded process that imported torch, DDP and
    diffusekit once (forking the test process itself can deadlock on locks held by its threads)."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "torch._dynamo", "torch.nn.parallel", "diffusekit.train.trainer",
                                "diffusekit.data", "sklearn.datasets"])
    return ctx


def run_two_ranks(job, *args, timeout=120):
    ctx = _context()
    port = free_port()
    pipes, procs = [], []
    for rank in range(2):
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_entry, args=(job, rank, port, child, args))
        proc.start()
        pipes.append(parent)
        procs.append(proc)
    results = []
    try:
        for parent in pipes:
            assert parent.poll(timeout), "a rank did not answer in time"
            status, value = parent.recv()
            assert status == "ok", value
            results.append(_to_torch(value))
    finally:
        for proc in procs:
            proc.join(10)
            if proc.is_alive():
                proc.kill()
    return results


def _single_process_grads(overrides):
    """Gradients of one process on the same global batch: both ranks' slices, each with that rank's
    noise stream, in one loss (the mean over all 2 x grad_accum x batch_size examples)."""
    cfg = load_config(None, overrides)
    tc = cfg.train
    data = load_dataset(cfg.data, "train")
    torch.manual_seed(derive_seed(tc.seed, "global", 0))
    objective = build_objective(cfg, data)
    net = objective.module
    stream = DataStream(len(data), derive_seed(tc.seed, "data"))
    gens = [torch.Generator().manual_seed(derive_seed(tc.seed, "noise", r)) for r in range(2)]
    losses = []
    for _ in range(tc.grad_accum):
        idx = stream.next(2 * tc.batch_size)
        for r in range(2):
            x0 = data.x[idx[r * tc.batch_size:(r + 1) * tc.batch_size]]
            losses.append(objective.loss(net, x0, None, gens[r]))
    torch.cat(losses).mean().backward()
    return {n: p.grad for n, p in net.named_parameters()}


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_gradients_after_one_step_equal_one_process_on_the_global_batch(tmp_path, grad_accum):
    overrides = TOY + ["train.grad_clip=0", f"train.grad_accum={grad_accum}"]
    g0, g1 = run_two_ranks(_grads_job, overrides, tmp_path / "run")
    reference = _single_process_grads(overrides)
    for name, ref in reference.items():
        assert torch.equal(g0[name], g1[name]), name  # all-reduced: identical on both ranks
        torch.testing.assert_close(g0[name], ref, rtol=1e-6, atol=1e-6, msg=name)
    assert max(float(g.abs().max()) for g in reference.values()) > 1e-3  # a real gradient, not zeros


def test_twenty_steps_stay_in_lock_step_and_resume_at_world_size_two_is_exact(tmp_path):
    straight = run_two_ranks(_train_job, TOY + ["train.steps=20"], tmp_path / "a")
    for key in ("params", "ema"):
        for name, value in straight[0][key].items():
            assert torch.equal(value, straight[1][key][name]), (key, name)
    assert not torch.equal(straight[0]["noise"], straight[1]["noise"])  # each rank its own noise
    tensors, record = load_checkpoint(tmp_path / "a")
    assert record["meta"]["world_size"] == 2
    assert not torch.equal(tensors["rng.noise"], tensors["rng.noise.rank1"])
    for name, value in straight[0]["params"].items():
        assert torch.equal(tensors[f"model.{name}"], value)

    # SIGTERM reaches rank 1 only, after step 7: both ranks agree to stop after step 8 and checkpoint
    stopped = run_two_ranks(_train_job, TOY + ["train.steps=20"], tmp_path / "b", False, 7)
    assert [r["step"] for r in stopped] == [8, 8] and stopped[1]["stopped"] == "sigterm"
    assert load_checkpoint(tmp_path / "b")[1]["step"] == 8
    resumed = run_two_ranks(_train_job, TOY + ["train.steps=20"], tmp_path / "b", True)
    assert resumed[0]["step"] == 20
    ta, ra = load_checkpoint(tmp_path / "a")
    tb, rb = load_checkpoint(tmp_path / "b")
    assert sorted(ta) == sorted(tb) and ra["meta"]["data_position"] == rb["meta"]["data_position"]
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k

    def log(run):
        return [(r["step"], r["loss"], r["grad_norm"]) for r in
                map(json.loads, (run / "log.jsonl").read_text().splitlines())]

    assert log(tmp_path / "a") == log(tmp_path / "b")


# -- torchrun -------------------------------------------------------------------------------------
def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(x) for x in path.read_text().split()] if path.exists() else []


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="needs /proc to find the workers")
def test_torchrun_trains_and_a_dead_rank_ends_the_job_non_zero_within_60_s(tmp_path):
    torchrun = Path(sys.executable).with_name("torchrun")
    run = tmp_path / "run"
    cmd = [str(torchrun), "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
           "-m", "diffusekit", "train", *[a for o in TOY + ["train.steps=1000000", "train.checkpoint_every=0",
                                                            "train.log_every=20"] for a in ("--set", o)],
           "--out", str(run), "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DIFFUSEKIT_DIST_TIMEOUT_S": "30"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
    try:
        deadline = time.time() + 120
        while not ((run / "log.jsonl").exists() and (run / "log.jsonl").read_text().count("\n") >= 2):
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.time() < deadline, "torchrun did not start training"
            time.sleep(0.2)
        workers = _children(proc.pid)
        assert len(workers) == 2, workers
        records = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
        assert records[0]["images_per_s"] > 0 and records[-1]["step"] % 20 == 0
        killed_at = time.time()
        os.kill(workers[1], signal.SIGKILL)
        proc.wait(90)
        elapsed = time.time() - killed_at
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode != 0
    assert elapsed < 60, elapsed


def _stall_job(rank, overrides, run_dir):
    """Rank 1 freezes (SIGSTOP: alive, sockets open, never answering) after 3 steps."""
    trainer = Trainer(load_config(None, overrides), run_dir, progress=False, dist=DistInfo(rank, 2, rank))
    try:
        for _ in range(3):
            trainer.train_step()
        if rank == 1:
            os.kill(os.getpid(), signal.SIGSTOP)
        t0 = time.time()
        try:
            trainer.train_step()
        except Exception as exc:  # the collective timed out
            return {"error": type(exc).__name__, "waited_s": time.time() - t0}
        return {"error": None}
    finally:
        trainer.model = trainer.net  # leave the group without a clean shutdown: the peer is frozen


def test_a_frozen_rank_is_caught_by_the_collective_timeout(tmp_path):
    ctx = _context()
    port = free_port()
    pipes, procs = [], []
    for rank in range(2):
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_entry, args=(_stall_job, rank, port, child, (TOY, tmp_path / "run"), "4"))
        proc.start()
        pipes.append(parent)
        procs.append(proc)
    try:
        assert pipes[0].poll(60), "rank 0 waited forever for the frozen rank"
        status, value = pipes[0].recv()
        assert status == "ok" and value["error"] is not None and 3 < value["waited_s"] < 30, value
    finally:
        for proc in procs:
            proc.kill()
            proc.join(10)
