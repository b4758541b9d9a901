"""The library-mode tick and the heart (the seed's Scheduler entries, plus leases and fencing)."""

from __future__ import annotations

import asyncio
import contextlib

from tests._backends import Backend
from tianshu_core import (
    Case,
    Engine,
    EngineConfig,
    ExecutionMode,
    ExecutionState,
    LeaseLostError,
    ManualClock,
    RunStatus,
    TickOutcome,
    WorkflowContext,
    WorkflowRegistry,
    WorkflowResult,
    memory_stores,
)


def counting_registry(calls: list[str]) -> WorkflowRegistry:
    reg = WorkflowRegistry()

    @reg.workflow("count")
    async def count(ctx: WorkflowContext) -> WorkflowResult:
        await ctx.step("s", lambda: calls.append(ctx.case.case_key))
        return await ctx.finish("done")

    @reg.workflow("boom")
    async def boom(ctx: WorkflowContext) -> WorkflowResult:
        raise RuntimeError("kaput")

    return reg


async def test_empty_store_is_idle(backend: Backend) -> None:
    engine = backend.engine(WorkflowRegistry())
    assert await engine.tick(session_id="nobody") is TickOutcome.IDLE


async def test_finished_paused_and_stopped_cases_are_not_run(backend: Backend) -> None:
    calls: list[str] = []
    engine = backend.engine(counting_registry(calls))
    paused = await engine.start_case("count", session_id="life")
    stopped = await engine.start_case("count", session_id="life")
    await engine.pause(paused.case_key)
    await engine.cancel(stopped.case_key)
    assert await engine.tick(session_id="life") is TickOutcome.IDLE
    assert calls == []
    assert (await engine.run_case(paused.case_key)).status is RunStatus.SKIPPED
    await engine.resume(paused.case_key)
    await engine.run_until_idle(session_id="life")
    assert calls == [paused.case_key]
    assert (await engine.run_case(paused.case_key)).status is RunStatus.SKIPPED
    assert calls == [paused.case_key]


async def test_unknown_workflow_code_fails_the_case_visibly(backend: Backend) -> None:
    engine = backend.engine(WorkflowRegistry())
    case = await engine.start_case("nope", session_id="unknown")
    await engine.run_until_idle(session_id="unknown")
    failed = await engine.get_case(case.case_key)
    assert failed.execution_state is ExecutionState.FAILED
    assert failed.error is not None and failed.error.code == "unknown_workflow"
    assert "nope" in failed.error.message


async def test_failing_case_is_marked_failed_with_traceback_and_others_go_on(backend: Backend) -> None:
    calls: list[str] = []
    engine = backend.engine(counting_registry(calls), execution_mode=ExecutionMode.PARALLEL)
    bad = await engine.start_case("boom", session_id="par")
    good = [await engine.start_case("count", session_id="par") for _ in range(3)]
    await engine.run_until_idle(session_id="par")
    assert sorted(calls) == sorted(c.case_key for c in good)
    failed = await engine.get_case(bad.case_key)
    assert failed.execution_state is ExecutionState.FAILED
    assert failed.error is not None
    assert (failed.error.type, failed.error.message) == ("RuntimeError", "kaput")
    assert failed.error.traceback is not None and "kaput" in failed.error.traceback


async def test_parallel_mode_runs_cases_concurrently(backend: Backend) -> None:
    reg = WorkflowRegistry()
    inside = 0
    peak = 0
    all_in = asyncio.Event()

    @reg.workflow("slow")
    async def slow(ctx: WorkflowContext) -> WorkflowResult:
        nonlocal inside, peak

        async def work() -> int:
            nonlocal inside, peak
            inside += 1
            peak = max(peak, inside)
            if inside == 4:
                all_in.set()
            # Stay until all four are in (run one at a time, they never are: then peak stays 1).
            # A fixed 50 ms here failed once on a loaded machine, where opening the pool's
            # connections for the other cases took longer than that.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(all_in.wait(), 5)
            inside -= 1
            return 1

        await ctx.step("work", work)
        return await ctx.finish("done")

    engine = backend.engine(reg, execution_mode=ExecutionMode.PARALLEL)
    for _ in range(4):
        await engine.start_case("slow", session_id="conc")
    await engine.run_until_idle(session_id="conc")
    assert peak == 4


async def test_shutdown_is_honoured(backend: Backend) -> None:
    calls: list[str] = []
    engine = backend.engine(counting_registry(calls))
    await engine.start_case("count", session_id="shut")
    engine.request_shutdown()
    assert await engine.tick(session_id="shut") is TickOutcome.SHUTDOWN_REQUESTED
    assert calls == []


async def test_probe_is_opt_in_and_replays_waiting_cases(backend: Backend) -> None:
    reg = WorkflowRegistry()
    runs: list[int] = []

    @reg.workflow("probe")
    async def probe(ctx: WorkflowContext) -> WorkflowResult:
        runs.append(1)
        return ctx.waiting()

    engine = backend.engine(reg)
    await engine.start_case("probe", session_id="probe")
    await engine.run_until_idle(session_id="probe")
    await engine.run_until_idle(session_id="probe")
    assert len(runs) == 1
    engine.config.probe_waiting = True
    await engine.tick(session_id="probe")
    assert len(runs) == 2


