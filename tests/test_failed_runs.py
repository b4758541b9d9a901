"""A run that fails outside the workflow's own code never loops, and an outage never fails a case.

- A write the store refuses for what it carries (a constraint violated, a value refused) fails the
  case at once with that error: the journal does not grow, nothing picks the case up again.
- Any other failure (here a serialization failure Postgres raises on every try, or a workflow
  result the engine cannot store) backs the case off, and after `max_failed_runs` failures in a
  row the case fails with the last error.
- A transient failure (Postgres answering "cannot connect now", or stopped altogether) spends
  none of that budget: the case runs again once the store answers and finishes.

The failures are real Postgres errors, raised by constraints and triggers this test adds to the
tables (for its own case keys and step names only) and drops again.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import asyncpg
import pytest

from tests._backends import Backend
from tests._pg import PrivatePostgres
from tianshu_core import (
    Engine,
    EngineConfig,
    ExecutionMode,
    ExecutionState,
    RunStatus,
    Stores,
    Waiting,
    WorkflowContext,
    WorkflowRegistry,
    WorkflowResult,
)
from tianshu_core.stores.postgres import RetryConfig, connect_postgres, migrate


def uid(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:10]}"


@asynccontextmanager
async def admin(
    url: str, *setup: str, teardown: tuple[str, ...] = ()
) -> AsyncIterator[asyncpg.Connection[asyncpg.Record]]:
    """A connection that ran `setup` and runs `teardown` when done."""
    conn = await asyncpg.connect(url)
    try:
        for sql in setup:
            await conn.execute(sql)
        yield conn
    finally:
        for sql in teardown:
            await conn.execute(sql)
        await conn.close()


def raising_on_insert(name: str, step: str, sqlstate: str, *, times: int | None = None) -> tuple[str, ...]:
    """SQL for a trigger raising `sqlstate` on every journal insert of step `step` (or on the
    first `times` of them): a real Postgres error on the engine's real write."""
    counter = f"{name}_n"
    # A sequence counts the tries: nextval is not rolled back with the refused insert.
    now = f"nextval('{counter}') <= {times}" if times is not None else "true"
    return (
        f"CREATE SEQUENCE {counter}",
        f"""CREATE FUNCTION {name}() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF NEW.name = '{step}' THEN
                IF {now} THEN
                    RAISE EXCEPTION 'refused by the test (%)', '{sqlstate}' USING ERRCODE = '{sqlstate}';
                END IF;
            END IF;
            RETURN NEW;
        END $$""",
        f"CREATE TRIGGER {name} BEFORE INSERT ON tianshu_journal FOR EACH ROW EXECUTE FUNCTION {name}()",
    )


def dropping(name: str) -> tuple[str, ...]:
    return (
        f"DROP TRIGGER IF EXISTS {name} ON tianshu_journal",
        f"DROP FUNCTION IF EXISTS {name}()",
        f"DROP SEQUENCE IF EXISTS {name}_n",
    )


def stepping(reg: WorkflowRegistry, code: str, step: str, runs: Counter[str]) -> None:
    """Workflow `code`: a step "ok", then step `step` (counting its runs per case), then finish."""

    @reg.workflow(code)
    async def flow(ctx: WorkflowContext) -> WorkflowResult:
        await ctx.step("ok", lambda: 1)

        def body() -> int:
            runs[ctx.case.case_key] += 1
            return 2

        await ctx.step(step, body)
        return await ctx.finish("done", ctx.case.resource_data or "")


async def failures_of(url: str, key: str) -> tuple[int, float | None]:
    """The case's count of failed runs, and how many seconds its lease is still held."""
    conn = await asyncpg.connect(url)
    try:
        row = await conn.fetchrow(
            "SELECT failures, extract(epoch FROM lease_expires_at - now())::float8 AS held "
            "FROM tianshu_cases WHERE case_key = $1",
            key,
        )
    finally:
        await conn.close()
    assert row is not None
    return row["failures"], row["held"]


async def let_time_pass(url: str, key: str) -> None:
    """End the case's backoff now, as if its delay had passed."""
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(
            "UPDATE tianshu_cases SET lease_expires_at = now() - interval '1 second' WHERE case_key = $1", key
        )
    finally:
        await conn.close()


@pytest.fixture
async def pg_stores(pg_migrated_url: str) -> AsyncIterator[Stores]:
    stores = await connect_postgres(pg_migrated_url, max_size=4)
    yield stores
    await stores.close()


