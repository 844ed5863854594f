"""Semantic response cache on Milvus: a request the exact cache missed is answered with the stored
answer to a *paraphrase* of it, when the two prompts' embeddings are at least ``threshold`` alike.

Why each rule:

* **Only the last user turn is compared by meaning; everything else must match exactly.** The
  embedded text is the final user message (or a completion's single prompt), whitespace- and
  Unicode-normalised. The rest of the request (system prompt, earlier turns, every sampling
  parameter, ``response_format``, tools, the route, the endpoint and the embedding model) goes
  into ``scope``, a digest filtered on with ``==``: a different system prompt, temperature or
  ``max_tokens`` is a different question, however alike the wording. Messages that are not plain
  text (images, tool calls in the last turn) and multi-prompt completions are never cached.
* **Tenant-partitioned.** ``tenant`` is the collection's partition key (Milvus hashes it into a
  fixed number of partitions, so tenants are unbounded, unlike one partition each) *and* an ``==``
  filter on every search and delete: tenant B's search can only ever match tenant B's rows.
  Tenants, routes and parameters are stored as hex digests, so a filter expression is only ever
  built from hex strings and integers: nothing a caller sends is interpolated into it.
* **Deterministic requests only, unless forced** (the exact cache's :func:`cacheable`): a replayed
  sample changes what the request means.
* **Errors are never stored**: only a 200 whose body is a JSON object without ``error``, and that
  fits a VARCHAR (64 KiB). Streams are stored only when the caller passes the assembled body.
* **TTL**: Milvus Lite stores but does not enforce a collection TTL (DESIGN.md §9), so each row
  carries ``expires_at`` (ms, wall clock: several replicas share the rows) and every search filters
  ``expires_at > now``. Expired rows are deleted on the next maintenance pass.
* **Bounded size**: every ``maintain_every`` stores, a replica deletes the expired rows of the
  tenants it stored for, evicts each tenant's oldest rows beyond ``max_entries_per_tenant``, and
  flushes. So a tenant holds at most ``max_entries_per_tenant + maintain_every`` rows per replica
  writing to it. Flushing matters for speed as well: Milvus Lite searches unflushed rows about
  0.02 ms each by brute force (measured: 96 ms p50 with 3,000 unflushed rows, 2 ms flushed).
  A lookup at 3,000 rows in one tenant and scope: p50 17 ms, of which the MiniLM embedding is
  11 ms and the search 5 ms (``bench/semantic_cache.py``, 2 cores).
* **Never fails a request.** Milvus or the embedder failing, or a lookup slower than
  ``lookup_timeout_s``, is a miss and an ``error`` in the metrics; a breaker stops a dead Milvus
  from costing every request a connection attempt (one probe after a cooldown). Blocking work
  runs on the cache's own small thread pool, so a hung Milvus cannot starve the threads the
  ledger and audit writes use.
* **False hits are the price of the feature.** With all-MiniLM-L6-v2, paraphrases score
  0.94-0.99, but "What is 2+2?" vs "What is 2+3?" scores 0.89 and "translate ... to French" vs
  "... to German" 0.87: the default threshold of 0.95 is deliberately high. Long prompts are not
  cached (``max_prompt_chars``): the embedding model truncates its input (MiniLM at 256 word
  pieces), so two long prompts differing only at the end would look identical.

Milvus Lite: a ``.db`` file can be opened by one process only; with several gateway replicas, give
them a Milvus server URI (a second replica on the same Lite file gets errors, hence misses).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import re
import threading
import time
import unicodedata
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pymilvus import DataType, MilvusClient, MilvusException

from pilothouse.operator.api.routing import RoutingTable, SemanticCacheRule

from .breaker import Breaker, BreakerConfig
from .cache import CachedResponse, CacheMode, cacheable, normalise
from .embeddings import Embedder, EmbeddingError, LocalEmbedder, OpenAIEmbedder
from .engines import CHAT, COMPLETIONS, Usage
from .errors import ErrorClass
from .metrics import Metrics
from .milvus_client import open_milvus, unreachable

log = logging.getLogger(__name__)

DEFAULT_THRESHOLD = 0.95
LITE_FILE = "semantic-cache.db"  # in the gateway's state directory, when the table names no Milvus
MAX_BODY_BYTES = 65_535  # Milvus VARCHAR limit
ENDPOINTS = frozenset({CHAT, COMPLETIONS})  # an embedding of a paraphrase is not the paraphrase's embedding
Clock = Callable[[], float]

_FIELDS = ("id", "tenant", "scope", "stored_at", "expires_at", "body", "prompt_tokens", "completion_tokens",
           "embedding")
_OUTPUT = ["body", "stored_at", "expires_at", "prompt_tokens", "completion_tokens"]
_WHITESPACE = re.compile(r"\s+")


# -- pure: what is compared by meaning, what must match exactly -----------------------------------

def normalise_text(text: str) -> str:
    """NFKC, whitespace runs collapsed, trimmed: spacing and Unicode forms must not change the match."""
    return _WHITESPACE.sub(" ", unicodedata.normalize("NFKC", text)).strip()


def _plain_text(content: Any) -> str | None:
    """A message's text, or None when it carries anything else (an image, audio, a refusal part)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and content and all(
            isinstance(part, Mapping) and part.get("type") == "text" and isinstance(part.get("text"), str)
            for part in content):
        return "\n".join(part["text"] for part in content)
    return None


