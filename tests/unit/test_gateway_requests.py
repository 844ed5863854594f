"""The request path of the gateway app against two controllable fake backends (primary ``small``, fallback ``large``).

The app runs in the test's event loop through httpx's ASGITransport (its lifespan entered by hand),
so the fakes (aiohttp servers in the same loop) and the gateway's pooled client talk real HTTP.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio
import sqlalchemy as sa
from fastapi import FastAPI

from pilothouse.operator.api import RoutingTable
from pilothouse.operator.api.common import SecretKeyRef
from pilothouse.operator.api.ledger import ledger as ledger_table
from pilothouse.operator.api.routing import BudgetLimit, BudgetRule
from pilothouse.operator.routing import Dependencies, compile_table
from pilothouse.serving import dataplane
from pilothouse.serving.audit import AuditLog
from pilothouse.serving.breaker import BreakerState
from pilothouse.serving.dataplane import estimate_prompt_tokens, new_id, resolve, trace_id
from pilothouse.serving.engines.external import ExternalEngine
from pilothouse.serving.gateway import build_app
from pilothouse.serving.ledger import Ledger
from pilothouse.serving.metrics import Metrics
from tests.fakes.openai_backend import FakeBackend
from tests.polling import eventually

from .factories import model, workflow

AT = datetime(2026, 1, 1, tzinfo=UTC)
KEYS = {"sk-team-a-0123456789": "team-a", "sk-team-b-0123456789": "team-b"}
A = {"Authorization": "Bearer sk-team-a-0123456789"}
B = {"Authorization": "Bearer sk-team-b-0123456789"}
HELLO = [{"role": "user", "content": "hello there"}]


def chat(**extra: Any) -> dict[str, Any]:
    return {"model": "wf/extract", "messages": HELLO, "max_tokens": 8, **extra}


def make_table(primary: FakeBackend, fallback: FakeBackend, *, budget: BudgetRule | None = None,
               windows: dict[str, int | None] | None = None, store_prompts: bool = False) -> RoutingTable:
    deps = Dependencies(models={"small": model("small", fallback=["large"]), "large": model("large", tier="large")},
                        indexes={}, budgets={})
    steps = [{"name": "extract", "type": "generate", "generate": {"tier": "small", "promptTemplate": "{input}"}}]
    compiled = compile_table(workflow(retrieve=False, steps=steps), deps, None, AT)
    urls = {"small": primary.url, "large": fallback.url}
    windows = windows or {}
    routes = [r.model_copy(update={"backends": [
        b.model_copy(update={"endpoint": urls[b.model_deployment],
                             "context_window": windows.get(b.model_deployment, b.context_window)})
        for b in r.backends]}) for r in compiled.routes]
    return compiled.model_copy(update={"routes": routes, "budget": budget, "audit_store_prompts": store_prompts})


def sub(tmp_path: Path, name: str) -> Path:
    folder = tmp_path / name
    folder.mkdir()
    return folder


@pytest_asyncio.fixture
async def fakes() -> AsyncIterator[tuple[FakeBackend, FakeBackend]]:
    async with FakeBackend(model="org/small") as primary, FakeBackend(model="org/large") as fallback:
        yield primary, fallback


class Gateway:
    def __init__(self, app: FastAPI, client: httpx.AsyncClient, store_url: str) -> None:
        self.app, self.client, self.store_url = app, client, store_url

    async def post(self, body: dict[str, Any], path: str = "/v1/chat/completions",
                   headers: dict[str, str] | None = None) -> httpx.Response:
        return await self.client.post(path, json=body, headers={**A, **(headers or {})})

    def audit(self, response: httpx.Response) -> Any:
        with AuditLog(self.store_url, create=False) as log:
            return log.get(response.headers["x-pilothouse-request-id"])

    def breaker(self, name: str) -> BreakerState:
        return self.app.state.dataplane.breaker(name).state


@contextlib.asynccontextmanager
async def gateway(tmp_path: Path, table: RoutingTable, root_path: str = "") -> AsyncIterator[Gateway]:
    routing = tmp_path / "routing.json"
    routing.write_text(table.model_dump_json(by_alias=True))
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps(KEYS))
    store_url = f"sqlite:///{tmp_path}/store.db"
    app = build_app(str(routing), api_keys=str(keys), store_url=store_url)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app, root_path=root_path)
        async with httpx.AsyncClient(transport=transport, base_url=f"http://gateway{root_path}", timeout=30) as client:
            yield Gateway(app, client, store_url)


async def test_success_returns_the_backends_answer_with_usage_and_request_id(tmp_path: Path, fakes: Any) -> None:
    primary, fallback = fakes
    async with gateway(tmp_path, make_table(primary, fallback, store_prompts=True)) as gw:
        traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
        r = await gw.post(chat(), headers={"traceparent": traceparent})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["model"] == "org/small" and body["usage"] == {"prompt_tokens": 2, "completion_tokens": 8,
                                                                  "total_tokens": 10}
        assert primary.served["/v1/chat/completions"] == 1 and fallback.requests == 0
        record = gw.audit(r)
        assert record is not None and record.tenant == "team-a" and record.status_code == 200
        assert record.trace_id == "0af7651916cd43dd8448eb211c80319c"
        assert record.routing.backend == "small" and [a.backend for a in record.routing.attempts] == ["small"]
        assert record.usage.completion_tokens == 8 and record.inputs == HELLO and record.output is None
        assert record.output_hash.startswith("sha256:")
        # the bare step name works too; completions and embeddings go through the same path
        assert (await gw.post({**chat(), "model": "extract"})).status_code == 200
        done = await gw.post({"model": "wf/extract", "prompt": "say hi", "max_tokens": 4}, "/v1/completions")
        assert done.status_code == 200 and done.json()["usage"]["completion_tokens"] == 4
        emb = await gw.post({"model": "wf/extract", "input": ["a b", "c"]}, "/v1/embeddings")
        assert emb.status_code == 200 and len(emb.json()["data"]) == 2
        assert gw.audit(emb) is not None


async def test_unknown_model_and_max_tokens_over_the_route(tmp_path: Path, fakes: Any) -> None:
    primary, fallback = fakes
    async with gateway(tmp_path, make_table(primary, fallback)) as gw:
        r = await gw.post({**chat(), "model": "wf/nope"})
        assert r.status_code == 404
        assert r.json()["error"]["code"] == "model_not_found" and r.json()["error"]["param"] == "model"
        r = await gw.post(chat(max_tokens=100_000))
        assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
        bad = await gw.post({"model": "wf/extract", "messages": []})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "messages"
        assert primary.requests == 0


async def test_dead_primary_falls_back_and_opens_the_breaker(tmp_path: Path, fakes: Any) -> None:
    primary, fallback = fakes
    async with gateway(tmp_path, make_table(primary, fallback)) as gw:
        await primary.die()
        first = await gw.post(chat())
        assert first.status_code == 200 and first.json()["model"] == "org/large"
        attempts = gw.audit(first).routing.attempts
        assert [(a.backend, a.error_class) for a in attempts] == [("small", "connection"), ("large", None)]
        assert gw.breaker("small") is BreakerState.OPEN
        second = await gw.post(chat())
        assert second.status_code == 200
        assert [a.backend for a in gw.audit(second).routing.attempts] == ["large"]  # no attempt on the dead one
        assert fallback.served["/v1/chat/completions"] == 2
        metrics = (await gw.client.get("/metrics")).text
        assert 'pilothouse_circuit_state{backend="small"} 2.0' in metrics
        assert 'pilothouse_fallbacks_total{from="small",reason="connection",to="large"} 1.0' in metrics


async def test_rate_limited_primary_falls_back_without_opening_the_breaker(tmp_path: Path, fakes: Any) -> None:
    primary, fallback = fakes
    async with gateway(tmp_path, make_table(primary, fallback)) as gw:
        primary.fail_with(429)
        for _ in range(5):
            r = await gw.post(chat())
            assert r.status_code == 200 and r.json()["model"] == "org/large"
        assert primary.injected == 5  # tried every time: a 429 says nothing about its health
        assert gw.breaker("small") is BreakerState.CLOSED
        primary.reset()
        assert (await gw.post(chat())).json()["model"] == "org/small"


async def test_context_length_goes_only_to_a_larger_context_backend(tmp_path: Path, fakes: Any) -> None:
    primary, fallback = fakes
    long_prompt = [{"role": "user", "content": " ".join(["word"] * 200)}]
    # the table knows the small window: the plan skips small without calling it
    table = make_table(primary, fallback, windows={"small": 128, "large": 100_000})
    async with gateway(tmp_path, table) as gw:
        r = await gw.post(chat(messages=long_prompt))
        assert r.status_code == 200 and r.json()["model"] == "org/large"
        assert primary.requests == 0
    # the table does not know it: small answers 400 context length, only a larger declared window is tried
    primary.context_window(64)
    table = make_table(primary, fallback, windows={"small": None, "large": 100_000})
    async with gateway(sub(tmp_path, "second"), table) as gw:
        r = await gw.post(chat(messages=long_prompt))
        assert r.status_code == 200 and r.json()["model"] == "org/large"
        assert primary.requests == 1
        assert [a.error_class for a in gw.audit(r).routing.attempts] == ["context_length", None]
        assert gw.breaker("small") is BreakerState.CLOSED
    # neither fits: a 400 naming the context, never a 5xx
    table = make_table(primary, fallback, windows={"small": 128, "large": 128})
    async with gateway(sub(tmp_path, "third"), table) as gw:
        r = await gw.post(chat(messages=long_prompt))
        assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"


def rule(cap: float, **extra: Any) -> BudgetRule:
    return BudgetRule(policy="team", state="Ok", action="none",
                      limits=[BudgetLimit(window="day", max_cost_usd=cap)], **extra)


async def test_budget_reject_names_the_policy_and_window(tmp_path: Path, fakes: Any) -> None:
    primary, fallback = fakes
    async with gateway(tmp_path, make_table(primary, fallback, budget=rule(0.000001))) as gw:
        r = await gw.post(chat())
        assert r.status_code == 429
        message = r.json()["error"]["message"]
        assert "budget team exhausted for day" in message and "resets at" in message
        assert r.json()["error"]["code"] == "budget_exhausted"
        assert primary.requests == 0 and fallback.requests == 0
        assert gw.audit(r).budget[0].denied == message
    exhausted = BudgetRule(policy="team", state="Exhausted", action="reject",
                           limits=[BudgetLimit(window="month", max_cost_usd=1)])
    async with gateway(sub(tmp_path, "exhausted"), make_table(primary, fallback, budget=exhausted)) as gw:
        r = await gw.post(chat())
        assert r.status_code == 429 and "team" in r.json()["error"]["message"]
        assert "month" in r.json()["error"]["message"]


async def test_budget_queue_waits_then_429(tmp_path: Path, fakes: Any) -> None:
    primary, fallback = fakes
    async with gateway(tmp_path, make_table(primary, fallback, budget=rule(0.000001, queue_timeout_seconds=1))) as gw:
        started = asyncio.get_running_loop().time()
        r = await gw.post(chat())
        assert r.status_code == 429 and "queue" in r.json()["error"]["message"]
        assert asyncio.get_running_loop().time() - started >= 0.5


async def test_200_concurrent_requests_never_overspend(tmp_path: Path, fakes: Any) -> None:
    primary, fallback = fakes
    primary.latency(0.05)
    worst = (estimate_prompt_tokens("/chat/completions", chat()) * 1 + 8 * 2) / 1_000_000
    cap = 50 * worst
    async with gateway(tmp_path, make_table(primary, fallback, budget=rule(cap))) as gw:
        responses = await asyncio.gather(*(gw.post(chat()) for _ in range(200)))
        statuses = [r.status_code for r in responses]
        assert set(statuses) <= {200, 429}, statuses
        assert 50 <= statuses.count(200) <= 60, statuses.count(200)  # actual cost is ~17/18 of the worst case
        ledger = Ledger(gw.store_url)
        try:
            since = datetime.now(UTC) - timedelta(days=2)
            spent = ledger.spend("default", "team", since)
            assert spent.cost_usd <= cap + 1e-9
            # once idle, the gateway returns its budget lease: nothing left reserved
            await eventually(lambda: ledger.in_flight("default", "team", since) == (0.0, 0), timeout=5)
        finally:
            ledger.close()
        for r in responses:
            if r.status_code == 200:
                assert gw.audit(r).budget[0].committed_usd is not None


async def test_idempotency_replay_and_conflict(tmp_path: Path, fakes: Any) -> None:
    primary, fallback = fakes
    async with gateway(tmp_path, make_table(primary, fallback)) as gw:
        key = {"Idempotency-Key": "order-42"}
        first = await gw.post(chat(), headers=key)
        assert first.status_code == 200 and "x-pilothouse-idempotent-replay" not in first.headers
        again = await gw.post(chat(), headers=key)
        assert again.status_code == 200 and again.headers["x-pilothouse-idempotent-replay"] == "true"
        assert again.content == first.content and primary.requests == 1
        assert again.headers["x-pilothouse-request-id"] == first.headers["x-pilothouse-request-id"]
        other = await gw.post(chat(max_tokens=4), headers=key)
        assert other.status_code == 409 and primary.requests == 1
        # another tenant's key space is its own
        assert (await gw.client.post("/v1/chat/completions", json=chat(), headers={**B, **key})).status_code == 200
        assert primary.requests == 2
        # a failed request does not keep its key: the retry is served
        primary.fail_with(503)
        fallback.fail_with(503)
        failed = await gw.post(chat(max_tokens=3), headers={"Idempotency-Key": "k2"})
        assert failed.status_code == 502
        primary.reset()
        fallback.reset()
        assert (await gw.post(chat(max_tokens=3), headers={"Idempotency-Key": "k2"})).status_code == 200


async def test_cache_hit_is_free_and_tenant_partitioned(tmp_path: Path, fakes: Any) -> None:
    primary, fallback = fakes
    async with gateway(tmp_path, make_table(primary, fallback, budget=rule(1.0))) as gw:
        first = await gw.post(chat(temperature=0))
        hit = await gw.post(chat(temperature=0))
        assert hit.status_code == 200 and hit.headers["x-pilothouse-cache"] == "hit"
        assert hit.json()["choices"] == first.json()["choices"] and primary.requests == 1
        record = gw.audit(hit)
        assert record.cache_hit and record.budget == []
        other = await gw.client.post("/v1/chat/completions", json=chat(temperature=0), headers=B)
        assert other.status_code == 200 and "x-pilothouse-cache" not in other.headers and primary.requests == 2
        sampled = [await gw.post(chat()) for _ in range(2)]  # not deterministic: never cached
        assert all("x-pilothouse-cache" not in r.headers for r in sampled) and primary.requests == 4
        metrics = (await gw.client.get("/metrics")).text
        assert 'pilothouse_cache_hits_total{route="wf/extract"} 1.0' in metrics


async def test_every_acknowledged_response_has_an_audit_record(tmp_path: Path, fakes: Any) -> None:
    primary, fallback = fakes
    async with gateway(tmp_path, make_table(primary, fallback)) as gw:
        responses = await asyncio.gather(*(gw.post(chat(messages=[{"role": "user", "content": f"q {i}"}]))
                                           for i in range(30)))
        for r in responses:
            assert r.status_code == 200
            record = gw.audit(r)
            assert record is not None and record.routing.backend == "small" and record.inputs is None
            assert record.inputs_hash.startswith("sha256:")


async def test_the_backend_gets_the_request_as_the_client_sent_it(tmp_path: Path, fakes: Any) -> None:
    """Unknown fields, integers beyond 64 bits and an integer where a number is expected reach the backend as sent;
    only ``model`` is the backend's, and ``max_tokens`` is added when the client gave none."""
    primary, fallback = fakes
    sent = {"model": "wf/extract", "messages": HELLO, "seed": 2**70, "temperature": 1,
            "structured_outputs": {"json": {"type": "object"}}, "metadata": {"trace": "x"}}
    async with gateway(tmp_path, make_table(primary, fallback)) as gw:
        assert (await gw.post(sent)).status_code == 200
        received = primary.last_body
    route_limit = received["max_tokens"]
    assert received == {**sent, "model": "org/small", "max_tokens": route_limit}
    assert json.dumps(received) == json.dumps({**sent, "model": "org/small", "max_tokens": route_limit})


