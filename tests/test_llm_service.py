"""Model calls in service mode: a scheduler, an LLM gateway and a tool runner, as processes.

The workflow is `examples.agent` (a tool loop over `ctx.llm`, which in the scheduler is the
gateway's client); the upstream is the project's scripted model server, in this process, so the
test can read what it was asked.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import nats
import pytest
from nats.aio.client import Client

from tests._gateway import GatewayProcess, write_config
from tests._nats import NatsServerFactory
from tests._services import CaseDb, SchedulerProcess, fresh_database, new_key, request_start
from tests._tool_runner import ToolRunnerProcess
from tianshu_core.model_server import ModelServer
from tianshu_core.stores.postgres import connect_postgres

pytestmark = [pytest.mark.e2e, pytest.mark.nats, pytest.mark.postgres, pytest.mark.slow]

KEY_ENV = {"LLM_SERVICE_TEST_KEY": "sk-llm-service-test"}
AGENT_SCRIPT = "tools:1+text,say=the_node_costs_32000_USD"
PRICES = {"input": 1.0, "output": 2.0}


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


def providers(path: Path, server: ModelServer, script: str) -> Path:
    return write_config(
        path,
        {
            "providers": [
                {
                    "name": "scripted",
                    "kind": "openai",
                    "base_url": server.openai_base_url,
                    "api_key_env": ["LLM_SERVICE_TEST_KEY"],
                }
            ],
            "models": [{"name": "agent-model", "provider": "scripted", "upstream": script, "prices": PRICES}],
            "routes": [{"name": "default", "chain": ["agent-model"]}],
        },
    )


class Stack:
    def __init__(self, workdir: Path, db_url: str, nats_url: str, config: Path) -> None:
        self.workdir, self.db_url, self.nats_url, self.config = workdir, db_url, nats_url, config
        self.procs: list[Any] = []

    def scheduler(self, **env: str) -> SchedulerProcess:
        made = SchedulerProcess(
            self.workdir, self.db_url, self.nats_url, TIANSHU_WORKFLOWS="examples.agent", **env
        ).start()
        self.procs.append(made)
        return made

    def gateway(self) -> GatewayProcess:
        made = GatewayProcess(self.workdir, self.nats_url, self.config, **KEY_ENV)
        made.start()
        self.procs.append(made)
        return made

    def runner(self) -> ToolRunnerProcess:
        made = ToolRunnerProcess(self.workdir, self.nats_url, TIANSHU_TOOLS="examples.tools").start()
        self.procs.append(made)
        return made

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.log_tail(30)}" for p in self.procs if p.proc is not None)

    def close(self) -> None:
        for proc in self.procs:
            proc.kill()


@pytest.fixture
def stack(tmp_path: Path, db_url: str, nats_url: str, upstream: ModelServer) -> Iterator[Stack]:
    made = Stack(tmp_path, db_url, nats_url, providers(tmp_path / "providers.yaml", upstream, AGENT_SCRIPT))
    yield made
    made.close()


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
    asked = [r for r in upstream.stats.requests if r.model == AGENT_SCRIPT]
    assert len(asked) == 2
    tool_message = [m for m in asked[1].body["messages"] if m["role"] == "tool"]
    assert tool_message and "no catalogue entry" in tool_message[0]["content"]
    # One usage row per call, matching what the upstream counted, priced by the route.
    summary, rows = await usage_of(stack.db_url, key)
    assert summary.calls == 2 and len(rows) == 2
    assert summary.input_tokens == sum(r.input_tokens for r in asked)
    assert summary.output_tokens == sum(r.output_tokens for r in asked)
    expected_cost = (summary.input_tokens * PRICES["input"] + summary.output_tokens * PRICES["output"]) / 1e6
    assert summary.cost_usd == pytest.approx(expected_cost)
    assert {r.provider for r in rows} == {"scripted"} and {r.route for r in rows} == {"default"}


async def test_a_gateway_outage_delays_the_agent_and_the_call_is_sent_again(
    stack: Stack, nc: Client, db: CaseDb, upstream: ModelServer
) -> None:
    # Deadline of a call: 0.5 s hot window + 1 s timeout + 0.5 s grace; three attempts.
    stack.scheduler(
        TIANSHU_SCHEDULER_LLM_HOT_WINDOW_S="0.5",
        TIANSHU_SCHEDULER_LLM_TIMEOUT_S="1",
        TIANSHU_SCHEDULER_LLM_GRACE_S="0.5",
        TIANSHU_SCHEDULER_LLM_MAX_ATTEMPTS="3",
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
