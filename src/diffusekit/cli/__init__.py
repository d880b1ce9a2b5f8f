"""The command line: ``diffusekit train | sample | evaluate | restore | tune-grid | demo | app``.

This package is the only code that sees argparse or prints. ``flags`` parses (torch-free); each
command is one module (``train``, ``sample``, ...) whose ``run(args)`` turns the flags into typed
settings, calls the library and prints the result. Errors about the user's input or files
(``DiffusekitError``) are one line and exit status 2; a file-system error (a full disk, a read-only
folder) is one line naming the file and exit status 1; Ctrl-C exits 130; ``--debug`` shows the
traceback instead.
"""

from __future__ import annotations

import importlib
import os
import sys
import warnings
from typing import Sequence

from diffusekit.cli.flags import build_parser
from diffusekit.errors import DiffusekitError
from diffusekit.io.atomic import describe_os_error

__all__ = ["main", "build_parser"]


def _robust_streams() -> None:
    """Text that the terminal's encoding cannot show (an ASCII-only locale and a "±") is escaped, not fatal."""
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure") and stream.encoding and stream.encoding.lower() not in ("utf-8", "utf8"):
            try:
                stream.reconfigure(errors="backslashreplace")
            except (ValueError, OSError):  # a stream that cannot change (closed, detached)
                pass


class _PipeSafe:
    """A text stream whose closed reader (EPIPE: ``diffusekit sample ... 2>&1 | head -1``) sends the rest of
    its text to /dev/null instead of stopping the command: what a command prints is a report on the work,
    and the work (the files it writes) goes on to its end. The stream's file descriptor itself is pointed
    at /dev/null, so the text still buffered in it cannot fail again when Python flushes it at exit."""

    def __init__(self, stream):
        self._stream = stream

    def _to_devnull(self) -> None:
        try:
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, self._stream.fileno())
            os.close(null)
        except (OSError, ValueError, AttributeError):  # no descriptor to redirect (a test's capture stream)
            self._stream = open(os.devnull, "w")  # noqa: SIM115 (it stays open: it is the stream now)

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except BrokenPipeError:
            self._to_devnull()
            return len(text)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except BrokenPipeError:
            self._to_devnull()

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


def _pipe_safe_streams() -> None:
    if not isinstance(sys.stdout, _PipeSafe):
        sys.stdout = _PipeSafe(sys.stdout)
    if not isinstance(sys.stderr, _PipeSafe):
        sys.stderr = _PipeSafe(sys.stderr)


def _os_error(exc: OSError) -> str:
    return f"{exc.filename if exc.filename is not None else 'a file'}: {describe_os_error(exc)}"


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings as one line each (the library warns, for example, about an older checkpoint format)."""
    print(f"diffusekit: warning: {message}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    _robust_streams()
    if argv is None:  # the process's own streams (a caller passing argv keeps its streams as they are)
        _pipe_safe_streams()
    warnings.showwarning = _one_line_warning
    args = build_parser().parse_args(argv)
    try:
        # each command's module is imported when it runs: --help and a bad flag answer without importing torch
        command = importlib.import_module(f"diffusekit.cli.{args.command.replace('-', '_')}")  # tune-grid: tune_grid
        return command.run(args)
    except BrokenPipeError:  # a closed pipe the stream wrappers did not see (another stream): stop quietly
        try:
            sys.stdout = open(os.devnull, "w")
        except OSError:
            pass
        return 0
    except DiffusekitError as exc:
        if args.debug:
            raise
        print(f"diffusekit {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        if args.debug:
            raise
        print(f"diffusekit {args.command}: error: {_os_error(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"diffusekit {args.command}: interrupted", file=sys.stderr)
        return 130
