"""Backend failures → error classes: what may be retried elsewhere, and what says the backend is broken."""

from __future__ import annotations

import asyncio
import errno
import json
import socket
import struct
from collections.abc import Awaitable, Callable

import aiohttp
import httpx
import pytest

from pilothouse.serving.errors import ErrorClass, Failure, classify, classify_exception, classify_status

# (class, retry on another backend?, counts against the breaker?)
POLICY = [
    (ErrorClass.TIMEOUT, True, True),
    (ErrorClass.CONNECTION, True, True),
    (ErrorClass.SERVER, True, True),
    (ErrorClass.RATE_LIMITED, True, False),
    (ErrorClass.CONTEXT_LENGTH, True, False),
    (ErrorClass.CLIENT, False, False),
    (ErrorClass.CANCELLED, False, False),
]


@pytest.mark.parametrize(("cls", "retry", "counts"), POLICY, ids=[p[0].value for p in POLICY])
def test_each_class_says_whether_to_retry_and_whether_it_counts(cls: ErrorClass, retry: bool, counts: bool) -> None:
    assert (cls.retry_elsewhere, cls.counts_for_breaker) == (retry, counts)
    failure = Failure(cls, "x")
    assert (failure.retry_elsewhere, failure.counts_for_breaker) == (retry, counts)


def unused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_real_refused_connection_is_connection_and_refused() -> None:
    async with httpx.AsyncClient() as client:
        with pytest.raises(httpx.ConnectError) as caught:
            await client.get(f"http://127.0.0.1:{unused_port()}/v1/models")
    failure = classify(caught.value)
    assert failure.error_class is ErrorClass.CONNECTION
    assert failure.refused


async def test_real_refused_aiohttp_connection_is_connection_and_refused() -> None:
    async with aiohttp.ClientSession() as client:
        with pytest.raises(aiohttp.ClientConnectorError) as caught:
            await client.post(f"http://127.0.0.1:{unused_port()}/v1/chat/completions")
    failure = classify(caught.value)
    assert failure.error_class is ErrorClass.CONNECTION
    assert failure.refused


Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


def _answer(raw: bytes) -> Handler:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(raw)
        await writer.drain()
        writer.close()

    return handle


async def _reset(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.readuntil(b"\r\n\r\n")
    writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()  # linger 0: an RST, not a FIN


async def _never_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.read()  # holds the connection until the client gives up


async def _aiohttp_failure(handler: Handler, timeout: aiohttp.ClientTimeout | None = None) -> BaseException:
    """What a real aiohttp call raises against a raw TCP server doing ``handler``."""
    accepted: list[asyncio.StreamWriter] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)
        await handler(reader, writer)

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with aiohttp.ClientSession(timeout=timeout or aiohttp.ClientTimeout(total=5)) as client:
            with pytest.raises(aiohttp.ClientError) as caught:
                async with client.post(f"http://127.0.0.1:{port}/v1/chat/completions", data=b"{}") as response:
                    await response.read()
    finally:
        server.close()
        for writer in accepted:
            writer.close()
    return caught.value


