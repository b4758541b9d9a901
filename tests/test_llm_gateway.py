"""The LLM gateway end to end: real nats-server, gateways as processes, the scripted model server
as the upstream, calls sent by hand as the scheduler's `NatsLlmClient` would send them.

The module has a nats-server of its own: the gateways' stream and consumer names are fixed, so
each group of tests that starts gateways deletes the LLM streams first. The `ModelServer` runs in
the test process; what each model answers is the script in its upstream name (see
`tianshu_core.local.model_server`), and its stats say what it was asked.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import nats
import pytest
from nats.js import JetStreamContext
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from tests import test_tool_runner
from tests._gateway import (
    Chunks,
    GatewayProcess,
    LlmDeadLetters,
    LlmResults,
    check_config,
    new_call,
    reset_streams,
    send_call,
    write_config,
)
from tests._nats import NatsServerFactory
from tests._otlp import OtlpCollector, one, traceparent
from tests._tool_runner import StreamReader
from tianshu_contracts import DeadLetterReason, subjects
from tianshu_contracts.llm import Done, LlmErrorClass, StreamError, TextDelta, ToolSpec, ToolUse, UsageEvent
from tianshu_core.bus import publish
from tianshu_core.llm import REDACTED
from tianshu_core.local.model_server import ModelServer, key_fingerprint
from tianshu_llm_gateway.config import load_config

pytestmark = [pytest.mark.nats, pytest.mark.e2e]

SENTINEL = "sk-SENTINEL-5e1f0c9a7b3d2468"
KEYS = {
    "GW_TEST_OPENAI_KEY": "sk-test-openai",
    "GW_TEST_ANTHROPIC_KEY": "sk-ant-test",
    "GW_TEST_SENTINEL_KEY": SENTINEL,
}
FAST = {"backoff_initial_s": 0.01, "backoff_max_s": 0.05, "jitter_s": 0.0, "cooldown_s": 0.5}
OPENAI_PRICES = {"input": 1.0, "output": 2.0, "cached_input": 0.5}
CACHED_PRICES = {"input": 3.0, "output": 15.0, "cached_input": 0.3, "cache_write": 3.75}
# name: (provider, upstream script, prices)
MODELS: dict[str, tuple[str, str, dict[str, float] | None]] = {
    "plain": ("openai", "text,say=plain_answer", OPENAI_PRICES),
    "busy": ("anthropic", "error:503", {"input": 3.0, "output": 15.0}),
    "backup": ("openai", "text,say=from_the_backup", OPENAI_PRICES),
    "streamy": ("openai", "text,say=one_two_three_four_five_six_seven_eight", None),
    "tooly": ("anthropic", "tools:2,say=calling_tools", None),
    "cut": ("openai", "cut:2", OPENAI_PRICES),
    "never": ("openai", "text,say=never_asked", None),
    "leaky": ("sentinel", "error:401", None),
    "slow_beat": ("openai", "text,delay=3,say=heartbeats_kept_it", None),
    "slow_kill": ("openai", "text,delay=3,say=after_the_kill", None),
    "slow_outage": ("openai", "text,delay=2,say=kept_through_the_outage", None),
    "cached": ("anthropic", "text,cache=4:2,say=from_the_cache", CACHED_PRICES),
}
ROUTES = {
    "plain": ["plain"],
    "fallback": ["busy", "backup"],
    "stream": ["streamy"],
    "tools": ["tooly"],
    "cut": ["cut", "backup"],
    "cut_plain": ["cut", "backup"],  # its own route: the streamed cut's cool-down is not its
    "expiring": ["never"],
    "leak": ["leaky"],
    "slow": ["slow_beat"],
    "killed": ["slow_kill"],
    "outage": ["slow_outage"],
    "cached": ["cached"],
}
CONSUMER = (subjects.STREAM_LLM, subjects.CONSUMER_LLM_CALLS)

# A nats-server of this module's own (the gateways' stream names are fixed), and a client of it:
# the tool runner's tests' module fixtures.
nats_url = test_tool_runner.nats_url
nc = test_tool_runner.nc
js = test_tool_runner.js


def providers_file(path: Path, server: ModelServer, **provider_extra: Any) -> Path:
    """The module's providers file, pointing every provider at `server`."""
    providers: list[dict[str, Any]] = [
        {"name": "openai", "kind": "openai", "base_url": server.openai_base_url,
         "api_key_env": ["GW_TEST_OPENAI_KEY"], **provider_extra},
        {"name": "anthropic", "kind": "anthropic", "base_url": server.anthropic_base_url,
         "api_key_env": "GW_TEST_ANTHROPIC_KEY", "max_concurrency": 4},
        {"name": "sentinel", "kind": "openai", "base_url": server.openai_base_url,
         "api_key_env": ["GW_TEST_SENTINEL_KEY"]},
    ]  # fmt: skip
    models = [
        {"name": name, "provider": provider, "upstream": upstream, **({"prices": prices} if prices else {})}
        for name, (provider, upstream, prices) in MODELS.items()
    ]
    routes = [{"name": name, "chain": chain, "policy": FAST} for name, chain in ROUTES.items()]
    return write_config(path, {"providers": providers, "models": models, "routes": routes})


