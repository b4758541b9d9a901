"""`ScriptedLlm`: a model that answers from a script, for tests and docs."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence

from tianshu_contracts.llm import LlmRequest, LlmResponse, LlmStreamEvent

from ..errors import TianshuError
from ._provider import LlmInvocation, events_of

Reply = LlmResponse | str
"""What a script gives: a full response, or plain text (a reply that ends the loop)."""
ReplyFn = Callable[[LlmRequest], "Reply | Awaitable[Reply]"]


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

    async def complete(
        self,
        request: LlmRequest,
        *,
        invocation: LlmInvocation | None = None,  # noqa: ARG002 - in-process: nothing to route
    ) -> LlmResponse:
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

    async def stream(
        self, request: LlmRequest, *, invocation: LlmInvocation | None = None
    ) -> AsyncIterator[LlmStreamEvent]:
        """The next scripted reply as events (its text in one delta)."""
        for event in events_of(await self.complete(request, invocation=invocation)):
            yield event
