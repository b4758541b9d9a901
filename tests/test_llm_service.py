"""Model calls in service mode: a scheduler, an LLM gateway and a tool runner, as processes.

The workflow is `examples.agent` (a tool loop over `ctx.llm`, which in the scheduler is the
gateway's client), or `tests.e2e_llm`'s `llm_probe` (the same loop, recording the class of an
`LlmError` before failing with it); the route is the case's input `route`. The upstream is the
project's scripted model server, in this process, so the test can read what it was asked: each
model's upstream name is its script (see `tianshu_core.local.model_server`), counted per test.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import nats
import pytest
from nats.aio.client import Client

from tests._gateway import GatewayProcess, LlmDeadLetters, check_config, new_call, send_call, write_config
from tests._nats import NatsServerFactory
from tests._otlp import OtlpCollector, Span, by_name, descendants
from tests._services import CaseDb, SchedulerProcess, eventually, fresh_database, new_key, request_start
from tests._tool_runner import StreamReader, ToolRunnerProcess
from tianshu_contracts import (
    LLM_CALL_REQUEST_ADAPTER,
    CaseUpdated,
    DeadLetterReason,
    LlmStreamChunk,
    subjects,
)
from tianshu_contracts.llm import Done, LlmErrorClass, StreamError, TextDelta, ToolUse
from tianshu_core import TianshuClient
from tianshu_core.bus import publish
from tianshu_core.llm import REDACTED
from tianshu_core.local.model_server import ModelServer, RequestRecord, key_fingerprint
from tianshu_core.stores.postgres import connect_postgres

pytestmark = [pytest.mark.e2e, pytest.mark.nats, pytest.mark.postgres, pytest.mark.slow]

SENTINEL = f"sk-SENTINEL-{uuid.uuid4().hex}"
KEY_ENV = {"LLM_SERVICE_TEST_KEY": "sk-llm-service-test", "LLM_SERVICE_SENTINEL_KEY": SENTINEL}
AGENT_SCRIPT = "tools:1+text,say=the_node_costs_32000_USD"
PRICES = {"input": 1.0, "output": 2.0}
FAST = {"backoff_initial_s": 0.01, "backoff_max_s": 0.05, "jitter_s": 0.0, "cooldown_s": 2.0}
# name: (provider, upstream script, prices)
MODELS: dict[str, tuple[str, str, dict[str, float] | None]] = {
    "agent-model": ("scripted", AGENT_SCRIPT, PRICES),
    "slow-model": ("scripted", "text,delay=3,say=slept_through_the_restart", PRICES),
    "flaky-model": ("scripted", "error:500+text,say=answered_on_the_retry", PRICES),
    "cut-model": ("scripted", "cut:2", PRICES),
    "backup-model": ("scripted", "text,say=the_backup_answers_in_full", PRICES),
    "leaky-model": ("sentinel", "error:401", None),
}
ROUTES = {
    "default": ["agent-model"],
    "slow": ["slow-model"],
    "flaky": ["flaky-model"],
    "cut": ["cut-model", "backup-model"],
    "leak": ["leaky-model"],
}
SCHEDULER_WORKFLOWS = "examples.agent,tests.e2e_llm"
OTEL_FAST = {"OTEL_BSP_SCHEDULE_DELAY": "100"}


@pytest.fixture
async def upstream() -> AsyncIterator[ModelServer]:
    async with ModelServer() as server:
        yield server


@pytest.fixture
async def db_url(pg_server_url: str) -> AsyncIterator[str]:
    async with fresh_database(pg_server_url, "tianshu_llm_svc") as url:
        yield url


@pytest.fixture
def nats_url(make_nats_server: NatsServerFactory) -> str:
    return make_nats_server().url


@pytest.fixture
async def nc(nats_url: str) -> AsyncIterator[Client]:
    client = await nats.connect(nats_url)
    yield client
    await client.close()


@pytest.fixture
async def db(db_url: str) -> AsyncIterator[CaseDb]:
    case_db = await CaseDb.open(db_url)
    yield case_db
    await case_db.close()


@pytest.fixture
def collector() -> Iterator[OtlpCollector]:
    made = OtlpCollector()
    yield made
    made.close()


def providers(path: Path, server: ModelServer) -> Path:
    """The providers file: `scripted` (the test key) and `sentinel` (the sentinel key), both at
    `server`; the models of MODELS and the routes of ROUTES (all but `default` with FAST retries)."""
    return write_config(
        path,
        {
            "providers": [
                {
                    "name": "scripted",
                    "kind": "openai",
                    "base_url": server.openai_base_url,
                    "api_key_env": ["LLM_SERVICE_TEST_KEY"],
                },
                {
                    "name": "sentinel",
                    "kind": "openai",
                    "base_url": server.openai_base_url,
                    "api_key_env": ["LLM_SERVICE_SENTINEL_KEY"],
                },
            ],
            "models": [
                {"name": name, "provider": provider, "upstream": script, **({"prices": p} if p else {})}
                for name, (provider, script, p) in MODELS.items()
            ],
            "routes": [
                {"name": name, "chain": chain, **({"policy": FAST} if name != "default" else {})}
                for name, chain in ROUTES.items()
            ],
        },
    )


def asked(server: ModelServer, model: str) -> list[RequestRecord]:
    """The upstream's records of the requests to `model` (by its script), in the order they ended."""
    return [r for r in server.stats.requests if r.model == MODELS[model][1]]


