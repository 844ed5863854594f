"""Gateway metrics: the names dashboards query, bounded label values, a parseable /metrics body."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from pilothouse.operator.api.routing import RoutingTable
from pilothouse.serving.breaker import BreakerState
from pilothouse.serving.metrics import OTHER, LoopCounter, LoopHistogram, Metrics

EXPORTED = {
    "pilothouse_requests_total", "pilothouse_request_duration_seconds", "pilothouse_gateway_overhead_seconds",
    "pilothouse_fallbacks_total", "pilothouse_circuit_state", "pilothouse_spend_usd_total",
    "pilothouse_budget_remaining_usd", "pilothouse_cache_hits_total", "pilothouse_cache_misses_total",
    "pilothouse_tokens_total", "pilothouse_table_revision",
}


def backend(name: str, role: str = "primary") -> dict[str, object]:
    return {"modelDeployment": name, "engine": "external", "endpoint": "http://x", "model": name, "tier": "small",
            "pricing": {"inputPerMillionUSD": 1, "outputPerMillionUSD": 2}, "healthy": True, "role": role,
            "reason": "test"}


TABLE = RoutingTable.model_validate({
    "workflow": "invoice-triage", "namespace": "default", "revision": 4, "generatedAt": datetime.now(UTC),
    "degraded": False,
    "routes": [{"step": "extract", "tier": "small", "maxTokens": 256,
                "backends": [backend("invoice-small"), backend("invoice-large", "fallback")]}],
    "budget": {"policy": "invoice-budget", "state": "Ok", "action": "none"},
})


def samples(metrics: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    body, content_type = metrics.render()
    assert content_type.startswith("text/plain")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(body.decode()) for s in family.samples}


def value(metrics: Metrics, name: str, **labels: str) -> float | None:
    return samples(metrics).get((name, tuple(sorted(labels.items()))))


@pytest.fixture
def metrics() -> Metrics:
    m = Metrics()
    m.allow_tables([TABLE])
    return m


def exercise(m: Metrics) -> None:
    m.observe_request("invoice-triage/extract", "invoice-large", "ok", 0.43, overhead_s=0.0012)
    m.fallback("invoice-small", "invoice-large", "timeout")
    m.circuit("invoice-small", BreakerState.OPEN)
    m.spent("invoice-budget", "invoice-large", 0.004)
    m.budget_left("invoice-budget", "day", 9.5)
    m.cache("invoice-triage/extract", hit=True)
    m.cache("invoice-triage/extract", hit=False)
    m.used_tokens("invoice-large", 120, 30)
    m.revision("invoice-triage", TABLE.revision)


def test_every_metric_is_exported_and_the_body_parses(metrics: Metrics) -> None:
    exercise(metrics)
    names = {s[0] for s in samples(metrics)}
    for name in EXPORTED:
        assert name in names or f"{name}_bucket" in names, name
    assert value(metrics, "pilothouse_requests_total", route="invoice-triage/extract", backend="invoice-large",
                 outcome="ok") == 1
    assert value(metrics, "pilothouse_fallbacks_total", **{"from": "invoice-small"}, to="invoice-large",
                 reason="timeout") == 1
    assert value(metrics, "pilothouse_circuit_state", backend="invoice-small") == 2
    assert value(metrics, "pilothouse_tokens_total", backend="invoice-large", kind="completion") == 30
    assert value(metrics, "pilothouse_table_revision", workflow="invoice-triage") == 4
    assert value(metrics, "pilothouse_budget_remaining_usd", policy="invoice-budget", window="day") == 9.5


def test_overhead_buckets_resolve_sub_millisecond(metrics: Metrics) -> None:
    metrics.observe_request("invoice-triage/extract", "invoice-small", "ok", 0.2, overhead_s=0.0004)
    assert value(metrics, "pilothouse_gateway_overhead_seconds_bucket", le="0.0005") == 1
    assert value(metrics, "pilothouse_gateway_overhead_seconds_bucket", le="0.001") == 1


def test_label_values_outside_the_routing_table_become_other(metrics: Metrics) -> None:
    for i in range(50):  # a client inventing models must not mint series
        metrics.observe_request(f"gpt-{i}", f"made-up-{i}", f"weird-{i}", 0.1)
        metrics.cache(f"gpt-{i}", hit=False)
        metrics.spent(f"policy-{i}", "invoice-small", 0.01)
        metrics.fallback("invoice-small", f"x-{i}", f"why-{i}")
    assert value(metrics, "pilothouse_requests_total", route=OTHER, backend=OTHER, outcome=OTHER) == 50
    assert value(metrics, "pilothouse_cache_misses_total", route=OTHER) == 50
    assert value(metrics, "pilothouse_spend_usd_total", policy=OTHER, backend="invoice-small") == pytest.approx(0.5)
    assert value(metrics, "pilothouse_fallbacks_total", **{"from": "invoice-small"}, to=OTHER, reason=OTHER) == 50
    label_values = {v for (_, labels) in samples(metrics) for k, v in labels if k != "le"}
    assert not any(v.startswith(("gpt-", "made-up-", "weird-", "policy-", "x-", "why-")) for v in label_values)


def test_a_request_refused_at_the_in_flight_limit_counts_as_overloaded_without_a_duration(metrics: Metrics) -> None:
    """An alert on refusals needs the count; a zero duration per refusal would make an overloaded replica look fast."""
    metrics.overloaded()
    metrics.overloaded()
    assert value(metrics, "pilothouse_requests_total", route=OTHER, backend=OTHER, outcome="overloaded") == 2
    assert value(metrics, "pilothouse_request_duration_seconds_count", route=OTHER) is None


def test_gauges_of_unknown_names_are_not_recorded(metrics: Metrics) -> None:
    metrics.circuit("not-in-table", BreakerState.OPEN)
    metrics.budget_left("someone-else", "day", 1.0)
    metrics.revision("another-workflow", 9)
    names = {name for name, _ in samples(metrics)}
    assert not names & {"pilothouse_circuit_state", "pilothouse_budget_remaining_usd", "pilothouse_table_revision"}


def test_a_new_table_refreshes_the_allow_list_and_drops_stale_gauges(metrics: Metrics) -> None:
    exercise(metrics)
    renamed = TABLE.model_copy(update={"revision": 5, "routes": [TABLE.routes[0].model_copy(
        update={"backends": [TABLE.routes[0].backends[1]]})]})
    metrics.allow_tables([renamed])
    assert value(metrics, "pilothouse_circuit_state", backend="invoice-small") is None  # left the table
    metrics.observe_request("invoice-triage/extract", "invoice-small", "ok", 0.1)
    assert value(metrics, "pilothouse_requests_total", route="invoice-triage/extract", backend=OTHER,
                 outcome="ok") == 1
    # counters are cumulative: what was counted before stays
    assert value(metrics, "pilothouse_tokens_total", backend="invoice-large", kind="prompt") == 120


def test_each_instance_has_its_own_registry() -> None:
    first, second = Metrics(), Metrics()
    first.allow(routes=["w/s"])
    first.cache("w/s", hit=True)
    assert value(first, "pilothouse_cache_hits_total", route="w/s") == 1
    assert value(second, "pilothouse_cache_hits_total", route="w/s") is None


def test_the_hot_path_families_expose_what_prometheus_clients_own_would() -> None:
    """LoopCounter / LoopHistogram against prometheus_client's Counter / Histogram fed the same values: the same
    samples, bucket edges included (a value equal to a bound counts in that bucket, one above all of them in +Inf)."""
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    bounds = (0.001, 0.01, 0.1)
    loop_hist = LoopHistogram("h_seconds", "h", ["route"], bounds, registry=ours)
    loop_count = LoopCounter("c", "c", ["route", "kind"], registry=ours)
    hist = Histogram("h_seconds", "h", ["route"], buckets=bounds, registry=theirs)
    count = Counter("c", "c", ["route", "kind"], registry=theirs)
    amounts = [0.0, 0.0005, 0.001, 0.0011, 0.01, 0.05, 0.1, 0.1000001, 3.0, 250.0]
    for i, amount in enumerate(amounts):
        route = "a" if i % 3 else "b"
        loop_hist.observe((route,), amount)
        hist.labels(route).observe(amount)
        loop_count.inc((route, "x"), amount)
        count.labels(route, "x").inc(amount)

    def exposed(registry: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        text = generate_latest(registry).decode()
        return {(s.name, tuple(sorted(s.labels.items()))): s.value for family in text_string_to_metric_families(text)
                for s in family.samples if not s.name.endswith("_created")}

    mine = exposed(ours)
    assert mine == pytest.approx(exposed(theirs))
    assert mine[("h_seconds_bucket", (("le", "0.001"), ("route", "a")))] == 2  # 0.0005 and 0.001 itself
    assert mine[("h_seconds_bucket", (("le", "+Inf"), ("route", "a")))] == 6
