"""The request path: model → route, idempotency, cache, plan, budget, attempts with fallback, audit, metrics.

``DataPlane.handle`` serves ``POST /v1/chat/completions``, ``/v1/completions`` and ``/v1/embeddings``
for ``gateway.build_app``. One request, in order:

1. validate the body (OpenAI 400 naming the field), resolve ``model`` (``<workflow>/<step>``, or the
   bare step when one route has it) → 404 ``model_not_found``; ``max_tokens`` above the route's → 400.
   A request without ``max_tokens`` is sent with the route's, so its worst case is bounded.
2. ``Idempotency-Key``: replay the stored answer (no backend, no charge) or 409 on another body.
3. Cache (deterministic, non-streamed requests): a hit is answered at no charge.
4. ``router.plan`` with this replica's breakers and a prompt estimate of **characters / 4** (plus one
   per chat message): no tokenizer in the gateway; the backend's own usage is what gets committed.
5. Budget: reserve the worst case of the *first* planned backend (prompt estimate + max_tokens x n
   at its price). Refused: ``reject`` → 429 with the ledger's message (policy, window, reset time);
   ``queue`` → retry until the policy's timeout, then 429; ``downgrade`` → reserve on the first
   cheaper planned backend if there is one (the operator normally reorders the table first).
6. Attempts: breaker → engine → on a classified failure, breaker + fallback metric +
   ``next_after_failure`` (never once a streamed chunk reached the client). Success commits
   usage x the answering backend's price; no answer releases the reservation and maps the last
   error class to 502/503/504 (a client error keeps the backend's 4xx). Never a 500.
7. One audit record, durable before the response (or before a stream's ``data: [DONE]``); header
   ``x-pilothouse-request-id`` carries its id.

Every exit path settles the reservation (commit or release), including a client that cancels a
stream (what was produced is committed, at the backend's usage or the engine's estimate).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import random
import re
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, TypeVar

import aiohttp
from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from opentelemetry import trace as otel
from starlette.background import BackgroundTask

from pilothouse.operator.api.routing import Backend, BudgetRule, Route, RoutingTable

from . import tracing
from .audit import (
    AuditLog,
    AuditRecord,
    AuditWriter,
    BudgetTrail,
    RoutingAttempt,
    RoutingDecision,
    TokenUsage,
    as_row,
    redact,
)
from .auth import tenant_of
from .breaker import Breaker
from .budget_lease import Claim, Leases
from .cache import CachedResponse, ResponseCache
from .engines import CHAT, COMPLETIONS, EMBEDDINGS, BackendError, Engine, EngineResult, EngineStream, Usage
from .engines.external import ExternalEngine, loads, shared_client
from .engines.handle import HandleEngine, is_local
from .errors import ErrorClass, Failure
from .idempotency import Conflict, IdempotencyStore, Stored
from .ledger import Denied, Ledger, Reservation, SettleOp
from .metrics import INTERNAL_ERROR, Metrics
from .openai_schema import (
    ChatRequest,
    CompletionRequest,
    EmbeddingRequest,
    error_object,
    openai_error,
    parse_body,
)
from .refusals import CTX_STATE
from .router import Plan, Rejection, next_after_failure, plan, worst_case_cost
from .stores import UNREACHABLE
from .table_source import TableSource

if TYPE_CHECKING:
    from .semantic_cache import Probe, SemanticCache

log = logging.getLogger(__name__)
_T = TypeVar("_T")

DEFAULT_STORE_URL = "sqlite:///.pilothouse/pilothouse.db"
STALE_RESERVATION = timedelta(minutes=30)  # far above the longest request (timeouts x attempts + queue)
IDEMPOTENCY_RETENTION = timedelta(hours=24)
MAX_UNRELEASED = 10_000  # Idempotency-Key claims kept in memory for the next upkeep to release (row ids: ~1 MB)
MAX_ENGINES = 1024  # HTTP backends' engines kept for reuse (a table lists tens)
REQUEST_ID_HEADER = "x-pilothouse-request-id"
CACHE_HEADER = "x-pilothouse-cache"
SEMANTIC_HIT = "semantic"
"""``x-pilothouse-cache`` on a semantic hit (an exact hit says ``hit``)."""
REPLAY_HEADER = "x-pilothouse-idempotent-replay"
RUN_ID_HEADER = "x-pilothouse-run-id"  # a workflow run's id, sent by the runtime; kept in the audit record
COST_HEADER = "x-pilothouse-cost-usd"  # what the answer cost (the committed amount; 0 for a cache hit)
_DONE = b"data: [DONE]"
_TRACEPARENT = re.compile(r"^[0-9a-f]{2}-([0-9a-f]{32})-[0-9a-f]{16}-[0-9a-f]{2}$")
_MODELS = {CHAT: ChatRequest, COMPLETIONS: CompletionRequest, EMBEDDINGS: EmbeddingRequest}
_OPERATION = {CHAT: "chat", COMPLETIONS: "text_completion", EMBEDDINGS: "embeddings"}
_PROVIDER = {"external": "openai"}  # gen_ai.provider.name by Backend.engine; others as they are
_ERROR_STATUS = {ErrorClass.TIMEOUT: 504, ErrorClass.CONNECTION: 502, ErrorClass.SERVER: 502,
                 ErrorClass.RATE_LIMITED: 503, ErrorClass.CANCELLED: 503}


def backend_api_key(backend: Backend) -> str | None:
    ref = backend.api_key_secret_ref
    return None if ref is None else os.environ.get(ref.env_var)


def resolve(table: RoutingTable, model: str) -> Route | None:
    """``<workflow>/<step>`` as ``/v1/models`` lists it, or the bare step name."""
    workflow, _, step = model.rpartition("/")
    if workflow and workflow != table.workflow:
        return None
    matches = [r for r in table.routes if r.step == step]
    return matches[0] if len(matches) == 1 else None


def trace_id(traceparent: str | None) -> str:
    """The W3C ``traceparent`` header's trace id, or a new random one (W3C wants trace ids random, not ordered)."""
    if traceparent:
        match = _TRACEPARENT.match(traceparent.strip().lower())
        if match and match.group(1) != "0" * 32:
            return match.group(1)
    return f"{random.getrandbits(128):032x}"


