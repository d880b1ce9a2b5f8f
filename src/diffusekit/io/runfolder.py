"""Run folders written by ``diffusekit train``: what one holds, read once (``read_run_checkpoint``: its
newest complete checkpoint, the verified tensors, the recorded config and the data facts every model
family needs), and how a writer claims one (``claim_run_folder``: the folder is a run or empty, nothing in
it is a symlink the writer would follow, and one process at a time holds its lock)."""

from __future__ import annotations

import fcntl
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from diffusekit.config import Config, config_from_dict
from diffusekit.errors import CheckpointError, ConfigError, TrainingError
from diffusekit.io.atomic import process_alive
from diffusekit.io.checkpoint import RUN_FILES, latest_checkpoint, list_checkpoints, load_checkpoint

__all__ = ["RunCheckpoint", "read_run_checkpoint", "is_run_folder", "claim_run_folder", "RunLock", "MARKER", "LOCK"]

MARKER = ".diffusekit-run"  # written into every run folder a trainer claims
LOCK = ".diffusekit-lock"  # locked (flock) by the one process writing the run; holds its pid
RUN_FOLDERS = ("checkpoints", "samples", "eval")  # and the output folders of sample and restore


@dataclass
class RunCheckpoint:
    """The newest complete checkpoint of a run folder, its record parsed (``read_run_checkpoint``)."""

    run_dir: Path
    path: Path  # checkpoint stem: path.json is the record, path.safetensors the tensors
    tensors: dict[str, torch.Tensor]
    record: dict
    cfg: Config  # the recorded config
    data_shape: tuple[int, ...]
    levels: int | None
    num_classes: int
    step: int

    @property
    def kind(self) -> str:
        """The recorded ``model.kind``."""
        return self.cfg.model.kind

    def weights(self, use_ema: bool = True) -> tuple[dict[str, torch.Tensor], str, str]:
        """(state dict of the EMA or raw weights, the file they come from, what they are) for
        ``check_state`` / ``load_module_state``."""
        prefix = "ema." if use_ema else "model."
        state = {k[len(prefix):]: v for k, v in self.tensors.items() if k.startswith(prefix)}
        return state, f"{self.path}.safetensors", f"{prefix[:-1]} weights"


def read_run_checkpoint(run_dir: Path | str) -> RunCheckpoint:
    """Load, verify and parse the newest complete checkpoint of ``run_dir``, for every model family; a
    missing folder or checkpoint, or a record without its config or data description, is a one-line
    ``CheckpointError`` naming the file."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CheckpointError(f"{run_dir}: run folder does not exist")
    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        raise CheckpointError(f"{run_dir}: no complete checkpoint found in {run_dir / 'checkpoints'}")
    tensors, record = load_checkpoint(ckpt)
    try:
        meta = record["meta"]
        cfg = config_from_dict(meta["config"])
        data = meta["data"]
        data_shape = tuple(int(s) for s in data["shape"])
        levels, num_classes = data["levels"], data["num_classes"]
    except ConfigError as exc:  # before ValueError, which it is
        raise CheckpointError(f"{ckpt}.json: recorded config is invalid ({exc})") from None
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{ckpt}.json: metadata lacks {exc}") from None
    if not (levels is None or (isinstance(levels, int) and levels >= 2)) or not isinstance(num_classes, int):
        raise CheckpointError(f"{ckpt}.json: meta.data has levels {levels!r} and num_classes {num_classes!r}")
    return RunCheckpoint(run_dir, ckpt, tensors, record, cfg, data_shape, levels, num_classes, int(record["step"]))


def is_run_folder(path: Path) -> bool:
    """Whether ``path`` is a run folder: it has the marker, a checkpoint, or only files a run writes."""
    path = Path(path)
    if (path / MARKER).is_file() or list_checkpoints(path) or (path / "checkpoints" / "latest.json").is_file():
        return True
    names = [p.name for p in path.iterdir()]
    ours = set(RUN_FILES) | set(RUN_FOLDERS) | {LOCK}
    return bool(names) and all(n in ours or n.startswith((".", "samples-", "restore-")) for n in names)


def _no_symlinks(run_dir: Path) -> None:
    for name in ("checkpoints", "log.jsonl", "bound.jsonl", "samples", MARKER, LOCK):
        if (run_dir / name).is_symlink():
            raise TrainingError(f"{run_dir / name}: is a symlink; a run folder's own files and folders must be real "
                                "(a writer would follow it out of the run)")


class RunLock:
    """The lock of a run folder: an exclusive ``flock`` on ``<run>/.diffusekit-lock`` for as long as the
    process writes the run; a second writer gets a one-line ``TrainingError`` naming the holder. The
    operating system releases it when the process ends, however it ends."""

    def __init__(self, run_dir: Path):
        self.path, self.fd = Path(run_dir) / LOCK, None
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "?"
            os.close(fd)
            alive = holder.isdigit() and process_alive(int(holder))
            raise TrainingError(f"{run_dir}: another diffusekit process (pid {holder}{'' if alive else '?'}) is "
                                "writing this run; wait for it to end or choose another --out") from None
        self.fd = fd
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor releases the flock
            self.fd = None

    def __del__(self) -> None:  # a trainer dropped without close() still lets go of its run
        self.release()


def claim_run_folder(run_dir: Path, resume: bool) -> RunLock:
    """Make ``run_dir`` this process's run: refuse a folder with files that are not a run's (a fresh run
    never overwrites a user's ``config.toml`` or ``log.jsonl``), symlinks among the run's own names, and
    a run another process is writing; then mark it and hold its lock (``RunLock.release`` at the end)."""
    run_dir = Path(run_dir)
    if run_dir.is_symlink() or run_dir.exists() and not run_dir.is_dir():
        raise TrainingError(f"{run_dir}: --out must be a folder (it is {'a symlink' if run_dir.is_symlink() else 'a file'})")
    if run_dir.is_dir() and any(run_dir.iterdir()) and not is_run_folder(run_dir):
        raise TrainingError(f"{run_dir}: is a folder with other files in it, not a diffusekit run; choose another "
                            "--out (or an empty folder)")
    run_dir.mkdir(parents=True, exist_ok=True)
    _no_symlinks(run_dir)
    lock = RunLock(run_dir)
    try:
        marker = run_dir / MARKER
        if not marker.is_file():
            marker.write_text(json.dumps({"what": "a diffusekit run folder", "created_by_pid": os.getpid()}) + "\n")
    except BaseException:
        lock.release()
        raise
    return lock
