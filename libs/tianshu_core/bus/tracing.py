"""W3C trace context in NATS headers, and the producer and consumer spans around messages."""

from __future__ import annotations

from collections.abc import Mapping

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.trace import SpanKind, Tracer
from opentelemetry.util.types import AttributeValue

from tianshu_contracts.catalog import template_of

_tracer = trace.get_tracer("tianshu.bus")


def default_tracer() -> Tracer:
    """The bus's tracer from the global provider (a no-op until one is configured)."""
    return _tracer


def inject(headers: dict[str, str] | None = None) -> dict[str, str]:
    """`headers` plus `traceparent` (and `tracestate`) of the current context; a new dict."""
    carrier = dict(headers or {})
    propagate.inject(carrier)
    return carrier


def extract(headers: Mapping[str, str] | None) -> otel_context.Context:
    """The trace context a message's headers carry (an empty context when they carry none)."""
    return propagate.extract(dict(headers or {}))


def start_producer_span(
    tracer: Tracer, subject: str, attributes: Mapping[str, AttributeValue] | None = None
) -> trace.Span:
    """A PRODUCER span named after the subject's channel (`send tianshu.v1.events.{…}.{…}`)."""
    attrs: dict[str, AttributeValue] = {
        "messaging.system": "nats",
        "messaging.operation.type": "send",
        "messaging.destination.name": subject,
        "messaging.destination.template": template_of(subject),
    }
    attrs.update(attributes or {})
    return tracer.start_span(f"send {template_of(subject)}", kind=SpanKind.PRODUCER, attributes=attrs)


def start_consumer_span(
    tracer: Tracer,
    subject: str,
    headers: Mapping[str, str] | None,
    attributes: Mapping[str, AttributeValue] | None = None,
) -> trace.Span:
    """A CONSUMER span, child of the trace in the message's headers (a new trace when there is none)."""
    parent = extract(headers)
    attrs: dict[str, AttributeValue] = {
        "messaging.system": "nats",
        "messaging.operation.type": "process",
        "messaging.destination.name": subject,
        "messaging.destination.template": template_of(subject),
    }
    attrs.update(attributes or {})
    return tracer.start_span(
        f"process {template_of(subject)}", context=parent, kind=SpanKind.CONSUMER, attributes=attrs
    )