class Stack:
    def __init__(self, workdir: Path, db_url: str, nats_url: str, config: Path) -> None:
        self.workdir, self.db_url, self.nats_url, self.config = workdir, db_url, nats_url, config
        self.procs: list[Any] = []

    def scheduler(self, **env: str) -> SchedulerProcess:
        made = SchedulerProcess(
            self.workdir, self.db_url, self.nats_url, TIANSHU_WORKFLOWS=SCHEDULER_WORKFLOWS, **env
        )
        self.procs.append(made)
        return made.start()

    def gateway(self, **env: str) -> GatewayProcess:
        made = GatewayProcess(self.workdir, self.nats_url, self.config, **{**KEY_ENV, **env})
        self.procs.append(made)
        made.start()
        return made

    def runner(self, **env: str) -> ToolRunnerProcess:
        made = ToolRunnerProcess(self.workdir, self.nats_url, **{"TIANSHU_TOOLS": "examples.tools", **env})
        self.procs.append(made)
        return made.start()

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.log_tail(30)}" for p in self.procs if p.proc is not None)

    def close(self) -> None:
        for proc in self.procs:
            proc.kill()


@pytest.fixture
def stack(tmp_path: Path, db_url: str, nats_url: str, upstream: ModelServer) -> Iterator[Stack]:
    made = Stack(tmp_path, db_url, nats_url, providers(tmp_path / "providers.yaml", upstream))
    yield made
    made.close()


def cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """The `tianshu` console script (as a user runs it), its output as text."""
    script = Path(sys.executable).parent / "tianshu"
    command = [str(script)] if script.exists() else [sys.executable, "-m", "tianshu_core.cli"]
    return subprocess.run(
        [*command, *args], env={**os.environ, **env}, capture_output=True, text=True, timeout=60, check=False
    )


async def usage_of(db_url: str, key: str) -> Any:
    stores = await connect_postgres(db_url, max_size=1)
    try:
        return await stores.usage.summary(case_key=key), await stores.usage.rows(case_key=key)
    finally:
        await stores.close()


async def test_a_tool_loop_through_the_gateway_and_a_runner_answers_and_counts_its_tokens(
    stack: Stack, nc: Client, db: CaseDb, upstream: ModelServer
) -> None:
    stack.scheduler()
    stack.gateway()
    stack.runner()
    key = new_key("agent")
    await request_start(nc, "agent", {"question": "What does a GPU node cost?"}, key=key)
    done = await db.wait_state(key, "finished", within=60, context=stack.logs)
    assert done["output"] == {"answer": "the node costs 32000 USD"}
    # The model was asked twice (a tool round, then the answer); the tool ran on the runner.
    requests = asked(upstream, "agent-model")
    assert len(requests) == 2
    tool_message = [m for m in requests[1].body["messages"] if m["role"] == "tool"]
    assert tool_message and "no catalogue entry" in tool_message[0]["content"]
    # One usage row per call, matching what the upstream counted, priced by the route.
    summary, rows = await usage_of(stack.db_url, key)
    assert summary.calls == 2 and len(rows) == 2
    assert summary.input_tokens == sum(r.input_tokens for r in requests)
    assert summary.output_tokens == sum(r.output_tokens for r in requests)
    expected_cost = (summary.input_tokens * PRICES["input"] + summary.output_tokens * PRICES["output"]) / 1e6
    assert summary.cost_usd == pytest.approx(expected_cost)
    assert {r.provider for r in rows} == {"scripted"} and {r.route for r in rows} == {"default"}


