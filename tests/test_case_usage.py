"""A case's tokens and cost reach clients: `TianshuClient.get_case` through a running scheduler."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests._nats import NatsServerFactory
from tests._services import SchedulerProcess, fresh_database, new_key
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
