"""Checkpoints: safetensors for tensors + JSON for everything else, written atomically, loaded warily.

A checkpoint ``step-00001200`` is two files in ``<run>/checkpoints/``:
``step-00001200.safetensors`` (all tensors) and ``step-00001200.json`` (format version, step, the
SHA-256 of the tensor file, the list of tensor keys, any metadata, and ``record_sha256``: the SHA-256 of
all of that, so an edit anywhere in the record, the recorded config included, is refused as damage). The tensor file is written
first, then the JSON, then ``latest.json`` is pointed at it; each write goes to a temporary file in
the same folder, is fsynced and renamed over the target (and the folder fsynced), so a crash at any
moment leaves ``latest.json`` naming a complete checkpoint. Older checkpoints are pruned only after
the pointer moved. Leftovers of interrupted writes (temporary files, a tensor file without its
record) are ignored by readers and removed by the next writer (``clean_leftovers``).

Loading trusts nothing it reads: nothing is ever unpickled (safetensors has no code path to do so);
files must be regular files inside the run (no symlinks, no FIFOs or devices, no names outside the
folder); the record must match its own hash and its types, step and format version are checked; the
tensor file must match the recorded SHA-256 and key list, have a sane header and contain only finite
floating-point values. (A hash detects damage and hand edits; it is not a signature: whoever can write
the run folder can write a whole new checkpoint.) Records of format 1, written before the record hash,
still load, with a warning that their record is not verified; the next checkpoint of a resumed run is
format 2. Every failure is a
``CheckpointError`` whose message starts with the offending file. ``check_state`` compares a state
dict against a module's before anything is copied in, so no partially loaded model escapes.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
import warnings
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import Tensor

from diffusekit.errors import CheckpointError, CheckpointFormatWarning
from diffusekit.io.atomic import atomic_write_bytes, atomic_write_text, process_alive

__all__ = ["FORMAT_VERSION", "save_checkpoint", "load_checkpoint",
           "latest_checkpoint", "list_checkpoints", "clean_leftovers", "check_state", "load_module_state",
           "non_finite_keys"]

FORMAT_VERSION = 2  # 2: the record carries the hash of its own contents (record_sha256)
READABLE_VERSIONS = (1, 2)
_NAME = re.compile(r"^step-(\d{8})$")
_SHA = re.compile(r"^[0-9a-f]{64}$")
MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own limit on the JSON header
MAX_RECORD_BYTES = 64 * 1024 * 1024  # a checkpoint record (config + metadata) is a few kB


def _ckpt_dir(run_dir: Path) -> Path:
    """``<run>/checkpoints``, refused when it is a symlink (writes and cleanup would leave the run)."""
    folder = Path(run_dir) / "checkpoints"
    if folder.is_symlink():
        raise CheckpointError(f"{folder}: is a symlink; the checkpoints folder must be a real folder in the run")
    return folder


def non_finite_keys(tensors: Mapping[str, Tensor]) -> list[str]:
    """Keys of floating-point tensors holding NaN or +-Inf (sorted)."""
    return sorted(k for k, v in tensors.items()
                  if (v.is_floating_point() or v.is_complex()) and not bool(torch.isfinite(v).all()))


# files a run folder's writer makes (their temporary copies ``.<name>.<pid>.tmp`` are leftovers to clean)
RUN_FILES = ("config.toml", "log.jsonl", "summary.json", "summary.txt", "samples.png", "loss_curve.png", "latest.json",
             "bound.jsonl", "bound_curve.png")
_TMP = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.tmp$")


def _our_leftover(p: Path) -> bool:
    """A temporary file ``atomic_write_bytes`` made for a file of the run, by a process that is gone."""
    m = _TMP.match(p.name)
    if m is None or not (p.is_file() or p.is_symlink()) or process_alive(int(m.group("pid"))):
        return False
    name = m.group("name")
    return name in RUN_FILES or re.fullmatch(r"step-\d{8}\.(json|safetensors)", name) is not None


def clean_leftovers(run_dir: Path) -> list[Path]:
    """Remove what interrupted writes of the run leave behind: the temporary copies of the run's own files
    (``.<name>.<pid>.tmp`` of a process that has ended; nothing else, whatever its name) in the run folder
    and its checkpoints folder, and tensor files whose record was never written (or was pruned first).
    Only the process that writes the run may call this (a reader could race the writer)."""
    run_dir = Path(run_dir)
    removed: list[Path] = []
    for folder in (run_dir, _ckpt_dir(run_dir)):
        if folder.is_dir():
            removed += [p for p in folder.glob(".*.tmp") if _our_leftover(p)]
    folder = _ckpt_dir(run_dir)
    if folder.is_dir():
        removed += [p for p in folder.glob("step-*.safetensors")
                    if _NAME.match(p.stem) and not (folder / f"{p.stem}.json").exists()]
    for p in removed:
        p.unlink(missing_ok=True)
    return removed


def save_checkpoint(run_dir: Path, step: int, tensors: dict[str, Tensor], meta: dict[str, Any],
                    keep: int = 2) -> Path:
    """Write checkpoint ``step`` atomically, point latest.json at it and keep the newest ``keep``.

    Refuses (``CheckpointError``, nothing written) tensors holding NaN or Inf: a checkpoint on disk
    is always one training can continue from."""
    if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step < 10**8:
        raise ValueError(f"step must be an integer in [0, 1e8), got {step!r}")
    folder = _ckpt_dir(run_dir)
    name = f"step-{step:08d}"
    bad = non_finite_keys(tensors)
    if bad:
        raise CheckpointError(f"{folder / name}: refusing to write non-finite values in {', '.join(bad[:5])}")
    folder.mkdir(parents=True, exist_ok=True)
    clean_leftovers(run_dir)
    clean = {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}
    blob = st_save(clean, metadata={"format": "pt"})
    atomic_write_bytes(folder / f"{name}.safetensors", blob)
    record = {"format_version": FORMAT_VERSION, "step": step, "sha256": hashlib.sha256(blob).hexdigest(),
              "keys": sorted(clean), "meta": meta}
    record["record_sha256"] = record_hash(record)
    atomic_write_text(folder / f"{name}.json", json.dumps(record, indent=1, sort_keys=True, allow_nan=False))
    atomic_write_text(folder / "latest.json", json.dumps({"name": name, "step": step}))
    if keep > 0:
        others = [n for n in list_checkpoints(run_dir) if n != name]
        for old in others[:max(len(others) - (keep - 1), 0)]:
            for suffix in (".json", ".safetensors"):  # the JSON (the commit marker) goes first
                (folder / f"{old}{suffix}").unlink(missing_ok=True)
    return folder / name


def list_checkpoints(run_dir: Path) -> list[str]:
    """Names of checkpoints with both files present, oldest first (reads only; see clean_leftovers)."""
    folder = _ckpt_dir(run_dir)
    if not folder.is_dir():
        return []
    names = [p.stem for p in folder.glob("step-*.json") if _NAME.match(p.stem)]
    return sorted(n for n in names if (folder / f"{n}.safetensors").exists())


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint ``latest.json`` names (a stem path inside ``<run>/checkpoints``), or the newest
    complete one when there is no pointer; None when the run has no checkpoint at all.

    It does not fall back to an older checkpoint when the named one is damaged: loading it raises,
    naming the file (a damaged checkpoint is news, not something to hide). A pointer that is not
    JSON, is a symlink, or names anything but a ``step-NNNNNNNN`` checkpoint in this folder is a
    ``CheckpointError`` naming latest.json."""
    folder = _ckpt_dir(run_dir)
    pointer = folder / "latest.json"
    if pointer.is_symlink() or pointer.exists():
        _regular_file(pointer, "pointer to the latest checkpoint")
        try:
            text = pointer.read_bytes()[:4096].decode("utf-8")
            name = json.loads(text)["name"]
        except (ValueError, KeyError, TypeError, UnicodeDecodeError, OSError) as exc:
            raise CheckpointError(f"{pointer}: unreadable pointer to the latest checkpoint "
                                  f"({exc.__class__.__name__})") from None
        if not isinstance(name, str) or not _NAME.match(name):
            raise CheckpointError(f"{pointer}: names {name!r}, which is not a checkpoint of this run "
                                  "(expected step-NNNNNNNN in the same folder)")
        return folder / name
    names = list_checkpoints(run_dir)
    return folder / names[-1] if names else None


