"""The scheduler service end to end: real NATS, real Postgres, the scheduler as a process."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import nats
import pytest
from nats.aio.client import Client

from tests._services import SchedulerProcess, executions
from tianshu_core import Case, ExecutionState, connect_postgres

pytestmark = [pytest.mark.e2e, pytest.mark.nats, pytest.mark.postgres]


@pytest.fixture
async def nc(nats_url: str) -> AsyncIterator[Client]:
    client = await nats.connect(nats_url)
    yield client
    await client.close()


async def start(nc: Client, code: str, input: Any = None, key: str | None = None) -> str:
    body: dict[str, Any] = {"kind": "start_case", "workflow_code": code, "input": input}
    if key:
        body["case_key"] = key
    reply = json.loads(
        (await nc.request("tianshu.v1.rpc.cases.start", json.dumps(body).encode(), timeout=10)).data
    )
    assert reply["kind"] == "start_case_accepted", reply
    return str(reply["case_key"])


async def case_of(url: str, key: str) -> Case:
    stores = await connect_postgres(url, max_size=1)
    try:
        case = await stores.cases.get_by_key(key)
    finally:
        await stores.close()
    assert case is not None
    return case


async def wait_state(url: str, key: str, state: ExecutionState, within: float = 20.0) -> Case:
    deadline = asyncio.get_running_loop().time() + within
    while True:
        case = await case_of(url, key)
        if case.execution_state is state:
            return case
        if case.is_terminal or asyncio.get_running_loop().time() > deadline:
            raise AssertionError(
                f"case {key} is {case.execution_state.value}, not {state.value}: {case.error}"
            )
        await asyncio.sleep(0.05)


async def publish_event(
    nc: Client, resource_type: str, resource_id: str, payload: Any, msg_id: str | None = None
) -> None:
    """What an outside system does: a plain nats-py JetStream publish, nothing of ours."""
    headers = {"Nats-Msg-Id": msg_id} if msg_id else None
    await nc.jetstream().publish(
        f"tianshu.v1.events.{resource_type}.{resource_id}", json.dumps(payload).encode(), headers=headers
    )


async def test_raw_nats_publish_wakes_a_waiting_case(
    tmp_path: Path, pg_migrated_url: str, nats_url: str, nc: Client
) -> None:
    with SchedulerProcess(tmp_path, pg_migrated_url, nats_url):
        key = await start(nc, "e2e_wait")
        await wait_state(pg_migrated_url, key, ExecutionState.WAITING)
        await publish_event(nc, "order", key, {"paid": 42})
        done = await wait_state(pg_migrated_url, key, ExecutionState.FINISHED)
    assert done.output == {"paid": 42}
    assert executions(tmp_path)[(key, "after")] == 1


async def test_early_duplicate_and_shared_events(
    tmp_path: Path, pg_migrated_url: str, nats_url: str, nc: Client
) -> None:
    resource = f"r-{uuid.uuid4().hex[:8]}"
    with SchedulerProcess(tmp_path, pg_migrated_url, nats_url):
        early = await start(nc, "e2e_steps", {"steps": 0})  # finishes at once; only to move time on
        a = await start(nc, "e2e_wait", {"resource": resource})
        b = await start(nc, "e2e_wait", {"resource": resource})
        await wait_state(pg_migrated_url, a, ExecutionState.WAITING)
        await wait_state(pg_migrated_url, b, ExecutionState.WAITING)
        dup_id = f"evt-{uuid.uuid4().hex}"
        await publish_event(nc, "order", resource, "first", msg_id=dup_id)
        await publish_event(nc, "order", resource, "first", msg_id=dup_id)
        for key in (a, b):
            assert (await wait_state(pg_migrated_url, key, ExecutionState.FINISHED)).output == "first"
        # An event published before its case waits (even before the case exists in NATS' eyes).
        late = await start(nc, "e2e_wait", {"resource": f"{resource}-late"})
        await publish_event(nc, "order", f"{resource}-late", "early bird")
        assert (await wait_state(pg_migrated_url, late, ExecutionState.FINISHED)).output == "early bird"
        await wait_state(pg_migrated_url, early, ExecutionState.FINISHED)
    runs = executions(tmp_path)
    assert runs[(a, "after")] == runs[(b, "after")] == 1
