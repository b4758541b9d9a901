"""B4: what a model call costs through tianshu, against the bare SDK call to the same server.

The project's scripted model server runs as its own process (`python -m tianshu_core.local.model_server`),
and every part below asks it; "direct" is a bare `openai` client (retries off) in the same process
as the path it is set against. Sequential unless said; each part prints a '# b4: …' line.

- provider: N sequential text completions with the direct client and N through `OpenAiProvider`
  (retries off too), alternating, so the machine's drift falls on both alike →
  b4_provider_overhead_p50_ms (provider p50 minus direct p50), b4_provider_bare_p50_ms. A provider
  adds no I/O: the target is at most 10% of the direct p50.
- the floor: B3's bare nats-py request/reply on this run's nats-server (B4_RR_N, after 200 for
  warm-up) → b4_nats_rr_p50_ms.
- gateway: one `python -m tianshu_llm_gateway` (its own process; routes `text` and `stream` to the
  server). N sequential calls, alternating the direct call and a bare `LlmCallRequest` sent by the
  scheduler's own client from this process (`NatsLlmClient`: published to JetStream with
  Nats-Msg-Id `<call_id>:<attempt>`, its `LlmCallResult` awaited on a core subscription to
  tianshu.v1.llm.results.*) → b4_gateway_overhead_p50_ms and _p99_ms (the gateway's p50 minus the
  direct p50, and the same for p99).
- the gateway path's floor, for reference: the same pattern as the gateway part (each round the
  direct call, then the measured path), where the measured path is nats-py alone: an
  LlmCallRequest-sized body published to JetStream (a file stream, with a Nats-Msg-Id), taken by
  a pull consumer in another process one message at a time as a gateway's worker does, and
  published back on core NATS → b4_js_floor_p50_ms; and the same round trip back to back, with no
  direct call between → b4_js_floor_hot_p50_ms. The difference is what the idle gaps of the
  alternating pattern cost the processes that sleep through them (nats-server, the consumer),
  which the bare request/reply, timed back to back, never pays.
- first token: B4_STREAM_N streamed calls each way, alternating, upstream `text,gap=…` (several
  chunks): the time to the first text delta at a follower subscribed (core NATS, before the call
  is sent) to tianshu.v1.llm.stream.<case_key>.<call_id>, and the direct client's time to its
  first content chunk (stream=True) → b4_ttft_overhead_p50_ms (the difference of the p50s).
- concurrent: B4_C (32) calls at a time for B4_CONC_SECONDS, direct then through the gateway
  (its concurrency 64), twice → b4_concurrent_ratio (the gateway's calls/s over the direct
  client's).
- step: a scheduler (its own process, on this run's database) runs `bench.b4_workflows`' b4_step:
  N model calls through `ctx.llm` (the gateway's client, with the scheduler's default settings),
  each beside a direct call from the same process → b4_step_overhead_ratio (the step path's p50
  over the direct p50; the target is at most the run's B3 tool round trip over the bare
  request/reply, plus one). For reference, one-round `ctx.tool_step`s, timed whole.

Environment: B4_N (default 400), B4_WARMUP (40), B4_RR_N (2000), B4_STREAM_N (200), B4_C (32),
B4_CONC_SECONDS (2). Database URL from BENCH_PG_URL.

Usage: python -m bench.b4     (from the repo root)
Prints: 'tianshu b4_provider_overhead_p50_ms=… b4_provider_bare_p50_ms=… b4_gateway_overhead_p50_ms=…
b4_gateway_overhead_p99_ms=… b4_nats_rr_p50_ms=… b4_ttft_overhead_p50_ms=… b4_concurrent_ratio=…
b4_step_overhead_ratio=… b4_js_floor_p50_ms=… b4_js_floor_hot_p50_ms=…' (one line).
"""

from __future__ import annotations

import asyncio
import itertools
import re
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import nats
import nats.errors
import openai
import yaml
from nats.aio.client import Client
from nats.aio.msg import Msg

