"""OpenTelemetry tracing for the request path: one span per request, one child span per backend attempt.

``configure(endpoint)`` installs an OTLP/HTTP exporter behind a ``BatchSpanProcessor`` (``endpoint`` is the
collector's base URL, as in ``OTEL_EXPORTER_OTLP_ENDPOINT``; ``/v1/traces`` is appended). Without an
endpoint the gateway keeps a no-op tracer: ``enabled()`` is False and the request path creates no span,
extracts no header and builds no attribute. The tracer provider is this module's own, never the global
one, so the gateway does not fight an embedding process (Ray, tests) over ``trace.set_tracer_provider``.

Tests install an exporter directly: ``configure(exporter=InMemorySpanExporter())`` (a ``SimpleSpanProcessor``,
spans visible as soon as they end) and ``configure(None)`` to go back to the no-op tracer.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

log = logging.getLogger(__name__)

SERVICE_NAME = "pilothouse-gateway"
ENDPOINT_ENV = "OTEL_EXPORTER_OTLP_ENDPOINT"
_NOOP = trace.NoOpTracer()
_PROPAGATOR = TraceContextTextMapPropagator()

_tracer: trace.Tracer = _NOOP
_provider: Any = None  # the SDK TracerProvider when configured


def traces_url(endpoint: str) -> str:
    """The OTLP/HTTP traces URL for a collector base URL (left as is when it already names the path)."""
    endpoint = endpoint.rstrip("/")
    return endpoint if endpoint.endswith("/v1/traces") else f"{endpoint}/v1/traces"


def configure(endpoint: str | None = None, *, exporter: Any = None) -> trace.Tracer:
    """Install the tracer the request path uses; neither ``endpoint`` nor ``exporter``: the no-op tracer."""
    global _tracer, _provider
    shutdown()
    if endpoint is None and exporter is None:
        _tracer, _provider = _NOOP, None
        return _tracer
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor

    provider = TracerProvider(resource=Resource.create({"service.name": SERVICE_NAME}))
    if exporter is not None:
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    else:
        assert endpoint is not None
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=traces_url(endpoint))))
        log.info("exporting traces to %s", traces_url(endpoint))
    _provider = provider
    _tracer = provider.get_tracer("pilothouse.serving")
    return _tracer


def shutdown() -> None:
    """Flush and stop the configured provider (if any); the tracer stays as it is until ``configure``."""
    provider = _provider
    if provider is not None:
        try:
            provider.shutdown()
        except Exception:
            log.exception("shutting down the tracer provider failed")


def flush() -> None:
    if _provider is not None:
        _provider.force_flush()


def enabled() -> bool:
    return _tracer is not _NOOP


def tracer() -> trace.Tracer:
    return _tracer


def extract(headers: Mapping[str, str]) -> Context:
    """The caller's context from its W3C ``traceparent`` / ``tracestate`` headers (empty when absent or bad)."""
    return _PROPAGATOR.extract(carrier=headers)