async def test_a_gateway_outage_delays_the_agent_and_the_call_is_sent_again(
    stack: Stack, nc: Client, db: CaseDb, upstream: ModelServer
) -> None:
    # Deadline of a call: 0.5 s hot window + 1 s timeout + 0.5 s grace. Attempts enough to outlast
    # a gateway's start on a loaded machine (a start of 4 s left three attempts all spent).
    stack.scheduler(
        TIANSHU_SCHEDULER_LLM_HOT_WINDOW_S="0.5",
        TIANSHU_SCHEDULER_LLM_TIMEOUT_S="1",
        TIANSHU_SCHEDULER_LLM_GRACE_S="0.5",
        TIANSHU_SCHEDULER_LLM_MAX_ATTEMPTS="30",
    )
    stack.runner()
    key = new_key("outage")
    await request_start(nc, "agent", {"question": "Anyone there?"}, key=key)
    await db.wait_state(key, "waiting", within=30, context=stack.logs)
    # No gateway for longer than one deadline: the scheduler sends the call again (attempt 2).
    await asyncio.sleep(2.5)
    stack.gateway()
    done = await db.wait_state(key, "finished", within=60, context=stack.logs)
    assert done["output"] == {"answer": "the node costs 32000 USD"}
    sent = [
        e for e in await db.journal(key) if e["kind"] == "timer" and e["name"].startswith("agent/r1/llm:wait")
    ]
    assert len(sent) >= 2  # parked at least twice: the call went out again after its deadline


# -- helpers of the tests below ----------------------------------------------------------------


class RawCollector(OtlpCollector):
    """The OTLP receiver, also keeping every export request whole as text (events and their
    exception messages, resources, links...): what to search for a secret."""

    def __init__(self) -> None:
        self.raw: list[str] = []
        super().__init__()

    def take(self, request: Any) -> None:
        self.raw.append(str(request))
        super().take(request)


def of_case(spans: list[Span], name: str, key: str) -> list[Span]:
    return [s for s in by_name(spans, name) if s["attributes"].get("tianshu.case_key") == key]


def chain_up(spans: list[Span], span: Span, ancestor: Span) -> list[Span]:
    """`span`, its parent, ... up to `ancestor` (included); fails if `ancestor` is not on the way."""
    by_id = {s["span_id"]: s for s in spans}
    chain = [span]
    while chain[-1]["span_id"] != ancestor["span_id"]:
        parent = by_id.get(chain[-1]["parent_id"] or "")
        assert parent is not None, f"{ancestor['name']} is not an ancestor of {span['name']}: {chain}"
        chain.append(parent)
    return chain


async def follow_all(client: TianshuClient, key: str) -> list[LlmStreamChunk | CaseUpdated]:
    """Everything `follow` yields until the case has ended."""
    return [item async for item in client.follow(key)]


def chunks_of(items: list[LlmStreamChunk | CaseUpdated]) -> list[LlmStreamChunk]:
    return [i for i in items if isinstance(i, LlmStreamChunk)]


def one_call(chunks: list[LlmStreamChunk], attempt: int = 1) -> str:
    """The text of a call's attempt as a follower reads it, checking it is whole: `seq` 1, 2, ...
    with no gap, text deltas, and a `Done` last (nothing after it)."""
    assert [c.seq for c in chunks] == list(range(1, len(chunks) + 1)), [c.seq for c in chunks]
    assert {c.attempt for c in chunks} == {attempt}
    assert isinstance(chunks[-1].event, Done), chunks[-1]
    assert not any(isinstance(c.event, Done | StreamError) for c in chunks[:-1])
    return "".join(c.event.text for c in chunks if isinstance(c.event, TextDelta))