def split_prompt(body: Mapping[str, Any], endpoint: str) -> tuple[str, dict[str, Any]] | None:
    """(text compared by meaning, the rest of the request compared exactly), or None when not cacheable.

    Chat: the last message must be the user's, in plain text; its text is the prompt and every
    other field of it (role, name) stays exact, as do all earlier messages. Completions: one
    string prompt. The rest is the exact cache's :func:`normalise` (fields that never change the
    answer dropped, ``0.0`` == ``0``).
    """
    rest = normalise(body)
    if endpoint == CHAT:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages or not isinstance(messages[-1], Mapping):
            return None
        last = messages[-1]
        text = _plain_text(last.get("content")) if last.get("role") == "user" else None
        rest["messages"] = [*messages[:-1], {k: v for k, v in last.items() if k != "content"}]
    elif endpoint == COMPLETIONS:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1:
            prompt = prompt[0]
        text = prompt if isinstance(prompt, str) else None
        rest.pop("prompt", None)
    else:
        return None
    if text is None:
        return None
    text = normalise_text(text)
    return (text, rest) if text else None


def _digest(*parts: Any) -> str:
    """Hex sha256 of the parts serialised canonically (ASCII escapes keep it total, as in ``cache_key``)."""
    canonical = json.dumps(parts, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class SemanticKey:
    """The scalar fields a cached answer is filed under, and the text its vector is made of."""

    tenant: str  # digest of the tenant: the partition key
    scope: str  # digest of (endpoint, route, embedder, everything but the prompt text)
    text: str  # the normalised prompt text that is embedded
    id: str  # digest of (tenant, scope, text): the same prompt again replaces its entry

    @property
    def filter(self) -> str:
        return f'tenant == "{self.tenant}" and scope == "{self.scope}"'


def semantic_key(tenant: str, route: str, body: Mapping[str, Any], *, endpoint: str = CHAT, embedder_id: str = "",
                 mode: CacheMode = "auto", max_prompt_chars: int = 512) -> SemanticKey | None:
    """The key of this request, or None when it must not be served from (or stored in) the semantic cache."""
    if endpoint not in ENDPOINTS or not cacheable(body, endpoint, mode):
        return None
    split = split_prompt(body, endpoint)
    if split is None or len(split[0]) > max_prompt_chars:
        return None
    text, rest = split
    tenant_digest = _digest("tenant", tenant)
    scope = _digest(endpoint, route, embedder_id, rest)
    return SemanticKey(tenant=tenant_digest, scope=scope, text=text, id=_digest(tenant_digest, scope, text))


def collection_name(namespace: str, workflow: str) -> str:
    """One collection per workflow: Milvus names allow letters, digits and underscores only."""
    return re.sub(r"[^A-Za-z0-9_]", "_", f"pilothouse_semcache_{namespace}_{workflow}")[:255]


def storable(status_code: int, body: bytes) -> str | None:
    """The body as text when it may be stored, else None: a 200 carrying a JSON object that is not an error."""
    if status_code != 200 or len(body) > MAX_BODY_BYTES:
        return None
    try:
        text = body.decode()
        parsed = json.loads(text)
    except (UnicodeDecodeError, ValueError):
        return None
    return text if isinstance(parsed, dict) and "error" not in parsed else None


# -- results ----------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class SemanticHit:
    """A stored answer and how alike its prompt was (COSINE similarity, 1.0 = same direction)."""

    response: CachedResponse
    similarity: float


@dataclass(frozen=True, slots=True)
class Probe:
    """What ``lookup`` found out; hand it to ``store`` so a miss is not embedded twice.

    ``key`` is None for a request the semantic cache does not take; ``vector`` is None when the
    lookup did not get as far as embedding (Milvus unavailable, timeout).
    """

    route: str | None
    key: SemanticKey | None = None
    vector: list[float] | None = None
    hit: SemanticHit | None = None


class SemanticCacheError(RuntimeError):
    """The collection exists with a layout this version cannot use, or Milvus refused an operation."""


# -- the cache --------------------------------------------------------------------------------------

class SemanticCache:
    """Tenant-partitioned nearest-prompt cache on one Milvus collection (a Milvus Lite file or a server URI).

    The async methods are the gateway's API and never raise for a Milvus or embedder failure;
    the ``*_sync`` helpers behind them run on the cache's thread pool.
    """

    def __init__(self, *, uri: str, collection: str, embedder: Embedder, embedder_id: str,
                 threshold: float = DEFAULT_THRESHOLD, ttl_s: float = 3600.0, max_entries_per_tenant: int = 10_000,
                 token: str | None = None, db_name: str = "", metrics: Metrics | None = None,
                 clock: Clock = time.time, timeout_s: float = 5.0, lookup_timeout_s: float = 1.0,
                 max_prompt_chars: int = 512, maintain_every: int = 100, workers: int = 2,
                 breaker: BreakerConfig | None = None) -> None:
        if not 0 < threshold <= 1 or ttl_s <= 0 or max_entries_per_tenant < 1 or maintain_every < 1:
            raise ValueError("threshold must be in (0, 1], ttl_s > 0, max_entries_per_tenant and maintain_every >= 1")
        self.uri = uri
        self.collection = collection
        self.embedder = embedder
        self.embedder_id = embedder_id
        self.threshold = threshold
        self.ttl_s = ttl_s
        self.max_entries_per_tenant = max_entries_per_tenant
        self.metrics = metrics or Metrics()
        self.clock = clock
        self.timeout_s = timeout_s
        self.lookup_timeout_s = lookup_timeout_s
        self.max_prompt_chars = max_prompt_chars
        self.maintain_every = maintain_every
        self._token = token or ""
        self._db_name = db_name
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="semantic-cache")
        self._breaker = Breaker(f"semantic-cache:{collection}",
                                breaker or BreakerConfig(cooldown_s=5.0, max_cooldown_s=60.0))
        self._lock = threading.Lock()  # guards the client and the maintenance bookkeeping
        self._client: MilvusClient | None = None
        self._stores_since_maintenance = 0
        self._tenants_stored: set[str] = set()

    # -- the gateway's API ------------------------------------------------------------------------

    def key(self, tenant: str, route: str, body: Mapping[str, Any], *, endpoint: str = CHAT,
            mode: CacheMode = "auto") -> SemanticKey | None:
        return semantic_key(tenant, route, body, endpoint=endpoint, embedder_id=self.embedder_id, mode=mode,
                            max_prompt_chars=self.max_prompt_chars)

    async def lookup(self, tenant: str, route: str, body: Mapping[str, Any], *, endpoint: str = CHAT,
                     mode: CacheMode = "auto") -> Probe:
        """The nearest answer for this tenant, route and parameters if it is alike enough and unexpired.

        Never raises for Milvus or the embedder: a failure or a timeout is a miss counted as ``error``.
        Requests the cache does not take are neither looked up nor counted.
        """
        key = self.key(tenant, route, body, endpoint=endpoint, mode=mode)
        probe = Probe(route=route, key=key)
        if key is None:
            return probe
        started = time.perf_counter()
        if not self._breaker.allow():
            self.metrics.semantic_lookup(route, "error")
            return probe
        try:
            vector, hit = await asyncio.wait_for(self._run(self._lookup_sync, key), self.lookup_timeout_s)
        except Exception as exc:  # any failure of Milvus or the embedder is a miss, never the request's error
            self._failed("lookup", exc)
            self.metrics.semantic_lookup(route, "error", time.perf_counter() - started)
            return probe
        self._breaker.record_success()
        similarity = hit.similarity if hit is not None else None
        chosen = hit if hit is not None and hit.similarity >= self.threshold else None
        self.metrics.semantic_lookup(route, "hit" if chosen else "miss", time.perf_counter() - started, similarity)
        return Probe(route=route, key=key, vector=vector, hit=chosen)

    async def store(self, probe: Probe, body: bytes, usage: Usage, *, status_code: int = 200) -> bool:
        """File a miss's answer under its probe. Returns whether it was stored; never raises.

        Only a 200 with a JSON object that is not an error is stored (pass a stream's assembled
        body, never a partial one). Call it after the response is sent (a Starlette
        ``BackgroundTask``): the client should not wait for Milvus.
        """
        key = probe.key
        if key is None or probe.hit is not None:
            return False
        text = storable(status_code, body)
        if text is None:
            self.metrics.semantic_store(probe.route, "rejected")
            return False
        if not self._breaker.allow():
            self.metrics.semantic_store(probe.route, "error")
            return False
        try:
            await self._run(self._store_sync, key, probe.vector, text, usage)
        except Exception as exc:
            self._failed("store", exc)
            self.metrics.semantic_store(probe.route, "error")
            return False
        self._breaker.record_success()
        self.metrics.semantic_store(probe.route, "stored")
        return True

    async def prewarm(self) -> None:
        """Load the embedding model, open (or create) the collection: call when the table loads, so the
        first lookups do not time out on the model load. Raises what went wrong (callers log it)."""
        await self._run(lambda: (self._milvus(), self.embedder.embed(["warm up"])))

    async def aclose(self) -> None:
        await asyncio.to_thread(self._pool.shutdown, wait=True)
        with self._lock:
            if self._client is not None:
                self._client.close()
                self._client = None

    # -- helpers on the event loop ----------------------------------------------------------------

    async def _run(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    def _failed(self, operation: str, exc: BaseException) -> None:
        """Count the failure on the breaker; connection-level ones (Lite cannot open, unreachable) trip it at once."""
        down = unreachable(exc)
        timeout = isinstance(exc, TimeoutError)
        error_class = ErrorClass.TIMEOUT if timeout else ErrorClass.CONNECTION if down else ErrorClass.SERVER
        self._breaker.record_failure(error_class, refused=down)
        if down:
            self._reset()
        log.warning("semantic cache %s failed (%s): %s", operation, self.collection,
                    "timed out" if timeout else exc)

    def _reset(self) -> None:
        """Reconnect on the next call: a restarted Milvus has a new channel, a restarted Lite is unloaded."""
        with self._lock:
            client, self._client = self._client, None
        if client is not None:
            try:
                client.close()
            except Exception:  # closing a dead channel may fail; it is dropped either way
                log.debug("closing the semantic cache's Milvus client failed", exc_info=True)

    # -- blocking work (the cache's thread pool) --------------------------------------------------

    def _now_ms(self) -> int:
        return int(self.clock() * 1000)

    def _milvus(self) -> MilvusClient:
        with self._lock:
            if self._client is None:
                if "://" not in self.uri:  # a Milvus Lite file: its folder must exist
                    Path(self.uri).parent.mkdir(parents=True, exist_ok=True)
                client = open_milvus(self.uri, self._token, self.timeout_s, self._db_name)
                self._ensure_collection(client)
                self._client = client
            return self._client

    def _ensure_collection(self, client: MilvusClient) -> None:
        """Create the collection, or recreate it when its layout is not this version's (it is a cache:
        dropping it loses nothing that cannot be recomputed, e.g. after the embedding model changed size)."""
        dimension = self.embedder.dimension
        if client.has_collection(self.collection):
            fields = {f["name"]: f for f in client.describe_collection(self.collection)["fields"]}
            dim = fields.get("embedding", {}).get("params", {}).get("dim")
            if set(fields) == set(_FIELDS) and dim is not None and int(dim) == dimension:
                client.load_collection(self.collection)
                return
            log.warning("semantic cache collection %s has another layout (embedding dim %s, want %d): recreating it",
                        self.collection, dim, dimension)
            client.drop_collection(self.collection)
        schema = client.create_schema(auto_id=False, description="Pilothouse semantic response cache")
        schema.add_field("id", DataType.VARCHAR, is_primary=True, max_length=64)
        schema.add_field("tenant", DataType.VARCHAR, max_length=64, is_partition_key=True)
        schema.add_field("scope", DataType.VARCHAR, max_length=64)
        schema.add_field("stored_at", DataType.INT64)
        schema.add_field("expires_at", DataType.INT64)
        schema.add_field("body", DataType.VARCHAR, max_length=MAX_BODY_BYTES)
        schema.add_field("prompt_tokens", DataType.INT64)
        schema.add_field("completion_tokens", DataType.INT64)
        schema.add_field("embedding", DataType.FLOAT_VECTOR, dim=dimension)
        index = client.prepare_index_params()
        # FLAT: exact, and at a few thousand rows per tenant as fast as HNSW (measured: 2.2 vs 3.7 ms p50
        # at 3,000 rows on Milvus Lite); the partition key and filters keep each search to one tenant.
        index.add_index("embedding", index_type="FLAT", metric_type="COSINE")
        try:
            client.create_collection(self.collection, schema=schema, index_params=index)
        except MilvusException:
            if not client.has_collection(self.collection):  # another replica created it first: fine
                raise
        client.load_collection(self.collection)

    def _embed(self, text: str) -> list[float]:
        vectors = self.embedder.embed([text])
        if len(vectors) != 1:
            raise SemanticCacheError(f"the embedder returned {len(vectors)} vectors for one prompt")
        return vectors[0]

    def _lookup_sync(self, key: SemanticKey) -> tuple[list[float], SemanticHit | None]:
        client = self._milvus()
        vector = self._embed(key.text)
        now = self._now_ms()
        found = client.search(self.collection, [vector], anns_field="embedding", limit=1,
                              filter=f"{key.filter} and expires_at > {now}", output_fields=_OUTPUT,
                              search_params={"metric_type": "COSINE"}, timeout=self.timeout_s)
        if not found or not found[0]:
            return vector, None
        best = found[0][0]
        entity = best["entity"]
        response = CachedResponse(body=entity["body"].encode(),
                                  usage=Usage(int(entity["prompt_tokens"]), int(entity["completion_tokens"])),
                                  stored_at=entity["stored_at"] / 1000, expires_at=entity["expires_at"] / 1000)
        return vector, SemanticHit(response=response, similarity=float(best["distance"]))

    def _store_sync(self, key: SemanticKey, vector: list[float] | None, body: str, usage: Usage) -> None:
        client = self._milvus()
        if vector is None:
            vector = self._embed(key.text)
        now = self._now_ms()
        row = {"id": key.id, "tenant": key.tenant, "scope": key.scope, "stored_at": now,
               "expires_at": now + int(self.ttl_s * 1000), "body": body, "prompt_tokens": usage.prompt_tokens,
               "completion_tokens": usage.completion_tokens, "embedding": vector}
        client.upsert(self.collection, [row], timeout=self.timeout_s)
        with self._lock:
            self._tenants_stored.add(key.tenant)
            self._stores_since_maintenance += 1
            due = self._stores_since_maintenance >= self.maintain_every
            tenants: Sequence[str] = sorted(self._tenants_stored) if due else ()
            if due:
                self._stores_since_maintenance = 0
                self._tenants_stored.clear()
        if due:
            self._maintain(client, tenants)

    def _maintain(self, client: MilvusClient, tenants: Sequence[str]) -> None:
        """Delete the tenants' (digests) expired rows, evict each one's oldest beyond the bound, flush."""
        now = self._now_ms()
        expired = 0
        evicted = 0
        for tenant in tenants:
            where = f'tenant == "{tenant}"'
            expired += _deleted(client.delete(self.collection, filter=f"{where} and expires_at <= {now}",
                                              timeout=self.timeout_s))
            rows = client.query(self.collection, filter=where, output_fields=["count(*)"], timeout=self.timeout_s)
            excess = int(rows[0]["count(*)"]) - self.max_entries_per_tenant
            if excess > 0:
                oldest = sorted(self._stamps(client, where), key=lambda r: r[1])[:excess]
                evicted += _deleted(client.delete(self.collection, ids=[i for i, _ in oldest], timeout=self.timeout_s))
        client.flush(self.collection, timeout=self.timeout_s)
        self.metrics.semantic_evicted("expired", expired)
        self.metrics.semantic_evicted("bound", evicted)

    def _stamps(self, client: MilvusClient, where: str) -> list[tuple[str, int]]:
        """(id, stored_at) of every row matching ``where``; an iterator, as a query returns at most 16,384 rows."""
        iterator = client.query_iterator(self.collection, batch_size=1000, filter=where, output_fields=["stored_at"],
                                         timeout=self.timeout_s)
        stamps: list[tuple[str, int]] = []
        try:
            while batch := iterator.next():
                stamps.extend((row["id"], int(row["stored_at"])) for row in batch)
        finally:
            iterator.close()
        return stamps


def _deleted(result: Any) -> int:
    """Rows a ``MilvusClient.delete`` removed (it answers a dict with ``delete_count``, or a list of ids)."""
    if isinstance(result, Mapping):
        return int(result.get("delete_count", 0))
    return len(result) if isinstance(result, list) else 0


# -- from the RoutingTable --------------------------------------------------------------------------

def embedder_for_rule(rule: SemanticCacheRule) -> tuple[Embedder, str]:
    """The embedder the rule names and its identity (part of every entry's scope: a changed model never
    matches vectors of the old one). Blocking: a local model loads here."""
    backend = rule.embedding_backend
    if backend is not None:
        if not backend.endpoint or not backend.endpoint.startswith(("http://", "https://")):
            raise EmbeddingError(f"semantic cache: ModelDeployment {backend.model_deployment} has no HTTP endpoint "
                                 f"(got {backend.endpoint!r}); it must serve /v1/embeddings over HTTP")
        if rule.dimension is None:
            raise EmbeddingError("semantic cache: spec.cache.semantic.dimension is required with "
                                 "embedding.modelDeploymentRef")
        ref = backend.api_key_secret_ref
        api_key = os.environ.get(ref.env_var) if ref else None
        return (OpenAIEmbedder(backend.endpoint, backend.model, api_key, dimension=rule.dimension),
                f"{backend.model_deployment}:{backend.model}")
    local = LocalEmbedder(rule.embedding_local_path)
    if rule.dimension is not None and local.dimension != rule.dimension:
        raise EmbeddingError(f"semantic cache: spec.cache.semantic.dimension is {rule.dimension} but the model at "
                             f"{rule.embedding_local_path or 'all-MiniLM-L6-v2'} produces {local.dimension}-d vectors; "
                             f"set it to {local.dimension} or remove it")
    return local, f"local:{rule.embedding_local_path or 'all-MiniLM-L6-v2'}"


async def open_semantic_cache(table: RoutingTable, *, metrics: Metrics, state_dir: str | Path = ".pilothouse",
                              **options: Any) -> SemanticCache | None:
    """The semantic cache a RoutingTable asks for (None when it asks for none), prewarmed.

    Raises :class:`EmbeddingError` when the embedding model cannot be had (the gateway then runs
    without a semantic cache and says why). Milvus being down does not raise: the cache is
    returned and its lookups are misses until Milvus answers. ``options`` go to :class:`SemanticCache`.
    """
    rule = table.semantic_cache
    if rule is None:
        return None
    embedder, embedder_id = await asyncio.to_thread(embedder_for_rule, rule)
    ref = rule.milvus_token_secret_ref
    options = {"timeout_s": rule.milvus_timeout_seconds, **options}
    cache = SemanticCache(uri=rule.milvus_uri or str(Path(state_dir) / LITE_FILE),
                          collection=collection_name(table.namespace, table.workflow), embedder=embedder,
                          embedder_id=embedder_id, threshold=rule.threshold, ttl_s=float(rule.ttl_seconds),
                          max_entries_per_tenant=rule.max_entries_per_tenant,
                          token=os.environ.get(ref.env_var) if ref else None, db_name=rule.milvus_database,
                          metrics=metrics, **options)
    try:
        await cache.prewarm()
    except Exception as exc:  # Milvus down at load: lookups are misses (and errors) until it answers
        log.warning("semantic cache %s not ready: %s", cache.collection, exc)
    return cache
