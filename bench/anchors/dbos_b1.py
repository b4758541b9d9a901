"""Anchor B1 on DBOS Transact 3.4.0: no-op durable steps on Postgres, throughput.

Workflows of B1_S no-op `@DBOS.step`s, B1_C at a time, under bench/loadgen.py's load rule
(at least B1_N workflows and at least B1_MIN_SECONDS). Adapted from the shared anchors'
dbos_bench.py; runs in the anchors' own virtualenv (bench/run makes it).
Usage: PYTHONPATH=<repo root> python bench/anchors/dbos_b1.py  (database URL: BENCH_PG_URL)
Prints one line: 'dbos steps_per_s=<float>'.
"""

import asyncio

from dbos import DBOS, DBOSConfig

from bench.loadgen import B1Params, drive, info, pg_url

DBOS(config=DBOSConfig(name="bench-b1", system_database_url=pg_url()))


@DBOS.step()
async def noop(i: int) -> int:
    return i


@DBOS.workflow()
async def wf(n: int) -> int:
    total = 0
    for i in range(n):
        total += await noop(i)
    return total


async def main() -> None:
    params = B1Params.from_env()
    DBOS.launch()
    try:
        await wf(2)  # warm-up
        run = await drive(
            lambda: wf(params.steps),
            min_n=params.n,
            concurrency=params.concurrency,
            min_seconds=params.min_seconds,
        )
    finally:
        DBOS.destroy()
    info(
        f"dbos: {run.count} workflows x {params.steps} steps, {params.concurrency} at a time, "
        f"in {run.seconds:.2f} s"
    )
    print(f"dbos steps_per_s={run.rate(params.steps):.1f}", flush=True)


asyncio.run(main())
