"""Engines: what the gateway calls to run one attempt of a request against one backend.

Every engine (``external`` today, in-process ``vllm`` later) answers with the same types, so the
gateway's fallback loop, budget commit and audit record never care which engine served a request:

* ``complete`` returns an :class:`EngineResult`: the backend's JSON body as bytes (forwarded to the
  client without re-serialising), its token usage and latency;
* ``stream`` returns an :class:`EngineStream`: SSE bytes to forward as they arrive, plus whether the
  first token already left (after which the request must never be retried elsewhere) and the usage
  once the stream has ended;
* every failure is a :class:`BackendError` carrying the classified :class:`~..errors.Failure`, so
  fallback, breaker and audit agree on what went wrong (DESIGN.md §6).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from pilothouse.serving.errors import ErrorClass, Failure

# The OpenAI-compatible operations an engine serves; `path` arguments are relative to the /v1 base URL.
CHAT = "/chat/completions"
COMPLETIONS = "/completions"
EMBEDDINGS = "/embeddings"
PATHS = frozenset({CHAT, COMPLETIONS, EMBEDDINGS})


@dataclass(frozen=True, slots=True)
class Usage:
    """Tokens a request used, as the ledger commits them.

    ``estimated`` is True when the backend did not report usage and the engine counted what it
    could (a streamed completion's content deltas; nothing for the prompt): the gateway should then
    fall back on its own prompt estimate rather than bill zero.
    """

    prompt_tokens: int = 0
    completion_tokens: int = 0
    estimated: bool = False

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    @classmethod
    def from_openai(cls, usage: object) -> Usage | None:
        """An OpenAI ``usage`` object, or None if it is missing or malformed."""
        if not isinstance(usage, Mapping):
            return None
        prompt, completion = usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0)
        if completion is None:  # embeddings report no completion tokens at all (or null)
            completion = 0
        if not isinstance(prompt, int) or not isinstance(completion, int) or prompt < 0 or completion < 0:
            return None
        return cls(prompt, completion)


class BackendError(Exception):
    """A backend attempt failed; ``failure`` says how, ``first_token_sent`` whether bytes already left.

    Once ``first_token_sent`` is True the client has seen part of this backend's answer, so the
    router must not try another backend (the client would get two answers spliced together).
    """

    def __init__(self, failure: Failure, *, first_token_sent: bool = False) -> None:
        super().__init__(failure.message)
        self.failure = failure
        self.first_token_sent = first_token_sent

    @property
    def error_class(self) -> ErrorClass:
        return self.failure.error_class

    def __repr__(self) -> str:
        return (f"BackendError({self.failure.error_class.value}, {self.failure.message!r}, "
                f"first_token_sent={self.first_token_sent})")


@dataclass(frozen=True, slots=True)
class EngineResult:
    """A complete (non-streamed) 200 answer. ``body`` is forwarded as is; ``data`` is the same answer parsed."""

    body: bytes
    data: dict[str, Any]
    usage: Usage
    latency_s: float
    status_code: int = 200
    content_type: str = "application/json"


class EngineStream(Protocol):
    """A streamed answer: iterate for SSE bytes; always close it (``aclose`` or ``async with``)."""

    first_token_sent: bool
    ttft_s: float | None
    latency_s: float | None

    def __aiter__(self) -> AsyncIterator[bytes]: ...

    async def __anext__(self) -> bytes: ...

    async def aclose(self) -> None: ...

    @property
    def usage(self) -> Usage: ...


class Engine(Protocol):
    """What the gateway needs from an engine for one attempt."""

    async def complete(self, path: str, body: Mapping[str, Any]) -> EngineResult: ...

    async def stream(self, path: str, body: Mapping[str, Any]) -> EngineStream: ...


__all__ = ["CHAT", "COMPLETIONS", "EMBEDDINGS", "PATHS", "BackendError", "Engine", "EngineResult", "EngineStream",
           "Usage"]