@pytest.mark.postgres
@pytest.mark.parametrize("where", ["journal", "case"])
async def test_a_write_the_store_refuses_fails_the_case_once(
    pg_migrated_url: str, pg_stores: Stores, where: str
) -> None:
    """A CHECK constraint refuses the step's journal row, or the case's outcome: the case fails
    with that error on its first run, and is never run again."""
    marker = uid("refused")
    table, check = {
        "journal": ("tianshu_journal", f"name <> '{marker}'"),
        "case": ("tianshu_cases", f"finished_description IS DISTINCT FROM '{marker}'"),
    }[where]
    runs: Counter[str] = Counter()
    reg = WorkflowRegistry()
    stepping(reg, "refusing", marker if where == "journal" else "fine", runs)
    engine = Engine(pg_stores, reg)
    async with admin(
        pg_migrated_url,
        f"ALTER TABLE {table} ADD CONSTRAINT {marker} CHECK ({check}) NOT VALID",
        teardown=(f"ALTER TABLE {table} DROP CONSTRAINT {marker}",),
    ):
        case = await engine.run_workflow("refusing", marker)
        history = [e.name for e in await engine.history(case.case_key)]
        await engine.run_until_idle(session_id=case.session_id, max_ticks=3)
        for _ in range(3):
            assert (await engine.run_case(case.case_key)).status is RunStatus.SKIPPED
    failed = await engine.get_case(case.case_key)
    assert failed.execution_state is ExecutionState.FAILED, failed
    assert failed.error is not None and failed.error.type == "CheckViolationError"
    assert failed.error.message.startswith("the store refused this case's write: ")
    assert marker in failed.error.message
    assert failed.finished_description is None  # the refused outcome was not kept
    assert [e.name for e in await engine.history(case.case_key)] == history
    assert history == (["ok"] if where == "journal" else ["ok", "fine"])
    assert sum(runs.values()) == 1


@pytest.mark.postgres
async def test_a_run_that_keeps_failing_backs_off_and_fails_after_its_budget(
    pg_migrated_url: str, pg_stores: Stores
) -> None:
    """Postgres refuses the step's row with a serialization failure (SQLSTATE 40001) on every
    try: not an outage, not a refusal of the value. The case waits 60 s, then 120 s, and its third
    failed run fails it with that error."""
    marker = uid("busy")
    runs: Counter[str] = Counter()
    reg = WorkflowRegistry()
    stepping(reg, "busy", marker, runs)
    config = EngineConfig(max_failed_runs=3, failed_run_backoff=60, failed_run_backoff_max=600)
    engine = Engine(pg_stores, reg, config=config)
    async with admin(pg_migrated_url, *raising_on_insert(marker, marker, "40001"), teardown=dropping(marker)):
        case = await engine.run_workflow("busy")
        key = case.case_key
        assert case.execution_state is ExecutionState.RUNNING
        failures, held = await failures_of(pg_migrated_url, key)
        assert failures == 1 and held is not None and 30 < held <= 60
        # Backing off: nobody takes the case, however often it is asked for.
        assert (await engine.run_case(key)).status is RunStatus.SKIPPED
        assert await pg_stores.cases.runnable(session_id=case.session_id) == []
        assert runs[key] == 1

        await let_time_pass(pg_migrated_url, key)
        assert (await engine.run_case(key)).status is RunStatus.ABANDONED
        failures, held = await failures_of(pg_migrated_url, key)
        assert failures == 2 and held is not None and 60 < held <= 120  # the wait doubled
        assert (await engine.run_case(key)).status is RunStatus.SKIPPED

        await let_time_pass(pg_migrated_url, key)
        assert (await engine.run_case(key)).status is RunStatus.FAILED
    failed = await engine.get_case(key)
    assert failed.execution_state is ExecutionState.FAILED and runs[key] == 3
    assert failed.error is not None and failed.error.type == "SerializationError"
    assert failed.error.message.startswith("the case's run failed 3 times in a row: refused by the test")
    assert [e.name for e in await engine.history(key)] == ["ok"]
    assert (await engine.run_case(key)).status is RunStatus.SKIPPED


async def test_a_result_the_engine_cannot_store_spends_the_budget_in_every_store(backend: Backend) -> None:
    """A workflow returning a Waiting the engine cannot store (a bug) used to be run again every
    tick, for ever; now it runs `max_failed_runs` times and fails with the last error."""
    runs: Counter[str] = Counter()
    reg = WorkflowRegistry()

    @reg.workflow("broken")
    async def broken(ctx: WorkflowContext) -> WorkflowResult:
        runs[ctx.case.case_key] += 1
        await ctx.step("ok", lambda: 1)
        return Waiting(["not a predicate"])  # type: ignore[list-item]

    engine = backend.engine(reg, max_failed_runs=4, failed_run_backoff=0)
    case = await engine.run_workflow("broken")
    await engine.run_until_idle(session_id=case.session_id, max_ticks=20)
    failed = await engine.get_case(case.case_key)
    assert failed.execution_state is ExecutionState.FAILED, failed
    assert failed.error is not None and failed.error.type == "AttributeError"
    assert failed.error.message.startswith("the case's run failed 4 times in a row: ")
    assert runs[case.case_key] == 4
    assert [e.name for e in await engine.history(case.case_key) if e.kind == "step"] == ["ok"]


