"""Classify a backend failure once, so fallback, circuit breaking and the audit record agree on it.

Every failed call to a model backend ends up here, as an exception (aiohttp, httpx, asyncio, an
in-process engine) or as an HTTP status with its body. The class decides two things the gateway
must never get wrong (DESIGN.md §6): whether another backend may be tried, and whether the failure
is evidence that *this backend* is broken (and so counts towards opening its circuit breaker). A
429 or a prompt that is too long says nothing bad about the backend's health; a user's malformed
request says nothing about any backend and must not be retried on another one.
"""

from __future__ import annotations

import asyncio
import errno
import json
import re
from dataclasses import dataclass
from enum import StrEnum

import aiohttp
import httpx


class ErrorClass(StrEnum):
    """What went wrong, from the router's point of view; the value is what the audit record stores."""

    TIMEOUT = "timeout"
    CONNECTION = "connection"  # refused, reset, DNS, protocol breakage before a response
    SERVER = "server"  # 5xx, engine dead, malformed response
    RATE_LIMITED = "rate_limited"  # 429
    CONTEXT_LENGTH = "context_length"  # 400 saying the prompt + max_tokens exceed the model's context
    CLIENT = "client"  # any other 4xx: the request is wrong, another backend would say the same
    CANCELLED = "cancelled"  # our caller went away; nobody's fault

    @property
    def retry_elsewhere(self) -> bool:
        """May the same request go to another backend? (Streaming/side-effect rules apply on top.)"""
        return self not in (ErrorClass.CLIENT, ErrorClass.CANCELLED)

    @property
    def counts_for_breaker(self) -> bool:
        """Is this evidence that the backend is unhealthy? Only then does it move the breaker."""
        return self in (ErrorClass.TIMEOUT, ErrorClass.CONNECTION, ErrorClass.SERVER)


@dataclass(frozen=True)
class Failure:
    """A classified failure: the class plus what the audit record and the breaker need to know."""

    error_class: ErrorClass
    message: str
    status_code: int | None = None
    refused: bool = False  # connection refused: nothing listens, so the breaker opens at once

    @property
    def retry_elsewhere(self) -> bool:
        return self.error_class.retry_elsewhere

    @property
    def counts_for_breaker(self) -> bool:
        return self.error_class.counts_for_breaker


# vLLM and OpenAI wording for "prompt + completion do not fit"; matched case-insensitively on the
# error message/code (not on the whole body, which may echo the user's prompt).
_CONTEXT_PATTERNS = re.compile(
    "|".join((
        r"context[_ ]length",  # OpenAI code context_length_exceeded; "maximum context length is N tokens"
        r"maximum context",
        r"context window",
        r"too many tokens",
        r"maximum model length",  # vLLM: "... is longer than the maximum model length of N"
        r"max_model_len",
        r"prompt is too long",
        r"too long and exceeds",  # vLLM: "Input prompt (N tokens) is too long and exceeds limit of M"
        r"reduce the length of the messages",
    )),
    re.IGNORECASE,
)
_CONTEXT_STATUSES = frozenset({400, 413, 422})
_REFUSED_TEXT = ("connection refused", "connect call failed", "actively refused")
# aiohttp failures that mean "no usable HTTP exchange with this backend": ClientConnectionError
# (refused, DNS, reset, ServerDisconnectedError, ClientOSError), ClientPayloadError (the peer closed
# mid-body), ClientResponseError (a status line or headers it could not parse, or a proxy's refusal:
# the engine never calls raise_for_status), and a bad endpoint URL (this backend's misconfiguration).
_AIOHTTP_CONNECTION = (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, aiohttp.ClientResponseError,
                       aiohttp.InvalidURL, aiohttp.NonHttpUrlClientError)


def error_message(body: bytes | str | dict[str, object] | None) -> str:
    """The human part of an OpenAI-style error body (``{"error": {"message", "code"}}``), else the text."""
    if body is None:
        return ""
    data: object = body
    if isinstance(body, bytes | str):
        text = body.decode(errors="replace") if isinstance(body, bytes) else body
        try:
            data = json.loads(text)
        except ValueError:
            return text.strip()
    if not isinstance(data, dict):
        return str(data)
    err = data.get("error", data)
    if isinstance(err, str):
        return err
    if isinstance(err, dict):
        parts = [str(err[k]) for k in ("code", "type", "message", "detail") if err.get(k)]
        if parts:
            return ": ".join(parts)
    detail = data.get("detail") or data.get("message")
    return str(detail) if detail else json.dumps(data)


