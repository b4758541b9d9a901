"""Which Postgres failures are transient, and the backoff used to retry them."""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_attempt,
    wait_exponential,
    wait_random,
)

from ...transient import is_transient_postgres

log = logging.getLogger(__name__)
T = TypeVar("T")

# The store retries Postgres' own transient failures; the classifier is the one every message
# worker uses too (`tianshu_core.transient`), so the two never disagree about an outage.
is_transient = is_transient_postgres


@dataclass(frozen=True, slots=True)
class RetryConfig:
    """Backoff for transient store errors: attempt n+1 waits min(initial·2^(n-1), cap) + U(0, jitter)."""

    attempts: int = 8
    initial: float = 0.05
    cap: float = 1.0
    jitter: float = 0.05

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError("attempts must be at least 1")

    def first_delay(self) -> float:
        """The wait between the caller's own first attempt and the first retry."""
        return self.initial + random.uniform(0, self.jitter)

    def retrying(self, what: str, retry_if: Callable[[BaseException], bool]) -> AsyncRetrying:
        """A tenacity controller for the attempts after the first; logs every failed attempt.

        The caller makes the first attempt itself (the hot path stays free of tenacity's
        bookkeeping), so this waits before its first attempt too.
        """

        def before(state: RetryCallState) -> None:
            log.debug("%s: retry attempt %d", what, state.attempt_number + 1)

        def before_sleep(state: RetryCallState) -> None:
            exc = state.outcome.exception() if state.outcome else None
            delay = state.next_action.sleep if state.next_action else 0.0
            log.warning(
                "%s: attempt %d failed with a transient error (%r); retrying in %.3fs",
                what,
                state.attempt_number + 1,
                exc,
                delay,
            )

        return AsyncRetrying(
            stop=stop_after_attempt(max(self.attempts - 1, 1)),
            wait=wait_exponential(multiplier=self.initial * 2, max=self.cap) + wait_random(0, self.jitter),
            retry=retry_if_exception(retry_if),
            before=before,
            before_sleep=before_sleep,
            reraise=True,
        )


async def call_with_retry(
    config: RetryConfig,
    what: str,
    attempt: Callable[[int], Awaitable[T]],
    retry_if: Callable[[BaseException], bool],
) -> T:
    """Run `attempt(1)`, then retry (`attempt(2)`, ...) while `retry_if` accepts the failure.

    The first attempt runs outside tenacity: almost every call succeeds at once, and the hot
    path should not pay for a retry controller it does not use. The last failure propagates.
    """
    try:
        return await attempt(1)
    except Exception as exc:
        if config.attempts < 2 or not retry_if(exc):
            raise
        delay = config.first_delay()
        log.warning("%s: attempt 1 failed with a transient error (%r); retrying in %.3fs", what, exc, delay)
    await asyncio.sleep(delay)
    number = 1
    async for state in config.retrying(what, retry_if):
        with state:
            number += 1
            return await attempt(number)
    raise AssertionError("unreachable: tenacity reraises")  # pragma: no cover
