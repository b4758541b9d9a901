"""Workload B6 on the service: a parent of N children, each child one no-op step.

A scheduler runs as its own process against this run's database and a nats-server of its own
(as in B2). For N = 10, 100 and 1,000 (after one N = 10 for warm-up), a parent case is started
through NATS; it spawns N children, awaits them all and then commits one step, which the
benchmark sees exactly (a trigger on the journal sends NOTIFY at commit, to its LISTEN). The time
from the start to that commit, divided by N, is the time per child. A parent is woken once, by its
last child, and reads its children once more: the cost per child stays flat as N grows.

Usage: python -m bench.b6     (from the repo root; database URL from BENCH_PG_URL)
Prints: 'tianshu b6_children_per_child_ratio_1000_10=… b6_per_child_ms_10=… b6_per_child_ms_100=…
b6_per_child_ms_1000=…' (the ratio: time per child at N = 1,000 over that at N = 10).
"""

from __future__ import annotations

import asyncio
import json
import tempfile
import time
import uuid
from pathlib import Path

import asyncpg
import nats

from bench.b2 import Services
from bench.loadgen import info, pg_url
from tianshu_core.stores.postgres import migrate

SIZES = (10, 100, 1000)
TRIGGER = """
CREATE OR REPLACE FUNCTION bench_b6_notify() RETURNS trigger AS $$
BEGIN
    PERFORM pg_notify('bench_b6', NEW.case_key);
    RETURN NEW;
END $$ LANGUAGE plpgsql;
DROP TRIGGER IF EXISTS bench_b6_after ON tianshu_journal;
CREATE TRIGGER bench_b6_after AFTER INSERT ON tianshu_journal
    FOR EACH ROW WHEN (NEW.kind = 'step' AND NEW.name = 'b6_done') EXECUTE FUNCTION bench_b6_notify();
"""


async def main() -> None:
    url = pg_url()
    await migrate(url)
    setup = await asyncpg.connect(url)
    await setup.execute(TRIGGER)
    listener = await asyncpg.connect(url)
    done: dict[str, asyncio.Future[float]] = {}

    def on_commit(_conn: object, _pid: int, _channel: str, payload: object) -> None:
        future = done.get(str(payload))
        if future is not None and not future.done():
            future.set_result(time.perf_counter())

    await listener.add_listener("bench_b6", on_commit)
    per_child: dict[int, float] = {}
    with tempfile.TemporaryDirectory(prefix="tianshu-b6-") as tmp:
        services = Services(url, Path(tmp), workflows="bench.b6_workflows")
        try:
            services.start_scheduler()
            nc = await nats.connect(services.nats_url)
            js = nc.jetstream()
            for n in (SIZES[0], *SIZES):  # the first for warm-up
                key = f"b6-{n}-{uuid.uuid4().hex[:12]}"
                done[key] = asyncio.get_running_loop().create_future()
                body = {
                    "kind": "start_case",
                    "workflow_code": "b6_parent",
                    "case_key": key,
                    "input": {"children": n},
                }
                t0 = time.perf_counter()
                await js.publish(
                    "tianshu.v1.cases.start", json.dumps(body).encode(), headers={"Nats-Msg-Id": key}
                )
                t1 = await asyncio.wait_for(done[key], 600)
                per_child[n] = (t1 - t0) / n * 1000
                info(f"b6: a parent of {n} children in {t1 - t0:.3f} s, {per_child[n]:.3f} ms a child")
            await nc.close()
        finally:
            services.stop()
    await listener.close()
    await setup.close()
    ratio = per_child[SIZES[-1]] / per_child[SIZES[0]]
    figures = " ".join(f"b6_per_child_ms_{n}={per_child[n]:.3f}" for n in SIZES)
    print(f"tianshu b6_children_per_child_ratio_1000_10={ratio:.3f} {figures}", flush=True)


if __name__ == "__main__":
    asyncio.run(main())
