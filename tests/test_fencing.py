"""Fencing through the engine: once another holder has taken a case, no write of the old run
lands, whatever its kind, and the old run stops at its next durable call.

Each store's own refusals are in tests/test_store_conformance.py; a frozen scheduler replica
(SIGSTOP, another replica takes its cases, SIGCONT) in tests/test_scheduler_resilience.py.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import asyncpg
import pytest

from tests._backends import Backend
from tianshu_core import (
    CaseFilter,
    Engine,
    EngineConfig,
    LeaseLostError,
    ManualClock,
    RunReport,
    RunStatus,
    WorkflowContext,
    WorkflowRegistry,
    WorkflowResult,
    memory_stores,
)
from tianshu_core.engine import LeaseKeeper
from tianshu_core.stores.postgres import RetryConfig, connect_postgres

TTL = 30.0  # long: the old holder learns of the loss only from the stores' refusals

Write = Callable[[WorkflowContext, str], Awaitable[Any]]
# One write of each kind a run makes, its value naming who makes it ("stale" or "live").
WRITES: dict[str, Write] = {
    "step": lambda ctx, who: ctx.step(f"step-{who}", lambda: who),
    "state": lambda ctx, who: ctx.set_state("v", who),
    "session state": lambda ctx, who: ctx.set_session_state("v", who),
    "timer": lambda ctx, who: ctx.sleep(3600, name=f"nap-{who}"),
    "child": lambda ctx, who: ctx.spawn_child("child", who, name=f"child-{who}"),
    "waits": lambda ctx, who: ctx.wait_for_event("order", f"{ctx.case.case_key}-{who}"),
    "outcome": lambda ctx, who: ctx.finish("done", output=who),
}


@pytest.fixture
async def leased_backend(backend: Backend) -> AsyncIterator[Backend]:
    """`backend`, its in-memory stores' leases on the test's clock (so that a test can let one
    expire)."""
    if backend.name == "memory":
        yield Backend("memory", memory_stores(backend.clock), backend.clock)
    else:
        yield backend


async def expire_lease(backend: Backend, case_key: str) -> None:
    """Let the case's lease run out, as it does for a holder that stalls."""
    if backend.url is None:
        backend.clock.advance(TTL + 1)
        return
    conn = await asyncpg.connect(backend.url)
    try:
        await conn.execute(
            "UPDATE tianshu_cases SET lease_expires_at = now() - interval '1 second' WHERE case_key = $1",
            case_key,
        )
    finally:
        await conn.close()


async def everything_stored(backend: Backend, case_key: str) -> dict[str, Any]:
    """All the stores hold about a case (its session's variables and its children included)."""
    stores = backend.stores
    case = await stores.cases.get_by_key(case_key)
    assert case is not None
    far = backend.clock.now() + timedelta(days=3650)
    return {
        "case": case,
        "journal": await stores.journal.load(case_key),
        "state": await stores.state.get_all(case_key),
        "session state": await stores.state.get_all_session(case.session_id),
        "waits": await stores.waits.for_case(case_key),
        "timers": [t for t in await stores.timers.due(far, limit=100_000) if t.case_key == case_key],
        "children": await stores.cases.list(CaseFilter(parent_key=case_key)),
    }


class Stall:
    """The first run that reaches `here()` stalls there until `resume()`: the old holder. Later
    runs (the new holder's) go on at once. `here()` says which holder the run is."""

    def __init__(self) -> None:
        self.reached, self._resumed = asyncio.Event(), asyncio.Event()

    async def here(self) -> str:
        if self.reached.is_set():
            return "live"
        self.reached.set()
        await self._resumed.wait()
        return "stale"

    def resume(self) -> None:
        self._resumed.set()


@dataclass
class TakeOver:
    """How a take-over went: the runs' reports, and what was stored just before the old run went
    on after its stall and once it had ended."""

    stale: RunReport
    live: RunReport
    before: dict[str, Any]
    after: dict[str, Any]


