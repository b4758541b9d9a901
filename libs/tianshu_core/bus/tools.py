"""Tool calls over NATS, from the workflow's side: the executor `ctx.tool_step` uses in service mode.

A call is published as a `ToolCallRequest` (its `Nats-Msg-Id` is the call id, so a re-sent call is
a duplicate) to the runners' work queue. The executor then waits a short, bounded time (the hot
window) for the result, which every scheduler sees on core NATS as the runner publishes it: the
fast path, which keeps the case's coroutine. Past the hot window it raises `ToolCallPending`, and
the case parks as an ordinary wait on the call id; the scheduler that consumes the result from
the TIANSHU_TOOL_RESULTS stream records it as an event there, which wakes the case. Both paths end
in the same recorded result, keyed by the call id.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime, timedelta

from nats.aio.client import Client
from nats.js import JetStreamContext

from tianshu_contracts import subjects
from tianshu_contracts.llm import ToolCall, ToolResult
from tianshu_contracts.tools import TOOL_CALL_RESULT_ADAPTER, ToolCallRequest, ToolCallResult

from ..context import StoreFailure
from ..tools import ToolCallPending, ToolInvocation
from .awaited import AwaitedResults
from .publish import publish

log = logging.getLogger(__name__)

_ANSWERED_KEPT = 10_000


class NatsToolExecutor:
    """Sends tool calls to the tool runners and awaits their results (fast path, then a wait)."""

    def __init__(
        self,
        nc: Client,
        js: JetStreamContext,
        *,
        hot_window_s: float = 5.0,
        default_timeout_s: float = 60.0,
        grace_s: float = 30.0,
    ) -> None:
        self._nc = nc
        self._js = js
        self.hot_window_s = hot_window_s
        self.default_timeout_s = default_timeout_s
        self.grace_s = grace_s
        self._results = AwaitedResults(
            nc, subjects.TOOL_RESULTS, TOOL_CALL_RESULT_ADAPTER, subjects.tool_result
        )

    async def start(self) -> None:
        """Listen for results on core NATS (every scheduler sees every result; cheap to ignore)."""
        await self._results.start()

    async def stop(self) -> None:
        await self._results.stop()

    def resolve(self, result: ToolCallResult) -> bool:
        """Hand a result to the run awaiting it here, if any. True when a run here awaits or
        awaited it (its case exists): the durable consumer then needs no lookup of the case."""
        return self._results.resolve(result)

    async def execute(
        self, call: ToolCall, *, timeout_s: float | None = None, invocation: ToolInvocation | None = None
    ) -> ToolResult:
        """Publish the call and wait for its result within the hot window, else `ToolCallPending`."""
        if invocation is None:
            raise ValueError("a tool call sent over NATS needs its invocation (case and record)")
        timeout = timeout_s if timeout_s is not None else self.default_timeout_s
        hot = min(self.hot_window_s, timeout + 1.0)
        # The moment the case stops waiting and tells the model the call failed: the hot window,
        # then the parked wait below. A runner that gets the call later must not run it.
        deadline = datetime.now(UTC) + timedelta(seconds=hot + timeout + self.grace_s)
        request = ToolCallRequest(
            call_id=invocation.call_id,
            case_key=invocation.case_key,
            step=invocation.step,
            tool=call.name,
            tool_call_id=call.id,
            arguments=call.arguments,
            timeout_s=timeout,
            deadline=deadline,
        )
        async with self._results.awaiting(invocation.call_id) as future:
            try:
                await publish(self._js, subjects.tool_call(call.name), request, msg_id=invocation.call_id)
            except Exception as exc:
                # NATS is out of reach: not the case's fault. The run is abandoned and retried.
                raise StoreFailure(exc) from exc
            try:
                result = await asyncio.wait_for(asyncio.shield(future), hot)
            except TimeoutError:
                # Park the case; the result wakes it whenever it comes, up to the call's deadline
                # (the tool's timeout and the time a redelivery to another runner may take).
                left = (deadline - datetime.now(UTC)).total_seconds()
                raise ToolCallPending(max(left, 0.0)) from None
        return result.result
