"""OpenTelemetry helpers: spans that cost next to nothing when no tracer provider is set."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeVar

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Status, StatusCode
from opentelemetry.util.types import Attributes

T = TypeVar("T")
tracer = trace.get_tracer("tianshu")


async def in_span(name: str, attributes: Attributes, fn: Callable[[], Awaitable[T]]) -> T:
    """Await `fn()` inside a span named `name`, current for anything it calls (SQL, publishes).

    With no tracer provider configured the span does not record, and we skip making it current:
    the step hot path then pays for one no-op span, not for context switching.
    """
    span = tracer.start_span(name, attributes=attributes)
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
