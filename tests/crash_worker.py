"""A worker process for the crash tests: runs workflows against Postgres until it is killed.

usage: crash_worker.py steps  DSN CASE_KEY PAUSE_AFTER    (one 10-step case)
       crash_worker.py many   DSN PREFIX OBSERVED_FILE N   (N concurrent 10-step cases)

The steps of `steps` count their executions in the table of `tests._executions`; after step
PAUSE_AFTER is checkpointed it sleeps, for the test to kill it.
"""

from __future__ import annotations

import asyncio
import os
import sys

from tests import _executions
from tianshu_core import (
    Engine,
    EngineConfig,
    RunStatus,
    WorkflowContext,
    WorkflowRegistry,
    WorkflowResult,
    connect_postgres,
)

LEASE_TTL = 1.0


async def steps(dsn: str, case_key: str, pause_after: int) -> None:
    reg = WorkflowRegistry()

    @reg.workflow("ten")
    async def ten(ctx: WorkflowContext) -> WorkflowResult:
        for i in range(1, 11):

            async def effect(i: int = i) -> int:
                await _executions.record(dsn, case_key, f"s{i}")
                return i

            await ctx.step(f"s{i}", effect)
            if i == pause_after:
                await asyncio.sleep(3600)  # the test SIGKILLs us here
        return await ctx.finish("done")

    stores = await connect_postgres(dsn, max_size=2)
    engine = Engine(stores, reg, config=EngineConfig(lease_ttl=LEASE_TTL))
    await engine.start_case("ten", case_key=case_key)
    for _ in range(600):
        if (await engine.run_case(case_key)).status is not RunStatus.SKIPPED:
            break
        await asyncio.sleep(0.1)  # a killed predecessor's lease has not expired yet
    await stores.close()


async def many(dsn: str, prefix: str, observed: str, n: int) -> None:
    reg = WorkflowRegistry()
    fd = os.open(observed, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    @reg.workflow("many")
    async def many_wf(ctx: WorkflowContext) -> WorkflowResult:
        for i in range(10):

            async def body(i: int = i) -> int:
                await asyncio.sleep(0.005)
                return i

            await ctx.step(f"s{i}", body)
            # The workflow has observed the step's return: its checkpoint must be durable.
            os.write(fd, f"{ctx.case.case_key} s{i}\n".encode())
        return await ctx.finish("done")

    stores = await connect_postgres(dsn, max_size=8)
    engine = Engine(stores, reg, config=EngineConfig(lease_ttl=LEASE_TTL))
    await asyncio.gather(*(engine.run_workflow("many", case_key=f"{prefix}-{i}") for i in range(n)))
    await stores.close()


def main() -> None:
    mode, dsn = sys.argv[1], sys.argv[2]
    if mode == "steps":
        asyncio.run(steps(dsn, sys.argv[3], int(sys.argv[4])))
    else:
        asyncio.run(many(dsn, sys.argv[3], sys.argv[4], int(sys.argv[5])))


if __name__ == "__main__":
    main()
