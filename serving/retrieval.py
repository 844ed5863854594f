"""Retrieval for workflow steps: dense + BM25 on the VectorIndex's Milvus collection, fused with RRF.

What a caller (the workflow runtime) relies on is only :class:`Retriever` and :class:`RetrievalResult`
(:mod:`.retriever`):
the result always says which mode actually answered and whether that was a degraded choice, so
the run's audit record and the response can flag it (DESIGN.md §6: vector store down → keyword-only,
never a 5xx).

A VectorIndex with ``spec.hotIndex.enabled`` ranks dense search (and the dense half of hybrid) with
an in-process copy of its vectors (:mod:`.hot_index`) while that copy matches the collection;
Milvus still answers everything else and supplies every hit's text and metadata.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from functools import cache
from typing import TYPE_CHECKING, Any, Literal

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram
from pymilvus import AnnSearchRequest, MilvusClient, RRFRanker

from .breaker import Breaker, BreakerConfig
from .errors import ErrorClass
from .hot_index import HotIndex
from .keyword_store import KeywordStore, UnsupportedFilter
from .milvus_client import MILVUS_FAILURES, failure_text, open_milvus, unreachable
from .retriever import Hit, Mode, RetrievalResult, Retriever

__all__ = ["Hit", "MilvusRetriever", "Mode", "RetrievalResult", "Retriever"]  # the contract, re-exported

if TYPE_CHECKING:
    from pilothouse.operator.api.vector_index import HotIndex as HotIndexSpec

    from .embeddings import Embedder

# -- Milvus implementation --------------------------------------------------------------------------

RRF_K = 60
DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)
DEGRADED_REASONS = ("milvus_unreachable", "milvus_error", "routing_keyword_only", "embedding_failed")
"""Fixed vocabulary of the degraded counter's ``reason`` label; the free-text reason goes to the result."""
HOT_OUTCOMES = ("served", "rebuilding", "stale", "over_limit", "filter", "missing_row")
"""Why a dense/hybrid query of a hot-index VectorIndex was (not) ranked in-process (see hot_index.Outcome)."""


@dataclass(frozen=True)
class RetrievalMetrics:
    duration: Histogram
    degraded: Counter
    hot: Counter


@cache
def retrieval_metrics(registry: CollectorRegistry = REGISTRY) -> RetrievalMetrics:
    """Once per registry: every retriever in a process shares the series, one label set per index."""
    return RetrievalMetrics(
        duration=Histogram("pilothouse_retrieval_duration_seconds",
                           "Retrieval latency by index, mode that answered, and cold (first query) or warm.",
                           ["index", "mode", "state"], buckets=DURATION_BUCKETS, registry=registry),
        degraded=Counter("pilothouse_retrieval_degraded", "Retrievals answered in a degraded mode, and why.",
                         ["index", "reason"], registry=registry),
        hot=Counter("pilothouse_retrieval_hot_index", "Dense/hybrid queries of hot-index VectorIndexes: ranked "
                    "in-process (served) or by Milvus, and why.", ["index", "outcome"], registry=registry),
    )


def rrf(rankings: Sequence[Sequence[str]], limit: int, k: int = RRF_K) -> list[tuple[str, float]]:
    """Reciprocal rank fusion as Milvus computes it: score Σ 1/(k + rank), ranks from 1, ties in first-seen order."""
    scores: dict[str, float] = {}
    for ranking in rankings:
        for rank, key in enumerate(ranking, 1):
            scores[key] = scores.get(key, 0.0) + 1.0 / (k + rank)
    return sorted(scores.items(), key=lambda item: item[1], reverse=True)[:limit]


def _hit(key: object, entity: dict[str, Any], score: float) -> Hit:
    return Hit(id=str(key), text=entity.get("text", ""), score=score,
               metadata={k: v for k, v in entity.items() if k not in ("id", "text") and v is not None})