def classify_status(status_code: int, body: bytes | str | dict[str, object] | None = None) -> Failure:
    """Classify an HTTP error response. ``status_code`` must be an error (>= 400)."""
    if status_code < 400:
        raise ValueError(f"HTTP {status_code} is not a failure")
    message = error_message(body)
    summary = f"HTTP {status_code}: {message}" if message else f"HTTP {status_code}"
    if status_code == 429:
        cls = ErrorClass.RATE_LIMITED
    elif status_code == 408:
        cls = ErrorClass.TIMEOUT
    elif status_code >= 500:
        cls = ErrorClass.SERVER
    elif status_code in _CONTEXT_STATUSES and _CONTEXT_PATTERNS.search(message):
        cls = ErrorClass.CONTEXT_LENGTH
    else:
        cls = ErrorClass.CLIENT
    return Failure(cls, summary, status_code=status_code)


def _is_refused(exc: BaseException) -> bool:
    """Walk the cause chain: httpx wraps httpcore, which wraps the OSError with the errno (aiohttp's
    ``ClientConnectorError`` is itself an OSError carrying it)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, ConnectionRefusedError):
            return True
        if isinstance(current, OSError) and current.errno == errno.ECONNREFUSED:
            return True
        if any(text in str(current).lower() for text in _REFUSED_TEXT):
            return True
        current = current.__cause__ or current.__context__
    return False


def classify_exception(exc: BaseException) -> Failure:
    """Classify an exception raised while calling a backend (aiohttp, httpx, asyncio or an in-process engine).

    Unknown exceptions count as ``server``: a backend that fails in ways we cannot name is treated
    as unhealthy rather than letting the same request fail forever on it.
    """
    message = f"{type(exc).__name__}: {exc}".rstrip(": ")
    if isinstance(exc, asyncio.CancelledError):
        return Failure(ErrorClass.CANCELLED, message)
    if isinstance(exc, httpx.HTTPStatusError):
        response = exc.response
        try:
            body: bytes | None = response.content
        except httpx.ResponseNotRead:  # a streamed response whose body was never read
            body = None
        return classify_status(response.status_code, body)
    if isinstance(exc, httpx.TimeoutException | TimeoutError):
        # aiohttp's ServerTimeoutError, ConnectionTimeoutError and SocketTimeoutError are TimeoutErrors
        return Failure(ErrorClass.TIMEOUT, message)
    if isinstance(exc, _AIOHTTP_CONNECTION):
        return Failure(ErrorClass.CONNECTION, message, refused=_is_refused(exc))
    if isinstance(exc, httpx.LocalProtocolError):
        return Failure(ErrorClass.CLIENT, message)  # we built an invalid request; no backend would take it
    if isinstance(exc, httpx.TransportError | ConnectionError):
        # ConnectError, ReadError, WriteError, RemoteProtocolError (peer closed), ProxyError,
        # UnsupportedProtocol (a bad endpoint URL is this backend's misconfiguration).
        return Failure(ErrorClass.CONNECTION, message, refused=_is_refused(exc))
    if isinstance(exc, OSError) and exc.errno in (errno.ECONNREFUSED, errno.ECONNRESET, errno.EHOSTUNREACH):
        return Failure(ErrorClass.CONNECTION, message, refused=exc.errno == errno.ECONNREFUSED)
    return Failure(ErrorClass.SERVER, message)  # includes vLLM's EngineDeadError / AsyncEngineDeadError


def classify(failure: BaseException | tuple[int, bytes | str | dict[str, object] | None]) -> Failure:
    """One entry point: an exception, or ``(status_code, body)`` of an error response."""
    if isinstance(failure, BaseException):
        return classify_exception(failure)
    status_code, body = failure
    return classify_status(status_code, body)
