"""What the engine's calls take and return, and what one run of a case carries."""

from __future__ import annotations

import enum
from collections.abc import Awaitable, Callable, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from ..clock import Clock
from ..models import Case, Event, EventLookahead, Lease
from ..stores.protocols import Stores
from ..workflow import WorkflowRegistry
from ._config import EngineConfig

if TYPE_CHECKING:
    from ..llm import LlmProvider
    from ..tools import ToolExecutor
    from ._lease import LeaseKeeper


CaseListener = Callable[[Case], Awaitable[None]]
_waiting_on: ContextVar[tuple[str, ...]] = ContextVar("tianshu_waiting_on", default=())


def waiting_on() -> tuple[str, ...]:
    """Inside a case listener: the resource types the case now waits on (empty unless it waits)."""
    return _waiting_on.get()


WakeListener = Callable[[Sequence[str]], None]


class ResourceFetcher(Protocol):
    """The seed's pull model: asked for each waiting predicate; a value is an event on it."""

    async def fetch(self, resource_type: str, resource_id: str) -> Any | None: ...


class RunStatus(enum.StrEnum):
    """What one "run a case once" did."""

    FINISHED = "finished"
    WAITING = "waiting"
    CONTINUE = "continue"
    FAILED = "failed"
    SKIPPED = "skipped"
    LEASE_LOST = "lease_lost"
    ABANDONED = "abandoned"
    INTERRUPTED = "interrupted"


class TickOutcome(enum.StrEnum):
    """What one tick did: nothing to run, ran something, or stopped for shutdown."""

    IDLE = "idle"
    EXECUTED = "executed"
    SHUTDOWN_REQUESTED = "shutdown_requested"


@dataclass(slots=True)
class RunReport:
    """The result of running a case once."""

    case_key: str
    status: RunStatus
    case: Case | None
    executed: list[str] = field(default_factory=list)
    replayed: list[str] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class PublishResult:
    """A published event, whether it was new (not a repeat of its id), and the cases it woke.

    `taken`: those of the woken cases whose leases the publish took for this engine (see
    `Engine.publish_event`'s `take`); run each with `Engine.run_case(key, lease=...)`.
    """

    event: Event
    new: bool
    woken: list[str]
    taken: list[Lease] = field(default_factory=list)


@dataclass(slots=True)
class CaseRun:
    """Everything one run of a case needs; the context reads it."""

    case: Case
    token: int
    stores: Stores
    registry: WorkflowRegistry
    clock: Clock
    config: EngineConfig
    keeper: LeaseKeeper
    tool_executor: ToolExecutor | None = None
    lookahead: EventLookahead | None = None
    llm: LlmProvider | None = None