async def dump_database(url: str) -> str:
    """Every row of the tables a case's model calls reach, as JSON text (the database is the test's own)."""
    conn = await asyncpg.connect(url)
    try:
        rows = []
        for table in (
            "tianshu_cases",
            "tianshu_journal",
            "tianshu_events",
            "tianshu_timers",
            "tianshu_llm_usage",
        ):
            rows += [r[0] for r in await conn.fetch(f"SELECT row_to_json(t)::text FROM {table} t")]
        return "\n".join(rows)
    finally:
        await conn.close()


# -- one trace ---------------------------------------------------------------------------------


async def test_a_model_call_is_one_trace_from_the_schedulers_step_to_the_gateways_chat_span(
    stack: Stack, nc: Client, db: CaseDb, upstream: ModelServer, collector: OtlpCollector
) -> None:
    otel = {"OTEL_EXPORTER_OTLP_ENDPOINT": collector.url, **OTEL_FAST}
    stack.scheduler(**otel)
    stack.gateway(**otel)
    stack.runner()
    key = new_key("traced")
    await request_start(nc, "agent", {"question": "What does a GPU node cost?"}, key=key)
    await db.wait_state(key, "finished", within=60, context=stack.logs)
    case = await TianshuClient(nc).get_case(key)
    assert case is not None and case.trace_id

    async def exported() -> tuple[list[Span], list[Span]] | None:
        llm, chat = (
            of_case(collector.spans, "tianshu.llm", key),
            of_case(collector.spans, "chat default", key),
        )
        if len(llm) != 2 or len(chat) != 2:
            return None
        # The spans between (the publish, the gateway's consumer span, which ends after its chat
        # span) may come in a later export batch than both ends.
        spans = list(collector.spans)
        linked = all(any(s["name"] == "chat default" for s in descendants(spans, one)) for one in llm)
        return (llm, chat) if linked else None

    def names() -> str:
        return repr(sorted({(s["service"], s["name"]) for s in collector.spans}))

    llm_spans, chat_spans = await eventually(exported, what="2 model calls' spans", within=20, context=names)
    spans = list(collector.spans)
    assert {s["service"] for s in llm_spans} == {"tianshu-scheduler"}
    assert {s["service"] for s in chat_spans} == {"tianshu-llm-gateway"}
    # Both sides of both calls are in the case's trace...
    assert {s["trace_id"] for s in llm_spans + chat_spans} == {case.trace_id}
    # ...and each chat span is under its call's step: the scheduler's publish, the gateway's consumer.
    for llm in llm_spans:
        [chat] = [s for s in descendants(spans, llm) if s["name"] == "chat default"]
        hops = [(s["service"], s["name"]) for s in chain_up(spans, chat, llm)]
        assert hops[:3] == [
            ("tianshu-llm-gateway", "chat default"),
            ("tianshu-llm-gateway", "process tianshu.v1.llm.calls"),
            ("tianshu-scheduler", "send tianshu.v1.llm.calls"),
        ], hops
        assert hops[-1] == ("tianshu-scheduler", "tianshu.llm")
        assert chat["attributes"]["tianshu.llm.call_id"]
    for chat in chat_spans:
        attributes = chat["attributes"]
        assert attributes["gen_ai.operation.name"] == "chat"
        assert attributes["gen_ai.provider.name"] == "scripted"
        assert attributes["gen_ai.request.model"] == "default"
    # The tokens each span reports are what the upstream counted for its request.
    requests = asked(upstream, "agent-model")
    assert len(requests) == 2
    reported = [
        (s["attributes"]["gen_ai.usage.input_tokens"], s["attributes"]["gen_ai.usage.output_tokens"])
        for s in chat_spans
    ]
    assert sorted(reported) == sorted((r.input_tokens, r.output_tokens) for r in requests)


# -- a scheduler killed ------------------------------------------------------------------------


