"""What the engine persists, as protocols: a new backend implements these and nothing else.

Every write made while running a case carries the lease token it was made under (`token`, or a
`Fence` where the row written is not the case's own); a store refuses it (`LeaseLostError`), in
the same statement or transaction that would write it, once another holder has taken the case
(fencing). Without a token, a write is an admin's: not fenced.
"""

from __future__ import annotations

import builtins
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol, TypedDict

from tianshu_contracts.gateway import LlmCallResult, UsageSummary
from tianshu_contracts.llm import LlmErrorClass, Usage

from ..models import (
    Case,
    CaseCursor,
    CaseFilter,
    Event,
    Fence,
    JournalEntry,
    Lease,
    Lifecycle,
    PollPredicate,
    Session,
    SessionStateEntry,
    StateEntry,
    Timer,
)


class SessionStore(Protocol):
    """Sessions: groups of cases."""

    async def upsert(self, session: Session) -> None: ...
    async def get(self, session_id: str) -> Session | None: ...
    async def delete(self, session_id: str) -> None: ...


class CaseStore(Protocol):
    """Cases. `save` is the fenced write used while running; `upsert` is the unfenced admin one."""

    async def insert(self, case: Case, *, fence: Fence | None = None) -> bool:
        """Create the case unless its key exists; True when created. With `fence` (a run
        spawning a child: its own case and token), refused with LeaseLostError, creating nothing,
        once that case's lease has moved on."""
        ...

    async def upsert(self, case: Case) -> None: ...
    async def get_by_key(self, case_key: str) -> Case | None: ...
    async def get_by_session(self, session_id: str) -> list[Case]: ...
    async def list(
        self,
        flt: CaseFilter | None = None,
        *,
        limit: int = 100,
        after: CaseCursor | None = None,
        offset: int = 0,
    ) -> builtins.list[Case]:
        """Cases matching the filter, oldest first (by created_at, then case_key), starting after
        `after`. `offset` is deprecated (a DeprecationWarning): it costs as much as the rows it skips."""
        ...

    async def count(self, flt: CaseFilter | None = None) -> int: ...
    async def get_many(self, case_keys: Sequence[str]) -> builtins.list[Case]:
        """The cases of these keys that exist (in any order), in one read."""
        ...

    async def save(self, case: Case, token: int, *, release: bool = False) -> builtins.list[str]:
        """Write the case as its lease holder (raises LeaseLostError if fenced out). The stored
        lifecycle is kept (it is the operator's) and copied into `case`. A save that ends the case
        (finished or failed) drops its timers; if the case is a child its parent parked awaiting
        (see `park`), it counts itself out, and when it was the last one open, the same commit
        moves the parent to running and drops its waits. Returns the keys so woken. A save stores
        an outcome: it resets `failures`."""
        ...

    async def park(
        self,
        case: Case,
        token: int,
        predicates: Sequence[PollPredicate],
        after: Mapping[tuple[str, str], int],
        children: Sequence[str] = (),
    ) -> bool:
        """Store the outcome of a run that waits, as its lease holder, lease released, in one
        commit: `predicates` as the case's waits (`after` as in `WaitStore.replace`), `children`
        (awaited children) counted so that the last to end wakes the case, and the case waiting.

        Unless the wait is met already: an event on a waited resource after its `after` (publishes
        of the resource in flight are waited for: each either commits before the look, or sees the
        waits), or none of `children` still open. Then the case is stored running with no waits
        and False is returned: run it again. Updates `case`'s execution and lifecycle state; like
        `save`, resets `failures`."""
        ...

    async def set_lifecycle(self, case_key: str, lifecycle: Lifecycle) -> bool: ...
    async def mark_runnable(self, case_keys: Sequence[str]) -> builtins.list[str]:
        """Move waiting cases to running and drop their waits, at once (so that a waker never
        drops waits that a later run of the case stored); returns the keys that moved."""
        ...

    async def runnable(self, *, limit: int = 100, session_id: str | None = None) -> builtins.list[str]:
        """Keys of active running cases whose lease is free, oldest first."""
        ...

    async def waiting(self, *, limit: int = 1000, session_id: str | None = None) -> builtins.list[str]: ...
    async def delete(self, case_key: str) -> None:
        """Remove the case and everything stored under it (purge)."""
        ...

    async def purge_done_before(self, cutoff: datetime, *, limit: int = 1000) -> int:
        """Remove up to `limit` finished or failed cases last updated before `cutoff`, with
        everything stored under them (history retention); how many went."""
        ...


