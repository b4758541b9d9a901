"""A bad value fails its case once, with a clear error; it never loops.

Every place a workflow (or its caller) puts a value refuses one that no store can keep, where the
value is made, naming the place and what is wrong: in library mode with the in-memory store
exactly as with Postgres (whose jsonb refuses a NUL, which used to leave the case running, picked
up again every second, its journal growing).
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import pytest
from pydantic import BaseModel

from tests._backends import Backend
from tianshu_core import (
    ExecutionState,
    RetryPolicy,
    UnstorableValueError,
    WorkflowContext,
    WorkflowRegistry,
    WorkflowResult,
)


class Reading(BaseModel):
    value: float


@dataclass
class Point:
    x: float


# Values no store can keep, and the reason the error gives (with where in the value it is).
BAD = [
    pytest.param({"text": "a\x00b"}, r"a NUL character .* at \$\.text$", id="nul"),
    pytest.param({"k": {"a\x00": 1}}, r"a NUL character .* in a key at \$\.k$", id="nul-in-key"),
    pytest.param({"x": [1.0, float("nan")]}, r"nan at \$\.x\[1\]", id="nan"),
    pytest.param({"x": float("-inf")}, r"-inf at \$\.x", id="infinity"),
    pytest.param({"r": [Reading(value=float("nan"))]}, r"nan at \$\.r\[0\]\.value", id="nan-in-a-model"),
    pytest.param({"p": Point(x=float("inf"))}, r"inf at \$\.p\.x", id="infinity-in-a-dataclass"),
    pytest.param({"n": [2**64]}, r"an integer beyond 64 bits at \$\.n\[0\]$", id="int-over-64-bits"),
    pytest.param({"s": "a\udc00"}, r"a lone surrogate in a string at \$\.s$", id="lone-surrogate"),
    pytest.param({"\ud800": 1}, r"a lone surrogate in a key at \$$", id="lone-surrogate-in-key"),
    pytest.param({1: "x"}, r"a key of type int at \$", id="non-string-key"),
    pytest.param({"blob": b"raw"}, r".*bytes", id="not-json"),
]

Put = Callable[[WorkflowContext, Any], Awaitable[Any]]

# Where a workflow puts a value, and how the error names it.
PLACES: dict[str, tuple[Put, str]] = {
    "step": (lambda ctx, v: ctx.step("bad", lambda: v), "the result of step 'bad'"),
    "state": (lambda ctx, v: ctx.set_state("bad", v), "state 'bad'"),
    "session-state": (lambda ctx, v: ctx.set_session_state("bad", v), "session state 'bad'"),
    "finish": (lambda ctx, v: ctx.finish("done", output=v), "the output of the case"),
    "child": (lambda ctx, v: ctx.spawn_child("noop", v, name="bad"), "the input of child 'bad'"),
}


def registry(put: Put, value: Any, caught: list[UnstorableValueError]) -> WorkflowRegistry:
    reg = WorkflowRegistry()

    @reg.workflow("put")
    async def put_it(ctx: WorkflowContext) -> WorkflowResult:
        await ctx.step("ok", lambda: 1)
        try:
            await put(ctx, value)
        except UnstorableValueError as exc:
            caught.append(exc)  # raised in the workflow, where the value was made
            raise
        return await ctx.finish("done")

    @reg.workflow("noop")
    async def noop(ctx: WorkflowContext) -> WorkflowResult:
        return await ctx.finish("done")

    return reg


async def assert_failed_once(backend: Backend, case_key: str, names: list[str]) -> str:
    """The case failed with UnstorableValueError, its journal holds `names`, and running the
    engine again changes nothing (nothing picks the case up again); the error's message."""
    engine = backend.engine(WorkflowRegistry())
    case = await engine.get_case(case_key)
    assert case.execution_state is ExecutionState.FAILED, case
    assert case.error is not None and case.error.type == "UnstorableValueError", case.error
    assert [e.name for e in await engine.history(case_key)] == names
    await engine.run_until_idle(session_id=case.session_id, max_ticks=3)
    assert (await engine.get_case(case_key)).execution_state is ExecutionState.FAILED
    assert [e.name for e in await engine.history(case_key)] == names
    return case.error.message