@pytest.mark.postgres
async def test_transient_store_failures_spend_no_budget(pg_migrated_url: str) -> None:
    """With a budget of one failed run, Postgres answers "cannot connect now" (SQLSTATE 57P03, an
    outage) to a step's first four inserts, more than the store's own two attempts take: the run
    is given up twice, and the case still finishes. A serialization failure, meanwhile, fails its
    case after one run: the budget is there, the outage does not spend it."""
    outage, busy = uid("outage"), uid("busy")
    runs: Counter[str] = Counter()
    reg = WorkflowRegistry()
    stepping(reg, "outage", outage, runs)
    stepping(reg, "busy", busy, runs)
    stores = await connect_postgres(pg_migrated_url, max_size=4, retry=RetryConfig(attempts=2, initial=0.01))
    engine = Engine(stores, reg, config=EngineConfig(max_failed_runs=1, failed_run_backoff=0))
    session = uid("session")
    try:
        async with admin(
            pg_migrated_url,
            *raising_on_insert(outage, outage, "57P03", times=4),
            *raising_on_insert(busy, busy, "40001"),
            teardown=(*dropping(outage), *dropping(busy)),
        ):
            waits = await engine.start_case("outage", session_id=session)
            fails = await engine.start_case("busy", session_id=session)
            for _ in range(10):
                await engine.run_until_idle(session_id=session)
                if runs[waits.case_key] >= 3:
                    break
        done, failed = await engine.get_case(waits.case_key), await engine.get_case(fails.case_key)
    finally:
        await stores.close()
    assert done.execution_state is ExecutionState.FINISHED and done.failures == 0, done
    assert runs[waits.case_key] == 3  # two runs given up to the outage, the third went through
    assert failed.execution_state is ExecutionState.FAILED and runs[failed.case_key] == 1
    assert failed.error is not None and failed.error.type == "SerializationError"


@pytest.mark.postgres
@pytest.mark.slow
async def test_a_postgres_outage_during_runs_fails_no_case(private_pg: PrivatePostgres) -> None:
    """Postgres stops while four cases are inside a step, and stays down while the engine keeps
    trying; with a budget of one failed run (a case failing for its own reason fails after one
    run), every case finishes once it is back."""
    await migrate(private_pg.url)
    inside, leave = asyncio.Event(), asyncio.Event()
    entered: Counter[str] = Counter()
    busy = uid("busy")
    runs: Counter[str] = Counter()
    reg = WorkflowRegistry()
    stepping(reg, "busy", busy, runs)

    @reg.workflow("long")
    async def long(ctx: WorkflowContext) -> WorkflowResult:
        await ctx.step("before", lambda: 1)

        async def during() -> int:
            entered[ctx.case.case_key] += 1
            if len(entered) == 4:
                inside.set()
            await leave.wait()
            return 2

        await ctx.step("during", during)
        return await ctx.finish("done")

    async with admin(private_pg.url, *raising_on_insert(busy, busy, "40001")):
        pass
    stores = await connect_postgres(private_pg.url, max_size=8, retry=RetryConfig(attempts=3, initial=0.05))
    config = EngineConfig(
        max_failed_runs=1, failed_run_backoff=0, lease_ttl=1, execution_mode=ExecutionMode.PARALLEL
    )
    engine = Engine(stores, reg, config=config)
    try:
        # The budget is there: a case failing for its own reason fails after one run.
        failed = await engine.run_workflow("busy", session_id="outage")
        keys = [(await engine.start_case("long", session_id="outage")).case_key for _ in range(4)]
        ticking = asyncio.create_task(engine.run_until_idle(session_id="outage"))
        await asyncio.wait_for(inside.wait(), 30)
        await asyncio.to_thread(private_pg.stop)
        leave.set()  # the steps end while Postgres is down: their checkpoints cannot be written
        with pytest.raises(Exception):  # noqa: B017 - the store is out of reach, whatever it says
            await ticking
        for _ in range(3):  # the engine keeps trying during the outage, and fails nothing
            with pytest.raises(Exception):  # noqa: B017
                await engine.run_until_idle(session_id="outage")
        await asyncio.to_thread(private_pg.start)
        for _ in range(60):
            await engine.run_until_idle(session_id="outage")
            states = [(await engine.get_case(k)).execution_state for k in keys]
            if all(s is ExecutionState.FINISHED for s in states):
                break
            await asyncio.sleep(0.25)  # the leases of the runs given up expire
        cases = [await engine.get_case(k) for k in keys]
    finally:
        await stores.close()
    assert [c.execution_state for c in cases] == [ExecutionState.FINISHED] * 4, cases
    assert all(c.failures == 0 for c in cases)
    assert all(entered[k] == 2 for k in keys)  # each step ran again after the outage, once
    assert failed.execution_state is ExecutionState.FAILED and runs[failed.case_key] == 1
