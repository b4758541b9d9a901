"""Log records written during a run name their case and trace (the services' log format)."""

from __future__ import annotations

import logging

import pytest
from opentelemetry.sdk.trace import TracerProvider

from tests._backends import Backend
from tianshu_core import WorkflowContext, WorkflowRegistry, WorkflowResult
from tianshu_core.logs import FORMAT, ContextFilter

log = logging.getLogger("tests.workflow")


async def test_records_carry_the_case_key_and_trace_id(
    backend: Backend, caplog: pytest.LogCaptureFixture
) -> None:
    reg = WorkflowRegistry()

    @reg.workflow("logs")
    async def logs(ctx: WorkflowContext) -> WorkflowResult:
        log.warning("inside the run")
        return await ctx.finish("done")

    caplog.handler.addFilter(ContextFilter())
    caplog.handler.setFormatter(logging.Formatter(FORMAT))
    tracer = TracerProvider().get_tracer("test")
    with tracer.start_as_current_span("outer") as span:
        case = await backend.engine(reg).run_workflow("logs")
        trace_id = format(span.get_span_context().trace_id, "032x")
    log.warning("outside any run")
    inside, outside = (r for r in caplog.records if r.name == "tests.workflow")
    assert (inside.case_key, inside.trace_id) == (case.case_key, trace_id)  # type: ignore[attr-defined]
    assert (outside.case_key, outside.trace_id) == ("-", "-")  # type: ignore[attr-defined]
    assert f"[case={case.case_key} trace={trace_id}]" in caplog.text