@pytest.mark.parametrize("handler", [
    _answer(b""), _reset, _answer(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{\"id\":"),
    _answer(b"SSH-2.0-OpenSSH_9.6\r\n\r\n"),
], ids=["closed-before-answering", "reset", "closed-mid-body", "not-http"])
async def test_real_broken_aiohttp_exchanges_are_connection_but_not_refused(handler: Handler) -> None:
    exc = await _aiohttp_failure(handler)
    failure = classify(exc)
    assert failure.error_class is ErrorClass.CONNECTION, exc
    assert not failure.refused


async def test_real_aiohttp_read_timeout_is_a_timeout() -> None:
    exc = await _aiohttp_failure(_never_answer, aiohttp.ClientTimeout(total=None, sock_read=0.1))
    assert isinstance(exc, aiohttp.SocketTimeoutError)
    assert classify(exc).error_class is ErrorClass.TIMEOUT


@pytest.mark.parametrize("url", ["big.example/v1/chat/completions", "ftp://big.example/v1/chat/completions",
                                 "http://[not-an-address/v1"])
async def test_a_bad_endpoint_url_under_aiohttp_is_connection(url: str) -> None:
    async with aiohttp.ClientSession() as client:
        with pytest.raises(aiohttp.ClientError) as caught:
            await client.post(url)
    failure = classify(caught.value)
    assert failure.error_class is ErrorClass.CONNECTION and not failure.refused


def test_refused_is_found_through_the_cause_chain() -> None:
    exc = httpx.ConnectError("All connection attempts failed")
    exc.__cause__ = ConnectionRefusedError(errno.ECONNREFUSED, "Connect call failed")
    assert classify(exc).refused


@pytest.mark.parametrize("exc", [
    httpx.ConnectError("[Errno -2] Name or service not known"),
    httpx.RemoteProtocolError("Server disconnected without sending a response."),
    httpx.ReadError("[Errno 104] Connection reset by peer"),
    ConnectionResetError(errno.ECONNRESET, "reset"),
    httpx.UnsupportedProtocol("Request URL is missing an 'http://' or 'https://' protocol."),
], ids=["dns", "peer-closed", "reset", "bare-reset", "bad-endpoint-url"])
def test_dns_reset_and_broken_connections_are_connection_but_not_refused(exc: BaseException) -> None:
    failure = classify(exc)
    assert failure.error_class is ErrorClass.CONNECTION
    assert not failure.refused


@pytest.mark.parametrize("exc", [
    httpx.ReadTimeout("timed out"), httpx.ConnectTimeout("timed out"), httpx.PoolTimeout("pool"), TimeoutError(),
], ids=["read", "connect", "pool", "builtin"])
def test_timeouts(exc: BaseException) -> None:
    assert classify(exc).error_class is ErrorClass.TIMEOUT


@pytest.mark.parametrize("exc", [
    aiohttp.ConnectionTimeoutError("Connection timeout to host http://b/v1"),
    aiohttp.SocketTimeoutError("Timeout on reading data from socket"),
    aiohttp.ServerTimeoutError("timeout"),
], ids=["aiohttp-connect", "aiohttp-read", "aiohttp-server"])
def test_aiohttp_timeouts(exc: BaseException) -> None:
    assert classify(exc).error_class is ErrorClass.TIMEOUT


def test_http_408_is_a_timeout() -> None:
    assert classify_status(408).error_class is ErrorClass.TIMEOUT


class EngineDeadError(RuntimeError):
    """Stands in for vLLM's in-process engine failure (the serving layer cannot import vLLM here)."""


@pytest.mark.parametrize("status", [500, 502, 503, 504, 529])
def test_5xx_is_server(status: int) -> None:
    assert classify((status, b"upstream error")).error_class is ErrorClass.SERVER


def test_engine_dead_and_unknown_exceptions_are_server() -> None:
    assert classify(EngineDeadError("Background loop has errored already.")).error_class is ErrorClass.SERVER
    assert classify(httpx.DecodingError("bad gzip")).error_class is ErrorClass.SERVER
    assert classify(aiohttp.ClientError("something aiohttp has no class for")).error_class is ErrorClass.SERVER


def test_429_is_rate_limited_with_the_message_kept() -> None:
    failure = classify((429, b'{"error": {"message": "Rate limit reached", "type": "requests"}}'))
    assert failure.error_class is ErrorClass.RATE_LIMITED
    assert failure.status_code == 429 and "Rate limit reached" in failure.message


CONTEXT_BODIES = {
    "vllm-max-tokens": {"error": {"message": "'max_tokens' or 'max_completion_tokens' is too large: 8000. This "
                                             "model's maximum context length is 4096 tokens and your request has "
                                             "2778 input tokens (8000 > 4096 - 2778).",
                                  "type": "BadRequestError", "param": None, "code": 400}},
    "vllm-legacy": {"object": "error", "message": "This model's maximum context length is 4096 tokens. However, you "
                    "requested 5000 tokens (4000 in the messages, 1000 in the completion). Please reduce the length "
                    "of the messages or completion.", "type": "BadRequestError", "param": None, "code": 400},
    "vllm-decoder-prompt": {"error": {"message": "The decoder prompt (length 5000) is longer than the maximum model "
                                                 "length of 4096. Make sure that `max_model_len` is no smaller than "
                                                 "the number of text tokens.", "code": 400}},
    "vllm-input-prompt": {"error": {"message": "Input prompt (5000 tokens) is too long and exceeds limit of 4096"}},
    "openai-code": {"error": {"message": "This model's maximum context length is 8192 tokens. However, your messages "
                                         "resulted in 9000 tokens. Please reduce the length of the messages.",
                              "type": "invalid_request_error", "param": "messages",
                              "code": "context_length_exceeded"}},
    "openai-context-window": {"error": {"message": "Your input exceeds the context window of this model. Please "
                                                   "adjust your input and try again.",
                                        "type": "invalid_request_error", "code": "context_length_exceeded"}},
    "plain-text": "Too many tokens: prompt + max_tokens exceed the limit",
}


@pytest.mark.parametrize("body", CONTEXT_BODIES.values(), ids=CONTEXT_BODIES.keys())
def test_context_length_wording_of_vllm_and_openai(body: object) -> None:
    raw = body if isinstance(body, str) else json.dumps(body)
    failure = classify((400, raw.encode()))
    assert failure.error_class is ErrorClass.CONTEXT_LENGTH
    assert failure.retry_elsewhere and not failure.counts_for_breaker


def test_parsed_body_is_accepted_too() -> None:
    assert classify_status(400, CONTEXT_BODIES["openai-code"]).error_class is ErrorClass.CONTEXT_LENGTH


@pytest.mark.parametrize(("status", "body"), [
    (400, b'{"error": {"message": "temperature must be between 0 and 2", "type": "BadRequestError"}}'),
    (401, b'{"error": {"message": "Incorrect API key provided"}}'),
    (404, b'{"error": {"message": "The model `x` does not exist."}}'),
    (422, b'{"detail": [{"loc": ["body", "messages"], "msg": "field required"}]}'),
    (400, None),
])
def test_other_4xx_are_client_errors_not_retried_and_not_counted(status: int, body: bytes | None) -> None:
    failure = classify_status(status, body)
    assert failure.error_class is ErrorClass.CLIENT
    assert not failure.retry_elsewhere and not failure.counts_for_breaker


def test_a_prompt_echoed_outside_the_error_message_is_not_mistaken_for_context_length() -> None:
    body = b'{"error": {"message": "invalid role: narrator"}, "prompt": "what is the maximum context length?"}'
    assert classify_status(400, body).error_class is ErrorClass.CLIENT


def test_cancelled() -> None:
    assert classify(asyncio.CancelledError()).error_class is ErrorClass.CANCELLED


def _transport(status: int, body: bytes) -> httpx.MockTransport:
    return httpx.MockTransport(lambda request: httpx.Response(status, content=body))


async def test_http_status_error_from_raise_for_status() -> None:
    body = b'{"error": {"code": "context_length_exceeded", "message": "too long"}}'
    async with httpx.AsyncClient(transport=_transport(400, body), base_url="http://b") as client:
        response = await client.post("/v1/chat/completions")
        with pytest.raises(httpx.HTTPStatusError) as caught:
            response.raise_for_status()
    assert classify(caught.value).error_class is ErrorClass.CONTEXT_LENGTH


async def test_streamed_error_response_with_unread_body_is_classified_by_status() -> None:
    async def body():  # a stream: the body is not read before raise_for_status
        yield b"overloaded"

    transport = httpx.MockTransport(lambda request: httpx.Response(503, content=body()))
    client = httpx.AsyncClient(transport=transport, base_url="http://b")
    async with client, client.stream("POST", "/v1/chat/completions") as response:
        with pytest.raises(httpx.HTTPStatusError) as caught:
            response.raise_for_status()
        with pytest.raises(httpx.ResponseNotRead):
            _ = response.content
        failure = classify_exception(caught.value)
    assert failure.error_class is ErrorClass.SERVER and failure.status_code == 503


def test_success_status_is_not_a_failure() -> None:
    with pytest.raises(ValueError, match="not a failure"):
        classify_status(200)