def _regular_file(p: Path, what: str) -> None:
    """A regular file (not a symlink, FIFO or device: reading those could block or leave the run)."""
    try:
        mode = os.lstat(p).st_mode
    except FileNotFoundError:
        raise CheckpointError(f"{p}: {what} is missing") from None
    except OSError as exc:
        raise CheckpointError(f"{p}: {what} cannot be read ({exc.strerror})") from None
    if stat.S_ISLNK(mode):
        raise CheckpointError(f"{p}: is a symlink; checkpoint files must be regular files in the run folder")
    if not stat.S_ISREG(mode):
        raise CheckpointError(f"{p}: {what} is not a regular file")


def record_hash(record: dict[str, Any]) -> str:
    """SHA-256 of a checkpoint record without its ``record_sha256`` field (canonical JSON: sorted keys,
    no whitespace, NaN refused), as hex."""
    body = {k: v for k, v in record.items() if k != "record_sha256"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False, ensure_ascii=True)
    return hashlib.sha256(text.encode("ascii")).hexdigest()


def _read_record(json_path: Path, expected_step: int | None) -> dict[str, Any]:
    _regular_file(json_path, "checkpoint record")
    if json_path.stat().st_size > MAX_RECORD_BYTES:
        raise CheckpointError(f"{json_path}: checkpoint record is over {MAX_RECORD_BYTES} bytes")
    try:
        record = json.loads(json_path.read_bytes().decode("utf-8"))
        version, step, sha, keys, meta = (record["format_version"], record["step"], record["sha256"],
                                          record["keys"], record["meta"])
    except (ValueError, KeyError, TypeError, UnicodeDecodeError, RecursionError) as exc:
        raise CheckpointError(f"{json_path}: not a diffusekit checkpoint record ({exc.__class__.__name__})") from None
    if version not in READABLE_VERSIONS or isinstance(version, bool):
        raise CheckpointError(f"{json_path}: format version {version!r} is not supported (expected {FORMAT_VERSION})")
    if version >= 2:
        try:
            matches = record.get("record_sha256") == record_hash(record)
        except (TypeError, ValueError):
            matches = False
        if not matches:
            raise CheckpointError(f"{json_path}: the record does not match its hash (edited or damaged); a checkpoint "
                                  "record cannot be changed by hand (to change settings, pass --set to sample or "
                                  "evaluate, or train a new run)")
    else:
        warnings.warn(f"{json_path}: checkpoint format 1 has no hash of its record, so its config is not verified "
                      "(resuming the run writes format 2)", CheckpointFormatWarning, stacklevel=3)
    problems = []
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        problems.append(f"step {step!r} is not a non-negative integer")
    elif expected_step is not None and step != expected_step:
        problems.append(f"step {step} differs from the file name's {expected_step}")
    if not isinstance(sha, str) or not _SHA.match(sha):
        problems.append("sha256 is not a hex digest")
    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys) or len(set(keys)) != len(keys):
        problems.append("keys is not a list of distinct strings")
    if not isinstance(meta, dict):
        problems.append("meta is not a table")
    if problems:
        raise CheckpointError(f"{json_path}: invalid checkpoint record: {'; '.join(problems)}")
    return record


