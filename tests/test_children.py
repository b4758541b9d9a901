"""Children: spawned once, replay-safe, the parent waits as a row (the seed's Children entries)."""

from __future__ import annotations

from tests._backends import Backend
from tianshu_core import (
    CaseFilter,
    Continue,
    ExecutionState,
    SpawnConfig,
    WorkflowContext,
    WorkflowRegistry,
    WorkflowResult,
)


def registry(n_children: int) -> WorkflowRegistry:
    reg = WorkflowRegistry()

    @reg.workflow("analyze")
    async def analyze(ctx: WorkflowContext) -> WorkflowResult:
        chunk = ctx.case.resource_data["chunk"]
        if chunk == "bad":
            raise ValueError("cannot analyze")
        return await ctx.finish("done", output=chunk.upper())

    @reg.workflow("parent")
    async def parent(ctx: WorkflowContext) -> WorkflowResult:
        handles = await ctx.spawn_children(
            [SpawnConfig("analyze", {"chunk": f"c{i}"}) for i in range(n_children)]
        )
        outcomes = await ctx.await_children(handles)
        return await ctx.finish("done", output=[o.output for o in outcomes])

    return reg


async def test_child_is_created_with_parent_key_and_data(backend: Backend) -> None:
    reg = registry(1)
    engine = backend.engine(reg)
    parent = await engine.run_workflow("parent", session_id="fam")
    assert parent.execution_state is ExecutionState.WAITING
    assert len(parent.child_keys) == 1
    child = await engine.get_case(parent.child_keys[0])
    assert (child.parent_key, child.session_id, child.resource_data) == (
        parent.case_key,
        "fam",
        {"chunk": "c0"},
    )


async def test_three_children_three_keys_then_all_done(backend: Backend) -> None:
    engine = backend.engine(registry(3))
    parent = await engine.run_workflow("parent")
    assert len(set(parent.child_keys)) == 3
    assert (await engine.get_case(parent.case_key)).execution_state is ExecutionState.WAITING
    await engine.run_until_idle()
    done = await engine.get_case(parent.case_key)
    assert (done.execution_state, done.output) == (ExecutionState.FINISHED, ["C0", "C1", "C2"])


async def test_fan_out_twenty_children(backend: Backend) -> None:
    engine = backend.engine(registry(20))
    parent = await engine.run_workflow("parent")
    await engine.run_until_idle()
    done = await engine.get_case(parent.case_key)
    assert done.output == [f"C{i}" for i in range(20)]
    assert await backend.stores.cases.count(CaseFilter(parent_key=parent.case_key)) == 20


async def test_spawn_is_replay_safe(backend: Backend) -> None:
    reg = WorkflowRegistry()

    @reg.workflow("leaf")
    async def leaf(ctx: WorkflowContext) -> WorkflowResult:
        return await ctx.finish("done")

    @reg.workflow("replaying")
    async def replaying(ctx: WorkflowContext) -> WorkflowResult:
        await ctx.spawn_child("leaf", {"n": 1})
        await ctx.spawn_child("leaf", {"n": 2})
        if ctx.get_state("rounds", 0) < 3:
            await ctx.set_state("rounds", ctx.get_state("rounds", 0) + 1)
            return Continue()
        return await ctx.finish("done")

    engine = backend.engine(reg)
    parent = await engine.run_workflow("replaying")
    await engine.run_until_idle()
    assert await backend.stores.cases.count(CaseFilter(parent_key=parent.case_key)) == 2
    assert len((await engine.get_case(parent.case_key)).child_keys) == 2


async def test_await_reports_pending_then_failed_and_missing_children(backend: Backend) -> None:
    reg = WorkflowRegistry()

    @reg.workflow("analyze")
    async def analyze(ctx: WorkflowContext) -> WorkflowResult:
        if ctx.case.resource_data == "bad":
            raise ValueError("cannot analyze")
        return await ctx.finish("done")

    @reg.workflow("mixed")
    async def mixed(ctx: WorkflowContext) -> WorkflowResult:
        good = await ctx.spawn_child("analyze", "good")
        bad = await ctx.spawn_child("analyze", "bad")
        gone = await ctx.spawn_child("analyze", "good")
        if ctx.get_state("purged") is None:
            await ctx.set_state("purged", True)
            await ctx.step("purge", lambda: None)
        outcomes = await ctx.await_children([good, bad, gone])
        return await ctx.finish("done", output=[(o.state.value, o.error) for o in outcomes])

    engine = backend.engine(reg)
    parent = await engine.run_workflow("mixed")
    await engine.purge(parent.child_keys[2])
    await engine.run_until_idle()
    done = await engine.get_case(parent.case_key)
    assert done.output[0] == ["finished", None]
    assert done.output[1][0] == "failed" and "cannot analyze" in done.output[1][1]
    assert done.output[2] == ["failed", "child case not found"]
