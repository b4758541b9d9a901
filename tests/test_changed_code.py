"""Code changed under a case in flight: a replay checks what each record is before trusting it.

Each test runs a case with the workflow code of one release until it waits, then "deploys" the
next release (a new engine on the same stores, another function under the same workflow code)
and lets the case go on.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from tests._backends import Backend
from tianshu_core import (
    Case,
    ExecutionState,
    NonDeterminismError,
    WorkflowContext,
    WorkflowRegistry,
    WorkflowResult,
)

Use = Callable[[WorkflowContext], Awaitable[Any]]


async def a_step(ctx: WorkflowContext) -> Any:
    return await ctx.step("x", lambda: "stepped")


async def an_event_wait(ctx: WorkflowContext) -> Any:
    return await ctx.wait_for_event("ping", ctx.case.case_key, name="x")


async def a_timer(ctx: WorkflowContext) -> Any:
    await ctx.sleep(0, name="x")


async def a_child(ctx: WorkflowContext) -> Any:
    return await ctx.spawn_child("leaf", name="x")


async def a_children_wait(ctx: WorkflowContext) -> Any:
    kid = await ctx.spawn_child("leaf", name="kid")
    return await ctx.await_children([kid], name="x")


# Every kind of record a name can hold, by the words the error uses for it.
USES: dict[str, Use] = {
    "a step": a_step,
    "an event wait": an_event_wait,
    "a timer": a_timer,
    "a child": a_child,
    "a children wait": a_children_wait,
}


def release(use_x: Use, after: Use | None = None) -> WorkflowRegistry:
    """Workflow `changing`: use the name `x`, wait for the event `go`, then run `after`."""
    reg = WorkflowRegistry()

    @reg.workflow("leaf")
    async def leaf(ctx: WorkflowContext) -> WorkflowResult:
        return await ctx.finish("done")

    @reg.workflow("changing")
    async def changing(ctx: WorkflowContext) -> WorkflowResult:
        x = await use_x(ctx)
        await ctx.wait_for_event("go", ctx.case.case_key, name="go")
        output = await after(ctx) if after is not None else None
        return await ctx.finish("done", output={"x": x, "after": output})

    return reg


async def in_flight(backend: Backend, reg: WorkflowRegistry) -> str:
    """A case of `reg` that has recorded `x` and now waits for `go`."""
    engine = backend.engine(reg)
    case = await engine.run_workflow("changing")
    await engine.publish_event("ping", case.case_key, "pinged")
    await engine.run_until_idle()
    assert (await engine.get_case(case.case_key)).execution_state is ExecutionState.WAITING
    assert any(e.name == "x" for e in await engine.history(case.case_key))
    return case.case_key


async def deploy(backend: Backend, reg: WorkflowRegistry, key: str) -> Case:
    """Run the case with the code of `reg` until nothing is left to do."""
    engine = backend.engine(reg)
    await engine.publish_event("go", key, "go")
    await engine.run_until_idle()
    return await engine.get_case(key)


def recorded_x(history: list[Any]) -> list[tuple[str, str]]:
    return [(e.kind, e.data) for e in history if e.name == "x"]


@pytest.mark.parametrize(
    ("recorded", "asked"), [(r, a) for r in USES for a in USES if r != a], ids=lambda s: s.replace(" ", "-")
)
async def test_a_name_reused_by_another_kind_fails_the_case(
    backend: Backend, recorded: str, asked: str
) -> None:
    key = await in_flight(backend, release(USES[recorded]))
    before = recorded_x(await backend.stores.journal.load(key))

    case = await deploy(backend, release(USES[asked]), key)

    assert case.execution_state is ExecutionState.FAILED
    assert case.error is not None
    assert (case.error.type, case.error.code) == ("NonDeterminismError", "non_determinism")
    assert f"recorded 'x' as {recorded}, but the workflow now asks for {asked}" in case.error.message
    assert recorded_x(await backend.stores.journal.load(key)) == before  # nothing rewritten


@pytest.mark.parametrize("kind", list(USES), ids=lambda s: s.replace(" ", "-"))
async def test_the_same_kind_under_the_same_name_replays(backend: Backend, kind: str) -> None:
    key = await in_flight(backend, release(USES[kind]))
    case = await deploy(backend, release(USES[kind]), key)
    assert case.execution_state is ExecutionState.FINISHED, case.error


async def test_safe_changes_carry_a_case_on(backend: Backend) -> None:
    """A step's body changed, a step added after the last recorded one: the recorded result
    stands, the new step runs."""
    runs: list[str] = []

    def body(result: str) -> str:
        runs.append(result)
        return result

    async def old_x(ctx: WorkflowContext) -> Any:
        return await ctx.step("x", lambda: body("old body"))

    async def new_x(ctx: WorkflowContext) -> Any:
        return await ctx.step("x", lambda: body("new body"))

    async def added(ctx: WorkflowContext) -> Any:
        return await ctx.step("added", lambda: body("added"))

    key = await in_flight(backend, release(old_x))
    case = await deploy(backend, release(new_x, after=added), key)
    assert case.execution_state is ExecutionState.FINISHED, case.error
    assert case.output == {"x": "old body", "after": "added"}
    assert runs == ["old body", "added"]


async def test_a_wait_moved_to_another_resource_fails_the_case(backend: Backend) -> None:
    async def elsewhere(ctx: WorkflowContext) -> Any:
        return await ctx.wait_for_event("pong", ctx.case.case_key, name="x")

    key = await in_flight(backend, release(an_event_wait))
    case = await deploy(backend, release(elsewhere), key)
    assert case.error is not None and case.execution_state is ExecutionState.FAILED
    assert (
        f"recorded 'x' as an event wait on ping/{key}, but the workflow now asks for an event wait "
        f"on pong/{key}"
    ) in case.error.message


async def test_a_child_of_another_workflow_fails_the_case(backend: Backend) -> None:
    async def other_child(ctx: WorkflowContext) -> Any:
        return await ctx.spawn_child("changing", name="x")

    key = await in_flight(backend, release(a_child))
    case = await deploy(backend, release(other_child), key)
    assert case.error is not None and case.execution_state is ExecutionState.FAILED
    assert "as a child of workflow 'leaf', but the workflow now asks for a child of workflow 'changing'" in (
        case.error.message
    )


async def test_awaiting_other_children_fails_the_case(backend: Backend) -> None:
    async def more_children(ctx: WorkflowContext) -> Any:
        kids = [await ctx.spawn_child("leaf", name=n) for n in ("kid", "kid2")]
        return await ctx.await_children(kids, name="x")

    key = await in_flight(backend, release(a_children_wait))
    case = await deploy(backend, release(more_children), key)
    assert case.error is not None and case.execution_state is ExecutionState.FAILED
    assert "as a children wait on 1 children, but the workflow now asks for a children wait on 2" in (
        case.error.message
    )


async def test_a_workflow_that_catches_the_error_still_fails(backend: Backend) -> None:
    async def swallowing(ctx: WorkflowContext) -> Any:
        try:
            return await ctx.wait_for_event("ping", ctx.case.case_key, name="x")
        except NonDeterminismError:
            return "carried on"

    key = await in_flight(backend, release(a_step))
    case = await deploy(backend, release(swallowing), key)
    assert case.execution_state is ExecutionState.FAILED
    assert case.error is not None and case.error.type == "NonDeterminismError"
    assert case.output is None
