"""The page's HTTP side: Starlette routes over an ``actions.AppRun`` and a ``jobs.JobRunner``, served by
uvicorn on a socket bound to 127.0.0.1 by default (needs the ``app`` extra).

Routes: ``/`` and ``/static/*`` (the page, from package data), ``GET /api/run`` (what the run offers),
``POST /api/{sample,trajectory,restore,evaluate}`` (starts a job: 202 with its id, 409 "busy" while one
runs, 400 with one line for bad input), ``GET /api/job/{id}`` (its state, for polling), ``GET
/api/report`` (the run's ``eval/report.md``), ``GET /api/test-image/{i}`` and ``GET /files/{key}/{name}``
(the outputs of a job, or the run's ``eval/`` pictures; nothing else on disk).

Safety: only JSON bodies of at most ``MAX_REQUEST_BYTES`` are read; a ``Host`` header naming neither a
loopback name nor the bound address (DNS rebinding) and a cross-origin ``Origin`` are refused; pages get a
Content-Security-Policy that allows this server only.
"""

from __future__ import annotations

import json
import socket
import sys
import traceback
from importlib import resources
from typing import Any
from urllib.parse import urlparse

import uvicorn
from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from diffusekit.app.actions import AppRun
from diffusekit.app.jobs import Busy, JobRunner, one_line
from diffusekit.errors import ConfigError, DiffusekitError

__all__ = ["LOOPBACK_HOSTS", "MAX_REQUEST_BYTES", "bind", "create_app", "serve"]

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
MAX_REQUEST_BYTES = 24 * 2**20  # a request body (JSON with base64 uploads)
ACTIONS = ("sample", "trajectory", "restore", "evaluate")
STATIC = {"index.html": "text/html; charset=utf-8", "app.js": "text/javascript; charset=utf-8",
          "app.css": "text/css; charset=utf-8"}
HEADERS = {"Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:; object-src 'none'; "
                                      "base-uri 'none'; frame-ancestors 'none'",
           "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer", "Cache-Control": "no-store"}