def new_id() -> str:
    """A 128-bit id as 32 hex digits, ordered by creation time: 48 bits of milliseconds since the epoch,
    then 80 random bits (UUIDv7's layout, without its version bits). For request and budget lease ids.

    Ordered because they are primary keys: the audit record's and the ledger rows'. A random key lands
    each insert on a random leaf of the key's B-tree, a page of its own to read and to write at commit;
    ordered keys share the rightmost leaf. A budgeted batch of 4 requests wrote 21.7 SQLite pages at
    commit with random ids and 14.7 with ordered ones; the audit writer's CPU fell from 0.66 to 0.53 ms
    per batch (measured with 160k records stored).

    From ``random``, not ``uuid``/``os.urandom``: the ids must be unique, not secret, and
    ``os.urandom`` releases the GIL, so under load every request waited for the ledger and audit
    threads to hand it back (it was the largest single cost in the gateway's profile). ``random``
    reseeds itself in a forked child, so replicas do not share a sequence.
    """
    return f"{time.time_ns() // 1_000_000:012x}{random.getrandbits(80):020x}"


def _chars(value: Any) -> int:
    if isinstance(value, str):
        return len(value)
    if isinstance(value, int):
        return 4  # a token id
    if isinstance(value, list):
        return sum(_chars(v) for v in value)
    if isinstance(value, dict):
        return _chars(value.get("text") or value.get("content") or "")
    return 0


def estimate_prompt_tokens(path: str, body: Mapping[str, Any]) -> int:
    """Characters / 4 (rounded up), plus one token per chat message for its role framing."""
    if path == CHAT:
        messages = body.get("messages") or []
        chars = sum(_chars(m.get("content")) for m in messages if isinstance(m, dict))
        return math.ceil(chars / 4) + len(messages)
    return max(1, math.ceil(_chars(body.get("prompt" if path == COMPLETIONS else "input")) / 4))


def cost_usd(backend: Backend, usage: Usage, prompt_estimate: int) -> tuple[float, int]:
    """Actual cost and tokens; an estimated usage without prompt tokens bills the gateway's estimate."""
    prompt = usage.prompt_tokens or (prompt_estimate if usage.estimated else 0)
    p = backend.pricing
    cost = (prompt * p.input_per_million_usd + usage.completion_tokens * p.output_per_million_usd) / 1_000_000
    return cost, prompt + usage.completion_tokens


@dataclass
class Stores:
    audit: AuditLog
    writer: AuditWriter
    ledger: Ledger
    idempotency: IdempotencyStore
    leases: Leases

    def close(self) -> None:
        self.writer.close()
        self.audit.close()
        self.ledger.close()
        self.idempotency.close()


@dataclass
class _Ctx:
    """Everything one request accumulates for its audit record and metrics."""

    request_id: str
    trace_id: str
    tenant: str
    path: str
    started: float
    ts: datetime
    model: str
    table: RoutingTable | None = None
    route: Route | None = None
    body: dict[str, Any] = field(default_factory=dict)
    prompt_tokens: int = 0
    attempts: list[RoutingAttempt] = field(default_factory=list)
    backend: Backend | None = None
    reason: str = ""
    budget: BudgetTrail | None = None
    reservation: Reservation | Claim | None = None
    cache_hit: bool = False
    usage: Usage | None = None
    output: Any = None
    backend_latency_s: float = 0.0
    idempotency_row: str | None = None
    span: Any = None  # the request's recording span; None when tracing is off or not sampled
    outcome: str = ""
    status_code: int = 0  # set once its audit record is built and on its way to the store
    run_id: str | None = None
    streamed: bool = False  # a stream's record is written when it ends, however it ends
    replay_of: str | None = None  # answered from the idempotency store: the first request's id

    @property
    def route_id(self) -> str | None:
        return f"{self.table.workflow}/{self.route.step}" if self.table and self.route else None

    @property
    def headers(self) -> dict[str, str]:
        return {REQUEST_ID_HEADER: self.request_id}


