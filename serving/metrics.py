"""The gateway's Prometheus metrics, with label cardinality bounded by the RoutingTable.

Label values that come from a request (the ``model`` a client sends, a made-up route) would let any
client mint new time series until Prometheus falls over. So every label value is checked against an
allow-list built from the loaded RoutingTables — routes (``<workflow>/<step>``, what clients call),
backends (ModelDeployment names), budget policies, workflows — and anything else is counted as
``other``. The gateway calls ``allow_tables`` (or ``allow``) whenever a table loads; series of
gauges whose backend, policy or workflow left the tables are dropped so dashboards do not show a
stale circuit state or budget forever (counters are kept: they are cumulative by contract).

Each ``Metrics`` owns its ``CollectorRegistry``: tests and several gateways in one process do not
collide in the global registry, and ``render`` exposes exactly the gateway's series.
"""

from __future__ import annotations

import threading
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator, Sequence
from enum import IntEnum
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.metrics_core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import INF, floatToGoString

from pilothouse.operator.api.routing import RoutingTable

from .errors import ErrorClass

OTHER = "other"

REQUEST_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
OVERHEAD_BUCKETS = (0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
"""Fine at the low end: the gateway's goal is a few milliseconds of added latency (issue 3)."""

INTERNAL_ERROR = "internal_error"  # a failure in the gateway itself: the outcome, the error code, the attempt's class
OVERLOADED = "overloaded"  # turned away unread: the replica had its limit of requests in flight (``direct``)
OUTCOMES = frozenset({"ok", "cache_hit", "budget_rejected", "invalid_request", "unauthorized", "no_backend",
                      "store_unavailable", INTERNAL_ERROR, OVERLOADED,
                      *(e.value for e in ErrorClass)})
"""Fixed vocabulary of ``outcome``: success, the gateway's own refusals, or the final error class."""
REASONS = frozenset({"circuit_open", "unhealthy", "budget_downgrade", *(e.value for e in ErrorClass)})
"""Why a request moved to another backend: an error class or a decision taken before dispatch."""
WINDOWS = frozenset({"hour", "day", "month"})
TOKEN_KINDS = frozenset({"prompt", "completion"})
RUN_OUTCOMES = frozenset({"automated", "approved", "rejected", "failed", "compensated"})
"""How a workflow run ended: completed without a human, completed after approval, or not completed."""
RUN_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0)
SEMANTIC_LOOKUPS = frozenset({"hit", "miss", "error"})
"""A semantic cache lookup: served, nothing alike enough, or Milvus / the embedder failed (also a miss)."""
SEMANTIC_STORES = frozenset({"stored", "rejected", "error"})
"""An answer offered to the semantic cache: stored, refused (not a 200 JSON answer, too large), or failed."""
EVICTION_REASONS = frozenset({"expired", "bound"})
SIMILARITY_BUCKETS = (0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.925, 0.95, 0.96, 0.97, 0.98, 0.99, 1.0)
"""Fine near the top, where a semantic cache's threshold lives."""


class CircuitState(IntEnum):
    """Gauge values; the same numbers as ``serving.breaker.BreakerState``."""

    CLOSED = 0
    HALF_OPEN = 1
    OPEN = 2


