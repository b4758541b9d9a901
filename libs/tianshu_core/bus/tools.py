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
import contextlib
import logging
from collections import OrderedDict
from datetime import UTC, datetime, timedelta

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext
from pydantic import ValidationError

from tianshu_contracts import subjects
from tianshu_contracts.llm import ToolCall, ToolResult
from tianshu_contracts.tools import TOOL_CALL_RESULT_ADAPTER, ToolCallRequest, ToolCallResult

from ..context import StoreFailure
from ..tools import ToolCallPending, ToolInvocation
from .publish import publish
from .strict import holds_nul, non_strict_constant

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
        self._waiting: dict[str, asyncio.Future[ToolCallResult]] = {}
        # Calls answered on the fast path, and their cases: the same result comes again through
        # the durable consumer a moment later.
        self._answered: OrderedDict[str, str] = OrderedDict()
        self._sub: Subscription | None = None

    async def start(self) -> None:
        """Listen for results on core NATS (every scheduler sees every result; cheap to ignore)."""
        self._sub = await self._nc.subscribe(subjects.TOOL_RESULTS, cb=self._on_result)

    async def stop(self) -> None:
        if self._sub is not None:
            sub, self._sub = self._sub, None
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    def resolve(self, result: ToolCallResult) -> bool:
        """Hand a result to the run awaiting it here, if any. True when a run here awaits or
        awaited it (its case exists): the durable consumer then needs no lookup of the case."""
        future = self._waiting.get(result.call_id)
        if future is None:
            return self._answered.get(result.call_id) == result.case_key
        if not future.done():
            future.set_result(result)
            self._answered[result.call_id] = result.case_key
            if len(self._answered) > _ANSWERED_KEPT:
                self._answered.popitem(last=False)
        return True

    async def _on_result(self, msg: Msg) -> None:
        # Only a result the durable consumer would accept: anything else it dead-letters, and the
        # case learns of the call's failure by its deadline, never from a bad message.
        data = msg.data
        if non_strict_constant(data) is not None or holds_nul(data):
            return
        try:
            result = TOOL_CALL_RESULT_ADAPTER.validate_json(data)
            if subjects.tool_result(result.case_key) != msg.subject:
                return
        except (ValidationError, ValueError):
            return
        self.resolve(result)

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
        future = self._waiting.get(invocation.call_id)
        if future is None or future.done():
            future = asyncio.get_running_loop().create_future()
            self._waiting[invocation.call_id] = future
        try:
            try:
                await publish(self._js, subjects.tool_call(call.name), request, msg_id=invocation.call_id)
            except Exception as exc:
                # NATS is out of reach: not the case's fault. The run is abandoned and retried.
                raise StoreFailure(exc) from exc
            result = await asyncio.wait_for(asyncio.shield(future), hot)
        except TimeoutError:
            # Park the case; the result wakes it whenever it comes, up to the call's deadline
            # (the tool's timeout and the time a redelivery to another runner may take).
            left = (deadline - datetime.now(UTC)).total_seconds()
            raise ToolCallPending(max(left, 0.0)) from None
        finally:
            if self._waiting.get(invocation.call_id) is future:
                del self._waiting[invocation.call_id]
        return result.result
