"""A case never waits forever for something that already happened.

Every wake a stored change implies is committed with that change: a child's outcome and its
parent's wake, a case's waits and its recheck for an event that came meanwhile. A crash (or a
cancelled run: a SIGTERM drain) at any point between two store calls leaves nothing waiting on
what is already there. Run against the in-memory and the Postgres stores alike; a crash is a
BaseException raised around a store call, after which the test "restarts" on the same stores.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from tests._backends import Backend
from tianshu_core import (
    Engine,
    EngineConfig,
    ExecutionState,
    RunStatus,
    SpawnConfig,
    Stores,
    Timer,
    WorkflowContext,
    WorkflowRegistry,
    WorkflowResult,
)

LEASE_TTL = 0.3


class Crash(BaseException):
    """The process dies here (a BaseException: nothing in the engine handles it)."""


Hook = Callable[[str, str, tuple[Any, ...]], Awaitable[None] | None]


class _Proxy:
    """A store that forwards everything; `hook(name, phase, args)` runs before and after each
    coroutine call (phase "before" / "after"), may raise, and is awaited if it returns an awaitable."""

    def __init__(self, inner: Any, hook: Hook) -> None:
        self._inner, self._hook = inner, hook

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._inner, name)
        if not asyncio.iscoroutinefunction(attr):
            return attr

        async def call(*args: Any, **kwargs: Any) -> Any:
            if (before := self._hook(name, "before", args)) is not None:
                await before
            result = await attr(*args, **kwargs)
            if (after := self._hook(name, "after", args)) is not None:
                await after
            return result

        return call


def _wrapped(stores: Stores, hook: Hook) -> Stores:
    """The same stores, with `hook` around every call of the case, wait and event stores."""
    return Stores(
        sessions=stores.sessions,
        cases=_Proxy(stores.cases, lambda n, p, a: hook(f"cases.{n}", p, a)),
        leases=stores.leases,
        journal=stores.journal,
        state=stores.state,
        waits=_Proxy(stores.waits, lambda n, p, a: hook(f"waits.{n}", p, a)),
        events=_Proxy(stores.events, lambda n, p, a: hook(f"events.{n}", p, a)),
        timers=stores.timers,
        usage=stores.usage,
    )


def _family(n: int) -> WorkflowRegistry:
    reg = WorkflowRegistry()

    @reg.workflow("child")
    async def child(ctx: WorkflowContext) -> WorkflowResult:
        value = await ctx.step("work", lambda: ctx.case.resource_data["i"] * 10)
        return await ctx.finish("done", output=value)

    @reg.workflow("parent")
    async def parent(ctx: WorkflowContext) -> WorkflowResult:
        handles = await ctx.spawn_children([SpawnConfig("child", {"i": i}, name=f"c{i}") for i in range(n)])
        outcomes = await ctx.await_children(handles)
        return await ctx.finish("done", output=[o.output for o in outcomes])

    return reg


def _engine(stores: Stores, reg: WorkflowRegistry, backend: Backend, **config: Any) -> Engine:
    return Engine(stores, reg, clock=backend.clock, config=EngineConfig(lease_ttl=LEASE_TTL, **config))


@pytest.mark.parametrize("death", [Crash, asyncio.CancelledError], ids=["crash", "cancelled"])
async def test_a_child_that_dies_after_storing_its_outcome_has_woken_its_parent(
    backend: Backend, death: type[BaseException]
) -> None:
    reg = _family(3)
    engine = _engine(backend.stores, reg, backend)
    parent = await engine.run_workflow("parent")
    assert parent.execution_state is ExecutionState.WAITING

    def die_after_a_child_ends(name: str, phase: str, args: tuple[Any, ...]) -> None:
        if name == "cases.save" and phase == "after" and args[0].parent_key and args[0].is_terminal:
            raise death()  # the outcome is stored; whatever came next in the run never happens

    dying = _engine(_wrapped(backend.stores, die_after_a_child_ends), reg, backend)
    for key in parent.child_keys:
        with pytest.raises(death):
            await dying.run_case(key)
        assert (await engine.get_case(key)).execution_state is ExecutionState.FINISHED

    # The last child's commit moved the parent to running: a fresh process simply runs it.
    assert (await engine.get_case(parent.case_key)).execution_state is ExecutionState.RUNNING
    await _engine(backend.stores, reg, backend).run_until_idle()
    done = await engine.get_case(parent.case_key)
    assert (done.execution_state, done.output) == (ExecutionState.FINISHED, [0, 10, 20])


async def test_a_parent_of_n_children_is_woken_once_and_reads_each_child_twice(backend: Backend) -> None:
    n = 12
    reads: Counter[str] = Counter()
    runs: Counter[str] = Counter()

    def count_reads(name: str, phase: str, args: tuple[Any, ...]) -> None:
        if phase == "before" and name == "cases.get_many":
            reads.update(args[0])
        elif phase == "before" and name == "cases.get_by_key":
            reads[args[0]] += 1

    # One case a tick: the parent, oldest, runs whenever it is runnable, between any two children.
    engine = _engine(_wrapped(backend.stores, count_reads), _family(n), backend, tick_batch=1)

    async def count_runs(case: Any) -> None:
        runs[case.case_key] += 1

    engine.add_listener(count_runs)
    parent = await engine.run_workflow("parent")
    await engine.run_until_idle()
    done = await engine.get_case(parent.case_key)
    assert (done.execution_state, done.output) == (ExecutionState.FINISHED, [i * 10 for i in range(n)])
    assert runs[parent.case_key] == 2  # parked once, woken once by the last child
    assert {k: reads[k] for k in parent.child_keys} == dict.fromkeys(parent.child_keys, 2)


def _waiter() -> WorkflowRegistry:
    reg = WorkflowRegistry()

    @reg.workflow("waiter")
    async def waiter(ctx: WorkflowContext) -> WorkflowResult:
        payload = await ctx.wait_for_event("order", ctx.case.case_key)
        return await ctx.finish("done", output=payload)

    return reg


async def _die_after_the_look(
    backend: Backend, reg: WorkflowRegistry, crash_at: int
) -> tuple[bool, list[str]]:
    """Run a new waiter whose event comes after its last look, dying at the `crash_at`-th store
    call boundary after that look; restart and run to the end. Whether it died, and the calls."""
    engine = _engine(backend.stores, reg, backend)
    case = await engine.start_case("waiter", case_key=f"w-{backend.name}-{crash_at}")
    calls: list[str] = []
    published: list[Any] = []

    async def publish() -> None:
        published.append(await engine.publish_event("order", case.case_key, {"n": 1}))

    def hook(name: str, phase: str, _args: tuple[Any, ...]) -> Awaitable[None] | None:
        if name == "events.next_after" and phase == "after" and not calls:
            calls.append(name)
            return publish()  # the run has looked and seen nothing; the event arrives now
        if calls and name != "events.publish_and_wake":
            calls.append(f"{name} {phase}")
            if len(calls) - 1 == crash_at:
                raise Crash()
        return None

    try:
        report = await _engine(_wrapped(backend.stores, hook), reg, backend).run_case(case.case_key)
    except Crash:
        crashed = True
    else:
        crashed = False
        assert report.status is RunStatus.WAITING
    assert published, "the event was never published"
    assert published[0].woken == []  # the case was still running: the publish woke nothing
    await asyncio.sleep(LEASE_TTL * 1.5)  # a crashed holder's lease expires
    await _engine(backend.stores, reg, backend).run_until_idle()
    done = await engine.get_case(case.case_key)
    assert (done.execution_state, done.output) == (ExecutionState.FINISHED, {"n": 1}), (
        f"lost wake after {calls[1 : crash_at + 1]}"
    )
    return crashed, calls


async def test_no_crash_point_between_storing_waits_and_the_recheck_loses_a_wake(backend: Backend) -> None:
    """The event comes after the run's last look and before its waits are stored (the publish
    wakes nothing: the case is still running); then the process dies before, or after, each
    store call that follows. A restarted process always finishes the case."""
    reg = _waiter()
    crash_at = 1
    while (await _die_after_the_look(backend, reg, crash_at))[0]:
        crash_at += 1
    assert crash_at > 2  # it died at least before and after storing its wait


async def test_the_sweep_wakes_a_waiting_case_whose_event_was_stored_without_its_wake(
    backend: Backend,
) -> None:
    reg = _waiter()
    engine = _engine(backend.stores, reg, backend, tick_batch=2)
    keys = [f"sw-{backend.name}-{i}" for i in range(5)]
    for key in keys:
        assert (await engine.run_workflow("waiter", case_key=key)).execution_state is ExecutionState.WAITING
    # Events stored as an older replica, or a crash in the middle of its wake, would leave them.
    for key in keys[1:4]:
        await backend.stores.events.publish(
            "order",
            key,
            {"k": key},
            event_id=None,
            published_at=backend.clock.now(),
            dedupe_since=backend.clock.now(),
        )
    assert [k for k in await _full_round(engine) if k in keys] == keys[1:4]
    await engine.run_until_idle()
    states = {k: (await engine.get_case(k)).execution_state for k in keys}
    assert states == {k: ExecutionState.FINISHED if k in keys[1:4] else ExecutionState.WAITING for k in keys}
    assert not set(await _full_round(engine)) & set(keys)  # and nothing is woken twice


async def _full_round(engine: Engine) -> list[str]:
    """`wake_met` until it has been through every wait (of this test database: other tests'
    too), two a call; the keys woken."""
    woken = await engine.wake_met()
    while engine._sweep_after is not None:
        woken += await engine.wake_met()
    return woken


async def test_the_sweep_wakes_a_parent_whose_children_all_ended_unseen(backend: Backend) -> None:
    reg = _family(2)
    engine = _engine(backend.stores, reg, backend)
    parent = await engine.run_workflow("parent")
    # Children ended as a replica of an older release ends them: the outcome, no count, no wake.
    for key in parent.child_keys:
        child = await engine.get_case(key)
        child.execution_state, child.output = ExecutionState.FINISHED, 0
        await backend.stores.cases.upsert(child)
    assert (await engine.get_case(parent.case_key)).execution_state is ExecutionState.WAITING
    assert parent.case_key in await _full_round(engine)
    await engine.run_until_idle()
    assert (await engine.get_case(parent.case_key)).output == [0, 0]


def _sleeper() -> WorkflowRegistry:
    reg = WorkflowRegistry()

    @reg.workflow("sleeper")
    async def sleeper(ctx: WorkflowContext) -> WorkflowResult:
        await ctx.sleep(60)
        return await ctx.finish("done", output="woke")

    return reg


async def test_a_timer_that_falls_due_while_its_case_parks_survives_a_crash_after_the_park(
    backend: Backend,
) -> None:
    """The sleeper's timer falls due between its run's look at the clock and its park, and a
    sweep runs in that gap (the case is running: the sweep cannot wake it). The process dies
    right after the park commits. A restarted process still wakes and finishes the case: the
    sweep left the timer of the running case for after its park."""
    reg = _sleeper()
    engine = _engine(backend.stores, reg, backend)
    case = await engine.start_case("sleeper", case_key=f"sleeper-{backend.name}")

    async def sweep_in_the_gap() -> None:
        backend.clock.advance(seconds=61)  # due now, and the run has already looked
        assert await engine.fire_due_timers() == []  # running: nothing to wake yet

    def hook(name: str, phase: str, _args: tuple[Any, ...]) -> Awaitable[None] | None:
        if name == "cases.park" and phase == "before":
            return sweep_in_the_gap()
        if name == "cases.park" and phase == "after":
            raise Crash()  # parked; the run's own look at the due timer never happens
        return None

    with pytest.raises(Crash):
        await _engine(_wrapped(backend.stores, hook), reg, backend).run_case(case.case_key)
    assert (await engine.get_case(case.case_key)).execution_state is ExecutionState.WAITING
    assert case.case_key in await engine.fire_due_timers()
    await engine.run_until_idle()
    done = await engine.get_case(case.case_key)
    assert (done.execution_state, done.output) == (ExecutionState.FINISHED, "woke")


async def test_the_sweep_leaves_the_due_timers_of_running_cases_until_they_park(backend: Backend) -> None:
    """Due timers of cases still running are passed over, not dropped: the sweep goes on to the
    waiting cases behind them, and fires them once their cases are stored waiting."""
    reg = _sleeper()
    engine = _engine(backend.stores, reg, backend, tick_batch=2)
    sleeping = [f"due-{backend.name}-{i}" for i in range(2)]
    for key in sleeping:
        assert (await engine.run_workflow("sleeper", case_key=key)).execution_state is ExecutionState.WAITING
    backend.clock.advance(seconds=30)
    running = [f"busy-{backend.name}-{i}" for i in range(3)]
    for key in running:  # started, not run yet: their due timers come first in fire order
        await engine.start_case("sleeper", case_key=key)
        await backend.stores.timers.schedule(Timer(key, "sleep", backend.clock.now()))
    backend.clock.advance(seconds=31)
    assert sorted(k for k in await _fire_all(engine) if k in sleeping + running) == sleeping
    for key in running:  # now they wait (as a park would store them)
        case = await engine.get_case(key)
        case.execution_state = ExecutionState.WAITING
        await backend.stores.cases.upsert(case)
    assert sorted(k for k in await _fire_all(engine) if k in running) == running


async def _fire_all(engine: Engine) -> list[str]:
    """`fire_due_timers` until a round wakes nothing (other tests' timers are in this database too)."""
    woken: list[str] = []
    for _ in range(1000):
        batch = await engine.fire_due_timers()
        if not batch:
            return woken
        woken += batch
    raise AssertionError("the due timers never ran out")
