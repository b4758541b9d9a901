"""The workflows of workload B6, loaded by the scheduler the benchmark starts."""

from __future__ import annotations

from tianshu_core import SpawnConfig, WorkflowContext, WorkflowRegistry, WorkflowResult

registry = WorkflowRegistry()


def _noop() -> int:
    return 1


@registry.workflow("b6_child")
async def b6_child(ctx: WorkflowContext) -> WorkflowResult:
    """One no-op durable step."""
    await ctx.step("work", _noop)
    return await ctx.finish("done")


@registry.workflow("b6_parent")
async def b6_parent(ctx: WorkflowContext) -> WorkflowResult:
    """Spawn `children` children, await them all, then one step: the commit the benchmark sees."""
    n = int(ctx.case.resource_data["children"])
    handles = await ctx.spawn_children([SpawnConfig("b6_child", name=f"c{i}") for i in range(n)])
    await ctx.await_children(handles)
    await ctx.step("b6_done", _noop)
    return await ctx.finish("done")
