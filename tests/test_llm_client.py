"""The scheduler's gateway client (`NatsLlmClient`) on its fast path: an answer that arrives on core
NATS while the run still waits is stored (its event and usage row, through `record`) before the
run goes on with it, so a case never moves on, or ends, before what its call cost is counted.

A stand-in gateway answers each call on core NATS as it is published; real NATS, no scheduler.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from unittest.mock import Mock

import asyncpg
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg

from tianshu_contracts import LLM_CALL_REQUEST_ADAPTER, LLM_CALL_RESULT_ADAPTER, LlmCallResult, subjects
from tianshu_contracts.llm import LlmMessage, LlmRequest, LlmResponse
from tianshu_core import bus
from tianshu_core.bus.awaited import AwaitedResults
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


async def test_only_a_result_a_run_here_awaits_is_decoded_and_only_a_valid_one_resolves(nc: Client) -> None:
    adapter = Mock(wraps=LLM_CALL_RESULT_ADAPTER)
    results: AwaitedResults[LlmCallResult] = AwaitedResults(
        nc, subjects.LLM_RESULTS, adapter, subjects.llm_result
    )
    case_key = f"peek-{uuid.uuid4().hex[:8]}"
    subject = subjects.llm_result(case_key)

    def body(call_id: str, **update: object) -> bytes:
        result = LlmCallResult(
            call_id=call_id,
            case_key=case_key,
            record="agent/r1/llm",
            route="default",
            gateway="stand-in",
            response=LlmResponse(content='say "call_id": "mine"\nplease'),
        )
        return result.model_copy(update=update).model_dump_json().encode()

    async def answer(call_id: str, data: bytes) -> LlmCallResult:
        """Publish `data` as `call_id`'s answer, and wait until it resolves (the subscription
        handles its messages in order: all published before have been handled then)."""
        async with results.awaiting(call_id) as future:
            await nc.publish(subject, data)
            return await asyncio.wait_for(future, 5)

    await results.start()
    try:
        await nc.publish(subject, body("mine"))  # nobody waits here: not even decoded
        assert (await answer("first", body("first"))).call_id == "first"
        assert adapter.validate_json.call_count == 1
        async with results.awaiting("mine") as future:
            for to, data in [
                (subject, body("other")),  # another run's call (its text names ours): not decoded
                (subjects.llm_result("elsewhere"), body("mine")),  # decoded, then refused
                (subject, body("mine").replace(b'"route":"default"', b'"route":""')),  # the same
                (subject, body("mine").replace(b'"gateway":"stand-in"', b'"gateway":"a\\u0000b"')),
                (subject, body("mine").replace(b'"duration_s":0.0', b'"duration_s":NaN')),
            ]:
                await nc.publish(to, data)
            # The key and the id spelt with escapes are read as the parser reads them.
            await nc.publish(
                subject, body("mine").replace(b'"call_id":"mine"', b'"call\\u005fid" :\n "\\u006dine"')
            )
            assert (await asyncio.wait_for(future, 5)).call_id == "mine"
        assert adapter.validate_json.call_count == 4
        assert results.resolve(future.result())  # a run here awaited it: its case exists
        spaced = body("spaced").replace(b'"call_id":"spaced"', b'"call_id" :\t"spaced"')
        assert (await answer("spaced", spaced)).call_id == "spaced"
    finally:
        await results.stop()
