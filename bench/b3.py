"""Workload B3 on the services: a tool call's round trip, and the tool runners' scale-out.

A nats-server, a scheduler and tool runners run as processes of their own (the scheduler against
this run's database), serving `bench.b3_workflows`.

- round trip: one case makes B3_N (default 200) sequential calls of a no-op tool, after B3_WARMUP
  (default 20) more, each timed inside the scheduler around the engine's tool executor (what
  `ctx.tool_step` waits for per call: the call published to JetStream, taken by a runner, run, its
  result published and received) → b3_tool_rt_p50_ms, b3_tool_rt_p99_ms. For reference (on stderr):
  the same calls timed around their whole step (the checkpoint included), and a one-call
  `ctx.tool_step` (two model replies, the call, four checkpoints).
- scale-out: 30 cases, each of whose model asks for ten 100 ms read-only calls in one reply,
  runners of concurrency 4; the time from the moment every runner is ready until every case has
  finished, with one runner over that with three → b3_scale_1_to_3.
- the floor: a bare nats-py request/reply on the same server, to a responder in another process
  (B3_RR_N, default 2000, after 200 for warm-up) → nats_rr_p50_ms.

Usage: python -m bench.b3     (from the repo root; database URL from BENCH_PG_URL)
Prints: 'tianshu b3_tool_rt_p50_ms=… b3_tool_rt_p99_ms=… b3_scale_1_to_3=… nats_rr_p50_ms=…'.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import asyncpg
import nats
from nats.aio.client import Client
from nats.aio.msg import Msg

from bench.b2 import free_port, p99
from bench.loadgen import env_int, info, p50, pg_url
from tianshu_core.stores.postgres import migrate

ROOT = Path(__file__).resolve().parent.parent
RR_SUBJECT = "bench.b3.rr"
SCALE_CASES, SCALE_CALLS, SCALE_SECONDS = 30, 10, 0.1


class Process:
    """A service process that signals readiness with a file; its output goes to a log file."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], workdir: Path) -> None:
        self.name = name
        self.ready = workdir / f"{name}.ready"
        self.log = workdir / f"{name}.log"
        self.ready.unlink(missing_ok=True)
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not self.ready.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"b3: {self.name} did not start:\n" + self.log.read_text()[-3000:])
            time.sleep(0.01)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class Services:
    """The nats-server, the scheduler and the runners of one run."""

    def __init__(self, db_url: str, workdir: Path) -> None:
        self.workdir = workdir
        port = free_port()
        self.nats_url = f"nats://127.0.0.1:{port}"
        binary = Path(sys.executable).with_name("nats-server")
        self.nats = subprocess.Popen(
            [str(binary), "-a", "127.0.0.1", "-p", str(port), "-js", "-sd", str(workdir / "js")],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.env = {
            **os.environ,
            "PYTHONPATH": str(ROOT),
            "TIANSHU_DATABASE_URL": db_url,
            "TIANSHU_NATS_URL": self.nats_url,
            "TIANSHU_LOG_LEVEL": "WARNING",
        }
        self.scheduler: Process | None = None
        self.runners: list[Process] = []
        self.responder: subprocess.Popen[bytes] | None = None

    async def wait_nats(self) -> None:
        deadline = time.monotonic() + 30
        while True:
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", int(self.nats_url.rsplit(":", 1)[1]))
                writer.close()
                await writer.wait_closed()
                return
            except OSError:
                if self.nats.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit("b3: nats-server did not start") from None
                await asyncio.sleep(0.02)

    def start_scheduler(self) -> None:
        env = {
            **self.env,
            "TIANSHU_WORKFLOWS": "bench.b3_workflows",
            "TIANSHU_SCHEDULER_MAX_RUNS": "64",
            "TIANSHU_SCHEDULER_READY_FILE": str(self.workdir / "scheduler.ready"),
        }
        self.scheduler = Process("scheduler", [sys.executable, "-m", "tianshu_scheduler"], env, self.workdir)
        self.scheduler.wait_ready()

    def start_runners(self, n: int) -> None:
        """Start `n` runners side by side; return once every one is ready."""
        started = []
        for _ in range(n):
            name = f"runner-{uuid.uuid4().hex[:6]}"
            env = {
                **self.env,
                "TIANSHU_TOOLS": "bench.b3_workflows",
                "TIANSHU_TOOL_RUNNER_NAME": name,
                "TIANSHU_TOOL_RUNNER_CONCURRENCY": "4",
                "TIANSHU_TOOL_RUNNER_READY_FILE": str(self.workdir / f"{name}.ready"),
            }
            started.append(Process(name, [sys.executable, "-m", "tianshu_tool_runner"], env, self.workdir))
        for runner in started:
            runner.wait_ready()
        self.runners.extend(started)

    def stop_runners(self) -> None:
        for runner in self.runners:
            runner.stop()
        self.runners = []

    def stop(self) -> None:
        self.stop_runners()
        if self.scheduler is not None:
            self.scheduler.stop()
        for proc in (self.responder, self.nats):
            if proc is not None and proc.poll() is None:
                proc.terminate()
                proc.wait(timeout=30)


async def start_case(nc: Client, code: str, input: Any) -> str:
    key = f"b3-{uuid.uuid4().hex[:16]}"
    body = {"kind": "start_case", "workflow_code": code, "case_key": key, "input": input}
    reply = json.loads(
        (await nc.request("tianshu.v1.rpc.cases.start", json.dumps(body).encode(), timeout=30)).data
    )
    if reply.get("kind") != "start_case_accepted":
        raise SystemExit(f"b3: case not started: {reply}")
    return key


async def wait_finished(conn: asyncpg.Connection, keys: list[str], timeout_s: float = 600.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        rows = await conn.fetch(
            "SELECT execution_state, count(*) AS n FROM tianshu_cases WHERE case_key = ANY($1) "
            "GROUP BY execution_state",
            keys,
        )
        states = {r["execution_state"]: r["n"] for r in rows}
        if states.get("failed"):
            failed = await conn.fetch(
                "SELECT case_key, error::text FROM tianshu_cases WHERE case_key = ANY($1) "
                "AND execution_state = 'failed' LIMIT 3",
                keys,
            )
            raise SystemExit(f"b3: cases failed: {[tuple(r) for r in failed]}")
        if states.get("finished", 0) == len(keys):
            return
        if time.monotonic() > deadline:
            raise SystemExit(f"b3: cases not finished after {timeout_s:g} s: {states}")
        await asyncio.sleep(0.005)


async def output(conn: asyncpg.Connection, key: str) -> Any:
    return json.loads(await conn.fetchval("SELECT output::text FROM tianshu_cases WHERE case_key = $1", key))


# -- the parts ---------------------------------------------------------------------------------


async def nats_rr(services: Services, n: int, warmup: int = 200) -> float:
    """p50 (ms) of a bare request/reply to a responder in another process."""
    services.responder = subprocess.Popen(  # noqa: ASYNC220 - started once, before anything is timed
        [sys.executable, "-m", "bench.b3", "responder", services.nats_url],
        env=services.env,
        stdout=subprocess.PIPE,
    )
    assert services.responder.stdout is not None
    line = await asyncio.to_thread(services.responder.stdout.readline)  # 'ready' once subscribed
    if line.strip() != b"ready":
        raise SystemExit("b3: the request/reply responder did not start")
    nc = await nats.connect(services.nats_url)
    try:
        times = []
        for i in range(warmup + n):
            started = time.perf_counter()
            await nc.request(RR_SUBJECT, b"ping", timeout=5)
            if i >= warmup:
                times.append((time.perf_counter() - started) * 1000)
    finally:
        await nc.close()
        services.responder.terminate()
        services.responder.wait(timeout=30)
    return p50(times)


async def responder(url: str) -> None:
    """The other end of the bare request/reply: answers every request at once."""
    nc = await nats.connect(url)

    async def answer(msg: Msg) -> None:
        await msg.respond(b"pong")

    await nc.subscribe(RR_SUBJECT, cb=answer)
    await nc.flush()
    print("ready", flush=True)
    await asyncio.Event().wait()


async def scale_run(services: Services, nc: Client, conn: asyncpg.Connection, n_runners: int) -> float:
    """Seconds from the moment `n_runners` are ready until the 30 cases of ten naps have finished."""
    services.start_runners(n_runners)
    spec = {"calls": SCALE_CALLS, "seconds": SCALE_SECONDS}
    started = time.perf_counter()
    keys = await asyncio.gather(*(start_case(nc, "b3_scale", spec) for _ in range(SCALE_CASES)))
    await wait_finished(conn, keys)
    elapsed = time.perf_counter() - started
    services.stop_runners()
    recorded = await conn.fetchval(
        "SELECT count(*) FROM tianshu_journal WHERE case_key = ANY($1) AND kind = 'step' "
        "AND name LIKE 'naps/r%/call/%'",
        keys,
    )
    if recorded != SCALE_CASES * SCALE_CALLS:  # each case's model asks for its calls once
        raise SystemExit(f"b3: {recorded} call results recorded, not {SCALE_CASES * SCALE_CALLS}")
    calls = SCALE_CASES * SCALE_CALLS
    info(f"b3: {n_runners} runner(s): {calls} calls of {SCALE_SECONDS:g} s in {elapsed:.3f} s")
    return elapsed


async def main() -> None:
    url = pg_url()
    n = env_int("B3_N", 200)
    warmup = env_int("B3_WARMUP", 20)
    rr_n = env_int("B3_RR_N", 2000)
    await migrate(url)
    conn = await asyncpg.connect(url)
    with tempfile.TemporaryDirectory(prefix="tianshu-b3-") as tmp:
        services = Services(url, Path(tmp))
        try:
            await services.wait_nats()
            rr = await nats_rr(services, rr_n)
            info(f"b3: bare nats-py request/reply p50 {rr:.3f} ms over {rr_n}")
            services.start_scheduler()
            services.start_runners(1)
            nc = await nats.connect(services.nats_url)
            key = await start_case(nc, "b3_rt", {"n": warmup + n})
            await wait_finished(conn, [key])
            out = await output(conn, key)
            rt, step = out["rt_ms"][warmup:], out["step_ms"][warmup:]
            info(
                f"b3: {len(rt)} sequential no-op calls: round trip p50 {p50(rt):.3f} ms "
                f"p99 {p99(rt):.3f} ms; with the step's checkpoint p50 {p50(step):.3f} ms "
                f"p99 {p99(step):.3f} ms"
            )
            key = await start_case(nc, "b3_loop", {"n": 50})
            await wait_finished(conn, [key])
            loop = (await output(conn, key))["loop_ms"][5:]
            info(
                f"b3: one-call ctx.tool_step (2 model replies, 1 call, 4 checkpoints) p50 {p50(loop):.3f} ms"
            )
            services.stop_runners()
            one = await scale_run(services, nc, conn, 1)
            three = await scale_run(services, nc, conn, 3)
            await nc.close()
        finally:
            services.stop()
    await conn.close()
    print(
        f"tianshu b3_tool_rt_p50_ms={p50(rt):.3f} b3_tool_rt_p99_ms={p99(rt):.3f} "
        f"b3_scale_1_to_3={one / three:.3f} nats_rr_p50_ms={rr:.3f}",
        flush=True,
    )


if __name__ == "__main__":
    if sys.argv[1:2] == ["responder"]:
        asyncio.run(responder(sys.argv[2]))
    else:
        asyncio.run(main())