async def test_a_killed_scheduler_loses_no_answer_and_a_replay_asks_no_model_again(
    stack: Stack, nc: Client, db: CaseDb, upstream: ModelServer
) -> None:
    hot = {"TIANSHU_SCHEDULER_LLM_HOT_WINDOW_S": "0.3", "TIANSHU_SCHEDULER_TOOL_HOT_WINDOW_S": "0.3"}
    stack.gateway()
    first = stack.scheduler(**hot)
    parked, replayed = new_key("parked"), new_key("replayed")
    await request_start(nc, "agent", {"question": "What does a GPU node cost?"}, key=replayed)

    # The model answers round 1 (recorded); its tool call waits for a runner (none yet).
    async def round_one_recorded() -> bool:
        recorded = await db.step_data(replayed, "agent/r1/llm")
        waits = [step for _, _, step in await db.waits(replayed)]
        return bool(recorded) and waits == ["agent/r1/call/call_1"]

    await eventually(round_one_recorded, what="round 1 recorded, the tool call parked", context=stack.logs)
    # The slow call (3 s upstream) outlasts the 0.3 s hot window: the case parks on it.
    await request_start(nc, "agent", {"route": "slow", "question": "Still there?"}, key=parked)
    await db.wait_state(parked, "waiting", within=30, context=stack.logs)
    assert [step for _, _, step in await db.waits(parked)] == ["agent/r1/llm"]
    assert not asked(upstream, "slow-model"), "the slow call was answered before the kill"
    first.kill()  # SIGKILL
    assert len(asked(upstream, "agent-model")) == 1

    # No scheduler runs: the gateway answers the slow call meanwhile, and its result is stored.
    js = nc.jetstream()

    async def stored() -> Any:
        try:
            return await js.get_last_msg(subjects.STREAM_LLM_RESULTS, subjects.llm_result(parked))
        except nats.js.errors.NotFoundError:
            return None

    await eventually(stored, what="the slow call's result stored", within=30, context=stack.logs)
    assert (await db.case(parked))["execution_state"] == "waiting"

    stack.scheduler(**hot)
    stack.runner()
    await db.wait_all([parked, replayed], within=60, context=stack.logs)
    assert (await db.case(parked))["output"] == {"answer": "slept through the restart"}
    assert (await db.case(replayed))["output"] == {"answer": "the node costs 32000 USD"}
    # Each model call reached the upstream once: the parked one, and round 1 of the replayed case.
    assert len(asked(upstream, "slow-model")) == 1
    assert len(asked(upstream, "agent-model")) == 2  # round 1 before the kill, round 2 after
    assert len(await db.step_data(replayed, "agent/r1/llm")) == 1


# -- following a case through the stack ----------------------------------------------------------


