"""OpenTelemetry: one tracer provider per process, and context propagation across the bus and gRPC.

The W3C `traceparent` travels in NATS headers (events) and gRPC metadata (calls), so the spans of
dataset, scheduler, trainer, evaluator and registry for one job share one trace id.

Exporters (LLMSTUDIO_OTEL_EXPORTER): `none`, `console`, `file:<path>` (one JSON object per span and
line, flushed as each span ends: what tests and `llmstudio demo` read), `otlp` (gRPC to
LLMSTUDIO_OTEL_ENDPOINT; needs opentelemetry-exporter-otlp, installed in the containers).
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Mapping, MutableMapping, Sequence

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SimpleSpanProcessor,
    SpanExporter,
    SpanExportResult,
)

_configured = False


class JsonLinesSpanExporter(SpanExporter):
    """Appends each finished span as one JSON line; safe across threads and processes (O_APPEND)."""

    def __init__(self, path: str):
        self.path = path
        self._lock = threading.Lock()
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        lines = "".join(json.dumps(span_record(s)) + "\n" for s in spans)
        with self._lock, open(self.path, "a", encoding="utf-8") as f:
            f.write(lines)
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        return None


def span_record(span: ReadableSpan) -> dict:
    ctx = span.get_span_context()
    assert ctx is not None, "a finished span has a context"
    return {
        "trace_id": format(ctx.trace_id, "032x"),
        "span_id": format(ctx.span_id, "016x"),
        "parent_span_id": format(span.parent.span_id, "016x") if span.parent else "",
        "name": span.name,
        "service": span.resource.attributes.get("service.name", ""),
        "start": span.start_time,
        "end": span.end_time,
        "attributes": {k: v for k, v in (span.attributes or {}).items()},
    }


def setup_tracing(service: str, exporter: str = "none", endpoint: str = "") -> trace.Tracer:
    """Install the process's tracer provider once; return a tracer for `service`."""
    global _configured
    if not _configured:
        provider = TracerProvider(resource=Resource.create({"service.name": service}))
        if exporter.startswith("file:"):
            # in batches from a background thread: a span per message exported on the spot
            # cost a busy scheduler ~7% of its time (bench/scheduler_load)
            provider.add_span_processor(BatchSpanProcessor(
                JsonLinesSpanExporter(exporter[5:]), schedule_delay_millis=200))
        elif exporter == "console":
            provider.add_span_processor(SimpleSpanProcessor(ConsoleSpanExporter()))
        elif exporter == "otlp":
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

            provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
        trace.set_tracer_provider(provider)
        _configured = True
    return trace.get_tracer(service)


def shutdown_tracing() -> None:
    provider = trace.get_tracer_provider()
    if hasattr(provider, "shutdown"):
        provider.shutdown()


def inject(carrier: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """Headers carrying the current trace context (traceparent, tracestate)."""
    carrier = dict(carrier or {})
    propagate.inject(carrier)
    return carrier


def extract(carrier: Mapping[str, str] | None) -> otel_context.Context:
    return propagate.extract(dict(carrier or {}))


def current_trace_id() -> str:
    ctx = trace.get_current_span().get_span_context()
    return format(ctx.trace_id, "032x") if ctx.is_valid else ""


def traceparent() -> str:
    return inject().get("traceparent", "")
