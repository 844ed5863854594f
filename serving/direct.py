"""The gateway's own HTTP server inside its Serve replica: the direct port, past Serve's per-request ingress wrapper.

Why: under Serve every request to the gateway passes through Serve's wrapper in the replica (its ASGI wrapper and
middlewares, the request's metadata and ids, its metrics and access-log record) on the same event loop as the
gateway: ~250-300 us of CPU a request on this project's 2-core machine, for the bare pass-through and the gateway
alike (``bench/serve_share.py``). On top of the gateway's own work that is what makes one replica's loop the
bottleneck at c=32. The direct port serves the same app, built once, from a uvicorn server on the replica's own
event loop, as the engine replicas serve the gateway on their Unix sockets (``engines.local_socket``).

What a request on the direct port does not get from Serve: routing by queue length across replicas (replicas on
one host share the port through ``SO_REUSEPORT``, and the kernel spreads connections), Serve's queue of
``max_ongoing_requests`` (here a request beyond ``requests`` in flight is answered 503 at once, as an OpenAI error
with ``Retry-After``: ``InFlightLimit``), Serve's request metrics (the gateway's own ``/metrics`` count every request
either way) and the autoscaler's view of the load. Serve's ingress keeps answering on its own port meanwhile; the
app's lifespan (its table refresh, its stores) is Serve's, run once, and the direct server only adds a way in.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import uvicorn
from starlette.types import ASGIApp, Receive, Scope, Send

from .openai_schema import openai_error

log = logging.getLogger(__name__)

RETRY_AFTER_S = 1
"""What an overloaded replica asks a refused client to wait (``Retry-After``): the gateway's requests take tens of
milliseconds to seconds, so a second frees most of what was in flight."""

GRACE_S = 30.0
"""How long a stopping replica lets requests in flight on the direct port finish (Serve's own default for a
replica's graceful shutdown is 20 s; a request held past it is cut)."""


class _Server(uvicorn.Server):
    """uvicorn's server without its signal handlers: the process is Ray's worker, whose SIGTERM is Ray's to handle
    (uvicorn's would take it on the main thread and re-raise it after its own shutdown)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


ALWAYS_ANSWERED = frozenset({"/healthz", "/readyz", "/metrics"})
"""The gateway's probe and scrape paths, answered whatever is in flight: a liveness probe refused under load would
have the kubelet restart a pod that is only busy, and a refused scrape would hide the load it is under."""


class InFlightLimit:
    """Answers a request beyond ``limit`` in flight with OpenAI's error object (503, code ``overloaded``,
    ``Retry-After``) instead of letting it wait on a replica that is already behind.

    Why not uvicorn's own ``limit_concurrency`` alone: past it uvicorn answers ``text/plain`` "Service Unavailable",
    which an OpenAI SDK reports as an unparsed error, and it counts open connections too, so a load balancer's idle
    keep-alive pool would turn requests away from a replica with nothing in flight. uvicorn's limit stays, set
    higher, as the bound on connections. ``ALWAYS_ANSWERED`` paths neither count nor wait. ``on_refused`` is called
    once per refusal (the gateway counts it in its ``/metrics``), on the event loop.
    """

    def __init__(self, app: ASGIApp, limit: int, on_refused: Callable[[], None] | None = None) -> None:
        self.app = app
        self.limit = limit
        self.on_refused = on_refused
        self.in_flight = 0
        # Built once: a refusal comes when the loop is busiest, and its answer never changes.
        self._refusal = openai_error(503, f"This gateway replica has {limit} requests in flight, its limit; retry "
                                     f"after {RETRY_AFTER_S} s, or add replicas.", code="overloaded",
                                     headers={"Retry-After": str(RETRY_AFTER_S)})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in ALWAYS_ANSWERED:
            await self.app(scope, receive, send)
            return
        if self.in_flight >= self.limit:
            if self.on_refused is not None:
                self.on_refused()
            await self._refusal(scope, receive, send)
            return
        self.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1


def listen(host: str, port: int, *, shared: bool = True) -> socket.socket:
    """A listening TCP socket on ``host:port``, non-blocking for uvicorn; ``shared``: other replicas on this host may
    listen on it too (``SO_REUSEPORT``). Raises ``OSError`` when the port is taken (by any socket, when not
    ``shared``)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.create_server((host, port), family=family, backlog=2048, reuse_port=shared)
    sock.setblocking(False)
    return sock


@dataclass
class DirectServer:
    """A running direct server; ``close`` stops taking connections and waits for the requests in flight."""

    server: uvicorn.Server
    task: asyncio.Task[None]
    address: tuple[str, int]

    @classmethod
    async def start(cls, app: ASGIApp, host: str, port: int, *, requests: int, connections: int,
                    on_refused: Callable[[], None] | None = None) -> DirectServer:
        """Serve ``app`` on ``host:port`` from the running loop, at most ``requests`` in flight (``InFlightLimit``,
        which calls ``on_refused`` for each request it turns away) and ``connections`` open (beyond it uvicorn
        answers a plain 503); raises ``OSError`` when the port cannot be bound (taken by a process that does not
        share it), so the replica fails to start with the reason."""
        sock = listen(host, port)
        # No proxy-headers middleware (uvicorn's default): it would rewrite every request's client address from
        # X-Forwarded-For, which nothing in the gateway reads, and no proxy on this host forwards to this port.
        config = uvicorn.Config(InFlightLimit(app, requests, on_refused), lifespan="off", access_log=False,
                                log_config=None, limit_concurrency=connections, timeout_graceful_shutdown=GRACE_S,
                                proxy_headers=False)
        server = _Server(config)
        task = asyncio.get_running_loop().create_task(server.serve(sockets=[sock]), name="pilothouse-direct-port")
        while not server.started:
            if task.done():  # failed before it listened: its exception, not a hang
                task.result()
                raise RuntimeError("the direct server stopped before it started")
            await asyncio.sleep(0.01)
        address = sock.getsockname()[:2]
        log.info("gateway: direct port on %s:%d", *address)
        return cls(server, task, (str(address[0]), int(address[1])))

    async def close(self) -> None:
        self.server.should_exit = True
        with contextlib.suppress(Exception):  # a failed server has nothing left to stop; its error was logged
            await self.task
