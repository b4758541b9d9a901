"""The floor under B1: one durable autocommit upsert per step, straight through asyncpg.

Sequential: one connection, FLOOR_SEQ_N (default 1000) upserts one after another, each timed;
the median is the single-commit round trip a one-commit-per-step design cannot beat.
Concurrent: FLOOR_C (default 16) pooled connections under bench/loadgen.py's load rule (at
least FLOOR_N (3000) commits and at least B1_MIN_SECONDS), in commits per second.
Adapted from the shared anchors' pg_limit.py (same table and statement).
Usage: PYTHONPATH=<repo root> python bench/anchors/asyncpg_floor.py  (database URL: BENCH_PG_URL)
Prints one line: 'asyncpg commit_p50_ms=<float> commits_per_s=<float>'.
"""

import asyncio
import itertools
import time

import asyncpg

from bench.loadgen import drive, env_float, env_int, info, p50, pg_url

UPSERT = "INSERT INTO anchor_raw VALUES ($1, $2, $3) ON CONFLICT (k, s) DO UPDATE SET v = excluded.v"
WARMUP = 50


async def main() -> None:
    url = pg_url()
    seq_n = env_int("FLOOR_SEQ_N", 1000)
    n, conc = env_int("FLOOR_N", 3000), env_int("FLOOR_C", 16)
    min_seconds = env_float("B1_MIN_SECONDS", 5.0)
    counter = itertools.count()

    def args() -> tuple[str, str, str]:
        i = next(counter)
        return f"c{i % 100}", f"s{i}", "x" * 100

    conn = await asyncpg.connect(url)
    try:
        await conn.execute(
            "DROP TABLE IF EXISTS anchor_raw;"
            " CREATE TABLE anchor_raw (k text, s text, v text, PRIMARY KEY (k, s))"
        )
        for _ in range(WARMUP):
            await conn.execute(UPSERT, *args())
        lat = []
        for _ in range(seq_n):
            t0 = time.perf_counter()
            await conn.execute(UPSERT, *args())
            lat.append(time.perf_counter() - t0)
    finally:
        await conn.close()

    pool = await asyncpg.create_pool(url, min_size=conc, max_size=conc)
    try:
        run = await drive(
            lambda: pool.execute(UPSERT, *args()), min_n=n, concurrency=conc, min_seconds=min_seconds
        )
    finally:
        await pool.close()
    info(
        f"asyncpg: {seq_n} sequential commits on one connection; {run.count} commits on {conc} "
        f"connections in {run.seconds:.2f} s"
    )
    print(f"asyncpg commit_p50_ms={p50(lat) * 1e3:.3f} commits_per_s={run.rate():.1f}", flush=True)


asyncio.run(main())