class DataPlane:
    """Per-replica state of the request path: breakers, cache, metrics, and the stores (opened lazily)."""

    def __init__(self, source: TableSource, store_url: str | None = None, *, metrics: Metrics | None = None,
                 cache: ResponseCache | None = None) -> None:
        self.source = source
        self.store_url = store_url or DEFAULT_STORE_URL
        self.metrics = metrics or Metrics()
        self.cache = cache or ResponseCache()
        self.breakers: dict[str, Breaker] = {}
        self.semantic: SemanticCache | None = None
        """The table's semantic cache once open (it loads an embedding model: opened in the background)."""
        self._semantic_for: tuple[str, str, Any] | None = None
        self._stores: Stores | None = None
        self._lock = asyncio.Lock()
        self._tables_seen = -1
        self._unreleased: set[str] = set()
        """Idempotency-Key claims a store outage kept failed requests from giving back; the next upkeep does."""
        self._external: dict[tuple[str | None, str, str | None, aiohttp.ClientSession], ExternalEngine] = {}
        """The HTTP backends' engines, by what makes one (endpoint, model, key, client): they hold no per-request
        state, and building one per request was ~23,000 instructions on the event loop (its ClientTimeout ~7,000)."""

    # -- lifecycle ---------------------------------------------------------------------------------
    async def stores(self) -> Stores:
        if self._stores is None:
            async with self._lock:
                if self._stores is None:
                    self._stores = await asyncio.to_thread(self._open)
        return self._stores

    def _open(self) -> Stores:
        audit = AuditLog(self.store_url)  # first: it creates a SQLite file's directory
        ledger = Ledger(self.store_url)
        return Stores(audit, AuditWriter(audit, ledger=ledger), ledger, IdempotencyStore(self.store_url),
                      Leases(ledger, new_id))

    async def aclose(self) -> None:
        if _background:  # cancelled streams still settling
            await asyncio.gather(*_background, return_exceptions=True)
        stores, self._stores = self._stores, None
        if stores is not None:
            await stores.leases.aclose()
            await asyncio.to_thread(stores.close)
        semantic, self.semantic, self._semantic_for = self.semantic, None, None
        if semantic is not None:
            await semantic.aclose()

    async def maintain(self, interval_s: float = 60.0, stale_after: timedelta = STALE_RESERVATION) -> None:
        """Until cancelled: release reservations and Idempotency-Key claims that requests which died left behind,
        and drop old idempotency keys. A key a store outage kept a failed request from giving back is released
        by the first upkeep after the store is back (its retries meanwhile are told the request is in progress);
        what a crashed replica held, once ``stale_after`` old."""
        while True:
            await asyncio.sleep(interval_s)
            if self._stores is None:
                continue
            try:
                if self._unreleased:
                    keys = list(self._unreleased)
                    await self._stores.idempotency.aabandon(*keys)
                    self._unreleased.difference_update(keys)
                await self._stores.ledger.aexpire(stale_after)
                await asyncio.to_thread(self._stores.idempotency.release_stale, stale_after)
                await asyncio.to_thread(self._stores.idempotency.purge, IDEMPOTENCY_RETENTION)
            except Exception:
                log.exception("store maintenance failed")

    def sync_tables(self) -> None:
        """Allow the current table's label values in the metrics when a new table loaded."""
        if self.source.ready and self.source.loads != self._tables_seen:
            table = self.source.current()
            self._tables_seen = self.source.loads
            self.metrics.allow_tables([table])
            self.metrics.revision(table.workflow, table.revision)
            self._sync_semantic(table)

    def _sync_semantic(self, table: RoutingTable) -> None:
        """(Re)open the semantic cache when the table asks for a different one; requests never wait for it."""
        wanted = (table.namespace, table.workflow, table.semantic_cache)
        if wanted == self._semantic_for:
            return
        self._semantic_for = wanted
        old, self.semantic = self.semantic, None
        task = asyncio.ensure_future(self._open_semantic(old, table, wanted))
        _background.add(task)
        task.add_done_callback(_background.discard)

    async def _open_semantic(self, old: SemanticCache | None, table: RoutingTable,
                             wanted: tuple[str, str, Any]) -> None:
        if old is not None:
            await old.aclose()
        if table.semantic_cache is None:
            return
        # Imported with the first table that asks for a semantic cache: it brings pymilvus (pandas, pyarrow, gRPC),
        # ~100 MiB of a replica's memory that a gateway without one never needs.
        from .semantic_cache import open_semantic_cache

        try:
            cache = await open_semantic_cache(table, metrics=self.metrics)
        except Exception as exc:  # no embedding model: serve without the semantic cache, and say why
            log.warning("semantic cache of %s/%s is off: %s", table.namespace, table.workflow, exc)
            return
        if cache is not None and self._semantic_for == wanted:
            self.semantic = cache
        elif cache is not None:  # the table changed again while the model loaded
            await cache.aclose()

    async def record(self, record: AuditRecord) -> None:
        """Write a record the request path did not (``refusals``): durable, with no budget settlement."""
        stores = await self.stores()
        await stores.writer.write(record)

    def render_metrics(self) -> Response:
        """``GET /metrics``. The circuit gauges are written here, from every breaker's state at the scrape, rather
        than on every request (a breaker moves between states on a clock too: open -> half-open)."""
        self.sync_tables()
        for name, breaker in self.breakers.items():
            self.metrics.circuit(name, breaker.gauge)
        body, content_type = self.metrics.render()
        return Response(body, media_type=content_type)

    def breaker(self, name: str) -> Breaker:
        b = self.breakers.get(name)
        if b is None:
            b = self.breakers[name] = Breaker(name)
        return b

    # -- the request -------------------------------------------------------------------------------
    async def handle(self, request: Request, path: str) -> Response:
        started = time.perf_counter()
        raw = await request.body()
        valid = parse_body(raw, _MODELS[path])
        if isinstance(valid, JSONResponse):
            self.metrics.observe_request(None, None, "invalid_request", time.perf_counter() - started)
            return valid
        parsed, sent = valid
        ctx = _Ctx(request_id=new_id(), trace_id="", tenant=tenant_of(request), path=path,
                   started=started, ts=datetime.now(UTC), model=parsed.model, body=sent,
                   run_id=request.headers.get(RUN_ID_HEADER, "")[:128] or None)
        request.scope.setdefault("state", {})[CTX_STATE] = ctx  # for the refusal audit of answers given before routing
        if tracing.enabled():
            self._start_span(ctx, request)
        if not ctx.trace_id:
            ctx.trace_id = trace_id(request.headers.get("traceparent"))
        try:
            response = await self._handle(ctx, request, parsed, raw)
        except UNREACHABLE as exc:
            response = self._store_unreachable(ctx, exc)
        except BaseException as exc:
            if ctx.span is not None:
                ctx.outcome = ctx.outcome or type(exc).__name__
                self._end_span(ctx, ctx.status_code or 500)
            raise
        if ctx.span is not None and not isinstance(response, StreamingResponse):  # a stream's ends with the stream
            self._end_span(ctx, response.status_code)
        return response

    def _store_unreachable(self, ctx: _Ctx, exc: Exception) -> Response:
        """The store could not be reached for this request's budget reservation, Idempotency-Key or settlement (a
        failed audit write is ``AuditUnavailable``): nothing was charged or acknowledged, so the caller may retry."""
        log.warning("request %s refused: the store is unreachable (%s)", ctx.request_id, type(exc).__name__)
        self._observe(ctx, "store_unavailable")
        return openai_error(503, "The gateway's store (budget ledger, audit) is unreachable; nothing was charged or "
                            "acknowledged. Retry later.", code="store_unavailable", headers=ctx.headers)

    async def _handle(self, ctx: _Ctx, request: Request, parsed: Any, raw: bytes) -> Response:
        path, started = ctx.path, ctx.started
        if not self.source.ready:
            return openai_error(503, f"No RoutingTable is loaded yet: {self.source.last_error}", code="not_ready",
                                headers=ctx.headers)
        self.sync_tables()
        ctx.table = table = self.source.current()
        ctx.route = route = resolve(table, parsed.model)
        if route is None:
            names = ", ".join(f"{table.workflow}/{r.step}" for r in table.routes)
            self.metrics.observe_request(None, None, "invalid_request", time.perf_counter() - started)
            return openai_error(404, f"The model '{parsed.model}' does not exist; this gateway serves: {names}.",
                                param="model", code="model_not_found", headers=ctx.headers)
        body = ctx.body
        max_tokens = 0
        if isinstance(parsed, ChatRequest | CompletionRequest):
            param = "max_completion_tokens" if isinstance(parsed, ChatRequest) and parsed.max_completion_tokens \
                else "max_tokens"
            requested = parsed.requested_tokens if isinstance(parsed, ChatRequest) else parsed.max_tokens
            if requested is not None and requested > route.max_tokens:
                self.metrics.observe_request(ctx.route_id, None, "invalid_request", time.perf_counter() - started)
                return openai_error(400, f"Invalid '{param}': {requested} is above the limit of {route.max_tokens} "
                                    f"for model '{parsed.model}'.", param=param, code="max_tokens_exceeded",
                                    headers=ctx.headers)
            if requested is None:
                body["max_tokens"] = route.max_tokens  # bound the worst case the budget reserves
            max_tokens = (requested or route.max_tokens) * (parsed.n or 1)
        ctx.prompt_tokens = estimate_prompt_tokens(path, body)
        stores = await self.stores()
        stream = bool(body.get("stream")) and path != EMBEDDINGS

        key = request.headers.get("idempotency-key")
        if key:
            claim = await stores.idempotency.aclaim(ctx.tenant, key, raw, ctx.request_id)
            if isinstance(claim, Stored):
                ctx.replay_of = claim.request_id or "?"
                headers = {REPLAY_HEADER: "true", REQUEST_ID_HEADER: claim.request_id or ctx.request_id}
                return Response(claim.body, status_code=claim.status_code, media_type=claim.content_type,
                                headers=headers)
            if isinstance(claim, Conflict):
                return openai_error(409, claim.message, param="Idempotency-Key", code="idempotency_key_conflict",
                                    headers=ctx.headers)
            ctx.idempotency_row = claim.row_id
        try:
            response = await self._serve(ctx, stores, stream, max_tokens)
        except AuditUnavailable:
            await self._abandon(ctx, stores)
            return openai_error(503, "The gateway could not record this request in its audit store; it was not "
                                "acknowledged. Retry later.", code="audit_unavailable", headers=ctx.headers)
        except BaseException:
            await self._abandon(ctx, stores)
            raise
        if ctx.idempotency_row is not None and not isinstance(response, StreamingResponse):
            if response.status_code == 200:
                await stores.idempotency.acomplete(ctx.idempotency_row, 200, response.media_type or
                                                   "application/json", bytes(response.body))
            else:
                await self._abandon(ctx, stores)
        return response

    # -- tracing -----------------------------------------------------------------------------------
    def _start_span(self, ctx: _Ctx, request: Request) -> None:
        """The request's span, child of the caller's ``traceparent``; its trace id is the audit record's."""
        operation = _OPERATION[ctx.path]
        span = tracing.tracer().start_span(f"{operation} {ctx.model}", context=tracing.extract(request.headers),
                                           kind=otel.SpanKind.SERVER)
        span_context = span.get_span_context()
        if span_context.is_valid:
            ctx.trace_id = format(span_context.trace_id, "032x")
        if not span.is_recording():
            span.end()
            return
        span.set_attribute("gen_ai.operation.name", operation)
        span.set_attribute("gen_ai.request.model", ctx.model)
        ctx.span = span

    def _end_span(self, ctx: _Ctx, status: int) -> None:
        span, ctx.span = ctx.span, None
        if span is None:
            return
        body, table, usage, budget = ctx.body, ctx.table, ctx.usage, ctx.budget
        attributes: dict[str, Any] = {"http.response.status_code": status,
                                      "pilothouse.cache_hit": ctx.cache_hit,
                                      "pilothouse.fallback_count": max(len(ctx.attempts) - 1, 0)}
        if table is not None:
            attributes["pilothouse.table_revision"] = table.revision
        if ctx.route_id:
            attributes["pilothouse.route"] = ctx.route_id
        if ctx.backend is not None:
            attributes["pilothouse.backend"] = ctx.backend.model_deployment
            attributes["gen_ai.provider.name"] = _PROVIDER.get(ctx.backend.engine, ctx.backend.engine)
            attributes["gen_ai.response.model"] = ctx.backend.model
        for key, name in (("max_tokens", "gen_ai.request.max_tokens"), ("temperature", "gen_ai.request.temperature")):
            value = body.get(key)
            if isinstance(value, int | float) and not isinstance(value, bool):
                attributes[name] = value
        if usage is not None:
            attributes["gen_ai.usage.input_tokens"] = usage.prompt_tokens
            attributes["gen_ai.usage.output_tokens"] = usage.completion_tokens
        if budget is not None:
            attributes["pilothouse.budget.policy"] = budget.policy
            if budget.reserved_usd is not None:
                attributes["pilothouse.budget.reserved_usd"] = budget.reserved_usd
            if budget.committed_usd is not None:
                attributes["pilothouse.budget.committed_usd"] = budget.committed_usd
        if status >= 400:
            error = ctx.outcome if ctx.outcome and ctx.outcome != "ok" else str(status)
            attributes["error.type"] = error
            span.set_status(otel.Status(otel.StatusCode.ERROR, ctx.reason or error))
        span.set_attributes(attributes)
        span.end()

    def _attempt_span(self, ctx: _Ctx, backend: Backend) -> Any:
        if ctx.span is None:
            return None
        span = tracing.tracer().start_span(f"attempt {backend.model_deployment}", kind=otel.SpanKind.CLIENT,
                                           context=otel.set_span_in_context(ctx.span))
        span.set_attribute("pilothouse.backend", backend.model_deployment)
        span.set_attribute("gen_ai.provider.name", _PROVIDER.get(backend.engine, backend.engine))
        span.set_attribute("gen_ai.request.model", backend.model)
        return span

    @staticmethod
    def _attempt_end(span: Any, error_type: str | None = None, message: str = "") -> None:
        if span is None:
            return
        if error_type is not None:
            span.set_attribute("error.type", error_type)
            span.set_status(otel.Status(otel.StatusCode.ERROR, message[:200]))
        span.end()

    async def _abandon(self, ctx: _Ctx, stores: Stores) -> None:
        if ctx.idempotency_row is not None:
            row, ctx.idempotency_row = ctx.idempotency_row, None
            try:
                await asyncio.shield(stores.idempotency.aabandon(row))
            except UNREACHABLE:  # the caller is told why the request failed; the next upkeep releases the key
                log.warning("request %s: its Idempotency-Key could not be released, the store is unreachable",
                            ctx.request_id)
                if len(self._unreleased) < MAX_UNRELEASED:  # beyond: release_stale's expiry still frees them
                    self._unreleased.add(row)

    async def _serve(self, ctx: _Ctx, stores: Stores, stream: bool, max_tokens: int) -> Response:
        assert ctx.table is not None and ctx.route is not None
        table, route = ctx.table, ctx.route
        cache_key = None if stream else self.cache.key(ctx.tenant, ctx.route_id or "", ctx.body, endpoint=ctx.path)
        if cache_key is not None:
            hit = self.cache.get(cache_key)
            self.metrics.cache(ctx.route_id, hit is not None)
            if hit is not None:
                return await self._cached(ctx, stores, hit, "hit", "cache hit")
        semantic = self.semantic
        probe: Probe | None = None
        if semantic is not None and not stream:
            probe = await semantic.lookup(ctx.tenant, ctx.route_id or "", ctx.body, endpoint=ctx.path)
            if probe.hit is not None:
                return await self._cached(ctx, stores, probe.hit.response, SEMANTIC_HIT,
                                          f"semantic cache hit (similarity {probe.hit.similarity:.3f})")

        p = plan(route, self.breakers, prompt_tokens=ctx.prompt_tokens, max_tokens=max_tokens, budget=table.budget,
                 now=time.monotonic())
        if p.rejection is not None:
            return await self._reject(ctx, stores, p)
        if table.budget is not None:
            reserved = await self._reserve(ctx, stores, table.budget, p)
            if isinstance(reserved, Response):
                return reserved
            p = reserved
        try:
            if stream:
                return await self._stream(ctx, stores, p)
            response = await self._complete(ctx, stores, p)
        except asyncio.CancelledError:
            await self._left(ctx, stores)
            raise
        except (AuditUnavailable, *UNREACHABLE):  # answered 503 by the callers: nothing was acknowledged
            await self._release(ctx, stores)
            raise
        except Exception as exc:
            return await self._internal_error(ctx, stores, exc)
        except BaseException:
            await self._release(ctx, stores)
            raise
        if response.status_code == 200 and ctx.usage is not None:
            if cache_key is not None:
                self.cache.put(cache_key, bytes(response.body), ctx.usage)
            if semantic is not None and probe is not None and probe.key is not None:  # after the client has it
                response.background = BackgroundTask(semantic.store, probe, bytes(response.body), ctx.usage)
        return response

    async def _cached(self, ctx: _Ctx, stores: Stores, hit: CachedResponse, header: str, reason: str) -> Response:
        """Answer from a cache: free, audited like any answer, marked in ``x-pilothouse-cache``."""
        ctx.cache_hit, ctx.usage, ctx.reason = True, hit.usage, reason
        try:
            ctx.output = _output(ctx.path, loads(hit.body))
        except ValueError:  # an entry is an answer that parsed when it was given; a damaged one is kept as text
            ctx.output = hit.body.decode(errors="replace")
        await self._audit(ctx, stores, 200)
        self._observe(ctx, "cache_hit")
        return Response(hit.body, media_type="application/json",
                        headers={**ctx.headers, CACHE_HEADER: header, COST_HEADER: "0"})

    # -- budget ------------------------------------------------------------------------------------
    async def _reserve(self, ctx: _Ctx, stores: Stores, rule: BudgetRule, p: Plan) -> Plan | Response:
        assert ctx.table is not None and p.first is not None
        action = rule.action if rule.action != "none" else (
            "queue" if rule.queue_timeout_seconds else "downgrade" if rule.downgrade_tier else "reject")
        timeout = p.wait_timeout_s if p.wait_timeout_s is not None else float(rule.queue_timeout_seconds or 0)
        deadline = time.monotonic() + timeout
        delay = 0.05
        candidates = [p]
        worst_first = worst_case_cost(p.first.backend, p.prompt_tokens, p.max_tokens)
        if action == "downgrade":  # a cheaper backend later in the plan may still fit
            candidates += [Plan(**{**p.__dict__, "attempts": p.attempts[i:]}) for i, a in enumerate(p.attempts)
                           if i and worst_case_cost(a.backend, p.prompt_tokens, p.max_tokens) < worst_first]
        claim = await stores.leases.claim(ctx.table.namespace, rule, worst_first, p.prompt_tokens + p.max_tokens,
                                          ctx.request_id, datetime.now(UTC))
        if claim is not None:
            ctx.reservation = claim
            ctx.budget = BudgetTrail(policy=rule.policy, reservation_id=claim.row_id, reserved_usd=claim.cost_usd)
            return p
        drained = False
        while True:
            denied: Denied | None = None
            for candidate in candidates:
                assert candidate.first is not None
                worst = worst_case_cost(candidate.first.backend, p.prompt_tokens, p.max_tokens)
                result = await stores.ledger.areserve(ctx.table.namespace, rule.policy, rule, worst,
                                                      p.prompt_tokens + p.max_tokens, ctx.request_id,
                                                      datetime.now(UTC))
                if isinstance(result, Reservation):
                    ctx.reservation = result
                    ctx.budget = BudgetTrail(policy=rule.policy, reservation_id=result.id,
                                             reserved_usd=result.cost_usd)
                    return candidate
                denied = result
            assert denied is not None
            if denied.cap == "window" and not drained:  # headroom this replica holds in leases comes back first
                drained = True
                if await stores.leases.drain(ctx.table.namespace, rule.policy):
                    continue
            if action != "queue" or denied.cap == "perRequest" or time.monotonic() + delay > deadline:
                break
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)
        ctx.budget = BudgetTrail(policy=rule.policy, denied=denied.message)
        await self._audit(ctx, stores, 429)
        self._observe(ctx, "budget_rejected")
        message = denied.message + (f" (waited {timeout:g} s in the queue)" if action == "queue" else "")
        return openai_error(429, message, "rate_limit_exceeded", None, "budget_exhausted", headers=ctx.headers)

    @staticmethod
    def _actual(ctx: _Ctx, usage: Usage | None, charge: tuple[float, int] | None) -> tuple[float, int] | None:
        """What settling charges: ``usage`` at the answering backend's price, or None to release the reservation.
        Written into the budget trail, so the audit record says what its settlement does."""
        actual: tuple[float, int] | None = None
        if usage is not None and ctx.backend is not None and (usage.prompt_tokens or usage.completion_tokens
                                                              or not usage.estimated):
            actual = charge or cost_usd(ctx.backend, usage, ctx.prompt_tokens)
        if ctx.reservation is not None and ctx.budget is not None:
            ctx.budget.committed_usd = actual[0] if actual is not None else None
            ctx.budget.released = actual is None
        return actual

    @staticmethod
    def _settlement(ctx: _Ctx, actual: tuple[float, int] | None) -> SettleOp | None:
        """The op settling this request's reservation. Takes the reservation off ``ctx``, so a request is settled
        exactly once: call it only when nothing can fail before the op is handed to the store."""
        reservation, ctx.reservation = ctx.reservation, None
        if reservation is None:
            return None
        if isinstance(reservation, Claim):
            return reservation.settle(actual)
        return SettleOp(reservation.id, actual)

    async def _unanswered(self, ctx: _Ctx, stores: Stores, status: int, reason: str, outcome: str, *,
                          sent: bool = False) -> None:
        """Record a request that ends without an answer from its backend path, its reservation released in the same
        transaction: nothing is charged. A request whose record is already written (and its reservation settled
        with it) keeps that record.

        ``sent``: the client already received the output (a stream's chunks), so the record keeps it, unless the
        record cannot be built with it (the output may be what failed); an answer the client never got is not
        recorded as output."""
        if ctx.status_code:
            return
        ctx.reason = reason
        if not sent:
            ctx.output = None
        try:
            await self._audit(ctx, stores, status)
        except AuditUnavailable:
            raise
        except Exception:
            if ctx.output is None:
                raise
            log.warning("request %s: its %s record could not be built with its output; recorded without it",
                        ctx.request_id, status, exc_info=True)
            ctx.output = None
            await self._audit(ctx, stores, status)
        self._observe(ctx, outcome)

    async def _left(self, ctx: _Ctx, stores: Stores) -> None:
        """The client left before its answer (Serve cancels the request when the connection closes): a 499 record,
        nginx's "client closed request", as for a stream the client leaves. The engine stops generating when its
        call is cancelled."""
        with contextlib.suppress(AuditUnavailable):  # logged by _audit; the reservation is held until its expiry
            await self._unanswered(ctx, stores, 499, "the client closed the request before its answer",
                                   ErrorClass.CANCELLED.value)

    async def _internal_error(self, ctx: _Ctx, stores: Stores, exc: Exception) -> Response:
        """A failure in the gateway itself before the answer: an OpenAI error, and a 500 record (``_failed_itself``)."""
        detail = f" after its {ctx.status_code} record was written, which stands" if ctx.status_code else \
            "; nothing was charged"
        message = self._failed_itself(ctx, exc, detail)
        await self._unanswered(ctx, stores, 500, message, INTERNAL_ERROR)
        return openai_error(500, message, None, None, INTERNAL_ERROR, headers=ctx.headers)

    @staticmethod
    def _failed_itself(ctx: _Ctx, exc: Exception, detail: str) -> str:
        """A failure in the gateway itself, not a backend's or the store's: the traceback goes to the log, and the
        message for the caller (and the 500 record) names the request id to quote, never the traceback."""
        log.error("request %s failed in the gateway%s", ctx.request_id, detail, exc_info=exc)
        return (f"The gateway failed on this request ({type(exc).__name__}){detail}. "
                f"Quote request id {ctx.request_id} to the operator.")

    async def _release(self, ctx: _Ctx, stores: Stores) -> None:
        """Release the reservation without an audit record (the request is failing with an exception)."""
        op = self._settlement(ctx, None)
        if op is not None:
            await asyncio.shield(self._writing(stores, stores.ledger.put_settle(op), op))
            self._spent(ctx, op)

    @staticmethod
    def _writing(stores: Stores, write: asyncio.Future[_T], op: SettleOp | None) -> asyncio.Future[_T]:
        """The write's group-commit future, which, however it ends, tells a budget lease its charge is no longer
        pending, even if the request awaiting it is cancelled first."""
        if op is not None and op.lease is not None:
            write.add_done_callback(lambda _: stores.leases.written(op))
        return write

    def _spent(self, ctx: _Ctx, op: SettleOp) -> None:
        if op.actual is not None and ctx.budget is not None and ctx.backend is not None:
            self.metrics.spent(ctx.budget.policy, ctx.backend.model_deployment, op.actual[0])

    async def _reject(self, ctx: _Ctx, stores: Stores, p: Plan) -> Response:
        assert ctx.table is not None
        if p.rejection is Rejection.BUDGET_EXHAUSTED:
            rule = ctx.table.budget
            windows = ", ".join(limit.window for limit in rule.limits) if rule else ""
            message = p.message + (f" (windows: {windows})" if windows else "")
            ctx.budget = BudgetTrail(policy=rule.policy if rule else "", denied=message)
            status, code, param, outcome = 429, "budget_exhausted", None, "budget_rejected"
        elif p.rejection is Rejection.OVER_REQUEST_LIMIT:
            message, status, code, param, outcome = p.message, 400, "budget_per_request_limit", "max_tokens", \
                "budget_rejected"
        elif p.rejection is Rejection.CONTEXT_TOO_LONG:
            message = f"No backend's context window fits this request: {p.message}."
            status, code, param, outcome = 400, "context_length_exceeded", "messages", "invalid_request"
        else:
            message, status, code, param, outcome = p.message, 503, "no_backend", None, "no_backend"
        ctx.reason = message
        await self._audit(ctx, stores, status)
        self._observe(ctx, outcome)
        return openai_error(status, message, "rate_limit_exceeded" if status == 429 else None, param, code,
                            headers=ctx.headers)

    # -- attempts ----------------------------------------------------------------------------------
    def _engine(self, backend: Backend) -> Engine:
        """The backend's engine; one the table lists without an endpoint yet fails like an unreachable one.

        ``serve://`` endpoints are engines in this Ray cluster (local mode), called through a Serve
        handle; any other endpoint is an OpenAI-compatible HTTP server.
        """
        try:
            if is_local(backend.endpoint):
                return HandleEngine.for_backend(backend)
            client, api_key = shared_client(), backend_api_key(backend)
            key = (backend.endpoint, backend.model, api_key, client)
            engine = self._external.get(key)
            if engine is None:
                if len(self._external) >= MAX_ENGINES:  # tables come and go: drop the old ones wholesale
                    self._external.clear()
                engine = self._external[key] = ExternalEngine.for_backend(backend, client, api_key)
            return engine
        except ValueError as exc:
            raise BackendError(Failure(ErrorClass.CONNECTION, str(exc))) from None

    def _allowed(self, ctx: _Ctx, p: Plan, attempt: Any) -> Any:
        """The first attempt from ``attempt`` on whose breaker lets it through (recording the skipped)."""
        while attempt is not None:
            name = attempt.backend.model_deployment
            if self.breaker(name).allow(force=attempt.forced_probe):
                return attempt
            ctx.attempts.append(RoutingAttempt(backend=name, error_class="circuit_open", message="skipped"))
            following = p.after(attempt.backend)
            if following is not None:
                self.metrics.fallback(name, following.backend.model_deployment, "circuit_open")
            attempt = following
        return None

    def _failed(self, ctx: _Ctx, p: Plan, backend: Backend, exc: BackendError, latency_s: float,
                *, streamed: bool = False) -> Any:
        """Record a failure (breaker, audit, metrics); the next attempt, or None to give up."""
        name = backend.model_deployment
        failure = exc.failure
        self.breaker(name).record_failure(failure.error_class, refused=failure.refused)
        ctx.attempts.append(RoutingAttempt(backend=name, error_class=failure.error_class.value,
                                           message=failure.message[:500], latency_ms=latency_s * 1000))
        ctx.backend_latency_s += latency_s
        nxt = next_after_failure(p, backend, failure.error_class, streamed_first_token=streamed,
                                 side_effect_sent=False)
        if nxt is None:
            return None
        self.metrics.fallback(name, nxt.model_deployment, failure.error_class.value)
        return p.attempts[p.index(nxt)]

    def _abandoned(self, ctx: _Ctx, backend: Backend, span: Any, latency_s: float, exc: BaseException) -> None:
        """The attempt in progress when the request was cancelled or the gateway failed: in its record, not against
        the backend's breaker."""
        if isinstance(exc, asyncio.CancelledError):
            error_class, message = ErrorClass.CANCELLED.value, "the request was cancelled while the backend worked"
        else:
            error_class, message = INTERNAL_ERROR, f"the gateway failed: {type(exc).__name__}"
        self._attempt_end(span, error_class, message)
        ctx.attempts.append(RoutingAttempt(backend=backend.model_deployment, error_class=error_class, message=message,
                                           latency_ms=latency_s * 1000))
        ctx.backend_latency_s += latency_s

    def _succeeded(self, ctx: _Ctx, backend: Backend, reason: str, latency_s: float) -> None:
        self.breaker(backend.model_deployment).record_success()
        ctx.backend, ctx.reason = backend, reason
        ctx.backend_latency_s += latency_s
        ctx.attempts.append(RoutingAttempt(backend=backend.model_deployment, latency_ms=latency_s * 1000))

    async def _complete(self, ctx: _Ctx, stores: Stores, p: Plan) -> Response:
        attempt = self._allowed(ctx, p, p.first)
        last: Failure | None = None
        while attempt is not None:
            backend = attempt.backend
            started = time.perf_counter()
            span = self._attempt_span(ctx, backend)
            try:
                result: EngineResult = await self._engine(backend).complete(ctx.path, ctx.body)
            except BackendError as exc:
                self._attempt_end(span, exc.error_class.value, exc.failure.message)
                last = exc.failure
                attempt = self._allowed(ctx, p, self._failed(ctx, p, backend, exc, time.perf_counter() - started))
                continue
            except BaseException as exc:
                self._abandoned(ctx, backend, span, time.perf_counter() - started, exc)
                raise
            self._attempt_end(span)
            self._succeeded(ctx, backend, attempt.reason, result.latency_s)
            usage = result.usage
            if usage.estimated and not usage.prompt_tokens:
                usage = Usage(ctx.prompt_tokens, usage.completion_tokens, estimated=True)
            ctx.usage = usage
            ctx.output = _output(ctx.path, result.data)
            self.metrics.used_tokens(backend.model_deployment, usage.prompt_tokens, usage.completion_tokens)
            charge = cost_usd(backend, usage, ctx.prompt_tokens)  # once: for the ledger and the header
            await self._audit(ctx, stores, 200, usage, charge)
            self._observe(ctx, "ok")
            return Response(result.body, media_type=result.content_type,
                            headers={**ctx.headers, COST_HEADER: f"{charge[0]:.9f}"})
        return await self._fail(ctx, stores, last)

    async def _fail(self, ctx: _Ctx, stores: Stores, last: Failure | None) -> Response:
        if last is None:
            status, code, message, outcome = 503, "no_backend", "No backend could be tried.", "no_backend"
        elif last.error_class is ErrorClass.CLIENT:
            status = last.status_code if last.status_code and 400 <= last.status_code < 500 else 400
            code, message, outcome = "backend_rejected_request", last.message, "client"
        elif last.error_class is ErrorClass.CONTEXT_LENGTH:
            status, code, message, outcome = 400, "context_length_exceeded", last.message, "context_length"
        else:
            status = _ERROR_STATUS.get(last.error_class, 502)
            code, outcome = f"backend_{last.error_class.value}", last.error_class.value
            message = f"Every backend failed; the last with {last.error_class.value}: {last.message}"
        ctx.reason = message
        await self._audit(ctx, stores, status)
        self._observe(ctx, outcome)
        return openai_error(status, message, None, None, code, headers=ctx.headers)

    async def _stream(self, ctx: _Ctx, stores: Stores, p: Plan) -> Response:
        attempt = self._allowed(ctx, p, p.first)
        last: Failure | None = None
        while attempt is not None:
            backend = attempt.backend
            started = time.perf_counter()
            stream: EngineStream | None = None
            span = self._attempt_span(ctx, backend)
            try:
                stream = await self._engine(backend).stream(ctx.path, ctx.body)
                first = await stream.__anext__()  # fall back is still possible until this reaches the client
            except (BackendError, StopAsyncIteration) as exc:
                if stream is not None:
                    await stream.aclose()
                error = exc if isinstance(exc, BackendError) else BackendError(
                    Failure(ErrorClass.SERVER, "the backend closed the stream before any chunk"))
                self._attempt_end(span, error.error_class.value, error.failure.message)
                last = error.failure
                attempt = self._allowed(ctx, p, self._failed(ctx, p, backend, error, time.perf_counter() - started))
                continue
            except BaseException as exc:
                self._abandoned(ctx, backend, span, time.perf_counter() - started, exc)
                if stream is not None:  # stops generation in the engine; the cancellation is what propagates
                    with contextlib.suppress(Exception):
                        await asyncio.shield(stream.aclose())
                raise
            self._attempt_end(span)  # the first chunk came: no fallback from here on
            ctx.backend, ctx.reason, ctx.streamed = backend, attempt.reason, True
            return _ClosingStream(self._relay(ctx, stores, stream, first, attempt.reason, started),
                                     media_type="text/event-stream",
                                     headers={**ctx.headers, "cache-control": "no-cache"})
        return await self._fail(ctx, stores, last)

    async def _relay(self, ctx: _Ctx, stores: Stores, stream: EngineStream, first: bytes, reason: str,
                     started: float) -> AsyncIterator[bytes]:
        """Pass chunks through; settle and audit before ``data: [DONE]`` leaves; settle on any exit."""
        assert ctx.backend is not None
        backend = ctx.backend
        finished = False
        kept: list[bytes] = []
        store_output = ctx.table.audit_store_outputs if ctx.table else False
        keep = store_output or ctx.idempotency_row is not None

        async def finish(status: int, error: BackendError | None) -> None:
            nonlocal finished
            finished = True
            latency = time.perf_counter() - started
            usage = stream.usage
            if usage.estimated and not usage.prompt_tokens:
                usage = Usage(ctx.prompt_tokens, usage.completion_tokens, estimated=True)
            ctx.usage = usage
            if error is None:
                self._succeeded(ctx, backend, reason, latency)
            else:
                self._stream_failed(ctx, backend, error, latency)
            ctx.output = b"".join(kept).decode(errors="replace") if store_output else None
            self.metrics.used_tokens(backend.model_deployment, usage.prompt_tokens, usage.completion_tokens)
            await self._audit(ctx, stores, status, usage)
            self._observe(ctx, "ok" if error is None else error.error_class.value)
            if ctx.idempotency_row is not None:
                if error is None:  # the whole answer, [DONE] included: a replay is a complete stream
                    row, ctx.idempotency_row = ctx.idempotency_row, None
                    await asyncio.shield(stores.idempotency.acomplete(row, 200, "text/event-stream",
                                                                      b"".join(kept)))
                else:
                    await self._abandon(ctx, stores)

        try:
            chunk: bytes | None = first
            iterator = stream.__aiter__()
            while chunk is not None:
                if keep:
                    kept.append(chunk)
                cut = chunk.find(_DONE)
                if cut >= 0:
                    if cut:
                        yield chunk[:cut]
                    await finish(200, None)
                    yield chunk[cut:]
                else:
                    yield chunk
                try:
                    chunk = await iterator.__anext__()
                except StopAsyncIteration:
                    chunk = None
            if not finished:
                await finish(200, None)
        except AuditUnavailable:
            yield _sse_error("the gateway could not record this request in its audit store", "audit_unavailable")
        except BackendError as exc:
            if not finished:
                await finish(502, exc)
                yield _sse_error(f"backend failed mid-stream: {exc.failure.message}",
                                 f"backend_{exc.error_class.value}")
        except Exception as exc:  # a failure in the gateway itself (while settling): not the backend's, nor a 499
            yield await self._failed_mid_stream(ctx, stores, exc)
        finally:
            if not finished:  # the client went away (cancel/disconnect): settle in the background
                task = asyncio.ensure_future(self._cancelled(ctx, stores, stream, finish))
                _background.add(task)
                task.add_done_callback(_background.discard)
                with contextlib.suppress(BaseException):
                    await asyncio.shield(task)
            await stream.aclose()
            if ctx.span is not None:
                self._end_span(ctx, ctx.status_code or 499)

    async def _failed_mid_stream(self, ctx: _Ctx, stores: Stores, exc: Exception) -> bytes:
        """A failure in the gateway itself after the stream's 200 and some chunks (``_failed_itself``): a 500 record
        with its reservation released (unless the request's record was written before the failure), the
        Idempotency-Key freed, and the SSE error event to end the stream with."""
        message = self._failed_itself(ctx, exc, " mid-stream")
        with contextlib.suppress(AuditUnavailable):  # logged by _audit; the reservation is held until its expiry
            await self._unanswered(ctx, stores, 500, message, INTERNAL_ERROR, sent=True)
        await self._abandon(ctx, stores)
        return _sse_error(message, INTERNAL_ERROR)

    async def _cancelled(self, ctx: _Ctx, stores: Stores, stream: EngineStream, finish: Any) -> None:
        with contextlib.suppress(Exception):
            await stream.aclose()
        try:
            await finish(499, BackendError(Failure(ErrorClass.CANCELLED, "client cancelled the stream"),
                                           first_token_sent=True))
        except Exception:
            log.exception("settling a cancelled stream failed")

    def _stream_failed(self, ctx: _Ctx, backend: Backend, error: BackendError, latency_s: float) -> None:
        name = backend.model_deployment
        self.breaker(name).record_failure(error.error_class, refused=error.failure.refused)
        ctx.attempts.append(RoutingAttempt(backend=name, error_class=error.error_class.value,
                                           message=error.failure.message[:500], latency_ms=latency_s * 1000))
        ctx.backend_latency_s += latency_s

    # -- record ------------------------------------------------------------------------------------
    async def _audit(self, ctx: _Ctx, stores: Stores, status: int, charged: Usage | None = None,
                     charge: tuple[float, int] | None = None) -> None:
        """Write the request's record durably, with its budget settlement in the same transaction: commit
        ``charged`` (at ``charge`` when the caller priced it already), or release.

        If building the record fails, nothing is taken: the request is still unrecorded and its reservation
        unsettled, for the 500 record (``_unanswered``). If the write fails, the reservation stays ``reserved``
        (its worst case held) until the ledger's expiry releases it: the request is answered 503 and was never
        acknowledged.
        """
        actual = self._actual(ctx, charged, charge)
        table = ctx.table
        store_prompts = bool(table and table.audit_store_prompts)
        store_outputs = bool(table and table.audit_store_outputs)
        inputs_src = ctx.body.get("messages", ctx.body.get("prompt", ctx.body.get("input")))
        inputs, inputs_hash = redact(inputs_src, store_prompts)
        output, output_hash = redact(ctx.output, store_outputs)
        usage = ctx.usage
        record = AuditRecord(
            id=ctx.request_id, ts=ctx.ts, trace_id=ctx.trace_id, run_id=ctx.run_id, tenant=ctx.tenant,
            workflow=table.workflow if table else None, route=ctx.route.step if ctx.route else None,
            model=ctx.model, inputs=inputs, inputs_hash=inputs_hash,
            routing=RoutingDecision(backend=ctx.backend.model_deployment if ctx.backend and status < 400 else None,
                                    reason=ctx.reason, table_revision=table.revision if table else None,
                                    attempts=ctx.attempts),
            budget=[ctx.budget] if ctx.budget else [], cache_hit=ctx.cache_hit,
            usage=TokenUsage(prompt_tokens=usage.prompt_tokens, completion_tokens=usage.completion_tokens)
            if usage else None,
            output=output, output_hash=output_hash, status_code=status,
            latency_ms=(time.perf_counter() - ctx.started) * 1000)
        row = as_row(record)  # serialising is building: a record that cannot be takes no settlement
        settle = self._settlement(ctx, actual)
        ctx.status_code = status
        try:
            await asyncio.shield(self._writing(stores, stores.writer.put_row(row, settle), settle))
        except Exception as exc:  # a store outage: the writer logged the batch's traceback once, not one per request
            log.error("audit record %s could not be written (%s)", ctx.request_id, type(exc).__name__,
                      exc_info=not isinstance(exc, UNREACHABLE))
            raise AuditUnavailable(str(exc)) from exc
        if settle is not None:
            self._spent(ctx, settle)

    def _observe(self, ctx: _Ctx, outcome: str) -> None:
        ctx.outcome = outcome
        total = time.perf_counter() - ctx.started
        overhead = max(total - ctx.backend_latency_s, 0.0) if ctx.backend_latency_s else None
        backend = ctx.backend.model_deployment if ctx.backend and outcome == "ok" else None
        self.metrics.observe_request(ctx.route_id, backend, outcome, total, overhead)


_background: set[asyncio.Future[None]] = set()


class _ClosingStream(StreamingResponse):
    """Closes its generator however sending ends: Starlette leaves a generator whose client went away
    (the send raised) to the garbage collector, and with it the settlement of the budget and the audit."""

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            closer = getattr(self.body_iterator, "aclose", None)
            if closer is not None:
                await closer()


class AuditUnavailable(Exception):
    """The audit record could not be made durable: the request must not be acknowledged as a success."""


def _sse_error(message: str, code: str) -> bytes:
    """The last event of a stream that cannot go on: an OpenAI error object, as a non-streamed request would get."""
    return f"data: {json.dumps(error_object(message, 'server_error', None, code))}\n\n".encode()


def _output(path: str, data: Any) -> Any:
    """What the audit keeps of an answer (parsed): the messages / texts; an embedding is kept as its hash only."""
    if path == EMBEDDINGS or not isinstance(data, dict):
        return {"embeddings": len(data.get("data", [])) if isinstance(data, dict) else 0}
    out = []
    for choice in data.get("choices") or ():
        if isinstance(choice, dict):
            out.append(choice.get("message") if path == CHAT else choice.get("text"))
    return out
