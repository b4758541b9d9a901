"""A traced library-mode scenario, run in a process of its own by tests/test_tracing.py.

OpenTelemetry's tracer provider is global and set once per process, so the test runs this script
instead of switching tracing on for the rest of the suite. It records spans in memory, traces SQL
like the services do, runs a parent case (a step, a wait for an event, a child, a last step) on
Postgres and prints every finished span as a JSON line.

Usage: python -m tests.tracing_worker DATABASE_URL CASE_KEY
"""

from __future__ import annotations

import asyncio
import json
import sys

from opentelemetry import trace
from opentelemetry.instrumentation.asyncpg import AsyncPGInstrumentor
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from tianshu_core import Engine, WorkflowContext, WorkflowRegistry, WorkflowResult, connect_postgres

registry = WorkflowRegistry()


@registry.workflow("traced")
async def traced(ctx: WorkflowContext) -> WorkflowResult:
    await ctx.step("a", lambda: 1)
    await ctx.wait_for_event("order", ctx.case.case_key)
    child = await ctx.spawn_child("traced_child", {"n": 1})
    await ctx.await_children([child])
    await ctx.step("b", lambda: 2)
    return await ctx.finish("done")


@registry.workflow("traced_child")
async def traced_child(ctx: WorkflowContext) -> WorkflowResult:
    await ctx.step("c", lambda: 3)
    return await ctx.finish("done")


def _hex(value: int, width: int) -> str:
    return format(value, f"0{width}x")


def as_json(span: ReadableSpan) -> str:
    context = span.get_span_context()
    assert context is not None
    return json.dumps(
        {
            "name": span.name,
            "trace_id": _hex(context.trace_id, 32),
            "span_id": _hex(context.span_id, 16),
            "parent_id": _hex(span.parent.span_id, 16) if span.parent else None,
            "links": [
                [_hex(link.context.trace_id, 32), _hex(link.context.span_id, 16)] for link in span.links
            ],
            "attributes": {k: v for k, v in (span.attributes or {}).items() if isinstance(v, str | int)},
        }
    )


async def main(url: str, key: str) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    AsyncPGInstrumentor().instrument(tracer_provider=provider)  # type: ignore[no-untyped-call]
    app = trace.get_tracer("app")

    stores = await connect_postgres(url)
    try:
        engine = Engine(stores, registry)
        with app.start_as_current_span("client start"):
            await engine.run_workflow("traced", case_key=key)
        with app.start_as_current_span("client publish"):
            woke = await engine.publish_event("order", key, {"ok": True}, take=1)
            await engine.run_case(key, lease=woke.taken[0])
        await engine.run_until_idle(session_id=key)  # its child: the shared database has others
        assert (await engine.get_case(key)).execution_state.value == "finished"
    finally:
        await stores.close()
    provider.force_flush()
    for span in exporter.get_finished_spans():
        print(as_json(span), flush=True)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2]))
