"""A remote model call parks its case (`LlmCallPending`) and its answer, published as an event,
wakes it: the interface the LLM gateway's client plugs into, in library mode."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from tianshu_contracts.llm import LlmMessage, LlmRequest, LlmResponse, LlmStreamEvent
from tianshu_core import Engine, ExecutionState, ToolRegistry, WorkflowContext, WorkflowRegistry
from tianshu_core.clock import ManualClock
from tianshu_core.llm import LLM_RESULT_RESOURCE, LlmCallPending, LlmInvocation, events_of
from tianshu_core.stores.memory import memory_stores

REQUEST = LlmRequest(model="remote", messages=[LlmMessage.user("hi")])


class RemoteLlm:
    """Sends the call elsewhere and never answers in time: what the gateway client does past its
    hot window. Records every invocation it was given."""

    def __init__(self) -> None:
        self.invocations: list[LlmInvocation | None] = []

    async def complete(self, request: LlmRequest, *, invocation: LlmInvocation | None = None) -> LlmResponse:
        self.invocations.append(invocation)
        raise LlmCallPending(60.0)

    async def stream(
        self, request: LlmRequest, *, invocation: LlmInvocation | None = None
    ) -> AsyncIterator[LlmStreamEvent]:
        for event in events_of(await self.complete(request, invocation=invocation)):
            yield event


def engine_with(llm: Any) -> tuple[Engine, ManualClock]:
    registry = WorkflowRegistry()

    @registry.workflow("remote")
    async def remote(ctx: WorkflowContext) -> Any:
        return await ctx.finish("done", output=await ctx.tool_step("agent", ToolRegistry([]), REQUEST))

    clock = ManualClock()
    return Engine(memory_stores(clock), registry, clock=clock, llm=llm), clock


async def test_a_pending_model_call_parks_the_case_and_its_answer_wakes_it() -> None:
    llm = RemoteLlm()
    engine, _clock = engine_with(llm)
    case = await engine.start_case("remote", {})
    await engine.run_case(case.case_key)
    waiting = await engine.get_case(case.case_key)
    assert waiting.execution_state is ExecutionState.WAITING
    (invocation,) = llm.invocations
    assert invocation == LlmInvocation.of(case.case_key, "agent/r1/llm")

    answer = LlmResponse.text("answered remotely")
    published = await engine.publish_event(
        LLM_RESULT_RESOURCE, invocation.call_id, answer.model_dump(mode="json"), event_id=invocation.call_id
    )
    assert case.case_key in published.woken
    await engine.run_case(case.case_key)
    done = await engine.get_case(case.case_key)
    assert done.output == "answered remotely"
    assert len(llm.invocations) == 1  # the replay took the answer; the model was not asked again


async def test_a_remote_error_reaches_the_workflow_as_llm_error() -> None:
    llm = RemoteLlm()
    engine, _clock = engine_with(llm)
    case = await engine.start_case("remote", {})
    await engine.run_case(case.case_key)
    (invocation,) = llm.invocations
    assert invocation is not None
    error = {
        "error": {"type": "LlmError", "message": "gateway: every provider failed", "code": "unavailable"}
    }
    await engine.publish_event(LLM_RESULT_RESOURCE, invocation.call_id, error)
    await engine.run_case(case.case_key)
    failed = await engine.get_case(case.case_key)
    assert failed.execution_state is ExecutionState.FAILED and failed.error is not None
    assert failed.error.type == "LlmError" and "every provider failed" in failed.error.message


async def test_no_answer_before_the_deadline_is_an_unavailable_error() -> None:
    llm = RemoteLlm()
    engine, clock = engine_with(llm)
    case = await engine.start_case("remote", {})
    await engine.run_case(case.case_key)
    clock.advance(61)
    assert case.case_key in await engine.fire_due_timers()
    await engine.run_case(case.case_key)
    failed = await engine.get_case(case.case_key)
    assert failed.execution_state is ExecutionState.FAILED and failed.error is not None
    assert "no answer arrived before the deadline" in failed.error.message
    assert len(llm.invocations) == 1


@pytest.mark.parametrize("form", ["new", "old"])
async def test_tool_step_takes_the_engine_model_or_one_passed_either_way(form: str) -> None:
    from tianshu_core import ScriptedLlm

    registry = WorkflowRegistry()
    own = ScriptedLlm(["from the workflow's own model"])

    @registry.workflow("which")
    async def which(ctx: WorkflowContext) -> Any:
        if form == "old":
            text = await ctx.tool_step("agent", own, ToolRegistry([]), REQUEST)
        else:
            text = await ctx.tool_step("agent", ToolRegistry([]), REQUEST, llm=own)
        return await ctx.finish("done", output=text)

    engine = Engine(memory_stores(), registry, llm=ScriptedLlm(["from the engine's model"]))
    case = await engine.start_case("which", {})
    await engine.run_case(case.case_key)
    assert (await engine.get_case(case.case_key)).output == "from the workflow's own model"


async def test_without_a_model_ctx_llm_says_how_to_give_one() -> None:
    registry = WorkflowRegistry()

    @registry.workflow("none")
    async def none(ctx: WorkflowContext) -> Any:
        return await ctx.finish("done", output=await ctx.tool_step("agent", ToolRegistry([]), REQUEST))

    engine = Engine(memory_stores(), registry)
    case = await engine.start_case("none", {})
    await engine.run_case(case.case_key)
    failed = await engine.get_case(case.case_key)
    assert failed.error is not None and "Engine(llm=...)" in failed.error.message


class RemoteWithAttempts(RemoteLlm):
    """A remote provider that re-sends a call whose deadline passed (the gateway client)."""

    max_attempts = 2


async def test_past_the_deadline_the_same_call_is_sent_again_then_it_is_unavailable() -> None:
    llm = RemoteWithAttempts()
    engine, clock = engine_with(llm)
    case = await engine.start_case("remote", {})
    await engine.run_case(case.case_key)
    clock.advance(61)
    await engine.fire_due_timers()
    await engine.run_case(case.case_key)  # attempt 2 is sent, and parks again
    assert [i.attempt for i in llm.invocations if i] == [1, 2]
    assert len({i.call_id for i in llm.invocations if i}) == 1  # the same call id
    assert (await engine.get_case(case.case_key)).execution_state is ExecutionState.WAITING
    clock.advance(61)
    await engine.fire_due_timers()
    await engine.run_case(case.case_key)
    failed = await engine.get_case(case.case_key)
    assert failed.execution_state is ExecutionState.FAILED and failed.error is not None
    assert "no answer arrived before the deadline (2 attempts)" in failed.error.message
    assert len(llm.invocations) == 2


async def test_an_answer_to_the_first_attempt_is_taken_after_a_resend() -> None:
    llm = RemoteWithAttempts()
    engine, clock = engine_with(llm)
    case = await engine.start_case("remote", {})
    await engine.run_case(case.case_key)
    clock.advance(61)
    await engine.fire_due_timers()
    await engine.run_case(case.case_key)
    (first, _second) = llm.invocations
    assert first is not None
    # The first attempt's answer arrives late (the gateway was back): it is the call's answer.
    await engine.publish_event(
        LLM_RESULT_RESOURCE, first.call_id, LlmResponse.text("late but fine").model_dump(mode="json")
    )
    await engine.run_case(case.case_key)
    assert (await engine.get_case(case.case_key)).output == "late but fine"
    assert len(llm.invocations) == 2