from bench.b2 import p99
from bench.b3 import Process, Services, nats_rr, output, start_case, wait_finished
from bench.b4_workflows import KEY, MESSAGES, PROMPT, REQUEST, ROUTE
from bench.loadgen import drive, env_float, env_int, info, p50, pg_url
from tianshu_contracts import LLM_STREAM_CHUNK_ADAPTER, LlmCallRequest, subjects
from tianshu_contracts.llm import LlmMessage, LlmRequest
from tianshu_core.bus.llm import NatsLlmClient
from tianshu_core.llm import LlmInvocation, OpenAiProvider
from tianshu_core.stores.postgres import migrate

FLOOR_STREAM, FLOOR_SUBJECT, FLOOR_BACK = "BENCH_B4_FLOOR", "bench.b4.floor", "bench.b4.floor.back"
STREAM_ROUTE, STREAM_SCRIPT = "stream", "text,gap=0.002"  # ~8 events, 2 ms apart
KEY_ENV = "TIANSHU_BENCH_MODEL_KEY"
GATEWAY_CONCURRENCY = 64
LOOPS = 50  # one-round tool_steps of the step part, for reference (the first 5 are warm-up)
STREAM_REQUEST = LlmRequest(model=STREAM_ROUTE, messages=[LlmMessage.user(PROMPT)])


@dataclass(frozen=True)
class Params:
    n: int
    warmup: int
    rr_n: int
    stream_n: int
    concurrency: int
    conc_seconds: float

    @classmethod
    def from_env(cls) -> Params:
        return cls(
            n=env_int("B4_N", 400),
            warmup=env_int("B4_WARMUP", 40),
            rr_n=env_int("B4_RR_N", 2000),
            stream_n=env_int("B4_STREAM_N", 200),
            concurrency=env_int("B4_C", 32),
            conc_seconds=env_float("B4_CONC_SECONDS", 2.0),
        )


def start_server() -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "tianshu_core.local.model_server", "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert proc.stdout is not None
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        found = re.search(r"listening on (http://\S+)", line)
        if found:
            return proc, found.group(1)
        if not line and proc.poll() is not None:
            break
    proc.kill()
    raise SystemExit("b4: the model server did not start")


def _ms(since: float) -> float:
    return (time.perf_counter() - since) * 1000


async def timed_pairs(
    n: int, warmup: int, first: Callable[[], Awaitable[float]], second: Callable[[], Awaitable[float]]
) -> tuple[list[float], list[float]]:
    """`warmup + n` rounds of `first()` then `second()` (each returning its time in ms); the last n."""
    a: list[float] = []
    b: list[float] = []
    for i in range(warmup + n):
        x, y = await first(), await second()
        if i >= warmup:
            a.append(x)
            b.append(y)
    return a, b


def timing(call: Callable[[], Awaitable[object]]) -> Callable[[], Awaitable[float]]:
    """`call`, returning its time in ms."""

    async def timed() -> float:
        started = time.perf_counter()
        await call()
        return _ms(started)

    return timed


# -- the parts ---------------------------------------------------------------------------------


async def provider_part(url: str, direct: openai.AsyncOpenAI, p: Params) -> tuple[float, float]:
    """(provider p50 - direct p50, direct p50), ms."""
    provider = OpenAiProvider(api_keys=[KEY], base_url=f"{url}/v1", name="bench")
    try:
        bare, through = await timed_pairs(
            p.n,
            p.warmup,
            timing(lambda: direct.chat.completions.create(model=ROUTE, messages=MESSAGES)),
            timing(lambda: provider.complete(REQUEST)),
        )
    finally:
        await provider.aclose()
    info(
        f"b4: provider: {p.n} sequential text completions each way, alternating: direct p50 "
        f"{p50(bare):.3f} ms, OpenAiProvider p50 {p50(through):.3f} ms"
    )
    return p50(through) - p50(bare), p50(bare)


class Calls:
    """Calls through the gateway from this process, each under a fresh invocation of one case key."""

    def __init__(self, client: NatsLlmClient) -> None:
        self.client = client
        self.case_key = f"b4-{uuid.uuid4().hex[:16]}"
        self._seq = itertools.count()

    def invocation(self) -> LlmInvocation:
        return LlmInvocation.of(self.case_key, f"call/{next(self._seq)}")

    async def complete(self, request: LlmRequest, invocation: LlmInvocation | None = None) -> None:
        await self.client.complete(request, invocation=invocation or self.invocation())


