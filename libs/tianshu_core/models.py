"""The engine's data model: cases, sessions, state entries, predicates and the journal."""

from __future__ import annotations

import base64
import binascii
import enum
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, NamedTuple

from pydantic import BaseModel, ConfigDict, Field

from .errors import ErrorInfo, InvalidCursorError


class ExecutionState(enum.StrEnum):
    """Where a case is in its run: runnable, parked on a wait, or done."""

    RUNNING = "running"
    WAITING = "waiting"
    FINISHED = "finished"
    FAILED = "failed"


class Lifecycle(enum.StrEnum):
    """What an operator asked of a case: run normally, hold it, or stop it for good."""

    NORMAL = "normal"
    PAUSE = "pause"
    STOP = "stop"


TERMINAL_STATES = frozenset({ExecutionState.FINISHED, ExecutionState.FAILED})

# The resource a parent awaiting its children waits on (its id is the parent's key).
CHILDREN_RESOURCE = "tianshu-children"


class Case(BaseModel):
    """One execution of a workflow: its identity, input, progress and outcome."""

    model_config = ConfigDict(extra="forbid", validate_assignment=False)

    case_key: str
    session_id: str
    workflow_code: str
    execution_state: ExecutionState = ExecutionState.RUNNING
    lifecycle_state: Lifecycle = Lifecycle.NORMAL
    parent_key: str | None = None
    child_keys: list[str] = Field(default_factory=list)
    resource_data: Any = None
    private_vars: dict[str, Any] = Field(default_factory=dict)
    processing_report: Any = None
    finished_type: str | None = None
    finished_description: str | None = None
    output: Any = None
    error: ErrorInfo | None = None
    created_at: datetime
    updated_at: datetime
    trace_parent: str | None = None
    """The W3C `traceparent` of the span that started the case, when tracing was on: every run
    of the case is a span in that trace (and links to what woke it)."""
    failures: int = 0
    """Runs in a row that failed for a reason that was neither the workflow's own error nor an
    outage (the engine's per-case budget, `EngineConfig.max_failed_runs`); a stored outcome resets it."""

    @property
    def is_active(self) -> bool:
        """Runnable by a scheduler: not paused, not stopped, not done."""
        return self.lifecycle_state is Lifecycle.NORMAL and self.execution_state not in TERMINAL_STATES

    @property
    def is_terminal(self) -> bool:
        return self.execution_state in TERMINAL_STATES


class Session(BaseModel):
    """A group of related cases that share session-scoped state."""

    model_config = ConfigDict(extra="forbid")

    session_id: str
    metadata: dict[str, Any] = Field(default_factory=dict)
    created_at: datetime
    updated_at: datetime


class StateEntry(BaseModel):
    """One case-scoped state variable."""

    case_key: str
    name: str
    data: Any
    updated_at: datetime


class SessionStateEntry(BaseModel):
    """One session-scoped state variable, shared by the session's cases (last write wins)."""

    session_id: str
    name: str
    data: Any
    updated_at: datetime


class PollPredicate(BaseModel):
    """What a waiting case waits for: the next event on (resource type, resource id)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    resource_type: str
    resource_id: str
    step_name: str
    intent_desc: str | None = None


class CaseFilter(BaseModel):
    """Filters for listing and counting cases; None means any."""

    model_config = ConfigDict(extra="forbid")

    session_id: str | None = None
    workflow_code: str | None = None
    execution_state: ExecutionState | None = None
    lifecycle_state: Lifecycle | None = None
    parent_key: str | None = None


class CaseCursor(NamedTuple):
    """Where a page of cases ends: the (created_at, case_key) of its last case.

    The next page starts after it, which an index finds at once: page 10,000 costs what page 1
    costs, where an OFFSET reads and drops every row before the page. Cases created meanwhile
    appear in order, and none is listed twice or skipped when another one is deleted."""

    created_at: datetime
    case_key: str

    @classmethod
    def of(cls, case: Case) -> CaseCursor:
        """The cursor just after `case`."""
        return cls(case.created_at, case.case_key)

    def encode(self) -> str:
        """An opaque, URL- and shell-safe string (`decode` reads it back)."""
        text = f"{self.created_at.isoformat()}|{self.case_key}"
        return base64.urlsafe_b64encode(text.encode()).rstrip(b"=").decode()

    @classmethod
    def decode(cls, cursor: str) -> CaseCursor:
        """Read an `encode`d cursor; InvalidCursorError for anything else."""
        try:
            text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
            created, key = text.split("|", 1)
            created_at = datetime.fromisoformat(created)
        except (binascii.Error, UnicodeDecodeError, ValueError) as exc:
            raise InvalidCursorError(f"{cursor[:40]!r} is not a cursor a case listing returned") from exc
        if created_at.tzinfo is None or not key:
            raise InvalidCursorError(f"{cursor[:40]!r} is not a cursor a case listing returned")
        return cls(created_at, key)


OFFSET_DEPRECATED = (
    "CaseStore.list(offset=...) is deprecated: an offset reads and drops every case before the page, "
    "so deep pages cost more and more; pass after=CaseCursor.of(last case) or use Engine.list_cases"
)


class CasePage(BaseModel):
    """One page of a case listing, oldest first, and the cursor of the next (None on the last)."""

    model_config = ConfigDict(extra="forbid")

    cases: list[Case]
    next_cursor: str | None = None


class JournalKind(enum.StrEnum):
    """The kinds of durable effect a case's journal records."""

    STEP = "step"
    STATE = "state"
    EVENT = "event"
    CHILD = "child"
    TIMER = "timer"
    CLEAR = "clear"
    REPLAY = "replay"


@dataclass(slots=True)
class JournalEntry:
    """One durable effect of a case, in order. `data` is JSON text, decoded only when read."""

    case_key: str
    seq: int
    kind: str
    name: str
    data: str
    token: int
    created_at: datetime


@dataclass(slots=True, frozen=True)
class Lease:
    """The right to run a case, fenced by a token that grows with every acquisition."""

    case_key: str
    owner: str
    token: int
    case: Case = field(compare=False)
    journal: list[JournalEntry] | None = field(default=None, compare=False)
    """The case's journal as of the acquisition, when the store read it in the same trip."""
    lookahead: EventLookahead | None = field(default=None, compare=False)
    """For a case taken as an event woke it: the event it consumes next on that resource."""


@dataclass(slots=True, frozen=True)
class Fence:
    """Who makes a write on behalf of a run: the holder of `case_key`'s lease with `token`. A
    store refuses the write (`LeaseLostError`) once the case's token has moved on. Given where
    the row written is not the case's own (a session variable, a child case)."""

    case_key: str
    token: int


@dataclass(slots=True, frozen=True)
class EventLookahead:
    """The oldest event on a resource after `after_seq` (None: there is none), read while no
    publish on the resource was in flight: what `next_after(after_seq)` returns from then on."""

    resource_type: str
    resource_id: str
    after_seq: int
    event: Event | None


@dataclass(slots=True, frozen=True)
class Event:
    """An outside event on a resource, kept in arrival order for the retention period."""

    seq: int
    resource_type: str
    resource_id: str
    payload: Any
    event_id: str | None
    published_at: datetime


@dataclass(slots=True, frozen=True)
class Timer:
    """A durable timer: wakes `case_key` at `fire_at` (engine clock)."""

    case_key: str
    name: str
    fire_at: datetime
