"""What unwinds a run of a workflow on the engine's behalf, and the guard of its store calls."""

from __future__ import annotations

from collections.abc import Awaitable, Sequence
from datetime import datetime
from typing import TypeVar

from ..errors import LeaseLostError, TianshuError
from ..models import PollPredicate

T = TypeVar("T")


class WaitTimeoutError(TianshuError):
    """A `wait_for_event` with a timeout saw no event in time."""

    code = "wait_timeout"


class Suspend(BaseException):
    """Unwinds a workflow that must wait; the engine catches it and parks the case.

    A BaseException so that a workflow's `except Exception` cannot swallow it.
    """

    def __init__(
        self,
        predicates: Sequence[PollPredicate],
        wake_at: datetime | None = None,
        children: Sequence[str] = (),
    ) -> None:
        super().__init__("workflow suspended")
        self.predicates = list(predicates)
        self.wake_at = wake_at
        self.children = tuple(children)  # the awaited children not ended yet


class StoreFailure(BaseException):
    """A store (or bus) call made on the workflow's behalf failed: the run ends, and the engine
    judges the cause, not the workflow (an outage delays the case, a refused write fails it, any
    other failure backs it off; see `Engine._run_failed`).

    A BaseException so that a workflow's `except Exception` cannot mistake it for its own error.
    """

    def __init__(self, cause: BaseException) -> None:
        super().__init__(f"store failure: {cause!r}")
        self.cause = cause


async def guard(awaitable: Awaitable[T]) -> T:
    """Await a store call made for the workflow: a failure the workflow must not handle (an
    outage, a bug in the store) becomes `StoreFailure`; a lost lease and the store's own
    non-retryable errors pass through."""
    try:
        return await awaitable
    except LeaseLostError:
        raise
    except TianshuError as exc:
        if exc.retryable:
            raise StoreFailure(exc) from exc
        raise
    except Exception as exc:
        raise StoreFailure(exc) from exc