@pytest.mark.parametrize("place", list(PLACES))
@pytest.mark.parametrize(("value", "reason"), BAD)
async def test_a_value_no_store_can_keep_fails_its_step_once_naming_it(
    backend: Backend, place: str, value: Any, reason: str
) -> None:
    put, what = PLACES[place]
    caught: list[UnstorableValueError] = []
    engine = backend.engine(registry(put, value, caught))
    case = await engine.run_workflow("put")
    message = await assert_failed_once(backend, case.case_key, ["ok"])
    assert re.match(re.escape(what) + " cannot be stored: " + reason, message), message
    assert len(caught) == 1 and str(caught[0]) == message
    # Nothing of the refused value was stored anywhere.
    assert await backend.stores.state.get_all(case.case_key) == []
    assert await backend.stores.state.get_all_session(case.session_id) == []
    assert await backend.stores.cases.get_by_key(f"{case.case_key}.bad") is None
    assert case.child_keys == []


NAMES: dict[str, tuple[Put, str]] = {
    "step": (lambda ctx, name: ctx.step(name, lambda: 1), "the name"),
    "state": (lambda ctx, name: ctx.set_state(name, 1), "the name of state"),
    "session-state": (lambda ctx, name: ctx.set_session_state(name, 1), "the name of session state"),
    "wait": (lambda ctx, name: ctx.wait_for_event("order", name, name="w"), "the resource id"),
    "finish": (lambda ctx, name: ctx.finish(name), "the finished type"),
}


@pytest.mark.parametrize("place", list(NAMES))
@pytest.mark.parametrize(
    ("name", "reason"),
    [
        pytest.param("a\x00b", "it holds a NUL character", id="nul"),
        pytest.param("a\udc00b", "it holds a lone surrogate", id="lone-surrogate"),
    ],
)
async def test_a_name_no_store_can_keep_fails_its_step_once(
    backend: Backend, place: str, name: str, reason: str
) -> None:
    put, what = NAMES[place]
    engine = backend.engine(registry(put, name, []))
    case = await engine.run_workflow("put")
    message = await assert_failed_once(backend, case.case_key, ["ok"])
    assert message.startswith(what) and reason in message, message


@pytest.mark.parametrize(("value", "reason"), BAD)
async def test_a_case_input_or_event_payload_no_store_can_keep_is_refused_before_it_is_stored(
    backend: Backend, value: Any, reason: str
) -> None:
    engine = backend.engine(registry(PLACES["step"][0], 1, []))
    key = f"bad-input-{uuid.uuid4().hex[:8]}"
    with pytest.raises(UnstorableValueError) as refused:
        await engine.start_case("put", value, case_key=key)
    assert re.match("the case input cannot be stored: " + reason, str(refused.value)), refused.value
    with pytest.raises(UnstorableValueError):
        await engine.run_workflow("put", value, case_key=key)
    assert await backend.stores.cases.get_by_key(key) is None

    resource = f"r-{uuid.uuid4().hex[:8]}"
    with pytest.raises(UnstorableValueError) as refused:
        await engine.publish_event("order", resource, value)
    assert re.match("the payload of an event on order cannot be stored: " + reason, str(refused.value)), (
        refused.value
    )
    since = engine.clock.now() - timedelta(days=1)
    assert await backend.stores.events.next_after("order", resource, after_seq=0, not_before=since) is None


async def test_a_workflow_can_catch_the_refusal_like_any_error(backend: Backend) -> None:
    reg = WorkflowRegistry()

    @reg.workflow("careful")
    async def careful(ctx: WorkflowContext) -> WorkflowResult:
        try:
            await ctx.step("raw", lambda: {"text": "a\x00b"})
        except UnstorableValueError as exc:
            text = await ctx.step("clean", lambda: {"text": "ab"})
            return await ctx.finish("cleaned", str(exc), output=text)
        return await ctx.finish("raw")

    case = await backend.engine(reg).run_workflow("careful")
    assert case.execution_state is ExecutionState.FINISHED and case.output == {"text": "ab"}
    assert case.finished_description is not None
    assert case.finished_description.startswith("the result of step 'raw' cannot be stored")


async def test_a_retry_policy_retries_a_step_whose_result_cannot_be_stored(backend: Backend) -> None:
    """The result is checked inside the attempt: a body whose output varies (a model's reply,
    say) gets another try under the step's policy, as for any error."""
    results = iter([{"text": "a\x00b"}, {"text": "ab"}])
    attempts: list[int] = []
    reg = WorkflowRegistry()

    def body() -> Any:
        attempts.append(1)
        return next(results)

    @reg.workflow("retrying")
    async def retrying(ctx: WorkflowContext) -> WorkflowResult:
        policy = RetryPolicy(max_attempts=3, base_delay=0, jitter=0)
        return await ctx.finish("done", output=await ctx.step_with_retry("fetch", policy, body))

    case = await backend.engine(reg).run_workflow("retrying")
    assert case.execution_state is ExecutionState.FINISHED and case.output == {"text": "ab"}
    assert len(attempts) == 2
