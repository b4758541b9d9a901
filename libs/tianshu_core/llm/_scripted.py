"""The model side of the tool loop: the `LlmProvider` protocol, and `ScriptedLlm` for tests and docs.

The loop only calls `complete`; whether the model runs in-process, behind an HTTP API or behind
the LLM gateway over NATS is the provider's business. The LLM types themselves are contracts
(`tianshu_contracts.llm`), re-exported by `tianshu_core`.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol, runtime_checkable

from tianshu_contracts.llm import LlmRequest, LlmResponse

from .errors import TianshuError

Reply = LlmResponse | str
"""What a script gives: a full response, or plain text (a reply that ends the loop)."""
ReplyFn = Callable[[LlmRequest], "Reply | Awaitable[Reply]"]


@runtime_checkable
class LlmProvider(Protocol):
    """Something that answers an `LlmRequest`: a provider adapter, the gateway client, a script."""

    async def complete(self, request: LlmRequest) -> LlmResponse:
        """The model's reply to `request` (its text, tool calls, usage and finish reason)."""
        ...


class ScriptedLlm:
    """A model that answers from a script: a list of replies in order, or a function of the request.

    Every request it receives is kept in `requests`, so a test can check what the model was shown
    (and how often it was asked). `delay` makes each answer take that many seconds.

    A list script lives in the object: make it once, outside the workflow. A workflow that builds
    its model in every run (as a scheduler does when it replays a case) needs a function of the
    request, or the list starts over on each run and answers out of turn.

        llm = ScriptedLlm([LlmResponse.calls(ToolCall.of("c1", "add", {"a": 1, "b": 2})), "It is 3."])
    """

    def __init__(self, script: Sequence[Reply] | ReplyFn, *, delay: float = 0.0) -> None:
        self._replies: list[Reply] | None = None if callable(script) else list(script)
        self._fn: ReplyFn | None = script if callable(script) else None
        self.delay = delay
        self.requests: list[LlmRequest] = []

    @property
    def calls(self) -> int:
        """How many times the model was asked."""
        return len(self.requests)

    async def complete(self, request: LlmRequest) -> LlmResponse:
        """The next scripted reply; a TianshuError when a list script has run out."""
        self.requests.append(request)
        if self.delay:
            await asyncio.sleep(self.delay)
        if self._fn is not None:
            reply = self._fn(request)
            if inspect.isawaitable(reply):
                reply = await reply
        else:
            assert self._replies is not None
            n = len(self.requests)
            if n > len(self._replies):
                raise TianshuError(
                    f"ScriptedLlm: asked {n} times, but the script has {len(self._replies)} replies"
                )
            reply = self._replies[n - 1]
        return LlmResponse.text(reply) if isinstance(reply, str) else reply
