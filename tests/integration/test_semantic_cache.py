"""Semantic cache on real Milvus Lite (a file per test) with the real offline all-MiniLM-L6-v2.

What a user of the gateway would notice: a paraphrase is answered from the cache, anything else is
not (another meaning, tenant, route, parameter set, an expired or evicted entry), errors are never
replayed, and a Milvus that is not there costs a miss, not a failed request.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from prometheus_client.parser import text_string_to_metric_families
from pymilvus import DataType, MilvusClient

from pilothouse.operator.api import AutonomousWorkflow
from pilothouse.operator.routing import Dependencies, compile_table
from pilothouse.serving.embeddings import Embedder, LocalEmbedder
from pilothouse.serving.engines import COMPLETIONS, Usage
from pilothouse.serving.metrics import Metrics
from pilothouse.serving.semantic_cache import LITE_FILE, SemanticCache, collection_name, open_semantic_cache
from tests.unit.factories import model

pytestmark = pytest.mark.integration

ROUTE = "support/answer"
ANSWER = json.dumps({"id": "c1", "object": "chat.completion", "choices": [
    {"index": 0, "message": {"role": "assistant", "content": "Settings > Security > Reset."},
     "finish_reason": "stop"}]}).encode()
USAGE = Usage(prompt_tokens=21, completion_tokens=7)


def ask(text: str, **params: Any) -> dict[str, Any]:
    return {"model": ROUTE, "temperature": 0, "max_tokens": 64, **params,
            "messages": [{"role": "system", "content": "You are the help desk."}, {"role": "user", "content": text}]}


class Clock:
    def __init__(self) -> None:
        self.t = 1_800_000_000.0

    def __call__(self) -> float:
        return self.t


def count(metrics: Metrics, name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(metrics.render()[0].decode()):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return sample.value
    return 0.0


@pytest.fixture(scope="module")
def embedder() -> Embedder:
    return LocalEmbedder()


@pytest.fixture
def metrics() -> Metrics:
    m = Metrics()
    m.allow(routes=[ROUTE, "support/other"])
    return m


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest_asyncio.fixture
async def cache(tmp_path: Path, embedder: Embedder, metrics: Metrics, clock: Clock) -> AsyncIterator[SemanticCache]:
    c = SemanticCache(uri=str(tmp_path / "cache.db"), collection="semcache", embedder=embedder, embedder_id="minilm",
                      ttl_s=60, metrics=metrics, clock=clock, lookup_timeout_s=30)
    await c.prewarm()
    yield c
    await c.aclose()


async def remember(cache: SemanticCache, body: dict[str, Any], *, tenant: str = "team-a", route: str = ROUTE,
                   answer: bytes = ANSWER, status_code: int = 200) -> bool:
    probe = await cache.lookup(tenant, route, body)
    assert probe.hit is None, "the cache must start without this entry"
    return await cache.store(probe, answer, USAGE, status_code=status_code)


async def test_a_paraphrase_is_answered_with_the_stored_body(cache: SemanticCache, metrics: Metrics) -> None:
    assert await remember(cache, ask("How do I reset my password?"))
    probe = await cache.lookup("team-a", ROUTE, ask("How can I reset my password?"))
    assert probe.hit is not None
    assert probe.hit.response.body == ANSWER and probe.hit.response.usage == USAGE
    assert cache.threshold <= probe.hit.similarity < 1
    assert count(metrics, "pilothouse_semantic_cache_lookups_total", route=ROUTE, result="hit") == 1
    assert count(metrics, "pilothouse_semantic_cache_stores_total", route=ROUTE, result="stored") == 1


async def test_an_unrelated_question_misses(cache: SemanticCache, metrics: Metrics) -> None:
    assert await remember(cache, ask("How do I reset my password?"))
    probe = await cache.lookup("team-a", ROUTE, ask("How do I change my email address?"))
    assert probe.hit is None and probe.vector is not None  # embedded once; store reuses it
    assert count(metrics, "pilothouse_semantic_cache_lookups_total", route=ROUTE, result="miss") == 2
    assert count(metrics, "pilothouse_semantic_cache_similarity_bucket", le="0.9") == 1  # the near miss was seen


async def test_a_close_but_different_question_stays_below_the_default_threshold(cache: SemanticCache) -> None:
    assert await remember(cache, ask("Translate 'good morning' to French"))
    assert (await cache.lookup("team-a", ROUTE, ask("Translate 'good morning' to German"))).hit is None


async def test_another_tenant_never_gets_the_entry(cache: SemanticCache) -> None:
    assert await remember(cache, ask("How do I reset my password?"), tenant="team-a")
    assert (await cache.lookup("team-b", ROUTE, ask("How do I reset my password?"))).hit is None
    assert (await cache.lookup("team-a", ROUTE, ask("How do I reset my password?"))).hit is not None


@pytest.mark.parametrize("change", [{"temperature": 0, "max_tokens": 65}, {"seed": 7}, {"route": "support/other"},
                                   {"system": "You are a pirate."}])
async def test_other_parameters_route_or_context_miss(cache: SemanticCache, change: dict[str, Any]) -> None:
    assert await remember(cache, ask("How do I reset my password?"))
    change = dict(change)
    route = change.pop("route", ROUTE)
    body = ask("How do I reset my password?", **{k: v for k, v in change.items() if k != "system"})
    if "system" in change:
        body["messages"][0]["content"] = change["system"]
    assert (await cache.lookup("team-a", route, body)).hit is None


async def test_completions_are_cached_apart_from_chat(cache: SemanticCache) -> None:
    body = {"model": ROUTE, "prompt": "How do I reset my password?", "temperature": 0, "max_tokens": 64}
    probe = await cache.lookup("team-a", ROUTE, body, endpoint=COMPLETIONS)
    assert probe.hit is None and await cache.store(probe, ANSWER, USAGE)
    assert (await cache.lookup("team-a", ROUTE, ask("How do I reset my password?"))).hit is None
    assert (await cache.lookup("team-a", ROUTE, {**body, "prompt": "How can I reset my password?"},
                               endpoint=COMPLETIONS)).hit is not None


async def test_an_expired_entry_misses_and_is_purged(cache: SemanticCache, clock: Clock, metrics: Metrics) -> None:
    assert await remember(cache, ask("How do I reset my password?"))
    clock.t += 59
    assert (await cache.lookup("team-a", ROUTE, ask("How do I reset my password?"))).hit is not None
    clock.t += 2
    assert (await cache.lookup("team-a", ROUTE, ask("How do I reset my password?"))).hit is None
    cache.maintain_every = 1  # the next store runs maintenance: the expired row goes
    assert await remember(cache, ask("Where is the cafeteria?"))
    assert count(metrics, "pilothouse_semantic_cache_evictions_total", reason="expired") == 1


@pytest.mark.parametrize(("status", "answer"), [(500, b'{"error": {"message": "backend down"}}'), (429, ANSWER),
                                                (200, b'{"error": {"message": "upstream failed"}}')])
async def test_errors_are_never_stored(cache: SemanticCache, metrics: Metrics, status: int, answer: bytes) -> None:
    assert not await remember(cache, ask("How do I reset my password?"), answer=answer, status_code=status)
    assert (await cache.lookup("team-a", ROUTE, ask("How do I reset my password?"))).hit is None
    assert count(metrics, "pilothouse_semantic_cache_stores_total", route=ROUTE, result="rejected") == 1


async def test_sampled_requests_are_neither_looked_up_nor_stored(cache: SemanticCache, metrics: Metrics) -> None:
    probe = await cache.lookup("team-a", ROUTE, ask("How do I reset my password?", temperature=0.8))
    assert probe.key is None and not await cache.store(probe, ANSWER, USAGE)
    assert count(metrics, "pilothouse_semantic_cache_lookups_total", route=ROUTE, result="miss") == 0


async def test_each_tenant_is_bounded_oldest_out(cache: SemanticCache, clock: Clock, metrics: Metrics) -> None:
    cache.max_entries_per_tenant, cache.maintain_every = 3, 1
    questions = ["How do I reset my password?", "Where is the cafeteria?", "When is payday?",
                 "How do I book a meeting room?", "Who approves travel expenses?"]
    for question in questions:
        clock.t += 1
        assert await remember(cache, ask(question))
    assert await remember(cache, ask("How do I reset my password?"), tenant="team-b")  # another tenant's bound
    hits = [(await cache.lookup("team-a", ROUTE, ask(q))).hit is not None for q in questions]
    assert hits == [False, False, True, True, True]
    assert (await cache.lookup("team-b", ROUTE, ask("How do I reset my password?"))).hit is not None
    assert count(metrics, "pilothouse_semantic_cache_evictions_total", reason="bound") == 2


async def test_milvus_unreachable_is_a_miss_not_an_error(embedder: Embedder, metrics: Metrics) -> None:
    cache = SemanticCache(uri="http://127.0.0.1:1", collection="semcache", embedder=embedder, embedder_id="minilm",
                          metrics=metrics, timeout_s=2)
    try:
        probe = await cache.lookup("team-a", ROUTE, ask("How do I reset my password?"))
        assert probe.hit is None and probe.key is not None
        assert not await cache.store(probe, ANSWER, USAGE)
        again = await cache.lookup("team-a", ROUTE, ask("How do I reset my password?"))  # breaker open: not tried
        assert again.hit is None
    finally:
        await cache.aclose()
    assert count(metrics, "pilothouse_semantic_cache_lookups_total", route=ROUTE, result="error") == 2
    assert count(metrics, "pilothouse_semantic_cache_stores_total", route=ROUTE, result="error") == 1


async def test_a_collection_of_another_layout_is_recreated(tmp_path: Path, embedder: Embedder,
                                                           metrics: Metrics) -> None:
    uri = str(tmp_path / "cache.db")
    client = MilvusClient(uri=uri)
    schema = client.create_schema(auto_id=False)
    schema.add_field("id", DataType.VARCHAR, is_primary=True, max_length=64)
    schema.add_field("embedding", DataType.FLOAT_VECTOR, dim=8)
    client.create_collection("semcache", schema=schema)
    client.close()
    cache = SemanticCache(uri=uri, collection="semcache", embedder=embedder, embedder_id="minilm", metrics=metrics)
    try:
        assert await remember(cache, ask("How do I reset my password?"))
        assert (await cache.lookup("team-a", ROUTE, ask("How can I reset my password?"))).hit is not None
    finally:
        await cache.aclose()


async def test_the_routing_table_opens_a_working_cache(tmp_path: Path, metrics: Metrics) -> None:
    wf = AutonomousWorkflow.model_validate({
        "metadata": {"name": "support", "namespace": "help-desk"},
        "spec": {"mission": "m", "steps": [{"name": "answer", "type": "generate",
                                            "generate": {"tier": "small", "promptTemplate": "{input}"}}],
                 "cache": {"semantic": {"enabled": True, "threshold": 0.9}}},
    })
    table = compile_table(wf, Dependencies(models={"small": model("small")}, indexes={}, budgets={}), None,
                          datetime.now(UTC))
    cache = await open_semantic_cache(table, metrics=metrics, state_dir=tmp_path)
    assert cache is not None
    try:
        assert (cache.uri, cache.collection, cache.threshold) == (
            str(tmp_path / LITE_FILE), collection_name("help-desk", "support"), 0.9)
        assert await remember(cache, ask("How do I reset my password?"))
        assert (await cache.lookup("team-a", ROUTE, ask("How can I reset my password?"))).hit is not None
    finally:
        await cache.aclose()
