"""One job at a time: the page's long work (sampling, restoring, evaluating) runs in a worker thread,
and the page polls its state. A second request while one runs is answered "busy" (``Busy``).

A job's error is one line, as the command line prints it: a ``DiffusekitError``'s message, a file-system
error naming the file, or for anything else its type and message (the traceback goes to the server's
console only with ``--debug``).
"""

from __future__ import annotations

import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from diffusekit.errors import DiffusekitError
from diffusekit.io.atomic import describe_os_error

__all__ = ["Busy", "Job", "JobRunner", "one_line"]


class Busy(DiffusekitError):
    """A job was asked for while another one runs."""


def one_line(exc: BaseException) -> str:
    """The error as the command line would print it: one line, no traceback."""
    if isinstance(exc, DiffusekitError):
        text = str(exc)
    elif isinstance(exc, OSError):
        text = f"{exc.filename if exc.filename is not None else 'a file'}: {describe_os_error(exc)}"
    else:
        text = f"internal error ({type(exc).__name__}: {exc}); run with --debug for the traceback"
    return " ".join(text.split())


@dataclass
class Job:
    """One piece of work: its id, kind ("sample", "restore", ...), state and, when it ends, its result
    (JSON-ready) or its one-line error."""

    id: int
    kind: str
    state: str = "running"  # running | done | error
    started: float = field(default_factory=time.monotonic)
    ended: float | None = None
    result: Any = None
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        seconds = (self.ended if self.ended is not None else time.monotonic()) - self.started
        out: dict[str, Any] = {"id": self.id, "kind": self.kind, "state": self.state, "seconds": round(seconds, 2)}
        if self.state == "done":
            out["result"] = self.result
        if self.state == "error":
            out["error"] = self.error
        return out


class JobRunner:
    """Runs one job at a time in a daemon thread and keeps the jobs' states for polling."""

    def __init__(self, debug: bool = False, keep: int = 100):
        self.debug, self.keep = debug, keep
        self._lock = threading.Lock()
        self._jobs: dict[int, Job] = {}
        self._next = 1

    def reserve(self, kind: str) -> Job:
        """A new job in state "running", or ``Busy`` while another runs; the caller prepares its inputs
        and then ``start``s it (or ``fail``s it)."""
        with self._lock:
            busy = next((j for j in self._jobs.values() if j.state == "running"), None)
            if busy is not None:
                seconds = time.monotonic() - busy.started
                raise Busy(f"busy: the {busy.kind} job is running ({seconds:.0f} s so far); wait for it to finish")
            job = Job(self._next, kind)
            self._next += 1
            self._jobs[job.id] = job
            for old in sorted(self._jobs)[:-self.keep]:
                del self._jobs[old]
            return job

    def start(self, job: Job, work: Callable[[], Any]) -> None:
        """Run ``work()`` for ``job`` in the worker thread; its return value becomes the job's result."""
        threading.Thread(target=self._run, args=(job, work), name=f"diffusekit-app-job-{job.id}", daemon=True).start()

    def fail(self, job: Job, exc: BaseException) -> None:
        """End ``job`` with the one-line error of ``exc``; the console gets the traceback with ``debug``."""
        if self.debug:
            traceback.print_exception(exc)
        job.error, job.ended, job.state = one_line(exc), time.monotonic(), "error"

    def _run(self, job: Job, work: Callable[[], Any]) -> None:
        try:
            job.result = work()
            job.ended, job.state = time.monotonic(), "done"
        except BaseException as exc:  # noqa: BLE001 - any failure ends the job (else the page stays busy)
            self.fail(job, exc)

    def get(self, job_id: int) -> Job | None:
        with self._lock:
            return self._jobs.get(job_id)
