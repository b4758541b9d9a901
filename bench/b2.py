"""Workload B2 on the service: wake latency through NATS.

A scheduler runs as its own process against this run's database and a nats-server of its own.
Each case waits for an event; the benchmark publishes the event with plain nats-py and times
until the woken case's next step is committed. The commit is observed exactly: a trigger on the
journal (installed in this benchmark's database only) sends NOTIFY, which Postgres delivers at
commit, to a LISTEN of the benchmark's.

- sequential: B2_N cases (default 100, after 5 for warm-up), woken one at a time →
  b2_wake_p50_ms, b2_wake_p99_ms. As in the DBOS anchor (anchors/dbos_wake.py), every case is
  started and waiting before the first event, and each event is published as soon as the last
  woken step's commit has been seen;
- burst: B2_BURST cases (default 1,000) waiting on one resource, woken by one event → the time
  until all of them have committed their next step, b2_burst_1000_s.

Usage: python -m bench.b2     (from the repo root; database URL from BENCH_PG_URL)
Prints: 'tianshu b2_wake_p50_ms=… b2_wake_p99_ms=… b2_burst_1000_s=…'.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import asyncpg
import nats
from nats.aio.client import Client

from bench.loadgen import env_int, info, p50, pg_url
from tianshu_core.stores.postgres import migrate

ROOT = Path(__file__).resolve().parent.parent
TRIGGER = """
CREATE OR REPLACE FUNCTION bench_b2_notify() RETURNS trigger AS $$
BEGIN
    PERFORM pg_notify('bench_b2', NEW.case_key);
    RETURN NEW;
END $$ LANGUAGE plpgsql;
DROP TRIGGER IF EXISTS bench_b2_after ON tianshu_journal;
CREATE TRIGGER bench_b2_after AFTER INSERT ON tianshu_journal
    FOR EACH ROW WHEN (NEW.kind = 'step' AND NEW.name = 'after') EXECUTE FUNCTION bench_b2_notify();
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]


