"""Same-host fast path to a local engine replica: HTTP over a Unix socket instead of a Serve handle call.

Locally (``pilothouse run``) the gateway reaches an engine replica through a Serve handle
(``engines.handle``): Serve's router, then the replica's gRPC server. One non-streamed call costs
~1.0 ms and ~1.2 ms of CPU at both ends that way, against ~0.15 ms and ~0.15 ms as HTTP over a Unix
socket to a server on the engine replica's own event loop (``bench/handle_hop.py``). On a 2-core
machine that CPU is taken from the engine, and the latency is added to every request.

* The engine replica (``engines.vllm.PilothouseLLMServer``) serves its two handle calls as
  OpenAI-compatible HTTP (``face``) on ``<socket_dir(app)>/<pid>.sock`` (``serve_socket``).
* The gateway (``engines.handle.HandleEngine``) lists that folder (``pick``) and calls a socket
  found there with the HTTP engine (``ExternalEngine``). The handle stays the path whenever no
  socket is there: an engine on another host, a replica still starting, an endpoint naming a
  deployment (``serve://app/deployment``), or ``PILOTHOUSE_ENGINE_SOCKETS=off``. A socket that
  refuses the connection (its replica died) is dropped, and that call goes through the handle.
  Several replicas on this host take turns.
* A replica killed hard leaves its socket file. Its name is its pid: the gateway removes a socket that
  refused it once no process has that pid on this host, and so does a replica of the engine when it
  starts (``sweep``).

What a socket call skips is Serve's router: requests beyond the replica's ``max_ongoing_requests``
wait in vLLM's own scheduler queue instead of the router's (Serve's default queue is unbounded too),
and several replicas take turns instead of being chosen by queue length. Serve's request metrics and
its autoscaler do not see these calls either (``pilothouse_engine_socket_requests_total`` counts them):
local engines run a fixed replica count (``engines.vllm.llm_config``).

The folder is keyed by the Ray cluster (its GCS address) and the application, so two clusters on
one host, or two engines, never share one. It and its parent must be this user's alone (mode 0700; ``private``):
otherwise neither side uses them, and the handle carries the calls.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import itertools
import logging
import os
import stat
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

import aiohttp
from aiohttp import web
from prometheus_client import REGISTRY, CollectorRegistry, Counter

from pilothouse.serving.openai_schema import error_object

from . import PATHS, BackendError
from .external import ExternalEngine, loads

log = logging.getLogger(__name__)
T = TypeVar("T")

ENV = "PILOTHOUSE_ENGINE_SOCKETS"  # a folder for the sockets (this user's, mode 0700), or "off"
RESCAN_S = 5.0  # how stale the gateway's list of an engine's sockets may be
BASE_URL = "http://engine/v1"  # the host is a placeholder: the connection is the socket


def socket_dir(app: str) -> Path | None:
    """The folder of ``app``'s engine sockets on this host; None when the fast path is off or Ray is not running
    (asked on every call: a process may start Ray, or another Ray, after its first one)."""
    base = os.environ.get(ENV, "")
    if base == "off":
        return None
    import ray

    if not ray.is_initialized():
        return None
    return _folder(base, ray.get_runtime_context().gcs_address, app)


@functools.lru_cache(maxsize=256)
def _folder(base: str, cluster: str, app: str) -> Path:
    key = hashlib.sha256(f"{cluster}\0{app}".encode()).hexdigest()[:16]
    return Path(base or Path(tempfile.gettempdir()) / f"pilothouse-engines-{os.getuid()}") / key


def private(folder: Path) -> bool:
    """The folder and its parent are directories of this user's that nobody else may write to. A socket anyone
    could have put there (a shared /tmp: another user renaming the folder and planting one) would be trusted with
    every prompt; the handle is used instead. Raises OSError when the folder is not there."""
    for path in (folder, folder.parent):
        st = path.lstat()  # a symlink is not followed, and fails the directory test
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o022:
            return False
    return True


# -- the engine replica's side ------------------------------------------------------------------------


class Handlers(Protocol):
    """The replica's plain-data calls, as ``engines.handle`` makes them."""

    async def complete(self, path: str, body: Mapping[str, Any]) -> tuple[int, bytes]: ...

    def stream(self, path: str, body: Mapping[str, Any]) -> AsyncIterator[int | bytes]: ...


