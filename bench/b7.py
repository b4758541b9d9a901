"""Workload B7: cost that grows neither with a case's age nor with the size of the tables.

Part one (`python -m bench.b7`, in `make bench` and `make bench-compare`): a case's wake costs the
same when it is old as when it is young.

B7_CASES cases (default 20) each run B7_STEPS no-op steps (200), then wait for an event B7_WAKES
times (100): every wake replays the steps and the events consumed before, consumes the new event
and waits again. What a wake replays grows by one event record per wake; what it stores and
reads must not grow otherwise.
The engine runs in library mode on Postgres; each wake is one `publish_event` that takes the
woken case's lease, and the run of that case until it waits again (or finishes), timed from the
publish to the run's end. One case after the other, each woken back to back, so that its young
and old wakes are close in time. Reported: the median of every case's last ten wakes over the
median of their first ten.

Part two (`python -m bench.b7 big`, `make bench-big`: it loads a million rows, which takes a few
minutes): B1 and B2 on the run's database as it is, and again on a second database holding
B7_ENDED ended cases (default 1,000,000, two journal rows each) and B7_WAITING waiting ones
(10,000, each with its wait, and an event on another resource), bulk-loaded with generate_series
and then vacuumed and analysed, as a database in service would be. In the order empty B1, big B1,
big B2, empty B2, so that a machine that slows down meanwhile weighs on both sides. Reported: B1's
throughput on the empty tables over its throughput on the big ones, and B2's wake p50 on the big
tables over its p50 on the empty ones (both: how much slower the big tables are).

Usage: python -m bench.b7 [big]    (from the repo root; database URL from BENCH_PG_URL; `big`
                                    creates BENCH_PG_URL's database name + "_big" and drops it after)
Prints: 'tianshu b7_wake_age_ratio=<float> b7_wake_first_p50_ms=<float> b7_wake_last_p50_ms=<float>',
or with `big`: 'tianshu b7_b1_big_ratio=<float> b7_b2_big_ratio=<float>' and the four figures.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import uuid
from urllib.parse import urlsplit

import asyncpg

from bench.loadgen import env_int, info, p50, pg_url
from bench.pgdb import recreate, with_database
from tianshu_core import (
    Engine,
    ExecutionState,
    WorkflowContext,
    WorkflowRegistry,
    WorkflowResult,
    connect_postgres,
)
from tianshu_core.stores.postgres import migrate

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
        by_age: list[list[float]] = [[] for _ in range(wakes)]
        # One case at a time, woken back to back: a case's first and last wakes are a second
        # apart, so that a machine whose speed drifts (a shared one) weighs alike on both.
        for _ in range(cases):
            case = await engine.run_workflow(
                "b7", {"steps": steps, "wakes": wakes}, case_key=f"b7-{uuid.uuid4().hex[:12]}"
            )
            keys.append(case.case_key)
            for age in range(wakes):
                by_age[age].append(await wake(engine, case.case_key))
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


# The big tables: ended cases as B1 leaves them (two journal rows each, created over the last
# weeks), waiting cases with a wait each on a resource of their own, and an event per resource
# on others, so that no wait matches.
LOAD_ENDED = [
    """
    INSERT INTO tianshu_cases (case_key, session_id, workflow_code, execution_state, lifecycle, child_keys,
                               resource_data, private_vars, finished_type, finished_description, output,
                               created_at, updated_at, lease_token)
    SELECT 'ended-' || i, 'ended-' || i, 'b1', 'finished', 'normal', '[]', '{"steps": 2}', '{}', 'done', '',
           '{"ok": true}', t, t + interval '1 second', 1
    FROM (SELECT i, now() - interval '60 days' + i * interval '2 seconds' AS t
          FROM generate_series(1, $1::int) AS i) AS s
    """,
    """
    INSERT INTO tianshu_journal (case_key, seq, kind, name, data, token, created_at)
    SELECT 'ended-' || i, n, 'step', 's' || n, '1', 1, now() - interval '1 day'
    FROM generate_series(1, $1::int) AS i, generate_series(1, 2) AS n
    """,
]
LOAD_WAITING = [
    """
    INSERT INTO tianshu_cases (case_key, session_id, workflow_code, execution_state, lifecycle, created_at,
                               updated_at)
    SELECT 'waiting-' || i, 'waiting-' || i, 'b2', 'waiting', 'normal', now() - interval '1 day',
           now() - interval '1 day'
    FROM generate_series(1, $1::int) AS i
    """,
    """
    INSERT INTO tianshu_waits (case_key, position, resource_type, resource_id, step_name)
    SELECT 'waiting-' || i, 1, 'b2', 'idle-' || i, 'wait' FROM generate_series(1, $1::int) AS i
    """,
    """
    INSERT INTO tianshu_events (resource_type, resource_id, event_id, payload, published_at)
    SELECT 'b2', 'other-' || i, 'e' || i, '{"n": 1}', now() - interval '1 hour'
    FROM generate_series(1, $1::int) AS i
    """,
]


async def load_big(url: str, ended: int, waiting: int) -> None:
    """Migrate the database at `url` and fill it (LOAD_ENDED, LOAD_WAITING), then VACUUM ANALYZE it."""
    await migrate(url)
    conn = await asyncpg.connect(url)
    try:
        for statements, count in ((LOAD_ENDED, ended), (LOAD_WAITING, waiting)):
            for statement in statements:
                await conn.execute(statement, count)
        await conn.execute("VACUUM ANALYZE")
    finally:
        await conn.close()


def figures(module: str, url: str) -> dict[str, float]:
    """Run `python -m module` on the database at `url`; the figures of its 'tianshu …' line."""
    done = subprocess.run(
        [sys.executable, "-m", module],
        env={**os.environ, "BENCH_PG_URL": url},
        capture_output=True,
        text=True,
        check=False,
    )
    line = next((ln for ln in done.stdout.splitlines() if ln.startswith("tianshu ")), None)
    if done.returncode != 0 or line is None:
        raise SystemExit(f"b7: {module} on {urlsplit(url).path} failed:\n{done.stderr[-3000:]}")
    pairs = (pair.partition("=") for pair in line.split()[1:])
    return {key: float(value) for key, _, value in pairs}


async def big() -> None:
    ended, waiting = env_int("B7_ENDED", 1_000_000), env_int("B7_WAITING", 10_000)
    empty_url = pg_url()
    big_name = urlsplit(empty_url).path.lstrip("/") + "_big"
    big_url = await recreate(empty_url, big_name)
    try:
        t0 = time.perf_counter()
        await load_big(big_url, ended, waiting)
        info(f"b7: {ended} ended and {waiting} waiting cases loaded in {time.perf_counter() - t0:.1f} s")
        b1_empty = figures("bench.b1", empty_url)
        b1_big = figures("bench.b1", big_url)
        b2_big = figures("bench.b2", big_url)
        b2_empty = figures("bench.b2", empty_url)
    finally:
        admin = await asyncpg.connect(with_database(empty_url, "postgres"))
        try:
            await admin.execute(
                f'DROP DATABASE IF EXISTS "{urlsplit(big_url).path.lstrip("/")}" WITH (FORCE)'
            )
        finally:
            await admin.close()
    b1_ratio = b1_empty["b1_steps_per_s"] / b1_big["b1_steps_per_s"]
    b2_ratio = b2_big["b2_wake_p50_ms"] / b2_empty["b2_wake_p50_ms"]
    print(
        f"tianshu b7_b1_big_ratio={b1_ratio:.3f} b7_b2_big_ratio={b2_ratio:.3f} "
        f"b7_b1_empty_steps_per_s={b1_empty['b1_steps_per_s']:.1f} "
        f"b7_b1_big_steps_per_s={b1_big['b1_steps_per_s']:.1f} "
        f"b7_b2_empty_wake_p50_ms={b2_empty['b2_wake_p50_ms']:.3f} "
        f"b7_b2_big_wake_p50_ms={b2_big['b2_wake_p50_ms']:.3f}",
        flush=True,
    )


if __name__ == "__main__":
    asyncio.run(big() if sys.argv[1:] == ["big"] else main())
