"""An in-process dense index for hot collections, with Milvus as the source of truth.

Why: on 2 cores a Milvus Lite dense search over 100k 384-d rows costs tens of milliseconds, most
of it outside the ANN search itself (bench/retrieval.py measures both). A FAISS copy of the
vectors inside the retriever answers the ranking in well under a millisecond; Milvus still
supplies every hit's text and metadata by primary key, so what users read is always Milvus'.

Freshness: a copy is only used while it matches what it was built from, checked on every query
with one cheap call (``describe_collection`` on the alias, ≈0.5 ms on Lite), which returns

- the physical collection behind the alias: an operator re-index (``<alias>_v<N+1>``, alias swap)
  changes it;
- the write generation, a collection property that writers replace after every write
  (:func:`bump_generation`; ``pilothouse ingest`` does). A row count would miss an upsert that
  changes text but not the count, and counting costs O(rows) per call on Lite (≈35 ms at 100k).

On a mismatch the query is answered by Milvus and the copy is rebuilt in a background thread;
stale rankings are never served. A hit that Milvus no longer has (a delete by a writer that did
not bump the generation) also invalidates the copy. Writers that bypass Pilothouse must call
:func:`bump_generation`, or the copy stays as of its build.

Filters are never evaluated here: the copy holds ids and vectors only, and filtering inside an
HNSW graph loses recall for selective filters, so every filtered query goes to Milvus.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import faiss
import numpy as np
from pymilvus import MilvusClient

from .milvus_client import MILVUS_FAILURES, failure_text

log = logging.getLogger(__name__)

GENERATION = "pilothouse.generation"
"""Collection property writers replace after each write; see :func:`bump_generation`."""

FLAT_MAX_FLOATS = 8_000_000
"""Exact scan up to this many stored floats (32 MB: ~20k 384-d rows), HNSW above.