async def test_a_follower_reads_every_reply_whole_and_in_order_and_a_cut_one_replaced(
    stack: Stack, nc: Client, db: CaseDb, upstream: ModelServer
) -> None:
    stack.scheduler()
    stack.gateway()
    stack.runner()
    client = TianshuClient(nc)
    js = nc.jetstream()
    tools_key, cut_key = new_key("follow"), new_key("follow-cut")
    followers = {key: asyncio.create_task(follow_all(client, key)) for key in (tools_key, cut_key)}
    try:
        # Both followers are subscribed (a consumer each on the stream) before the cases start.
        async def subscribed() -> bool:
            return (await js.stream_info(subjects.STREAM_LLM_STREAM)).state.consumer_count >= 2

        await eventually(subscribed, what="2 followers subscribed", within=10)
        await request_start(nc, "agent", {"question": "What does a GPU node cost?"}, key=tools_key)
        await request_start(nc, "agent", {"route": "cut", "question": "Say it all"}, key=cut_key)
        done, _ = await asyncio.wait(followers.values(), timeout=60)
        assert len(done) == 2, stack.logs()
        seen = {key: task.result() for key, task in followers.items()}
    finally:
        for task in followers.values():
            task.cancel()
    for key in (tools_key, cut_key):
        last = seen[key][-1]
        assert isinstance(last, CaseUpdated) and last.execution_state == "finished", last

    # The tool loop: two model calls, each whole and in order, one after the other.
    chunks = chunks_of(seen[tools_key])
    calls = list(dict.fromkeys(c.call_id for c in chunks))
    assert len(calls) == 2
    assert [c.call_id for c in chunks] == [calls[0]] * sum(c.call_id == calls[0] for c in chunks) + [
        calls[1]
    ] * sum(c.call_id == calls[1] for c in chunks)
    first = [c for c in chunks if c.call_id == calls[0]]
    second = [c for c in chunks if c.call_id == calls[1]]
    assert one_call(first) == ""
    [recorded] = await db.step_data(tools_key, "agent/r1/llm")
    uses = [c.event.call for c in first if isinstance(c.event, ToolUse)]
    assert [(u.id, u.name, u.arguments) for u in uses] == [
        (t["id"], t["name"], t["arguments"]) for t in recorded["tool_calls"]
    ]
    answer = (await db.case(tools_key))["output"]["answer"]
    assert one_call(second) == answer == "the node costs 32000 USD"

    # The cut stream: attempt 1's deltas end in an incomplete StreamError; attempt 2 (the backup)
    # streams from seq 1 to Done, and its text is the case's answer.
    chunks = chunks_of(seen[cut_key])
    assert len({c.call_id for c in chunks}) == 1
    attempts = [c.attempt for c in chunks]
    assert attempts == sorted(attempts) and set(attempts) == {1, 2}, attempts
    cut = [c for c in chunks if c.attempt == 1]
    assert [c.seq for c in cut] == list(range(1, len(cut) + 1))
    assert cut[:-1] and all(isinstance(c.event, TextDelta) for c in cut[:-1])
    end = cut[-1].event
    assert isinstance(end, StreamError) and end.incomplete, end
    answer = (await db.case(cut_key))["output"]["answer"]
    assert (
        one_call([c for c in chunks if c.attempt == 2], attempt=2) == answer == "the backup answers in full"
    )
    assert [r.status for r in asked(upstream, "cut-model")] == [200]  # cut mid-body, after its 200
    assert len(asked(upstream, "backup-model")) == 1


# -- usage of a session ------------------------------------------------------------------------


async def test_the_usage_of_a_session_is_what_the_upstream_counted_failed_attempts_included(
    stack: Stack, nc: Client, db: CaseDb, upstream: ModelServer
) -> None:
    stack.scheduler()
    stack.gateway()
    stack.runner()
    client = TianshuClient(nc)
    session = f"session-{uuid.uuid4().hex[:8]}"
    retried, agent = new_key("usage-retried"), new_key("usage-agent")
    await client.start_case(
        "agent", {"route": "flaky", "question": "Are you up?"}, case_key=retried, session_id=session
    )
    await client.start_case(
        "agent", {"question": "What does a GPU node cost?"}, case_key=agent, session_id=session
    )
    await db.wait_all([retried, agent], within=60, context=stack.logs)
    assert (await db.case(retried))["output"] == {"answer": "answered on the retry"}

    stores = await connect_postgres(stack.db_url, max_size=1)
    try:
        rows = {key: await stores.usage.rows(case_key=key) for key in (retried, agent)}
        totals = {key: await stores.usage.summary(case_key=key) for key in (retried, agent)}
        in_session = await stores.usage.summary(session_id=session)
        session_rows = await stores.usage.rows(session_id=session)
    finally:
        await stores.close()

    # The retried call: one row, two attempts (a 500, then the answer), the tokens of both requests.
    flaky = asked(upstream, "flaky-model")
    assert [r.status for r in flaky] == [500, 200]
    [row] = rows[retried]
    assert (row.route, row.provider, row.session_id, row.error_class) == ("flaky", "scripted", session, None)
    assert row.attempts == 2
    assert (row.input_tokens, row.output_tokens) == (
        sum(r.input_tokens for r in flaky),
        sum(r.output_tokens for r in flaky),
    )
    # The tool loop: a row per call, in order, each the tokens of its request.
    loop = asked(upstream, "agent-model")
    assert [(r.attempts, r.input_tokens, r.output_tokens) for r in rows[agent]] == [
        (1, r.input_tokens, r.output_tokens) for r in loop
    ]
    # Each case's totals are its rows'; the session's, both cases' and every upstream request's.
    for key in (retried, agent):
        assert (totals[key].calls, totals[key].input_tokens, totals[key].output_tokens) == (
            len(rows[key]),
            sum(r.input_tokens for r in rows[key]),
            sum(r.output_tokens for r in rows[key]),
        )
    assert upstream.stats.count == 4
    assert {r.call_id for r in session_rows} == {r.call_id for rs in rows.values() for r in rs}
    assert (in_session.calls, in_session.attempts) == (3, 4)
    assert in_session.input_tokens == upstream.stats.input_tokens > 0
    assert in_session.output_tokens == upstream.stats.output_tokens > 0
    cost = (
        upstream.stats.input_tokens * PRICES["input"] + upstream.stats.output_tokens * PRICES["output"]
    ) / 1e6
    assert in_session.cost_usd == pytest.approx(cost)
    # What `tianshu usage --session S --json` prints is the same.
    shown = cli("usage", "--session", session, "--json", env={"TIANSHU_DATABASE_URL": stack.db_url})
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout) == in_session.model_dump(mode="json")


