"""Audit records for the requests the gateway answered without routing them.

The request path writes one record per request it routes (``DataPlane._audit``). The rest are
requests too, and the refused ones are what a security or cost review asks about first: no or a
wrong API key (401), a body over the limit (413) or not UTF-8, malformed JSON or fields (400), an
unknown model (404), ``max_tokens`` above the route's limit, an Idempotency-Key conflict (409), no
RoutingTable yet (503), and idempotent replays (the stored answer served again). ``AuditRefusals``
is the outermost middleware of the OpenAI endpoints: it sees every answer, and writes a record for
each one the request path did not.

The record is written after the answer went out. Nothing was acknowledged that it must back (a
refusal charged nothing, a replay's charge was recorded with its first answer), so a refused caller
waits for no disk, and a flood of refusals costs the store a share of one group commit each. Prompt
content is never kept, only its hash: the workflow's audit policy, which decides that, is not known
before routing.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .audit import AuditRecord, RoutingDecision, content_hash
from .openai_schema import openai_endpoint
from .stores import UNREACHABLE

if TYPE_CHECKING:
    from .dataplane import _Ctx

log = logging.getLogger(__name__)

CTX_STATE = "pilothouse_ctx"  # scope["state"] key under which the request path leaves its context
UNAUTHENTICATED = "-"  # the tenant of a request refused before its key was known
_ERROR_BODY_LIMIT = 16 * 1024  # an OpenAI error object is well under this; a larger body is not one


def refusal(*, request_id: str, trace_id: str, tenant: str, model: str | None, body: bytes | None, status: int,
            error: bytes, latency_ms: float, replay_of: str | None = None, table_revision: int | None = None,
            workflow: str | None = None, route: str | None = None) -> AuditRecord:
    """The record of one request answered outside the routing path: what was asked, and why it was refused."""
    code, message = _error(error)
    if replay_of is not None:
        reason = f"idempotent replay: the stored answer of request {replay_of}, which first used this Idempotency-Key"
    else:
        reason = f"refused before routing ({code or status}): {message}"[:1000]
    return AuditRecord(id=request_id, ts=datetime.now(UTC), trace_id=trace_id, tenant=tenant, workflow=workflow,
                       route=route, model=model, inputs_hash=content_hash(body) if body else None,
                       routing=RoutingDecision(reason=reason, table_revision=table_revision), status_code=status,
                       latency_ms=latency_ms)


def _error(body: bytes) -> tuple[str | None, str]:
    """(code, message) of an OpenAI error object; (None, "") for anything else."""
    try:
        error = json.loads(body).get("error") if body else None
    except (ValueError, AttributeError):
        return None, ""
    if not isinstance(error, dict):
        return None, ""
    return (str(error["code"]) if error.get("code") else None), str(error.get("message") or "")


def _model(body: bytes | None) -> str | None:
    """The ``model`` a refused body asked for, if it parses; any body at all may arrive here."""
    try:
        model = json.loads(body).get("model") if body else None
    except (ValueError, AttributeError, RecursionError):  # RecursionError: nesting deeper than json's stack
        return None
    return model[:256] if isinstance(model, str) else None


class AuditRefusals:
    """ASGI middleware: a record for every answer of an OpenAI endpoint that the request path did not audit.

    ``write`` is the audit store's writer (``DataPlane.record``); a failure to write is logged, never
    turned into an error for a caller who has already been answered.
    """

    def __init__(self, app: ASGIApp, write: Callable[[AuditRecord], Coroutine[Any, Any, None]],
                 new_id: Callable[[], str], trace_id: Callable[[str | None], str], id_header: str) -> None:
        self.app = app
        self.write = write
        self.new_id = new_id
        self.trace_id = trace_id
        self.id_header = id_header.lower().encode("latin-1")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if openai_endpoint(scope) is None or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        state = scope.setdefault("state", {})
        chunks: list[bytes] = []
        complete = False
        status = 0
        error: list[bytes] = []
        request_id: str | None = None

        async def receive_and_keep() -> Message:
            nonlocal complete
            message = await receive()
            if message["type"] == "http.request":
                chunks.append(message.get("body", b""))
                complete = not message.get("more_body", False)
            return message

        async def send_and_watch(message: Message) -> None:
            nonlocal status, request_id
            if message["type"] == "http.response.start":
                status = message["status"]
                if CTX_STATE not in state:  # refused before the request path made an id: give it one
                    request_id = self.new_id()
                    message["headers"] = [*message.get("headers", ()), (self.id_header, request_id.encode())]
            elif message["type"] == "http.response.body" and status >= 400 and sum(map(len, error)) < _ERROR_BODY_LIMIT:
                error.append(message.get("body", b""))
            await send(message)

        await self.app(scope, receive_and_keep, send_and_watch)
        ctx: _Ctx | None = state.get(CTX_STATE)
        if not status or (ctx is not None and ctx.status_code):
            return  # no answer was started, or the request path wrote this request's record itself
        body = b"".join(chunks) if complete else None
        answer: dict[str, Any] = {"body": body, "status": status, "error": b"".join(error),
                                  "latency_ms": (time.perf_counter() - started) * 1000}
        if ctx is not None:
            record = refusal(request_id=ctx.request_id, trace_id=ctx.trace_id, tenant=ctx.tenant, model=ctx.model,
                             replay_of=ctx.replay_of, table_revision=ctx.table.revision if ctx.table else None,
                             workflow=ctx.table.workflow if ctx.table else None,
                             route=ctx.route.step if ctx.route else None, **answer)
        else:
            traceparent = dict(scope.get("headers") or ()).get(b"traceparent")
            record = refusal(request_id=request_id or self.new_id(),
                             trace_id=self.trace_id(traceparent.decode("latin-1") if traceparent else None),
                             tenant=str(state.get("tenant", UNAUTHENTICATED)), model=_model(body), **answer)
        try:
            await self.write(record)
        except Exception as exc:  # a store outage: the writer logged the batch's traceback once, not one per request
            log.error("the audit record of refused request %s could not be written (%s)", record.id, type(exc).__name__,
                      exc_info=not isinstance(exc, UNREACHABLE))
