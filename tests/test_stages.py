"""Stage transitions (the seed's run_stages): Next with cleared stages, Waiting, Finish."""

from __future__ import annotations

from tests._backends import Backend
from tianshu_core import (
    DuplicateStepError,
    ExecutionState,
    Next,
    PollPredicate,
    StageOutcome,
    WorkflowContext,
    WorkflowRegistry,
    WorkflowResult,
)


async def test_stages_loop_back_with_cleared_steps_and_wait(backend: Backend) -> None:
    reg = WorkflowRegistry()
    drafts: list[int] = []

    async def draft(ctx: WorkflowContext) -> StageOutcome:
        await ctx.step("write", lambda: drafts.append(1))
        return Next("review")

    async def review(ctx: WorkflowContext) -> StageOutcome:
        pred = PollPredicate(resource_type="review", resource_id=ctx.case.case_key, step_name="verdict")
        verdict = await ctx.poll(pred)
        if verdict is None:
            return ctx.waiting(pred)
        if verdict == "redo":
            return Next("draft", clear_stages=["draft", "review"])
        return await ctx.finish("published", output=len(drafts))

    @reg.workflow("editorial")
    async def editorial(ctx: WorkflowContext) -> WorkflowResult:
        return await ctx.run_stages("draft", {"draft": draft, "review": review})

    engine = backend.engine(reg)
    case = await engine.run_workflow("editorial")
    assert case.execution_state is ExecutionState.WAITING
    await engine.publish_event("review", case.case_key, "redo")
    await engine.run_until_idle()
    assert drafts == [1, 1]
    assert (await engine.get_case(case.case_key)).execution_state is ExecutionState.WAITING
    backend.clock.advance(1)
    await engine.publish_event("review", case.case_key, "ok")
    await engine.run_until_idle()
    done = await engine.get_case(case.case_key)
    assert (done.finished_type, done.output, drafts) == ("published", 2, [1, 1])
    names = [e.name for e in await engine.history(case.case_key) if e.kind == "step"]
    assert names == ["draft/write", "draft/write"]


async def test_duplicate_step_name_is_an_error_unless_cleared(backend: Backend) -> None:
    reg = WorkflowRegistry()

    @reg.workflow("dup")
    async def dup(ctx: WorkflowContext) -> WorkflowResult:
        await ctx.step("a", lambda: 1)
        await ctx.step("a", lambda: 2)
        return await ctx.finish("done")

    @reg.workflow("cleared")
    async def cleared(ctx: WorkflowContext) -> WorkflowResult:
        first = await ctx.step("a", lambda: 1)
        await ctx.clear_steps(["a"])
        second = await ctx.step("a", lambda: 2)
        return await ctx.finish("done", output=[first, second])

    engine = backend.engine(reg)
    failed = await engine.run_workflow("dup")
    assert failed.execution_state is ExecutionState.FAILED
    assert failed.error is not None and failed.error.type == DuplicateStepError.__name__
    assert "'a'" in failed.error.message
    ok = await engine.run_workflow("cleared")
    assert ok.output == [1, 2]
