"""Workload B7, part one: a case's wake costs the same when it is old as when it is young.

B7_CASES cases (default 20) each run B7_STEPS no-op steps (200), then wait for an event B7_WAKES
times (100): every wake replays the steps and the events consumed before, consumes the new event
and waits again. What a wake replays grows by one event record per wake; what it stores and
reads must not grow otherwise.
The engine runs in library mode on Postgres; each wake is one `publish_event` that takes the
woken case's lease, and the run of that case until it waits again (or finishes), timed from the
publish to the run's end. The cases take turns, each starting at another round, so that young and
old wakes alternate through the run. Reported: the median of every case's last ten wakes over the
median of their first ten.

Usage: python -m bench.b7      (from the repo root; database URL from BENCH_PG_URL)
Prints: 'tianshu b7_wake_age_ratio=<float> b7_wake_first_p50_ms=<float> b7_wake_last_p50_ms=<float>'.
"""

from __future__ import annotations

import asyncio
import time
import uuid

from bench.loadgen import env_int, info, p50, pg_url
from tianshu_core import (
    Engine,
    ExecutionState,
    WorkflowContext,
    WorkflowRegistry,
    WorkflowResult,
    connect_postgres,
)

registry = WorkflowRegistry()
ROUNDS_COMPARED = 10


def noop() -> int:
    return 1


@registry.workflow("b7")
async def b7(ctx: WorkflowContext) -> WorkflowResult:
    """`steps` no-op steps, then `wakes` waits for the next event on ("b7", the case's key)."""
    for s in range(ctx.case.resource_data["steps"]):
        await ctx.step(f"s{s}", noop)
    for w in range(ctx.case.resource_data["wakes"]):
        await ctx.wait_for_event("b7", ctx.case.case_key, name=f"w{w}")
    return await ctx.finish("done")


async def wake(engine: Engine, key: str) -> float:
    """Publish the case's next event and run it under the lease the publish took; seconds."""
    t0 = time.perf_counter()
    published = await engine.publish_event("b7", key, {"go": True}, take=1)
    (lease,) = published.taken
    await engine.run_case(key, lease=lease)
    return time.perf_counter() - t0


async def main() -> None:
    cases, steps, wakes = env_int("B7_CASES", 20), env_int("B7_STEPS", 200), env_int("B7_WAKES", 100)
    if wakes < 2 * ROUNDS_COMPARED:
        raise SystemExit(f"B7_WAKES must be at least {2 * ROUNDS_COMPARED}")
    stores = await connect_postgres(pg_url(), migrate=True, max_size=4)
    try:
        engine = Engine(stores, registry)
        keys = []
        for _ in range(cases):
            case = await engine.run_workflow(
                "b7", {"steps": steps, "wakes": wakes}, case_key=f"b7-{uuid.uuid4().hex[:12]}"
            )
            keys.append(case.case_key)
        # Staggered: case i starts waking at round i * wakes // cases, so that young and old
        # wakes alternate through the run and a machine that slows down meanwhile weighs on both.
        by_age: list[list[float]] = [[] for _ in range(wakes)]
        starts = [i * wakes // cases for i in range(cases)]
        for turn in range(wakes + starts[-1]):
            for key, start in zip(keys, starts, strict=True):
                if start <= turn < start + wakes:
                    by_age[turn - start].append(await wake(engine, key))
        for key in keys:
            case = await engine.get_case(key)
            if case.execution_state is not ExecutionState.FINISHED:
                raise RuntimeError(f"case {key} ended {case.execution_state.value}, not finished")
        journal = len(await engine.history(keys[0]))
    finally:
        await stores.close()
    first = p50([s for age in by_age[:ROUNDS_COMPARED] for s in age]) * 1e3
    last = p50([s for age in by_age[-ROUNDS_COMPARED:] for s in age]) * 1e3
    info(f"b7: {cases} cases x {wakes} wakes, {steps} steps each; a finished case's journal: {journal} rows")
    print(
        f"tianshu b7_wake_age_ratio={last / first:.3f} b7_wake_first_p50_ms={first:.3f} "
        f"b7_wake_last_p50_ms={last:.3f}",
        flush=True,
    )


if __name__ == "__main__":
    asyncio.run(main())
