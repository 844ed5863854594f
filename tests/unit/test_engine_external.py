"""The external engine against a real local HTTP backend: answers, usage, every failure class, streams.

The fake backend (tests/fakes/openai_backend.py) is told to fail, stall or die at runtime, so each
failure is the one the gateway will meet in production, classified from real aiohttp exceptions.
"""

from __future__ import annotations

import asyncio
import gc
import json
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
from aiohttp import web
from aiohttp.test_utils import TestServer

from pilothouse.operator.api.routing import Backend, BackendPricing
from pilothouse.serving.engines import BackendError, Usage
from pilothouse.serving.engines.external import (
    ExternalEngine,
    ExternalStream,
    close_shared_client,
    create_client,
    dumps,
    env_proxy,
    shared_client,
    usage_from_body,
)
from pilothouse.serving.errors import ErrorClass
from tests.fakes.openai_backend import FakeBackend
from tests.polling import eventually

CHAT = "/chat/completions"
MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "what is a pilothouse"}]


@pytest_asyncio.fixture()
async def fb() -> AsyncIterator[FakeBackend]:
    async with FakeBackend(reply_tokens=8) as backend:
        yield backend


@pytest_asyncio.fixture()
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    async with create_client() as c:
        yield c


@pytest.fixture
def engine(fb: FakeBackend, client: aiohttp.ClientSession) -> ExternalEngine:
    return ExternalEngine(client, fb.url, None, fb.model, timeout_s=5.0)


def pool_size(client: aiohttp.ClientSession) -> int:
    """Connections the client's pool holds (idle or in use). aiohttp exposes no public accessor."""
    return in_use(client) + sum(len(idle) for idle in client.connector._conns.values())  # type: ignore[union-attr]


def in_use(client: aiohttp.ClientSession) -> int:
    """Connections handed to a request and not yet released (or closed)."""
    return len(client.connector._acquired)  # type: ignore[union-attr]


async def failure_of(call: Awaitable[Any]) -> BackendError:
    with pytest.raises(BackendError) as caught:
        await call
    return caught.value


# ---- complete ----------------------------------------------------------------------------------------


async def test_chat_returns_backend_bytes_usage_and_latency(engine: ExternalEngine, fb: FakeBackend) -> None:
    result = await engine.complete(CHAT, {"model": "wf/extract", "messages": MESSAGES, "stream": False,
                                          "stream_options": {"include_usage": True}, "max_tokens": 5})
    assert result.usage == Usage(prompt_tokens=6, completion_tokens=5)
    assert result.latency_s > 0
    assert result.data["choices"][0]["finish_reason"] == "length"
    assert json.loads(result.body) == result.data  # bytes forwarded as the backend sent them
    sent = fb.last_body
    assert sent["model"] == fb.model  # the backend's model name replaces the route name
    assert "stream" not in sent and "stream_options" not in sent
    assert sent["max_tokens"] == 5


async def test_completions_and_embeddings(engine: ExternalEngine, fb: FakeBackend) -> None:
    completion = await engine.complete("/completions", {"prompt": "one two three", "max_tokens": 20})
    assert completion.usage == Usage(3, 8)
    assert completion.data["choices"][0]["finish_reason"] == "stop"
    embedded = await engine.complete("/embeddings", {"input": ["alpha beta", "gamma"]})
    assert embedded.usage == Usage(3, 0)
    vectors = [d["embedding"] for d in embedded.data["data"]]
    assert len(vectors) == 2 and all(len(v) == fb.embedding_dim for v in vectors)
    again = await engine.complete("/embeddings", {"input": ["alpha beta", "gamma"]})
    assert again.data["data"] == embedded.data["data"]  # deterministic vectors
    assert fb.served == {"/v1/completions": 1, "/v1/embeddings": 2}