async def gateway_part(direct: openai.AsyncOpenAI, calls: Calls, p: Params) -> tuple[float, float]:
    """(gateway p50 - direct p50, gateway p99 - direct p99), ms."""
    bare, through = await timed_pairs(
        p.n,
        p.warmup,
        timing(lambda: direct.chat.completions.create(model=ROUTE, messages=MESSAGES)),
        timing(lambda: calls.complete(REQUEST)),
    )
    info(
        f"b4: gateway: {p.n} sequential calls each way, alternating: direct p50 {p50(bare):.3f} "
        f"p99 {p99(bare):.3f} ms, a bare LlmCallRequest's round trip p50 {p50(through):.3f} "
        f"p99 {p99(through):.3f} ms"
    )
    return p50(through) - p50(bare), p99(through) - p99(bare)


async def floor_responder(url: str) -> None:
    """The floor's far end (its own process): a pull consumer that takes one message at a time, as
    a gateway's worker does, publishes it back on core NATS and acknowledges it."""
    nc = await nats.connect(url)
    sub = await nc.jetstream().pull_subscribe(FLOOR_SUBJECT, durable="floor", stream=FLOOR_STREAM)
    print("ready", flush=True)
    while True:
        try:
            msgs = await sub.fetch(1, timeout=1.0)
        except nats.errors.TimeoutError:
            continue
        for msg in msgs:
            await nc.publish(FLOOR_BACK, msg.data)
            await msg.ack()


async def floor_part(services: Services, direct: openai.AsyncOpenAI, p: Params) -> tuple[float, float]:
    """(p50 alternating with the direct call, p50 back to back), ms, of nats-py's JetStream publish
    → pull consumer in another process → core publish back."""
    nc = await nats.connect(services.nats_url)
    js = nc.jetstream()
    await js.add_stream(name=FLOOR_STREAM, subjects=[FLOOR_SUBJECT])
    responder = subprocess.Popen(  # noqa: ASYNC220 - started once, before anything is timed
        [sys.executable, "-m", "bench.b4", "floor-responder", services.nats_url],
        env=services.env,
        stdout=subprocess.PIPE,
    )
    try:
        assert responder.stdout is not None
        if (await asyncio.to_thread(responder.stdout.readline)).strip() != b"ready":
            raise SystemExit("b4: the floor's consumer did not start")
        waiting: list[asyncio.Future[None]] = []

        async def back(_msg: Msg) -> None:
            if waiting and not waiting[0].done():
                waiting[0].set_result(None)

        await nc.subscribe(FLOOR_BACK, cb=back)
        body = encode_request()

        async def round_trip() -> None:
            waiting[:] = [asyncio.get_running_loop().create_future()]
            await js.publish(FLOOR_SUBJECT, body, headers={"Nats-Msg-Id": uuid.uuid4().hex})
            await asyncio.wait_for(waiting[0], 10)

        _, alternating = await timed_pairs(
            p.n,
            p.warmup,
            timing(lambda: direct.chat.completions.create(model=ROUTE, messages=MESSAGES)),
            timing(round_trip),
        )
        hot = []
        for i in range(p.warmup + p.n):
            took = await timing(round_trip)()
            if i >= p.warmup:
                hot.append(took)
    finally:
        responder.kill()
        responder.wait()
        await nc.close()
    info(
        f"b4: floor: {p.n} nats-py JetStream publishes to a pull consumer in another process, each "
        f"published back on core NATS: p50 {p50(alternating):.3f} ms alternating with the direct call "
        f"(as the gateway part runs), {p50(hot):.3f} ms back to back"
    )
    return p50(alternating), p50(hot)


def encode_request() -> bytes:
    """A bare call's body, as the gateway part sends it (its size and shape)."""
    invocation = LlmInvocation.of("b4-floor", "call/0")
    call = LlmCallRequest(
        call_id=invocation.call_id,
        case_key=invocation.case_key,
        record=invocation.record,
        attempt=1,
        deadline=datetime.now(UTC) + timedelta(seconds=450),
        stream=False,
        request=REQUEST,
    )
    return call.model_dump_json().encode()