# -- secrets -----------------------------------------------------------------------------------


async def test_a_refused_key_appears_nowhere_and_the_workflow_sees_a_credentials_error(
    stack: Stack, nc: Client, db: CaseDb, upstream: ModelServer
) -> None:
    collector = RawCollector()
    try:
        env = {"OTEL_EXPORTER_OTLP_ENDPOINT": collector.url, **OTEL_FAST, "TIANSHU_LOG_LEVEL": "DEBUG"}
        scheduler = stack.scheduler(**env)
        gateway = stack.gateway(**env)
        js = nc.jetstream()
        async with (
            StreamReader(js, subjects.DEAD_LETTERS) as dead,
            StreamReader(js, subjects.LLM_RESULTS) as results,
            StreamReader(js, subjects.LLM_STREAMS) as streamed,
        ):
            key = new_key("leak")
            await request_start(nc, "llm_probe", {"route": "leak", "question": "Who am I?"}, key=key)
            failed = await db.wait_state(key, "failed", within=60, context=stack.logs)
            error = json.loads(failed["error"])
            assert error["type"] == "LlmError", error
            [seen] = await db.step_data(key, "llm_error")
            assert (seen["type"], seen["error_class"]) == ("LlmError", LlmErrorClass.CREDENTIALS.value), seen
            # The key was sent upstream, and the upstream's 401 quoted it whole.
            sent = asked(upstream, "leaky-model")
            assert sent and {r.api_key_sha256 for r in sent} == {key_fingerprint(SENTINEL)}

            async def exported() -> bool:
                chats = of_case(collector.spans, "chat leak", key)
                return bool(chats and of_case(collector.spans, "tianshu.llm", key))

            await eventually(exported, what="the call's spans", within=20)
            [chat] = of_case(collector.spans, "chat leak", key)
            assert chat["attributes"]["error.type"] == "credentials"
            await results.until(lambda: bool(results.messages), within=10, what="the call's result")
            # A result the scheduler dead-letters (its case does not exist) carries the upstream's
            # error message into the DLQ: the refusal quoting the key, redacted.
            stray = new_call("leak")
            await send_call(js, stray)
            await dead.until(
                lambda: any(stray.call_id.encode() in m.data for m in dead.messages),
                within=20,
                what="the stray result dead-lettered",
            )
            shown = cli("cases", "show", key, env={"TIANSHU_DATABASE_URL": stack.db_url})
            assert shown.returncode == 0 and "LlmError" in shown.stdout, shown.stderr
            history = cli("cases", "history", key, env={"TIANSHU_DATABASE_URL": stack.db_url})
            assert history.returncode == 0, history.stderr
            checked = check_config(str(stack.config), env={**os.environ, **KEY_ENV})
            assert checked.returncode == 0 and "LLM_SERVICE_SENTINEL_KEY" in checked.stdout, checked.stderr
            await asyncio.sleep(0.5)  # what is still in flight to the collector and the readers
            places = {
                "scheduler log": scheduler.log_text(),
                "gateway log": gateway.log_text(),
                "spans": "\n".join(collector.raw),
                "dead letters": "\n".join(m.data.decode(errors="replace") for m in dead.messages),
                "results": "\n".join(m.data.decode(errors="replace") for m in results.messages),
                "stream events": "\n".join(m.data.decode(errors="replace") for m in streamed.messages),
                "tianshu cases show": shown.stdout + shown.stderr,
                "tianshu cases history": history.stdout + history.stderr,
                "--check-config": checked.stdout + checked.stderr,
                "database": await dump_database(stack.db_url),
            }
    finally:
        collector.close()
    # The upstream's refusal (which quoted the key) reached each of these, redacted.
    quoted = ("scheduler log", "gateway log", "spans", "dead letters", "results", "tianshu cases show")
    assert {where for where in quoted if REDACTED not in places[where]} == set()
    leaked = [where for where, text in places.items() if SENTINEL in text]
    assert not leaked, f"the key appears in: {', '.join(leaked)}"