def sse_events(text: str) -> list[Any]:
    return [json.loads(line[6:]) if line != "data: [DONE]" else "[DONE]"
            for line in text.splitlines() if line.startswith("data: ")]


async def test_streaming_passes_chunks_through_and_falls_back_before_the_first(tmp_path: Path,
                                                                               fakes: Any) -> None:
    primary, fallback = fakes
    async with gateway(tmp_path, make_table(primary, fallback, budget=rule(1.0))) as gw:
        r = await gw.post(chat(stream=True))
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r.text)
        assert events[-1] == "[DONE]"
        assert r.content == b"".join(primary.last_stream)  # byte for byte
        text = "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1] if e["choices"])
        assert len(text.split()) == 8
        record = gw.audit(r)
        assert record.usage.completion_tokens == 8 and record.budget[0].committed_usd is not None
        await primary.die()
        r = await gw.post(chat(stream=True))
        assert r.status_code == 200 and sse_events(r.text)[1]["model"] == "org/large"
        assert [a.backend for a in gw.audit(r).routing.attempts] == ["small", "large"]


async def test_a_stream_failing_mid_way_settles_and_reports(tmp_path: Path, fakes: Any) -> None:
    primary, fallback = fakes
    async with gateway(tmp_path, make_table(primary, fallback, budget=rule(1.0))) as gw:
        primary.break_stream_after(3)
        r = await gw.post(chat(stream=True))
        events = sse_events(r.text)
        assert "error" in events[-1] and fallback.requests == 0  # never spliced onto another backend
        record = gw.audit(r)
        assert record.status_code == 502 and record.budget[0].committed_usd is not None
        ledger = Ledger(gw.store_url)
        try:
            since = datetime.now(UTC) - timedelta(days=2)
            assert ledger.spend("default", "team", since).cost_usd == pytest.approx(record.budget[0].committed_usd)
        finally:
            ledger.close()
    ledger = Ledger(gw.store_url)  # the gateway has stopped and returned its budget lease: nothing in flight
    try:
        assert ledger.in_flight("default", "team", datetime.now(UTC) - timedelta(days=2)) == (0.0, 0)
    finally:
        ledger.close()