async def take_over(backend: Backend, reg: WorkflowRegistry, code: str, stall: Stall) -> TakeOver:
    """Run a case of `code` until it stalls, let its lease run out, have another engine run the
    case, then let the old run go on to its end."""
    old = backend.engine(reg, owner="old", lease_ttl=TTL)
    new = backend.engine(reg, owner="new", lease_ttl=TTL)
    case = await old.start_case(code)
    stale_run = asyncio.create_task(old.run_case(case.case_key))
    await stall.reached.wait()
    await expire_lease(backend, case.case_key)
    live = await new.run_case(case.case_key)
    before = await everything_stored(backend, case.case_key)
    stall.resume()
    stale = await stale_run
    return TakeOver(stale, live, before, await everything_stored(backend, case.case_key))


@pytest.mark.parametrize("kind", list(WRITES))
async def test_no_write_of_a_run_lands_once_another_holder_took_its_case(
    leased_backend: Backend, kind: str
) -> None:
    reg = WorkflowRegistry()
    stall = Stall()

    @reg.workflow("child")
    async def child(ctx: WorkflowContext) -> WorkflowResult:
        return await ctx.finish("done")

    @reg.workflow("fenced")
    async def fenced(ctx: WorkflowContext) -> WorkflowResult:
        await ctx.step("before", lambda: "done")
        result = await WRITES[kind](ctx, await stall.here())
        if kind == "outcome":
            return result  # type: ignore[no-any-return]
        await ctx.wait_for_event("park", ctx.case.case_key)
        return await ctx.finish("unreachable")

    went = await take_over(leased_backend, reg, "fenced", stall)

    assert went.live.status in (RunStatus.WAITING, RunStatus.FINISHED)
    assert went.stale.status is RunStatus.LEASE_LOST
    assert went.after == went.before


async def test_a_run_that_swallows_the_refusal_still_stores_nothing(leased_backend: Backend) -> None:
    reg = WorkflowRegistry()
    stall = Stall()
    refused: list[BaseException] = []

    @reg.workflow("stubborn")
    async def stubborn(ctx: WorkflowContext) -> WorkflowResult:
        who = await stall.here()
        try:
            await ctx.step("one", lambda: who)
        except LeaseLostError as exc:  # a workflow that catches too much
            refused.append(exc)
        await ctx.set_session_state("v", who)
        return await ctx.finish("done", output=who)

    went = await take_over(leased_backend, reg, "stubborn", stall)

    assert went.live.status is RunStatus.FINISHED
    assert went.stale.status is RunStatus.LEASE_LOST
    assert len(refused) == 1  # the next durable call raised again, outside the workflow's try
    assert went.after == went.before


class _Logged(logging.Handler):
    """`await seen.wait()`: until a record whose message contains `text` is logged."""

    def __init__(self, text: str) -> None:
        super().__init__(logging.WARNING)
        self._text = text
        self._seen = asyncio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if self._text in record.getMessage():
            self._seen.set()

    async def wait(self) -> None:
        await self._seen.wait()


@pytest.fixture
def heartbeat_found_loss() -> Iterator[_Logged]:
    handler = _Logged("lease lost while running")
    logger = logging.getLogger("tianshu_core.engine")
    logger.addHandler(handler)
    yield handler
    logger.removeHandler(handler)


async def test_a_run_that_learns_its_lease_is_lost_runs_no_further_step_body(
    heartbeat_found_loss: _Logged,
) -> None:
    clock = ManualClock()
    stores = memory_stores(clock)
    reg = WorkflowRegistry()
    bodies: list[str] = []
    stall = Stall()

    @reg.workflow("two")
    async def two(ctx: WorkflowContext) -> WorkflowResult:
        await ctx.step("one", lambda: bodies.append("one"))
        who = await stall.here()
        await ctx.step("two", lambda: bodies.append(f"two-{who}"))
        return await ctx.finish("done")

    # A short lease: the old holder's heartbeat renews it every ttl/3, and finds it taken.
    old = Engine(stores, reg, clock=clock, config=EngineConfig(owner="old", lease_ttl=0.3))
    new = Engine(stores, reg, clock=clock, config=EngineConfig(owner="new", lease_ttl=TTL))
    case = await old.start_case("two")
    stale_run = asyncio.create_task(old.run_case(case.case_key))
    await stall.reached.wait()
    clock.advance(1)
    assert (await new.run_case(case.case_key)).status is RunStatus.FINISHED
    await heartbeat_found_loss.wait()
    stall.resume()

    assert (await stale_run).status is RunStatus.LEASE_LOST
    assert bodies == ["one", "two-live"]  # "two" never ran in the old run