async def test_api_key_is_sent_and_a_wrong_one_is_a_client_error(client: aiohttp.ClientSession) -> None:
    async with FakeBackend(api_key="sk-right") as fb:
        ok = ExternalEngine(client, fb.url, "sk-right", fb.model)
        assert (await ok.complete(CHAT, {"messages": MESSAGES})).usage.completion_tokens == 8
        wrong = ExternalEngine(client, fb.url, "sk-wrong", fb.model)
        error = await failure_of(wrong.complete(CHAT, {"messages": MESSAGES}))
    assert error.error_class is ErrorClass.CLIENT and error.failure.status_code == 401


async def test_connections_are_pooled_and_reused(engine: ExternalEngine, fb: FakeBackend,
                                                 client: aiohttp.ClientSession) -> None:
    for _ in range(5):
        await engine.complete(CHAT, {"messages": MESSAGES})
    assert len(fb.peers) == 1  # one TCP connection, kept alive
    results = await asyncio.gather(*(engine.complete(CHAT, {"messages": MESSAGES}) for _ in range(50)))
    assert all(r.usage.completion_tokens == 8 for r in results)
    assert pool_size(client) <= 50


@pytest.mark.parametrize(("status", "error_class"), [
    (500, ErrorClass.SERVER), (503, ErrorClass.SERVER), (429, ErrorClass.RATE_LIMITED), (400, ErrorClass.CLIENT),
    (422, ErrorClass.CLIENT), (408, ErrorClass.TIMEOUT),
])
async def test_error_statuses_are_classified(engine: ExternalEngine, fb: FakeBackend, status: int,
                                             error_class: ErrorClass) -> None:
    fb.fail_with(status)
    error = await failure_of(engine.complete(CHAT, {"messages": MESSAGES}))
    assert error.error_class is error_class
    assert error.failure.status_code == status
    assert not error.first_token_sent


async def test_context_length_error_is_classified(engine: ExternalEngine, fb: FakeBackend) -> None:
    fb.context_window(10)
    error = await failure_of(engine.complete(CHAT, {"messages": MESSAGES, "max_tokens": 5}))
    assert error.error_class is ErrorClass.CONTEXT_LENGTH
    assert "maximum context length is 10 tokens" in error.failure.message
    assert (await engine.complete(CHAT, {"messages": MESSAGES, "max_tokens": 4})).usage.completion_tokens == 4


async def test_dead_backend_is_connection_refused_and_revives(engine: ExternalEngine, fb: FakeBackend) -> None:
    await engine.complete(CHAT, {"messages": MESSAGES})  # leaves a pooled keep-alive connection behind
    await fb.die()
    error = await failure_of(engine.complete(CHAT, {"messages": MESSAGES}))
    assert error.error_class is ErrorClass.CONNECTION
    assert error.failure.refused  # the breaker opens at once on this
    await fb.revive()
    assert (await engine.complete(CHAT, {"messages": MESSAGES})).usage.completion_tokens == 8


async def test_stalled_backend_is_a_timeout(engine: ExternalEngine, fb: FakeBackend) -> None:
    fb.stall()
    started = time.monotonic()
    error = await failure_of(engine.complete(CHAT, {"messages": MESSAGES}, timeout_s=0.2))
    assert error.error_class is ErrorClass.TIMEOUT
    assert time.monotonic() - started < 2
    await eventually(lambda: fb.disconnects == 1)  # the backend saw us give up


async def test_malformed_200_body_is_a_server_failure(engine: ExternalEngine, fb: FakeBackend) -> None:
    fb.fail_with(200, "<html>gateway says hi</html>")
    error = await failure_of(engine.complete(CHAT, {"messages": MESSAGES}))
    assert error.error_class is ErrorClass.SERVER


async def test_unknown_model_at_the_backend_is_a_client_error(client: aiohttp.ClientSession, fb: FakeBackend) -> None:
    engine = ExternalEngine(client, fb.url, None, "no-such-model")
    error = await failure_of(engine.complete(CHAT, {"messages": MESSAGES}))
    assert error.error_class is ErrorClass.CLIENT and error.failure.status_code == 404