def _bad_request(message: str) -> web.Response:
    return web.json_response(error_object(message, "BadRequestError", None, "invalid_json"), status=400)


def face(server: Handlers, registry: CollectorRegistry = REGISTRY) -> web.Application:
    """The replica's calls as OpenAI-compatible HTTP: the same answers, status and bytes, as over the handle.
    ``pilothouse_engine_socket_requests_total`` (in the replica's ``/metrics``) says how many came this way."""
    served = Counter("pilothouse_engine_socket_requests", "Gateway calls served on this replica's engine socket.",
                     ["path"], registry=registry)

    async def call(request: web.Request) -> web.StreamResponse:
        path = request.path.removeprefix("/v1")
        served.labels(path).inc()
        try:
            body = loads(await request.read())
        except ValueError as exc:
            return _bad_request(f"the body is not JSON: {exc}")
        if not isinstance(body, dict):
            return _bad_request("the body is not a JSON object")
        if not body.get("stream"):
            status, content = await server.complete(path, body)
            return web.Response(status=status, body=content, content_type="application/json")
        items = server.stream(path, body)
        try:
            status = await anext(items)
            if status != 200:
                return web.Response(status=int(status), body=await anext(items), content_type="application/json")
            response = web.StreamResponse(headers={"content-type": "text/event-stream", "cache-control": "no-cache"})
            await response.prepare(request)
            async for chunk in items:
                await response.write(chunk)  # type: ignore[arg-type]  # after the status, only bytes
            await response.write_eof()
            return response
        finally:  # the gateway left (the handler is cancelled) or the stream ended: stop generating
            await items.aclose()  # type: ignore[attr-defined]

    app = web.Application()
    for path in sorted(PATHS):
        app.router.add_post(f"/v1{path}", call)
    return app


def _dead(path: Path) -> bool:
    """Whether the replica that made the socket ``<pid>.sock`` is gone: no process has that pid on this host. A pid
    taken again since by another process keeps the file (it is refused, and tried again at each rescan)."""
    try:
        pid = int(path.stem)
        if pid <= 0:  # 0 and -1 name process groups, not a process
            return False
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except (ValueError, PermissionError):  # not a replica's name; another user's process
        return False
    return False


def sweep(folder: Path) -> None:
    """Remove the sockets of replicas that died without removing theirs (killed hard)."""
    with contextlib.suppress(OSError):
        for entry in os.scandir(folder):
            if entry.name.endswith(".sock") and _dead(Path(entry.path)):
                Path(entry.path).unlink(missing_ok=True)


@dataclass
class SocketServer:
    """A replica's face on its socket; ``close`` stops it and removes the socket."""

    path: Path
    runner: web.AppRunner

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.runner.cleanup()
        self.path.unlink(missing_ok=True)
        with contextlib.suppress(OSError):  # the engine's last replica on this host: leave no empty folder
            self.path.parent.rmdir()


async def serve_socket(server: Handlers, app: str, registry: CollectorRegistry = REGISTRY) -> SocketServer | None:
    """Serve ``server``'s calls on this replica's socket, on the running loop (the replica's own). None when the
    fast path is off, or the socket could not be made (logged): the gateway then uses the handle, as before."""
    folder = socket_dir(app)
    if folder is None:
        return None
    path = folder / f"{os.getpid()}.sock"
    try:
        folder.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        folder.mkdir(mode=0o700, exist_ok=True)
        if not private(folder):
            raise PermissionError(f"{folder} or its parent is not this user's alone")
        path.unlink(missing_ok=True)  # a dead process's, whose pid this one reuses
        sweep(folder)
        # Cancelling the handler when the gateway drops the connection stops the generation, as a handle call's
        # cancellation does.
        runner = web.AppRunner(face(server, registry), handler_cancellation=True, access_log=None)
        await runner.setup()
        await web.UnixSite(runner, str(path)).start()
    except OSError as exc:
        log.warning("engine %s: no socket for the gateway at %s (%s); it will use the Serve handle", app, path, exc)
        return None
    log.info("engine %s: serving the gateway on %s", app, path)
    return SocketServer(path, runner)


