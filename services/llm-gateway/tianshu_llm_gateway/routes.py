"""Routes as the gateway serves them: a fallback chain of models, what each attempt was, what it cost.

`ResilientLlmProvider.complete` lists a call's attempts in its answer (and in its `LlmError`), but
its `stream` yields events only. So every provider of a chain is wrapped in a `RecordedProvider`,
which notes each attempt (provider, model, outcome, usage, time) in the call's `attempts()`
record, the same for both, as the resilient provider would list them.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tianshu_contracts.llm import (
    Done,
    LlmAttempt,
    LlmErrorClass,
    LlmRequest,
    LlmResponse,
    LlmStreamEvent,
    StreamError,
    Usage,
    UsageEvent,
)
from tianshu_core.llm import LlmError, LlmInvocation, ResiliencePolicy, ResilientLlmProvider, SdkProvider

if TYPE_CHECKING:
    from .config import Prices

_attempts: ContextVar[list[LlmAttempt] | None] = ContextVar("tianshu_llm_gateway_attempts", default=None)


@contextlib.contextmanager
def attempts() -> Iterator[list[LlmAttempt]]:
    """Collect the attempts of the model calls made inside (in this task) into the list yielded."""
    record: list[LlmAttempt] = []
    token = _attempts.set(record)
    try:
        yield record
    finally:
        _attempts.reset(token)


class RecordedProvider:
    """An SDK provider whose every attempt is noted in the current `attempts()` record."""

    def __init__(self, provider: SdkProvider[Any]) -> None:
        self.provider = provider
        self.name = provider.name
        self.context_window = provider.context_window

    def __repr__(self) -> str:
        return repr(self.provider)

    def upstream_model(self, request: LlmRequest) -> str:
        return self.provider.upstream_model(request)

    async def aclose(self) -> None:
        await self.provider.aclose()

    def _note(
        self,
        request: LlmRequest,
        started: float,
        usage: Usage,
        error: LlmErrorClass | None,
        status: int | None,
    ) -> None:
        record = _attempts.get()
        if record is not None:
            record.append(
                LlmAttempt(
                    provider=self.name,
                    model=self.upstream_model(request),
                    error_class=error,
                    status=status,
                    usage=usage,
                    duration_s=time.monotonic() - started,
                )
            )

    async def complete(self, request: LlmRequest, *, invocation: LlmInvocation | None = None) -> LlmResponse:
        started = time.monotonic()
        try:
            response = await self.provider.complete(request, invocation=invocation)
        except LlmError as err:
            self._note(request, started, err.usage, err.error_class, err.status)
            raise
        self._note(request, started, response.usage, None, None)
        return response

    async def stream(
        self, request: LlmRequest, *, invocation: LlmInvocation | None = None
    ) -> AsyncIterator[LlmStreamEvent]:
        started = time.monotonic()
        usage = Usage()
        events = self.provider.stream(request, invocation=invocation)
        try:
            async for event in events:
                if isinstance(event, UsageEvent):
                    usage = usage + event.usage
                elif isinstance(event, StreamError):
                    self._note(request, started, usage, event.error_class, None)
                elif isinstance(event, Done):
                    self._note(request, started, usage, None, None)
                yield event
        finally:
            close = getattr(events, "aclose", None)
            if close is not None:
                await close()


@dataclass(frozen=True, slots=True)
class ChainEntry:
    """One model of a route's chain: where it is, and its prices."""

    model: str
    provider: str
    upstream: str
    prices: Prices | None


class Route:
    """A route: `llm` (the resilient provider over its chain) and the chain's models and prices."""

    def __init__(
        self,
        name: str,
        providers: Sequence[RecordedProvider],
        chain: Sequence[ChainEntry],
        policy: ResiliencePolicy,
    ) -> None:
        self.name = name
        self.chain = list(chain)
        self.providers = list(providers)
        self.llm = ResilientLlmProvider(self.providers, policy, name=name)

    def __repr__(self) -> str:
        return f"Route({self.name!r}, {[e.model for e in self.chain]!r})"

    def entry(self, attempt: LlmAttempt) -> ChainEntry | None:
        """The chain entry an attempt went to."""
        return next(
            (e for e in self.chain if e.provider == attempt.provider and e.upstream == attempt.model), None
        )

    def cost(self, attempts: Sequence[LlmAttempt]) -> float | None:
        """USD the attempts cost at their models' prices; None when one that used tokens has none
        (or no model of the route is priced)."""
        if all(e.prices is None for e in self.chain):
            return None
        total = 0.0
        for attempt in attempts:
            entry = self.entry(attempt)
            if entry is not None and entry.prices is not None:
                total += entry.prices.cost(attempt.usage)
            elif attempt.usage.total_tokens or attempt.usage.prompt_tokens:
                return None
        return total
