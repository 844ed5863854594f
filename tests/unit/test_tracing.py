"""Request spans (GenAI semantic conventions + ``pilothouse.*``) through the gateway app, against the fake backends.

An ``InMemorySpanExporter`` is installed through ``tracing.configure(exporter=...)``, which uses the module's own
provider, never the global one; the fixture puts the no-op tracer back after each test.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from pilothouse.serving import tracing

from .test_gateway_requests import chat, fakes, gateway, make_table, rule

__all__ = ["fakes"]  # the fixture, re-exported so pytest finds it here


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    tracing.configure(exporter=exporter)
    try:
        yield exporter
    finally:
        tracing.configure(None)
    assert not tracing.enabled()


def request_span(exporter: InMemorySpanExporter) -> Any:
    found = [s for s in exporter.get_finished_spans() if s.kind is SpanKind.SERVER]
    assert len(found) == 1, [s.name for s in exporter.get_finished_spans()]
    return found[0]


def attempts(exporter: InMemorySpanExporter) -> list[Any]:
    return [s for s in exporter.get_finished_spans() if s.kind is SpanKind.CLIENT]


async def test_chat_span_carries_genai_and_pilothouse_attributes(tmp_path: Path, fakes: Any,
                                                                 spans: InMemorySpanExporter) -> None:
    primary, fallback = fakes
    async with gateway(tmp_path, make_table(primary, fallback, budget=rule(10.0))) as gw:
        r = await gw.post(chat(temperature=0.5))
        assert r.status_code == 200, r.text
        record = gw.audit(r)
    span = request_span(spans)
    a = span.attributes
    assert span.name == "chat wf/extract" and span.status.status_code is not StatusCode.ERROR
    assert a["gen_ai.operation.name"] == "chat" and a["gen_ai.request.model"] == "wf/extract"
    assert a["gen_ai.provider.name"] == "openai" and a["gen_ai.response.model"] == "org/small"
    assert a["gen_ai.request.max_tokens"] == 8 and a["gen_ai.request.temperature"] == 0.5
    assert a["gen_ai.usage.input_tokens"] == 2 and a["gen_ai.usage.output_tokens"] == 8
    assert a["pilothouse.route"] == "wf/extract" and a["pilothouse.backend"] == "small"
    assert a["pilothouse.fallback_count"] == 0 and a["pilothouse.cache_hit"] is False
    assert a["pilothouse.budget.policy"] == "team"
    assert a["pilothouse.budget.reserved_usd"] > 0 and a["pilothouse.budget.committed_usd"] > 0
    assert a["pilothouse.table_revision"] == record.routing.table_revision
    assert record.trace_id == format(span.context.trace_id, "032x") and span.parent is None
    [attempt] = attempts(spans)
    assert attempt.parent.span_id == span.context.span_id and attempt.attributes["pilothouse.backend"] == "small"


async def test_fallback_gives_two_attempt_spans_the_first_with_error_type(tmp_path: Path, fakes: Any,
                                                                         spans: InMemorySpanExporter) -> None:
    primary, fallback = fakes
    async with gateway(tmp_path, make_table(primary, fallback)) as gw:
        primary.fail_with(503)
        r = await gw.post(chat())
        assert r.status_code == 200 and r.json()["model"] == "org/large"
    span = request_span(spans)
    first, second = sorted(attempts(spans), key=lambda s: s.start_time)
    assert first.attributes["pilothouse.backend"] == "small" and first.attributes["error.type"] == "server"
    assert first.status.status_code is StatusCode.ERROR
    assert second.attributes["pilothouse.backend"] == "large" and "error.type" not in second.attributes
    assert span.attributes["pilothouse.fallback_count"] == 1 and span.attributes["pilothouse.backend"] == "large"
    assert span.attributes["gen_ai.response.model"] == "org/large"


async def test_failed_request_span_has_error_status(tmp_path: Path, fakes: Any, spans: InMemorySpanExporter) -> None:
    primary, fallback = fakes
    async with gateway(tmp_path, make_table(primary, fallback)) as gw:
        primary.fail_with(503)
        fallback.fail_with(503)
        r = await gw.post({"model": "wf/extract", "prompt": "hi", "max_tokens": 4}, "/v1/completions")
        assert r.status_code == 502
    span = request_span(spans)
    assert span.name == "text_completion wf/extract" and span.status.status_code is StatusCode.ERROR
    assert span.attributes["error.type"] == "server" and len(attempts(spans)) == 2


async def test_incoming_traceparent_is_joined_and_audited(tmp_path: Path, fakes: Any,
                                                          spans: InMemorySpanExporter) -> None:
    primary, fallback = fakes
    traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    async with gateway(tmp_path, make_table(primary, fallback)) as gw:
        r = await gw.post(chat(stream=True), headers={"traceparent": traceparent})
        assert r.status_code == 200 and "[DONE]" in r.text
        record = gw.audit(r)
    span = request_span(spans)
    assert format(span.context.trace_id, "032x") == "0af7651916cd43dd8448eb211c80319c"
    assert record.trace_id == "0af7651916cd43dd8448eb211c80319c"
    assert span.parent is not None and format(span.parent.span_id, "016x") == "b7ad6b7169203331"
    assert span.attributes["gen_ai.usage.output_tokens"] == record.usage.completion_tokens


async def test_no_tracer_no_span_but_trace_id_still_kept(tmp_path: Path, fakes: Any) -> None:
    assert not tracing.enabled()
    primary, fallback = fakes
    async with gateway(tmp_path, make_table(primary, fallback)) as gw:
        r = await gw.post(chat(), headers={"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"})
        assert gw.audit(r).trace_id == "0af7651916cd43dd8448eb211c80319c"


def test_traces_url() -> None:
    assert tracing.traces_url("http://collector:4318/") == "http://collector:4318/v1/traces"
    assert tracing.traces_url("http://c:4318/v1/traces") == "http://c:4318/v1/traces"