def test_engine_for_a_routing_table_backend(client: aiohttp.ClientSession) -> None:
    pricing = BackendPricing(input_per_million_usd=1.0, output_per_million_usd=2.0)
    b = Backend(model_deployment="big", engine="external", endpoint="http://big.example/v1/", model="org/big",
                tier="large", pricing=pricing, healthy=True, role="primary", reason="primary")
    engine = ExternalEngine.for_backend(b, client)
    assert engine.model == "org/big"
    assert engine._url(CHAT) == "http://big.example/v1/chat/completions"
    with pytest.raises(ValueError, match="no endpoint"):
        ExternalEngine.for_backend(b.model_copy(update={"endpoint": None}), client)
    with pytest.raises(ValueError, match="unsupported path"):
        engine._url("/v1/chat/completions")


async def test_shared_client_is_one_per_process() -> None:
    client = shared_client()
    assert shared_client() is client
    await close_shared_client()
    assert client.closed and shared_client() is not client
    await close_shared_client()


# ---- usage from a complete answer ---------------------------------------------------------------------


@pytest.mark.parametrize(("body", "usage"), [
    (b'{"id":"x","choices":[],"usage":{"prompt_tokens":3,"completion_tokens":4,"total_tokens":7}}', Usage(3, 4)),
    (b'{"usage": {"prompt_tokens": 3, "completion_tokens": 4} , "prompt_logprobs": null}\n', Usage(3, 4)),
    (b'{"usage":{"prompt_tokens":1,"completion_tokens":2},"x":{"usage":{"prompt_tokens":9}}}', Usage(1, 2)),
    (b'{"choices":[{"usage":{"prompt_tokens":9,"completion_tokens":9}}]}', Usage(estimated=True)),
    (b'{"a":"say \\"usage\\": {\\"prompt_tokens\\": 9}","usage":null}', Usage(estimated=True)),
    (b'{"object":"list","data":[],"usage":{"prompt_tokens":5,"total_tokens":5}}', Usage(5, 0)),
    (b'{"id":"no usage at all"}', Usage(estimated=True)),
])
def test_usage_is_read_from_the_top_level_only(body: bytes, usage: Usage) -> None:
    assert usage_from_body(body)[0] == usage


def test_an_answer_only_the_standard_json_reader_accepts_is_still_read() -> None:
    """A backend's NaN logprob or lone surrogate: the answer was read before and still is."""
    usage, data = usage_from_body(b'{"choices":[{"logprobs":{"content":[{"logprob":NaN}]},"text":"\\ud800"}],'
                                  b'"usage":{"prompt_tokens":2,"completion_tokens":1}}')
    assert usage == Usage(2, 1) and data["choices"][0]["text"] == "\ud800"


def test_an_answers_integers_beyond_64_bits_stay_integers() -> None:
    """What the audit keeps of an answer is what the backend sent: a 2**70 seed echoed back is not rounded."""
    _, data = usage_from_body(b'{"seed":1180591620717411303424,"choices":[],"usage":{"prompt_tokens":1}}')
    assert data["seed"] == 2**70 and isinstance(data["seed"], int)