def asked(server: ModelServer, model: str) -> int:
    """How many requests the upstream got for the model `model` (its upstream script)."""
    return sum(1 for r in server.stats.requests if r.model == MODELS[model][1])


def trail(result: Any) -> list[tuple[str, str, str | None]]:
    return [(a.provider, a.model, a.error_class and a.error_class.value) for a in result.attempts]


def env_with_keys() -> dict[str, str]:
    return {**os.environ, **KEYS}


@pytest.fixture(scope="module")
async def upstream() -> AsyncIterator[ModelServer]:
    async with ModelServer() as server:
        yield server


@pytest.fixture(scope="module")
def config(upstream: ModelServer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return providers_file(tmp_path_factory.mktemp("gateway-config") / "providers.yaml", upstream)


# -- one gateway, many kinds of calls --------------------------------------------------------------


@pytest.fixture(scope="class")
async def serving(
    js: JetStreamContext, nats_url: str, config: Path, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[GatewayProcess]:
    """One gateway for a class of tests (debug logging, calls over 64 KiB refused)."""
    await reset_streams(js)
    gateway = GatewayProcess(
        tmp_path_factory.mktemp("serving"),
        nats_url,
        config,
        TIANSHU_LLM_GATEWAY_MAX_REQUEST_BYTES=str(64 * 1024),
        TIANSHU_LOG_LEVEL="DEBUG",
        **KEYS,
    )
    gateway.start()
    yield gateway
    gateway.kill()


class TestServing:
    """One gateway answers every kind of call: replies, fallbacks, streams, errors, dead letters."""

    @pytest.fixture
    def gateway(self, serving: GatewayProcess) -> GatewayProcess:
        return serving

    @pytest.fixture
    async def results(self, js: JetStreamContext, gateway: GatewayProcess) -> AsyncIterator[LlmResults]:
        async with LlmResults(js) as results:
            yield results

    @pytest.fixture
    async def dead(self, js: JetStreamContext, gateway: GatewayProcess) -> AsyncIterator[LlmDeadLetters]:
        async with LlmDeadLetters(js) as dead:
            yield dead

    async def test_a_call_is_answered(
        self, js: JetStreamContext, gateway: GatewayProcess, results: LlmResults, upstream: ModelServer
    ) -> None:
        call = new_call("plain")
        await send_call(js, call)
        result = await results.wait(call)

        assert result.response is not None and result.error is None
        assert result.response.content == "plain answer"
        assert result.response.finish_reason == "stop"
        assert (result.response.provider, result.response.model) == ("openai", MODELS["plain"][1])
        assert (result.call_id, result.case_key, result.record) == (call.call_id, call.case_key, call.record)
        assert (result.route, result.attempt, result.gateway) == ("plain", 1, gateway.runner_id)
        assert trail(result) == [("openai", MODELS["plain"][1], None)]
        usage = result.response.usage
        assert usage.prompt_tokens == 1 and usage.completion_tokens == 2  # "hello" -> "plain answer"
        assert result.cost_usd == pytest.approx((1 * 1.0 + 2 * 2.0) / 1e6)
        assert result.first_token_s is None and result.duration_s > 0
        assert asked(upstream, "plain") == 1

    async def test_a_fallback_route_lists_every_attempt_and_what_they_cost(
        self, js: JetStreamContext, results: LlmResults, upstream: ModelServer
    ) -> None:
        call = new_call("fallback", "what now")
        await send_call(js, call)
        result = await results.wait(call)

        assert result.response is not None
        assert result.response.content == "from the backup"
        assert trail(result) == [
            ("anthropic", "error:503", "overloaded"),
            ("openai", MODELS["backup"][1], None),
        ]
        assert result.attempts[0].status == 503
        assert (result.response.provider, result.response.model) == ("openai", MODELS["backup"][1])
        usage = result.response.usage
        assert usage == result.attempts[0].usage + result.attempts[1].usage
        assert (usage.prompt_tokens, usage.completion_tokens) == (2, 3)
        # The 503 used no tokens: the whole cost is the backup's, at the backup's prices.
        assert result.cost_usd == pytest.approx((2 * 1.0 + 3 * 2.0) / 1e6)
        assert asked(upstream, "busy") >= 1

    async def test_cache_reads_and_writes_are_priced_apart(
        self, js: JetStreamContext, results: LlmResults
    ) -> None:
        call = new_call("cached")
        await send_call(js, call)
        result = await results.wait(call)

        assert result.response is not None
        usage = result.response.usage
        # One prompt word, 4 tokens read from the cache and 2 written to it; 3 words out.
        assert (usage.prompt_tokens, usage.cache_read_tokens, usage.cache_write_tokens) == (7, 4, 2)
        assert usage.completion_tokens == 3
        assert result.cost_usd == pytest.approx((1 * 3.0 + 4 * 0.3 + 2 * 3.75 + 3 * 15.0) / 1e6)

    async def test_a_streamed_call_publishes_its_events_in_order(
        self, js: JetStreamContext, results: LlmResults
    ) -> None:
        call = new_call("stream", stream=True)
        async with Chunks(js, call) as chunks:
            await send_call(js, call)
            result = await results.wait(call)
            got = await chunks.wait_end()

        words = "one two three four five six seven eight"
        assert result.response is not None and result.response.content == words
        assert [c.seq for c in got] == list(range(1, len(got) + 1))
        assert {(c.call_id, c.case_key, c.attempt) for c in got} == {(call.call_id, call.case_key, 1)}
        events = [c.event for c in got]
        assert isinstance(events[0], TextDelta) and events[0].text == "one"  # the first delta, alone
        assert isinstance(events[-1], Done) and events[-1].finish_reason == "stop"
        deltas = [e.text for e in events if isinstance(e, TextDelta)]
        assert "".join(deltas) == words
        assert len(deltas) < len(words.split())  # the later ones coalesced
        assert any(isinstance(e, UsageEvent) for e in events)
        assert result.first_token_s is not None and 0 < result.first_token_s <= result.duration_s

    async def test_a_streamed_reply_sends_its_tool_uses_whole(
        self, js: JetStreamContext, results: LlmResults
    ) -> None:
        tools = [ToolSpec(name="lookup"), ToolSpec(name="fetch")]
        call = new_call("tools", stream=True, tools=tools)
        async with Chunks(js, call) as chunks:
            await send_call(js, call)
            result = await results.wait(call)
            got = await chunks.wait_end()

        events = [c.event for c in got]
        uses = [e.call for e in events if isinstance(e, ToolUse)]
        assert [u.name for u in uses] == ["lookup", "fetch"]
        assert [json.loads(u.arguments) for u in uses] == [{"n": 1}, {"n": 2}]
        assert isinstance(events[0], TextDelta)
        assert isinstance(events[-1], Done) and events[-1].finish_reason == "tool_calls"
        assert result.response is not None
        assert result.response.tool_calls == uses and result.response.content == "calling tools"

    async def test_a_stream_cut_after_its_first_deltas_is_asked_again_as_the_next_attempt(
        self, js: JetStreamContext, results: LlmResults, upstream: ModelServer
    ) -> None:
        """Deltas went out, then the upstream cut: the follower sees the StreamError (incomplete,
        attempt 1), then the next attempt's deltas (attempt 2), then Done; the result is the
        answer of the second stream (the cut model cools down, so the backup gives it)."""
        backups = asked(upstream, "backup")
        call = new_call("cut", stream=True)
        async with Chunks(js, call) as chunks:
            await send_call(js, call)
            result = await results.wait(call)
            await chunks.until(
                lambda: any(isinstance(c.event, Done) for c in chunks.all()), within=30, what="the Done"
            )
            got = chunks.all()

        first = [c for c in got if c.attempt == call.attempt]
        second = [c for c in got if c.attempt == call.attempt + 1]
        assert len(first) + len(second) == len(got)
        assert [c.seq for c in first] == list(range(1, len(first) + 1))
        assert [c.seq for c in second] == list(range(1, len(second) + 1))
        assert all(isinstance(c.event, TextDelta) for c in first[:-1]) and first
        end = first[-1].event
        assert isinstance(end, StreamError) and end.incomplete and end.error_class is LlmErrorClass.TRANSIENT
        assert isinstance(second[0].event, TextDelta) and isinstance(second[-1].event, Done)
        text = "".join(c.event.text for c in second if isinstance(c.event, TextDelta))
        assert result.response is not None and result.response.content == text == "from the backup"
        assert trail(result) == [("openai", "cut:2", "transient"), ("openai", MODELS["backup"][1], None)]
        assert asked(upstream, "backup") == backups + 1

    async def test_a_reply_cut_before_it_began_falls_back(
        self, js: JetStreamContext, results: LlmResults
    ) -> None:
        call = new_call("cut_plain")  # not streamed: the connection drops with no answer at all
        await send_call(js, call)
        result = await results.wait(call)

        assert result.response is not None and result.response.content == "from the backup"
        # The failed provider cools down, so the next attempt goes to the other at once.
        assert trail(result) == [("openai", "cut:2", "transient"), ("openai", MODELS["backup"][1], None)]

    async def test_an_unknown_route_is_answered_with_an_error_and_dead_lettered(
        self, js: JetStreamContext, results: LlmResults, dead: LlmDeadLetters
    ) -> None:
        call = new_call("no-such-route")
        await send_call(js, call)
        result = await results.wait(call)
        msg_id = f"{call.call_id}:1"
        await dead.until(lambda: any(d.msg_id == msg_id for d in dead.all()), within=10, what="a dead letter")

        assert result.response is None and result.error is not None
        assert result.error_class is LlmErrorClass.FATAL and result.error.code == "fatal"
        assert "no-such-route" in result.error.message and "fallback" in result.error.message
        assert result.route == "no-such-route" and result.attempts == []
        [letter] = [d for d in dead.all() if d.msg_id == msg_id]
        assert letter.reason is DeadLetterReason.REFUSED and letter.error.code == "unknown_route"
        assert letter.delivery_count == 1

    async def test_an_expired_call_is_dead_lettered_without_asking_upstream(
        self, js: JetStreamContext, results: LlmResults, dead: LlmDeadLetters, upstream: ModelServer
    ) -> None:
        call = new_call("expiring", deadline=datetime.now(UTC) - timedelta(seconds=1))
        await send_call(js, call)
        msg_id = f"{call.call_id}:1"
        await dead.until(lambda: any(d.msg_id == msg_id for d in dead.all()), within=10, what="a dead letter")

        [letter] = [d for d in dead.all() if d.msg_id == msg_id]
        assert letter.reason is DeadLetterReason.EXPIRED and letter.error.code == "expired"
        assert letter.delivery_count == 1
        assert results.of(call) == []
        assert asked(upstream, "never") == 0

    async def test_a_call_whose_result_could_not_be_stored_is_dead_lettered_without_asking_upstream(
        self, js: JetStreamContext, results: LlmResults, dead: LlmDeadLetters, upstream: ModelServer
    ) -> None:
        call = new_call("expiring").model_copy(update={"record": "agent/r1\x00/llm"})
        await send_call(js, call)
        msg_id = f"{call.call_id}:1"
        await dead.until(lambda: any(d.msg_id == msg_id for d in dead.all()), within=10, what="a dead letter")

        [letter] = [d for d in dead.all() if d.msg_id == msg_id]
        assert letter.reason is DeadLetterReason.UNSTORABLE and letter.error.code == "unstorable"
        assert "record" in letter.error.message and letter.delivery_count == 1
        assert results.of(call) == []
        assert asked(upstream, "never") == 0

    async def test_undecodable_and_oversized_calls_are_dead_lettered_on_their_first_delivery(
        self, js: JetStreamContext, dead: LlmDeadLetters
    ) -> None:
        await publish(js, subjects.LLM_CALLS, b"{not json", msg_id="garbage-1")
        big = new_call("plain", "word " * 20_000)  # ~100 KB, over the 64 KiB this gateway takes
        await send_call(js, big)
        wanted = {"garbage-1", f"{big.call_id}:1"}
        await dead.until(lambda: wanted <= {d.msg_id for d in dead.all()}, within=10, what="2 dead letters")

        letters = {d.msg_id: d for d in dead.all() if d.msg_id in wanted}
        assert letters["garbage-1"].reason is DeadLetterReason.UNDECODABLE
        assert letters[f"{big.call_id}:1"].reason is DeadLetterReason.TOO_LARGE
        assert {d.delivery_count for d in letters.values()} == {1}

    async def test_a_refused_key_appears_nowhere_and_prompts_stay_out_of_the_log(
        self,
        js: JetStreamContext,
        gateway: GatewayProcess,
        results: LlmResults,
        upstream: ModelServer,
        config: Path,
    ) -> None:
        """The upstream's 401 quotes the whole key: no log line, result or dead letter repeats it.
        The gateway logs at debug level here, where the SDKs would log request bodies."""
        call = new_call("leak")
        prompted = new_call("fallback", "zebra_prompt_words")
        await send_call(js, call)
        await send_call(js, prompted)
        result = await results.wait(call)
        assert (await results.wait(prompted)).response is not None

        assert result.error_class is LlmErrorClass.CREDENTIALS and result.error is not None
        assert REDACTED in result.error.message
        sent = [r for r in upstream.stats.requests if r.model == "error:401"]
        assert sent and {r.api_key_sha256 for r in sent} == {key_fingerprint(SENTINEL)}  # it was sent
        await asyncio.sleep(0.5)  # the gateway's log lines about the call
        assert SENTINEL not in gateway.log_text()
        assert "zebra_prompt_words" not in gateway.log_text()
        assert f"[case={call.case_key} " in gateway.log_text()
        assert all(SENTINEL.encode() not in m.data for m in results.messages)
        async with StreamReader(js, subjects.DEAD_LETTERS) as letters:
            await asyncio.sleep(0.5)
        assert all(SENTINEL.encode() not in m.data for m in letters.messages)
        checked = check_config(str(config), env=env_with_keys())
        assert checked.returncode == 0, checked.stderr
        assert "GW_TEST_SENTINEL_KEY: set" in checked.stdout
        assert SENTINEL not in checked.stdout + checked.stderr


# -- gateways that die, stall or stop -------------------------------------------------------------


@pytest.fixture
async def clean(js: JetStreamContext) -> None:
    """No calls, results, consumer or dead letters left by an earlier test."""
    await reset_streams(js)


async def upstream_busy(server: ModelServer, *, within: float = 15.0) -> None:
    """Until the upstream holds a request open."""
    for _ in range(int(within / 0.02)):
        if server.stats.concurrent:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"the upstream got no request within {within:g} s")


async def test_a_call_whose_gateway_was_killed_is_answered_by_another(
    clean: None, js: JetStreamContext, nats_url: str, config: Path, upstream: ModelServer, tmp_path: Path
) -> None:
    env = {**KEYS, "TIANSHU_LLM_GATEWAY_ACK_WAIT_S": "2"}
    first = GatewayProcess(tmp_path, nats_url, config, **env).start()
    second = GatewayProcess(tmp_path, nats_url, config, **env)
    try:
        call = new_call("killed")
        async with LlmResults(js) as results:
            await send_call(js, call)
            await upstream_busy(upstream)
            first.kill()
            second.start()
            result = await results.wait(call, within=30)
            await asyncio.sleep(1.0)  # a repeat would come now
            assert len(results.of(call)) == 1
        assert result.response is not None and result.response.content == "after the kill"
        assert result.gateway == second.runner_id
        assert 1 <= asked(upstream, "slow_kill") <= 2
    finally:
        first.kill()
        second.kill()


async def test_a_call_three_times_the_ack_wait_reaches_the_upstream_once(
    clean: None, js: JetStreamContext, nats_url: str, config: Path, upstream: ModelServer, tmp_path: Path
) -> None:
    with GatewayProcess(tmp_path, nats_url, config, TIANSHU_LLM_GATEWAY_ACK_WAIT_S="1", **KEYS) as gateway:
        call = new_call("slow")
        async with LlmResults(js) as results:
            await send_call(js, call)
            result = await results.wait(call, within=30)
            await asyncio.sleep(1.5)
            assert len(results.of(call)) == 1
        assert result.response is not None and result.response.content == "heartbeats kept it"
        assert result.duration_s >= 3
        assert asked(upstream, "slow_beat") == 1
        info = await js.consumer_info(*CONSUMER)
        assert info.num_redelivered == 0 and info.num_ack_pending == 0
        assert gateway.terminate() == 0
        assert not gateway.ready_file.exists()


async def test_a_reply_had_while_nats_is_away_is_published_later_without_asking_again(
    make_nats_server: NatsServerFactory, config: Path, upstream: ModelServer, tmp_path: Path
) -> None:
    server = make_nats_server()
    client = await nats.connect(server.url, reconnect_time_wait=0.2, max_reconnect_attempts=-1)
    js = client.jetstream()
    try:
        # Publishing gives up after 1 s (the result is kept; the call is held and tried again).
        env = {**KEYS, "TIANSHU_NATS_REQUEST_TIMEOUT_S": "1"}
        with GatewayProcess(tmp_path, server.url, config, **env) as gateway:
            call = new_call("outage")
            await send_call(js, call)
            await upstream_busy(upstream)
            server.stop()
            await asyncio.sleep(5)  # the upstream answers meanwhile; the result cannot be published
            server.start()
            async with LlmResults(js) as results:
                result = await results.wait(call, within=30)
            assert result.response is not None and result.response.content == "kept through the outage"
            assert asked(upstream, "slow_outage") == 1
            assert "failed transiently" in gateway.log_text()
    finally:
        await client.close()


class Collector(OtlpCollector):
    """The OTLP receiver, keeping each span's events too (name and attributes, by span id)."""

    def __init__(self) -> None:
        self.events: dict[str, list[tuple[str, dict[str, Any]]]] = {}
        super().__init__()

    def take(self, request: ExportTraceServiceRequest) -> None:
        super().take(request)
        for resource_spans in request.resource_spans:
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    self.events[span.span_id.hex()] = [
                        (e.name, {a.key: _value(a.value) for a in e.attributes}) for e in span.events
                    ]


def _value(value: Any) -> Any:
    kind = value.WhichOneof("value")
    return getattr(value, kind) if kind else None


async def test_each_call_is_a_chat_span_with_its_provider_tokens_and_failed_attempts(
    clean: None, js: JetStreamContext, nats_url: str, config: Path, tmp_path: Path
) -> None:
    collector = Collector()
    gateway = GatewayProcess(
        tmp_path,
        nats_url,
        config,
        OTEL_EXPORTER_OTLP_ENDPOINT=collector.url,
        OTEL_BSP_SCHEDULE_DELAY="100",
        **KEYS,
    ).start()
    try:
        header, trace_id, span_id = traceparent()
        fallback = new_call("fallback", "zebra_prompt_words")
        streamed = new_call("stream", stream=True)
        leak = new_call("leak")
        async with LlmResults(js) as results:
            await publish(
                js,
                subjects.LLM_CALLS,
                fallback,
                msg_id=f"{fallback.call_id}:1",
                headers={"traceparent": header},
            )
            for call in (streamed, leak):
                await send_call(js, call)
                await results.wait(call)
            await results.wait(fallback)
    finally:
        assert gateway.terminate() == 0  # SIGTERM flushes the spans still buffered
        collector.close()
    spans = [s for s in collector.spans if s["service"] == "tianshu-llm-gateway"]
    chat = one(spans, "chat fallback")
    consumer = next(s for s in spans if s["span_id"] == chat["parent_id"])
    assert (consumer["trace_id"], consumer["parent_id"]) == (trace_id, span_id)  # our publish's trace
    assert (
        chat["attributes"]
        | {
            "gen_ai.operation.name": "chat",
            "gen_ai.request.model": "fallback",
            "gen_ai.provider.name": "openai",
            "gen_ai.response.model": MODELS["backup"][1],
            "gen_ai.usage.input_tokens": 1,  # one word
            "gen_ai.usage.output_tokens": 3,
            "tianshu.llm.attempts": 2,
        }
        == chat["attributes"]
    )
    assert collector.events[chat["span_id"]] == [
        (
            "attempt",
            {
                "gen_ai.provider.name": "anthropic",
                "gen_ai.request.model": "error:503",
                "error.type": "overloaded",
                "http.response.status_code": 503,
            },
        )
    ]
    stream = one(spans, "chat stream")
    assert stream["attributes"]["gen_ai.response.time_to_first_chunk"] > 0
    assert one(spans, "chat leak")["attributes"]["error.type"] == "credentials"
    exported = repr(spans) + repr(collector.events)
    assert SENTINEL not in exported and "zebra_prompt_words" not in exported


# -- the providers file ----------------------------------------------------------------------------


def test_the_routes_share_one_sdk_provider_per_model_and_one_limit_per_provider(
    upstream: ModelServer, config: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for variable, key in KEYS.items():
        monkeypatch.setenv(variable, key)
    routes = load_config(config).build()
    fallback, cut, cut_plain, tools = routes["fallback"], routes["cut"], routes["cut_plain"], routes["tools"]
    assert [(e.model, e.provider, e.upstream) for e in fallback.chain] == [
        ("busy", "anthropic", "error:503"),
        ("backup", "openai", MODELS["backup"][1]),
    ]
    assert cut.providers[0].provider is cut_plain.providers[0].provider  # one SDK provider per model
    assert cut.llm is not cut_plain.llm  # each route its own retry loop and cool-downs
    busy, tooly = fallback.providers[0].provider, tools.providers[0].provider
    assert busy is not tooly and busy.model == "error:503" and tooly.model == MODELS["tooly"][1]
    assert busy.limit is not None and busy.limit is tooly.limit  # max_concurrency per provider


def test_check_config_shows_the_routes_and_masks_every_secret(upstream: ModelServer, tmp_path: Path) -> None:
    path = providers_file(
        tmp_path / "providers.yaml", upstream, base_url="http://someone:hunter2@127.0.0.1:9/v1?key=abc"
    )
    checked = check_config(str(path), env=env_with_keys())
    assert checked.returncode == 0, checked.stderr
    out = checked.stdout
    assert "route fallback" in out and "busy: error:503 at anthropic" in out
    assert "env GW_TEST_OPENAI_KEY: set" in out and "keys: 1" in out
    assert "at most 4 calls at once" in out
    for secret in ("hunter2", "someone", "key=abc", *KEYS.values()):
        assert secret not in out + checked.stderr

    as_json = check_config(str(path), "--json", env=env_with_keys())
    described = json.loads(as_json.stdout)
    assert [r["name"] for r in described["routes"]] == list(ROUTES)
    assert described["routes"][1]["chain"][0]["prices"] == {
        "input": 3.0, "output": 15.0, "cached_input": None, "cache_write": None
    }  # fmt: skip
    assert described["routes"][1]["policy"]["cooldown_s"] == 0.5

    missing = {k: v for k, v in env_with_keys().items() if k != "GW_TEST_ANTHROPIC_KEY"}
    checked = check_config(env=missing | {"TIANSHU_LLM_GATEWAY_CONFIG": str(path)})
    assert checked.returncode == 2
    assert "env GW_TEST_ANTHROPIC_KEY: NOT SET" in checked.stdout
    assert checked.stderr.strip().endswith("the environment variable GW_TEST_ANTHROPIC_KEY is not set")


@pytest.mark.parametrize(
    ("field", "value"),
    [("api_key", "sk-live-0123456789abcdef"), ("token", "plain-words-secret"), ("password", "hunter2")],
)
def test_a_key_written_in_the_providers_file_is_refused(
    upstream: ModelServer, tmp_path: Path, field: str, value: str
) -> None:
    path = providers_file(tmp_path / "providers.yaml", upstream, **{field: value})
    checked = check_config(str(path), env=env_with_keys())
    assert checked.returncode == 2
    assert f"providers[0].{field}: a key written in the providers file is refused" in checked.stderr
    assert value not in checked.stdout + checked.stderr

    serving = GatewayProcess(tmp_path, "nats://127.0.0.1:1", path, **KEYS).launch()
    assert serving.wait_exit(30) == 2
    assert "a key written in the providers file is refused" in serving.log_text()
    assert value not in serving.log_text()
