"""The workflow of workload B2, loaded by the scheduler the benchmark starts."""

from __future__ import annotations

from tianshu_core import WorkflowContext, WorkflowRegistry, WorkflowResult

registry = WorkflowRegistry()


def _noop() -> int:
    return 1


@registry.workflow("b2")
async def b2(ctx: WorkflowContext) -> WorkflowResult:
    """Wait for an event on ("b2", resource), then one durable step: the step the benchmark times."""
    await ctx.wait_for_event("b2", ctx.case.resource_data["resource"])
    await ctx.step("after", _noop)
    return await ctx.finish("done")
