"""The scheduler's side of a wake that takes leases: every taken lease is run or handed back.

A wake leases the cases it woke to the replica that handled the event (`take`); a lease that
replica does not use would keep its case from everyone until the lease expires. These drive the
`Scheduler`'s bookkeeping directly, on the in-memory stores: no NATS is involved.
"""

from __future__ import annotations

import asyncio

from tianshu_core import (
    Case,
    Engine,
    ExecutionState,
    ManualClock,
    WorkflowContext,
    WorkflowRegistry,
    WorkflowResult,
    memory_stores,
)
from tianshu_scheduler.service import Scheduler
from tianshu_scheduler.settings import SchedulerSettings


def _registry() -> WorkflowRegistry:
    reg = WorkflowRegistry()

    @reg.workflow("await")
    async def awaiting(ctx: WorkflowContext) -> WorkflowResult:
        got = [await ctx.wait_for_event("order", ctx.case.resource_data["resource"]) for _ in range(2)]
        return await ctx.finish("done", output=got)

    return reg


def _scheduler(registry: WorkflowRegistry, clock: ManualClock) -> Scheduler:
    scheduler = Scheduler(SchedulerSettings(scheduler_max_runs=4), registry)
    scheduler.engine = Engine(memory_stores(clock), registry, clock=clock)
    return scheduler


async def _settle(scheduler: Scheduler) -> None:
    while scheduler._runs or scheduler._chores:
        await asyncio.gather(*scheduler._runs.values(), *scheduler._chores, return_exceptions=True)


async def test_a_taken_case_runs_at_once_and_others_run_too() -> None:
    clock = ManualClock()
    scheduler = _scheduler(_registry(), clock)
    engine = scheduler.engine
    assert engine is not None
    a = await engine.run_workflow("await", {"resource": "r"})
    b = await engine.run_workflow("await", {"resource": "r"})
    clock.advance(1)
    published = await engine.publish_event("order", "r", 1, take=1)
    assert len(published.taken) == 1 and sorted(published.woken) == sorted([a.case_key, b.case_key])
    scheduler._run_woken(published)
    await _settle(scheduler)
    for key in (a.case_key, b.case_key):
        case = await engine.get_case(key)
        assert case.execution_state is ExecutionState.WAITING  # consumed 1, waits for the second
    assert scheduler._taken == {}


async def test_a_lease_taken_while_stopping_is_handed_back() -> None:
    clock = ManualClock()
    scheduler = _scheduler(_registry(), clock)
    engine = scheduler.engine
    assert engine is not None
    case = await engine.run_workflow("await", {"resource": "s"})
    clock.advance(1)
    published = await engine.publish_event("order", "s", 1, take=1)
    scheduler._stopping.set()
    scheduler._run_woken(published)
    await _settle(scheduler)
    assert scheduler._runs == {} and scheduler._taken == {}
    assert await engine.stores.leases.acquire(case.case_key, "another-replica", 30) is not None


async def test_a_lease_taken_for_a_case_still_running_here_is_used_by_its_next_run() -> None:
    """The case's previous run has stored its wait and is finishing (its task still in `_runs`)
    when the wake takes its lease: the lease waits for that task, which runs the case again."""
    clock = ManualClock()
    scheduler = _scheduler(_registry(), clock)
    engine = scheduler.engine
    assert engine is not None
    stored, finish = asyncio.Event(), asyncio.Event()

    async def hold(case: Case) -> None:  # runs after the outcome is stored, before the run ends
        if case.execution_state is ExecutionState.WAITING and not finish.is_set():
            stored.set()
            await finish.wait()

    case = await engine.run_workflow("await", {"resource": "t"})
    engine.add_listener(hold)
    clock.advance(1)
    scheduler._run_woken(await engine.publish_event("order", "t", 1, take=1))
    running = scheduler._runs[case.case_key]
    await stored.wait()
    second = await engine.publish_event("order", "t", 2, take=1)
    assert [t.case_key for t in second.taken] == [case.case_key]
    scheduler._run_woken(second)
    assert scheduler._runs[case.case_key] is running  # no second task: the lease waits for this one
    finish.set()
    await _settle(scheduler)
    done = await engine.get_case(case.case_key)
    assert (done.execution_state, done.output) == (ExecutionState.FINISHED, [1, 2])
    assert scheduler._taken == {}


async def test_a_cancelled_run_hands_back_its_taken_lease() -> None:
    clock = ManualClock()
    scheduler = _scheduler(_registry(), clock)
    engine = scheduler.engine
    assert engine is not None
    case = await engine.run_workflow("await", {"resource": "c"})
    clock.advance(1)
    published = await engine.publish_event("order", "c", 1, take=1)
    async with scheduler._slots:  # every slot busy: the run waits for one...
        for _ in range(3):
            await scheduler._slots.acquire()
        scheduler._run_woken(published)
        task = scheduler._runs[case.case_key]
        await asyncio.sleep(0)
        task.cancel()  # ...and is cancelled there (shutdown)
        await asyncio.gather(task, return_exceptions=True)
        for _ in range(3):
            scheduler._slots.release()
    assert scheduler._taken == {}
    assert await engine.stores.leases.acquire(case.case_key, "another-replica", 30) is not None