class Metrics:
    """Owns the registry and every gateway metric; label values are filtered through the allow-lists."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = LoopCounter("pilothouse_requests", "Requests by route, backend that answered, and outcome.",
                                    ["route", "backend", "outcome"], registry=r)
        self.request_duration = LoopHistogram("pilothouse_request_duration_seconds", "End-to-end request latency.",
                                              ["route"], REQUEST_BUCKETS, registry=r)
        self.gateway_overhead = LoopHistogram("pilothouse_gateway_overhead_seconds",
                                              "Latency the gateway adds on top of the backend's own time.",
                                              [], OVERHEAD_BUCKETS, registry=r)
        self.fallbacks = LoopCounter("pilothouse_fallbacks", "Moves from one backend to the next, and why.",
                                     ["from", "to", "reason"], registry=r)
        self.circuit_state = Gauge("pilothouse_circuit_state", "Circuit breaker: 0 closed, 1 half-open, 2 open.",
                                   ["backend"], registry=r)
        self.spend = LoopCounter("pilothouse_spend_usd", "Committed spend in USD.", ["policy", "backend"], registry=r)
        self.budget_remaining = Gauge("pilothouse_budget_remaining_usd", "Budget left in the current window (USD).",
                                      ["policy", "window"], registry=r)
        self.cache_hits = LoopCounter("pilothouse_cache_hits", "Responses served from the cache.", ["route"],
                                      registry=r)
        self.cache_misses = LoopCounter("pilothouse_cache_misses", "Cache lookups that missed.", ["route"], registry=r)
        self.semantic_lookups = Counter("pilothouse_semantic_cache_lookups",
                                        "Semantic cache lookups by route and result (hit|miss|error).",
                                        ["route", "result"], registry=r)
        self.semantic_lookup_duration = Histogram("pilothouse_semantic_cache_lookup_duration_seconds",
                                                  "Time a semantic cache lookup took (embedding + search).",
                                                  buckets=OVERHEAD_BUCKETS, registry=r)
        self.semantic_similarity = Histogram("pilothouse_semantic_cache_similarity",
                                             "Similarity of the nearest unexpired cached prompt of the same tenant, "
                                             "route and parameters; tune the threshold against it.",
                                             buckets=SIMILARITY_BUCKETS, registry=r)
        self.semantic_stores = Counter("pilothouse_semantic_cache_stores",
                                       "Answers offered to the semantic cache by route and result "
                                       "(stored|rejected|error).", ["route", "result"], registry=r)
        self.semantic_evictions = Counter("pilothouse_semantic_cache_evictions",
                                          "Semantic cache rows deleted, by reason (expired|bound).", ["reason"],
                                          registry=r)
        self.tokens = LoopCounter("pilothouse_tokens", "Tokens by backend and kind (prompt|completion).",
                                  ["backend", "kind"], registry=r)
        self.table_revision = Gauge("pilothouse_table_revision", "RoutingTable revision in use.", ["workflow"],
                                    registry=r)
        self.workflow_runs = Counter("pilothouse_workflow_runs", "Finished workflow runs by outcome.",
                                     ["workflow", "outcome"], registry=r)
        self.workflow_run_duration = Histogram("pilothouse_workflow_run_duration_seconds",
                                               "Machine time of a finished run (time parked for a human excluded).",
                                               ["workflow"], buckets=RUN_BUCKETS, registry=r)
        self.workflow_cost = Counter("pilothouse_workflow_cost_usd", "Model cost of workflow runs in USD.",
                                     ["workflow"], registry=r)
        self.workflow_reviews = Counter("pilothouse_workflow_reviews", "Runs parked in the human review queue.",
                                        ["workflow"], registry=r)
        self.workflow_compensations = Counter("pilothouse_workflow_compensations",
                                              "Runs whose actions were undone by their compensation.",
                                              ["workflow"], registry=r)
        self._lock = threading.Lock()
        self._series_memo: dict[tuple[Counter | Histogram, tuple[str, ...]], Any] = {}
        self._runtime_workflows: frozenset[str] = frozenset()
        self._routes: frozenset[str] = frozenset()
        self._backends: frozenset[str] = frozenset()
        self._policies: frozenset[str] = frozenset()
        self._workflows: frozenset[str] = frozenset()

    # -- allow-lists -------------------------------------------------------------------------------

    def allow(self, *, routes: Iterable[str] = (), backends: Iterable[str] = (), policies: Iterable[str] = (),
              workflows: Iterable[str] = ()) -> None:
        """Replace the allow-lists (pass the union over every table served) and drop stale gauge series."""
        with self._lock:
            self._routes, self._backends = frozenset(routes), frozenset(backends)
            self._policies, self._workflows = frozenset(policies), frozenset(workflows)
            _drop_unless(self.circuit_state, lambda labels: labels[0] in self._backends)
            _drop_unless(self.budget_remaining, lambda labels: labels[0] in self._policies)
            _drop_unless(self.table_revision, lambda labels: labels[0] in self._workflows)

    def allow_tables(self, tables: Iterable[RoutingTable]) -> None:
        """``allow`` with everything the given RoutingTables name."""
        routes: set[str] = set()
        backends: set[str] = set()
        policies: set[str] = set()
        workflows: set[str] = set()
        for table in tables:
            workflows.add(table.workflow)
            for route in table.routes:
                routes.add(f"{table.workflow}/{route.step}")
                backends.update(backend.model_deployment for backend in route.backends)
            if table.budget is not None:
                policies.add(table.budget.policy)
        self.allow(routes=routes, backends=backends, policies=policies, workflows=workflows)

    def route(self, value: str | None) -> str:
        return _bounded(value, self._routes)

    def backend(self, value: str | None) -> str:
        return _bounded(value, self._backends)

    def policy(self, value: str | None) -> str:
        return _bounded(value, self._policies)

    def workflow(self, value: str | None) -> str:
        return _bounded(value, self._workflows)

    def allow_run_workflows(self, names: Iterable[str]) -> None:
        """Add workflows a runtime executes (from its manifests, never from a request) to the run metrics."""
        with self._lock:
            self._runtime_workflows = self._runtime_workflows | frozenset(names)

    def _run_workflow(self, value: str) -> str:
        return _bounded(value, self._workflows | self._runtime_workflows)

    # -- recording ---------------------------------------------------------------------------------

    def observe_request(self, route: str | None, backend: str | None, outcome: str, duration_s: float,
                        overhead_s: float | None = None) -> None:
        """One finished request. ``backend`` is the one that answered (None when none did)."""
        name = self.route(route)
        self.requests.inc((name, self.backend(backend), _bounded(outcome, OUTCOMES)))
        self.request_duration.observe((name,), duration_s)
        if overhead_s is not None:
            self.gateway_overhead.observe((), overhead_s)

    def overloaded(self) -> None:
        """One request refused unread at the replica's in-flight limit: no route or backend to name, and no
        duration, which would pull the latency histogram toward zero just when the replica is slowest."""
        self.requests.inc((OTHER, OTHER, OVERLOADED))

    def fallback(self, from_backend: str, to_backend: str, reason: str) -> None:
        self.fallbacks.inc((self.backend(from_backend), self.backend(to_backend), _bounded(reason, REASONS)))

    def circuit(self, backend: str, state: int) -> None:
        """Breaker state as 0/1/2 (a ``BreakerState`` or its ``gauge``); unknown backends are not recorded."""
        name = self.backend(backend)
        if name != OTHER:  # a gauge summed over unrelated backends means nothing
            self.circuit_state.labels(name).set(int(CircuitState(int(state))))

    def spent(self, policy: str, backend: str, usd: float) -> None:
        if usd > 0:
            self.spend.inc((self.policy(policy), self.backend(backend)), usd)

    def budget_left(self, policy: str, window: str, usd: float) -> None:
        name = self.policy(policy)
        if name != OTHER:
            self.budget_remaining.labels(name, _bounded(window, WINDOWS)).set(usd)

    def cache(self, route: str | None, hit: bool) -> None:
        (self.cache_hits if hit else self.cache_misses).inc((self.route(route),))

    def semantic_lookup(self, route: str | None, result: str, duration_s: float | None = None,
                        similarity: float | None = None) -> None:
        """One lookup; ``similarity`` is the nearest candidate's, hit or not (None when there was none)."""
        self._series(self.semantic_lookups, self.route(route), _bounded(result, SEMANTIC_LOOKUPS)).inc()
        if duration_s is not None:
            self.semantic_lookup_duration.observe(duration_s)
        if similarity is not None:
            self.semantic_similarity.observe(similarity)

    def semantic_store(self, route: str | None, result: str) -> None:
        self._series(self.semantic_stores, self.route(route), _bounded(result, SEMANTIC_STORES)).inc()

    def semantic_evicted(self, reason: str, count: int) -> None:
        if count:
            self._series(self.semantic_evictions, _bounded(reason, EVICTION_REASONS)).inc(count)

    def used_tokens(self, backend: str, prompt: int, completion: int) -> None:
        name = self.backend(backend)
        if prompt:
            self.tokens.inc((name, "prompt"), prompt)
        if completion:
            self.tokens.inc((name, "completion"), completion)

    def revision(self, workflow: str, revision: int) -> None:
        name = self.workflow(workflow)
        if name != OTHER:
            self.table_revision.labels(name).set(revision)

    def run_finished(self, workflow: str, outcome: str, duration_s: float) -> None:
        name = self._run_workflow(workflow)
        self._series(self.workflow_runs, name, _bounded(outcome, RUN_OUTCOMES)).inc()
        self._series(self.workflow_run_duration, name).observe(duration_s)
        if outcome == "compensated":
            self._series(self.workflow_compensations, name).inc()

    def run_cost(self, workflow: str, usd: float) -> None:
        if usd > 0:
            self._series(self.workflow_cost, self._run_workflow(workflow)).inc(usd)

    def run_parked(self, workflow: str) -> None:
        self._series(self.workflow_reviews, self._run_workflow(workflow)).inc()

    def _series(self, metric: Counter | Histogram, *values: str) -> Any:
        """``metric.labels(*values)``, remembered: prometheus_client checks the values and takes a lock on every
        ``labels`` call (1.2 us a call against 0.4 remembered). The values are bounded by the allow-lists, and so
        is this. Counters and histograms only: a gauge's series can be dropped."""
        key = (metric, values)
        series = self._series_memo.get(key)
        if series is None:
            series = self._series_memo[key] = metric.labels(*values)
        return series

    def render(self) -> tuple[bytes, str]:
        """Body and Content-Type for ``GET /metrics`` (Prometheus text format)."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class _LoopFamily(Collector):
    """A metric family written by one thread only (the data plane's event loop), kept as plain numbers and handed
    to the registry when it is scraped.

    Why not prometheus_client's ``Counter`` and ``Histogram``: every ``inc`` takes a lock, and every request makes
    six of them (requests, duration, overhead, tokens twice, spend): 12.6 us of the gateway's event loop per request
    measured in the running gateway, ~30 us in all with the cache misses they cause (``bench/gateway_overhead.py``'s
    app driven in-process). prometheus_client's documented way out is a custom collector, which this is. A scrape
    reads a copy: the writer may add a series meanwhile.
    """

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str], *,
                 registry: CollectorRegistry) -> None:
        self.name, self.documentation, self.labelnames = name, documentation, list(labelnames)
        registry.register(self)


class LoopCounter(_LoopFamily):
    def __init__(self, name: str, documentation: str, labelnames: Sequence[str], *,
                 registry: CollectorRegistry) -> None:
        self.values: dict[tuple[str, ...], float] = {}
        super().__init__(name, documentation, labelnames, registry=registry)

    def inc(self, labels: tuple[str, ...], amount: float = 1.0) -> None:
        values = self.values
        values[labels] = values.get(labels, 0.0) + amount

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for labels, value in self.values.copy().items():
            family.add_metric(labels, value)
        yield family


class LoopHistogram(_LoopFamily):
    """Per series: a count per bucket, then +Inf's, then the sum."""

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str], buckets: Sequence[float], *,
                 registry: CollectorRegistry) -> None:
        self.bounds = tuple(buckets)
        self._les = [floatToGoString(bound) for bound in (*self.bounds, INF)]
        self.series: dict[tuple[str, ...], list[float]] = {}
        super().__init__(name, documentation, labelnames, registry=registry)

    def observe(self, labels: tuple[str, ...], amount: float) -> None:
        counts = self.series.get(labels)
        if counts is None:
            counts = self.series[labels] = [0.0] * (len(self.bounds) + 2)
        counts[bisect_left(self.bounds, amount)] += 1  # the first bucket whose bound is >= amount ("le")
        counts[-1] += amount

    def collect(self) -> Iterator[Metric]:
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for labels, counts in self.series.copy().items():
            cumulative, total = [], 0.0
            for le, count in zip(self._les, counts, strict=False):  # the last entry, the sum, has no bucket
                total += count
                cumulative.append((le, total))
            family.add_metric(labels, cumulative, counts[-1])
        yield family


def _bounded(value: str | None, allowed: frozenset[str]) -> str:
    return value if value is not None and value in allowed else OTHER


def _drop_unless(gauge: Gauge, keep: Callable[[tuple[str, ...]], bool]) -> None:
    """Remove the gauge's series whose label values ``keep`` rejects.

    prometheus_client has no public way to list a metric's children; ``_metrics`` is the dict it
    keeps them in (stable across 0.x releases). Dropping is an optimisation for dashboards, not
    correctness, so a future release without it just keeps the stale series.
    """
    children = getattr(gauge, "_metrics", None)
    if not isinstance(children, dict):
        return
    for labels in list(children):
        if not keep(labels):
            gauge.remove(*labels)