Measured here (2 cores, 384-d; bench/retrieval.py): a flat inner-product scan is memory-bound,
≈0.6 ms at 10k rows, ≈1.5 ms at 30k and 6-24 ms at 100k (it shares the memory bus), exact, and
builds instantly. HNSW (M 16, efSearch 64) answers in ≈0.15 ms at 100k with recall@10 ≥ 0.99, but
takes 15-30 s to build there and holds a graph. Below ~32 MB of vectors the scan is about 1 ms,
so exactness and an instant rebuild win; above it the scan grows linearly while HNSW stays flat.
"""
HNSW_M = 16
HNSW_EF_CONSTRUCTION = 100  # 200 doubles the build time for < 0.01 recall on these vectors
HNSW_EF_SEARCH = 64
RETRY_AFTER_FAILURE_S = 5.0
BATCH_ROWS = 16_384  # Milvus' query window; every page costs Lite a pass over the rows (100k: 15 s -> 10 s)

Metric = Literal["COSINE", "IP", "L2"]
Outcome = Literal["served", "rebuilding", "stale", "over_limit"]
"""Why a lookup did (not) answer: ``stale`` means no rebuild is running (the last one failed moments ago)."""


@dataclass(frozen=True, slots=True)
class SourceVersion:
    """What a copy was built from; equal versions mean the same rows, as far as writers say."""

    collection: str
    generation: str


def source_version(client: MilvusClient, alias: str, timeout_s: float | None = None) -> SourceVersion:
    described = client.describe_collection(alias, timeout=timeout_s)
    return SourceVersion(str(described["collection_name"]),
                         str((described.get("properties") or {}).get(GENERATION, "")))


def bump_generation(client: MilvusClient, collection: str) -> None:
    """Mark a collection as written: hot copies of it stop answering until rebuilt.

    A random token rather than a counter: two concurrent writers cannot lose an increment. Call
    it after the write is visible, so a copy rebuilt after the bump cannot miss that write.
    """
    physical = source_version(client, collection).collection  # a property write on an alias is not portable
    client.alter_collection_properties(physical, {GENERATION: uuid.uuid4().hex})


def index_kind(rows: int, dimension: int) -> Literal["flat", "hnsw"]:
    return "flat" if rows * dimension <= FLAT_MAX_FLOATS else "hnsw"


class TooManyRows(Exception):
    """The collection has more rows than the hot index may hold (``spec.hotIndex.maxRows``)."""

    def __init__(self, version: SourceVersion, max_rows: int) -> None:
        super().__init__(f"{version.collection} has more than {max_rows} rows (spec.hotIndex.maxRows)")
        self.version = version


@dataclass(frozen=True)
class Snapshot:
    """A FAISS index over one version of a collection; ``ids[i]`` is the primary key of FAISS row i."""

    version: SourceVersion
    ids: Sequence[str]
    index: faiss.Index | None  # None: the collection was empty
    kind: Literal["flat", "hnsw"]
    metric: Metric
    copy_s: float  # reading ids and vectors from Milvus
    build_s: float  # copy and index build

    @property
    def rows(self) -> int:
        return len(self.ids)

    def search(self, vector: Sequence[float], top_k: int) -> list[tuple[str, float]]:
        """(id, score) best first, scored like the retriever's Milvus path: similarity for COSINE
        and IP, negative Euclidean distance for L2."""
        if self.index is None:
            return []
        query = np.asarray([vector], dtype=np.float32)
        if self.metric == "COSINE":
            faiss.normalize_L2(query)
        params = faiss.SearchParametersHNSW(efSearch=max(HNSW_EF_SEARCH, top_k)) if self.kind == "hnsw" else None
        found, positions = self.index.search(query, min(top_k, self.rows), params=params)
        scores = -np.sqrt(np.maximum(found[0], 0.0)) if self.metric == "L2" else found[0]  # FAISS L2 is squared
        return [(self.ids[p], float(s)) for p, s in zip(positions[0], scores, strict=True) if p >= 0]


def faiss_index(vectors: np.ndarray, metric: Metric) -> tuple[faiss.Index, Literal["flat", "hnsw"]]:
    """The index for these vectors (normalised in place for COSINE), chosen by size (FLAT_MAX_FLOATS)."""
    rows, dimension = vectors.shape
    if metric == "COSINE":
        faiss.normalize_L2(vectors)
    faiss_metric = faiss.METRIC_L2 if metric == "L2" else faiss.METRIC_INNER_PRODUCT
    kind = index_kind(rows, dimension)
    if kind == "flat":
        index: faiss.Index = faiss.IndexFlat(dimension, faiss_metric)
    else:
        index = faiss.IndexHNSWFlat(dimension, HNSW_M, faiss_metric)
        index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
    index.add(vectors)
    return index, kind


def build_snapshot(client: MilvusClient, alias: str, *, metric: Metric, max_rows: int,
                   timeout_s: float | None = None) -> Snapshot:
    """Copy ids and vectors of the collection behind ``alias`` into a FAISS index.

    The version is read before the rows, and the rows come from that physical collection: a write
    during the copy leaves the snapshot tagged with the older generation, so it is rebuilt again
    rather than trusted.
    """
    started = time.perf_counter()
    version = source_version(client, alias, timeout_s)
    ids: list[str] = []
    batches: list[np.ndarray] = []
    iterator = client.query_iterator(version.collection, batch_size=BATCH_ROWS, output_fields=["id", "embedding"],
                                     timeout=timeout_s)
    try:
        while batch := iterator.next():
            if len(ids) + len(batch) > max_rows:
                raise TooManyRows(version, max_rows)
            ids.extend(str(row["id"]) for row in batch)
            batches.append(np.asarray([row["embedding"] for row in batch], dtype=np.float32))
    finally:
        iterator.close()
    copied = time.perf_counter() - started
    if not ids:
        return Snapshot(version, [], None, "flat", metric, copied, copied)
    index, kind = faiss_index(np.vstack(batches), metric)
    return Snapshot(version, ids, index, kind, metric, copied, time.perf_counter() - started)


class HotIndex:
    """The current snapshot of one collection, served only while it matches Milvus. Thread-safe.

    ``client`` returns the retriever's connected Milvus client; the background rebuild uses it too.
    ``timeout_s`` is the deadline of each Milvus call, the retriever's.
    """

    def __init__(self, alias: str, *, metric: Metric, max_rows: int, client: Callable[[], MilvusClient],
                 timeout_s: float) -> None:
        self.alias = alias
        self.metric = metric
        self.max_rows = max_rows
        self.timeout_s = timeout_s
        self._client = client
        self._lock = threading.Lock()
        self._snapshot: Snapshot | None = None
        self._builder: threading.Thread | None = None
        self._over_limit: SourceVersion | None = None  # not retried until the collection changes
        self._failed_at = float("-inf")

    @property
    def snapshot(self) -> Snapshot | None:
        return self._snapshot

    def rebuild(self) -> Snapshot | None:
        """Build now in this thread (prewarm); None when the collection is over ``max_rows``.

        Raises what pymilvus raises when Milvus fails: the caller decides what a failed prewarm means.
        """
        try:
            snapshot = build_snapshot(self._client(), self.alias, metric=self.metric, max_rows=self.max_rows,
                                      timeout_s=self.timeout_s)
        except TooManyRows as exc:
            log.warning("hot index %s not built, Milvus answers: %s", self.alias, exc)
            with self._lock:
                self._snapshot, self._over_limit = None, exc.version
            return None
        with self._lock:
            self._snapshot, self._over_limit = snapshot, None
        log.info("hot index %s: %d rows of %s (%s) in %.1f s (copy %.1f s)", self.alias, snapshot.rows,
                 snapshot.version.collection, snapshot.kind, snapshot.build_s, snapshot.copy_s)
        return snapshot

    def current(self, client: MilvusClient) -> tuple[Snapshot | None, Outcome]:
        """The snapshot that may answer now (it matches Milvus), or None and why not.

        Raises what pymilvus raises when the version check fails, like any Milvus call of the retriever.
        """
        version = source_version(client, self.alias, self.timeout_s)
        with self._lock:
            snapshot = self._snapshot
            if snapshot is not None and snapshot.version == version:
                return snapshot, "served"
            if self._over_limit == version:
                return None, "over_limit"
            return None, "rebuilding" if self._start_rebuild() else "stale"

    def invalidate(self, snapshot: Snapshot) -> None:
        """``snapshot`` disagrees with Milvus (a hit Milvus lacks): stop serving it, rebuild."""
        with self._lock:
            if self._snapshot is snapshot:
                self._snapshot = None
                self._start_rebuild()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for a background rebuild to end; True when none is running any more."""
        builder = self._builder
        if builder is not None:
            builder.join(timeout)
        return self._builder is None or not self._builder.is_alive()

    def _start_rebuild(self) -> bool:
        """Start a background rebuild unless one runs or one failed moments ago (lock held); True if
        a rebuild is running now."""
        if self._builder is not None and self._builder.is_alive():
            return True
        if time.monotonic() - self._failed_at < RETRY_AFTER_FAILURE_S:
            return False
        self._builder = threading.Thread(target=self._rebuild_in_background, name=f"hot-index-{self.alias}",
                                         daemon=True)
        self._builder.start()
        return True

    def _rebuild_in_background(self) -> None:
        try:
            self.rebuild()
        except MILVUS_FAILURES as exc:
            log.warning("hot index %s: rebuild failed, Milvus answers meanwhile: %s", self.alias,
                        failure_text(exc, self.timeout_s))
            with self._lock:
                self._failed_at = time.monotonic()
