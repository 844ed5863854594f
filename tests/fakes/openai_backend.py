"""A local OpenAI-compatible backend that tests can tell to fail, stall, slow down or die.

It speaks real HTTP on 127.0.0.1 (aiohttp), so the gateway's engine, connection pool and error
classification are exercised exactly as against vLLM or a managed endpoint, in milliseconds and
without a model. Error bodies use vLLM's shapes and wording, so classification is tested on the
text it will meet in production.

Token model (deterministic, so tests can predict usage): one token per whitespace-separated word of
the prompt (all message contents, or the completions prompt, or each embeddings input); a reply is
``min(max_tokens, reply_tokens)`` words, one streamed chunk per word, ``finish_reason`` "length" when
``max_tokens`` cut it. Replies depend only on the prompt when the request is deterministic
(``temperature`` 0 or a ``seed``); otherwise they also vary with the request count, as sampling would.

Usage::

    async with FakeBackend() as fb:
        engine = ExternalEngine(client, fb.url, None, fb.model)
        fb.fail_with(503)            # every request answers 503 until fb.reset() (or `times=` runs out)
        await fb.die()               # stop listening and drop open connections: connection refused
        await fb.revive()            # listen again on the same port
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import re
import threading
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

JSON = dict[str, Any]
Answer = Callable[[str], tuple[str, dict[str, float]] | None]
STALL_FOREVER_S = 3600.0
_TOKEN = re.compile(r"\w+|\s+|[^\w\s]")


@dataclass
class _Injected:
    status: int
    body: JSON | str
    remaining: int | None  # None: until reset


def error_body(status: int, message: str, type_: str = "BadRequestError", param: str | None = None) -> JSON:
    """vLLM's (and OpenAI's) error object."""
    return {"error": {"message": message, "type": type_, "param": param, "code": status}}


def count_tokens(text: str) -> int:
    """The fake's tokenizer: one token per whitespace-separated word."""
    return len(text.split())


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts: [{"type": "text", "text": ...}, ...]
        return " ".join(p.get("text", "") for p in content if isinstance(p, dict))
    return ""


def prompt_text(path: str, body: JSON) -> str:
    """The text the fake counts as the prompt of a request to ``path`` ("/v1/chat/completions", ...)."""
    if path.endswith("/chat/completions"):
        return " ".join(_content_text(m.get("content")) for m in body.get("messages", []) if isinstance(m, dict))
    prompt = body.get("prompt", body.get("input", ""))
    if isinstance(prompt, list):
        return " ".join(str(p) if not isinstance(p, list) else " ".join(map(str, p)) for p in prompt)
    return str(prompt)


def embedding(text: str, dim: int) -> list[float]:
    """A deterministic unit vector for ``text``."""
    raw = [int.from_bytes(hashlib.sha256(f"{i}\0{text}".encode()).digest()[:4], "big") / 2**31 - 1.0
           for i in range(dim)]
    norm = math.sqrt(sum(x * x for x in raw)) or 1.0
    return [x / norm for x in raw]