class LeaseStore(Protocol):
    """Leases by the store's own clock: one holder per case, with a growing fencing token."""

    async def acquire(self, case_key: str, owner: str, ttl: float) -> Lease | None:
        """Take the case if its lease is free or expired; None when someone else holds it."""
        ...

    async def create_leased(self, case: Case, owner: str, ttl: float) -> Lease | None:
        """Insert a new case already leased to `owner`; None if the key exists."""
        ...

    async def renew(self, lease: Lease, ttl: float) -> bool: ...
    async def release(self, lease: Lease) -> None: ...
    async def back_off(self, lease: Lease, failures: int, delay: float) -> None:
        """Hand the lease back so that nobody takes the case for `delay` seconds (the store's
        clock), recording its `failures` in a row (no-op when the token is no longer current)."""
        ...


class JournalStore(Protocol):
    """The ordered history of a case's durable effects (steps, state writes, events, children)."""

    async def append(self, entry: JournalEntry) -> None:
        """Durable on return; refused with LeaseLostError when `entry.token` is stale."""
        ...

    async def append_many(self, entries: Sequence[JournalEntry]) -> None:
        """Like `append` for several entries (one commit where the backend can); each is judged
        on its own and the first refusal is raised."""
        ...

    async def load(self, case_key: str) -> list[JournalEntry]: ...
    async def delete_by_case(self, case_key: str) -> None: ...


class StateStore(Protocol):
    """Case-scoped and session-scoped variables (last write wins, no locking)."""

    async def save(self, case_key: str, name: str, data: Any, *, token: int | None = None) -> None:
        """Set a case variable; with `token`, as the case's lease holder (fenced)."""
        ...

    async def get(self, case_key: str, name: str) -> StateEntry | None: ...
    async def get_all(self, case_key: str) -> list[StateEntry]: ...
    async def delete(self, case_key: str, name: str) -> None: ...
    async def delete_by_case(self, case_key: str) -> None: ...
    async def save_session(
        self, session_id: str, name: str, data: Any, *, fence: Fence | None = None
    ) -> None:
        """Set a session variable; with `fence`, as the lease holder of the case writing it."""
        ...

    async def get_session(self, session_id: str, name: str) -> SessionStateEntry | None: ...
    async def get_all_session(self, session_id: str) -> list[SessionStateEntry]: ...
    async def delete_session(self, session_id: str, name: str) -> None: ...
    async def delete_by_session(self, session_id: str) -> None: ...


class WaitStore(Protocol):
    """What each waiting case waits for, indexed by resource."""

    async def replace(
        self,
        case_key: str,
        predicates: Sequence[PollPredicate],
        after: Mapping[tuple[str, str], int] | None = None,
        *,
        token: int | None = None,
    ) -> None:
        """Make `predicates` the case's waits. `after`: per resource, the seq of the last event
        the case consumed there (default 0); a wake's lookahead starts from it. With `token`, as
        the case's lease holder: a stale holder neither drops nor adds a wait."""
        ...

    async def for_case(self, case_key: str) -> list[PollPredicate]: ...
    async def cases_waiting_on(self, resource_type: str, resource_id: str) -> list[str]: ...
    async def delete_by_case(self, case_key: str) -> None: ...
    async def wake_met(
        self, after: tuple[str, int] | None, *, limit: int
    ) -> tuple[builtins.list[str], tuple[str, int] | None]:
        """A safety net: of the next `limit` waits after the position `after` (None: the first),
        wake (move to running, drop the waits of) the cases that still wait although what they
        wait for is there (an event after the wait's `after`; for children, none open). Returns
        the keys woken and the position to go on from (None once the end is reached)."""
        ...


class EventStore(Protocol):
    """Events per resource, in arrival order, kept for the retention period."""

    async def publish(
        self,
        resource_type: str,
        resource_id: str,
        payload: Any,
        *,
        event_id: str | None,
        published_at: datetime,
        dedupe_since: datetime,
    ) -> tuple[Event, bool]:
        """Store the event; with an id seen since `dedupe_since`, return that one and False."""
        ...

    async def publish_and_wake(
        self,
        resource_type: str,
        resource_id: str,
        payload: Any,
        *,
        event_id: str | None,
        published_at: datetime,
        dedupe_since: datetime,
        take: int = 0,
        owner: str = "",
        ttl: float = 30.0,
        usage: UsageRow | None = None,
    ) -> tuple[Event, bool, builtins.list[str], builtins.list[Lease]]:
        """`publish`, then, if the event is new, move the cases waiting on its resource to
        running and drop their waits: the keys woken. One round trip where the backend can.

        `usage`: a model call's usage row, stored atomically with the event (the call's answer),
        unless its call id has one; the usage store's `record` reads it.

        With `take`, also lease up to `take` of the woken cases (in key order, those whose lease
        is free) to `owner` for `ttl` seconds: each lease carries the case's journal and, as its
        lookahead, the event the case consumes next on this resource (from the `after` its wait
        was stored with). Every woken key is returned, the taken ones included."""
        ...

    async def next_after(
        self,
        resource_type: str,
        resource_id: str,
        *,
        after_seq: int,
        not_before: datetime,
    ) -> Event | None:
        """The oldest event on the resource with seq > after_seq published at or after not_before."""
        ...

    async def purge_before(self, cutoff: datetime, *, limit: int | None = None) -> int:
        """Delete events published before `cutoff` (at most `limit`, oldest first); how many went."""
        ...