class MilvusRetriever:
    """Hybrid (dense + BM25, RRF k=60), dense or keyword search on one VectorIndex's Milvus alias.

    Milvus failures never reach the caller: the local keyword copy answers instead, as mode
    ``keyword-only`` with ``degraded=True`` and the cause in ``reason``. A breaker keeps a Milvus
    that is down from costing every query a connection attempt; after its cooldown one query probes.

    Milvus Lite: a ``.db`` file can be opened by ONE process only (an advisory lock; a second
    process gets "Open local milvus failed"). Where several processes share a Lite database, one of
    them runs ``python -m milvus_lite server --data-dir FILE.db --port P`` and the others pass
    ``http://127.0.0.1:P`` as ``milvus_uri``.

    ``hot_index`` is the VectorIndex's ``spec.hotIndex``; when enabled, :meth:`prewarm` builds the
    in-process copy and unfiltered dense/hybrid queries are ranked by it while it is current.
    """

    def __init__(self, *, index: str, collection: str, milvus_uri: str, embedder: Embedder,
                 keyword_store: KeywordStore | None, token: str | None = None,
                 metric: Literal["COSINE", "IP", "L2"] = "COSINE", output_fields: Sequence[str] = (),
                 registry: CollectorRegistry = REGISTRY, timeout_s: float = 10.0,
                 breaker: BreakerConfig | None = None, hot_index: HotIndexSpec | None = None) -> None:
        self.index = index
        self.collection = collection
        self.milvus_uri = milvus_uri
        self.embedder = embedder
        self.keyword_store = keyword_store
        self.metric = metric
        self.output_fields = ["text", *output_fields]
        self._token = token or ""
        self._timeout_s = timeout_s
        self._metrics = retrieval_metrics(registry)
        self._client: MilvusClient | None = None
        self._lock = threading.Lock()
        self._breaker = Breaker(f"milvus:{index}", breaker or BreakerConfig(cooldown_s=5.0, max_cooldown_s=30.0))
        self._warm = False
        self.hot = (HotIndex(collection, metric=metric, max_rows=hot_index.max_rows, client=self._milvus,
                             timeout_s=timeout_s)
                    if hot_index is not None and hot_index.enabled else None)
        for outcome in HOT_OUTCOMES if self.hot is not None else ():
            self._metrics.hot.labels(index, outcome)  # every series from 0, so rate() sees the first one

    # -- lifecycle ------------------------------------------------------------------------------

    def _milvus(self) -> MilvusClient:
        """The client, (re)connected with the collection loaded: a restarted Milvus Lite comes back released."""
        with self._lock:
            if self._client is None:
                client = open_milvus(self.milvus_uri, self._token, self._timeout_s)
                client.load_collection(self.collection, timeout=self._timeout_s)  # a no-op when loaded already
                self._client = client
            return self._client

    def prewarm(self) -> RetrievalResult:
        """Connect, load the collection, build the hot index if enabled, and run one query, recorded as
        the cold one, so users meet a warm index."""
        if self.hot is not None:
            with contextlib.suppress(*MILVUS_FAILURES):  # the query below reports Milvus' state
                self.hot.rebuild()
        return self.search("warm up", top_k=1, mode="dense")

    def close(self) -> None:
        with self._lock:
            if self._client is not None:
                self._client.close()
                self._client = None

    # -- search ---------------------------------------------------------------------------------

    def search(self, query: str, *, top_k: int, mode: Mode, filter: str | None = None) -> RetrievalResult:
        started = time.perf_counter()
        result = self._search(query, top_k=top_k, mode=mode, filter=filter)
        seconds = time.perf_counter() - started
        with self._lock:
            state, self._warm = ("warm" if self._warm else "cold"), True
        self._metrics.duration.labels(self.index, result.mode, state).observe(seconds)
        return replace(result, latency_ms=seconds * 1000)

    def _search(self, query: str, *, top_k: int, mode: Mode, filter: str | None) -> RetrievalResult:
        if mode == "keyword-only":
            return self._degraded(query, top_k, filter, "routing_keyword_only",
                                  "the RoutingTable says keyword-only (VectorIndex not Ready)")
        with self._lock:
            allowed = self._breaker.allow()
        if not allowed:
            return self._degraded(query, top_k, filter, "milvus_unreachable",
                                  f"Milvus at {self.milvus_uri} failed recently; retrying after a cooldown")
        try:
            vector = self.embedder.embed([query])[0] if mode in ("hybrid", "dense") else None
        except Exception as exc:  # any embedder failure (remote down, model error) must not become a 5xx
            with self._lock:  # Milvus was not asked: a non-counting failure only frees a probe slot
                self._breaker.record_failure(ErrorClass.CANCELLED)
            return self._degraded(query, top_k, filter, "embedding_failed", f"query embedding failed: {exc}")
        client: MilvusClient | None = None
        try:
            client = self._milvus()
            hits = self._hot_search(client, query, vector, top_k, mode, filter)
            hot = hits is not None
            if hits is None:
                hits = self._milvus_search(client, query, vector, top_k, mode, filter)
        except MILVUS_FAILURES as exc:
            reason = self._failed(exc, client)
            return self._degraded(query, top_k, filter, reason,
                                  f"Milvus at {self.milvus_uri}: {failure_text(exc, self._timeout_s)}")
        with self._lock:
            self._breaker.record_success()
        return RetrievalResult(hits=hits, mode=mode, hot=hot)

    def _failed(self, exc: BaseException, client: MilvusClient | None) -> str:
        """Connection-level failures (see :func:`unreachable`) trip the breaker at once.

        A call whose client another call's outage closed meanwhile fails with a cancelled or closed
        channel: that is the same outage, not a Milvus error of its own.
        """
        with self._lock:
            down = unreachable(exc) or (client is not None and client is not self._client)
            self._breaker.record_failure(ErrorClass.CONNECTION if down else ErrorClass.SERVER, refused=down)
            if down and self._client is not None:
                self._client.close()
                self._client = None  # reconnect on the probe: a restarted server has a new channel
        return "milvus_unreachable" if down else "milvus_error"

    def _hot_search(self, client: MilvusClient, query: str, vector: list[float] | None, top_k: int, mode: Mode,
                    filter: str | None) -> list[Hit] | None:
        """Hits ranked by the hot index (fused with Milvus BM25 for hybrid); None when Milvus must rank."""
        if self.hot is None or mode not in ("dense", "hybrid") or vector is None:
            return None
        snapshot, outcome = (None, "filter") if filter else self.hot.current(client)
        if snapshot is None:
            self._metrics.hot.labels(self.index, outcome).inc()
            return None
        ranked = snapshot.search(vector, top_k)
        entities: dict[str, dict[str, Any]] = {}
        if mode == "hybrid":
            sparse = client.search(self.collection, [query], anns_field="sparse", limit=top_k,
                                   search_params={"metric_type": "BM25"}, output_fields=self.output_fields,
                                   timeout=self._timeout_s)[0]
            entities = {str(h["id"]): h["entity"] for h in sparse}
            ranked = rrf([[key for key, _ in ranked], [str(h["id"]) for h in sparse]], top_k)
        missing = [key for key, _ in ranked if key not in entities]
        if missing:
            entities.update((str(row["id"]), row) for row in
                            client.get(self.collection, ids=missing, output_fields=self.output_fields,
                                       timeout=self._timeout_s))
        if any(key not in entities for key, _ in ranked):  # deleted without a generation bump
            self.hot.invalidate(snapshot)
            self._metrics.hot.labels(self.index, "missing_row").inc()
            return None
        self._metrics.hot.labels(self.index, "served").inc()
        return [_hit(key, entities[key], score) for key, score in ranked]

    def _milvus_search(self, client: MilvusClient, query: str, vector: list[float] | None, top_k: int, mode: Mode,
                       filter: str | None) -> list[Hit]:
        expr = filter or ""
        dense_params = {"metric_type": self.metric}
        sparse_params = {"metric_type": "BM25"}
        if mode == "hybrid":
            requests = [AnnSearchRequest([vector], "embedding", dense_params, top_k, expr=expr),
                        AnnSearchRequest([query], "sparse", sparse_params, top_k, expr=expr)]
            found = client.hybrid_search(self.collection, requests, RRFRanker(RRF_K), limit=top_k,
                                         output_fields=self.output_fields, timeout=self._timeout_s)
            sign = 1.0
        elif mode == "dense":
            found = client.search(self.collection, [vector], anns_field="embedding", limit=top_k, filter=expr,
                                  search_params=dense_params, output_fields=self.output_fields,
                                  timeout=self._timeout_s)
            sign = -1.0 if self.metric == "L2" else 1.0
        else:
            found = client.search(self.collection, [query], anns_field="sparse", limit=top_k, filter=expr,
                                  search_params=sparse_params, output_fields=self.output_fields,
                                  timeout=self._timeout_s)
            sign = -1.0  # Milvus (Lite) reports BM25 as a negative distance, best first
        return [_hit(h["id"], h["entity"], sign * float(h["distance"])) for h in found[0]]

    def _degraded(self, query: str, top_k: int, filter: str | None, code: str, reason: str) -> RetrievalResult:
        self._metrics.degraded.labels(self.index, code).inc()
        if self.keyword_store is None:
            return RetrievalResult(hits=[], mode="keyword-only", degraded=True,
                                   reason=f"{reason}; no local keyword copy of {self.index}")
        try:
            hits = self.keyword_store.search(query, top_k=top_k, filter=filter)
        except UnsupportedFilter as exc:
            return RetrievalResult(hits=[], mode="keyword-only", degraded=True, reason=f"{reason}; {exc}")
        return RetrievalResult(hits=hits, mode="keyword-only", degraded=True,
                               reason=f"{reason}; answered by BM25 over the local keyword copy")
