"""The ``external`` engine: any OpenAI-compatible endpoint (managed inference, a remote vLLM server).

Why it looks like this:

* **One pooled client per process.** Opening a TCP (and TLS) connection per request would add
  milliseconds to a gateway whose whole overhead budget is ~5 ms, so every engine of a replica
  shares one ``aiohttp.ClientSession`` (:func:`create_client`): HTTP/1.1 keep-alive, a large pool,
  and a keep-alive expiry under uvicorn's 5 s idle timeout (vLLM's server) so we rarely reuse a
  connection the server is just closing. A session belongs to one event loop; a gateway replica
  has exactly one, hence "one per process".
* **aiohttp, not httpx.** On the gateway's two cores the client's own CPU per request decides
  throughput: measured on this path, httpx 0.28 spent ~2.7 ms of CPU per call, aiohttp ~0.12 ms.
* **Per-request timeouts**: connect 5 s (``sock_connect``) and waiting for a pool slot 5 s on top
  (``connect`` covers both, aiohttp has no separate pool timeout): a dead host or an exhausted
  pool should fail over fast. Read = the backend's timeout, *between* bytes (``sock_read``), so for
  a stream it bounds the gap between two chunks, not the whole answer. aiohttp has no write
  timeout, and its read timeout starts once the body is written: a backend that stops reading a
  body larger than the socket buffers (the gateway caps bodies at 1 MiB by default) holds the
  call until our own caller gives up.
* **Bytes through, not JSON round-trips.** A complete answer is forwarded as the backend's bytes,
  parsed once on the side for its ``usage`` and what the audit keeps (:func:`usage_from_body`); a
  streamed answer's chunks are yielded exactly as they arrive, scanned for usage only after they
  were handed on.
* **Classify once.** Every failure becomes a ``BackendError`` with the class from
  ``errors.classify``, so fallback, breaker and audit agree.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Awaitable, Mapping
from typing import Any

import aiohttp
import orjson
from pydantic_core import from_json

from pilothouse.egress import KEEPALIVE_EXPIRY_S, env_proxy
from pilothouse.operator.api.routing import Backend
from pilothouse.serving.errors import ErrorClass, Failure, classify, error_message

from . import CHAT, COMPLETIONS, EMBEDDINGS, PATHS, BackendError, EngineResult, Usage

CONNECT_TIMEOUT_S = 5.0
POOL_TIMEOUT_S = 5.0
DEFAULT_TIMEOUT_S = 60.0


def loads(data: bytes | str) -> Any:
    """JSON through pydantic's parser (2.4 -> 1.0 us for a short answer), or through the standard library for what
    it refuses and is read anyway (a lone surrogate, nesting beyond its limit). Not orjson, though 0.3 us faster:
    it reads an integer beyond 64 bits as a float, and the audit keeps what the backend answered."""
    try:
        return from_json(data, allow_inf_nan=True)
    except ValueError:
        return json.loads(data)


def dumps(payload: Any) -> bytes:
    """JSON through orjson (2.3 -> 0.1 us for a short chat request), or through the standard library for what a body
    it parsed may hold and orjson refuses: an integer beyond 64 bits, a lone surrogate."""
    try:
        return orjson.dumps(payload)
    except TypeError:
        return json.dumps(payload).encode()


def _timeout(read_s: float) -> aiohttp.ClientTimeout:
    """No total: a streamed answer may take as long as it keeps sending."""
    return aiohttp.ClientTimeout(total=None, connect=POOL_TIMEOUT_S + CONNECT_TIMEOUT_S,
                                 sock_connect=CONNECT_TIMEOUT_S, sock_read=read_s)


def create_client(*, max_connections: int = 512, keepalive_expiry_s: float = KEEPALIVE_EXPIRY_S
                  ) -> aiohttp.ClientSession:
    """The process's pooled client; the gateway creates it at startup and closes it at shutdown.

    Must be called in the running event loop it will serve. One limit for all hosts and none per
    host; every idle connection stays pooled until its keep-alive expires: at concurrency 128 a
    smaller pool would close and reopen connections on every burst. Proxies are the engines' business
    (:func:`env_proxy`), not the session's: ``trust_env`` would decide them per request.
    """
    connector = aiohttp.TCPConnector(limit=max_connections, limit_per_host=0, keepalive_timeout=keepalive_expiry_s)
    return aiohttp.ClientSession(connector=connector, timeout=_timeout(DEFAULT_TIMEOUT_S))


_shared: tuple[asyncio.AbstractEventLoop, aiohttp.ClientSession] | None = None


def shared_client() -> aiohttp.ClientSession:
    """The one client of this process, created on first use in the running event loop."""
    global _shared
    loop = asyncio.get_running_loop()
    if _shared is None or _shared[1].closed or _shared[0].is_closed():
        _shared = (loop, create_client())  # a closed loop's client is unusable: start afresh
    elif _shared[0] is not loop:
        raise RuntimeError("the shared HTTP client belongs to another, still running, event loop")
    return _shared[1]


async def close_shared_client() -> None:
    global _shared
    if _shared is not None:
        client, _shared = _shared[1], None
        await client.close()


def _status_failure(status_code: int, body: bytes | None) -> Failure:
    if status_code >= 400:
        return classify((status_code, body))
    return Failure(ErrorClass.SERVER, f"HTTP {status_code}: unexpected status", status_code=status_code)


_NO_USAGE = Usage(estimated=True)


def usage_from_body(body: bytes) -> tuple[Usage, dict[str, Any]]:
    """Usage of a complete answer, and the parsed body. ValueError if malformed.

    Parsed whole, once: the data plane reads what the audit keeps of the answer from the same parse. A
    missing or null usage gives an empty ``estimated`` usage: the gateway then uses its own count.
    """
    data = loads(body)
    if not isinstance(data, dict):
        raise ValueError("response body is not a JSON object")
    return Usage.from_openai(data.get("usage")) or _NO_USAGE, data


def complete_result(status: int, content: bytes, latency_s: float,
                    content_type: str = "application/json") -> EngineResult:
    """A non-streamed answer, whichever engine brought it: its result, or the ``BackendError`` of a non-200
    status or of a body that is not a JSON object."""
    if status != 200:
        raise BackendError(_status_failure(status, content))
    try:
        usage, data = usage_from_body(content)
    except ValueError as exc:
        raise BackendError(Failure(ErrorClass.SERVER, f"malformed response body: {exc}", status_code=200)) from exc
    return EngineResult(content, data, usage, latency_s, content_type=content_type)


class _SseScanner:
    """Follows an SSE stream on the side: usage, content deltas, ``[DONE]`` and in-band errors.

    Fed the raw chunks after they were forwarded; keeps only the incomplete last line between
    chunks. Usage is the last ``usage`` object seen (the final chunk when ``include_usage`` was
    asked for; every chunk under vLLM's continuous usage stats). Without one, completion tokens are
    *estimated* as the number of non-empty content deltas (chat ``delta.content`` or completions
    ``text``), which matches vLLM and OpenAI's one-token-per-chunk streaming but can undercount when
    a backend batches tokens into a chunk.
    """

    __slots__ = ("_buf", "content_deltas", "done", "error", "usage")

    def __init__(self) -> None:
        self._buf = b""
        self.usage: Usage | None = None
        self.content_deltas = 0
        self.done = False
        self.error: Failure | None = None

    def feed(self, chunk: bytes) -> None:
        lines = (self._buf + chunk).split(b"\n")
        self._buf = lines.pop()
        for line in lines:
            self._line(line)

    def finish(self) -> None:
        if self._buf:
            self._line(self._buf)
            self._buf = b""

    def _line(self, line: bytes) -> None:
        if not line.startswith(b"data:"):
            return  # blank separators, comments, `event:`/`id:` fields
        data = line[5:].strip()
        if data == b"[DONE]":
            self.done = True
            return
        try:
            event = loads(data)
        except ValueError:
            return
        if not isinstance(event, dict):
            return
        if event.get("error"):  # vLLM reports an engine failure mid-generation in-band, after the 200
            self.error = Failure(ErrorClass.SERVER, f"in-stream error: {error_message(event)}")
            return
        usage = Usage.from_openai(event.get("usage"))
        if usage is not None:
            self.usage = usage
        for choice in event.get("choices") or ():
            if not isinstance(choice, dict):
                continue
            delta = choice.get("delta")
            text = delta.get("content") if isinstance(delta, dict) else choice.get("text")
            if text:
                self.content_deltas += 1


class SseStream:
    """What every streamed answer shares (see :class:`~.EngineStream`): relay the upstream's SSE chunks
    unchanged, note the first token, scan usage and in-band errors, and turn any failure into one
    classified :class:`BackendError`. Subclasses say where chunks come from (``_chunks``), how their
    transport's exceptions classify (``_classify``) and what to release when the relay ends (``_finished``).

    The work happens in an inner async generator so that the upstream is released however the
    consumer stops: exhaustion, an error, ``aclose()``, cancellation of the consumer's task (thrown
    into the generator at its await), or even dropping the object (asyncio's async-generator
    finaliser runs ``aclose``). Prefer ``async with``/``aclose`` over relying on the last one.
    """

    def __init__(self, started: float) -> None:
        self._started = started
        self._scanner = _SseScanner()
        self.first_token_sent = False
        self.ttft_s: float | None = None
        self.latency_s: float | None = None
        self._gen = self._relay()

    @property
    def usage(self) -> Usage:
        """Backend-reported usage, else completion tokens estimated from content deltas (see _SseScanner)."""
        if self._scanner.usage is not None:
            return self._scanner.usage
        return Usage(0, self._scanner.content_deltas, estimated=True)

    @property
    def completed(self) -> bool:
        """True once ``[DONE]`` was seen: the answer is whole."""
        return self._scanner.done

    def __aiter__(self) -> SseStream:
        return self

    async def __anext__(self) -> bytes:
        return await self._gen.__anext__()

    async def aclose(self) -> None:
        await self._gen.aclose()

    async def __aenter__(self) -> SseStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def _chunks(self) -> AsyncIterator[bytes]:
        raise NotImplementedError

    def _classify(self, exc: Exception) -> Failure:
        return classify(exc)

    async def _finished(self) -> None:
        """Release the upstream once the relay ended, however it ended."""

    async def _relay(self) -> AsyncIterator[bytes]:
        scanner = self._scanner
        try:
            async for chunk in self._chunks():
                if not chunk:
                    continue
                if not self.first_token_sent:
                    self.first_token_sent = True
                    self.ttft_s = time.perf_counter() - self._started
                # Scan before the hand-over: the relay settles the budget as soon as it forwards
                # `data: [DONE]`, and a usage event often shares that chunk.
                scanner.feed(chunk)
                yield chunk
                if scanner.error is not None:
                    raise BackendError(scanner.error, first_token_sent=True)
            scanner.finish()
            if scanner.error is not None:
                raise BackendError(scanner.error, first_token_sent=self.first_token_sent)
            if not scanner.done:
                raise BackendError(Failure(ErrorClass.SERVER, "stream ended before data: [DONE]"),
                                   first_token_sent=self.first_token_sent)
        except BackendError:
            raise
        except Exception as exc:  # transport errors mid-stream; CancelledError/GeneratorExit pass through
            raise BackendError(self._classify(exc), first_token_sent=self.first_token_sent) from exc
        finally:
            self.latency_s = time.perf_counter() - self._started
            await self._finished()


class ExternalStream(SseStream):
    """One streamed answer from an external backend over HTTP.

    A response read to its end has already gone back to the pool (aiohttp releases it at the end of
    the body), so closing it then is a no-op; closing one cut short closes its connection, which
    would otherwise be handed to the next request with the rest of this answer still unread.
    """

    def __init__(self, response: aiohttp.ClientResponse, started: float) -> None:
        self._loop = asyncio.get_running_loop()
        self._response = response
        super().__init__(started)

    async def aclose(self) -> None:
        await super().aclose()
        self._response.close()  # a stream never iterated has no relay to close it

    def __del__(self) -> None:
        """Dropped unclosed (and perhaps never iterated): close the connection rather than leak it.

        The collector may run this in any thread, and a transport may only be touched from its loop.
        """
        response, loop = getattr(self, "_response", None), getattr(self, "_loop", None)
        if response is not None and loop is not None and not response.closed and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop closed since the check
                loop.call_soon_threadsafe(response.close)

    async def _chunks(self) -> AsyncIterator[bytes]:
        """Each HTTP chunk (one write of the backend: an SSE event), or what one read brought, as soon as it
        arrives; ``iter_any`` would join whatever is buffered, events the backend sent apart."""
        async for data, _ in self._response.content.iter_chunks():
            yield data

    async def _finished(self) -> None:
        self._response.close()


class ExternalEngine:
    """Calls one OpenAI-compatible backend. Cheap to create: it holds no connection of its own."""

    __slots__ = ("_base_url", "_client", "_headers", "_proxy", "_timeout", "model", "stream_usage")

    def __init__(self, client: aiohttp.ClientSession, base_url: str, api_key: str | None, model: str, *,
                 timeout_s: float = DEFAULT_TIMEOUT_S, stream_usage: bool = True) -> None:
        """``stream_usage=False`` for backends that reject ``stream_options`` (usage is then estimated)."""
        self._client = client
        self._base_url = base_url.rstrip("/")
        # A connection over a Unix socket (``engines.local_socket``) reaches its server with no proxy between
        self._proxy = None if isinstance(client.connector, aiohttp.UnixConnector) else env_proxy(self._base_url)
        self.model = model
        self.stream_usage = stream_usage
        self._headers = {"content-type": "application/json"}
        if api_key:
            self._headers["authorization"] = f"Bearer {api_key}"
        self._timeout = _timeout(timeout_s)

    @classmethod
    def for_backend(cls, backend: Backend, client: aiohttp.ClientSession, api_key: str | None = None, *,
                    timeout_s: float = DEFAULT_TIMEOUT_S, stream_usage: bool = True) -> ExternalEngine:
        """The engine for a RoutingTable backend; the caller resolves ``api_key_secret_ref`` to ``api_key``."""
        if not backend.endpoint:
            raise ValueError(f"backend {backend.model_deployment!r} has no endpoint yet")
        return cls(client, backend.endpoint, api_key, backend.model, timeout_s=timeout_s, stream_usage=stream_usage)

    def _url(self, path: str) -> str:
        if path not in PATHS:
            raise ValueError(f"unsupported path {path!r}; expected one of {sorted(PATHS)}")
        return self._base_url + path

    def _post(self, path: str, payload: dict[str, Any], timeout_s: float | None,
              headers: Mapping[str, str] | None) -> Awaitable[aiohttp.ClientResponse]:
        """The request, sent when awaited; the response comes with its headers read and its body not."""
        return self._client.post(self._url(path), data=dumps(payload),
                                 headers={**self._headers, **headers} if headers else self._headers,
                                 timeout=self._timeout if timeout_s is None else _timeout(timeout_s),
                                 proxy=self._proxy, allow_redirects=False)

    async def complete(self, path: str, body: Mapping[str, Any], *, timeout_s: float | None = None,
                       headers: Mapping[str, str] | None = None) -> EngineResult:
        """One non-streamed call. ``body`` is the client's request; ``model`` is replaced by the backend's."""
        payload = {k: v for k, v in body.items() if k not in ("stream", "stream_options")}
        payload["model"] = self.model
        request = self._post(path, payload, timeout_s, headers)
        started = time.perf_counter()
        try:
            async with await request as response:  # released (or closed, if cut short) on exit
                content = await response.read()
                status, content_type = response.status, response.headers.get("content-type", "application/json")
        except Exception as exc:  # CancelledError is a BaseException and passes through unclassified
            raise BackendError(classify(exc)) from exc
        return complete_result(status, content, time.perf_counter() - started, content_type)

    async def stream(self, path: str, body: Mapping[str, Any], *, timeout_s: float | None = None,
                     headers: Mapping[str, str] | None = None) -> ExternalStream:
        """Start a streamed call; returns once the backend answered 200, before any chunk is read.

        Failures up to that point (refused, timeout, 4xx/5xx) raise here with first_token_sent False,
        so the gateway can still fall back before it sends its own response headers.
        """
        if path == EMBEDDINGS:
            raise ValueError("embeddings cannot be streamed")
        payload = dict(body)
        payload["model"] = self.model
        payload["stream"] = True
        if self.stream_usage and path in (CHAT, COMPLETIONS):
            options = payload.get("stream_options")
            payload["stream_options"] = {**(options if isinstance(options, dict) else {}), "include_usage": True}
        request = self._post(path, payload, timeout_s, headers)
        started = time.perf_counter()
        try:
            response = await request
        except Exception as exc:
            raise BackendError(classify(exc)) from exc
        if response.status != 200:
            try:
                content: bytes | None = await response.read()
            except Exception:  # the error body is best-effort; the status decides the class
                content = None
            finally:
                response.release()  # pooled again once read whole, else closed
            raise BackendError(_status_failure(response.status, content))
        return ExternalStream(response, started)
