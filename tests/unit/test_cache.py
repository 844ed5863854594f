"""Exact-match response cache: what shares a key, what may be cached, tenant isolation, TTL, bounds."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio
from hypothesis import given
from hypothesis import strategies as st

from pilothouse.serving.cache import CacheMode, ResponseCache, cache_key, cacheable, is_deterministic, normalise
from pilothouse.serving.engines import BackendError, Usage
from pilothouse.serving.engines.external import ExternalEngine, create_client
from tests.fakes.openai_backend import FakeBackend

ROUTE = "support/answer"
REQUEST: dict[str, Any] = {"model": ROUTE, "messages": [{"role": "user", "content": "hello"}], "temperature": 0,
                           "max_tokens": 64, "top_p": 1}


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def key(body: dict[str, Any], tenant: str = "team-a", route: str = ROUTE, endpoint: str = "/chat/completions") -> str:
    return cache_key(tenant, route, body, endpoint)


# ---- the key ------------------------------------------------------------------------------------------


def test_field_order_does_not_matter() -> None:
    reordered = dict(reversed(list(REQUEST.items())))
    assert list(reordered) != list(REQUEST)
    assert key(reordered) == key(REQUEST)


@pytest.mark.parametrize("extra", [
    {"user": "alice"}, {"stream": True}, {"stream": False}, {"stream_options": {"include_usage": True}},
    {"metadata": {"trace": "x"}}, {"n": 1}, {"model": "other-spelling"}, {"temperature": 0.0}, {"max_tokens": 64.0},
])
def test_fields_that_do_not_change_the_answer_are_ignored(extra: dict[str, Any]) -> None:
    assert key({**REQUEST, **extra}) == key(REQUEST)


@pytest.mark.parametrize("change", [
    {"temperature": 0.5}, {"top_p": 0.9}, {"max_tokens": 65}, {"n": 2}, {"seed": 7}, {"stop": ["\n"]},
    {"messages": [{"role": "user", "content": "hello!"}]}, {"response_format": {"type": "json_object"}},
    {"tools": [{"type": "function", "function": {"name": "f"}}]}, {"logprobs": True},
])
def test_everything_that_changes_the_answer_is_in_the_key(change: dict[str, Any]) -> None:
    assert key({**REQUEST, **change}) != key(REQUEST)


def test_tenant_route_and_endpoint_partition_the_key() -> None:
    assert key(REQUEST, tenant="team-b") != key(REQUEST)
    assert key(REQUEST, route="support/other") != key(REQUEST)
    assert key(REQUEST, endpoint="/completions") != key(REQUEST)
    # no ambiguity from concatenation: ("a/b", "c") and ("a", "b/c") differ
    assert cache_key("a/b", "c", REQUEST) != cache_key("a", "b/c", REQUEST)


def test_normalise_leaves_nested_values_alone() -> None:
    assert normalise({"n": 1, "user": "u", "temperature": 0.0, "logit_bias": {"5": 1.0}}) == {
        "temperature": 0, "logit_bias": {"5": 1.0}}


@given(st.dictionaries(st.text(max_size=8), st.integers() | st.text(max_size=8) | st.booleans(), max_size=8),
       st.randoms())
def test_key_is_independent_of_insertion_order(body: dict[str, Any], rnd: random.Random) -> None:
    items = list(body.items())
    rnd.shuffle(items)
    assert key(dict(items)) == key(body)


# ---- what may be cached -------------------------------------------------------------------------------


@pytest.mark.parametrize(("body", "endpoint", "expected"), [
    ({"temperature": 0}, "/chat/completions", True),
    ({"temperature": 0.0}, "/completions", True),
    ({"temperature": 0.7, "seed": 42}, "/chat/completions", True),
    ({"seed": 0}, "/chat/completions", True),
    ({}, "/chat/completions", False),  # absent temperature means the default, 1: sampled
    ({"temperature": 0.7}, "/chat/completions", False),
    ({"temperature": 0.7, "seed": None}, "/chat/completions", False),
    ({"temperature": False}, "/chat/completions", False),  # not a number
    ({"input": "x"}, "/embeddings", True),
])
def test_only_deterministic_requests_are_cacheable(body: dict[str, Any], endpoint: str, expected: bool) -> None:
    assert is_deterministic(body, endpoint) is expected
    assert cacheable(body, endpoint) is expected
    assert cacheable(body, endpoint, "force")  # the caller accepts a replayed sample
    assert not cacheable(body, endpoint, "off")


def test_cache_key_method_says_none_for_uncacheable_requests() -> None:
    cache = ResponseCache()
    sampled = {**REQUEST, "temperature": 0.8}
    assert cache.key("team-a", ROUTE, sampled) is None
    assert cache.key("team-a", ROUTE, sampled, mode="force") == key(sampled)
    assert cache.key("team-a", ROUTE, REQUEST) == key(REQUEST)
    assert cache.key("team-a", ROUTE, REQUEST, mode="off") is None


# ---- storage ------------------------------------------------------------------------------------------


def test_hit_miss_and_counters() -> None:
    cache = ResponseCache()
    k = key(REQUEST)
    assert cache.get(k) is None
    assert cache.put(k, b'{"answer": 1}', Usage(5, 7))
    hit = cache.get(k)
    assert hit is not None and hit.body == b'{"answer": 1}' and hit.usage == Usage(5, 7)
    assert (cache.stats.hits, cache.stats.misses, cache.stats.stores) == (1, 1, 1)
    assert cache.stats.hit_rate == 0.5


def test_tenant_b_never_gets_tenant_a_entry() -> None:
    cache = ResponseCache()
    cache.put(cache.key("team-a", ROUTE, REQUEST) or "", b"a's answer", Usage(1, 1))
    key_b = cache.key("team-b", ROUTE, REQUEST)
    assert key_b is not None and cache.get(key_b) is None
    assert cache.get(cache.key("team-a", ROUTE, REQUEST) or "") is not None


@pytest.mark.parametrize("status", [400, 404, 429, 500, 503, 201, 204])
def test_errors_are_never_stored(status: int) -> None:
    cache = ResponseCache()
    assert not cache.put(key(REQUEST), b'{"error": {"message": "boom"}}', Usage(), status_code=status)
    assert cache.get(key(REQUEST)) is None
    assert len(cache) == 0 and cache.stats.rejected == 1


def test_entries_expire_after_the_ttl() -> None:
    clock = Clock()
    cache = ResponseCache(ttl_s=60, clock=clock)
    cache.put("k", b"x", Usage())
    clock.t += 59.9
    assert cache.get("k") is not None
    clock.t += 0.1
    assert cache.get("k") is None
    assert len(cache) == 0 and cache.size_bytes == 0 and cache.stats.expirations == 1


def test_a_re_put_restarts_the_ttl_but_a_hit_does_not() -> None:
    clock = Clock()
    cache = ResponseCache(ttl_s=10, clock=clock)
    cache.put("k", b"x", Usage())
    clock.t += 8
    assert cache.get("k") is not None
    clock.t += 3
    assert cache.get("k") is None  # hits do not extend an answer's life
    cache.put("k", b"y", Usage())
    clock.t += 9
    assert (hit := cache.get("k")) is not None and hit.body == b"y"


def test_purge_expired_frees_memory() -> None:
    clock = Clock()
    cache = ResponseCache(ttl_s=10, clock=clock)
    cache.put("old", b"12345", Usage())
    clock.t += 5
    cache.put("new", b"678", Usage())
    clock.t += 6
    assert cache.purge_expired() == 1
    assert len(cache) == 1 and cache.size_bytes == 3


def test_lru_bound_evicts_the_least_recently_used() -> None:
    cache = ResponseCache(max_entries=3)
    for k in "abc":
        cache.put(k, k.encode(), Usage())
    assert cache.get("a") is not None  # a is now the most recent
    cache.put("d", b"d", Usage())
    assert cache.get("b") is None
    assert all(cache.get(k) is not None for k in "acd")
    assert len(cache) == 3 and cache.stats.evictions == 1


def test_byte_bounds() -> None:
    cache = ResponseCache(max_bytes=10, max_entry_bytes=6)
    assert not cache.put("huge", b"x" * 7, Usage())
    cache.put("a", b"aaaaa", Usage())
    cache.put("b", b"bbbbb", Usage())
    cache.put("c", b"cc", Usage())  # 12 bytes > 10: the oldest goes
    assert cache.get("a") is None and cache.size_bytes == 7
    cache.put("b", b"b", Usage())  # replacing an entry accounts its old size
    assert cache.size_bytes == 3


def test_bad_configuration_is_refused() -> None:
    with pytest.raises(ValueError, match="max_entries"):
        ResponseCache(max_entries=0)


# ---- with a real backend: the gateway's flow, end to end ---------------------------------------------


@pytest_asyncio.fixture()
async def engine() -> AsyncIterator[tuple[ExternalEngine, FakeBackend]]:
    async with FakeBackend() as fb, create_client() as client:
        yield ExternalEngine(client, fb.url, None, fb.model), fb


async def cached_call(cache: ResponseCache, engine: ExternalEngine, tenant: str, body: dict[str, Any],
                      mode: CacheMode = "auto") -> bytes:
    """What the gateway does: look up, else call and store a success."""
    k = cache.key(tenant, ROUTE, body, mode=mode)
    if k is not None and (hit := cache.get(k)) is not None:
        return hit.body
    result = await engine.complete("/chat/completions", body)
    if k is not None:
        cache.put(k, result.body, result.usage)
    return result.body


async def test_repeated_deterministic_request_is_served_from_the_cache(
        engine: tuple[ExternalEngine, FakeBackend]) -> None:
    eng, fb = engine
    cache = ResponseCache()
    first = await cached_call(cache, eng, "team-a", REQUEST)
    assert await cached_call(cache, eng, "team-a", {**REQUEST, "user": "bob"}) == first
    assert fb.served["/v1/chat/completions"] == 1
    await cached_call(cache, eng, "team-b", REQUEST)  # other tenant: a miss, the backend answers
    assert fb.served["/v1/chat/completions"] == 2


async def test_sampled_requests_reach_the_backend_unless_forced(engine: tuple[ExternalEngine, FakeBackend]) -> None:
    eng, fb = engine
    cache = ResponseCache()
    sampled = {**REQUEST, "temperature": 0.9}
    a = await cached_call(cache, eng, "team-a", sampled)
    b = await cached_call(cache, eng, "team-a", sampled)
    assert a != b and fb.served["/v1/chat/completions"] == 2 and len(cache) == 0
    forced = await cached_call(cache, eng, "team-a", sampled, mode="force")
    assert await cached_call(cache, eng, "team-a", sampled, mode="force") == forced
    assert fb.served["/v1/chat/completions"] == 3


async def test_a_failed_call_leaves_nothing_behind(engine: tuple[ExternalEngine, FakeBackend]) -> None:
    eng, fb = engine
    cache = ResponseCache()
    fb.fail_with(503, times=1)
    with pytest.raises(BackendError):
        await cached_call(cache, eng, "team-a", REQUEST)
    assert len(cache) == 0
    await cached_call(cache, eng, "team-a", REQUEST)
    assert len(cache) == 1