async def test_a_held_lease_keeps_others_out(backend: Backend) -> None:
    calls: list[str] = []
    engine = backend.engine(counting_registry(calls))
    case = await engine.start_case("count")
    lease = await backend.stores.leases.acquire(case.case_key, "someone-else", 30)
    assert lease is not None
    assert (await engine.run_case(case.case_key)).status is RunStatus.SKIPPED
    await backend.stores.leases.release(lease)
    assert (await engine.run_case(case.case_key)).status is RunStatus.FINISHED
    assert calls == [case.case_key]


async def test_stale_holder_writes_are_refused_and_history_stays_consistent() -> None:
    """Holder A stalls past its lease; B takes the case and finishes; A's late writes bounce."""
    clock = ManualClock()
    stores = memory_stores(
        clock
    )  # the in-memory store's lease clock can be moved; Postgres: tests/test_crash
    reg = WorkflowRegistry()
    gate = asyncio.Event()
    a_error: list[BaseException] = []

    @reg.workflow("stall")
    async def stall(ctx: WorkflowContext) -> WorkflowResult:
        await ctx.step("one", lambda: "first")

        async def slow() -> str:
            if not gate.is_set():
                await gate.wait()
            return ctx.case.lifecycle_state.value

        try:
            await ctx.step("two", slow)
        except LeaseLostError as exc:
            a_error.append(exc)
            raise
        return await ctx.finish("done")

    a = Engine(stores, reg, clock=clock, config=EngineConfig(owner="a", lease_ttl=10))
    b = Engine(stores, reg, clock=clock, config=EngineConfig(owner="b", lease_ttl=10))
    case: Case = await a.start_case("stall")
    run_a = asyncio.create_task(a.run_case(case.case_key))
    await asyncio.sleep(0.01)
    assert (await b.run_case(case.case_key)).status is RunStatus.SKIPPED
    clock.advance(11)
    gate.set()
    report_b = await b.run_case(case.case_key)
    assert report_b.status is RunStatus.FINISHED
    report_a = await run_a
    assert report_a.status is RunStatus.LEASE_LOST
    assert a_error and isinstance(a_error[0], LeaseLostError)
    history = await b.history(case.case_key)
    assert [(e.name, e.token) for e in history if e.kind == "step"] == [("one", 1), ("two", 2)]
    assert (await b.get_case(case.case_key)).execution_state is ExecutionState.FINISHED


async def test_a_paused_or_cancelled_case_stops_at_its_next_step_boundary(backend: Backend) -> None:
    reg = WorkflowRegistry()
    ran: list[str] = []
    gate = asyncio.Event()
    entered = asyncio.Event()

    @reg.workflow("long")
    async def long(ctx: WorkflowContext) -> WorkflowResult:
        await ctx.step("one", lambda: ran.append("one"))

        async def slow() -> None:
            ran.append("two")
            entered.set()
            await gate.wait()

        await ctx.step("two", slow)
        await ctx.step("three", lambda: ran.append("three"))
        return await ctx.finish("done")

    engine = backend.engine(reg)
    case = await engine.start_case("long", session_id="interrupt")
    running = asyncio.create_task(engine.run_case(case.case_key))
    await entered.wait()
    await engine.pause(case.case_key)
    gate.set()
    assert (await running).status is RunStatus.INTERRUPTED
    assert ran == ["one", "two"]
    assert [e.name for e in await engine.history(case.case_key)] == ["one"]
    await engine.resume(case.case_key)
    await engine.run_until_idle(session_id="interrupt")
    assert ran == ["one", "two", "two", "three"]
    assert (await engine.get_case(case.case_key)).execution_state is ExecutionState.FINISHED

    gate.clear()
    entered.clear()
    ran.clear()
    other = await engine.start_case("long", session_id="interrupt")
    running = asyncio.create_task(engine.run_case(other.case_key))
    await entered.wait()
    await engine.cancel(other.case_key)
    gate.set()
    assert (await running).status is RunStatus.INTERRUPTED
    await engine.run_until_idle(session_id="interrupt")
    assert ran == ["one", "two"]


async def test_listeners_hear_every_stored_outcome_and_cannot_break_a_run(backend: Backend) -> None:
    calls: list[str] = []
    engine = backend.engine(counting_registry(calls))
    heard: list[tuple[str, str]] = []

    async def listener(case: Case) -> None:
        heard.append((case.case_key, case.execution_state.value))

    async def broken(case: Case) -> None:
        raise RuntimeError("listener bug")

    engine.add_listener(broken)
    engine.add_listener(listener)
    case = await engine.run_workflow("count")
    assert heard == [(case.case_key, "finished")]
    assert (await engine.get_case(case.case_key)).execution_state is ExecutionState.FINISHED