async def test_all_backends_down_is_a_5xx_and_releases(tmp_path: Path, fakes: Any) -> None:
    primary, fallback = fakes
    async with gateway(tmp_path, make_table(primary, fallback, budget=rule(1.0))) as gw:
        await primary.die()
        await fallback.die()
        r = await gw.post(chat())
        assert r.status_code == 502 and r.json()["error"]["code"] == "backend_connection"
        assert gw.audit(r).budget[0].released


async def test_metrics_endpoint(tmp_path: Path, fakes: Any) -> None:
    primary, fallback = fakes
    async with gateway(tmp_path, make_table(primary, fallback)) as gw:
        assert (await gw.post(chat())).status_code == 200
        metrics = await gw.client.get("/metrics")
        assert metrics.status_code == 200
        assert 'pilothouse_requests_total{backend="small",outcome="ok",route="wf/extract"} 1.0' in metrics.text
        assert "pilothouse_gateway_overhead_seconds_count 1.0" in metrics.text
        assert 'pilothouse_table_revision{workflow="wf"}' in metrics.text


async def test_a_rotated_backend_key_is_used_from_the_next_request(tmp_path: Path, fakes: Any,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The gateway keeps each HTTP backend's engine for reuse; a key rotated in the Secret (its env var) must still
    reach the backend with the very next request, and the old key must not."""
    primary, fallback = fakes
    ref = SecretKeyRef(name="openai-key", key="api.key")
    table = make_table(primary, fallback)
    table = table.model_copy(update={"routes": [r.model_copy(update={"backends": [
        b.model_copy(update={"api_key_secret_ref": ref}) for b in r.backends]}) for r in table.routes]})
    monkeypatch.setenv(ref.env_var, "sk-old")
    primary.api_key = "sk-old"
    async with gateway(tmp_path, table) as gw:
        assert (await gw.post(chat())).status_code == 200
        assert (await gw.post(chat())).status_code == 200
        primary.api_key = "sk-new"  # the backend takes only the new key from now on
        monkeypatch.setenv(ref.env_var, "sk-new")
        r = await gw.post(chat())
        assert r.status_code == 200, r.text
        assert gw.audit(r).routing.attempts[0].error_class is None  # the primary answered: no fallback
        assert primary.served["/v1/chat/completions"] == 3 and fallback.requests == 0


def test_helpers() -> None:
    assert trace_id("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01") == "0af7651916cd43dd8448eb211c80319c"
    assert len(trace_id("garbage")) == 32 and trace_id(None) != trace_id(None)
    assert SecretKeyRef(name="openai-key", key="api.key").env_var == "PILOTHOUSE_SECRET_OPENAI_KEY_API_KEY"
    assert estimate_prompt_tokens("/completions", {"prompt": "abcdefgh"}) == 2


def test_request_ids_are_unique_and_sort_in_creation_order() -> None:
    """They key the audit records and ledger rows: ordered, each insert appends to its index."""
    first = [new_id() for _ in range(5000)]
    time.sleep(0.002)
    later = new_id()
    assert len(set(first)) == len(first) and all(re.fullmatch(r"[0-9a-f]{32}", i) for i in first)
    assert max(first) < later
    assert abs(int(later[:12], 16) / 1000 - time.time()) < 5  # the prefix is the creation time


def test_resolve_accepts_the_bare_step_only_when_unambiguous() -> None:
    table = RoutingTable.model_validate({
        "workflow": "wf", "namespace": "default", "revision": 1, "generatedAt": AT.isoformat(), "degraded": False,
        "routes": [{"step": "a", "tier": "small", "backends": [], "maxTokens": 8}]})
    assert resolve(table, "wf/a") is not None and resolve(table, "a") is not None
    assert resolve(table, "other/a") is None and resolve(table, "b") is None


async def test_idempotent_stream_replays_the_whole_stream(tmp_path: Path, fakes: Any) -> None:
    primary, fallback = fakes
    async with gateway(tmp_path, make_table(primary, fallback)) as gw:
        key = {"Idempotency-Key": "stream-1"}
        first = await gw.post(chat(stream=True), headers=key)
        again = await gw.post(chat(stream=True), headers=key)
        assert again.headers["x-pilothouse-idempotent-replay"] == "true"
        assert again.content == first.content and sse_events(again.text)[-1] == "[DONE]"
        assert primary.requests == 1


async def test_an_audit_store_failure_is_a_503_not_an_ack(tmp_path: Path, fakes: Any) -> None:
    primary, fallback = fakes
    async with gateway(tmp_path, make_table(primary, fallback, budget=rule(1.0))) as gw:
        stores = await gw.app.state.dataplane.stores()

        def broken(rows: Any, also: Any = None) -> tuple[int, None]:
            raise RuntimeError("disk full")

        stores.audit.insert_rows_with = broken
        r = await gw.post(chat())
        assert r.status_code == 503 and r.json()["error"]["code"] == "audit_unavailable"
        ledger = Ledger(gw.store_url)
        try:  # the commit shares the record's transaction: neither happened
            assert ledger.spend("default", "team", AT) == (0.0, 0)
            assert ledger.in_flight("default", "team", AT).cost_usd > 0  # held until the ledger's expiry
        finally:
            ledger.close()


async def test_a_key_a_store_outage_kept_from_release_is_released_once_the_store_is_back(tmp_path: Path,
                                                                                          fakes: Any) -> None:
    """The store failed the audit write and then the key's release: the key stays claimed; retries are told the
    request is in progress until the next upkeep after the store is back releases it, not for half an hour."""
    primary, fallback = fakes
    async with gateway(tmp_path, make_table(primary, fallback)) as gw:
        plane = gw.app.state.dataplane
        stores = await plane.stores()
        down = sa.exc.OperationalError("INSERT", {}, ConnectionError("server closed the connection unexpectedly"))

        def unreachable(*_: Any, **__: Any) -> Any:
            raise down

        key = {"Idempotency-Key": "order-7"}
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(stores.audit, "insert_rows_with", unreachable)
            patch.setattr(stores.idempotency, "abandon", unreachable)
            failed = await gw.post(chat(), headers=key)
        assert failed.status_code == 503 and failed.json()["error"]["code"] == "audit_unavailable"
        retry = await gw.post(chat(), headers=key)
        assert retry.status_code == 409 and "in progress" in retry.json()["error"]["message"]
        async def dispatched() -> httpx.Response | None:
            answer = await gw.post(chat(), headers=key)
            return answer if answer.status_code != 409 else None

        upkeep = asyncio.create_task(plane.maintain(interval_s=0.2))
        try:
            answered = await eventually(dispatched, timeout=5.0)
        finally:
            upkeep.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await upkeep
        assert answered.status_code == 200 and "x-pilothouse-idempotent-replay" not in answered.headers
        assert primary.requests == 2  # the failed attempt and the retry: the key answered for neither


async def test_a_client_that_leaves_mid_stream_leaves_no_reservation(tmp_path: Path, fakes: Any) -> None:
    primary, fallback = fakes
    primary.token_interval(0.05)
    async with gateway(tmp_path, make_table(primary, fallback, budget=rule(1.0))) as gw:
        body = json.dumps(chat(stream=True)).encode()
        scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.4"}, "http_version": "1.1",
                 "method": "POST", "scheme": "http", "path": "/v1/chat/completions", "raw_path": b"",
                 "query_string": b"", "root_path": "", "server": ("gw", 80), "client": ("127.0.0.1", 1),
                 "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                             (b"authorization", A["Authorization"].encode())]}
        sent: list[dict[str, Any]] = []
        messages = [{"type": "http.request", "body": body, "more_body": False}]

        async def receive() -> dict[str, Any]:
            if messages:
                return messages.pop(0)
            await asyncio.sleep(3600)
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.body" and any(m["type"] == "http.response.body" for m in sent):
                raise OSError("client went away")
            sent.append(message)

        with contextlib.suppress(Exception):
            await gw.app(scope, receive, send)
        request_id = dict(sent[0]["headers"])[b"x-pilothouse-request-id"].decode()
        ledger = Ledger(gw.store_url)
        try:
            for _ in range(200):
                with AuditLog(gw.store_url, create=False) as log:
                    record = log.get(request_id)
                if record is not None and ledger.in_flight("default", "team", AT) == (0.0, 0):
                    break
                await asyncio.sleep(0.02)
            assert record is not None and record.status_code == 499
            assert record.routing.attempts[-1].error_class == "cancelled"
            assert ledger.in_flight("default", "team", AT) == (0.0, 0)
        finally:
            ledger.close()


@pytest.mark.parametrize("stream", [False, True], ids=["complete", "stream before its first chunk"])
async def test_a_request_cancelled_while_its_backend_works_gives_its_budget_back_and_is_recorded(
        tmp_path: Path, fakes: Any, stream: bool) -> None:
    """The client left before any answer: its lease goes back, nothing is charged, and a 499 record names the
    backend that was working, written with the release in one transaction."""
    primary, fallback = fakes
    primary.stall(30.0)
    async with gateway(tmp_path, make_table(primary, fallback, budget=rule(1.0))) as gw:
        request = asyncio.create_task(gw.post(chat(stream=stream)))
        await eventually(lambda: primary.requests == 1, timeout=5.0)
        ledger = Ledger(gw.store_url)
        try:
            assert ledger.in_flight("default", "team", AT) != (0.0, 0)  # its lease holds its worst case
            request.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await request
            await eventually(lambda: ledger.in_flight("default", "team", AT) == (0.0, 0), timeout=5.0)
        finally:
            ledger.close()
        with AuditLog(gw.store_url, create=False) as log:
            [record] = log.tail()
        assert record.status_code == 499 and record.usage is None and record.routing.backend is None
        assert [(a.backend, a.error_class) for a in record.routing.attempts] == [("small", "cancelled")]
        [trail] = record.budget
        assert trail.released and trail.committed_usd is None and trail.reserved_usd
        assert gw.breaker("small") is BreakerState.CLOSED  # the client left; the backend did not fail


async def nothing_charged(gw: Any, record: Any) -> None:
    """The record's budget trail says released, nothing committed, and the ledger soon holds nothing in flight."""
    [trail] = record.budget
    assert trail.released and trail.committed_usd is None
    ledger = Ledger(gw.store_url)
    try:
        await eventually(lambda: ledger.in_flight("default", "team", AT) == (0.0, 0), timeout=5.0)
    finally:
        ledger.close()


async def test_a_failure_in_the_gateway_itself_is_an_openai_500_with_its_record_and_nothing_charged(
        tmp_path: Path, fakes: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """A bug on the request path (here: in the engine client) answers a 500 in OpenAI's shape naming the request
    id, keeps the traceback in the log only, records the request, and gives its budget back."""
    primary, fallback = fakes

    async def broken(*_: Any) -> None:
        raise KeyError("a bug")

    async with gateway(tmp_path, make_table(primary, fallback, budget=rule(1.0))) as gw:
        monkeypatch.setattr(ExternalEngine, "complete", broken)
        answer = await gw.post(chat())
        request_id = answer.headers["x-pilothouse-request-id"]
        assert answer.status_code == 500 and "Traceback" not in answer.text
        error = answer.json()["error"]
        assert error["code"] == "internal_error" and request_id in error["message"]
        assert any(r.exc_info and r.exc_info[0] is KeyError for r in caplog.records)
        record = gw.audit(answer)
        assert record.status_code == 500 and record.routing.backend is None
        assert [(a.backend, a.error_class) for a in record.routing.attempts] == [("small", "internal_error")]
        await nothing_charged(gw, record)
        assert gw.breaker("small") is BreakerState.CLOSED and primary.requests == 0
        monkeypatch.undo()
        assert (await gw.post(chat())).status_code == 200


async def test_a_failure_while_building_the_answers_record_leaves_a_500_record_and_nothing_charged(
        tmp_path: Path, fakes: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The backend answered, but its 200 record could not be built (here: an output whose keys the audit's
    canonical hash cannot sort): the request is still unrecorded and its reservation unsettled, so it gets the
    500 record, without the output it never gave the client, and its budget back at once rather than at the
    ledger's expiry."""
    primary, fallback = fakes
    monkeypatch.setattr(dataplane, "_output", lambda *_: {1: "keys that cannot be sorted", "a": 2})
    async with gateway(tmp_path, make_table(primary, fallback, budget=rule(1.0))) as gw:
        answer = await gw.post(chat())
        assert answer.status_code == 500 and "nothing was charged" in answer.json()["error"]["message"]
        record = gw.audit(answer)
        assert record.status_code == 500 and record.output_hash is None and primary.requests == 1
        await nothing_charged(gw, record)


async def test_a_failure_after_the_answers_record_is_written_says_that_record_stands(
        tmp_path: Path, fakes: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A failure after the 200 record and its charge are committed (here: in the request metrics) cannot take them
    back: the 500 says the record stands instead of claiming nothing was charged, and no second record is written."""
    primary, fallback = fakes
    observe = Metrics.observe_request

    def broken(self: Metrics, route: Any, backend: Any, outcome: str, *rest: Any) -> None:
        if outcome == "ok":
            raise KeyError("a bug")
        observe(self, route, backend, outcome, *rest)

    monkeypatch.setattr(Metrics, "observe_request", broken)
    async with gateway(tmp_path, make_table(primary, fallback, budget=rule(1.0))) as gw:
        answer = await gw.post(chat())
        message = answer.json()["error"]["message"]
        assert answer.status_code == 500 and "200 record was written, which stands" in message
        assert "nothing was charged" not in message
        with AuditLog(gw.store_url, create=False) as log:
            [record] = log.tail()
        [trail] = record.budget
        assert record.status_code == 200 and trail.committed_usd and not trail.released


async def test_a_failure_in_the_gateway_mid_stream_ends_it_with_an_error_event_and_a_500_record(
        tmp_path: Path, fakes: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """A bug while a stream settles (here: in the token metrics, after the backend's last chunk) is the gateway's
    failure: the stream ends with an error event naming the request id, the record says 500, not 499 (a client
    that left), and keeps as its output what the client was sent (the workflow stores outputs); the budget is given
    back and the Idempotency-Key freed; the backend's breaker is not told."""
    primary, fallback = fakes

    def broken(*_: Any) -> None:
        raise KeyError("a bug")

    def text(events: list[Any]) -> str:
        return "".join((c.get("delta") or {}).get("content") or "" for e in events if isinstance(e, dict)
                       for c in e.get("choices") or ())

    table = make_table(primary, fallback, budget=rule(1.0)).model_copy(update={"audit_store_outputs": True})
    async with gateway(tmp_path, table) as gw:
        monkeypatch.setattr(Metrics, "used_tokens", broken)
        key = {"Idempotency-Key": "stream-bug"}
        answer = await gw.post(chat(stream=True), headers=key)
        request_id = answer.headers["x-pilothouse-request-id"]
        events = sse_events(answer.text)
        assert answer.status_code == 200 and "Traceback" not in answer.text
        assert events[0]["choices"] and events[-1]["error"]["code"] == "internal_error"
        assert request_id in events[-1]["error"]["message"]
        assert any(r.exc_info and r.exc_info[0] is KeyError for r in caplog.records)
        record = gw.audit(answer)
        assert record.status_code == 500 and record.routing.backend is None
        assert record.output is not None and text(sse_events(record.output)) == text(events) != ""
        await nothing_charged(gw, record)
        assert gw.breaker("small") is BreakerState.CLOSED
        monkeypatch.undo()
        again = await gw.post(chat(stream=True), headers=key)  # the key was freed: served afresh, not replayed
        assert again.status_code == 200 and "x-pilothouse-idempotent-replay" not in again.headers
        assert sse_events(again.text)[-1] == "[DONE]"


async def test_a_mid_stream_500_record_that_cannot_hold_the_output_is_written_without_it(
        tmp_path: Path, fakes: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """The output itself may be what fails a record: then the 500 record is written without it (and says so in the
    log), rather than no record at all."""
    primary, fallback = fakes
    redact = dataplane.redact

    def broken(*_: Any) -> None:
        raise KeyError("a bug")

    def refuses_outputs(value: Any, store: bool) -> Any:
        if isinstance(value, str) and "data: " in value:
            raise ValueError("an output the record cannot hold")
        return redact(value, store)

    table = make_table(primary, fallback, budget=rule(1.0)).model_copy(update={"audit_store_outputs": True})
    async with gateway(tmp_path, table) as gw:
        monkeypatch.setattr(Metrics, "used_tokens", broken)
        monkeypatch.setattr(dataplane, "redact", refuses_outputs)
        answer = await gw.post(chat(stream=True))
        assert sse_events(answer.text)[-1]["error"]["code"] == "internal_error"
        record = gw.audit(answer)
        assert record.status_code == 500 and record.output is None
        await nothing_charged(gw, record)
        assert any("recorded without it" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("store_outputs", [False, True])
async def test_an_answer_with_an_unpaired_surrogate_is_served_recorded_and_charged(
        tmp_path: Path, fakes: Any, store_outputs: bool) -> None:
    """A backend may send an unpaired surrogate escape: JSON, though no UTF-8 carries it. The client gets the answer
    as sent; the record keeps it with U+FFFD in its place (it is stored as JSON). Before, a workflow that stores
    outputs answered 503 with no record and the budget held. (A stream is kept as its SSE text, where the escape is
    ASCII.)"""
    primary, fallback = fakes
    primary.reply_with("odd \ud800 text")
    table = make_table(primary, fallback, budget=rule(1.0)).model_copy(update={"audit_store_outputs": store_outputs})
    async with gateway(tmp_path, table) as gw:
        answer = await gw.post(chat())
        assert answer.status_code == 200 and answer.json()["choices"][0]["message"]["content"] == "odd \ud800 text"
        record = gw.audit(answer)
        [trail] = record.budget
        assert record.status_code == 200 and record.output_hash and trail.committed_usd and not trail.released
        assert record.output == ([{"role": "assistant", "content": "odd \ufffd text"}] if store_outputs else None)


async def test_a_record_that_cannot_be_serialised_is_a_500_record_and_nothing_charged(
        tmp_path: Path, fakes: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Serialising the record is part of building it: a failure there takes no settlement, so the request gets the
    500 record and its budget back, not a 503 as though the store were down with the reservation held."""
    primary, fallback = fakes
    as_row = dataplane.as_row

    def fails_for_answers(record: Any) -> Any:
        if record.status_code == 200:
            raise ValueError("a record this store cannot hold")
        return as_row(record)

    async with gateway(tmp_path, make_table(primary, fallback, budget=rule(1.0))) as gw:
        monkeypatch.setattr(dataplane, "as_row", fails_for_answers)
        answer = await gw.post(chat())
        assert answer.status_code == 500 and answer.json()["error"]["code"] == "internal_error"
        record = gw.audit(answer)
        assert record.status_code == 500
        await nothing_charged(gw, record)


async def test_a_backend_without_an_endpoint_yet_is_skipped_like_an_unreachable_one(tmp_path: Path,
                                                                                   fakes: Any) -> None:
    primary, fallback = fakes
    table = make_table(primary, fallback)
    routes = [r.model_copy(update={"backends": [b.model_copy(update={"endpoint": None}) if b.model_deployment ==
                                                "small" else b for b in r.backends]}) for r in table.routes]
    async with gateway(tmp_path, table.model_copy(update={"routes": routes})) as gw:
        answer = await gw.post(chat())
        assert answer.status_code == 200 and answer.json()["model"] == "org/large"
        attempts = gw.audit(answer).routing.attempts
        assert [(a.backend, a.error_class) for a in attempts] == [("small", "connection"), ("large", None)]
        streamed = await gw.post(chat(stream=True))
        assert streamed.status_code == 200 and "[DONE]" in streamed.text
        assert primary.requests == 0


async def test_requests_answered_before_routing_have_an_audit_record_too(tmp_path: Path, fakes: Any) -> None:
    """Refusals (and idempotent replays) are requests: one record each, found by the request id header."""
    primary, fallback = fakes
    async with gateway(tmp_path, make_table(primary, fallback)) as gw:
        post = gw.client.post
        answers = {
            "no key": await post("/v1/chat/completions", json=chat()),
            "wrong key": await post("/v1/chat/completions", json=chat(), headers={"Authorization": "Bearer sk-no"}),
            "too large": await post("/v1/chat/completions", content=b"{" + b" " * (2 << 20) + b"}", headers=A),
            "not utf-8": await post("/v1/chat/completions", content=b'{"model": "\xff"}', headers=A),
            "not text": await post("/v1/chat/completions", headers=A,  # JSON, but no UTF-8 can carry its text
                                   content=json.dumps(chat(messages=[{"role": "user", "content": "\ud800"}])).encode()),
            "not json": await post("/v1/completions", content=b"{nope", headers=A),
            "unknown model": await gw.post({**chat(), "model": "wf/nope"}),
            "max_tokens": await gw.post(chat(max_tokens=100_000)),
        }
        first = await gw.post(chat(), headers={"Idempotency-Key": "k"})
        answers["replay"] = await gw.post(chat(), headers={"Idempotency-Key": "k"})
        answers["conflict"] = await gw.post(chat(max_tokens=4), headers={"Idempotency-Key": "k"})
        statuses = {name: r.status_code for name, r in answers.items()}
        assert statuses == {"no key": 401, "wrong key": 401, "too large": 413, "not utf-8": 400, "not text": 400,
                            "not json": 400, "unknown model": 404, "max_tokens": 400, "replay": 200, "conflict": 409}
        assert answers["not text"].json()["error"]["param"] == "messages[0].content"
        assert primary.requests == 1

        records = {name: gw.audit(r) for name, r in answers.items() if name != "replay"}
        for name, record in records.items():
            assert record is not None, name
            assert record.status_code == answers[name].status_code and record.routing.backend is None, name
            assert record.usage is None and record.budget == [] and record.inputs is None, name
        assert records["no key"].tenant == records["wrong key"].tenant == "-"
        assert "invalid_api_key" in records["wrong key"].routing.reason
        assert records["too large"].tenant == "team-a" and "request_too_large" in records["too large"].routing.reason
        assert "invalid_encoding" in records["not utf-8"].routing.reason
        assert "invalid_encoding" in records["not text"].routing.reason and records["not text"].inputs_hash
        unknown = records["unknown model"]
        assert unknown.model == "wf/nope" and "model_not_found" in unknown.routing.reason
        assert records["max_tokens"].route == "extract" and records["max_tokens"].inputs_hash.startswith("sha256:")
        assert "idempotency_key_conflict" in records["conflict"].routing.reason

        # The replay's header names the first request (its answer is that one's); its own record says so.
        with AuditLog(gw.store_url, create=False) as log:
            everything = log.tail(100)
        replays = [r for r in everything if "idempotent replay" in r.routing.reason]
        assert len(replays) == 1 and first.headers["x-pilothouse-request-id"] in replays[0].routing.reason
        # One record per request, none twice: 9 answers above plus the first idempotent request.
        assert len(everything) == len({r.id for r in everything}) == len(answers) + 1


async def test_below_a_route_prefix_the_openai_endpoints_answer_and_audit_as_at_the_root(tmp_path: Path,
                                                                                          fakes: Any) -> None:
    """Ray Serve mounts an app at its route prefix: the ASGI ``path`` keeps the prefix and ``root_path`` names it."""
    primary, fallback = fakes
    async with gateway(tmp_path, make_table(primary, fallback), root_path="/team") as gw:
        ok = await gw.post(chat())
        assert ok.status_code == 200 and ok.json()["model"] == "org/small"
        refused = await gw.client.post("/v1/chat/completions", json=chat())
        assert refused.status_code == 401
        assert gw.audit(ok).status_code == 200 and gw.audit(refused).status_code == 401
        wrong = await gw.client.get("/v1/chat/completions", headers=A)
        assert wrong.status_code == 405 and wrong.headers["allow"] == "POST"
        assert wrong.json()["error"]["code"] == "method_not_allowed"
        assert (await gw.client.get("/v1/models", headers=A)).json()["data"][0]["id"] == "wf/extract"


async def test_a_budget_lease_admits_requests_without_a_ledger_write_each(tmp_path: Path, fakes: Any) -> None:
    """Requests are admitted against a lease held in the ledger; each one's spend is still its own committed row."""
    primary, fallback = fakes
    async with gateway(tmp_path, make_table(primary, fallback, budget=rule(1.0))) as gw:
        responses = await asyncio.gather(*(gw.post(chat()) for _ in range(40)))
        assert [r.status_code for r in responses] == [200] * 40
        stores = await gw.app.state.dataplane.stores()
        assert stores.ledger.batches == 1  # one reservation (the lease) for 40 requests
        ledger = Ledger(gw.store_url)
        try:
            since = datetime.now(UTC) - timedelta(days=2)
            charged = sum(float(r.headers["x-pilothouse-cost-usd"]) for r in responses)
            assert ledger.spend("default", "team", since).cost_usd == pytest.approx(charged)
            with ledger.engine.connect() as conn:
                rows = {row.id: row for row in conn.execute(sa.select(ledger_table))}
            for r in responses:
                trail = gw.audit(r).budget[0]
                assert rows[trail.reservation_id].state == "committed"
                assert rows[trail.reservation_id].cost_usd == pytest.approx(trail.committed_usd)
            assert ledger.in_flight("default", "team", since).cost_usd > 0  # the lease, open while in use
            # idle: the lease goes back, and with it everything it held unused
            await eventually(lambda: ledger.in_flight("default", "team", since) == (0.0, 0), timeout=5)
            assert ledger.spend("default", "team", since).cost_usd == pytest.approx(charged)
        finally:
            ledger.close()
