"""`ResilientLlmProvider`: one retry loop and a fallback chain over several providers.

The loop (tenacity: exponential backoff, jitter, a cap) decides each failure by its class:

| class | what happens |
|---|---|
| transient | the same provider again after a backoff; after `attempts_per_provider`, the next one |
| overloaded | the next provider at once; without one, the same after `Retry-After` (capped) or a backoff |
| quota_exhausted, credentials | the next provider at once; without one, the error |
| prompt_too_long, fatal | the error at once: asking again cannot help |

A provider that failed cools down for `cooldown_s` in this process (calls go to the others
first), never when it is the last one left. A fallback whose `context_window` cannot hold the
request is skipped. A reply cut at the token limit is returned as it is (`finish_reason`
`length`), unless `length_retry_ceiling` asks for another try with a larger limit. A stream
retries and falls back only before its first delta; after it, a failure ends the stream with a
`StreamError` (`incomplete=True`). Every attempt's usage is counted, failed ones included.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Self

from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, stop_after_attempt

from tianshu_contracts.llm import (
    Done,
    LlmAttempt,
    LlmErrorClass,
    LlmRequest,
    LlmResponse,
    LlmStreamEvent,
    StreamError,
    TextDelta,
    ToolUse,
    Usage,
    UsageEvent,
)

from ._errors import LlmError
from ._provider import LlmInvocation, LlmProvider

log = logging.getLogger(__name__)

_HAND_OVER = frozenset({LlmErrorClass.QUOTA_EXHAUSTED, LlmErrorClass.CREDENTIALS})
_NEVER_AGAIN = frozenset(
    {LlmErrorClass.PROMPT_TOO_LONG, LlmErrorClass.FATAL, LlmErrorClass.REQUEST_TOO_LARGE}
)
_WAIT_AGAIN = frozenset({LlmErrorClass.TRANSIENT})


@dataclass(frozen=True, slots=True)
class ResiliencePolicy:
    """How `ResilientLlmProvider` retries and falls back."""

    max_attempts: int = 6
    """Attempts of one call, across every provider of the chain."""
    attempts_per_provider: int = 3
    """Transient failures of one provider in one call before the next provider is tried."""
    backoff_initial_s: float = 0.5
    backoff_max_s: float = 8.0
    jitter_s: float = 0.25
    retry_after_cap_s: float = 60.0
    """The longest `Retry-After` honoured; a provider asking longer counts as overloaded."""
    retry_statuses: frozenset[int] = frozenset({408, 429, 500, 502, 503, 504, 529})
    """HTTP statuses worth another attempt; others are not retried (a refused key or a spent
    quota still hands over to the next provider). A listed status whose class is fatal (409, if
    added) is retried like a transient one; prompt too long never is."""
    cooldown_s: float = 5.0
    """How long a provider that failed is tried after the others, in this process."""
    length_retry_ceiling: int | None = None
    """Opt-in: a reply cut at the token limit is asked again with twice the limit, up to this many
    tokens (it costs money). None: the cut reply is returned (`finish_reason` `length`)."""

    def __post_init__(self) -> None:
        if self.max_attempts < 1 or self.attempts_per_provider < 1:
            raise ValueError("max_attempts and attempts_per_provider must be at least 1")

    def backoff(self, attempt: int) -> float:
        """The wait after failed attempt number `attempt` of one provider."""
        base = min(self.backoff_max_s, self.backoff_initial_s * 2.0 ** max(0, attempt - 1))
        return base + random.uniform(0, self.jitter_s)


def estimate_tokens(request: LlmRequest) -> int:
    """A rough count of the tokens a request needs (its prompt, about four characters a token,
    plus the reply's `max_tokens`): enough to skip a fallback whose window is clearly too small."""
    chars = len(request.system_prompt or "")
    for message in request.messages:
        chars += len(message.content) + sum(len(c.name) + len(c.arguments) for c in message.tool_calls)
    for tool in request.tools:
        chars += len(tool.name) + len(tool.description) + len(str(tool.parameters))
    return chars // 4 + (request.max_tokens or 0)


@dataclass
class _Health:
    """What this process knows of one provider."""

    cool_until: float = 0.0


@dataclass
class _Call:
    """The state of one call: the attempts so far and what the loop decided last."""

    request: LlmRequest
    attempts: list[LlmAttempt] = field(default_factory=list)
    given_up: set[int] = field(default_factory=set)
    per_provider: dict[int, int] = field(default_factory=dict)
    wait_s: float = 0.0
    last: LlmError | None = None
    cut: LlmResponse | None = None
    """The last reply cut at the token limit, while a larger limit is asked for (opt-in)."""

    @property
    def usage(self) -> Usage:
        total = Usage()
        for attempt in self.attempts:
            total = total + attempt.usage
        return total


class _Again(Exception):  # noqa: N818 - tenacity's signal to try again
    def __init__(self, error: LlmError) -> None:
        super().__init__(str(error))
        self.error = error


class ResilientLlmProvider:
    """Providers tried in order with one retry loop (see the module's docstring).

    llm = ResilientLlmProvider(
        [AnthropicProvider(api_keys=[...]), OpenAiProvider(api_keys=[...], model="gpt-4o")],
        ResiliencePolicy(max_attempts=4),
    )
    """

    retries_calls = True
    """Tells the tool loop this provider retries on its own (`ToolLoopConfig.llm_retry` is refused)."""

    def __init__(
        self,
        providers: Sequence[LlmProvider],
        policy: ResiliencePolicy | None = None,
        *,
        name: str = "resilient",
    ) -> None:
        if not providers:
            raise ValueError("ResilientLlmProvider needs at least one provider")
        self.providers = list(providers)
        self.policy = policy or ResiliencePolicy()
        self.name = name
        self._health = [_Health() for _ in self.providers]

    def __repr__(self) -> str:
        return f"ResilientLlmProvider({[_name(p) for p in self.providers]!r})"

    async def aclose(self) -> None:
        """Close every provider of the chain that can be closed."""
        for provider in self.providers:
            close = getattr(provider, "aclose", None)
            if callable(close):
                await close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # -- complete -----------------------------------------------------------------------------

    async def complete(self, request: LlmRequest, *, invocation: LlmInvocation | None = None) -> LlmResponse:
        """The first answer the chain gives; the last `LlmError` (with every attempt) if none does."""
        call = _Call(request)
        try:
            return await self._complete(call, invocation)
        except LlmError:
            if call.cut is None:
                raise
            # The opt-in larger limit got no whole reply (attempts ran out, or the larger limit
            # failed): the cut reply, paid for, is the answer, as it is without the option.
            return call.cut.model_copy(update={"usage": call.usage, "attempts": list(call.attempts)})

    async def _complete(self, call: _Call, invocation: LlmInvocation | None) -> LlmResponse:
        # The first attempt outside tenacity: almost every call answers at once, and the hot path
        # should not pay for a retry controller it does not use.
        try:
            return await self._attempt(call, invocation)
        except _Again as again:
            if self.policy.max_attempts < 2:
                raise self._final(call, again.error) from None
            first_wait = call.wait_s
        if first_wait > 0:
            _log_wait(call, 1)
            await asyncio.sleep(first_wait)
        retrying = self._retrying(call, stop_after=self.policy.max_attempts - 1)
        try:
            async for attempt in retrying:
                with attempt:
                    return await self._attempt(call, invocation)
        except _Again as again:
            raise self._final(call, again.error) from None
        raise AssertionError("unreachable")  # pragma: no cover

    async def _attempt(self, call: _Call, invocation: LlmInvocation | None) -> LlmResponse:
        index = self._choose(call)
        provider = self.providers[index]
        started = time.monotonic()
        try:
            response = await provider.complete(call.request, invocation=invocation)
        except LlmError as err:
            self._failed(call, index, err, time.monotonic() - started)
            raise  # not reached: _failed raises
        self._succeeded(call, index, response, time.monotonic() - started)
        ceiling = self.policy.length_retry_ceiling
        limit = call.request.max_tokens
        if response.finish_reason == "length" and ceiling and limit and limit < ceiling:
            # Opt-in: the same provider again with a larger limit (the cut reply was paid for).
            call.request = call.request.model_copy(update={"max_tokens": min(ceiling, limit * 2)})
            call.cut = response
            call.wait_s = 0.0
            raise _Again(
                LlmError("the reply was cut at the token limit", error_class=LlmErrorClass.OUTPUT_TRUNCATED)
            )
        return response.model_copy(update={"usage": call.usage, "attempts": list(call.attempts)})

    # -- stream -------------------------------------------------------------------------------

    async def stream(
        self, request: LlmRequest, *, invocation: LlmInvocation | None = None
    ) -> AsyncIterator[LlmStreamEvent]:
        """The first stream the chain gives; retries and fallback only before its first delta."""
        call = _Call(request)
        try:
            # The first attempt outside tenacity, as in `complete`: the hot path pays for no
            # retry controller it does not use.
            try:
                async for event in self._stream_attempt(call, invocation):
                    yield event
                return
            except _Again:
                if self.policy.max_attempts < 2:
                    raise
            if call.wait_s > 0:
                _log_wait(call, 1)
                await asyncio.sleep(call.wait_s)
            async for attempt in self._retrying(call, stop_after=self.policy.max_attempts - 1):
                with attempt:
                    async for event in self._stream_attempt(call, invocation):
                        yield event
                    return
        except _Again as again:
            yield self._final(call, again.error).stream_error(incomplete=False)
        except LlmError as err:  # given up: a stream always ends in an event, never an exception
            yield err.stream_error(incomplete=False)

    async def _stream_attempt(
        self, call: _Call, invocation: LlmInvocation | None
    ) -> AsyncIterator[LlmStreamEvent]:
        index = self._choose(call)
        provider = self.providers[index]
        started = time.monotonic()
        delivered = False
        usage = Usage()
        # Closed at once when the loop leaves it: the provider's span (and connection) end now.
        async with _closing(_ended(provider.stream(call.request, invocation=invocation))) as events:
            async for event in events:
                if isinstance(event, StreamError):
                    err = _of(provider, LlmError.from_stream_error(event))
                    if not delivered:  # nothing went out yet: retry or hand over (raises)
                        self._failed(call, index, err, time.monotonic() - started, usage)
                    self._record(call, index, err.error_class, None, usage, time.monotonic() - started)
                    self._health[index].cool_until = time.monotonic() + self.policy.cooldown_s
                    yield event.model_copy(update={"incomplete": True})
                    return
                if isinstance(event, UsageEvent):
                    usage = usage + event.usage
                if isinstance(event, TextDelta | ToolUse):
                    delivered = True
                yield event
        self._record(call, index, None, None, usage, time.monotonic() - started)
        self._health[index].cool_until = 0.0

    # -- the loop's decisions -----------------------------------------------------------------

    def _retrying(self, call: _Call, *, stop_after: int | None = None) -> AsyncRetrying:
        def wait(_state: RetryCallState) -> float:
            return call.wait_s

        def before_sleep(state: RetryCallState) -> None:
            _log_wait(call, state.attempt_number + 1)

        return AsyncRetrying(
            stop=stop_after_attempt(stop_after or self.policy.max_attempts),
            wait=wait,
            retry=retry_if_exception_type(_Again),
            before_sleep=before_sleep,
            reraise=True,
            sleep=asyncio.sleep,
        )

    def _choose(self, call: _Call) -> int:
        """The provider of the next attempt: in chain order, skipping those this call gave up on,
        fallbacks too small for the request, and (while another is left) those cooling down."""
        need = estimate_tokens(call.request)
        candidates = [
            i
            for i in range(len(self.providers))
            if i not in call.given_up and (i == 0 or _fits(self.providers[i], need))
        ]
        if not candidates:
            raise self._final(call, call.last or _unavailable("no provider can take this request"))
        now = time.monotonic()
        warm = [i for i in candidates if self._health[i].cool_until <= now]
        return warm[0] if warm else min(candidates, key=lambda i: self._health[i].cool_until)

    def _failed(
        self, call: _Call, index: int, err: LlmError, duration_s: float, usage: Usage | None = None
    ) -> None:
        """Record a failed attempt and decide: raise `_Again` (with `call.wait_s` set) or the error."""
        policy = self.policy
        too_long_wait = err.retry_after_s is not None and err.retry_after_s > policy.retry_after_cap_s
        if too_long_wait and err.error_class in _WAIT_AGAIN:
            # Asked to wait longer than the cap: overloaded, whatever the status said (a 500 or a
            # 502 with a long Retry-After hands over like a 503).
            err = err.but(error_class=LlmErrorClass.OVERLOADED)
        self._record(call, index, err.error_class, err.status, err.usage + (usage or Usage()), duration_s)
        call.last = err
        cls = err.error_class
        others = self._others(call, index)
        listed = err.status is not None and err.status in policy.retry_statuses
        unlisted = err.status is not None and not listed
        # A status the policy lists is worth another attempt even if its class says fatal (a 409
        # someone added, say); a status it leaves out is not, whatever its class.
        never = cls in _NEVER_AGAIN and not (cls is LlmErrorClass.FATAL and listed)
        if never or (unlisted and cls not in _HAND_OVER):
            raise self._final(call, err)
        self._health[index].cool_until = time.monotonic() + policy.cooldown_s
        if cls in _HAND_OVER or (cls is LlmErrorClass.OVERLOADED and others):
            if not others:
                raise self._final(call, err)
            call.given_up.add(index)
            call.wait_s = 0.0
            raise _Again(err)
        if too_long_wait:  # overloaded, nobody to hand over to, and asked to wait too long
            raise self._final(call, err)
        tries = call.per_provider.get(index, 0) + 1
        call.per_provider[index] = tries
        if tries >= policy.attempts_per_provider and others:
            call.given_up.add(index)
            call.wait_s = 0.0
            raise _Again(err)
        call.wait_s = err.retry_after_s if err.retry_after_s is not None else policy.backoff(tries)
        raise _Again(err)

    def _succeeded(self, call: _Call, index: int, response: LlmResponse, duration_s: float) -> None:
        self._health[index].cool_until = 0.0
        self._record(call, index, None, None, response.usage, duration_s)

    def _others(self, call: _Call, index: int) -> bool:
        need = estimate_tokens(call.request)
        return any(
            i != index and i not in call.given_up and (i == 0 or _fits(self.providers[i], need))
            for i in range(len(self.providers))
        )

    def _record(
        self,
        call: _Call,
        index: int,
        error_class: LlmErrorClass | None,
        status: int | None,
        usage: Usage,
        duration_s: float,
    ) -> None:
        provider = self.providers[index]
        model = getattr(provider, "upstream_model", None)
        call.attempts.append(
            LlmAttempt(
                provider=_name(provider),
                model=model(call.request) if callable(model) else call.request.model,
                error_class=error_class,
                status=status,
                usage=usage,
                duration_s=duration_s,
            )
        )

    def _final(self, call: _Call, err: LlmError) -> LlmError:
        """The error the caller gets: the last one, with every attempt and their usage."""
        tried = len(call.attempts)
        text = f"{err.message} (after {tried} attempts)" if tried > 1 else err.message
        return err.but(message=text, usage=call.usage, attempts=call.attempts)


@contextlib.asynccontextmanager
async def _closing(events: AsyncIterator[LlmStreamEvent]) -> AsyncIterator[AsyncIterator[LlmStreamEvent]]:
    try:
        yield events
    finally:
        close = getattr(events, "aclose", None)
        if close is not None:
            await close()


async def _ended(events: AsyncIterator[LlmStreamEvent]) -> AsyncIterator[LlmStreamEvent]:
    """A provider's stream as the protocol wants it, whatever the provider does: an `LlmError` it
    raises is its `StreamError`, and a stream that stops without `Done` or `StreamError` ends
    with one (a failure, never a short answer), so the loop decides both like any other."""
    delivered = False
    async with _closing(events):
        try:
            async for event in events:
                if isinstance(event, TextDelta | ToolUse):
                    delivered = True
                yield event
                if isinstance(event, Done | StreamError):
                    return
        except LlmError as err:
            yield err.stream_error(incomplete=delivered)
            return
        yield LlmError(
            "the stream ended without a finish reason", error_class=LlmErrorClass.TRANSIENT
        ).stream_error(incomplete=delivered)


def _log_wait(call: _Call, attempt: int) -> None:
    if call.last is not None and call.wait_s > 0:
        log.warning("model call: attempt %d failed (%s); next in %.2f s", attempt, call.last, call.wait_s)


def _name(provider: Any) -> str:
    return str(getattr(provider, "name", type(provider).__name__))


def _fits(provider: Any, need: int) -> bool:
    window = getattr(provider, "context_window", None)
    return window is None or need <= window


def _of(provider: Any, err: LlmError) -> LlmError:
    """A stream's error, named after the provider that streamed it."""
    return err.but(provider=_name(provider))


def _unavailable(text: str) -> LlmError:
    return LlmError(text, error_class=LlmErrorClass.UNAVAILABLE)
