"""The gateway's HTTP face: probes, the model list, and the guards every OpenAI request passes first.

``build_app`` returns a plain FastAPI app so the same code runs under Ray Serve (``serve.py``),
under any ASGI server, and in unit tests without Ray. What is here is what needs no backend:
liveness, readiness (a RoutingTable is loaded), ``GET /v1/models`` from the table, API keys, the
request-size limit and UTF-8 check, and the request validators the POST endpoints will use
(``validate_chat`` and friends, re-exported from ``openai_schema``). The POST endpoints themselves
are registered by the request path, with the router, budgets and engines.

Guards run as ASGI middleware in this order, cheapest refusal first: API key (``auth.Authenticate``,
before any body byte is read), then ``BodyLimit`` (413 on ``Content-Length`` alone, or as soon as
a chunked body passes the limit; 400 on invalid UTF-8), then ``OpenAIEndpoints`` hands the OpenAI POSTs to
the data plane and everything else goes to FastAPI's router. Around them all,
``refusals.AuditRefusals`` writes the audit record of every OpenAI request answered without one. Every error, including
404/405 and unexpected exceptions, is an OpenAI-style error object, so OpenAI SDKs raise their
typed exceptions instead of failing to parse an HTML or ``{"detail": ...}`` body.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pilothouse.operator.api.gateway import STORE_URL_ENV
from pilothouse.operator.api.routing import RoutingTable

from . import reviews, tracing
from .auth import ApiKeys, Authenticate
from .dataplane import REQUEST_ID_HEADER, DataPlane, new_id, trace_id
from .engines.external import close_shared_client
from .engines.local_socket import close_clients
from .openai_schema import (
    OPENAI_PATHS,
    openai_endpoint,
    openai_error,
    route_path,
    validate_chat,
    validate_completion,
    validate_embedding,
)
from .refusals import AuditRefusals
from .table_source import TableSource

__all__ = [
    "BodyLimit",
    "MiB",
    "build_app",
    "models_list",
    "validate_chat",
    "validate_completion",
    "validate_embedding",
]

log = logging.getLogger(__name__)

MiB = 1 << 20
GC_GEN0_THRESHOLD = 20_000
GIL_SWITCH_INTERVAL_S = 0.001


def tune_interpreter() -> None:
    """Make the garbage collector's pauses rare and short, and thread hand-offs quick; once, at start-up.

    With CPython's default thresholds (700, 10, 10) a gen-0 collection ran about every request and
    caught in-flight requests' objects, which it promoted; a full collection then followed every
    ~1.3 s at c=32, each stopping the event loop for ~95 ms over the whole heap (measured under
    uvicorn: p99 133 ms against the backend's own 26 ms). With a gen-0 threshold of 20,000, request
    objects die by reference counting before a collection sees them, and ``gc.freeze`` takes the
    start-up heap (Ray, pydantic, SQLAlchemy, aiohttp) out of every later collection: p99 44 ms,
    and 15% less CPU per request. Cyclic garbage is still collected, just in larger batches.

    Every request also crosses threads twice (the ledger's and the audit writer's group commits),
    and a thread waiting for the GIL behind a busy event loop waits up to the switch interval (5 ms
    by default). At 1 ms: +5% RPS under uvicorn, pilothouse at c=32 774 -> 852 RPS on Ray Serve.
    """
    gc.set_threshold(GC_GEN0_THRESHOLD, *gc.get_threshold()[1:])
    gc.collect()  # what is garbage now is freed, not frozen
    gc.freeze()
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)


class BodyLimit:
    """ASGI middleware: read the whole body up to ``max_bytes`` before the app sees it, then replay it.

    Every body the gateway accepts is one JSON document that is parsed whole, so buffering costs
    nothing extra and lets the limit hold for chunked bodies too (no ``Content-Length`` to trust).
    JSON is UTF-8 (RFC 8259), so a body that is not is refused here, once, for every endpoint.
    Requests without a body (GET, probes) pass through untouched.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    def _too_large(self, what: str) -> JSONResponse:
        return openai_error(413, f"Request body {what} the gateway's limit of {self.max_bytes} bytes.",
                            "invalid_request_error", None, "request_too_large", headers={"connection": "close"})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        length = headers.get("content-length")
        if length is None and "transfer-encoding" not in headers:
            await self.app(scope, receive, send)
            return
        if length is not None:
            if not (length.isascii() and length.isdigit()):
                await openai_error(400, "Invalid Content-Length header.", code="invalid_header")(scope, receive, send)
                return
            if int(length) > self.max_bytes:
                await self._too_large(f"of {int(length)} bytes exceeds")(scope, receive, send)
                return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # the client left before sending the whole body: nobody to answer
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self._too_large("exceeds")(scope, receive, send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        try:
            body.decode("utf-8")
        except UnicodeDecodeError as exc:
            await openai_error(400, f"The request body is not valid UTF-8 (invalid byte at position {exc.start}).",
                               code="invalid_encoding")(scope, receive, send)
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()  # after the body: wait for the disconnect, as a server would
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)


class OpenAIEndpoints:
    """ASGI middleware: POSTs to the three OpenAI endpoints go straight to ``handle`` (the data plane's, with the
    endpoint it matched), past Starlette's router.

    Why: on the request path Starlette's exception middleware, router and per-request exit stacks cost
    the gateway replica's event loop ~7% of its time per request at c=256 (py-spy under Ray Serve,
    ``bench/gateway_overhead.py``), and do nothing the data plane needs: it reads the body itself and
    answers every error it knows as an OpenAI error object. What it does not know (a bug) still reaches
    ``ServerErrorMiddleware`` and the app's handler for ``Exception``: an OpenAI-style 500. Everything
    else, other methods on these paths included (405), goes to the app.
    """

    def __init__(self, app: ASGIApp, handle: Callable[[Request, str], Awaitable[Response]]) -> None:
        self.app = app
        self.handle = handle

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = openai_endpoint(scope)
        if kind is not None and scope["method"] == "POST":
            response = await self.handle(Request(scope, receive, send), kind)
            await response(scope, receive, send)
        else:
            await self.app(scope, receive, send)


def models_list(table: RoutingTable) -> dict[str, Any]:
    """``GET /v1/models``: one model per route, addressed as ``<workflow>/<step>``.

    OpenAI's list shape, plus what a workflow team needs to see which engines stand behind a
    route: the route's tier and its backends' served model ids, in the order they would be tried
    (extra fields; OpenAI SDKs keep them on the returned objects).
    """
    created = int(table.generated_at.timestamp())
    data = [{
        "id": f"{table.workflow}/{route.step}",
        "object": "model",
        "created": created,
        "owned_by": table.namespace,
        "tier": route.tier,
        "backends": [b.model for b in route.backends],
        "revision": table.revision,
    } for route in table.routes]
    return {"object": "list", "data": data}


async def _refresh(source: TableSource, keys: ApiKeys, interval: float) -> None:
    """Re-read the RoutingTable and the key file; both refreshes are cheap ``stat``s when nothing changed."""
    while True:
        try:
            source.refresh()
            keys.refresh()
        except Exception:  # never let a surprise stop reloading for the life of the process
            log.exception("refreshing the RoutingTable / API keys failed")
        await asyncio.sleep(interval)


def _install_error_handlers(app: FastAPI) -> None:
    async def http_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, HTTPException)
        if exc.status_code in (404, 405):
            what = "Unknown request URL" if exc.status_code == 404 else "Method not allowed for URL"
            return openai_error(exc.status_code, f"{what}: {request.method} {request.url.path}.",
                                code="unknown_url" if exc.status_code == 404 else "method_not_allowed",
                                headers=exc.headers)
        return openai_error(exc.status_code, str(exc.detail), headers=exc.headers)

    async def invalid_request(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        first = exc.errors()[0] if exc.errors() else {}
        param = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        return openai_error(400, f"Invalid request: {first.get('msg', 'invalid input')}.", param=param)

    async def unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error in the gateway", exc_info=exc)
        return openai_error(500, "The gateway had an internal error; the request was not processed.")

    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(RequestValidationError, invalid_request)
    app.add_exception_handler(Exception, unexpected)


def build_app(routing_path: str, *, api_keys: str | None = None, max_body_bytes: int = MiB,
              refresh_interval: float = 1.0, store_url: str | None = None,
              otlp_endpoint: str | None = None) -> FastAPI:
    """The gateway app for the RoutingTable at ``routing_path``.

    ``store_url`` (SQLAlchemy URL; default ``PILOTHOUSE_STORE_URL`` or ``sqlite:///.pilothouse/pilothouse.db``)
    holds the audit records, the budget ledger and the idempotency keys; it is opened on the first
    request that needs it, so probes and ``/v1/models`` never touch it.

    The table may be missing or invalid at start (the ConfigMap may not be written yet): the app
    starts, ``/readyz`` says why it is not ready, and the background refresh picks the table up.
    A bad ``api_keys`` file raises ``auth.ApiKeyError`` here: better no gateway than an open one.

    ``otlp_endpoint`` (default ``OTEL_EXPORTER_OTLP_ENDPOINT``): an OTLP/HTTP collector to send the request
    spans to (``tracing``); with neither, tracing stays as it is (the no-op tracer unless a test installed one).
    """
    endpoint = otlp_endpoint or os.environ.get(tracing.ENDPOINT_ENV)
    if endpoint:
        tracing.configure(endpoint)
    source = TableSource(routing_path)
    keys = ApiKeys(api_keys)
    dataplane = DataPlane(source, store_url or os.environ.get(STORE_URL_ENV))
    review_queue = reviews.ReviewQueue(dataplane.store_url, dataplane.metrics)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        tune_interpreter()
        task = asyncio.create_task(_refresh(source, keys, refresh_interval), name="pilothouse-refresh")
        upkeep = asyncio.create_task(dataplane.maintain(), name="pilothouse-store-upkeep")
        try:
            yield
        finally:
            for t in (task, upkeep):
                t.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await t
            await dataplane.aclose()
            await review_queue.aclose()
            await close_shared_client()
            await close_clients()
            tracing.flush()

    app = FastAPI(title="Pilothouse gateway", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.table_source = source
    app.state.api_keys = keys
    app.state.dataplane = dataplane

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        """Liveness: the process answers. Readiness is separate, so a missing table never restarts a pod."""
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        if not source.ready:
            return JSONResponse({"status": "not ready", "reason": source.last_error}, status_code=503)
        table = source.current()
        body: dict[str, Any] = {"status": "ready", "workflow": table.workflow, "namespace": table.namespace,
                                "revision": table.revision, "degraded": table.degraded}
        if source.last_error:  # serving the last good table; the file on disk has a problem
            body["warning"] = source.last_error
        if keys.last_error:
            body["api_keys_warning"] = keys.last_error
        return JSONResponse(body)

    @app.get("/v1/models")
    async def list_models() -> JSONResponse:
        if not source.ready:
            return openai_error(503, f"No RoutingTable is loaded yet: {source.last_error}", code="not_ready")
        return JSONResponse(models_list(source.current()))

    async def openai(request: Request) -> Response:
        return await dataplane.handle(request, OPENAI_PATHS[route_path(request.scope)])

    # Answered by OpenAIEndpoints before the router; routes as well, and first, because Ray Serve names each
    # request's route for its metrics (and tells its proxies the app's paths) from the route table: a path
    # it cannot find there is labelled with the route prefix, after a walk over every route, twice. The
    # routes' endpoint is the same data-plane call, for an app used without the middleware.
    app.router.routes[:0] = [Route(path, openai, methods=["POST"]) for path in OPENAI_PATHS]
    app.include_router(reviews.router(review_queue))

    @app.get("/metrics")
    async def metrics() -> Response:
        return dataplane.render_metrics()

    _install_error_handlers(app)
    app.add_middleware(OpenAIEndpoints, handle=dataplane.handle)
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)
    app.add_middleware(Authenticate, keys=keys)
    # added last = runs first: it sees the refusals of the two guards above, too
    app.add_middleware(AuditRefusals, write=dataplane.record, new_id=new_id, trace_id=trace_id,
                       id_header=REQUEST_ID_HEADER)
    return app
