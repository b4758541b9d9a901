"""Transient Postgres failures, exercised: the engine's connections are killed mid-run."""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter

import asyncpg
import pytest

from tianshu_core import (
    Engine,
    EngineConfig,
    ExecutionMode,
    ExecutionState,
    WorkflowContext,
    WorkflowRegistry,
    WorkflowResult,
    connect_postgres,
)

pytestmark = pytest.mark.postgres


async def test_killed_connections_mid_run_lose_nothing_and_redo_nothing(pg_migrated_url: str) -> None:
    ran: Counter[str] = Counter()
    reg = WorkflowRegistry()

    @reg.workflow("steady")
    async def steady(ctx: WorkflowContext) -> WorkflowResult:
        for i in range(10):

            async def body(i: int = i) -> int:
                ran[f"{ctx.case.case_key}/s{i}"] += 1
                await asyncio.sleep(0.002)
                return i

            await ctx.step(f"s{i}", body)
        return await ctx.finish("done")

    stores = await connect_postgres(pg_migrated_url, max_size=6)
    session = f"kill-{uuid.uuid4().hex[:8]}"
    engine = Engine(
        stores, reg, config=EngineConfig(lease_ttl=2, execution_mode=ExecutionMode.PARALLEL, max_parallel=40)
    )
    keys = [(await engine.start_case("steady", session_id=session)).case_key for _ in range(40)]
    admin = await asyncpg.connect(pg_migrated_url)
    killed = 0

    async def killer() -> None:
        nonlocal killed
        for _ in range(5):
            await asyncio.sleep(0.05)
            rows = await admin.fetch(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid() "
                "AND application_name LIKE 'tianshu%'"
            )
            killed += len(rows)

    try:
        kill_task = asyncio.create_task(killer())
        for _ in range(200):
            await engine.run_until_idle(session_id=session)
            done = [await engine.get_case(k) for k in keys]
            if all(c.execution_state is ExecutionState.FINISHED for c in done) and kill_task.done():
                break
            await asyncio.sleep(0.2)  # leases of abandoned runs expire
        await kill_task
    finally:
        await admin.close()
        await stores.close()
    assert killed > 0, "no connection was killed: the test proved nothing"
    assert all(c.execution_state is ExecutionState.FINISHED for c in done)
    twice = {step: n for step, n in ran.items() if n > 1}
    assert not twice, f"steps run twice: {twice}"
    assert len(ran) == 400
