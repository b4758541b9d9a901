"""Retention: events older than `event_retention` and, when `history_retention` is set, cases
that ended before it are deleted, by the engine's clock, in library mode and by the scheduler.

Each test runs on a database of its own: retention deletes whatever is old enough, including
other tests' cases and events.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import nats
import pytest

from tests._services import CaseDb, SchedulerProcess, eventually, fresh_database, new_key, request_start
from tianshu_contracts import subjects
from tianshu_core import (
    Engine,
    EngineConfig,
    ExecutionState,
    ManualClock,
    Stores,
    WorkflowContext,
    WorkflowRegistry,
    WorkflowResult,
    connect_postgres,
    memory_stores,
)


def _registry() -> WorkflowRegistry:
    reg = WorkflowRegistry()

    @reg.workflow("quick")
    async def quick(ctx: WorkflowContext) -> WorkflowResult:
        await ctx.step("only", lambda: 1)
        return await ctx.finish("done")

    @reg.workflow("boom")
    async def boom(ctx: WorkflowContext) -> WorkflowResult:
        raise RuntimeError("ended badly")

    @reg.workflow("waits")
    async def waits(ctx: WorkflowContext) -> WorkflowResult:
        await ctx.wait_for_event("order", ctx.case.case_key)
        return await ctx.finish("done")

    return reg


@pytest.fixture(params=["memory", pytest.param("postgres", marks=pytest.mark.postgres)])
async def own_stores(request: pytest.FixtureRequest) -> AsyncIterator[Stores]:
    if request.param == "memory":
        yield memory_stores()
        return
    server: str = request.getfixturevalue("pg_server_url")
    async with fresh_database(server, "tianshu_retention") as url:
        stores = await connect_postgres(url, max_size=2)
        try:
            yield stores
        finally:
            await stores.close()


async def test_purge_expired_applies_both_retentions_by_the_engine_clock(own_stores: Stores) -> None:
    clock = ManualClock()
    config = EngineConfig(event_retention=timedelta(days=1), history_retention=timedelta(days=2))
    engine = Engine(own_stores, _registry(), clock=clock, config=config)
    done = await engine.run_workflow("quick")
    failed = await engine.run_workflow("boom")
    waiting = await engine.run_workflow("waits")
    await engine.publish_event("other", "r1", 1)
    assert (done.execution_state, failed.execution_state) == (ExecutionState.FINISHED, ExecutionState.FAILED)
    clock.advance(days=1, seconds=1)
    fresh = await engine.publish_event("other", "r1", 2)
    assert await engine.purge_expired() == 1  # the first event; no case is old enough yet
    clock.advance(days=1)
    assert await engine.purge_expired(batch=1) == 2  # both ended cases, one per batch
    for key in (done.case_key, failed.case_key):
        assert await own_stores.cases.get_by_key(key) is None
        assert await engine.history(key) == []
    assert (await engine.get_case(waiting.case_key)).execution_state is ExecutionState.WAITING
    kept = await own_stores.events.next_after("other", "r1", after_seq=0, not_before=done.created_at)
    assert kept is not None and kept.seq == fresh.event.seq  # exactly one retention old: kept


async def test_no_history_retention_keeps_every_case(own_stores: Stores) -> None:
    clock = ManualClock()
    engine = Engine(
        own_stores, _registry(), clock=clock, config=EngineConfig(event_retention=timedelta(days=1))
    )
    done = await engine.run_workflow("quick")
    clock.advance(days=3650)
    assert await engine.purge_expired() == 0
    assert (await engine.get_case(done.case_key)).execution_state is ExecutionState.FINISHED


@pytest.mark.e2e
@pytest.mark.nats
@pytest.mark.postgres
async def test_the_scheduler_applies_the_retention_by_itself(
    tmp_path: Path, pg_server_url: str, nats_url: str
) -> None:
    async with fresh_database(pg_server_url, "tianshu_retention") as url:
        scheduler = SchedulerProcess(
            tmp_path,
            url,
            nats_url,
            TIANSHU_EVENT_RETENTION_S="1",
            TIANSHU_HISTORY_RETENTION_S="1",
            TIANSHU_SCHEDULER_RETENTION_INTERVAL_S="0.2",
        )
        nc = await nats.connect(nats_url)
        db = await CaseDb.open(url)
        try:
            with scheduler:
                key = await request_start(nc, "e2e_steps", {"steps": 1}, key=new_key("ret"))
                resource = new_key("nobody")
                await nc.jetstream().publish(subjects.event("order", resource), b"1")

                async def stored() -> bool:
                    return await db.event_count("order", resource) == 1

                async def gone() -> bool:
                    return await db.event_count("order", resource) == 0 and key not in await db.states([key])

                await eventually(stored, what="the event is stored", context=scheduler.log_tail)
                await eventually(gone, what="the case and the event are deleted", context=scheduler.log_tail)
        finally:
            await db.close()
            await nc.close()
