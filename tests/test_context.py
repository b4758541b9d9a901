"""WorkflowContext: steps, retries, state, finish and the journal (the seed's Context entries)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from pydantic import BaseModel

from tests._backends import Backend
from tianshu_core import (
    Continue,
    ExecutionState,
    FatalStepError,
    Finished,
    RetryPolicy,
    RunStatus,
    WorkflowContext,
    WorkflowRegistry,
    WorkflowResult,
)


class Title(BaseModel):
    text: str
    words: int


async def test_step_runs_once_and_replays_stored_result(backend: Backend) -> None:
    reg = WorkflowRegistry()
    calls: list[str] = []

    def record(name: str, value: int) -> int:
        calls.append(name)
        return value

    @reg.workflow("twice")
    async def twice(ctx: WorkflowContext) -> WorkflowResult:
        a = await ctx.step("a", lambda: record("a", 41))
        b = await ctx.step("b", lambda: record("b", a + 1))
        if ctx.get_state("round", 0) == 0:
            await ctx.set_state("round", 1)
            return Continue()
        return await ctx.finish("done", output={"a": a, "b": b})

    engine = backend.engine(reg)
    case = await engine.run_workflow("twice")
    assert case.execution_state is ExecutionState.RUNNING
    await engine.run_until_idle()
    done = await engine.get_case(case.case_key)
    assert done.execution_state is ExecutionState.FINISHED
    assert done.output == {"a": 41, "b": 42}
    assert calls == ["a", "b"]


async def test_step_returning_none_is_not_rerun(backend: Backend) -> None:
    reg = WorkflowRegistry()
    calls: list[int] = []

    @reg.workflow("none")
    async def none_wf(ctx: WorkflowContext) -> WorkflowResult:
        await ctx.step("nothing", lambda: calls.append(1))
        if ctx.get_state("again") is None:
            await ctx.set_state("again", True)
            return Continue()
        return await ctx.finish("done")

    engine = backend.engine(reg)
    await engine.run_workflow("none")
    await engine.run_until_idle()
    assert calls == [1]


async def test_async_step_and_pydantic_result_on_both_paths(backend: Backend) -> None:
    reg = WorkflowRegistry()
    seen: list[Any] = []

    async def make_title() -> Title:
        return Title(text="Buy GPUs", words=2)

    @reg.workflow("typed")
    async def typed(ctx: WorkflowContext) -> WorkflowResult:
        title = await ctx.step("title", make_title, returns=Title)
        raw = await ctx.step("raw", make_title)
        seen.append((title, raw))
        if ctx.get_state("n") is None:
            await ctx.set_state("n", 1)
            return Continue()
        return await ctx.finish("done", output=title)

    engine = backend.engine(reg)
    await engine.run_workflow("typed")
    await engine.run_until_idle()
    assert seen[0] == seen[1]
    assert seen[0][0] == Title(text="Buy GPUs", words=2)
    assert seen[0][1] == {"text": "Buy GPUs", "words": 2}


async def test_state_and_steps_do_not_collide(backend: Backend) -> None:
    reg = WorkflowRegistry()

    @reg.workflow("collide")
    async def collide(ctx: WorkflowContext) -> WorkflowResult:
        await ctx.set_state("x", "state value")
        step = await ctx.step("state_x", lambda: "step value")
        step2 = await ctx.step("x", lambda: "another step")
        return await ctx.finish("done", output=[ctx.get_state("x"), step, step2])

    engine = backend.engine(reg)
    case = await engine.run_workflow("collide")
    assert case.output == ["state value", "step value", "another step"]
    entry = await backend.stores.state.get(case.case_key, "x")
    assert entry is not None and entry.data == "state value"


async def test_session_state_is_shared_by_the_cases_of_a_session(backend: Backend) -> None:
    reg = WorkflowRegistry()

    @reg.workflow("writer")
    async def writer(ctx: WorkflowContext) -> WorkflowResult:
        await ctx.set_session_state("shared_counter", 42)
        return await ctx.finish("done")

    @reg.workflow("reader")
    async def reader(ctx: WorkflowContext) -> WorkflowResult:
        value = await ctx.get_session_state("shared_counter", 0)
        return await ctx.finish("done", output=value)

    engine = backend.engine(reg)
    await engine.open_session("s-shared", {"user": "alice"})
    await engine.run_workflow("writer", session_id="s-shared")
    same = await engine.run_workflow("reader", session_id="s-shared")
    other = await engine.run_workflow("reader", session_id="s-other")
    assert (same.output, other.output) == (42, 0)


async def test_finish_persists_outcome_and_keeps_history(backend: Backend) -> None:
    reg = WorkflowRegistry()

    @reg.workflow("fin")
    async def fin(ctx: WorkflowContext) -> WorkflowResult:
        await ctx.step("s1", lambda: 1)
        await ctx.set_state("note", "kept")
        return await ctx.finish("approved", "all good", output={"k": [1, 2]})

    engine = backend.engine(reg)
    case = await engine.run_workflow("fin")
    stored = await engine.get_case(case.case_key)
    assert (stored.finished_type, stored.finished_description, stored.output) == (
        "approved",
        "all good",
        {"k": [1, 2]},
    )
    history = await engine.history(case.case_key)
    assert [(e.kind, e.name) for e in history] == [("step", "s1"), ("state", "note")]
    assert [e.seq for e in history] == [1, 2]


async def test_finished_result_without_ctx_finish_is_stored(backend: Backend) -> None:
    reg = WorkflowRegistry()

    @reg.workflow("plain")
    async def plain(ctx: WorkflowContext) -> WorkflowResult:
        return Finished("ok", "returned directly", output=7)

    case = await backend.engine(reg).run_workflow("plain")
    assert (case.execution_state, case.finished_type, case.output) == (ExecutionState.FINISHED, "ok", 7)


async def test_history_marks_replayed_steps(backend: Backend) -> None:
    reg = WorkflowRegistry()

    @reg.workflow("rep")
    async def rep(ctx: WorkflowContext) -> WorkflowResult:
        await ctx.step("first", lambda: 1)
        if ctx.get_state("k") is None:
            await ctx.set_state("k", 1)
            return Continue()
        await ctx.step("second", lambda: 2)
        return await ctx.finish("done")

    engine = backend.engine(reg)
    case = await engine.run_workflow("rep")
    report = await engine.run_case(case.case_key)
    assert report.status is RunStatus.FINISHED
    assert (report.replayed, report.executed) == (["first"], ["second"])
    history = await engine.history(case.case_key)
    assert [e.kind for e in history] == ["step", "state", "step", "replay"]
    assert json.loads(history[-1].data) == {"replayed": 1, "executed": 1}


async def test_an_old_case_stores_and_reads_no_more_per_wake_than_a_young_one(backend: Backend) -> None:
    """Each run that replays records counts, not the names it replayed: a case woken W times with
    S steps stores W small records, not W*S names. Taking the case (acquire, or the wake's take)
    reads the records a run replays, and of the replay records only the journal's last row."""
    reg = WorkflowRegistry()
    wakes, steps = 6, 5

    def noop() -> int:
        return 1

    @reg.workflow("old")
    async def old(ctx: WorkflowContext) -> WorkflowResult:
        for i in range(steps):
            await ctx.step(f"s{i}", noop)
        for w in range(wakes):
            await ctx.wait_for_event("tick", ctx.case.case_key, name=f"w{w}")
        return await ctx.finish("done")

    engine = backend.engine(reg)
    case = await engine.run_workflow("old")
    key = case.case_key
    for w in range(wakes):
        published = await engine.publish_event("tick", key, w, take=1)
        (lease,) = published.taken
        taken = [e.kind for e in lease.journal or await backend.stores.journal.load(key)]
        if backend.name == "postgres":  # the replay records of earlier runs stay behind
            assert taken.count("replay") == (1 if taken[-1] == "replay" else 0)
        report = await engine.run_case(key, lease=lease)
        assert report.status is (RunStatus.FINISHED if w == wakes - 1 else RunStatus.WAITING)
    history = await engine.history(key)
    replays = [json.loads(e.data) for e in history if e.kind == "replay"]
    # Each run replays the steps and the events consumed before it, and consumes one event.
    assert replays == [{"replayed": steps + w, "executed": 1} for w in range(wakes)]
    if backend.name == "postgres":
        inspected = await backend.stores.leases.acquire(key, "inspector", 30)
        assert inspected is not None and inspected.journal is not None
        assert [e.kind for e in inspected.journal].count("replay") == 1  # the last row: the next seq
        assert inspected.journal[-1].seq == history[-1].seq
        assert len(inspected.journal) == steps + wakes + 1


# -- step_with_retry (the seed's retry entries) --------------------------------------------------

FAST = RetryPolicy(max_attempts=4, base_delay=0.001, max_delay=0.005, jitter=0.001)


async def _run_retry(backend: Backend, fn: Any, policy: RetryPolicy = FAST) -> Any:
    reg = WorkflowRegistry()

    @reg.workflow("retry")
    async def retry(ctx: WorkflowContext) -> WorkflowResult:
        value = await ctx.step_with_retry("flaky", policy, fn)
        return await ctx.finish("done", output=value)

    return await backend.engine(reg).run_workflow("retry")


async def test_retry_first_try_success(backend: Backend) -> None:
    attempts: list[int] = []

    def once() -> str:
        attempts.append(1)
        return "ok"

    case = await _run_retry(backend, once)
    assert (case.output, len(attempts)) == ("ok", 1)


async def test_retry_transient_then_success(backend: Backend) -> None:
    attempts: list[int] = []

    async def flaky() -> str:
        attempts.append(1)
        if len(attempts) < 3:
            raise ConnectionError("upstream reset")
        return "ok"

    case = await _run_retry(backend, flaky)
    assert (case.output, len(attempts)) == ("ok", 3)


async def test_retry_fatal_stops_at_once(backend: Backend) -> None:
    attempts: list[int] = []

    def fatal() -> str:
        attempts.append(1)
        raise FatalStepError("card declined")

    case = await _run_retry(backend, fatal)
    assert len(attempts) == 1
    assert case.execution_state is ExecutionState.FAILED
    assert case.error is not None and case.error.type == "FatalStepError"


async def test_retry_gives_up_after_max_attempts(backend: Backend) -> None:
    attempts: list[int] = []

    def always() -> str:
        attempts.append(1)
        raise TimeoutError("still down")

    case = await _run_retry(backend, always)
    assert len(attempts) == FAST.max_attempts
    assert case.execution_state is ExecutionState.FAILED
    assert case.error is not None and "still down" in case.error.message


async def test_retry_classifier_decides() -> None:
    from tianshu_core import ErrorClass

    policy = RetryPolicy(
        max_attempts=5,
        base_delay=0,
        max_delay=0,
        jitter=0,
        classify=lambda e: ErrorClass.FATAL if isinstance(e, PermissionError) else ErrorClass.TRANSIENT,
    )
    calls: list[int] = []

    async def denied() -> None:
        calls.append(1)
        raise PermissionError("401")

    with pytest.raises(PermissionError):
        await policy.call("denied", denied)
    assert calls == [1]


def test_retry_backoff_is_exponential_and_capped() -> None:
    from tenacity import RetryCallState

    policy = RetryPolicy(max_attempts=10, base_delay=0.1, max_delay=0.5, backoff_factor=2.0, jitter=0.0)
    wait = policy.retrying("x").wait
    delays = []
    for n in range(1, 6):
        state = RetryCallState(policy.retrying("x"), None, (), {})
        state.attempt_number = n
        delays.append(round(wait(state), 3))
    assert delays == [0.1, 0.2, 0.4, 0.5, 0.5]