# -- bad input ---------------------------------------------------------------------------------


async def test_an_unknown_route_fails_at_once_and_bad_calls_are_dead_lettered_on_delivery_1(
    stack: Stack, nc: Client, db: CaseDb, upstream: ModelServer
) -> None:
    stack.scheduler()  # its calls' deadline: 120 s hot window + 300 s + 30 s
    stack.gateway(TIANSHU_LLM_GATEWAY_MAX_REQUEST_BYTES=str(64 * 1024))
    js = nc.jetstream()
    async with LlmDeadLetters(js) as dead:
        key = new_key("no-route")
        started = time.monotonic()
        await request_start(nc, "llm_probe", {"route": "no-such-route"}, key=key)
        failed = await db.wait_state(key, "failed", within=60, context=stack.logs)
        took = time.monotonic() - started
        assert took < 30, f"the case failed after {took:.1f} s"  # not after a deadline (minutes)
        assert json.loads(failed["error"])["type"] == "LlmError"
        [seen] = await db.step_data(key, "llm_error")
        assert seen["error_class"] == LlmErrorClass.FATAL.value and "no-such-route" in seen["message"], seen
        assert not [e for e in await db.journal(key) if e["kind"] == "timer"]  # never parked

        def letters_of_case() -> list[Any]:
            found = []
            for letter in dead.all():
                try:
                    call = LLM_CALL_REQUEST_ADAPTER.validate_json(letter.raw_payload())
                except ValueError:
                    continue
                if call.case_key == key:
                    found.append(letter)
            return found

        await dead.until(lambda: bool(letters_of_case()), within=10, what="the call's dead letter")
        [letter] = letters_of_case()
        assert letter.reason is DeadLetterReason.REFUSED and letter.error.code == "unknown_route"
        assert "no-such-route" in letter.error.message and letter.delivery_count == 1

        # Calls published by hand: not JSON, not a call, too large for this gateway.
        garbage, wrong = f"garbage-{uuid.uuid4().hex[:8]}", f"wrong-{uuid.uuid4().hex[:8]}"
        await publish(js, subjects.LLM_CALLS, b"{not json", msg_id=garbage)
        await publish(js, subjects.LLM_CALLS, b'{"kind": "llm_call", "call_id": 7}', msg_id=wrong)
        big = new_call("default", "word " * 20_000)  # ~100 KB, over the 64 KiB this gateway takes
        await send_call(js, big)
        wanted = {garbage, wrong, f"{big.call_id}:1"}
        await dead.until(lambda: wanted <= {d.msg_id for d in dead.all()}, within=10, what="3 dead letters")
    letters = {d.msg_id: d for d in dead.all() if d.msg_id in wanted}
    assert letters[garbage].reason is DeadLetterReason.UNDECODABLE
    assert letters[wrong].reason is DeadLetterReason.SCHEMA_INVALID
    assert letters[f"{big.call_id}:1"].reason is DeadLetterReason.TOO_LARGE
    assert {d.delivery_count for d in letters.values()} == {1}
    assert upstream.stats.count == 0  # none of them went upstream