async def direct_ttft(direct: openai.AsyncOpenAI) -> float:
    """ms to the direct client's first content chunk (the stream read to its end)."""
    first: float | None = None
    started = time.perf_counter()
    stream = await direct.chat.completions.create(model=STREAM_SCRIPT, messages=MESSAGES, stream=True)
    async for chunk in stream:
        if first is None and chunk.choices and chunk.choices[0].delta.content:
            first = _ms(started)
    if first is None:
        raise SystemExit("b4: the direct stream had no content")
    return first


async def gateway_ttft(nc: Client, calls: Calls) -> float:
    """ms to the first text delta at a follower of the call's stream subject (the result awaited)."""
    invocation = calls.invocation()
    loop = asyncio.get_running_loop()
    first: asyncio.Future[float] = loop.create_future()

    async def follow(msg: Msg) -> None:
        now = time.perf_counter()
        if not first.done() and LLM_STREAM_CHUNK_ADAPTER.validate_json(msg.data).event.kind == "text_delta":
            first.set_result(now)

    sub = await nc.subscribe(subjects.llm_stream(calls.case_key, invocation.call_id), cb=follow)
    try:
        started = time.perf_counter()
        await calls.complete(STREAM_REQUEST, invocation)
        return (await asyncio.wait_for(first, 10) - started) * 1000
    finally:
        await sub.unsubscribe()


async def ttft_part(nc: Client, direct: openai.AsyncOpenAI, calls: Calls, p: Params) -> float:
    """Gateway's time to the first delta at a follower minus the direct client's, p50, ms."""
    bare, through = await timed_pairs(
        p.stream_n, min(p.warmup, p.stream_n), lambda: direct_ttft(direct), lambda: gateway_ttft(nc, calls)
    )
    info(
        f"b4: first token: {p.stream_n} streamed calls ({STREAM_SCRIPT}) each way, alternating: direct "
        f"p50 {p50(bare):.3f} ms, at a follower of the gateway's stream p50 {p50(through):.3f} ms"
    )
    return p50(through) - p50(bare)


async def concurrent_part(direct: openai.AsyncOpenAI, calls: Calls, p: Params) -> float:
    """The gateway's calls/s over the direct client's, `p.concurrency` at a time."""
    runs: dict[str, list[float]] = {"direct": [0.0, 0.0], "gateway": [0.0, 0.0]}
    ways: dict[str, Callable[[], Awaitable[object]]] = {
        "direct": lambda: direct.chat.completions.create(model=ROUTE, messages=MESSAGES),
        "gateway": lambda: calls.complete(REQUEST),
    }
    for _ in range(2):
        for name, one in ways.items():
            run = await drive(one, min_n=p.concurrency, concurrency=p.concurrency, min_seconds=p.conc_seconds)
            runs[name][0] += run.count
            runs[name][1] += run.seconds
    rate = {name: count / seconds for name, (count, seconds) in runs.items()}
    info(
        f"b4: concurrent: {p.concurrency} calls at a time, 2 x {p.conc_seconds:g} s each way, alternating: "
        f"direct {rate['direct']:.0f} calls/s, through the gateway {rate['gateway']:.0f} calls/s"
    )
    return rate["gateway"] / rate["direct"]


