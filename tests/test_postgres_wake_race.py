"""No lost wake-up under concurrency: a park (`PostgresCaseStore.park`) that overlaps a publish on
a resource it waits on, or the last save of a child it awaits, orders itself after it and sees it.
And the sweep's safety net (`wake_met`) costs a bounded range of the waits, however many wait."""

from __future__ import annotations

import asyncio
import json
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

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
from tianshu_core.stores.postgres.waits import _WAKE_MET

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


def _scans(plan: dict[str, Any]) -> list[dict[str, Any]]:
    """Every node of an EXPLAIN (FORMAT JSON) plan, depth first."""
    return [plan, *(node for child in plan.get("Plans", []) for node in _scans(child))]


async def test_the_sweep_reads_a_bounded_range_of_the_waits_whatever_their_number(
    pg_migrated_url: str,
) -> None:
    """`wake_met` looks at `limit` waits through the waits' primary key, and probes the cases and
    events by index for those alone: never the whole table of waiting cases."""
    prefix, n, limit = f"many-{uuid.uuid4().hex[:8]}", 5000, 20
    conn = await asyncpg.connect(pg_migrated_url)
    try:
        await conn.execute(
            "INSERT INTO tianshu_cases (case_key, session_id, workflow_code, execution_state, lifecycle, "
            "created_at, updated_at) SELECT $1 || i, $1 || i, 'waiter', 'waiting', 'normal', now(), now() "
            "FROM generate_series(1, $2) AS i",
            prefix,
            n,
        )
        await conn.execute(
            "INSERT INTO tianshu_waits (case_key, position, resource_type, resource_id, step_name) "
            "SELECT $1 || i, 1, 'order', $1 || i, 'e' FROM generate_series(1, $2) AS i",
            prefix,
            n,
        )
        await conn.execute(  # events on other resources: the probes must not read them
            "INSERT INTO tianshu_events (resource_type, resource_id, payload, published_at) "
            "SELECT 'other', $1 || i, '1', now() FROM generate_series(1, $2) AS i",
            prefix,
            n,
        )
        await conn.execute("ANALYZE tianshu_cases; ANALYZE tianshu_waits; ANALYZE tianshu_events")
        # None of them has its event: the statement reads and changes nothing else.
        plan_text = await conn.fetchval(f"EXPLAIN (ANALYZE, FORMAT JSON) {_WAKE_MET}", prefix, 0, limit)
        nodes = _scans(json.loads(plan_text)[0]["Plan"])
        for node in nodes:
            if node.get("Relation Name") in ("tianshu_waits", "tianshu_cases", "tianshu_events"):
                assert node["Node Type"] != "Seq Scan", node
                assert node["Actual Rows"] * node["Actual Loops"] <= limit, node
        assert any(
            node.get("Index Name") == "tianshu_waits_pkey" and node["Actual Rows"] == limit for node in nodes
        )
    finally:
        await conn.execute("DELETE FROM tianshu_events WHERE resource_id LIKE $1 || '%'", prefix)
        await conn.execute("DELETE FROM tianshu_waits WHERE case_key LIKE $1 || '%'", prefix)
        await conn.execute("DELETE FROM tianshu_cases WHERE case_key LIKE $1 || '%'", prefix)
        await conn.close()
