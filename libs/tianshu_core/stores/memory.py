"""In-memory stores: the reference semantics of every store protocol, for tests and embedding."""

from __future__ import annotations

import asyncio
import builtins
import itertools
import warnings
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Unpack

from tianshu_contracts.gateway import UsageSummary

from ..clock import Clock, SystemClock
from ..errors import CaseInterruptedError, LeaseLostError
from ..models import (
    CHILDREN_RESOURCE,
    OFFSET_DEPRECATED,
    Case,
    CaseCursor,
    CaseFilter,
    Event,
    EventLookahead,
    ExecutionState,
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
from .protocols import Stores, UsageFilter, UsageRow


@dataclass(slots=True)
class _LeaseRow:
    owner: str | None = None
    token: int = 0
    expires_at: datetime | None = None


class _Db:
    """All tables of one in-memory backend, shared by its stores."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.sessions: dict[str, Session] = {}
        self.cases: dict[str, Case] = {}
        self.leases: dict[str, _LeaseRow] = {}
        self.journal: dict[str, list[JournalEntry]] = defaultdict(list)
        self.journal_seqs: dict[str, set[int]] = defaultdict(set)
        self.state: dict[tuple[str, str], StateEntry] = {}
        self.session_state: dict[tuple[str, str], SessionStateEntry] = {}
        self.waits: dict[str, list[PollPredicate]] = {}
        self.wait_after: dict[str, dict[tuple[str, str], int]] = {}
        self.events: list[Event] = []
        self.event_seq = itertools.count(1)
        self.timers: dict[tuple[str, str], Timer] = {}
        self.usage: dict[str, UsageRow] = {}  # by call id; purging a case leaves its usage
        # Children a parked parent awaits (the parent_awaits flag), and per parked parent how many
        # of them are still open (children_pending).
        self.awaited: set[str] = set()
        self.children_pending: dict[str, int] = {}

    def fenced(self, case_key: str, token: int | None) -> None:
        """Refuse a write made with `token` once the case's lease has moved on (None: unfenced)."""
        if token is None:
            return
        row = self.leases.get(case_key)
        if row is None or row.token != token:
            raise LeaseLostError(case_key, token)

    def lease_free(self, case_key: str) -> bool:
        row = self.leases.get(case_key)
        return row is None or row.expires_at is None or row.expires_at < self.clock.now()

    def grant(self, case_key: str, owner: str, ttl: float) -> Lease:
        row = self.leases.setdefault(case_key, _LeaseRow())
        row.owner = owner
        row.token += 1
        row.expires_at = self.clock.now() + timedelta(seconds=ttl)
        return Lease(case_key, owner, row.token, _copy(self.cases[case_key]))

    def drop_waits(self, case_key: str) -> None:
        self.waits.pop(case_key, None)
        self.wait_after.pop(case_key, None)

    def event_after(self, resource: tuple[str, str], after_seq: int, not_before: datetime) -> Event | None:
        for event in self.events:
            if (
                event.seq > after_seq
                and (event.resource_type, event.resource_id) == resource
                and event.published_at >= not_before
            ):
                return event
        return None

    def wake(self, case_key: str) -> bool:
        """Move a waiting case to running and drop its waits; whether it moved."""
        case = self.cases.get(case_key)
        if case is None or case.execution_state is not ExecutionState.WAITING:
            return False
        case.execution_state = ExecutionState.RUNNING
        case.updated_at = self.clock.now()
        self.drop_waits(case_key)
        return True

    def wait_met(self, case_key: str, pred: PollPredicate) -> bool:
        """Whether what a waiting case waits for with `pred` is there (the sweep's check)."""
        case = self.cases[case_key]
        if pred.resource_type == CHILDREN_RESOURCE:
            return self.children_pending.get(case_key) == 0 or not any(
                c.parent_key == case_key and not c.is_terminal for c in self.cases.values()
            )
        after = self.wait_after.get(case_key, {}).get((pred.resource_type, pred.resource_id), 0)
        return self.event_after((pred.resource_type, pred.resource_id), after, case.created_at) is not None


def _copy(case: Case) -> Case:
    return case.model_copy(deep=True)


def _matches(case: Case, flt: CaseFilter | None) -> bool:
    if flt is None:
        return True
    return all(
        want is None or getattr(case, field) == want
        for field, want in (
            ("session_id", flt.session_id),
            ("workflow_code", flt.workflow_code),
            ("execution_state", flt.execution_state),
            ("lifecycle_state", flt.lifecycle_state),
            ("parent_key", flt.parent_key),
        )
    )


class InMemorySessionStore:
    def __init__(self, db: _Db) -> None:
        self._db = db

    async def upsert(self, session: Session) -> None:
        self._db.sessions[session.session_id] = session.model_copy(deep=True)

    async def get(self, session_id: str) -> Session | None:
        found = self._db.sessions.get(session_id)
        return found.model_copy(deep=True) if found else None

    async def delete(self, session_id: str) -> None:
        self._db.sessions.pop(session_id, None)


class InMemoryCaseStore:
    def __init__(self, db: _Db) -> None:
        self._db = db

    async def insert(self, case: Case, *, fence: Fence | None = None) -> bool:
        if fence is not None:
            self._db.fenced(fence.case_key, fence.token)
        if case.case_key in self._db.cases:
            return False
        self._db.cases[case.case_key] = _copy(case)
        self._db.leases[case.case_key] = _LeaseRow()
        return True

    async def upsert(self, case: Case) -> None:
        self._db.cases[case.case_key] = _copy(case)
        self._db.leases.setdefault(case.case_key, _LeaseRow())

    async def get_by_key(self, case_key: str) -> Case | None:
        found = self._db.cases.get(case_key)
        return _copy(found) if found else None

    async def get_by_session(self, session_id: str) -> list[Case]:
        return await self.list(CaseFilter(session_id=session_id), limit=1_000_000)

    async def list(
        self,
        flt: CaseFilter | None = None,
        *,
        limit: int = 100,
        after: CaseCursor | None = None,
        offset: int = 0,
    ) -> builtins.list[Case]:
        if offset:
            warnings.warn(OFFSET_DEPRECATED, DeprecationWarning, stacklevel=2)
        found = sorted((c for c in self._db.cases.values() if _matches(c, flt)), key=CaseCursor.of)
        if after is not None:
            found = [c for c in found if CaseCursor.of(c) > after]
        return [_copy(c) for c in found[offset : offset + limit]]

    async def count(self, flt: CaseFilter | None = None) -> int:
        return sum(1 for c in self._db.cases.values() if _matches(c, flt))

    async def get_many(self, case_keys: Sequence[str]) -> builtins.list[Case]:
        return [_copy(self._db.cases[k]) for k in dict.fromkeys(case_keys) if k in self._db.cases]

    def _store(self, case: Case, token: int, release: bool) -> None:
        db = self._db
        db.fenced(case.case_key, token)
        # The lifecycle belongs to the operator: a pause or cancel during the run stays.
        case.lifecycle_state = db.cases[case.case_key].lifecycle_state
        case.failures = 0
        db.cases[case.case_key] = _copy(case)
        if release:
            row = db.leases[case.case_key]
            row.owner, row.expires_at = None, None

    async def save(self, case: Case, token: int, *, release: bool = False) -> builtins.list[str]:
        db = self._db
        self._store(case, token, release)
        if not case.is_terminal:
            return []
        for key in [k for k in db.timers if k[0] == case.case_key]:
            del db.timers[key]
        parent = case.parent_key
        if case.case_key not in db.awaited or parent is None:
            return []
        db.awaited.discard(case.case_key)
        pending = db.children_pending.get(parent, 0)
        if pending <= 0:
            return []
        db.children_pending[parent] = pending - 1
        return [parent] if pending == 1 and db.wake(parent) else []

    async def park(
        self,
        case: Case,
        token: int,
        predicates: Sequence[PollPredicate],
        after: Mapping[tuple[str, str], int],
        children: Sequence[str] = (),
    ) -> bool:
        db = self._db
        key = case.case_key
        db.fenced(key, token)
        created = db.cases[key].created_at
        ready = any(
            db.event_after(
                (p.resource_type, p.resource_id), after.get((p.resource_type, p.resource_id), 0), created
            )
            is not None
            for p in predicates
            if p.resource_type != CHILDREN_RESOURCE
        )
        pending: int | None = None
        if not ready and children:
            open_ = [
                k
                for k in children
                if (c := db.cases.get(k)) is not None and c.parent_key == key and not c.is_terminal
            ]
            db.awaited.update(open_)
            pending = len(open_)
            ready = pending == 0
        case.execution_state = ExecutionState.RUNNING if ready else ExecutionState.WAITING
        self._store(case, token, release=True)
        db.drop_waits(key)
        db.children_pending.pop(key, None)
        if not ready:
            db.waits[key] = list(predicates)
            db.wait_after[key] = dict(after)
            if pending is not None:
                db.children_pending[key] = pending
        return not ready

    async def set_lifecycle(self, case_key: str, lifecycle: Lifecycle) -> bool:
        case = self._db.cases.get(case_key)
        if case is None:
            return False
        case.lifecycle_state = lifecycle
        case.updated_at = self._db.clock.now()
        return True

    async def mark_runnable(self, case_keys: Sequence[str]) -> builtins.list[str]:
        return [key for key in case_keys if self._db.wake(key)]

    def _scan(self, state: ExecutionState, limit: int, session_id: str | None) -> builtins.list[str]:
        found = sorted(
            (
                c
                for c in self._db.cases.values()
                if c.execution_state is state
                and c.lifecycle_state is Lifecycle.NORMAL
                and (session_id is None or c.session_id == session_id)
                and self._db.lease_free(c.case_key)
            ),
            key=lambda c: c.created_at,
        )
        return [c.case_key for c in found[:limit]]

    async def runnable(self, *, limit: int = 100, session_id: str | None = None) -> builtins.list[str]:
        return self._scan(ExecutionState.RUNNING, limit, session_id)

    async def waiting(self, *, limit: int = 1000, session_id: str | None = None) -> builtins.list[str]:
        return self._scan(ExecutionState.WAITING, limit, session_id)

    async def delete(self, case_key: str) -> None:
        db = self._db
        db.cases.pop(case_key, None)
        db.leases.pop(case_key, None)
        db.journal.pop(case_key, None)
        db.journal_seqs.pop(case_key, None)
        db.drop_waits(case_key)
        db.awaited.discard(case_key)
        db.children_pending.pop(case_key, None)
        for key in [k for k in db.state if k[0] == case_key]:
            del db.state[key]
        for key in [k for k in db.timers if k[0] == case_key]:
            del db.timers[key]

    async def purge_done_before(self, cutoff: datetime, *, limit: int = 1000) -> int:
        done = sorted(
            (c for c in self._db.cases.values() if c.is_terminal and c.updated_at < cutoff),
            key=lambda c: c.updated_at,
        )[:limit]
        for case in done:
            await self.delete(case.case_key)
        return len(done)


class InMemoryLeaseStore:
    def __init__(self, db: _Db) -> None:
        self._db = db

    async def acquire(self, case_key: str, owner: str, ttl: float) -> Lease | None:
        if case_key not in self._db.cases or not self._db.lease_free(case_key):
            return None
        return self._db.grant(case_key, owner, ttl)

    async def create_leased(self, case: Case, owner: str, ttl: float) -> Lease | None:
        if case.case_key in self._db.cases:
            return None
        self._db.cases[case.case_key] = _copy(case)
        return self._db.grant(case.case_key, owner, ttl)

    async def renew(self, lease: Lease, ttl: float) -> bool:
        row = self._db.leases.get(lease.case_key)
        if row is None or row.token != lease.token:
            return False
        row.expires_at = self._db.clock.now() + timedelta(seconds=ttl)
        return True

    async def release(self, lease: Lease) -> None:
        row = self._db.leases.get(lease.case_key)
        if row is not None and row.token == lease.token:
            row.owner, row.expires_at = None, None

    async def back_off(self, lease: Lease, failures: int, delay: float) -> None:
        row = self._db.leases.get(lease.case_key)
        if row is not None and row.token == lease.token:
            row.owner, row.expires_at = None, self._db.clock.now() + timedelta(seconds=delay)
            self._db.cases[lease.case_key].failures = failures


class InMemoryJournalStore:
    def __init__(self, db: _Db) -> None:
        self._db = db

    async def append(self, entry: JournalEntry) -> None:
        self._db.fenced(entry.case_key, entry.token)
        case = self._db.cases[entry.case_key]
        if case.lifecycle_state is not Lifecycle.NORMAL:
            raise CaseInterruptedError(entry.case_key, entry.token, case.lifecycle_state.value)
        seqs = self._db.journal_seqs[entry.case_key]
        if entry.seq in seqs:
            if entry in self._db.journal[entry.case_key]:
                return  # the same entry again: a retried append, already durable
            raise LeaseLostError(entry.case_key, entry.token)
        seqs.add(entry.seq)
        self._db.journal[entry.case_key].append(entry)
        # Yield like a real store would, so concurrency bugs show up in memory too.
        await asyncio.sleep(0)

    async def append_many(self, entries: Sequence[JournalEntry]) -> None:
        failure: BaseException | None = None
        for entry in entries:
            try:
                await self.append(entry)
            except LeaseLostError as exc:
                failure = failure or exc
        if failure is not None:
            raise failure

    async def load(self, case_key: str) -> builtins.list[JournalEntry]:
        return sorted(self._db.journal.get(case_key, ()), key=lambda e: e.seq)

    async def delete_by_case(self, case_key: str) -> None:
        self._db.journal.pop(case_key, None)
        self._db.journal_seqs.pop(case_key, None)


class InMemoryStateStore:
    def __init__(self, db: _Db) -> None:
        self._db = db

    async def save(self, case_key: str, name: str, data: Any, *, token: int | None = None) -> None:
        self._db.fenced(case_key, token)
        self._db.state[(case_key, name)] = StateEntry(
            case_key=case_key, name=name, data=data, updated_at=self._db.clock.now()
        )

    async def get(self, case_key: str, name: str) -> StateEntry | None:
        return self._db.state.get((case_key, name))

    async def get_all(self, case_key: str) -> list[StateEntry]:
        return sorted((e for (k, _), e in self._db.state.items() if k == case_key), key=lambda e: e.name)

    async def delete(self, case_key: str, name: str) -> None:
        self._db.state.pop((case_key, name), None)

    async def delete_by_case(self, case_key: str) -> None:
        for key in [k for k in self._db.state if k[0] == case_key]:
            del self._db.state[key]

    async def save_session(
        self, session_id: str, name: str, data: Any, *, fence: Fence | None = None
    ) -> None:
        if fence is not None:
            self._db.fenced(fence.case_key, fence.token)
        self._db.session_state[(session_id, name)] = SessionStateEntry(
            session_id=session_id, name=name, data=data, updated_at=self._db.clock.now()
        )

    async def get_session(self, session_id: str, name: str) -> SessionStateEntry | None:
        return self._db.session_state.get((session_id, name))

    async def get_all_session(self, session_id: str) -> list[SessionStateEntry]:
        return sorted(
            (e for (s, _), e in self._db.session_state.items() if s == session_id), key=lambda e: e.name
        )

    async def delete_session(self, session_id: str, name: str) -> None:
        self._db.session_state.pop((session_id, name), None)

    async def delete_by_session(self, session_id: str) -> None:
        for key in [k for k in self._db.session_state if k[0] == session_id]:
            del self._db.session_state[key]


class InMemoryWaitStore:
    def __init__(self, db: _Db) -> None:
        self._db = db

    async def replace(
        self,
        case_key: str,
        predicates: Sequence[PollPredicate],
        after: Mapping[tuple[str, str], int] | None = None,
        *,
        token: int | None = None,
    ) -> None:
        self._db.fenced(case_key, token)
        self._db.drop_waits(case_key)
        if predicates:
            self._db.waits[case_key] = list(predicates)
            self._db.wait_after[case_key] = dict(after or {})

    async def for_case(self, case_key: str) -> list[PollPredicate]:
        return list(self._db.waits.get(case_key, ()))

    async def cases_waiting_on(self, resource_type: str, resource_id: str) -> list[str]:
        return [
            key
            for key, preds in self._db.waits.items()
            if any(p.resource_type == resource_type and p.resource_id == resource_id for p in preds)
        ]

    async def delete_by_case(self, case_key: str) -> None:
        self._db.drop_waits(case_key)

    async def wake_met(
        self, after: tuple[str, int] | None, *, limit: int
    ) -> tuple[builtins.list[str], tuple[str, int] | None]:
        db = self._db
        rows = sorted(
            (key, position, pred)
            for key, preds in db.waits.items()
            for position, pred in enumerate(preds, start=1)
            if (key, position) > (after or ("", 0))
        )[:limit]
        met = sorted(
            {
                key
                for key, _, pred in rows
                if (case := db.cases.get(key)) is not None
                and case.execution_state is ExecutionState.WAITING
                and db.wait_met(key, pred)
            }
        )
        woken = [key for key in met if db.wake(key)]
        if len(rows) < limit:
            return woken, None  # the end: the next call starts again from the first
        return woken, (rows[-1][0], rows[-1][1])


class InMemoryEventStore:
    def __init__(self, db: _Db) -> None:
        self._db = db

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
        if event_id is not None:
            for event in self._db.events:
                if (
                    event.event_id == event_id
                    and event.resource_type == resource_type
                    and event.resource_id == resource_id
                    and event.published_at >= dedupe_since
                ):
                    return event, False
        event = Event(next(self._db.event_seq), resource_type, resource_id, payload, event_id, published_at)
        self._db.events.append(event)
        return event, True

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
        event, new = await self.publish(
            resource_type,
            resource_id,
            payload,
            event_id=event_id,
            published_at=published_at,
            dedupe_since=dedupe_since,
        )
        if usage is not None:
            self._db.usage.setdefault(usage.call_id, usage)
        if not new:
            return event, False, [], []
        db = self._db
        resource = (resource_type, resource_id)
        waiting = sorted(
            key
            for key, preds in db.waits.items()
            if any((p.resource_type, p.resource_id) == resource for p in preds)
        )
        woken: builtins.list[str] = []
        after: dict[str, int] = {}
        for key in waiting:
            seen = db.wait_after.get(key, {}).get(resource, 0)
            if db.wake(key):
                after[key] = seen
                woken.append(key)
        leases: builtins.list[Lease] = []
        for key in woken[: max(0, take)]:
            if not db.lease_free(key):
                continue
            lease = db.grant(key, owner, ttl)
            following = await self.next_after(
                resource_type, resource_id, after_seq=after[key], not_before=lease.case.created_at
            )
            journal = sorted(db.journal.get(key, ()), key=lambda e: e.seq)
            lookahead = EventLookahead(resource_type, resource_id, after[key], following)
            leases.append(Lease(key, owner, lease.token, lease.case, journal, lookahead))
        return event, True, woken, leases

    async def next_after(
        self,
        resource_type: str,
        resource_id: str,
        *,
        after_seq: int,
        not_before: datetime,
    ) -> Event | None:
        return self._db.event_after((resource_type, resource_id), after_seq, not_before)

    async def purge_before(self, cutoff: datetime, *, limit: int | None = None) -> int:
        old = sorted((e for e in self._db.events if e.published_at < cutoff), key=lambda e: e.published_at)
        gone = {id(e) for e in (old if limit is None else old[:limit])}
        self._db.events = [e for e in self._db.events if id(e) not in gone]
        return len(gone)


class InMemoryTimerStore:
    def __init__(self, db: _Db) -> None:
        self._db = db

    async def schedule(self, timer: Timer, *, token: int | None = None) -> None:
        self._db.fenced(timer.case_key, token)
        self._db.timers[(timer.case_key, timer.name)] = timer

    async def due(self, now: datetime, *, limit: int = 100) -> list[Timer]:
        def running(key: str) -> bool:
            case = self._db.cases.get(key)
            return case is not None and case.execution_state is ExecutionState.RUNNING

        found = sorted(
            (t for t in self._db.timers.values() if t.fire_at <= now and not running(t.case_key)),
            key=lambda t: (t.fire_at, t.case_key, t.name),
        )
        return found[:limit]

    async def delete(self, case_key: str, name: str) -> None:
        self._db.timers.pop((case_key, name), None)

    async def delete_by_case(self, case_key: str) -> None:
        for key in [k for k in self._db.timers if k[0] == case_key]:
            del self._db.timers[key]


class InMemoryUsageStore:
    """Usage rows by call id; apart from the cases, so purging a case leaves its usage."""

    def __init__(self, db: _Db | None = None) -> None:
        # With `db`, the rows its event store writes beside a model call's answer.
        self._rows: dict[str, UsageRow] = {} if db is None else db.usage

    async def record(self, row: UsageRow) -> bool:
        if row.call_id in self._rows:
            return False
        self._rows[row.call_id] = row
        return True

    def _matching(self, filters: UsageFilter) -> builtins.list[UsageRow]:
        since = filters.get("since")
        wanted = [(name, value) for name, value in filters.items() if name != "since" and value is not None]
        return sorted(
            (
                r
                for r in self._rows.values()
                if all(getattr(r, name) == value for name, value in wanted)
                and (since is None or r.created_at >= since)
            ),
            key=lambda r: (r.created_at, r.call_id),
        )

    async def summary(self, **filters: Unpack[UsageFilter]) -> UsageSummary:
        found = self._matching(filters)
        return UsageSummary(
            calls=len(found),
            attempts=sum(r.attempts for r in found),
            input_tokens=sum(r.input_tokens for r in found),
            output_tokens=sum(r.output_tokens for r in found),
            cache_read_tokens=sum(r.cache_read_tokens for r in found),
            cache_write_tokens=sum(r.cache_write_tokens for r in found),
            cost_usd=sum(r.cost_usd or 0.0 for r in found),
        )

    async def rows(
        self, *, case_key: str | None = None, session_id: str | None = None, limit: int = 100
    ) -> builtins.list[UsageRow]:
        return self._matching({"case_key": case_key, "session_id": session_id})[: max(0, limit)]


def memory_stores(clock: Clock | None = None) -> Stores:
    """A complete in-memory backend. `clock` drives lease expiry (the store's own clock)."""
    db = _Db(clock or SystemClock())
    return Stores(
        sessions=InMemorySessionStore(db),
        cases=InMemoryCaseStore(db),
        leases=InMemoryLeaseStore(db),
        journal=InMemoryJournalStore(db),
        state=InMemoryStateStore(db),
        waits=InMemoryWaitStore(db),
        events=InMemoryEventStore(db),
        timers=InMemoryTimerStore(db),
        usage=InMemoryUsageStore(db),
    )