class FakeBackend:
    """OpenAI-compatible test server with runtime knobs and counters (see the module docstring)."""

    def __init__(self, *, model: str = "fake-model", api_key: str | None = None, reply_tokens: int = 8,
                 embedding_dim: int = 8, context_window: int | None = None) -> None:
        self.model = model
        self.api_key = api_key
        self.reply_tokens = reply_tokens
        self.embedding_dim = embedding_dim
        self.port = 0
        # counters
        self.requests = 0  # every request received, whatever its answer
        self.served: Counter[str] = Counter()  # 200 answers per path
        self.injected = 0  # answers replaced by fail_with()
        self.disconnects = 0  # responses cut short because the connection closed (client gone, die(), break)
        self.peers: set[int] = set()  # client ports seen: distinct TCP connections
        self.log: deque[tuple[str, JSON]] = deque(maxlen=1000)  # (path, body) of parsed POSTs
        self.last_stream: list[bytes] = []  # SSE events written for the latest streamed answer
        self._runner: web.AppRunner | None = None
        self._server: asyncio.AbstractServer | None = None
        self._context_window = context_window
        self.reset()

    # ---- lifecycle -------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        """OpenAI base URL (what a RoutingTable backend's ``endpoint`` holds)."""
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def alive(self) -> bool:
        return self._server is not None

    @property
    def open_connections(self) -> int:
        """TCP connections the server holds now (idle keep-alive ones included)."""
        return len(self._runner.server.connections) if self._runner and self._runner.server else 0

    @property
    def last_body(self) -> JSON:
        return self.log[-1][1]

    async def __aenter__(self) -> FakeBackend:
        app = web.Application(middlewares=[self._middleware()])
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_post("/v1/completions", self._completions)
        app.router.add_post("/v1/embeddings", self._embeddings)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/health", self._health)
        # handler_cancellation: a client that goes away cancels its handler, as in a real server.
        self._runner = web.AppRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=0.5)
        await self._runner.setup()
        await self.revive()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.die()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def die(self) -> None:
        """Stop listening and abort every open connection: new requests get connection refused."""
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        self._abort_connections()
        await server.wait_closed()
        # Sockets close on the loop's next turns and handlers end on cancellation: wait for both, as a
        # killed process's sockets are gone at once (clients then see refused, not a reset on reuse).
        for _ in range(2000):
            if not self.open_connections:
                break
            await asyncio.sleep(0.001)

    async def revive(self) -> None:
        """Listen again (on the same port after a die())."""
        if self._server is not None or self._runner is None or self._runner.server is None:
            return
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(self._runner.server, "127.0.0.1", self.port, reuse_address=True)
        self.port = self._server.sockets[0].getsockname()[1]

    def _abort_connections(self) -> None:
        if self._runner is not None and self._runner.server is not None:
            for conn in self._runner.server.connections:
                if conn.transport is not None:
                    conn.transport.abort()

    # ---- knobs -----------------------------------------------------------------------------------
    def reset(self) -> None:
        """Clear every knob (counters are kept)."""
        self._failure: _Injected | None = None
        self._latency_s = 0.0
        self._stall_s = 0.0
        self._stall_after: int | None = None
        self._token_interval_s = 0.0
        self._break_after: int | None = None
        self._stream_usage = True
        self._content: str | None = None
        self._logprob = 0.0
        self._logprobs_for: dict[str, float] = {}
        self._answer: Answer | None = None

    def reply_with(self, content: str | None, *, logprob: float = -0.001,
                   logprobs_for: dict[str, float] | None = None) -> None:
        """Answer chats with ``content`` (None: the default words). With ``logprobs`` requested, the content's
        tokens (words, runs of spaces, single punctuation) each carry ``logprob``, or the value given for a
        substring of ``logprobs_for`` they overlap: a model unsure of one field's value."""
        self._content, self._logprob, self._logprobs_for = content, logprob, dict(logprobs_for or {})

    def reply_by(self, answer: Answer | None) -> None:
        """Answer each chat from its prompt text (None: stop): ``answer(prompt)`` gives the content and the
        candidates for its first token, ``{token: logprob}`` with the content's first token among them, listed
        most likely first when the request asks for ``top_logprobs``: a model choosing between a few answers.
        Where it returns None, the chat is answered as ``reply_with`` says."""
        self._answer = answer

    def _logprobs(self, content: str, first: dict[str, float] | None = None, top: int = 0) -> JSON:
        tokens: list[JSON] = []
        for i, match in enumerate(_TOKEN.finditer(content)):
            logprob = self._logprob
            for part, value in self._logprobs_for.items():
                at = content.find(part)
                if at >= 0 and match.start() < at + len(part) and match.end() > at:
                    logprob = min(logprob, value)
            candidates = sorted((first or {}).items(), key=lambda c: -c[1])[:top] if i == 0 else []
            if i == 0 and first:
                logprob = first.get(match.group(), logprob)
            tokens.append({"token": match.group(), "logprob": logprob, "bytes": list(match.group().encode()),
                           "top_logprobs": [{"token": t, "logprob": lp, "bytes": list(t.encode())}
                                            for t, lp in candidates]})
        return {"content": tokens}

    def fail_with(self, status: int | None, body: JSON | str | None = None, *, times: int | None = None) -> None:
        """Answer POSTs with ``status`` (and an OpenAI error body unless given); None stops it."""
        if status is None:
            self._failure = None
            return
        default = error_body(status, f"injected failure {status}",
                             "RateLimitError" if status == 429 else "InternalServerError")
        self._failure = _Injected(status, default if body is None else body, times)

    def stall(self, seconds: float | None = STALL_FOREVER_S, *, after_chunks: int | None = None) -> None:
        """Hang ``seconds`` before answering, or mid-stream after ``after_chunks`` events; None/0 stops it."""
        self._stall_s = seconds or 0.0
        self._stall_after = after_chunks

    def latency(self, seconds: float) -> None:
        """Delay every answer by ``seconds`` (a slow backend, not a hung one)."""
        self._latency_s = seconds

    def token_interval(self, seconds: float) -> None:
        """Delay between streamed chunks."""
        self._token_interval_s = seconds

    def break_stream_after(self, chunks: int | None) -> None:
        """Abort the connection after writing ``chunks`` events of a stream (a crash mid-generation)."""
        self._break_after = chunks

    def context_window(self, tokens: int | None) -> None:
        """Reject (400, vLLM wording) requests whose prompt + max_tokens exceed ``tokens``."""
        self._context_window = tokens

    def stream_usage(self, enabled: bool) -> None:
        """Whether ``stream_options.include_usage`` is honoured (some backends ignore it)."""
        self._stream_usage = enabled

    # ---- request handling ------------------------------------------------------------------------
    def _middleware(self) -> Callable[..., Awaitable[web.StreamResponse]]:
        @web.middleware
        async def track(request: web.Request,
                        handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
            self.requests += 1
            peer = request.transport.get_extra_info("peername") if request.transport else None
            if peer:
                self.peers.add(peer[1])
            try:
                response = await handler(request)
            except (asyncio.CancelledError, ConnectionResetError):
                self.disconnects += 1
                raise
            if response.status == 200:
                self.served[request.path] += 1
            return response

        return track

    async def _admit(self, request: web.Request) -> JSON | web.Response:
        """Everything before generation: auth, delays, injected failures, validation, context window."""
        if self.api_key and request.headers.get("authorization") != f"Bearer {self.api_key}":
            return web.json_response(error_body(401, "Unauthorized", "AuthenticationError"), status=401)
        if self._latency_s:
            await asyncio.sleep(self._latency_s)
        if self._stall_s and self._stall_after is None:
            await asyncio.sleep(self._stall_s)
        failure = self._failure
        if failure is not None:
            if failure.remaining is not None:
                failure.remaining -= 1
                if failure.remaining <= 0:
                    self._failure = None
            self.injected += 1
            if isinstance(failure.body, str):
                return web.Response(status=failure.status, text=failure.body)
            return web.json_response(failure.body, status=failure.status)
        try:
            body = json.loads(await request.read())
        except ValueError as exc:
            return web.json_response(error_body(400, f"invalid JSON: {exc}"), status=400)
        if not isinstance(body, dict):
            return web.json_response(error_body(400, "request body must be a JSON object"), status=400)
        self.log.append((request.path, body))
        if body.get("model") != self.model:
            return web.json_response(error_body(404, f"The model `{body.get('model')}` does not exist.",
                                                "NotFoundError", "model"), status=404)
        return body

    def _max_tokens(self, body: JSON) -> int | web.Response:
        value = body.get("max_completion_tokens", body.get("max_tokens"))
        if value is None:
            return self.reply_tokens
        if not isinstance(value, int) or value < 1:
            return web.json_response(error_body(400, f"max_tokens must be at least 1, got {value}.",
                                                param="max_tokens"), status=400)
        return value

    def _too_long(self, prompt_tokens: int, max_tokens: int) -> web.Response | None:
        window = self._context_window
        if window is None or prompt_tokens + max_tokens <= window:
            return None
        message = (f"This model's maximum context length is {window} tokens. However, you requested "
                   f"{prompt_tokens + max_tokens} tokens ({prompt_tokens} in the messages, {max_tokens} in the "
                   f"completion). Please reduce the length of the messages or completion.")
        return web.json_response(error_body(400, message), status=400)

    def _reply(self, text: str, body: JSON, n: int) -> list[str]:
        deterministic = body.get("temperature", 1.0) == 0 or body.get("seed") is not None
        nonce = "" if deterministic else str(self.requests)
        digest = hashlib.sha256(f"{nonce}\0{text}".encode()).digest()
        return [f"w{digest[i % len(digest)] + i}" for i in range(n)]

    async def _generate(self, request: web.Request, chat: bool) -> web.StreamResponse:
        admitted = await self._admit(request)
        if isinstance(admitted, web.Response):
            return admitted
        body = admitted
        if chat and (not isinstance(body.get("messages"), list) or not body["messages"]):
            return web.json_response(error_body(400, "messages must be a non-empty list", param="messages"),
                                     status=400)
        max_tokens = self._max_tokens(body)
        if isinstance(max_tokens, web.Response):
            return max_tokens
        text = prompt_text(request.path, body)
        prompt_tokens = count_tokens(text)
        if (too_long := self._too_long(prompt_tokens, max_tokens)) is not None:
            return too_long
        n = min(max_tokens, self.reply_tokens)
        words = self._reply(text, body, n)
        finish = "length" if max_tokens < self.reply_tokens else "stop"
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": n, "total_tokens": prompt_tokens + n}
        ident = f"{'chatcmpl' if chat else 'cmpl'}-fake-{self.requests}"
        head = {"id": ident, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
                "model": self.model}
        if not body.get("stream"):
            content = " ".join(words) if self._content is None or not chat else self._content
            first: dict[str, float] | None = None
            if chat and self._answer is not None and (answered := self._answer(text)) is not None:
                content, first = answered
            choice: JSON = ({"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": finish}
                            if chat else {"index": 0, "text": content, "finish_reason": finish})
            if chat and (self._content is not None or first is not None) and body.get("logprobs"):
                choice["logprobs"] = self._logprobs(content, first, int(body.get("top_logprobs") or 0))
            return web.json_response({**head, "choices": [choice], "usage": usage})
        head["object"] = "chat.completion.chunk" if chat else "text_completion"
        events = self._events(head, words, finish, chat)
        options = body.get("stream_options")
        if self._stream_usage and isinstance(options, dict) and options.get("include_usage"):
            events.append({**head, "choices": [], "usage": usage})
        return await self._stream(request, [f"data: {json.dumps(e)}\n\n".encode() for e in events]
                                  + [b"data: [DONE]\n\n"])

    @staticmethod
    def _events(head: JSON, words: list[str], finish: str, chat: bool) -> list[JSON]:
        def choice(piece: str, reason: str | None) -> JSON:
            if chat:
                return {"index": 0, "delta": {"content": piece} if piece else {}, "finish_reason": reason}
            return {"index": 0, "text": piece, "finish_reason": reason}

        events = [{**head, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                        "finish_reason": None}]}] if chat else []
        events += [{**head, "choices": [choice(w if i == 0 else " " + w, None)]} for i, w in enumerate(words)]
        events.append({**head, "choices": [choice("", finish)]})
        return events

    async def _stream(self, request: web.Request, events: list[bytes]) -> web.StreamResponse:
        response = web.StreamResponse(headers={"content-type": "text/event-stream", "cache-control": "no-cache"})
        await response.prepare(request)
        self.last_stream = []
        for i, event in enumerate(events):
            if i == self._break_after:
                if request.transport is not None:
                    request.transport.abort()
                await asyncio.sleep(STALL_FOREVER_S)  # cancelled by the lost connection
            if i == self._stall_after and self._stall_s:
                await asyncio.sleep(self._stall_s)
            elif i and self._token_interval_s:
                await asyncio.sleep(self._token_interval_s)
            await response.write(event)
            self.last_stream.append(event)
        await response.write_eof()
        return response

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=True)

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=False)

    async def _embeddings(self, request: web.Request) -> web.StreamResponse:
        admitted = await self._admit(request)
        if isinstance(admitted, web.Response):
            return admitted
        raw = admitted.get("input")
        inputs = [raw] if isinstance(raw, str) or (isinstance(raw, list) and raw and isinstance(raw[0], int)) else raw
        if not isinstance(inputs, list) or not inputs:
            return web.json_response(error_body(400, "input must be a string or a non-empty list", param="input"),
                                     status=400)
        texts = [item if isinstance(item, str) else " ".join(map(str, item)) for item in inputs]
        prompt_tokens = sum(count_tokens(t) for t in texts)
        if (too_long := self._too_long(max(count_tokens(t) for t in texts), 0)) is not None:
            return too_long
        data = [{"object": "embedding", "index": i, "embedding": embedding(t, self.embedding_dim)}
                for i, t in enumerate(texts)]
        return web.json_response({"object": "list", "data": data, "model": self.model,
                                  "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}})

    async def _models(self, request: web.Request) -> web.Response:
        if self.api_key and request.headers.get("authorization") != f"Bearer {self.api_key}":
            return web.json_response(error_body(401, "Unauthorized", "AuthenticationError"), status=401)
        card = {"id": self.model, "object": "model", "created": 0, "owned_by": "fake",
                "max_model_len": self._context_window}
        return web.json_response({"object": "list", "data": [card]})

    async def _health(self, request: web.Request) -> web.Response:
        return web.Response(status=200)


class ThreadedFake:
    """A FakeBackend on its own event loop in a thread: for sync tests, whose code under test calls it over HTTP."""

    def __init__(self, model_name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="fake-backend", daemon=True)
        self.fake = FakeBackend(model=model_name)

    def __enter__(self) -> FakeBackend:
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self.fake.__aenter__(), self.loop).result(10)
        return self.fake

    def __exit__(self, *_: object) -> None:
        asyncio.run_coroutine_threadsafe(self.fake.__aexit__(None, None, None), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()