class TimerStore(Protocol):
    """Durable timers by the engine's clock."""

    async def schedule(self, timer: Timer, *, token: int | None = None) -> None:
        """Create or move the case's timer `timer.name`; with `token`, as the case's lease holder."""
        ...

    async def due(self, now: datetime, *, limit: int = 100) -> list[Timer]:
        """Timers with fire_at <= now, earliest first, leaving out those of running cases: such a
        case may be about to park relying on its timer, which firing would drop."""
        ...

    async def delete(self, case_key: str, name: str) -> None: ...
    async def delete_by_case(self, case_key: str) -> None: ...


@dataclass(slots=True, frozen=True, kw_only=True)
class UsageRow:
    """What one model call cost: the tokens of all its upstream attempts (failed ones included)
    and the gateway's cost estimate. `provider` and `model` are who answered (None when nobody
    did, and then `error_class` says why); `latency_s` is the whole call as the gateway timed it,
    `first_token_s` the time to its first delta (streamed calls only)."""

    call_id: str
    case_key: str
    session_id: str | None = None
    workflow_code: str | None = None
    route: str
    provider: str | None = None
    model: str | None = None
    attempts: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0
    cost_usd: float | None = None
    latency_s: float = 0.0
    first_token_s: float | None = None
    error_class: str | None = None
    created_at: datetime = field(default_factory=lambda: datetime.now(UTC))

    @classmethod
    def from_result(
        cls, result: LlmCallResult, *, session_id: str | None = None, workflow_code: str | None = None
    ) -> UsageRow:
        """The row of a gateway's answer, created now: tokens summed over `result.attempts` (the
        response's own usage when the gateway listed no attempt); input tokens are prompt tokens,
        cached ones included (see `Usage`)."""
        response = result.response
        attempts = result.attempts or (response.attempts if response is not None else [])
        used = sum((a.usage for a in attempts), Usage())
        if not attempts and response is not None:
            used = response.usage
        who = (response.provider, response.model) if response is not None else (None, None)
        failed = None if response is not None else (result.error_class or LlmErrorClass.UNAVAILABLE).value
        return cls(
            call_id=result.call_id,
            case_key=result.case_key,
            session_id=session_id,
            workflow_code=workflow_code,
            route=result.route,
            provider=who[0],
            model=who[1],
            attempts=len(attempts) or int(response is not None),
            input_tokens=used.prompt_tokens,
            output_tokens=used.completion_tokens,
            error_class=failed,
            cache_read_tokens=used.cache_read_tokens,
            cache_write_tokens=used.cache_write_tokens,
            cost_usd=result.cost_usd,
            first_token_s=result.first_token_s,
            latency_s=result.duration_s,
        )


class UsageFilter(TypedDict, total=False):
    """The filters of `UsageStore.summary`; one left out or None matches every row."""

    case_key: str | None
    session_id: str | None
    workflow_code: str | None
    since: datetime | None


class UsageStore(Protocol):
    """One row per model call (see `UsageRow`), kept when the case is purged: what was spent
    stays spent. The scheduler records each `LlmCallResult` it consumes."""

    async def record(self, row: UsageRow) -> bool:
        """Store the row unless one with its `call_id` exists (then nothing changes); True when stored."""
        ...

    async def summary(
        self,
        *,
        case_key: str | None = None,
        session_id: str | None = None,
        workflow_code: str | None = None,
        since: datetime | None = None,
    ) -> UsageSummary:
        """Sums over the rows matching every filter given (`since`: created at or after it);
        a row without a cost estimate counts as 0 USD."""
        ...

    async def rows(
        self, *, case_key: str | None = None, session_id: str | None = None, limit: int = 100
    ) -> list[UsageRow]:
        """The matching rows, oldest first (by `created_at`, then `call_id`), at most `limit`."""
        ...


def _memory_usage() -> UsageStore:
    from .memory import InMemoryUsageStore

    return InMemoryUsageStore()


@dataclass(slots=True)
class Stores:
    """One backend: the set of stores the engine runs on."""

    sessions: SessionStore
    cases: CaseStore
    leases: LeaseStore
    journal: JournalStore
    state: StateStore
    waits: WaitStore
    events: EventStore
    timers: TimerStore
    usage: UsageStore = field(default_factory=_memory_usage)
    """Model call usage; a backend that has none gets an in-memory one (lost with the process)."""

    async def close(self) -> None:
        """Release the backend's resources (pools, flushers); idempotent."""
        closer = getattr(self.journal, "aclose", None)
        if closer is not None:
            await closer()
