"""Exact-match response cache: a repeated deterministic request is answered without calling a backend.

Why each rule:

* **Key = sha256(tenant, endpoint, route, normalised request).** The tenant is part of the key, so
  the same request from tenant B can never be answered with tenant A's entry (the cache is
  partitioned by construction, not by a check that could be forgotten). The body is normalised so
  that requests which must get the same answer share a key: JSON with sorted keys, integral floats
  written as ints (``temperature: 0`` == ``0.0``), minus the fields that do not change the answer
  (``user``, ``stream``, ``stream_options``, ``metadata``, ``n`` when 1, and ``model``, which the
  ``route`` argument already names). Every sampling parameter stays in the key.
* **Deterministic requests only**, unless the caller forces it: a sampled answer replayed from the
  cache would silently change the request's semantics. Deterministic here means ``temperature`` is
  explicitly 0, or ``seed`` is set (OpenAI's and vLLM's default temperature is 1, so an absent
  temperature is *not* deterministic). Embeddings are always deterministic.
* **Only 200 answers are stored**: an error must be retried, never replayed.
* **TTL and bounds** (entries, bytes, and a per-entry size cap): a cache must not become the
  gateway's memory leak. Eviction is LRU; expiry is checked on read.

The cache stores the complete JSON answer. A streamed request (same key: ``stream`` is not in it)
is answered from a hit by the gateway re-framing the stored answer as SSE.

Pure in-memory, per gateway replica; the gateway asks the semantic cache on Milvus
(``semantic_cache``) only after this one missed. Like the breaker, an instance belongs to one event
loop; no method awaits, so no lock.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from pilothouse.serving.engines import EMBEDDINGS, Usage

CacheMode = Literal["auto", "force", "off"]
Clock = Callable[[], float]

# Fields that never change the answer; `n` is dropped only when it is 1 (its default).
IGNORED_FIELDS = frozenset({"user", "stream", "stream_options", "metadata", "model"})


def is_deterministic(body: Mapping[str, Any], endpoint: str) -> bool:
    """Would the backend give the same answer again? temperature == 0, a seed, or an embedding."""
    if endpoint == EMBEDDINGS:
        return True
    temperature = body.get("temperature")
    is_zero = isinstance(temperature, int | float) and not isinstance(temperature, bool) and temperature == 0
    return is_zero or body.get("seed") is not None


def cacheable(body: Mapping[str, Any], endpoint: str, mode: CacheMode = "auto") -> bool:
    """``auto``: deterministic requests only; ``force``: the caller accepts replayed samples; ``off``: never."""
    if mode == "off":
        return False
    return mode == "force" or is_deterministic(body, endpoint)


def _normal(value: Any) -> Any:
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def normalise(body: Mapping[str, Any]) -> dict[str, Any]:
    """The request as far as the answer depends on it (top level only: nested values are kept as sent)."""
    out = {k: _normal(v) for k, v in body.items() if k not in IGNORED_FIELDS}
    if out.get("n") == 1:
        del out["n"]
    return out


def cache_key(tenant: str, route: str, body: Mapping[str, Any], endpoint: str = "/chat/completions") -> str:
    """Hex sha256 of (tenant, endpoint, route, normalised body) serialised canonically.

    ASCII escapes keep it total: a lone surrogate from a JSON ``"\\ud800"`` still encodes.
    """
    canonical = json.dumps([tenant, endpoint, route, normalise(body)], sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class CachedResponse:
    """A stored 200 answer: the bytes to send back, and the usage it cost when it was computed."""

    body: bytes
    usage: Usage
    stored_at: float
    expires_at: float


@dataclass(slots=True)
class CacheStats:
    hits: int = 0
    misses: int = 0  # includes expired entries
    stores: int = 0
    evictions: int = 0  # pushed out by the entry or byte bound
    expirations: int = 0
    rejected: int = 0  # put() refused: not a 200, or larger than max_entry_bytes

    @property
    def hit_rate(self) -> float:
        lookups = self.hits + self.misses
        return self.hits / lookups if lookups else 0.0


@dataclass
class ResponseCache:
    """LRU + TTL map from :func:`cache_key` to :class:`CachedResponse`."""

    max_entries: int = 10_000
    ttl_s: float = 300.0
    max_bytes: int = 256 * 1024 * 1024
    max_entry_bytes: int = 1024 * 1024
    clock: Clock = time.monotonic
    stats: CacheStats = field(default_factory=CacheStats)
    _entries: OrderedDict[str, CachedResponse] = field(default_factory=OrderedDict, init=False, repr=False)
    _bytes: int = field(default=0, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.max_entries < 1 or self.ttl_s <= 0:
            raise ValueError("max_entries must be >= 1 and ttl_s > 0")

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def size_bytes(self) -> int:
        return self._bytes

    def key(self, tenant: str, route: str, body: Mapping[str, Any], *, endpoint: str = "/chat/completions",
            mode: CacheMode = "auto") -> str | None:
        """The key for this request, or None when it must not be served from (or stored in) the cache."""
        if not cacheable(body, endpoint, mode):
            return None
        return cache_key(tenant, route, body, endpoint)

    def get(self, key: str) -> CachedResponse | None:
        entry = self._entries.get(key)
        if entry is None:
            self.stats.misses += 1
            return None
        if self.clock() >= entry.expires_at:
            self._drop(key)
            self.stats.expirations += 1
            self.stats.misses += 1
            return None
        self._entries.move_to_end(key)
        self.stats.hits += 1
        return entry

    def put(self, key: str, body: bytes, usage: Usage, *, status_code: int = 200) -> bool:
        """Store a 200 answer; anything else (an error) is refused. Returns whether it was stored."""
        if status_code != 200 or len(body) > self.max_entry_bytes:
            self.stats.rejected += 1
            return False
        if key in self._entries:
            self._drop(key)
        now = self.clock()
        self._entries[key] = CachedResponse(body, usage, now, now + self.ttl_s)
        self._bytes += len(body)
        self.stats.stores += 1
        while len(self._entries) > self.max_entries or self._bytes > self.max_bytes:
            self._drop(next(iter(self._entries)))
            self.stats.evictions += 1
        return True

    def purge_expired(self) -> int:
        """Drop every expired entry (reads already ignore them; this frees their memory). Returns the count."""
        now = self.clock()
        expired = [k for k, e in self._entries.items() if now >= e.expires_at]
        for k in expired:
            self._drop(k)
        self.stats.expirations += len(expired)
        return len(expired)

    def clear(self) -> None:
        self._entries.clear()
        self._bytes = 0

    def _drop(self, key: str) -> None:
        entry = self._entries.pop(key)
        self._bytes -= len(entry.body)