class Services:
    """A nats-server and a scheduler (running the workflows of module `workflows`), as processes."""

    def __init__(self, url: str, workdir: Path, workflows: str = "bench.b2_workflows") -> None:
        self.port = free_port()
        self.nats_url = f"nats://127.0.0.1:{self.port}"
        self.ready = workdir / "scheduler.ready"
        binary = Path(sys.executable).with_name("nats-server")
        self.nats = subprocess.Popen(
            [str(binary), "-a", "127.0.0.1", "-p", str(self.port), "-js", "-sd", str(workdir / "js")],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        env = {
            **os.environ,
            "PYTHONPATH": str(ROOT),
            "TIANSHU_DATABASE_URL": url,
            "TIANSHU_NATS_URL": self.nats_url,
            "TIANSHU_WORKFLOWS": workflows,
            "TIANSHU_SCHEDULER_READY_FILE": str(self.ready),
            "TIANSHU_LOG_LEVEL": "WARNING",
        }
        self.scheduler: subprocess.Popen[bytes] | None = None
        self._env = env
        self._log = workdir / "scheduler.log"

    def start_scheduler(self) -> None:
        deadline = time.monotonic() + 30
        while True:  # the nats-server first
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                if self.nats.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit("bench: nats-server did not start") from None
                time.sleep(0.02)
        with self._log.open("ab") as log:
            self.scheduler = subprocess.Popen(
                [sys.executable, "-m", "tianshu_scheduler"],
                env=self._env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 60
        while not self.ready.exists():
            if self.scheduler.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("bench: the scheduler did not start:\n" + self._log.read_text()[-3000:])
            time.sleep(0.02)

    def stop(self) -> None:
        for proc in (self.scheduler, self.nats):
            if proc is not None and proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()


async def start_cases(nc: Client, resource_of: list[str]) -> list[str]:
    keys = [f"b2-{uuid.uuid4().hex[:16]}" for _ in resource_of]
    js = nc.jetstream()
    for key, resource in zip(keys, resource_of, strict=True):
        body = {"kind": "start_case", "workflow_code": "b2", "case_key": key, "input": {"resource": resource}}
        await js.publish("tianshu.v1.cases.start", json.dumps(body).encode(), headers={"Nats-Msg-Id": key})
    return keys


async def wait_waiting(conn: asyncpg.Connection, keys: list[str]) -> None:
    deadline = time.monotonic() + 300
    while True:
        n = await conn.fetchval(
            "SELECT count(*) FROM tianshu_cases WHERE case_key = ANY($1) AND execution_state = 'waiting'",
            keys,
        )
        if n == len(keys):
            return
        if time.monotonic() > deadline:
            raise SystemExit(f"b2: only {n} of {len(keys)} cases reached waiting")
        await asyncio.sleep(0.05)


class Commits:
    """Step commits seen through LISTEN: a future per awaited case, and a count for the burst."""

    def __init__(self) -> None:
        self.awaited: dict[str, asyncio.Future[float]] = {}
        self.burst: set[str] = set()
        self.burst_seen: set[str] = set()
        self.burst_done = asyncio.Event()

    def __call__(self, _conn: object, _pid: int, _channel: str, payload: object) -> None:
        key, now = str(payload), time.perf_counter()
        future = self.awaited.pop(key, None)
        if future is not None and not future.done():
            future.set_result(now)
        if key in self.burst:
            self.burst_seen.add(key)
            if len(self.burst_seen) == len(self.burst):
                self.burst_done.set()


async def main() -> None:
    url = pg_url()
    n = env_int("B2_N", 100)
    burst = env_int("B2_BURST", 1000)
    await migrate(url)
    setup = await asyncpg.connect(url)
    await setup.execute(TRIGGER)
    listener = await asyncpg.connect(url)
    commits = Commits()
    await listener.add_listener("bench_b2", commits)
    with tempfile.TemporaryDirectory(prefix="tianshu-b2-") as tmp:
        services = Services(url, Path(tmp))
        try:
            services.start_scheduler()
            nc = await nats.connect(services.nats_url)
            js = nc.jetstream()
            # Sequential wakes, one at a time, after a few for warm-up: as the anchor does, every
            # case is waiting before the first event, and each event follows the last commit.
            resources = [f"seq-{uuid.uuid4().hex[:12]}" for _ in range(n + 5)]
            keys = await start_cases(nc, resources)
            await wait_waiting(setup, keys)
            latencies: list[float] = []
            for i, (key, resource) in enumerate(zip(keys, resources, strict=True)):
                committed = asyncio.get_running_loop().create_future()
                commits.awaited[key] = committed
                t0 = time.perf_counter()
                await js.publish(f"tianshu.v1.events.b2.{resource}", b'{"go": true}')
                t1 = await asyncio.wait_for(committed, 30)
                if i >= 5:
                    latencies.append((t1 - t0) * 1000)
            info(f"b2: {len(latencies)} sequential wakes")
            # The burst: many cases on one resource, woken by a single event.
            shared = f"burst-{uuid.uuid4().hex[:12]}"
            keys = await start_cases(nc, [shared] * burst)
            await wait_waiting(setup, keys)
            commits.burst = set(keys)
            t0 = time.perf_counter()
            await js.publish(f"tianshu.v1.events.b2.{shared}", b'{"go": true}')
            await asyncio.wait_for(commits.burst_done.wait(), 600)
            burst_s = time.perf_counter() - t0
            info(f"b2: burst of {burst} woken by one event in {burst_s:.3f} s")
            await nc.close()
        finally:
            services.stop()
    await listener.close()
    await setup.close()
    print(
        f"tianshu b2_wake_p50_ms={p50(latencies):.3f} b2_wake_p99_ms={p99(latencies):.3f} "
        f"b2_burst_{burst}_s={burst_s:.3f}",
        flush=True,
    )


if __name__ == "__main__":
    asyncio.run(main())
