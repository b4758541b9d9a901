"""OpenTelemetry: spans that cost next to nothing when tracing is off, one trace per case, and
the set-up the services run at start (`configure_tracing`).

Tracing is configured with OpenTelemetry's standard environment variables, so a service sends its
spans to Jaeger (or any OTLP collector) with `OTEL_EXPORTER_OTLP_ENDPOINT=http://jaeger:4318`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Awaitable, Callable
from typing import TypeVar

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Link, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from opentelemetry.util.types import Attributes

T = TypeVar("T")
tracer = trace.get_tracer("tianshu")
log = logging.getLogger(__name__)
_W3C = TraceContextTextMapPropagator()


def current_traceparent() -> str | None:
    """The W3C `traceparent` of the current span; None when there is none (tracing off)."""
    if not trace.get_current_span().get_span_context().is_valid:
        return None
    carrier: dict[str, str] = {}
    _W3C.inject(carrier)
    return carrier.get("traceparent")


def trace_id_of(traceparent: str | None) -> str | None:
    """The trace id (32 hex digits) of a W3C `traceparent`; None for None or a malformed one."""
    if traceparent is None:
        return None
    parts = traceparent.split("-")
    if len(parts) != 4 or len(parts[1]) != 32:
        return None
    return parts[1]


async def in_span(
    name: str, attributes: Attributes, fn: Callable[[], Awaitable[T]], *, parent: str | None = None
) -> T:
    """Await `fn()` inside a span named `name`, current for anything it calls (SQL, publishes).

    `parent`: a W3C `traceparent` (a case's `trace_parent`) to put the span in that trace, with a
    link to the span that is current here (what triggered this: a start, an event, a timer).

    With no tracer provider configured the span does not record, and we skip making it current:
    the step hot path then pays for one no-op span, not for context switching.
    """
    if parent is None:
        span = tracer.start_span(name, attributes=attributes)
    else:
        here = trace.get_current_span().get_span_context()
        span = tracer.start_span(
            name,
            context=_W3C.extract({"traceparent": parent}),
            attributes=attributes,
            links=[Link(here)] if here.is_valid else None,
        )
    if not span.is_recording():
        return await fn()
    token = otel_context.attach(trace.set_span_in_context(span))
    try:
        return await fn()
    except Exception as exc:
        span.record_exception(exc)
        span.set_status(Status(StatusCode.ERROR, str(exc)))
        raise
    finally:
        otel_context.detach(token)
        span.end()


def _exporter_choice() -> str:
    chosen = os.environ.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if chosen:
        return chosen
    endpoint = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or os.environ.get(
        "OTEL_EXPORTER_OTLP_ENDPOINT"
    )
    return "otlp" if endpoint else "none"


def configure_tracing(service_name: str) -> Callable[[], None]:
    """Install a tracer provider for a service, from OpenTelemetry's environment variables, and
    trace its SQL; returns the function to call at exit (it flushes the spans still buffered; a
    second call does nothing).

    - `OTEL_TRACES_EXPORTER`: `otlp` (OTLP over HTTP/protobuf, the collector's port 4318),
      `console` (spans printed to stdout), or `none`. Default: `otlp` when
      `OTEL_EXPORTER_OTLP_ENDPOINT` or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` is set, else `none`:
      a service started with nothing set traces nothing and pays nothing.
    - `OTEL_SERVICE_NAME` (default `service_name`), `OTEL_RESOURCE_ATTRIBUTES`,
      `OTEL_TRACES_SAMPLER`, `OTEL_EXPORTER_OTLP_HEADERS`, the `OTEL_BSP_*` batching settings and
      `OTEL_SDK_DISABLED=true` work as OpenTelemetry documents them.

    A tracer provider the application installed itself is kept as it is.
    """
    if os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return lambda: None
    if not isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider):
        log.info("tracing: keeping the tracer provider already installed")
        return lambda: None
    choice = _exporter_choice()
    if choice == "none":
        return lambda: None

    from opentelemetry.instrumentation.asyncpg import AsyncPGInstrumentor
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter

    exporter: SpanExporter
    if choice == "otlp":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        exporter = OTLPSpanExporter()
    elif choice == "console":
        exporter = ConsoleSpanExporter()
    else:
        raise ValueError(f"OTEL_TRACES_EXPORTER={choice!r}: this service knows otlp, console and none")
    name = os.environ.get("OTEL_SERVICE_NAME") or service_name
    provider = TracerProvider(resource=Resource.create({SERVICE_NAME: name}))
    provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    instrumentor = AsyncPGInstrumentor()  # type: ignore[no-untyped-call]
    instrumentor.instrument(tracer_provider=provider)
    log.info("tracing: %s spans as service %r", choice, name)

    done = False

    def shutdown() -> None:
        nonlocal done
        if not done:
            done = True
            instrumentor.uninstrument()
            provider.shutdown()

    return shutdown