# -- the gateway's side ------------------------------------------------------------------------------


@dataclass
class _Sockets:
    """One engine's sockets on this host, each with its own pooled client; listed again every ``RESCAN_S``, which
    is also when the folder is looked up (the cluster's address, the environment): not on every call."""

    app: str
    clients: dict[Path, aiohttp.ClientSession] = field(default_factory=dict)
    scanned: float = float("-inf")
    turn: itertools.count[int] = field(default_factory=itertools.count)

    def pick(self) -> tuple[Path, aiohttp.ClientSession] | None:
        if time.monotonic() - self.scanned > RESCAN_S:
            self._scan()
        if not self.clients:
            return None
        paths = list(self.clients)
        path = paths[next(self.turn) % len(paths)]
        return path, self.clients[path]

    def _scan(self) -> None:
        self.scanned = time.monotonic()
        folder = socket_dir(self.app)
        try:
            found = {Path(entry.path) for entry in os.scandir(folder) if entry.name.endswith(".sock")} \
                if folder is not None and private(folder) else set()
        except OSError:  # no engine on this host has made the folder
            found = set()
        for path in set(self.clients) - found:
            self.drop(path)
        for path in found - set(self.clients):
            connector = aiohttp.UnixConnector(path=str(path), limit=0)
            self.clients[path] = aiohttp.ClientSession(connector=connector)

    def drop(self, path: Path) -> None:
        client = self.clients.pop(path, None)
        if client is not None:
            closing = asyncio.ensure_future(client.close())
            _closing.add(closing)
            closing.add_done_callback(_closing.discard)


_sockets: dict[tuple[str, asyncio.AbstractEventLoop], _Sockets] = {}
_closing: set[asyncio.Future[None]] = set()


async def call(app: str, model: str, timeout_s: float, send: Callable[[ExternalEngine], Awaitable[T]]) -> T | None:
    """``send`` through a socket of ``app``'s engine on this host, and its result; None when there is none to use,
    or the one tried refused the connection (then dropped): the caller uses the handle. Any other failure is the
    engine's answer and raises, as it would through the handle."""
    loop = asyncio.get_running_loop()
    sockets = _sockets.get((app, loop))
    if sockets is None:  # clients belong to the loop that made them, as handles do (``engines.handle._handle``)
        for key in [k for k in _sockets if k[1].is_closed()]:
            del _sockets[key]
        sockets = _sockets[(app, loop)] = _Sockets(app)
    picked = sockets.pick()
    if picked is None:
        return None
    path, client = picked
    try:
        return await send(ExternalEngine(client, BASE_URL, None, model, timeout_s=timeout_s))
    except BackendError as exc:
        if not isinstance(exc.__cause__, aiohttp.ClientConnectorError):
            raise
        log.info("engine socket %s refused the connection (%s); dropped", path, exc.__cause__)
        sockets.drop(path)
        if _dead(path):  # else a rescan would find it and be refused again
            path.unlink(missing_ok=True)
        return None


async def close_clients() -> None:
    """Close the clients of engine sockets this event loop holds (the gateway's shutdown)."""
    loop = asyncio.get_running_loop()
    for key in [k for k in _sockets if k[1] is loop or k[1].is_closed()]:
        sockets = _sockets.pop(key)
        if key[1] is loop:
            for path in list(sockets.clients):
                sockets.drop(path)
    await asyncio.gather(*_closing, return_exceptions=True)


__all__ = ["ENV", "Handlers", "SocketServer", "call", "close_clients", "face", "serve_socket", "socket_dir", "sweep"]
