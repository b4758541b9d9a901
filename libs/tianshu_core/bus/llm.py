"""Model calls over NATS, from the workflow's side: the `LlmProvider` the scheduler's engine uses.

A call is published as an `LlmCallRequest` (its `Nats-Msg-Id` is `<call_id>:<attempt>`, so a
re-sent delivery is a duplicate but a new attempt is not) on the LLM gateways' work queue. The
client then waits a bounded time (the hot window, long: model calls are slow, and parking and
replaying every round would cost more than it saves) for the `LlmCallResult`, which every
scheduler sees on core NATS as the gateway publishes it: the fast path, which keeps the case's
coroutine. Past the hot window it raises `LlmCallPending`, and the case parks as an ordinary
wait on the call id; the scheduler that consumes the result from TIANSHU_LLM_RESULTS records it
as an event there, which wakes the case. Past the call's deadline with no result (a gateway
outage), the tool loop sends the same call id again as the next attempt, up to `max_attempts`;
only then does the workflow get `LlmError` (`unavailable`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta

from nats.aio.client import Client
from nats.js import JetStreamContext

from tianshu_contracts import subjects
from tianshu_contracts.gateway import LLM_CALL_RESULT_ADAPTER, LlmCallRequest, LlmCallResult
from tianshu_contracts.llm import LlmErrorClass, LlmRequest, LlmResponse, LlmStreamEvent

from ..context import StoreFailure
from ..llm import LlmCallPending, LlmError, LlmInvocation, events_of
from ..transient import is_transient
from .awaited import AwaitedResults
from .publish import encode, publish

log = logging.getLogger(__name__)

_ANSWERED_KEPT = 10_000
# Room under the server's max_payload for the request's headers.
_HEADROOM = 4 * 1024


class NatsLlmClient:
    """Sends model calls to the LLM gateways and awaits their answers (fast path, then a wait).

    `hot_window_s`: how long a call keeps the case's coroutine; `timeout_s`: how long a gateway may
    take; `grace_s`: the time a redelivery to another gateway may take. The deadline of an attempt
    is the sum, from the moment it is sent. `max_attempts`: how often the same call is sent when a
    deadline passes without an answer. `stream`: ask the gateways to publish the reply's events
    for followers (`TianshuClient.follow`). `record`: stores a result that reached the fast path
    (its event and usage row, as the results consumer does, once per call id) before the run
    goes on with it, so a case never moves on, or ends, before what its call cost is counted.
    """

    retries_calls = True
    """The gateway retries and falls back: the tool loop refuses `llm_retry` with this client."""

    def __init__(
        self,
        nc: Client,
        js: JetStreamContext,
        *,
        hot_window_s: float = 120.0,
        timeout_s: float = 300.0,
        grace_s: float = 30.0,
        max_attempts: int = 3,
        stream: bool = True,
        record: Callable[[LlmCallResult], Awaitable[None]] | None = None,
    ) -> None:
        if max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        self._nc = nc
        self._js = js
        self.hot_window_s = hot_window_s
        self.timeout_s = timeout_s
        self.grace_s = grace_s
        self.max_attempts = max_attempts
        self.stream_events = stream
        self.record = record
        self._results = AwaitedResults(nc, subjects.LLM_RESULTS, LLM_CALL_RESULT_ADAPTER, subjects.llm_result)

    async def start(self) -> None:
        """Listen for results on core NATS (every scheduler sees every result; cheap to ignore)."""
        await self._results.start()

    async def stop(self) -> None:
        await self._results.stop()

    def resolve(self, result: LlmCallResult) -> bool:
        """Hand a result to the run awaiting it here, if any. True when a run here awaits or
        awaited that call (its case exists)."""
        return self._results.resolve(result)

    def deadline_s(self) -> float:
        """Seconds from sending an attempt to its deadline."""
        return self.hot_window_s + self.timeout_s + self.grace_s

    async def complete(self, request: LlmRequest, *, invocation: LlmInvocation | None = None) -> LlmResponse:
        """Send the call and wait for its answer within the hot window, else `LlmCallPending`."""
        if invocation is None:
            raise ValueError("a model call sent over NATS needs its invocation (case and record)")
        deadline = datetime.now(UTC) + timedelta(seconds=self.deadline_s())
        call = LlmCallRequest(
            call_id=invocation.call_id,
            case_key=invocation.case_key,
            record=invocation.record,
            attempt=invocation.attempt,
            deadline=deadline,
            stream=self.stream_events,
            request=request,
        )
        data = encode(call)
        if len(data) > self._nc.max_payload - _HEADROOM:
            raise LlmError(
                f"the request is {len(data)} bytes, over what NATS carries ({self._nc.max_payload} bytes, "
                "max_payload); raise the server's max_payload or shorten the conversation",
                error_class=LlmErrorClass.REQUEST_TOO_LARGE,
            )
        async with self._results.awaiting(invocation.call_id) as future:
            try:
                await publish(
                    self._js, subjects.LLM_CALLS, data, msg_id=f"{invocation.call_id}:{invocation.attempt}"
                )
            except Exception as exc:
                # NATS is out of reach: not the case's fault. The run is abandoned and retried.
                raise StoreFailure(exc) from exc
            try:
                result = await asyncio.wait_for(asyncio.shield(future), self.hot_window_s)
            except TimeoutError:
                left = (deadline - datetime.now(UTC)).total_seconds()
                raise LlmCallPending(max(left, 0.0)) from None
        if self.record is not None:
            try:
                await self.record(result)
            except Exception as exc:
                if is_transient(exc):  # the run is retried, and reads the result the consumer stores
                    raise StoreFailure(exc) from exc
                raise
        return answer(result)

    async def stream(
        self, request: LlmRequest, *, invocation: LlmInvocation | None = None
    ) -> AsyncIterator[LlmStreamEvent]:
        """The answer as events once it is complete (followers see it live on the stream subject)."""
        for event in events_of(await self.complete(request, invocation=invocation)):
            yield event


def answer(result: LlmCallResult) -> LlmResponse:
    """The response a result carries; its `LlmError` if the gateway could not get one."""
    if result.response is not None:
        return result.response.model_copy(update={"attempts": result.attempts})
    error = result.error
    assert error is not None
    raise LlmError(
        error.message,
        error_class=result.error_class or LlmErrorClass.FATAL,
        attempts=result.attempts,
    )
