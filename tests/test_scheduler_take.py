"""The service-mode driver's side of a wake that takes leases: every taken lease is run or handed
back.

A wake leases the cases it woke to the replica that handled the event (`take`); a lease that
replica does not use would keep its case from everyone until the lease expires. These drive the
scheduler's `ServiceDriver` through its public calls, on the in-memory stores: no NATS is involved.
"""

from __future__ import annotations

import asyncio

import pytest

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
from tianshu_core.driver import ServiceDriver


def _registry(gate: asyncio.Event | None = None) -> WorkflowRegistry:
    reg = WorkflowRegistry()

    @reg.workflow("await")
    async def awaiting(ctx: WorkflowContext) -> WorkflowResult:
        got = [await ctx.wait_for_event("order", ctx.case.resource_data["resource"]) for _ in range(2)]
        return await ctx.finish("done", output=got)

    @reg.workflow("gated")
    async def gated(ctx: WorkflowContext) -> WorkflowResult:
        assert gate is not None
        await ctx.step("gate", gate.wait)
        return await ctx.finish("done")

    return reg


def _driver(registry: WorkflowRegistry, clock: ManualClock, *, max_runs: int = 4) -> ServiceDriver:
    return ServiceDriver(Engine(memory_stores(clock), registry, clock=clock), max_runs=max_runs)


async def _lease_is_free(driver: ServiceDriver, case_key: str) -> bool:
    """No lease on the case is held: another replica could take it now."""
    stores = driver.engine.stores
    lease = await stores.leases.acquire(case_key, "another-replica", 30)
    if lease is None:
        return False
    await stores.leases.release(lease)
    return True


async def test_a_taken_case_runs_at_once_and_others_run_too() -> None:
    clock = ManualClock()
    driver = _driver(_registry(), clock, max_runs=1)  # room for one: one taken, one only woken
    engine = driver.engine
    a = await engine.run_workflow("await", {"resource": "r"})
    b = await engine.run_workflow("await", {"resource": "r"})
    clock.advance(1)
    published = await driver.publish_event("order", "r", 1)
    assert len(published.taken) == 1 and sorted(published.woken) == sorted([a.case_key, b.case_key])
    await driver.wait_idle()
    for key in (a.case_key, b.case_key):
        case = await engine.get_case(key)
        assert case.execution_state is ExecutionState.WAITING  # consumed 1, waits for the second
        assert await _lease_is_free(driver, key)
    assert driver.runs_done == 2


async def test_a_lease_taken_while_stopping_is_handed_back() -> None:
    clock = ManualClock()
    driver = _driver(_registry(), clock)
    engine = driver.engine
    case = await engine.run_workflow("await", {"resource": "s"})
    clock.advance(1)
    driver.stop()
    published = await driver.publish_event("order", "s", 1)
    assert [lease.case_key for lease in published.taken] == [case.case_key]
    await driver.wait_idle()
    assert driver.running == frozenset() and driver.runs_done == 0
    assert await _lease_is_free(driver, case.case_key)


async def _wake_while_finishing(
    driver: ServiceDriver, clock: ManualClock, resource: str
) -> tuple[Case, asyncio.Event]:
    """A case woken (by its first event) runs here, stores its next wait and stays in the run's
    last stage (its listeners) until the returned event is set; meanwhile a second event takes
    its lease for this driver."""
    engine = driver.engine
    stored, finish = asyncio.Event(), asyncio.Event()

    async def hold(case: Case) -> None:  # runs after the outcome is stored, before the run ends
        if case.execution_state is ExecutionState.WAITING and not finish.is_set():
            stored.set()
            await finish.wait()

    case = await engine.run_workflow("await", {"resource": resource})
    engine.add_listener(hold)
    clock.advance(1)
    await driver.publish_event("order", resource, 1)
    await stored.wait()
    second = await driver.publish_event("order", resource, 2)
    assert [t.case_key for t in second.taken] == [case.case_key]
    return case, finish


async def test_a_lease_taken_for_a_case_still_running_here_is_used_by_its_next_run() -> None:
    """The case's previous run has stored its wait and is finishing (still running here) when the
    wake takes its lease: the lease waits for that run, which runs the case again."""
    clock = ManualClock()
    driver = _driver(_registry(), clock)
    engine = driver.engine
    case, finish = await _wake_while_finishing(driver, clock, "t")
    assert driver.running == {case.case_key}
    # No second run meanwhile: the case stays woken, not run again, until the first run ends.
    for _ in range(10):
        await asyncio.sleep(0)
    assert (await engine.get_case(case.case_key)).execution_state is ExecutionState.RUNNING
    finish.set()
    await driver.wait_idle()
    done = await engine.get_case(case.case_key)
    assert (done.execution_state, done.output) == (ExecutionState.FINISHED, [1, 2])
    assert driver.runs_done == 2
    assert await _lease_is_free(driver, case.case_key)


async def test_a_cancelled_run_hands_back_its_taken_lease() -> None:
    """Every slot is busy, so a case scheduled with a lease a wake took waits for one; shutdown
    cancels it there, and the lease goes back at once."""
    clock = ManualClock()
    gate = asyncio.Event()
    driver = _driver(_registry(gate), clock, max_runs=1)
    engine = driver.engine
    case = await engine.run_workflow("await", {"resource": "c"})
    busy = await engine.start_case("gated")
    driver.schedule(busy.case_key)  # takes the only slot, and keeps it until the gate opens
    clock.advance(1)
    published = await engine.publish_event("order", "c", 1, take=1)
    driver.schedule(case.case_key, published.taken[0])
    assert driver.running == {busy.case_key, case.case_key}
    assert not await driver.shutdown(timeout_s=0)  # both cut short
    assert driver.running == frozenset() and driver.runs_done == 0
    for key in (case.case_key, busy.case_key):
        assert await _lease_is_free(driver, key)


async def test_a_run_cancelled_at_shutdown_hands_back_the_lease_a_wake_took_for_its_next_run() -> None:
    """As above, but the lease waits for the case's run in progress here (it has stored its wait
    and is finishing); shutdown cancels that run, and the lease goes back: another replica runs
    the case on."""
    clock = ManualClock()
    driver = _driver(_registry(), clock)
    engine = driver.engine
    case, _ = await _wake_while_finishing(driver, clock, "e")
    assert not await driver.shutdown(timeout_s=0)
    assert await _lease_is_free(driver, case.case_key)
    report = await Engine(engine.stores, engine.registry, clock=clock).run_case(case.case_key)
    assert report.case is not None and report.case.output == [1, 2]


def test_max_runs_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_runs"):
        _driver(_registry(), ManualClock(), max_runs=0)
