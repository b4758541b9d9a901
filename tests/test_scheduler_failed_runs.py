"""In the scheduler service too, a bad value fails its case once and a failing run backs off and
fails after its budget (`TIANSHU_MAX_FAILED_RUNS`); neither is picked up again by the sweeper."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from nats.aio.client import Client

from tests._services import SchedulerProcess, executions
from tests.test_scheduler_service import nc, start, wait_state  # noqa: F401 (nc is a fixture)
from tianshu_core import ExecutionState
from tianshu_core.stores.postgres import connect_postgres

pytestmark = [pytest.mark.e2e, pytest.mark.nats, pytest.mark.postgres]


async def test_a_bad_value_and_a_failing_run_each_fail_their_case_once(
    tmp_path: Path,
    pg_migrated_url: str,
    nats_url: str,
    nc: Client,  # noqa: F811
) -> None:
    budget = {
        "TIANSHU_MAX_FAILED_RUNS": "3",
        "TIANSHU_FAILED_RUN_BACKOFF_S": "0.1",
        "TIANSHU_FAILED_RUN_BACKOFF_MAX_S": "0.2",
    }
    stores = await connect_postgres(pg_migrated_url, max_size=2)
    try:
        with SchedulerProcess(tmp_path, pg_migrated_url, nats_url, **budget):
            bad = await start(nc, "e2e_bad_output")
            broken = await start(nc, "e2e_broken_waiting")
            refused = await wait_state(pg_migrated_url, bad, ExecutionState.FAILED)
            spent = await wait_state(pg_migrated_url, broken, ExecutionState.FAILED)
            journals = {key: await stores.journal.load(key) for key in (bad, broken)}
            await asyncio.sleep(1.0)  # five sweeps: room for a case picked up again to show
            assert {key: await stores.journal.load(key) for key in (bad, broken)} == journals
    finally:
        await stores.close()
    assert refused.error is not None and refused.error.type == "UnstorableValueError"
    assert refused.error.message.startswith("the output of the case cannot be stored: a NUL character")
    assert spent.error is not None and spent.error.type == "AttributeError"
    assert spent.error.message.startswith("the case's run failed 3 times in a row: ")
    runs = executions(tmp_path)
    assert (runs[(bad, "made")], runs[(broken, "made")], runs[(broken, "run")]) == (1, 1, 3)
