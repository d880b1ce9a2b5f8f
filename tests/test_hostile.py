"""A hostile but realistic user, cause by cause (docs/guarantees.md states what
is guaranteed): (1) the checkpoint record is covered by its hash; (2) files that are not the run's are
never touched; (3) outputs are complete or absent, checked before the work; (4) every size has a bound
and the memory a setting needs is checked first; (5) files pass the same checks as flags; (6) errors of
the system (full disk, closed pipe, ASCII terminal, FIFOs) are one line. And no non-finite sample is ever
written with exit status 0."""

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from test_cli import TINY as CLI_TINY

from diffusekit.cli import main
from diffusekit.io.checkpoint import latest_checkpoint, load_checkpoint, record_hash

TINY = [*CLI_TINY, "--set", "train.steps=2"]  # the tiny digits run of test_cli, two steps (resumes go further)


def cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def one_line(code, err, *needles, status=2):
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith("diffusekit: warning:")]
    assert code == status and len(lines) == 1 and "Traceback" not in err, (code, err)
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    run = tmp_path_factory.mktemp("hostile") / "run"
    assert main(["train", *TINY, "--out", str(run), "--no-progress"]) == 0
    return run


@pytest.fixture
def run(trained, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(trained, copy)
    return copy


def _rewrite_record(run: Path, edit) -> Path:
    stem = latest_checkpoint(run)
    path = Path(f"{stem}.json")
    record = json.loads(path.read_text())
    edit(record)
    path.write_text(json.dumps(record))
    return path


# -- 1. the record is covered by the hash ------------------------------------------------------------------
def test_an_edited_record_is_refused_by_sample_evaluate_and_resume(run, capsys, tmp_path):
    path = _rewrite_record(run, lambda r: r["meta"]["config"]["diffusion"].update(beta_end=0.5))
    for argv in (["sample", "--run", run, "--out", tmp_path / "s"], ["evaluate", "--run", run],
                 ["train", "--out", run, "--resume"]):
        code, _, err = cli(capsys, *argv, "--no-progress")
        one_line(code, err, path.name, "does not match its hash")
    assert not (tmp_path / "s").exists()


def test_resume_refuses_an_edited_config_toml_outside_train_and_sample(run, capsys):
    text = (run / "config.toml").read_text()
    (run / "config.toml").write_text(text.replace("beta_end = 0.02", "beta_end = 0.5"))
    code, _, err = cli(capsys, "train", "--out", run, "--resume", "--no-progress")
    one_line(code, err, "diffusion.beta_end", "0.5", "0.02")
    (run / "config.toml").write_text(text.replace("steps = 2", "steps = 3"))  # [train] may change
    assert cli(capsys, "train", "--out", run, "--resume", "--no-progress")[0] == 0


# -- 2. files that are not the run's -----------------------------------------------------------------------
def test_train_refuses_a_folder_that_is_not_a_run_and_touches_nothing(tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.toml").write_text("my own config\n")
    (mine / "log.jsonl").write_text("my own log\n")
    (mine / "thesis.tex").write_text("chapter 1\n")
    code, _, err = cli(capsys, "train", *TINY, "--out", mine, "--no-progress")
    one_line(code, err, str(mine), "not a diffusekit run")
    assert (mine / "config.toml").read_text() == "my own config\n" and (mine / "log.jsonl").read_text() == "my own log\n"
    assert sorted(p.name for p in mine.iterdir()) == ["config.toml", "log.jsonl", "thesis.tex"]


def test_cleanup_removes_only_the_runs_own_temporary_files(run, capsys):
    mine = [run / ".notes.txt.tmp", run / ".notes.123.tmp", run / "checkpoints" / ".backup.999999.tmp"]
    for p in mine:
        p.write_text("mine")
    ours = run / f".log.jsonl.{2**22 + 12345}.tmp"  # a temporary copy of the run's log from a dead process
    ours.write_text("leftover")
    assert cli(capsys, "train", "--out", run, "--resume", "--set", "train.steps=3", "--no-progress")[0] == 0
    assert all(p.read_text() == "mine" for p in mine) and not ours.exists()


def test_a_symlinked_checkpoints_folder_is_refused_and_its_target_untouched(run, tmp_path, capsys):
    elsewhere = tmp_path / "elsewhere"
    shutil.move(run / "checkpoints", elsewhere)
    (elsewhere / "keep.txt").write_text("not the run's")
    (run / "checkpoints").symlink_to(elsewhere)
    before = sorted(p.name for p in elsewhere.iterdir())
    for argv in (["train", "--out", run, "--resume"], ["sample", "--run", run, "--out", tmp_path / "s"]):
        code, _, err = cli(capsys, *argv, "--no-progress")
        one_line(code, err, "checkpoints", "symlink")
    assert sorted(p.name for p in elsewhere.iterdir()) == before


def test_a_second_writer_is_refused_naming_the_holder(run, capsys):
    from diffusekit.io.runfolder import RunLock

    lock = RunLock(run)
    try:
        code, _, err = cli(capsys, "train", "--out", run, "--resume", "--set", "train.steps=3", "--no-progress")
        one_line(code, err, f"pid {os.getpid()}", "writing this run")
    finally:
        lock.release()
    assert cli(capsys, "train", "--out", run, "--resume", "--set", "train.steps=3", "--no-progress")[0] == 0


def test_two_processes_on_one_run(run):
    """Really two processes: the second exits 2 with one line, the first finishes, the log is one run's."""
    args = [sys.executable, "-m", "diffusekit", "train", "--out", str(run), "--resume", "--set", "train.steps=400",
            "--set", "train.log_every=1", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        for _ in range(600):  # until the first holds the lock
            lock = run / ".diffusekit-lock"
            if lock.exists() and lock.read_text().strip() == str(first.pid):
                break
            first.poll()
            assert first.returncode is None, first.communicate()
            import time

            time.sleep(0.05)
        second = subprocess.run(args, capture_output=True, text=True, env=env, timeout=120)
        assert second.returncode == 2 and "Traceback" not in second.stderr
        assert f"pid {first.pid}" in second.stderr and len(second.stderr.strip().splitlines()) == 1
    finally:
        first.communicate(timeout=300)
    assert first.returncode == 0
    steps = [json.loads(ln)["step"] for ln in (run / "log.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and len(steps) == len(set(steps))


# -- 3. outputs: checked first, complete or absent ----------------------------------------------------------
def test_output_destinations_are_checked_before_the_work(run, tmp_path, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "holiday.jpg").write_bytes(b"...")
    for out, says in ((a_file, "not a folder"), (foreign, "not a diffusekit sample folder"),
                      (Path("/proc/diffusekit-no/x"), "cannot write")):
        code, _, err = cli(capsys, "sample", "--run", run, "--seeds", "0-1", "--steps", "2", "--out", out,
                           "--no-progress")
        one_line(code, err, str(out), says)
    assert a_file.read_text() == "x" and sorted(p.name for p in foreign.iterdir()) == ["holiday.jpg"]
    (run / "eval").write_text("not a folder")
    code, _, err = cli(capsys, "evaluate", "--run", run, "--metrics", "bpd", "--no-progress")
    one_line(code, err, "eval", "not a folder")


def test_ctrl_c_while_writing_leaves_no_folder(run, tmp_path, capsys, monkeypatch):
    from diffusekit.io import atomic

    real = atomic.atomic_write_bytes
    calls = {"n": 0}

    def interrupted(path, data):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        real(path, data)

    monkeypatch.setattr("diffusekit.runs.sample.atomic_write_bytes", interrupted)
    code, _, err = cli(capsys, "sample", "--run", run, "--seeds", "0-5", "--steps", "2", "--out", tmp_path / "s",
                       "--no-progress")
    assert code == 130 and "interrupted" in err and "Traceback" not in err
    assert not (tmp_path / "s").exists() and not list(tmp_path.glob(".s.*"))


# -- 4. bounds and the memory a setting needs ---------------------------------------------------------------
@pytest.mark.parametrize("argv,needle", [
    (["train", "--set", "train.batch_size=1000000000", "--dry-run"], "train.batch_size"),
    (["train", "--set", "model.base_channels=100000", "--dry-run"], "model.base_channels"),
    (["train", "--set", "data.image_size=100000", "--dry-run"], "data.image_size"),
    (["train", "--set", "diffusion.T=1000000000", "--dry-run"], "diffusion.T"),
    (["sample", "--run", "RUN", "--seeds", "0-100000000"], "--seeds"),
    (["sample", "--run", "RUN", "--sampler", "heun", "--steps", "1000000000"], "--steps"),
    (["sample", "--run", "RUN", "--sampler", "langevin", "--step-size", "1e300"], "--step-size"),
    (["sample", "--run", "RUN", "--guidance", "1e300"], "--guidance"),
    (["sample", "--run", "RUN", "--clip-x0", "1e300"], "--clip-x0"),
    (["sample", "--run", "RUN", "--batch-size", "1000000000"], "--batch-size"),
    (["evaluate", "--run", "RUN", "--n-samples", "100000000"], "--n-samples"),
    (["evaluate", "--run", "RUN", "--strata", "1000000000"], "--strata"),
])
def test_absurd_sizes_are_refused_in_one_line(trained, capsys, tmp_path, argv, needle):
    argv = [str(trained) if a == "RUN" else a for a in argv]
    code, _, err = cli(capsys, *argv, "--out" if argv[0] == "sample" else "--no-progress",
                       *([tmp_path / "s", "--no-progress"] if argv[0] == "sample" else []))
    one_line(code, err, needle)
    assert not (tmp_path / "s").exists()


def test_training_that_cannot_fit_in_memory_is_refused_before_the_first_step(tmp_path, capsys, monkeypatch):
    import diffusekit.budget as budget

    monkeypatch.setattr(budget, "available_bytes", lambda device="cpu": 2**20)  # a machine with 1 MiB free
    code, _, err = cli(capsys, "train", *TINY, "--set", "train.batch_size=4096", "--out", tmp_path / "r",
                       "--no-progress")
    one_line(code, err, "train.batch_size = 4096", "GiB", "free")
    assert not list((tmp_path / "r").glob("checkpoints/step-*"))


def test_a_diffusers_folder_too_large_or_with_wrong_types_is_one_line(tmp_path, capsys):
    pytest.importorskip("diffusers")
    from test_foreign import save_folder

    for key, value, needle in (("block_out_channels", [200000, 200000], "block_out_channels"),
                               ("sample_size", "big", "sample_size"), ("layers_per_block", 1.5, "layers_per_block")):
        folder = tmp_path / key
        save_folder(folder, pipeline=True)
        config_path = folder / "unet" / "config.json"
        config = json.loads(config_path.read_text())
        config[key] = value
        config_path.write_text(json.dumps(config))
        code, _, err = cli(capsys, "sample", "--run", folder, "--seeds", "0", "--out", tmp_path / "s", "--no-progress")
        one_line(code, err, "config.json", needle)
    folder = tmp_path / "T"
    save_folder(folder, pipeline=True)
    sched = folder / "scheduler" / "scheduler_config.json"
    sched.write_text(json.dumps({**json.loads(sched.read_text()), "num_train_timesteps": 10**9}))
    code, _, err = cli(capsys, "sample", "--run", folder, "--seeds", "0", "--out", tmp_path / "s", "--no-progress")
    one_line(code, err, "num_train_timesteps")


# -- 5. files pass the checks flags get (settings.json: tests/test_shell.py) --------------------------------
def test_a_settings_file_with_bad_values_is_refused_naming_it(trained, tmp_path, capsys):
    assert cli(capsys, "sample", "--run", trained, "--seeds", "0-1", "--steps", "2", "--out", tmp_path / "a",
               "--no-progress")[0] == 0
    settings = tmp_path / "a" / "settings.json"
    for key, value in (("steps", 5000), ("steps", True), ("seeds", [1e30]), ("use_ema", "no")):
        bad = tmp_path / "bad.json"
        bad.write_text(json.dumps({**json.loads(settings.read_text()), key: value}))
        code, _, err = cli(capsys, "sample", "--run", trained, "--settings", bad, "--out", tmp_path / "b",
                           "--no-progress")
        one_line(code, err, "--settings", str(bad), key)
    assert not (tmp_path / "b").exists()


# -- 6. errors of the system --------------------------------------------------------------------------------
def test_a_full_disk_is_one_line_naming_the_file(run, tmp_path, capsys, monkeypatch):
    def full(path, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr("diffusekit.runs.sample.atomic_write_bytes", full)
    code, _, err = cli(capsys, "sample", "--run", run, "--seeds", "0-1", "--steps", "2", "--out", tmp_path / "s",
                       "--no-progress")
    one_line(code, err, "No space left on device", "free some space", status=1)
    assert not (tmp_path / "s").exists()


def _run_cli(*argv, env=None, **kw):
    return subprocess.run([sys.executable, "-m", "diffusekit", *map(str, argv)], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}, **kw)


def test_a_pipe_closed_early_and_an_ascii_terminal(trained, tmp_path):
    proc = subprocess.run(f"{sys.executable} -m diffusekit train --dry-run | head -1", shell=True, capture_output=True,
                          text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0 and "Traceback" not in proc.stderr and proc.stdout.strip() == "[data]"
    # the progress bars and the summary go to a reader that has left: the samples are still all written
    closed = tmp_path / "closed"
    proc = subprocess.run(f"{sys.executable} -m diffusekit sample --run {trained} --seeds 0-3 --steps 2 --out {closed} "
                          "2>&1 | head -c 0; exit ${PIPESTATUS[0]}", shell=True, executable="/bin/bash",
                          capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0 and (closed / "samples.npz").is_file() and (closed / "settings.json").is_file()
    out = tmp_path / "sämples"  # a non-ASCII path, printed to an ASCII-only terminal
    proc = _run_cli("sample", "--run", trained, "--seeds", "0", "--steps", "2", "--out", out, "--no-progress",
                    env={"PYTHONIOENCODING": "ascii", "LC_ALL": "C", "LANG": "C"})
    assert proc.returncode == 0 and "Traceback" not in proc.stderr and (out / "samples.npz").is_file()


def test_reading_a_run_never_blocks_on_a_fifo(run, tmp_path):
    pointer = run / "checkpoints" / "latest.json"
    pointer.unlink()
    os.mkfifo(pointer)
    proc = _run_cli("sample", "--run", run, "--seeds", "0", "--out", tmp_path / "s", "--no-progress", timeout=120)
    assert proc.returncode == 2 and "latest.json" in proc.stderr and "not a regular file" in proc.stderr
    settings = tmp_path / "fifo.json"
    os.mkfifo(settings)
    proc = _run_cli("sample", "--run", tmp_path / "nope", "--settings", settings, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr


def test_a_damaged_log_at_resume_is_skipped_not_a_traceback(run, capsys):
    with open(run / "log.jsonl", "ab") as f:
        f.write(b"\xff\xfe{\"step\": \x00 broken\n")
    assert cli(capsys, "train", "--out", run, "--resume", "--set", "train.steps=3", "--no-progress")[0] == 0
    steps = [json.loads(ln)["step"] for ln in (run / "log.jsonl").read_text().splitlines()]
    assert steps[-1] == 3


# -- non-finite samples, and the smaller probes --------------------------------------------------------------
def test_no_non_finite_sample_is_written(run, tmp_path, capsys):
    tensors, record = load_checkpoint(run)
    tensors = {k: (v * 1e30 if k.startswith("ema.") and v.is_floating_point() and v.ndim > 1 else v)
               for k, v in tensors.items()}
    import hashlib

    from safetensors.torch import save as st_save

    blob = st_save(tensors)
    stem = latest_checkpoint(run)
    Path(f"{stem}.safetensors").write_bytes(blob)
    record["sha256"] = hashlib.sha256(blob).hexdigest()
    record["record_sha256"] = record_hash(record)
    Path(f"{stem}.json").write_text(json.dumps(record))
    code, _, err = cli(capsys, "sample", "--run", run, "--seeds", "0-3", "--steps", "3", "--out", tmp_path / "s",
                       "--no-progress")
    one_line(code, err, "not finite", "nothing was written")
    assert not (tmp_path / "s").exists()


def test_a_diverging_run_without_a_checkpoint_says_so(tmp_path, capsys):
    code, _, err = cli(capsys, "train", *TINY, "--set", "train.lr=1e9", "--set", "train.steps=50", "--set",
                       "train.warmup_steps=0", "--set", "train.grad_clip=0", "--out", tmp_path / "r", "--no-progress")
    one_line(code, err, "before any checkpoint")  # and not "the last good checkpoint is kept": there is none


def test_one_noise_level_refuses_the_continuous_samplers(tmp_path, capsys):
    code, _, err = cli(capsys, "train", "--set", "diffusion.T=1", "--set", "sample.sampler=heun", "--dry-run")
    one_line(code, err, "sample.sampler", "diffusion.T >= 2")


def test_a_folder_dataset_that_changed_is_refused_at_resume(tmp_path, capsys):
    from PIL import Image

    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(12):
        Image.fromarray((rng.random((16, 16)) * 255).astype(np.uint8)).save(folder / f"{i}.png")
    flags = [*TINY, "--set", "data.name=folder", "--set", f"data.path={folder}", "--set", "data.image_size=16",
             "--set", "model.attn_resolutions=[8]"]
    assert cli(capsys, "train", *flags, "--out", tmp_path / "r", "--no-progress")[0] == 0
    Image.fromarray((rng.random((16, 16)) * 255).astype(np.uint8)).save(folder / "new.png")
    code, _, err = cli(capsys, "train", *flags, "--set", "train.steps=3", "--out", tmp_path / "r", "--resume",
                       "--no-progress")
    one_line(code, err, "training data changed")


def test_a_config_with_a_byte_order_mark_loads(tmp_path, capsys):
    path = tmp_path / "bom.toml"
    path.write_bytes(b"\xef\xbb\xbf[train]\nsteps = 7\n")
    code, out, _ = cli(capsys, "train", "--config", path, "--dry-run")
    assert code == 0 and "steps = 7" in out
    fifo = tmp_path / "fifo.toml"
    os.mkfifo(fifo)
    code, _, err = cli(capsys, "train", "--config", fifo, "--dry-run")
    one_line(code, err, "not a regular file")


def test_torch_is_not_needed_for_help_and_bad_flags():
    code = "import sys; from diffusekit.cli import main\ntry:\n    main(['sample', '--run', 'x', '--bogus'])\nexcept SystemExit:\n    pass\n" \
           "print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip() == "False" and "--bogus" in out.stderr
    assert torch.__version__  # (the suite itself uses torch)