def load_checkpoint(path: Path | str) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Load ``path`` (a checkpoint stem, its .json or its .safetensors, or a run folder) and verify it.

    Returns (tensors, record); raises CheckpointError naming the file for anything wrong: missing
    files, symlinks, bad JSON or field types, unknown format version, hash mismatch (truncated or
    bit-flipped), an oversized or inconsistent header, a file safetensors cannot parse, keys that
    differ from the recorded list, or NaN/Inf values."""
    path = Path(path)
    if path.is_dir():
        latest = latest_checkpoint(path) if (path / "checkpoints").is_dir() else None
        if latest is None:
            raise CheckpointError(f"{path}: no complete checkpoint found")
        path = latest
    stem = path.with_suffix("") if path.suffix in (".json", ".safetensors") else path
    json_path, st_path = stem.with_name(stem.name + ".json"), stem.with_name(stem.name + ".safetensors")
    match = _NAME.match(stem.name)
    record = _read_record(json_path, int(match.group(1)) if match else None)
    _regular_file(st_path, "checkpoint tensor file")
    blob = st_path.read_bytes()
    if hashlib.sha256(blob).hexdigest() != record["sha256"]:
        raise CheckpointError(f"{st_path}: contents do not match the recorded hash (truncated or corrupted)")
    if len(blob) < 8 or int.from_bytes(blob[:8], "little") > min(MAX_HEADER_BYTES, len(blob) - 8):
        raise CheckpointError(f"{st_path}: safetensors header size is invalid")
    try:
        tensors = st_load(blob)
    except (SafetensorError, ValueError, RuntimeError, TypeError, OverflowError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
        raise CheckpointError(f"{st_path}: cannot be read as safetensors ({first})") from None
    if sorted(tensors) != sorted(record["keys"]):
        raise CheckpointError(f"{st_path}: tensor keys differ from the record in {json_path.name}")
    bad = non_finite_keys(tensors)
    if bad:
        raise CheckpointError(f"{st_path}: non-finite values (NaN or Inf) in {', '.join(bad[:5])}")
    return tensors, record


def check_state(expected: Mapping[str, Tensor], state: Mapping[str, Tensor], source: Path | str,
                what: str = "weights", dtypes: bool = True) -> None:
    """Raise ``CheckpointError`` naming ``source`` unless ``state`` has exactly ``expected``'s keys,
    shapes and (when ``dtypes``) dtypes. Checked before anything is copied into a module."""
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    wrong = [f"{k} {tuple(state[k].shape)} {str(state[k].dtype)[6:]} (expected {tuple(v.shape)} "
             f"{str(v.dtype)[6:]})" for k, v in expected.items() if k in state and
             (tuple(state[k].shape) != tuple(v.shape) or (dtypes and state[k].dtype != v.dtype))]
    parts = [f"{label} {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}" for label, keys in
             (("missing", missing), ("unexpected", extra), ("wrong shape or dtype:", wrong)) if keys]
    if parts:
        raise CheckpointError(f"{source}: {what} do not fit the configured network: {'; '.join(parts)}")


def load_module_state(module: torch.nn.Module, state: Mapping[str, Tensor], source: Path | str,
                      what: str = "weights") -> None:
    """``module.load_state_dict(state)`` after ``check_state``: all or nothing, typed errors."""
    check_state(module.state_dict(), state, source, what)
    module.load_state_dict(dict(state), strict=True)
