"""A case's tokens and cost reach clients: `TianshuClient.get_case` through a running scheduler."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import nats
import pytest
from nats.aio.msg import Msg

from tests._nats import NatsServerFactory
from tests._services import SchedulerProcess, fresh_database, new_key
from tianshu_contracts import CASE_UPDATED_ADAPTER, CaseUpdated, subjects
from tianshu_core.client import TianshuClient
from tianshu_core.stores.postgres import connect_postgres
from tianshu_core.stores.protocols import UsageRow

pytestmark = [pytest.mark.e2e, pytest.mark.nats, pytest.mark.postgres]


@pytest.fixture
async def db_url(pg_server_url: str) -> AsyncIterator[str]:
    async with fresh_database(pg_server_url, "tianshu_case_usage") as url:
        yield url


async def test_get_case_shows_the_tokens_and_cost_of_its_model_calls(
    tmp_path: Path, db_url: str, make_nats_server: NatsServerFactory
) -> None:
    server = make_nats_server()
    with SchedulerProcess(tmp_path, db_url, server.url):
        async with TianshuClient.connect(server.url) as client:
            quiet = await client.start_case("e2e_wait", {}, case_key=new_key("quiet"))
            busy = await client.start_case("e2e_wait", {}, case_key=new_key("busy"))
            stores = await connect_postgres(db_url, max_size=1)
            try:
                for n, (tokens_in, tokens_out, cost) in enumerate([(100, 20, 0.01), (50, 5, None)]):
                    await stores.usage.record(
                        UsageRow(
                            call_id=f"{busy.case_key}-{n}",
                            case_key=busy.case_key,
                            session_id=busy.session_id,
                            workflow_code="e2e_wait",
                            route="default",
                            provider="scripted",
                            model="text",
                            attempts=1 + n,
                            input_tokens=tokens_in,
                            output_tokens=tokens_out,
                            cost_usd=cost,
                        )
                    )
            finally:
                await stores.close()
            shown = await client.get_case(busy.case_key)
            assert shown is not None and shown.usage is not None
            assert (shown.usage.calls, shown.usage.attempts) == (2, 3)
            assert (shown.usage.input_tokens, shown.usage.output_tokens) == (150, 25)
            assert shown.usage.cost_usd == pytest.approx(0.01)
            none = await client.get_case(quiet.case_key)
            assert none is not None and none.usage is None


async def test_an_update_says_what_a_waiting_case_waits_on(
    tmp_path: Path, db_url: str, make_nats_server: NatsServerFactory
) -> None:

    server = make_nats_server()
    key = new_key("waits")
    seen: list[CaseUpdated] = []
    nc = await nats.connect(server.url)
    try:

        async def keep(msg: Msg) -> None:
            seen.append(CASE_UPDATED_ADAPTER.validate_json(msg.data))

        await nc.subscribe(subjects.case_updated(key), cb=keep)
        with SchedulerProcess(tmp_path, db_url, server.url):
            async with TianshuClient.connect(server.url) as client:
                await client.start_case("e2e_wait", {}, case_key=key)
                for _ in range(200):
                    if any(u.execution_state == "waiting" for u in seen):
                        break
                    await asyncio.sleep(0.05)
    finally:
        await nc.close()
    waiting = [u for u in seen if u.execution_state == "waiting"]
    assert waiting and waiting[-1].waiting_on == ["order"]