async def test_past_its_term_a_run_confirms_its_lease_with_the_store() -> None:
    """A process that stalled (its heartbeat could not run meanwhile) asks the store before its
    next durable call: a lease still its own is renewed, a lost one stops the run."""
    clock = ManualClock()
    stores = memory_stores(clock)
    engine = Engine(stores, WorkflowRegistry(), clock=clock)
    ttl = 0.2
    keepers: list[LeaseKeeper] = []
    for key in ("kept", "taken"):
        await engine.start_case("any", case_key=key)
        lease = await stores.leases.acquire(key, "old", ttl)
        assert lease is not None
        keepers.append(LeaseKeeper(stores, lease, ttl))  # not started: stalled, no heartbeat
    kept, taken = keepers
    clock.advance(1)  # both leases expired by the store's clock; one is taken
    assert await stores.leases.acquire("taken", "new", TTL) is not None
    await asyncio.sleep(ttl)  # and both past their term by this process's clock

    await kept.hold()
    assert await stores.leases.acquire("kept", "new", TTL) is None  # renewed: held again
    for _ in range(2):  # lost, and lost from then on
        with pytest.raises(LeaseLostError):
            await taken.hold()


@pytest.mark.postgres
async def test_a_lease_that_cannot_be_confirmed_abandons_the_run_and_not_the_case(
    pg_migrated_url: str,
) -> None:
    """Past its term, a run asks the store about its lease; a store out of reach then is an
    outage, not the case's fault: the run is abandoned (the case stays running, for a later run)
    and the next step body does not run."""
    stores = await connect_postgres(
        pg_migrated_url, max_size=2, statement_timeout_ms=200, retry=RetryConfig(attempts=1)
    )
    reg = WorkflowRegistry()
    stall = Stall()
    bodies: list[str] = []
    caught: list[Exception] = []

    @reg.workflow("two")
    async def two(ctx: WorkflowContext) -> WorkflowResult:
        await ctx.step("one", lambda: bodies.append("one"))
        await stall.here()
        try:
            await ctx.step("two", lambda: bodies.append("two"))
        except Exception as exc:  # the workflow's own error handling must not see the outage
            caught.append(exc)
        return await ctx.finish("done")

    ttl = 0.3
    engine = Engine(stores, reg, config=EngineConfig(lease_ttl=ttl))
    admin = await asyncpg.connect(pg_migrated_url)
    try:
        case = await engine.start_case("two")
        run = asyncio.create_task(engine.run_case(case.case_key))
        await stall.reached.wait()
        async with admin.transaction():  # the case row stays locked: no renewal gets through
            await admin.execute("SELECT 1 FROM tianshu_cases WHERE case_key = $1 FOR UPDATE", case.case_key)
            await asyncio.sleep(ttl)  # past the lease's term
            stall.resume()
            report = await run
    finally:
        await admin.close()
        await stores.close()

    assert report.status is RunStatus.ABANDONED
    assert bodies == ["one"] and caught == []
    stored = await _case_state(pg_migrated_url, case.case_key)
    assert stored == "running"


async def _case_state(url: str, case_key: str) -> str:
    conn = await asyncpg.connect(url)
    try:
        state: str = await conn.fetchval(
            "SELECT execution_state FROM tianshu_cases WHERE case_key = $1", case_key
        )
    finally:
        await conn.close()
    return state
