"""The durable tool-use loop behind `ctx.tool_step`.

Each round asks the model, appends its reply, runs the tool calls it asked for and feeds the
results back, until it answers without tools. Everything that answers is recorded as it arrives,
as an ordinary step under the loop's name:

    <name>/r<k>/llm               the model's reply in round k (an LlmResponse)
    <name>/r<k>/call/<call id>    the result of one tool call of that reply (a ToolResult)
    <name>                        the final text

so a replay asks neither the model nor a tool again for anything recorded; it only runs what had
not answered. After `ctx.clear_steps([name])` the records of the next run go under `<name>@<n>/...`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, TypeVar

from pydantic import ValidationError

from tianshu_contracts import WireError
from tianshu_contracts.llm import LlmErrorClass, LlmMessage, LlmRequest, LlmResponse, ToolCall, ToolResult
from tianshu_contracts.tools import TOOL_CALL_RESULT_ADAPTER

from ..context import Suspend
from ..errors import TianshuError
from ..llm import LLM_RESULT_RESOURCE, LlmCallPending, LlmError, LlmInvocation, takes_invocation
from ..models import PollPredicate
from ..retry import RetryPolicy
from ..telemetry import in_span
from ._executor import (
    DEFAULT_MAX_RESULT_BYTES,
    DEFAULT_TIMEOUT_S,
    ToolCallPending,
    ToolExecutor,
    ToolInvocation,
    Toolset,
    error_result,
)
from ._registry import ToolRegistry
from ._tool import ToolSafety

if TYPE_CHECKING:
    from ..context import WorkflowContext
    from ..llm import LlmProvider

log = logging.getLogger(__name__)
T = TypeVar("T")

TOOL_RESULT_RESOURCE = "tianshu-tool-result"
"""The resource type of a tool result delivered as an event (its id is the call's `call_id`)."""


@dataclass(frozen=True, slots=True)
class ToolLoopConfig:
    """Limits of one tool loop.

    `max_rounds` bounds the model calls; `max_concurrency` the read-only calls running at once;
    `tool_timeout_s` each call (None: no limit but the tool's own). `max_result_bytes` cuts long
    results when the loop is given a `ToolRegistry` (a `Toolset`'s executor has its own limit).
    `llm_retry`, when set, retries a failed model call.
    """

    max_rounds: int = 10
    max_concurrency: int = 5
    tool_timeout_s: float | None = DEFAULT_TIMEOUT_S
    max_result_bytes: int = DEFAULT_MAX_RESULT_BYTES
    llm_retry: RetryPolicy | None = None

    def __post_init__(self) -> None:
        if self.max_rounds < 1:
            raise ValueError("max_rounds must be at least 1")
        if self.max_concurrency < 1:
            raise ValueError("max_concurrency must be at least 1")


class ToolLoopMaxRoundsError(TianshuError):
    """The model still asked for tools in the last reply `max_rounds` allowed."""

    code = "tool_loop_max_rounds"

    def __init__(self, name: str, max_rounds: int, tools: Sequence[str]) -> None:
        super().__init__(
            f"tool loop {name!r} reached max_rounds={max_rounds}: the model's reply in round "
            f"{max_rounds} still asked for tools ({', '.join(tools)}); raise ToolLoopConfig.max_rounds "
            "or change the prompt"
        )
        self.name = name
        self.max_rounds = max_rounds


class _Pending(BaseException):
    """A call whose result is awaited as an event (a remote executor's slow path).

    A BaseException, like `Suspend`, so that spans do not mark the wait as an error.
    """

    def __init__(self, predicate: PollPredicate, wake_at: datetime) -> None:
        super().__init__(predicate.step_name)
        self.predicate = predicate
        self.wake_at = wake_at


def as_toolset(
    tools: ToolRegistry | Toolset, config: ToolLoopConfig, executor: ToolExecutor | None = None
) -> Toolset:
    """The toolset a loop runs with: a registry's tools run by the engine's executor (the tool
    runners, in service mode) when it has one, else in-process."""
    if isinstance(tools, Toolset):
        return tools
    if executor is not None:
        return tools.toolset(executor)
    return tools.toolset(default_timeout_s=config.tool_timeout_s, max_result_bytes=config.max_result_bytes)


class ToolLoop:
    """One run of one tool loop in one case run."""

    def __init__(
        self,
        ctx: WorkflowContext,
        name: str,
        llm: LlmProvider,
        tools: Toolset,
        config: ToolLoopConfig,
    ) -> None:
        self.ctx, self.name, self.llm, self.tools, self.config = ctx, name, llm, tools, config
        if config.llm_retry is not None and getattr(llm, "retries_calls", False):
            raise TianshuError(
                f"tool_step {name!r}: ToolLoopConfig.llm_retry with a provider that retries its own "
                f"calls ({type(llm).__name__}): two nested retry loops multiply attempts; drop llm_retry "
                "and set the provider's policy instead"
            )
        self._takes_invocation = takes_invocation(llm)
        # A provider that sends calls elsewhere (and may re-send them): its answers can arrive as
        # events, also for a call an earlier run sent.
        self._remote = hasattr(llm, "max_attempts")
        generation = ctx.internals.clearings(name)
        # Records of a cleared loop must not be replayed by its next run: give them new names.
        self.base = name if generation == 0 else f"{name}@{generation}"
        # Rounds whose model reply came from the journal: their calls may have been sent by an
        # earlier run, and their results recorded as events while no run awaited them.
        self._replayed_rounds: set[int] = set()

    async def run(self, request: LlmRequest) -> str:
        """The final text of the model, once it answers without tools."""
        messages = list(request.messages)
        specs = list(self.tools.specs)
        for k in range(1, self.config.max_rounds + 1):
            asked = request.model_copy(update={"messages": list(messages), "tools": specs})
            replayed_before = len(self.ctx.replayed)
            reply = await self._ask(k, asked)
            if len(self.ctx.replayed) > replayed_before:
                self._replayed_rounds.add(k)
            messages.append(reply.message())
            if not reply.tool_calls:
                return reply.content
            if k == self.config.max_rounds:
                raise ToolLoopMaxRoundsError(self.name, k, [c.name for c in reply.tool_calls])
            results = await self._round(k, reply.tool_calls)
            messages.extend(LlmMessage.tool(r) for r in results)
        raise AssertionError("unreachable")  # pragma: no cover

    async def _ask(self, k: int, request: LlmRequest) -> LlmResponse:
        record = f"{self.base}/r{k}/llm"
        attrs: dict[str, str | int] = {
            "tianshu.step": record,
            "tianshu.case_key": self.ctx.case.case_key,
            "tianshu.round": k,
            "gen_ai.request.model": request.model,
        }

        case_key = self.ctx.case.case_key

        def complete(invocation: LlmInvocation) -> Awaitable[LlmResponse]:
            if self._takes_invocation:
                return self.llm.complete(request, invocation=invocation)
            return self.llm.complete(request)  # a provider written before invocations existed

        async def ask() -> LlmResponse:
            parked = await self._parked_attempt(record)
            if isinstance(parked, LlmResponse):
                return parked
            attempt = parked
            invocation = LlmInvocation.of(case_key, record, attempt)
            if attempt == 1 and self._remote:
                # An earlier run may have sent the call and died before parking: an answer that
                # came meanwhile is an event on the call id; take it, do not ask again.
                earlier = await self._recorded_reply(invocation)
                if earlier is not None:
                    return earlier
            try:
                policy = self.config.llm_retry
                if policy is None:
                    return await complete(invocation)
                return await policy.call(f"model call {record!r}", lambda: complete(invocation))
            except LlmCallPending as pending:
                wake_at = await self.ctx.internals.deadline(_llm_wait(record, attempt), pending.wait_s)
                raise _Pending(_llm_predicate(invocation), wake_at) from None

        try:
            return await self.ctx.step(
                record, lambda: in_span("tianshu.llm", attrs, ask), returns=LlmResponse
            )
        except _Pending as pending:
            raise Suspend([pending.predicate], pending.wake_at) from None

    async def _parked_attempt(self, record: str) -> LlmResponse | int:
        """The attempt to make of a model call, or its answer. A call parked earlier (a timer per
        attempt) returns its answer if one arrived, stays parked (`_Pending`) before
        its deadline, and is sent again as the next attempt after it, up to the provider's
        `max_attempts`; past the last, `LlmError` (`unavailable`)."""
        ctx = self.ctx
        attempt, wake_at = 0, None
        while True:
            found = ctx.internals.recorded_deadline(_llm_wait(record, attempt + 1))
            if found is None:
                break
            attempt, wake_at = attempt + 1, found
        if wake_at is None:
            return 1
        invocation = LlmInvocation.of(ctx.case.case_key, record, attempt)
        recorded = await self._recorded_reply(invocation)
        if recorded is not None:
            return recorded
        if ctx.internals.now() < wake_at:
            raise _Pending(_llm_predicate(invocation), wake_at)
        limit = int(getattr(self.llm, "max_attempts", 1))
        if attempt >= limit:
            raise LlmError(
                f"no answer arrived before the deadline ({attempt} attempt{'s' if attempt > 1 else ''})",
                error_class=LlmErrorClass.UNAVAILABLE,
            )
        log.warning(
            "case %s: model call %s unanswered past its deadline; sending attempt %d of %d",
            ctx.case.case_key,
            record,
            attempt + 1,
            limit,
        )
        return attempt + 1

    async def _recorded_reply(self, invocation: LlmInvocation) -> LlmResponse | None:
        """The answer published for this call (any attempt), if one arrived."""
        event = await self.ctx.internals.published(LLM_RESULT_RESOURCE, invocation.call_id)
        return None if event is None else _llm_answer(event.payload)

    # -- one round ----------------------------------------------------------------------------

    async def _round(self, k: int, calls: Sequence[ToolCall]) -> list[ToolResult]:
        """Run a reply's calls: consecutive read-only calls together, any other call alone."""
        records = _record_names(f"{self.base}/r{k}/call", calls)
        results: list[ToolResult] = []
        replayed = k in self._replayed_rounds
        for group in _partition(calls, self._safety):
            if len(group) == 1:
                outcomes: list[ToolResult | _Pending] = [
                    await self._call(records[group[0]], calls[group[0]], replayed)
                ]
            else:
                limit = asyncio.Semaphore(self.config.max_concurrency)
                outcomes = await _all([self._bounded(limit, records[i], calls[i], replayed) for i in group])
            pending = [o for o in outcomes if isinstance(o, _Pending)]
            if pending:
                # Later calls wait: an exclusive call must not overlap one still running elsewhere.
                raise Suspend([p.predicate for p in pending], min(p.wake_at for p in pending))
            results.extend(o for o in outcomes if isinstance(o, ToolResult))
        return results

    async def _bounded(
        self, limit: asyncio.Semaphore, record: str, call: ToolCall, replayed: bool
    ) -> ToolResult | _Pending:
        async with limit:
            return await self._call(record, call, replayed)

    def _safety(self, call: ToolCall) -> ToolSafety:
        if not self.tools.knows(call.name):
            return ToolSafety.EXCLUSIVE
        return self.tools.safety_of(call.name)

    async def _call(self, record: str, call: ToolCall, replayed: bool = False) -> ToolResult | _Pending:
        ctx = self.ctx
        invocation = ToolInvocation.of(ctx.case.case_key, ctx.internals.qualified(record))
        attrs = {
            "tianshu.step": record,
            "tianshu.case_key": ctx.case.case_key,
            "tianshu.tool": call.name,
            "gen_ai.tool.call.id": call.id,
        }

        async def answer() -> ToolResult:
            result = await self._answer(call, invocation, replayed)
            if result.call_id != call.id:
                result = result.model_copy(update={"call_id": call.id})
            return result

        try:
            return await ctx.step(record, lambda: in_span("tianshu.tool", attrs, answer), returns=ToolResult)
        except _Pending as pending:
            return pending

    async def _answer(self, call: ToolCall, invocation: ToolInvocation, replayed: bool) -> ToolResult:
        if not self.tools.knows(call.name):
            return error_result(call, f"unknown tool: {call.name}")
        waited = await self._awaited_result(call, invocation)
        if waited is not None:
            return waited
        if replayed:
            # An earlier run may have sent this call and died before recording its result; a
            # result that came meanwhile is an event on the call id: take it, do not run it again.
            earlier = await self._recorded_result(call, invocation)
            if earlier is not None:
                return earlier
        try:
            return await self.tools.executor.execute(
                call, timeout_s=self.config.tool_timeout_s, invocation=invocation
            )
        except ToolCallPending as pending:
            wake_at = await self.ctx.internals.deadline(_wait_name(invocation), pending.wait_s)
            raise _Pending(_predicate(invocation), wake_at) from None

    async def _recorded_result(self, call: ToolCall, invocation: ToolInvocation) -> ToolResult | None:
        ctx = self.ctx
        event = await ctx.internals.published(TOOL_RESULT_RESOURCE, invocation.call_id)
        if event is None:
            return None
        try:
            return TOOL_CALL_RESULT_ADAPTER.validate_python(event.payload).result
        except ValidationError as exc:
            log.warning(
                "case %s: malformed tool result event for %s: %s", ctx.case.case_key, invocation.step, exc
            )
            return error_result(call, f"tool {call.name} answered with a malformed result")

    async def _awaited_result(self, call: ToolCall, invocation: ToolInvocation) -> ToolResult | None:
        """For a call already sent and awaited as an event: its result, an error past its deadline,
        or `_Pending` while it may still come. None for a call never sent."""
        ctx = self.ctx
        wake_at = ctx.internals.recorded_deadline(_wait_name(invocation))
        if wake_at is None:
            return None
        recorded = await self._recorded_result(call, invocation)
        if recorded is not None:
            return recorded
        if ctx.internals.now() >= wake_at:
            return error_result(call, f"tool {call.name}: no result arrived before the deadline")
        raise _Pending(_predicate(invocation), wake_at)


def _llm_wait(record: str, attempt: int) -> str:
    """The timer of a parked model call's attempt: `<record>:wait`, then `<record>:wait2`, ..."""
    return f"{record}:wait" if attempt == 1 else f"{record}:wait{attempt}"


def _llm_predicate(invocation: LlmInvocation) -> PollPredicate:
    return PollPredicate(
        resource_type=LLM_RESULT_RESOURCE, resource_id=invocation.call_id, step_name=invocation.record
    )


def _llm_answer(payload: object) -> LlmResponse:
    """A remote provider's answer published as an event: an `LlmResponse`, or `{"error": ...}`
    (a `WireError` whose code is the `LlmErrorClass`), raised as `LlmError`."""
    if isinstance(payload, dict) and "error" in payload and "kind" not in payload:
        error = WireError.model_validate(payload["error"])
        try:
            error_class = LlmErrorClass(error.code or "")
        except ValueError:
            error_class = LlmErrorClass.FATAL
        raise LlmError(error.message, error_class=error_class)
    try:
        return LlmResponse.model_validate(payload)
    except ValidationError as exc:
        raise LlmError(f"a malformed answer arrived: {exc}", error_class=LlmErrorClass.FATAL) from exc


def _wait_name(invocation: ToolInvocation) -> str:
    return f"{invocation.step}:wait"


def _predicate(invocation: ToolInvocation) -> PollPredicate:
    return PollPredicate(
        resource_type=TOOL_RESULT_RESOURCE, resource_id=invocation.call_id, step_name=invocation.step
    )


def _record_names(prefix: str, calls: Sequence[ToolCall]) -> list[str]:
    """One record name per call, keyed by its id; a repeated id in one reply gets `#2`, `#3`, ..."""
    seen: dict[str, int] = {}
    names = []
    for call in calls:
        seen[call.id] = seen.get(call.id, 0) + 1
        n = seen[call.id]
        names.append(f"{prefix}/{call.id}" if n == 1 else f"{prefix}/{call.id}#{n}")
    return names


def _partition(calls: Sequence[ToolCall], safety: Callable[[ToolCall], ToolSafety]) -> list[list[int]]:
    """Indices grouped: a run of consecutive read-only calls is one group, any other call its own."""
    groups: list[list[int]] = []
    parallel = False
    for i, call in enumerate(calls):
        read_only = safety(call) is ToolSafety.READ_ONLY
        if read_only and parallel:
            groups[-1].append(i)
        else:
            groups.append([i])
        parallel = read_only
    return groups


async def _all(awaitables: Sequence[Awaitable[T]]) -> list[T]:
    """Await all, results in order; on the first failure cancel the rest and raise it."""
    tasks = [asyncio.ensure_future(a) for a in awaitables]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for task in tasks:
            if task.done() and not task.cancelled() and task.exception() is not None:
                raise task.exception()  # type: ignore[misc]
        return [task.result() for task in tasks]
    finally:
        unfinished = [t for t in tasks if not t.done()]
        for task in unfinished:
            task.cancel()
        if unfinished:
            await asyncio.gather(*unfinished, return_exceptions=True)
