"""The ``external`` engine: any OpenAI-compatible endpoint (managed inference, a remote vLLM server).

Why it looks like this:

* **One pooled client per process.** Opening a TCP (and TLS) connection per request would add
  milliseconds to a gateway whose whole overhead budget is ~5 ms, so every engine of a replica
  shares one ``httpx.AsyncClient`` (:func:`create_client`): HTTP/1.1 keep-alive, a large pool, and
  a keep-alive expiry under uvicorn's 5 s idle timeout (vLLM's server) so we rarely reuse a
  connection the server is just closing. An httpx client belongs to one event loop; a gateway
  replica has exactly one, hence "one per process".
* **Per-request timeouts**: connect 5 s and pool 5 s (a dead host or an exhausted pool should fail
  over fast), read/write = the backend's timeout. httpx's read timeout is *between* bytes, so for
  a stream it bounds the gap between two chunks, not the whole answer.
* **Bytes through, not JSON round-trips.** A complete answer is forwarded as the backend's bytes;
  only its ``usage`` is read, from the tail of the document when that can be done safely
  (:func:`usage_from_body`), and a streamed answer's chunks are yielded exactly as they arrive,
  scanned for usage only after they were handed on.
* **Classify once.** Every failure becomes a ``BackendError`` with the class from
  ``errors.classify``, so fallback, breaker and audit agree.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any

import httpx

from pilothouse.operator.api.routing import Backend
from pilothouse.serving.errors import ErrorClass, Failure, classify, error_message

from . import CHAT, COMPLETIONS, EMBEDDINGS, PATHS, BackendError, EngineResult, Usage

CONNECT_TIMEOUT_S = 5.0
POOL_TIMEOUT_S = 5.0
DEFAULT_TIMEOUT_S = 60.0
KEEPALIVE_EXPIRY_S = 4.0  # under uvicorn's (vLLM's) default 5 s keep-alive timeout


def create_client(*, max_connections: int = 512, keepalive_expiry_s: float = KEEPALIVE_EXPIRY_S,
                  trust_env: bool = True) -> httpx.AsyncClient:
    """The process's pooled client; the gateway creates it at startup and closes it at shutdown.

    Every idle connection may stay pooled (keep-alive = max connections): at concurrency 128 a
    smaller keep-alive pool would close and reopen connections on every burst.
    """
    limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections,
                          keepalive_expiry=keepalive_expiry_s)
    timeout = httpx.Timeout(DEFAULT_TIMEOUT_S, connect=CONNECT_TIMEOUT_S, pool=POOL_TIMEOUT_S)
    return httpx.AsyncClient(limits=limits, timeout=timeout, http1=True, http2=False, follow_redirects=False,
                             trust_env=trust_env)


_shared: tuple[asyncio.AbstractEventLoop, httpx.AsyncClient] | None = None


def shared_client() -> httpx.AsyncClient:
    """The one client of this process, created on first use in the running event loop."""
    global _shared
    loop = asyncio.get_running_loop()
    if _shared is None or _shared[1].is_closed or _shared[0].is_closed():
        _shared = (loop, create_client())  # a closed loop's client is unusable: start afresh
    elif _shared[0] is not loop:
        raise RuntimeError("the shared httpx client belongs to another, still running, event loop")
    return _shared[1]


async def close_shared_client() -> None:
    global _shared
    if _shared is not None:
        client, _shared = _shared[1], None
        await client.aclose()


def _status_failure(status_code: int, body: bytes | None) -> Failure:
    if status_code >= 400:
        return classify((status_code, body))
    return Failure(ErrorClass.SERVER, f"HTTP {status_code}: unexpected status", status_code=status_code)


_WS = b" \t\r\n"
_USAGE_KEY = b'"usage"'
_NO_USAGE = Usage(estimated=True)


def _tail_usage(body: bytes) -> tuple[bool, Usage | None]:
    """Read the top-level ``usage`` from the end of the document without parsing the rest.

    Returns (found, usage); found=False means "could not decide here, parse the whole body". The
    last ``"usage"`` is taken only if it is provably a key of the top-level object: preceded by
    ``{`` or ``,`` (so its quote opens a string rather than closing one, and a string followed by
    ``:`` is a key), and followed by a value and then nothing but more members and exactly one
    closing brace. A ``"usage"`` nested deeper would need more closers after it.
    """
    i = body.rfind(_USAGE_KEY)
    if i < 0:
        return False, None
    j = i - 1
    while j >= 0 and body[j] in _WS:
        j -= 1
    if j < 0 or body[j] not in b"{,":
        return False, None
    try:
        tail = body[i + len(_USAGE_KEY):].decode().lstrip()
        if not tail.startswith(":"):
            return False, None
        tail = tail[1:].lstrip()
        value, end = json.JSONDecoder().raw_decode(tail)
        rest = tail[end:].strip()
        if rest != "}" and not (rest.startswith(",") and isinstance(json.loads("{" + rest[1:]), dict)):
            return False, None
    except ValueError:  # UnicodeDecodeError is a ValueError
        return False, None
    return True, Usage.from_openai(value)


def usage_from_body(body: bytes) -> tuple[Usage, dict[str, Any] | None]:
    """Usage of a complete answer, and the parsed body if it had to be parsed. ValueError if malformed.

    A missing or null usage gives an empty ``estimated`` usage: the gateway then uses its own count.
    """
    found, usage = _tail_usage(body)
    if found:
        return usage or _NO_USAGE, None
    data = json.loads(body)
    if not isinstance(data, dict):
        raise ValueError("response body is not a JSON object")
    return Usage.from_openai(data.get("usage")) or _NO_USAGE, data


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
            event = json.loads(data)
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


_closing: set[asyncio.Task[None]] = set()


def _close_later(response: httpx.Response) -> None:
    task = asyncio.ensure_future(response.aclose())
    _closing.add(task)  # the loop keeps only weak references to tasks
    task.add_done_callback(_closing.discard)


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
    """One streamed answer from an external backend over HTTP."""

    def __init__(self, response: httpx.Response, started: float) -> None:
        self._loop = asyncio.get_running_loop()
        self._response = response
        super().__init__(started)

    async def aclose(self) -> None:
        await super().aclose()
        await self._response.aclose()  # no-op when the relay already closed it

    def __del__(self) -> None:
        """Dropped unclosed (and perhaps never iterated): give the connection back rather than leak it."""
        response, loop = getattr(self, "_response", None), getattr(self, "_loop", None)
        if response is not None and loop is not None and not response.is_closed and not loop.is_closed():
            loop.call_soon_threadsafe(_close_later, response)

    def _chunks(self) -> AsyncIterator[bytes]:
        return self._response.aiter_bytes()

    async def _finished(self) -> None:
        await self._response.aclose()


class ExternalEngine:
    """Calls one OpenAI-compatible backend. Cheap to create: it holds no connection of its own."""

    __slots__ = ("_base_url", "_client", "_headers", "_timeout", "model", "stream_usage")

    def __init__(self, client: httpx.AsyncClient, base_url: str, api_key: str | None, model: str, *,
                 timeout_s: float = DEFAULT_TIMEOUT_S, stream_usage: bool = True) -> None:
        """``stream_usage=False`` for backends that reject ``stream_options`` (usage is then estimated)."""
        self._client = client
        self._base_url = base_url.rstrip("/")
        self.model = model
        self.stream_usage = stream_usage
        self._headers = {"content-type": "application/json"}
        if api_key:
            self._headers["authorization"] = f"Bearer {api_key}"
        self._timeout = self._make_timeout(timeout_s)

    @classmethod
    def for_backend(cls, backend: Backend, client: httpx.AsyncClient, api_key: str | None = None, *,
                    timeout_s: float = DEFAULT_TIMEOUT_S, stream_usage: bool = True) -> ExternalEngine:
        """The engine for a RoutingTable backend; the caller resolves ``api_key_secret_ref`` to ``api_key``."""
        if not backend.endpoint:
            raise ValueError(f"backend {backend.model_deployment!r} has no endpoint yet")
        return cls(client, backend.endpoint, api_key, backend.model, timeout_s=timeout_s, stream_usage=stream_usage)

    @staticmethod
    def _make_timeout(timeout_s: float) -> httpx.Timeout:
        return httpx.Timeout(connect=CONNECT_TIMEOUT_S, read=timeout_s, write=timeout_s, pool=POOL_TIMEOUT_S)

    def _request(self, path: str, payload: dict[str, Any], timeout_s: float | None,
                 headers: Mapping[str, str] | None) -> httpx.Request:
        if path not in PATHS:
            raise ValueError(f"unsupported path {path!r}; expected one of {sorted(PATHS)}")
        all_headers = {**self._headers, **headers} if headers else self._headers
        timeout = self._timeout if timeout_s is None else self._make_timeout(timeout_s)
        return self._client.build_request("POST", self._base_url + path, content=json.dumps(payload).encode(),
                                          headers=all_headers, timeout=timeout)

    async def complete(self, path: str, body: Mapping[str, Any], *, timeout_s: float | None = None,
                       headers: Mapping[str, str] | None = None) -> EngineResult:
        """One non-streamed call. ``body`` is the client's request; ``model`` is replaced by the backend's."""
        payload = {k: v for k, v in body.items() if k not in ("stream", "stream_options")}
        payload["model"] = self.model
        request = self._request(path, payload, timeout_s, headers)
        started = time.perf_counter()
        try:
            response = await self._client.send(request)
        except Exception as exc:  # CancelledError is a BaseException and passes through unclassified
            raise BackendError(classify(exc)) from exc
        latency = time.perf_counter() - started
        content = response.content
        if response.status_code != 200:
            raise BackendError(_status_failure(response.status_code, content))
        try:
            usage, data = usage_from_body(content)
        except ValueError as exc:
            raise BackendError(Failure(ErrorClass.SERVER, f"malformed response body: {exc}",
                                       status_code=200)) from exc
        result = EngineResult(content, usage, latency, content_type=response.headers.get("content-type",
                                                                                        "application/json"))
        if data is not None:
            result.__dict__["data"] = data  # already parsed: seed the cached_property
        return result

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
        request = self._request(path, payload, timeout_s, headers)
        started = time.perf_counter()
        try:
            response = await self._client.send(request, stream=True)
        except Exception as exc:
            raise BackendError(classify(exc)) from exc
        if response.status_code != 200:
            try:
                content: bytes | None = await response.aread()
            except Exception:  # the error body is best-effort; the status decides the class
                content = None
            finally:
                await response.aclose()
            raise BackendError(_status_failure(response.status_code, content))
        return ExternalStream(response, started)
