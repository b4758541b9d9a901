"""The scheduler's gateway client (`NatsLlmClient`) on its fast path: an answer that arrives on core
NATS while the run still waits is stored (its event and usage row, through `record`) before the
run goes on with it, so a case never moves on, or ends, before what its call cost is counted.

A stand-in gateway answers each call on core NATS as it is published; real NATS, no scheduler.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg

from tianshu_contracts import LLM_CALL_REQUEST_ADAPTER, LlmCallResult, subjects
from tianshu_contracts.llm import LlmMessage, LlmRequest, LlmResponse
from tianshu_core import bus
from tianshu_core.bus.llm import NatsLlmClient
from tianshu_core.context import StoreFailure
from tianshu_core.errors import UnstorableValueError
from tianshu_core.llm import LlmInvocation
from tianshu_llm_gateway.streams import gateway_streams

REQUEST = LlmRequest(model="default", messages=[LlmMessage.user("hello")])


@pytest.fixture
async def nc(nats_url: str) -> AsyncIterator[Client]:
    client = await bus.connect(bus.NatsSettings(url=nats_url), name="tianshu-tests")
    await bus.ensure_streams(client.jetstream(), gateway_streams())
    yield client
    await client.close()


@pytest.fixture
async def gateway(nc: Client) -> AsyncIterator[None]:
    """Answers every call at once on core NATS, as a gateway publishes its result."""

    async def answer(msg: Msg) -> None:
        call = LLM_CALL_REQUEST_ADAPTER.validate_json(msg.data)
        result = LlmCallResult(
            call_id=call.call_id,
            case_key=call.case_key,
            record=call.record,
            attempt=call.attempt,
            route=call.request.model,
            gateway="stand-in",
            response=LlmResponse(content=f"hi {call.case_key}"),
        )
        await nc.publish(subjects.llm_result(call.case_key), result.model_dump_json().encode())

    sub = await nc.subscribe(subjects.LLM_CALLS, cb=answer)
    yield
    await sub.unsubscribe()


async def ask(client: NatsLlmClient) -> LlmResponse:
    case_key = f"fast-{uuid.uuid4().hex[:12]}"
    return await client.complete(REQUEST, invocation=LlmInvocation.of(case_key, "agent/r1/llm"))


@pytest.mark.usefixtures("gateway")
async def test_an_answer_on_the_fast_path_is_recorded_before_the_run_goes_on(nc: Client) -> None:
    order: list[str] = []

    async def record(result: LlmCallResult) -> None:
        order.append(f"recording {result.call_id}")
        await asyncio.sleep(0.2)  # a slow store: the run must wait for it
        order.append("recorded")

    client = NatsLlmClient(nc, nc.jetstream(), hot_window_s=10, record=record)
    await client.start()
    try:
        response = await ask(client)
        order.append("answered")
    finally:
        await client.stop()
    assert response.content.startswith("hi fast-")
    assert order[1:] == ["recorded", "answered"] and order[0].startswith("recording ")


@pytest.mark.usefixtures("gateway")
async def test_a_store_out_of_reach_ends_the_run_as_an_outage_and_a_refusal_as_itself(nc: Client) -> None:
    failures: list[BaseException] = [
        asyncpg.exceptions.CannotConnectNowError("the database system is starting up"),
        UnstorableValueError("the reply", "a string holds a NUL character"),
    ]

    async def record(_result: LlmCallResult) -> None:
        raise failures.pop(0)

    client = NatsLlmClient(nc, nc.jetstream(), hot_window_s=10, record=record)
    await client.start()
    try:
        with pytest.raises(StoreFailure):  # transient: the run is tried again later
            await ask(client)
        with pytest.raises(UnstorableValueError):  # the answer itself cannot be kept
            await ask(client)
    finally:
        await client.stop()
