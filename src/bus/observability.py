"""Logs, metrics and traces, wired the same way in every service.

- structlog JSON lines carrying service, correlation id, trace id and span id;
- prometheus-client metrics (one default registry, labelled by service or queue);
- OpenTelemetry tracing, W3C trace context propagated through HTTP and AMQP headers,
  exported over OTLP when ``OTEL_EXPORTER_OTLP_ENDPOINT`` is set.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
from collections.abc import Mapping, MutableMapping
from typing import Any

import structlog
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ParentBased
from prometheus_client import Counter, Gauge, Histogram

tracer = trace.get_tracer("microshop.bus")
_ids = RandomIdGenerator()
_TRACE_KEYS = ("traceparent", "tracestate")

MESSAGES_PUBLISHED = Counter(
    "microshop_messages_published_total", "Messages confirmed by the broker", ["source", "type"]
)
MESSAGES_CONSUMED = Counter(
    "microshop_messages_consumed_total", "Messages handled and acked", ["queue", "type"]
)
MESSAGES_RETRIED = Counter(
    "microshop_messages_retried_total", "Handler failures sent back for a retry", ["queue", "type"]
)
MESSAGES_DEAD_LETTERED = Counter(
    "microshop_messages_dead_lettered_total",
    "Messages sent to the dead-letter queue",
    ["queue", "type", "cause"],
)
HANDLER_SECONDS = Histogram(
    "microshop_handler_duration_seconds",
    "Time spent in a message handler",
    ["queue", "type"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)
EVENTS_UNHEARD = Counter(
    "microshop_events_unheard_total",
    "Events published while no queue was bound to their type",
    ["service", "type"],
)
OUTBOX_BACKLOG = Gauge("microshop_outbox_backlog", "Outbox rows not yet published", ["service"])
OUTBOX_PUBLISHED = Counter(
    "microshop_outbox_published_total", "Outbox rows published and confirmed", ["service"]
)
UNITS_PER_TRANSACTION = Histogram(
    "microshop_units_per_transaction",
    "Units of work (a message handled, an order placed) one transaction committed together",
    ["source"],
    buckets=(1, 2, 4, 8, 16, 32, 64),
)
HTTP_REQUESTS = Counter(
    "microshop_http_requests_total",
    "HTTP requests served",
    ["service", "method", "route", "status"],
)
HTTP_SECONDS = Histogram(
    "microshop_http_request_duration_seconds",
    "HTTP request latency",
    ["service", "method", "route"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)


def _add_trace_ids(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    span = trace.get_current_span().get_span_context()
    if span.is_valid:
        event["trace_id"] = format(span.trace_id, "032x")
        event["span_id"] = format(span.span_id, "016x")
    return event


def configure_logging(service: str, *, level: str = "INFO", json: bool = True) -> None:
    """Send structlog events to stderr, one JSON object a line (or pretty for a console)."""
    renderer: Any = structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer()
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            _add_trace_ids,
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        # look sys.stderr up per logger, not once: tests and tools swap it
        logger_factory=lambda *_: structlog.PrintLogger(sys.stderr),
        cache_logger_on_first_use=False,
    )
    structlog.contextvars.bind_contextvars(service=service)


def configure_tracing(service: str, version: str = "0.1.0") -> None:
    """Install a tracer provider once per process.

    With ``OTEL_EXPORTER_OTLP_ENDPOINT`` set, spans are recorded and exported over OTLP
    (sampling as ``OTEL_TRACES_SAMPLER`` says; by default every trace). Without it, trace
    and span ids are still made and propagated, so logs of one flow share a trace id
    across services, but no span is recorded: nothing would read it, and recording
    costs about 10 us a message. A provider installed before (by a test with an in-memory
    exporter, or by another service sharing this process in the demo) is kept.
    """
    global _spans_recorded
    if isinstance(trace.get_tracer_provider(), TracerProvider):
        return
    resource = Resource.create({"service.name": service, "service.version": version})
    if os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        provider = TracerProvider(resource=resource)
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    else:
        provider = TracerProvider(resource=resource, sampler=ParentBased(ALWAYS_OFF))
        _spans_recorded = False
    trace.set_tracer_provider(provider)


_spans_recorded = True


def spans_recorded() -> bool:
    """False once :func:`configure_tracing` has installed the provider that records nothing.

    The bus's hot paths then pass trace context along without making spans for it: a
    message carries on the trace it was written in, and its handler runs in that context,
    so logs and outgoing messages keep the trace id at a fraction of the cost.
    """
    return _spans_recorded


@functools.cache
def child(metric: Any, *labels: str) -> Any:
    """``metric.labels(*labels)``, looked up once: hot paths skip the registry's lock."""
    return metric.labels(*labels)


def inject_trace(
    carrier: dict[str, Any], context: otel_context.Context | None = None
) -> dict[str, Any]:
    """Write a W3C trace context (``traceparent``, ``tracestate``) into ``carrier``.

    The current one, unless ``context`` is given.
    """
    propagate.inject(carrier, context=context)
    return carrier


def extract_trace(carrier: Mapping[str, Any]) -> otel_context.Context:
    """Read a W3C trace context from headers into an OpenTelemetry context."""
    # only the two W3C keys: copying every header costs more than the parse itself
    return propagate.extract(
        {key: carrier[key] for key in _TRACE_KEYS if isinstance(carrier.get(key), str)}
    )


def new_trace_context() -> otel_context.Context:
    """A context with a fresh, unsampled trace: ids for logs and propagation, no span."""
    span = trace.NonRecordingSpan(
        trace.SpanContext(_ids.generate_trace_id(), _ids.generate_span_id(), is_remote=False)
    )
    return trace.set_span_in_context(span)


def current_traceparent() -> tuple[str | None, str | None]:
    """The current span's ``traceparent`` and ``tracestate``, for an envelope being written."""
    carrier = inject_trace({})
    return carrier.get("traceparent"), carrier.get("tracestate")
