"""What the workflow runtime tests (and their crash child process) share: a workflow, the real gateway
in-process over a FakeBackend, an in-memory retriever, and a webhook receiver that counts effects per key.

The receiver behaves as the ``Idempotency-Key`` contract asks of a real one: the first request with a
key acts (counted in ``effects``), later ones with the same key are answered from the first outcome
without acting again. Each request is counted in ``calls``. It can be told to act and then answer 500
(partial effects), or to act and then stall (a timeout, or a process to kill while it waits).
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx

from pilothouse.operator.api import AutonomousWorkflow, ModelDeployment, RoutingTable, VectorIndex
from pilothouse.operator.routing import Dependencies, compile_table
from pilothouse.serving.gateway import build_app
from pilothouse.serving.retrieval import Hit, Mode, RetrievalResult
from pilothouse.serving.runtime import GatewayClient

API_KEY = "sk-runtime-0123456789"
INVOICE = "Invoice INV-1001 from ACME GmbH dated 2026-03-01. Total due: 1,234.50 EUR."
FIELDS = {"vendor": "ACME GmbH", "invoice_number": "INV-1001", "date": "2026-03-01", "currency": "EUR",
          "total": 1234.5}
SCHEMA = {"type": "object", "required": ["vendor", "invoice_number", "date", "currency", "total"],
          "properties": {"vendor": {"type": "string"}, "invoice_number": {"type": "string"},
                         "date": {"type": "string"}, "currency": {"type": "string"}, "total": {"type": "number"}}}


def answer(**changes: Any) -> str:
    return json.dumps({**FIELDS, **changes})


def workflow(receiver_url: str, *, act_timeout_s: float = 5.0, risk: str = "low", when: str = "lowConfidence",
             act: dict[str, Any] | None = None, retrieve: dict[str, Any] | None = None) -> AutonomousWorkflow:
    """The invoice workflow; ``retrieve`` changes fields of its retrieve step (e.g. ``topK``, ``rerank``)."""
    act = act or {"webhook": {"url": f"{receiver_url}/erp/invoices", "timeoutSeconds": act_timeout_s},
                  "compensation": {"webhook": {"url": f"{receiver_url}/erp/invoices/cancel"}}}
    return AutonomousWorkflow.model_validate({
        "metadata": {"name": "invoices", "namespace": "finance"},
        "spec": {"mission": "extract five fields", "steps": [
            {"name": "context", "type": "retrieve", "retrieve": {"vectorIndexRef": "vendors", "topK": 2,
                                                                    **(retrieve or {})}},
            {"name": "extract", "type": "generate", "generate": {
                "tier": "small", "maxTokens": 256, "outputSchema": SCHEMA,
                "promptTemplate": "Extract the fields as JSON.\nVendors:\n{context}\nInvoice:\n{input}"}},
            {"name": "check", "type": "validate", "validate": {
                "minConfidence": 0.85, "fieldThresholds": {"total": 0.95},
                "requiredFields": ["vendor", "invoice_number", "total"]}},
            {"name": "post", "type": "act", "act": {**act, "risk": risk}},
            {"name": "approve", "type": "review", "review": {"when": when}},
        ], "audit": {"storeOutputs": True}},
    })


def table(wf: AutonomousWorkflow, backend_url: str) -> RoutingTable:
    small = ModelDeployment.model_validate({
        "metadata": {"name": "small", "namespace": "finance"},
        "spec": {"model": {"name": "org/small"}, "engine": "external", "external": {"url": backend_url},
                 "tier": "small", "pricing": {"inputPerMillionUSD": 100, "outputPerMillionUSD": 200}},
        "status": {"conditions": [{"type": "Ready", "status": "True", "reason": "EndpointHealthy",
                                   "lastTransitionTime": datetime.now(UTC).isoformat()}]}})
    vendors = VectorIndex.model_validate({
        "metadata": {"name": "vendors", "namespace": "finance"}, "spec": {"fields": {"dimension": 8}},
        "status": {"conditions": [{"type": "Ready", "status": "True", "reason": "CollectionReady",
                                   "lastTransitionTime": datetime.now(UTC).isoformat()}]}})
    compiled = compile_table(wf, Dependencies(models={"small": small}, indexes={"vendors": vendors}, budgets={}),
                             None, datetime.now(UTC))
    routes = [r.model_copy(update={"backends": [b.model_copy(update={"endpoint": backend_url})
                                                for b in r.backends]}) for r in compiled.routes]
    return compiled.model_copy(update={"routes": routes})


@contextlib.asynccontextmanager
async def gateway(folder: Path, routing: RoutingTable, store_url: str) -> AsyncIterator[tuple[Any, GatewayClient]]:
    """The real gateway app in this event loop (ASGI transport); yields (app, a GatewayClient on it)."""
    (folder / "routing.json").write_text(routing.model_dump_json(by_alias=True))
    (folder / "keys.json").write_text(json.dumps({API_KEY: "finance"}))
    app = build_app(str(folder / "routing.json"), api_keys=str(folder / "keys.json"), store_url=store_url)
    async with app.router.lifespan_context(app):
        client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gateway", timeout=30)
        async with client:
            yield app, GatewayClient("http://gateway", API_KEY, client=client)


class MemoryRetriever:
    """Retriever protocol over a few texts: a hit per text sharing a word with the query, by overlap."""

    def __init__(self, texts: dict[str, str]) -> None:
        self.texts = texts
        self.calls = 0

    def search(self, query: str, *, top_k: int, mode: Mode, filter: str | None = None) -> RetrievalResult:
        self.calls += 1
        words = set(query.lower().split())
        scored = [(len(words & set(text.lower().split())) / max(len(words), 1), doc_id, text)
                  for doc_id, text in self.texts.items()]
        hits = [Hit(doc_id, text, score) for score, doc_id, text in sorted(scored, reverse=True) if score > 0]
        return RetrievalResult(hits=hits[:top_k], mode=mode)


VENDORS = MemoryRetriever({"v1": "ACME GmbH, Berlin, vendor id 881, pays in EUR", "v2": "Globex Ltd, London"})


class Receiver:
    """The ERP webhook endpoint (see the module docstring); a thread, so a child process can call it too."""

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()
        self.effects: Counter[str] = Counter()
        self.undone: Counter[str] = Counter()
        self.bodies: dict[str, dict[str, Any]] = {}
        self.fail_status: int | None = None
        self.stall_s = 0.0
        self.stall_times = 0
        self.got_request = threading.Event()
        self._server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> Receiver:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *_: Any) -> None:
                pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers.get("content-length", 0))))
                key = self.headers.get("Idempotency-Key", "")
                receiver.calls[key] += 1
                if key not in receiver.bodies:  # first time: act
                    receiver.bodies[key] = body
                    if body.get("compensates"):
                        receiver.undone[body["compensates"]] += 1
                    else:
                        receiver.effects[key] += 1
                status, stall_s = receiver.outcome(body)
                receiver.got_request.set()
                time.sleep(stall_s)
                payload = json.dumps({"ok": status == 200, "key": key}).encode()
                with contextlib.suppress(OSError):  # the caller may have gone (timeout, killed)
                    self.send_response(status)
                    self.send_header("content-type", "application/json")
                    self.send_header("content-length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *_: object) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def outcome(self, body: dict[str, Any]) -> tuple[int, float]:
        """(HTTP status, seconds to stall before answering) for a request already counted; a subclass may
        script its own. Here: ``fail_status`` for every action (an undo always works), ``stall`` as told."""
        stall_s = 0.0
        if self.stall_times > 0:
            self.stall_times -= 1
            stall_s = self.stall_s
        return (200 if body.get("compensates") else self.fail_status or 200), stall_s

    def stall(self, seconds: float, times: int = 1) -> None:
        self.stall_s, self.stall_times = seconds, times


@contextlib.contextmanager
def receiver() -> Iterator[Receiver]:
    with Receiver() as r:
        yield r
