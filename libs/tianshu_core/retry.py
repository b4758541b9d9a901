"""Retry policy for `ctx.step_with_retry`, on tenacity: exponential backoff, jitter, a cap, and a
classifier that stops at once on fatal errors."""

from __future__ import annotations

import enum
import logging
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

from .errors import FatalStepError

log = logging.getLogger(__name__)
T = TypeVar("T")


class ErrorClass(enum.StrEnum):
    """How a failure should be treated by a retry loop."""

    TRANSIENT = "transient"
    FATAL = "fatal"
    PROVIDER_OVERLOADED = "provider_overloaded"
    PROMPT_TOO_LONG = "prompt_too_long"
    MAX_OUTPUT_TOKENS = "max_output_tokens"


def default_classify(exc: BaseException) -> ErrorClass:
    """Everything is transient except `FatalStepError` and programming errors."""
    if isinstance(exc, FatalStepError | TypeError | ValueError | KeyError | AttributeError):
        return ErrorClass.FATAL
    return ErrorClass.TRANSIENT


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Attempts, backoff and the classifier. Delay before attempt n+1: min(base·factor^(n-1), cap)
    plus up to `jitter` seconds drawn at random."""

    max_attempts: int = 3
    base_delay: float = 0.1
    max_delay: float = 2.0
    backoff_factor: float = 2.0
    jitter: float = 0.05
    classify: Callable[[BaseException], ErrorClass] = default_classify

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        if self.base_delay < 0 or self.max_delay < 0 or self.jitter < 0:
            raise ValueError("delays must not be negative")

    def is_fatal(self, exc: BaseException) -> bool:
        return not isinstance(exc, Exception) or self.classify(exc) is ErrorClass.FATAL

    def retrying(self, what: str) -> AsyncRetrying:
        """A tenacity controller for this policy; `what` names the operation in the logs."""

        def before_sleep(state: RetryCallState) -> None:
            exc = state.outcome.exception() if state.outcome else None
            delay = state.next_action.sleep if state.next_action else 0.0
            log.warning(
                "%s: attempt %d failed (%r); retrying in %.3fs", what, state.attempt_number, exc, delay
            )

        return AsyncRetrying(
            stop=stop_after_attempt(self.max_attempts),
            wait=wait_exponential(
                multiplier=self.base_delay, exp_base=self.backoff_factor, max=self.max_delay
            )
            + wait_random(0, self.jitter),
            retry=retry_if_exception(lambda exc: not self.is_fatal(exc)),
            before_sleep=before_sleep,
            reraise=True,
        )

    async def call(self, what: str, fn: Callable[[], Awaitable[T]]) -> T:
        """Run `fn` under this policy; the last error propagates when attempts run out."""
        async for attempt in self.retrying(what):
            with attempt:
                return await fn()
        raise AssertionError("unreachable: tenacity reraises")  # pragma: no cover
