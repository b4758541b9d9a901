"""Anchor B2 on DBOS Transact 3.4.0: wake latency of a waiting workflow (not in compare yet).

B2_N (default 100) workflows block in DBOS.recv; each is sent one message in turn, and the
time from send to the completion of its next durable step is taken. Adapted from the shared
anchors' dbos_wake.py.
Usage: PYTHONPATH=<repo root> python bench/anchors/dbos_wake.py  (database URL: BENCH_PG_URL)
Prints one line: 'dbos wake_p50_ms=<float> wake_p99_ms=<float>'.
"""

import asyncio
import time

from dbos import DBOS, DBOSConfig

from bench.loadgen import env_int, info, pg_url

DBOS(config=DBOSConfig(name="bench-wake", system_database_url=pg_url()))
done: dict[int, float] = {}


@DBOS.step()
async def mark(i: int) -> None:
    done[i] = time.perf_counter()


@DBOS.workflow()
async def waiter(i: int) -> None:
    await DBOS.recv_async("go", timeout_seconds=120)
    await mark(i)


async def main() -> None:
    n = env_int("B2_N", 100)
    DBOS.launch()
    try:
        handles = [await DBOS.start_workflow_async(waiter, i) for i in range(n)]
        await asyncio.sleep(2)  # let every workflow reach its recv
        lat = []
        for i, h in enumerate(handles):
            t0 = time.perf_counter()
            await DBOS.send_async(h.workflow_id, "x", "go")
            await h.get_result()
            lat.append((done[i] - t0) * 1e3)
    finally:
        DBOS.destroy()
    lat.sort()
    p50 = lat[len(lat) // 2]
    p99 = lat[max(0, int(len(lat) * 0.99) - 1)]
    info(f"dbos wake: {n} workflows woken one at a time")
    print(f"dbos wake_p50_ms={p50:.2f} wake_p99_ms={p99:.2f}", flush=True)


asyncio.run(main())
