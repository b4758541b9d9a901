"""Workload B1 on tianshu: no-op durable steps on Postgres, throughput and per-step latency.

Throughput: workflows of B1_S no-op `ctx.step`s, B1_C at a time, under the load rule of
bench/loadgen.py (at least B1_N workflows and at least B1_MIN_SECONDS), in steps per second.
Latency: B1_SEQ_N workflows (default 100) run one at a time; each `await ctx.step(...)` is
timed inside the workflow, and the median over all those steps is reported.

Usage: python -m bench.b1      (from the repo root; database URL from BENCH_PG_URL, which
                                bench/run creates fresh)
Prints exactly one line: 'tianshu b1_steps_per_s=<float> b1_seq_step_p50_ms=<float>'.
"""

from __future__ import annotations

import asyncio
import time
from functools import partial

from bench.loadgen import B1Params, drive, env_int, info, p50, pg_url
from tianshu_core import (
    Engine,
    ExecutionState,
    WorkflowContext,
    WorkflowRegistry,
    WorkflowResult,
    connect_postgres,
)

POOL_SIZE = 16  # the connections the asyncpg floor gets too
WARMUP = 5

registry = WorkflowRegistry()
step_seconds: list[float] = []  # filled by b1_timed


def noop(i: int) -> int:
    return i


@registry.workflow("b1")
async def b1(ctx: WorkflowContext) -> WorkflowResult:
    n = ctx.case.resource_data["steps"]
    for i in range(n):
        await ctx.step(f"s{i}", partial(noop, i))
    return await ctx.finish("done")


@registry.workflow("b1_timed")
async def b1_timed(ctx: WorkflowContext) -> WorkflowResult:
    """`b1`, with the time each step takes as the workflow sees it."""
    n = ctx.case.resource_data["steps"]
    for i in range(n):
        t0 = time.perf_counter()
        await ctx.step(f"s{i}", partial(noop, i))
        step_seconds.append(time.perf_counter() - t0)
    return await ctx.finish("done")


async def run_one(engine: Engine, code: str, steps: int) -> None:
    case = await engine.run_workflow(code, {"steps": steps})
    if case.execution_state is not ExecutionState.FINISHED:
        raise RuntimeError(f"case {case.case_key} ended {case.execution_state.value}, not finished")


async def main() -> None:
    params = B1Params.from_env()
    seq_n = env_int("B1_SEQ_N", 100)
    stores = await connect_postgres(pg_url(), migrate=True, max_size=POOL_SIZE)
    try:
        engine = Engine(stores, registry)
        for _ in range(WARMUP):
            await run_one(engine, "b1", params.steps)
        for _ in range(seq_n):
            await run_one(engine, "b1_timed", params.steps)
        run = await drive(
            lambda: run_one(engine, "b1", params.steps),
            min_n=params.n,
            concurrency=params.concurrency,
            min_seconds=params.min_seconds,
        )
    finally:
        await stores.close()
    info(
        f"tianshu: {run.count} workflows x {params.steps} steps, {params.concurrency} at a time, "
        f"in {run.seconds:.2f} s; sequential: {len(step_seconds)} steps timed"
    )
    print(
        f"tianshu b1_steps_per_s={run.rate(params.steps):.1f} "
        f"b1_seq_step_p50_ms={p50(step_seconds) * 1e3:.3f}",
        flush=True,
    )


if __name__ == "__main__":
    asyncio.run(main())