class _Refused(Exception):
    """A request answered with ``status`` and one line."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=HEADERS)


def host_name(header: str) -> str:
    """The host of a Host header without its port: "127.0.0.1:8765" -> "127.0.0.1", "[::1]:80" -> "::1"."""
    if header.startswith("["):
        return header[1:].split("]", 1)[0]
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


class _AllowedHosts:
    """Refuse (400, one line) a request whose Host header names a host other than ``allowed`` ("*": any), so
    that a web page elsewhere cannot reach this server through a name it controls (DNS rebinding)."""

    def __init__(self, app: ASGIApp, allowed: tuple[str, ...]):
        self.app, self.allowed = app, allowed

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and "*" not in self.allowed:
            header = Headers(scope=scope).get("host", "")
            if host_name(header) not in self.allowed:
                await _error(400, f"host {header!r} refused: this server answers {', '.join(self.allowed)} only")(
                    scope, receive, send)
                return
        await self.app(scope, receive, send)


async def _json_body(request: Request) -> dict[str, Any]:
    """The request's JSON object, read up to ``MAX_REQUEST_BYTES``; ``_Refused`` otherwise."""
    if request.headers.get("content-type", "").split(";")[0].strip().lower() != "application/json":
        raise _Refused(415, "send the request as JSON (Content-Type: application/json)")
    limit = f"the {MAX_REQUEST_BYTES // 2**20} MiB limit of a request"
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > MAX_REQUEST_BYTES:
        raise _Refused(413, f"upload too large: the request is {int(length) / 2**20:.1f} MiB, over {limit}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_REQUEST_BYTES:
            raise _Refused(413, f"upload too large: the request is over {limit}")
        chunks.append(chunk)
    try:
        body = json.loads(b"".join(chunks) or b"{}")
    except ValueError:
        raise _Refused(400, "the request is not valid JSON") from None
    if not isinstance(body, dict):
        raise _Refused(400, "the request must be a JSON object")
    return body


def _same_origin(request: Request) -> bool:
    """No Origin header (same-origin GETs, scripts) or one naming this very host."""
    origin = request.headers.get("origin")
    return origin is None or urlparse(origin).netloc == request.headers.get("host", "")


class _OneLineErrors:
    """Outermost: an unexpected error in a route has already been answered (500, one line, by the
    exception handler); here it is reported on the console as one line, or as a traceback with ``debug``,
    instead of reaching uvicorn, which would print the traceback."""

    def __init__(self, app: ASGIApp, debug: bool):
        self.app, self.debug = app, debug

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await self.app(scope, receive, send)
        except Exception as exc:  # noqa: BLE001 - the page got its one line; the console gets this one
            if self.debug:
                traceback.print_exception(exc)
            else:
                print(f"diffusekit app: error: {one_line(exc)}", file=sys.stderr)


def create_app(state: AppRun, jobs: JobRunner | None = None,
               allowed_hosts: tuple[str, ...] | list[str] = LOOPBACK_HOSTS) -> ASGIApp:
    """The ASGI application of the page over ``state`` (one job at a time through ``jobs``; tracebacks on
    the console only with ``jobs.debug``). The endpoints that read files or data are plain functions,
    which Starlette runs in its thread pool."""
    jobs = jobs or JobRunner()
    static = resources.files("diffusekit.app") / "static"

    def page(request: Request) -> Response:
        name = request.path_params.get("name", "index.html")
        if name not in STATIC:
            return _error(404, f"no such page: {name}")
        return Response((static / name).read_bytes(), media_type=STATIC[name], headers=HEADERS)

    def run_info(request: Request) -> Response:
        return JSONResponse(state.describe(), headers=HEADERS)

    async def action(request: Request) -> Response:
        kind = request.path_params["action"]
        if kind not in ACTIONS:
            return _error(404, f"no such action: {kind}")
        if not _same_origin(request):
            return _error(403, "cross-origin request refused")
        try:
            body = await _json_body(request)
            job = jobs.reserve(kind)
        except _Refused as exc:
            return _error(exc.status, str(exc))
        except Busy as exc:
            return _error(409, str(exc))
        try:
            work = getattr(state, kind)(body, job.id)  # checks the settings now; the work runs in the job
        except Exception as exc:  # noqa: BLE001 - one line for the page, like the command line's
            jobs.fail(job, exc)
            return _error(400, one_line(exc))
        jobs.start(job, work)
        return JSONResponse({"job": job.id}, status_code=202, headers=HEADERS)

    def job_state(request: Request) -> Response:
        job = jobs.get(request.path_params["job"])
        if job is None:
            return _error(404, f"no such job: {request.path_params['job']}")
        return JSONResponse(job.to_dict(), headers=HEADERS)

    def report(request: Request) -> Response:
        return JSONResponse(state.report(), headers=HEADERS)

    def test_image(request: Request) -> Response:
        try:
            return Response(state.test_image(request.path_params["index"]), media_type="image/png", headers=HEADERS)
        except DiffusekitError as exc:
            return _error(404, str(exc))

    def files(request: Request) -> Response:
        try:
            path = state.file(request.path_params["key"], request.path_params["name"])
        except ConfigError as exc:
            return _error(404, str(exc))
        media = "text/markdown; charset=utf-8" if path.suffix == ".md" else None
        return FileResponse(path, media_type=media, headers=HEADERS)

    routes = [
        Route("/", page), Route("/static/{name}", page),
        Route("/api/run", run_info), Route("/api/report", report),
        Route("/api/job/{job:int}", job_state), Route("/api/test-image/{index:int}", test_image),
        Route("/api/{action}", action, methods=["POST"]),
        Route("/files/{key}/{name:path}", files),
    ]
    def internal(request: Request, exc: Exception) -> Response:
        return _error(500, one_line(exc))

    app = Starlette(routes=routes, middleware=[Middleware(_AllowedHosts, allowed=tuple(allowed_hosts))],
                    exception_handlers={Exception: internal})
    return _OneLineErrors(app, jobs.debug)


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on (host, port) (port 0: any free one); a one-line ConfigError naming the flag
    when it cannot be bound (in use, not an address of this machine)."""
    if not 0 <= port <= 65535:
        raise ConfigError(f"--port must be in 0..65535, got {port}")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise ConfigError(f"--host {host}: not an address of this machine ({exc.strerror})") from None
    family, _, _, _, address = min(infos, key=lambda info: info[0] != socket.AF_INET)  # IPv4 first
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(64)
    except OSError as exc:
        sock.close()
        raise ConfigError(f"--port {port}: cannot listen on {host}:{port} ({exc.strerror}); pick another --port "
                          "(0 = any free one)") from None
    return sock


def serve(state: AppRun, sock: socket.socket, debug: bool = False) -> None:
    """Serve the page over ``state`` on ``sock`` until Ctrl-C (or SIGTERM)."""
    host = sock.getsockname()[0]
    allowed = ("*",) if host in ("0.0.0.0", "::") else tuple(dict.fromkeys((*LOOPBACK_HOSTS, host)))
    app = create_app(state, JobRunner(debug=debug), allowed_hosts=allowed)
    config = uvicorn.Config(app, log_level="info" if debug else "warning", access_log=debug, lifespan="off")
    uvicorn.Server(config).run(sockets=[sock])