async def test_a_request_orjson_cannot_write_reaches_the_backend_as_sent(engine: ExternalEngine,
                                                                         fb: FakeBackend) -> None:
    """What a client's JSON may hold and orjson refuses to write: an integer beyond 64 bits, a lone surrogate."""
    await engine.complete("/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "seed": 2**70})
    assert fb.last_body["seed"] == 2**70
    assert json.loads(dumps({"content": "hi \ud800"})) == {"content": "hi \ud800"}


@pytest.mark.parametrize("body", [b"[1, 2]", b"not json", b'{"usage": {"prompt_tokens": 1}', b""])
def test_malformed_bodies_raise(body: bytes) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - json's error text varies by input
        usage_from_body(body)


# ---- streaming ---------------------------------------------------------------------------------------


async def test_stream_passes_chunks_through_as_they_arrive(engine: ExternalEngine, fb: FakeBackend) -> None:
    fb.token_interval(0.03)
    stream = await engine.stream(CHAT, {"model": "wf/extract", "messages": MESSAGES})
    assert not stream.first_token_sent
    chunks: list[bytes] = []
    arrived: list[float] = []
    async with stream:
        async for chunk in stream:
            chunks.append(chunk)
            arrived.append(time.monotonic())
            assert stream.first_token_sent
    assert chunks == fb.last_stream  # unchanged, and one upstream event per chunk
    assert arrived[-1] - arrived[0] > 0.2  # delivered while the backend was still generating
    assert chunks[-1] == b"data: [DONE]\n\n"
    assert stream.usage == Usage(6, 8)  # from the final usage chunk, not estimated
    assert stream.completed and stream.ttft_s is not None and stream.latency_s is not None
    assert stream.ttft_s < stream.latency_s
    sent = fb.last_body
    assert sent["stream"] is True and sent["stream_options"] == {"include_usage": True}
    assert sent["model"] == fb.model


async def test_stream_usage_falls_back_to_counting_content_deltas(engine: ExternalEngine, fb: FakeBackend) -> None:
    fb.stream_usage(False)  # a backend that ignores stream_options
    async with await engine.stream(CHAT, {"messages": MESSAGES, "max_tokens": 5}) as stream:
        body = b"".join([chunk async for chunk in stream])
    assert b'"usage"' not in body
    assert stream.usage == Usage(0, 5, estimated=True)


async def test_completions_stream_and_engine_without_stream_usage(client: aiohttp.ClientSession,
                                                                  fb: FakeBackend) -> None:
    engine = ExternalEngine(client, fb.url, None, fb.model, stream_usage=False)
    async with await engine.stream("/completions", {"prompt": "a b c"}) as stream:
        chunks = [chunk async for chunk in stream]
    assert "stream_options" not in fb.last_body
    assert stream.usage == Usage(0, 8, estimated=True) and len(chunks) == 10
    with pytest.raises(ValueError, match="embeddings"):
        await engine.stream("/embeddings", {"input": "x"})


@pytest.mark.parametrize(("setup", "error_class"), [
    (lambda fb: fb.fail_with(503), ErrorClass.SERVER),
    (lambda fb: fb.fail_with(429), ErrorClass.RATE_LIMITED),
    (lambda fb: fb.context_window(5), ErrorClass.CONTEXT_LENGTH),
    (lambda fb: fb.stall(), ErrorClass.TIMEOUT),
])
async def test_stream_failures_before_the_first_token_raise_at_start(
        engine: ExternalEngine, fb: FakeBackend, client: aiohttp.ClientSession,
        setup: Callable[[FakeBackend], None], error_class: ErrorClass) -> None:
    setup(fb)
    error = await failure_of(engine.stream(CHAT, {"messages": MESSAGES}, timeout_s=0.2))
    assert error.error_class is error_class
    assert not error.first_token_sent  # the gateway may still fall back
    assert in_use(client) == 0


async def test_stream_refused_raises_at_start(engine: ExternalEngine, fb: FakeBackend) -> None:
    await fb.die()
    error = await failure_of(engine.stream(CHAT, {"messages": MESSAGES}))
    assert error.error_class is ErrorClass.CONNECTION and error.failure.refused and not error.first_token_sent


async def read_until_failure(stream: ExternalStream, chunks: list[bytes],
                             after: Callable[[int], Awaitable[None]] | None = None) -> BackendError:
    async def drain() -> None:
        async for chunk in stream:
            chunks.append(chunk)
            if after is not None:
                await after(len(chunks))

    with pytest.raises(BackendError) as caught:
        await drain()
    return caught.value


async def test_backend_dying_mid_stream_is_never_retried(engine: ExternalEngine, fb: FakeBackend,
                                                         client: aiohttp.ClientSession) -> None:
    fb.token_interval(0.05)
    stream = await engine.stream(CHAT, {"messages": MESSAGES})
    chunks: list[bytes] = []

    async def kill_after_two(n: int) -> None:
        if n == 2:
            await fb.die()

    error = await read_until_failure(stream, chunks, kill_after_two)
    assert len(chunks) == 2
    assert error.error_class is ErrorClass.CONNECTION
    assert error.first_token_sent  # router.next_after_failure gives up on this
    assert pool_size(client) == 0


async def test_stream_broken_by_the_backend_mid_way(engine: ExternalEngine, fb: FakeBackend) -> None:
    fb.break_stream_after(3)
    chunks: list[bytes] = []
    error = await read_until_failure(await engine.stream(CHAT, {"messages": MESSAGES}), chunks)
    assert error.error_class is ErrorClass.CONNECTION and error.first_token_sent
    assert b"".join(chunks) == b"".join(fb.last_stream[:3])


async def test_stream_stalling_mid_way_is_a_timeout_after_first_token(engine: ExternalEngine,
                                                                      fb: FakeBackend) -> None:
    fb.stall(after_chunks=2)
    chunks: list[bytes] = []
    error = await read_until_failure(await engine.stream(CHAT, {"messages": MESSAGES}, timeout_s=0.2), chunks)
    assert error.error_class is ErrorClass.TIMEOUT and error.first_token_sent
    assert len(chunks) == 2


@pytest.mark.parametrize(("body", "message"), [
    ('data: {"choices":[{"index":0,"delta":{"content":"hi"}}]}\n\n', "before data: [DONE]"),
    ('data: {"choices":[{"index":0,"delta":{"content":"hi"}}]}\n\n'
     'data: {"error":{"message":"engine dead","type":"InternalServerError","code":500}}\n\ndata: [DONE]\n\n',
     "engine dead"),
])
async def test_truncated_or_in_band_error_stream_is_a_server_failure(engine: ExternalEngine, fb: FakeBackend,
                                                                     body: str, message: str) -> None:
    fb.fail_with(200, body)  # a 200 whose body is not a complete stream
    error = await read_until_failure(await engine.stream(CHAT, {"messages": MESSAGES}), [])
    assert error.error_class is ErrorClass.SERVER and error.first_token_sent
    assert message in error.failure.message


# ---- the consumer going away closes the upstream -----------------------------------------------------


async def test_cancelling_the_consumer_closes_the_upstream(engine: ExternalEngine, fb: FakeBackend,
                                                           client: aiohttp.ClientSession) -> None:
    fb.token_interval(0.1)
    stream = await engine.stream(CHAT, {"messages": MESSAGES})
    got_one = asyncio.Event()

    async def consume() -> None:
        async for _ in stream:
            got_one.set()

    task = asyncio.create_task(consume())
    await got_one.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await eventually(lambda: fb.disconnects == 1)  # the backend's handler saw the connection go
    await eventually(lambda: fb.open_connections == 0)
    assert pool_size(client) == 0  # not returned half-read to the pool
    assert fb.served == {}  # the answer was never completed
    assert (await engine.complete(CHAT, {"messages": MESSAGES})).usage.completion_tokens == 8


async def test_closing_the_stream_early_closes_the_upstream(engine: ExternalEngine, fb: FakeBackend,
                                                            client: aiohttp.ClientSession) -> None:
    fb.token_interval(0.1)
    async with await engine.stream(CHAT, {"messages": MESSAGES}) as stream:
        async for _ in stream:
            break
    await eventually(lambda: fb.disconnects == 1 and fb.open_connections == 0)
    assert pool_size(client) == 0


async def test_a_dropped_stream_never_iterated_does_not_leak(engine: ExternalEngine, fb: FakeBackend,
                                                             client: aiohttp.ClientSession) -> None:
    fb.token_interval(0.1)
    stream = await engine.stream(CHAT, {"messages": MESSAGES})
    assert pool_size(client) == 1
    del stream
    gc.collect()
    await eventually(lambda: fb.open_connections == 0)
    assert pool_size(client) == 0


async def test_a_stream_dropped_in_another_thread_closes_its_connection_on_its_loop(
        engine: ExternalEngine, fb: FakeBackend, client: aiohttp.ClientSession) -> None:
    fb.token_interval(0.1)
    held = [await engine.stream(CHAT, {"messages": MESSAGES})]
    dropper = threading.Thread(target=lambda: (held.clear(), gc.collect()))  # the collector's thread runs __del__
    dropper.start()
    dropper.join()
    await eventually(lambda: fb.open_connections == 0)
    assert pool_size(client) == 0


def test_a_stream_dropped_after_its_loop_closed_is_harmless(monkeypatch: pytest.MonkeyPatch) -> None:
    async def leave_a_stream_open() -> ExternalStream:
        async with FakeBackend() as fb, create_client() as client:
            fb.token_interval(0.1)
            return await ExternalEngine(client, fb.url, None, fb.model).stream(CHAT, {"messages": MESSAGES})

    stream = asyncio.run(leave_a_stream_open())
    raised: list[Any] = []
    monkeypatch.setattr(sys, "unraisablehook", raised.append)
    del stream
    gc.collect()
    assert raised == []


async def test_a_finished_stream_returns_its_connection_to_the_pool(engine: ExternalEngine, fb: FakeBackend,
                                                                    client: aiohttp.ClientSession) -> None:
    for _ in range(3):
        async with await engine.stream(CHAT, {"messages": MESSAGES}) as stream:
            [chunk async for chunk in stream]
    assert len(fb.peers) == 1 and pool_size(client) == 1


async def test_usage_is_known_when_the_chunk_carrying_done_is_handed_on() -> None:
    """A backend (vLLM does) may send the usage event and ``[DONE]`` in one read; the gateway settles
    the budget the moment it forwards ``[DONE]``, so usage must be parsed before that chunk leaves."""
    tail = (b'data: {"choices":[],"usage":{"prompt_tokens":7,"completion_tokens":3,"total_tokens":10}}\n\n'
            b"data: [DONE]\n\n")
    first = b'data: {"choices":[{"index":0,"delta":{"content":"hi"}}]}\n\n'

    async def answer(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await response.prepare(request)
        await response.write(first)
        await asyncio.sleep(0.05)
        await response.write(tail)  # one write: usage and [DONE] arrive together
        return response

    app = web.Application()
    app.router.add_post("/v1/chat/completions", answer)
    async with TestServer(app) as server, create_client() as client:
        engine = ExternalEngine(client, str(server.make_url("/v1")), None, "m")
        seen: list[Usage] = []
        async with await engine.stream(CHAT, {"messages": MESSAGES}) as stream:
            async for chunk in stream:
                if chunk.endswith(b"data: [DONE]\n\n"):
                    seen.append(stream.usage)
    assert seen == [Usage(7, 3)]


async def test_http_proxy_from_the_environment_and_no_proxy(fb: FakeBackend, client: aiohttp.ClientSession,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Egress through HTTP_PROXY (here the fake backend plays the proxy: aiohttp sends it the absolute URL);
    NO_PROXY hosts go direct. Decided once per base URL, not per request."""
    upstream = "http://inference.example.invalid:9/v1"
    for name in ("HTTP_PROXY", "http_proxy", "NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTP_PROXY", fb.url.removesuffix("/v1"))
    env_proxy.cache_clear()
    try:
        result = await ExternalEngine(client, upstream, None, fb.model).complete(CHAT, {"messages": MESSAGES})
        assert json.loads(result.body)["choices"] and fb.requests == 1
        monkeypatch.setenv("NO_PROXY", "inference.example.invalid")
        env_proxy.cache_clear()
        with pytest.raises(BackendError) as direct:  # no proxy: the made-up host does not resolve
            await ExternalEngine(client, upstream, None, fb.model).complete(CHAT, {"messages": MESSAGES})
        assert direct.value.error_class is ErrorClass.CONNECTION and fb.requests == 1
    finally:
        env_proxy.cache_clear()
