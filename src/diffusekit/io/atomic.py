"""Atomic writes: a reader sees the old file (or folder) or the whole new one, never a part.

- ``atomic_write_bytes`` / ``atomic_write_text``: one file, through a temporary file in the same folder,
  fsynced and renamed over the target.
- ``OutputFolder``: a folder of outputs (samples, restorations, an evaluation) written into a temporary
  sibling and moved into place whole at the end, so the folder is complete or absent; checked before the
  work starts (an existing file, a folder that is not an output of the same kind, an unwritable place are
  refused with one line), and stale files of an earlier run into the same folder never mix with new ones.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
from pathlib import Path
from typing import Iterable

from diffusekit.errors import ConfigError, OutputError

__all__ = ["atomic_write_bytes", "atomic_write_text", "OutputFolder", "describe_os_error", "process_alive",
           "read_input_file"]

MAX_INPUT_BYTES = 16 * 2**20  # a config or settings file is a few kB


def read_input_file(path: Path | str, what: str, limit: int = MAX_INPUT_BYTES, flag: str = "") -> str:
    """The text of a small input file the user names (a config, a settings.json), read safely: a missing
    file, a folder, a FIFO or device (reading would block), an oversized or non-UTF-8 file are one-line
    ``ConfigError``s naming it (after ``flag``, when the file came from one); a UTF-8 byte-order mark is
    dropped."""
    path = Path(path)
    if flag:
        try:
            return read_input_file(path, what, limit)
        except ConfigError as exc:
            raise ConfigError(f"{flag} {exc}") from None
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise ConfigError(f"{path}: {what} not found") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the {what} ({describe_os_error(exc)})") from None
    if stat.S_ISDIR(st.st_mode):
        raise ConfigError(f"{path}: is a folder, not a {what}")
    if not stat.S_ISREG(st.st_mode):
        raise ConfigError(f"{path}: is not a regular file (a {what} must be one)")
    if st.st_size > limit:
        raise ConfigError(f"{path}: is {st.st_size} bytes, too large for a {what} (at most {limit})")
    try:
        return path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: the {what} is not UTF-8 text") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the {what} ({describe_os_error(exc)})") from None


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
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def describe_os_error(exc: OSError) -> str:
    """A short reason for an OSError and what to do ("No space left on device (free some space or write
    elsewhere)")."""
    reason = os.strerror(exc.errno) if exc.errno else str(exc)
    hints = {errno.ENOSPC: "free some space or write elsewhere", errno.EDQUOT: "free some space or write elsewhere",
             errno.EROFS: "write to another place", errno.EACCES: "check the permissions or write elsewhere",
             errno.EPERM: "check the permissions or write elsewhere", errno.ENAMETOOLONG: "use a shorter name"}
    return reason + (f" ({hints[exc.errno]})" if exc.errno in hints else "")


class OutputFolder:
    """A folder of outputs that appears complete or not at all.

    Creating it checks ``final`` before any work: it must not be an existing file, and an existing folder
    must be empty or hold a file matching ``marker`` (a name or glob, or several: files only this kind of
    output writes, e.g. ``settings.json``);
    the temporary sibling ``.<name>.<pid>.partial`` is made at once, so an unwritable place or a full disk
    fails now, in one line. Write into ``path``; ``commit()`` replaces ``final`` by it (an earlier output
    there is removed whole: no stale file survives), ``discard()`` drops it. As a context manager it
    commits on success and discards on any exception, Ctrl-C included. ``keep`` names files of an earlier
    ``final`` to carry over unless rewritten (an evaluation folder keeps its other results).
    """

    def __init__(self, final: Path | str, marker: str | tuple[str, ...], what: str = "output folder",
                 keep: Iterable[str] = ()):
        self.final, self.what = Path(final), what
        markers = (marker,) if isinstance(marker, str) else tuple(marker)
        if self.final.is_symlink() or self.final.exists() and not self.final.is_dir():
            raise OutputError(f"{self.final}: exists and is not a folder; choose another {what}")
        try:
            ours = not any(self.final.iterdir()) or any(p.is_file() for m in markers for p in self.final.glob(m))
        except FileNotFoundError:
            ours = True
        except OSError as exc:
            raise OutputError(f"{self.final}: cannot read the {what} ({describe_os_error(exc)})") from None
        if not ours:
            raise OutputError(f"{self.final}: is a folder with other files in it, not a diffusekit {what} (no "
                              f"{markers[0]}); choose another or empty it")
        self.path = self.final.with_name(f".{self.final.name}.{os.getpid()}.partial")
        try:
            self.final.parent.mkdir(parents=True, exist_ok=True)
            self._remove_leftovers()
            self.path.mkdir()
            for name in keep:
                old = self.final / name
                if old.is_file() and not old.is_symlink():
                    shutil.copy2(old, self.path / name)
        except OSError as exc:
            shutil.rmtree(self.path, ignore_errors=True)
            raise OutputError(f"{self.final}: cannot write the {what} here ({describe_os_error(exc)})") from None

    def _remove_leftovers(self) -> None:
        """Temporary siblings of ``final`` left by processes that died (only the names this class makes)."""
        prefix = f".{self.final.name}."
        for p in self.final.parent.glob(f".{self.final.name}.*"):
            pid, _, suffix = p.name[len(prefix):].partition(".")
            if suffix in ("partial", "old") and pid.isdigit() and not process_alive(int(pid)) and p.is_dir():
                shutil.rmtree(p, ignore_errors=True)

    def commit(self) -> Path:
        old = self.final.with_name(f".{self.final.name}.{os.getpid()}.old")
        try:
            if self.final.is_dir():
                os.replace(self.final, old)
            os.replace(self.path, self.final)
            _fsync_dir(self.final.parent)
        except OSError as exc:
            raise OutputError(f"{self.final}: cannot move the {self.what} into place "
                              f"({describe_os_error(exc)}); its files are in {self.path}") from None
        shutil.rmtree(old, ignore_errors=True)
        return self.final

    def discard(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)

    def __enter__(self) -> "OutputFolder":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.discard()


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` exists (this process counts)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
