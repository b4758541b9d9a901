"""No lost wake-up under concurrency: a park (`PostgresCaseStore.park`) that overlaps a publish on
a resource it waits on, or the last save of a child it awaits, orders itself after it and sees it."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from tianshu_core import (
    Engine,
    ExecutionState,
    SpawnConfig,
    WorkflowContext,
    WorkflowRegistry,
    WorkflowResult,
    connect_postgres,
)

pytestmark = pytest.mark.postgres


def _registry() -> WorkflowRegistry:
    reg = WorkflowRegistry()

    @reg.workflow("waiter")
    async def waiter(ctx: WorkflowContext) -> WorkflowResult:
        return await ctx.finish("done", output=await ctx.wait_for_event("order", ctx.case.resource_data))

    @reg.workflow("child")
    async def child(ctx: WorkflowContext) -> WorkflowResult:
        return await ctx.finish("done", output=1)

    @reg.workflow("parent")
    async def parent(ctx: WorkflowContext) -> WorkflowResult:
        outcomes = await ctx.await_children(await ctx.spawn_children([SpawnConfig("child", name="c")]))
        return await ctx.finish("done", output=[o.output for o in outcomes])

    return reg


async def test_a_park_waits_for_an_in_flight_publish_and_sees_its_event(pg_migrated_url: str) -> None:
    resource = f"race-{uuid.uuid4().hex[:8]}"
    later = datetime.now(UTC) + timedelta(minutes=1)  # published after the case is created
    stores = await connect_postgres(pg_migrated_url, max_size=4)
    publisher = await asyncpg.connect(pg_migrated_url)
    engine = Engine(stores, _registry())
    try:
        publishing = publisher.transaction()
        await publishing.start()
        # A publish-and-wake in flight: its event is stored but not committed, its lock held.
        row = await publisher.fetchrow(
            "SELECT out_woken FROM tianshu_publish_wake_take("
            "'order', $1, '{\"n\": 1}'::jsonb, NULL, $2, $2, 'me', 30, 8)",
            resource,
            later,
        )
        assert row is not None and row["out_woken"] == []  # no case waits yet
        run = asyncio.create_task(engine.run_workflow("waiter", resource))
        await asyncio.sleep(0.3)
        assert not run.done()  # its look saw nothing; its park waits for the publish ...
        await publishing.commit()
        case = await asyncio.wait_for(run, 10)
        # ... and then sees the event: the case is stored running, with no waits, not waiting.
        assert case.execution_state is ExecutionState.RUNNING
        assert await stores.waits.for_case(case.case_key) == []
        await engine.run_until_idle()
        assert (await engine.get_case(case.case_key)).output == {"n": 1}
    finally:
        await publisher.close()
        await stores.close()


async def test_a_park_waits_for_an_in_flight_last_save_of_a_child(pg_migrated_url: str) -> None:
    stores = await connect_postgres(pg_migrated_url, max_size=4)
    saver = await asyncpg.connect(pg_migrated_url)
    engine = Engine(stores, _registry())
    try:
        parent = await engine.run_workflow("parent")
        assert parent.execution_state is ExecutionState.WAITING
        # Run it again (as a spurious wake would) while a last save of its child is in flight
        # (not committed): its park is held back on the child's row, which that save locked.
        assert await stores.cases.mark_runnable([parent.case_key]) == [parent.case_key]
        ending = saver.transaction()
        await ending.start()
        await saver.execute(
            "UPDATE tianshu_cases SET execution_state = 'finished', output = '1' WHERE case_key = $1",
            parent.child_keys[0],
        )
        run = asyncio.create_task(engine.run_case(parent.case_key))
        await asyncio.sleep(0.3)
        assert not run.done()  # the park waits for the child's save ...
        await ending.commit()
        await asyncio.wait_for(run, 10)
        # ... and then counts the child ended: no child left open, the parent is stored running.
        assert (await engine.get_case(parent.case_key)).execution_state is ExecutionState.RUNNING
        await engine.run_until_idle()
        assert (await engine.get_case(parent.case_key)).output == [1]
    finally:
        await saver.close()
        await stores.close()
