"""Checkpoints: safetensors for tensors + JSON for everything else, written atomically.

A checkpoint ``step-00001200`` is two files in ``<run>/checkpoints/``:
``step-00001200.safetensors`` (all tensors) and ``step-00001200.json`` (format version, step, the
SHA-256 of the tensor file, the list of tensor keys and any metadata). The tensor file is written
first, then the JSON, then ``latest.json`` is pointed at it; each write goes to a temporary file in
the same folder, is fsynced and renamed over the target, so a crash at any moment leaves either the
old or the new checkpoint complete. Loading verifies the hash and key list before returning anything,
and nothing is ever unpickled.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import Tensor

from diffusekit.errors import CheckpointError

__all__ = ["FORMAT_VERSION", "atomic_write_bytes", "atomic_write_text", "save_checkpoint", "load_checkpoint",
           "latest_checkpoint", "list_checkpoints"]

FORMAT_VERSION = 1
_NAME = re.compile(r"^step-(\d{8})$")
MAX_HEADER_BYTES = 100 * 1024 * 1024


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the whole new one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def _ckpt_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def save_checkpoint(run_dir: Path, step: int, tensors: dict[str, Tensor], meta: dict[str, Any],
                    keep: int = 2) -> Path:
    """Write checkpoint ``step`` atomically, point latest.json at it and keep the newest ``keep``."""
    folder = _ckpt_dir(run_dir)
    folder.mkdir(parents=True, exist_ok=True)
    name = f"step-{step:08d}"
    clean = {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}
    blob = st_save(clean, metadata={"format": "pt"})
    atomic_write_bytes(folder / f"{name}.safetensors", blob)
    record = {"format_version": FORMAT_VERSION, "step": step, "sha256": hashlib.sha256(blob).hexdigest(),
              "keys": sorted(clean), "meta": meta}
    atomic_write_text(folder / f"{name}.json", json.dumps(record, indent=1, sort_keys=True))
    atomic_write_text(folder / "latest.json", json.dumps({"name": name, "step": step}))
    for old in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
        for suffix in (".json", ".safetensors"):  # the JSON (the commit marker) goes first
            (folder / f"{old}{suffix}").unlink(missing_ok=True)
    return folder / name


def list_checkpoints(run_dir: Path) -> list[str]:
    """Names of complete-looking checkpoints (both files present), oldest first; removes leftovers
    of interrupted writes (temporary files)."""
    folder = _ckpt_dir(run_dir)
    if not folder.is_dir():
        return []
    for tmp in folder.glob(".*.tmp"):
        tmp.unlink(missing_ok=True)
    names = [p.stem for p in folder.glob("step-*.json") if _NAME.match(p.stem)]
    return sorted(n for n in names if (folder / f"{n}.safetensors").exists())


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest checkpoint that loads cleanly (latest.json first, then older ones), or None."""
    folder = _ckpt_dir(run_dir)
    names = list_checkpoints(run_dir)
    pointer = folder / "latest.json"
    if pointer.exists():
        try:
            preferred = json.loads(pointer.read_text())["name"]
            if preferred in names:
                names.remove(preferred)
                names.append(preferred)
        except (ValueError, KeyError, TypeError):
            pass
    for name in reversed(names):
        try:
            load_checkpoint(folder / name)
            return folder / name
        except CheckpointError:
            continue
    return None


def load_checkpoint(path: Path | str) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Load ``path`` (a checkpoint stem, its .json or its .safetensors, or a run folder) and verify it.

    Returns (tensors, record); raises CheckpointError naming the file for anything wrong: missing
    files, bad JSON, unknown format version, hash mismatch (truncated or bit-flipped), a tensor file
    safetensors cannot parse, or keys that differ from the recorded list."""
    path = Path(path)
    if path.is_dir():
        latest = latest_checkpoint(path) if (path / "checkpoints").is_dir() else None
        if latest is None:
            raise CheckpointError(f"{path}: no complete checkpoint found")
        path = latest
    stem = path.with_suffix("") if path.suffix in (".json", ".safetensors") else path
    json_path, st_path = stem.with_suffix(".json"), stem.with_suffix(".safetensors")
    for p in (json_path, st_path):
        if not p.is_file():
            raise CheckpointError(f"{p}: checkpoint file is missing")
    try:
        record = json.loads(json_path.read_text(encoding="utf-8"))
        version, sha, keys = record["format_version"], record["sha256"], record["keys"]
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{json_path}: not a diffusekit checkpoint record ({exc.__class__.__name__})") from None
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{json_path}: format version {version!r} is not supported (expected {FORMAT_VERSION})")
    blob = st_path.read_bytes()
    if hashlib.sha256(blob).hexdigest() != sha:
        raise CheckpointError(f"{st_path}: contents do not match the recorded hash (truncated or corrupted)")
    if len(blob) < 8 or int.from_bytes(blob[:8], "little") > min(MAX_HEADER_BYTES, len(blob) - 8):
        raise CheckpointError(f"{st_path}: safetensors header size is invalid")
    try:
        tensors = st_load(blob)
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{st_path}: cannot be read as safetensors ({exc})") from None
    if sorted(tensors) != sorted(keys):
        raise CheckpointError(f"{st_path}: tensor keys differ from the record in {json_path.name}")
    return tensors, record