async def step_part(services: Services, nc: Client, conn: asyncpg.Connection, url: str, p: Params) -> float:
    """The step path's p50 over the direct call's, both timed inside the workflow."""
    # The bare calls' results are for cases that do not exist: the scheduler is not to read them.
    await nc.jetstream().purge_stream(subjects.STREAM_LLM_RESULTS)
    env = {"TIANSHU_WORKFLOWS": "bench.b4_workflows"}
    services.scheduler = start(
        services, "scheduler", "tianshu_scheduler", "TIANSHU_SCHEDULER_READY_FILE", env
    )
    spec = {"n": p.warmup + p.n, "loops": LOOPS, "base_url": f"{url}/v1"}
    key = await start_case(nc, "b4_step", spec)
    await wait_finished(conn, [key])
    out = await output(conn, key)
    bare, through = out["direct_ms"][p.warmup :], out["step_ms"][p.warmup :]
    loop = out["loop_ms"][LOOPS // 10 :]
    info(
        f"b4: step: {p.n} sequential model calls in steps, each beside a direct call: direct p50 "
        f"{p50(bare):.3f} ms, through ctx.llm (scheduler, gateway; its default settings, so streamed "
        f"for followers) p50 {p50(through):.3f} p99 {p99(through):.3f} ms; a one-round ctx.tool_step "
        f"with no tools (its lookup and checkpoints included) p50 {p50(loop):.3f} ms"
    )
    return p50(through) / p50(bare)


# -- the run -----------------------------------------------------------------------------------


def start(services: Services, name: str, module: str, ready_var: str, env: dict[str, str]) -> Process:
    """`python -m module` with the run's environment and `env`, its ready file (named by the variable
    `ready_var`) in the work directory; returns once it is ready."""
    env = {**services.env, **env, ready_var: str(services.workdir / f"{name}.ready")}
    proc = Process(name, [sys.executable, "-m", module], env, services.workdir)
    proc.wait_ready()
    return proc


def start_gateway(services: Services, url: str) -> Process:
    config = {
        "providers": [
            {"name": "scripted", "kind": "openai", "base_url": f"{url}/v1", "api_key_env": KEY_ENV}
        ],
        "models": [
            {"name": ROUTE, "provider": "scripted", "upstream": ROUTE},
            {"name": STREAM_ROUTE, "provider": "scripted", "upstream": STREAM_SCRIPT},
        ],
        "routes": [{"name": ROUTE, "chain": [ROUTE]}, {"name": STREAM_ROUTE, "chain": [STREAM_ROUTE]}],
    }
    path = services.workdir / "providers.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    env = {
        "TIANSHU_LLM_GATEWAY_CONFIG": str(path),
        "TIANSHU_LLM_GATEWAY_CONCURRENCY": str(GATEWAY_CONCURRENCY),
        KEY_ENV: KEY,
    }
    return start(services, "gateway", "tianshu_llm_gateway", "TIANSHU_LLM_GATEWAY_READY_FILE", env)


async def run(url: str) -> str:
    p = Params.from_env()
    db = pg_url()
    await migrate(db)
    conn = await asyncpg.connect(db)
    direct = openai.AsyncOpenAI(api_key=KEY, base_url=f"{url}/v1", max_retries=0)
    with tempfile.TemporaryDirectory(prefix="tianshu-b4-") as tmp:
        services = Services(db, Path(tmp))
        gateway: Process | None = None
        try:
            provider_overhead, provider_bare = await provider_part(url, direct, p)
            await services.wait_nats()
            rr = await nats_rr(services, p.rr_n)
            info(f"b4: bare nats-py request/reply p50 {rr:.3f} ms over {p.rr_n}")
            gateway = start_gateway(services, url)
            nc = await nats.connect(services.nats_url)
            text = NatsLlmClient(nc, nc.jetstream(), stream=False)
            streamed = NatsLlmClient(nc, nc.jetstream(), stream=True)
            for client in (text, streamed):
                await client.start()
            gw_p50, gw_p99 = await gateway_part(direct, Calls(text), p)
            floor, floor_hot = await floor_part(services, direct, p)
            ttft = await ttft_part(nc, direct, Calls(streamed), p)
            concurrent = await concurrent_part(direct, Calls(text), p)
            for client in (text, streamed):
                await client.stop()
            step = await step_part(services, nc, conn, url, p)
            await nc.close()
        finally:
            if gateway is not None:
                gateway.stop()
            services.stop()
            await direct.close()
            await conn.close()
    return (
        f"tianshu b4_provider_overhead_p50_ms={provider_overhead:.3f} "
        f"b4_provider_bare_p50_ms={provider_bare:.3f} b4_gateway_overhead_p50_ms={gw_p50:.3f} "
        f"b4_gateway_overhead_p99_ms={gw_p99:.3f} b4_nats_rr_p50_ms={rr:.3f} "
        f"b4_ttft_overhead_p50_ms={ttft:.3f} b4_concurrent_ratio={concurrent:.3f} "
        f"b4_step_overhead_ratio={step:.3f} b4_js_floor_p50_ms={floor:.3f} "
        f"b4_js_floor_hot_p50_ms={floor_hot:.3f}"
    )


def main() -> None:
    proc, url = start_server()
    try:
        line = asyncio.run(run(url))
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    print(line, flush=True)


if __name__ == "__main__":
    if sys.argv[1:2] == ["floor-responder"]:
        asyncio.run(floor_responder(sys.argv[2]))
    else:
        main()
