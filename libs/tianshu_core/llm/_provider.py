"""The `LlmProvider` protocol a workflow's model calls go through, and what a durable caller needs
around it: the invocation that names a call across replays, and the signal to park a case.
"""

from __future__ import annotations

import hashlib
import inspect
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from tianshu_contracts.llm import (
    Done,
    LlmRequest,
    LlmResponse,
    LlmStreamEvent,
    StreamError,
    TextDelta,
    ToolCall,
    ToolUse,
    Usage,
    UsageEvent,
)

from ..errors import TianshuError

LLM_RESULT_RESOURCE = "tianshu_llm_result"
"""The resource type under which a remote provider's answer is published as an event (its id is
the call's `call_id`): a case parked by `LlmCallPending` waits on it."""


@dataclass(frozen=True, slots=True)
class LlmInvocation:
    """Where a model call comes from: the case, the journal record its reply is stored under, and
    a `call_id` (a digest of both) that is the same on every replay and every attempt. A remote
    provider sends the call under that id, so a repeat is a duplicate and its answer is keyed by it."""

    case_key: str
    record: str
    call_id: str
    attempt: int = 1
    """How many times the caller has sent this call (a re-send after a deadline passed without an
    answer is the next attempt)."""

    @classmethod
    def of(cls, case_key: str, record: str, attempt: int = 1) -> LlmInvocation:
        """The invocation of the model call whose reply `case_key` records under `record`."""
        digest = hashlib.sha256(f"llm\x00{case_key}\x00{record}".encode()).hexdigest()[:32]
        return cls(case_key, record, digest, attempt)


class LlmCallPending(TianshuError):  # noqa: N818 - a signal to wait, not a failure
    """Raised by a remote provider whose call was sent but not answered within its hot window.

    The tool loop then parks the case as an ordinary wait on resource `LLM_RESULT_RESOURCE` with
    the invocation's `call_id` as its id, for at most `wait_s` seconds; whoever receives the
    answer publishes it there as an event (an `LlmResponse`, or an `LlmError` as `{"error": ...}`),
    which wakes the case, and the replay records it without asking the provider again.
    """

    code = "llm_call_pending"

    def __init__(self, wait_s: float) -> None:
        super().__init__(f"model call sent; its answer may take up to {wait_s:g} s")
        self.wait_s = wait_s


@runtime_checkable
class LlmProvider(Protocol):
    """Something that answers an `LlmRequest`: a vendor adapter, a fallback chain, the gateway
    client, a script.

    `invocation` names the call for a durable caller (the tool loop always passes it); a
    provider that talks to a model directly may ignore it. `stream` yields the reply as it comes
    and always ends with `Done` or `StreamError`.
    """

    async def complete(self, request: LlmRequest, *, invocation: LlmInvocation | None = None) -> LlmResponse:
        """The model's reply to `request` (its text, tool calls, usage and finish reason)."""
        ...

    def stream(
        self, request: LlmRequest, *, invocation: LlmInvocation | None = None
    ) -> AsyncIterator[LlmStreamEvent]:
        """The reply as events: text deltas, whole tool calls, usage, then `Done` or `StreamError`."""
        ...


def events_of(response: LlmResponse) -> Iterable[LlmStreamEvent]:
    """A whole reply as the events a stream of it would carry (for providers without streaming)."""
    if response.content:
        yield TextDelta(text=response.content)
    for call in response.tool_calls:
        yield ToolUse(call=call)
    yield UsageEvent(usage=response.usage)
    yield Done(finish_reason=response.finish_reason)


async def collect(events: AsyncIterator[LlmStreamEvent]) -> LlmResponse:
    """The reply a stream carried; the `LlmError` of its `StreamError` if it failed."""
    from ._errors import LlmError

    text: list[str] = []
    calls: list[ToolCall] = []
    usage = Usage()
    async for event in events:
        if isinstance(event, TextDelta):
            text.append(event.text)
        elif isinstance(event, ToolUse):
            calls.append(event.call)
        elif isinstance(event, UsageEvent):
            usage = usage + event.usage
        elif isinstance(event, StreamError):
            raise LlmError.from_stream_error(event)
        elif isinstance(event, Done):
            return LlmResponse(
                content="".join(text), tool_calls=calls, usage=usage, finish_reason=event.finish_reason
            )
    raise TianshuError("the stream ended without Done or StreamError")


def takes_invocation(provider: Any) -> bool:
    """Whether `provider.complete` accepts `invocation=` (a provider written before it existed
    does not; the tool loop then calls it without)."""
    try:
        parameters = inspect.signature(provider.complete).parameters
    except (TypeError, ValueError):
        return True
    return "invocation" in parameters or any(p.kind is p.VAR_KEYWORD for p in parameters.values())
