"""Cases and their leases: one table, `tianshu_cases`, with the lease columns on each row."""

from __future__ import annotations

import builtins
import warnings
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import asyncpg

from ...errors import LeaseLostError
from ...models import (
    OFFSET_DEPRECATED,
    Case,
    CaseCursor,
    CaseFilter,
    ExecutionState,
    Fence,
    Lease,
    Lifecycle,
    PollPredicate,
)
from ._backend import Conn, PgBackend
from ._codec import (
    CASE_COLUMNS,
    CASE_SET,
    CASE_VALUES,
    RUN_SET,
    case_args,
    case_from_row,
    journal_from_arrays,
    run_set,
)
from ._fence import check_fence, fence_cte, held

# Creating a case also writes its trace_parent ($17), which nothing changes afterwards. A run
# spawning a child creates it as the holder of its own case ($18) with token $19 (fenced).
_INSERT = f"""
WITH {fence_cte("$18", "$19")},
put AS (
    INSERT INTO tianshu_cases ({CASE_COLUMNS}, trace_parent) SELECT {CASE_VALUES}, $17 WHERE {held("$19")}
    ON CONFLICT (case_key) DO NOTHING
    RETURNING case_key
)
SELECT (SELECT case_key FROM put) AS created, (SELECT lease_token FROM fence) AS token
"""
_UPSERT = f"""
INSERT INTO tianshu_cases ({CASE_COLUMNS}, trace_parent) VALUES ({CASE_VALUES}, $17)
ON CONFLICT (case_key) DO UPDATE SET {CASE_SET}, trace_parent = EXCLUDED.trace_parent
"""
# A save that ends the case (finished or failed) also drops its timers, which could only wake a
# case that has nothing left to do; only when the fenced UPDATE went through. A child that ends,
# awaited by its parent (parent_awaits, set by the parent's park), counts itself out of the
# parent's children_pending; the last one moves the parent to running and drops its waits: the
# wake is committed with the child's outcome, and the flag is cleared with it, so that a retry of
# the save counts nothing twice. The parent's key comes back when it was woken. A save stores an
# outcome, so the count of failed runs in a row starts again.
_SAVE_TEMPLATE = """
WITH old AS (
    SELECT parent_awaits FROM tianshu_cases WHERE case_key = $1 AND lease_token = $16 FOR UPDATE
), saved AS (
    UPDATE tianshu_cases SET {set_list}, failures = 0,
           parent_awaits = old.parent_awaits AND $4 NOT IN ('finished', 'failed')
      FROM old
     WHERE case_key = $1 AND lease_token = $16
    RETURNING lifecycle, execution_state, parent_key, old.parent_awaits
), timers AS (
    DELETE FROM tianshu_timers t USING saved
    WHERE t.case_key = $1 AND saved.execution_state IN ('finished', 'failed')
), parent AS (
    UPDATE tianshu_cases p
       SET children_pending = p.children_pending - 1,
           execution_state = CASE WHEN p.children_pending = 1 AND p.execution_state = 'waiting'
                                  THEN 'running' ELSE p.execution_state END,
           updated_at = CASE WHEN p.children_pending = 1 AND p.execution_state = 'waiting'
                             THEN now() ELSE p.updated_at END
      FROM saved
     WHERE p.case_key = saved.parent_key AND saved.parent_awaits
       AND saved.execution_state IN ('finished', 'failed') AND p.children_pending > 0
    RETURNING p.case_key, p.children_pending = 0 AND p.execution_state = 'running' AS woke
), dropped AS (
    DELETE FROM tianshu_waits w USING parent WHERE w.case_key = parent.case_key AND parent.woke
)
SELECT saved.lifecycle, (SELECT parent.case_key FROM parent WHERE parent.woke) AS woken FROM saved
"""
_SAVE = _SAVE_TEMPLATE.format(set_list=RUN_SET)
_RELEASE = "lease_owner = NULL, lease_expires_at = NULL"
_SAVE_RELEASE = _SAVE_TEMPLATE.format(set_list=f"{RUN_SET}, {_RELEASE}")
# A park: tianshu_park (migration 0008) locks, rechecks, marks the awaited children and stores the
# waits; this UPDATE stores the case, waiting or (ready) running, with its children count, and
# releases the lease. One statement, one commit: no crash can fall between the waits and the recheck.
_PARK = f"""
WITH p AS (SELECT ready, pending FROM tianshu_park($1, $16, $17, $18, $19, $20, $21, $22))
UPDATE tianshu_cases SET {run_set("CASE WHEN p.ready THEN 'running' ELSE $4 END")},
       children_pending = p.pending, failures = 0, {_RELEASE}
FROM p WHERE case_key = $1 AND lease_token = $16
RETURNING lifecycle, p.ready
"""
# What tianshu_park raises when the case's lease has moved on.
_LEASE_LOST = "TSL01"
_GET = "SELECT * FROM tianshu_cases WHERE case_key = $1"
# Waking drops the waits in the statement that moves the case, as a publish does (migration
# 0004): dropped later, they could be the waits of a run that followed the wake.
_MARK_RUNNABLE = """
WITH moved AS (
    UPDATE tianshu_cases SET execution_state = 'running', updated_at = now()
    WHERE case_key = ANY($1::text[]) AND execution_state = 'waiting'
    RETURNING case_key
), dropped AS (
    DELETE FROM tianshu_waits t USING moved WHERE t.case_key = moved.case_key
)
SELECT case_key FROM moved
"""
# Lease free = never taken, released, or expired, by the database's clock.
_FREE = "(lease_expires_at IS NULL OR lease_expires_at < now())"
# The IN list repeats what $1 can be, so that a generic plan may use tianshu_cases_active_idx
# (partial: running and waiting cases only; migration 0013).
_SCAN = f"""
SELECT case_key FROM tianshu_cases
WHERE execution_state = $1 AND execution_state IN ('running', 'waiting') AND lifecycle = 'normal'
  AND {_FREE}
  AND ($3::text IS NULL OR session_id = $3)
ORDER BY created_at, case_key
LIMIT $2
"""
_ACQUIRE_WITH_JOURNAL = (
    "SELECT c, j_seq, j_kind, j_name, j_data, j_token, j_created FROM tianshu_acquire($1, $2, $3)"
)
_CREATE_LEASED = f"""
INSERT INTO tianshu_cases ({CASE_COLUMNS}, trace_parent, lease_owner, lease_token, lease_expires_at)
VALUES ({CASE_VALUES}, $17, $18, 1, now() + $19::float8 * interval '1 second')
ON CONFLICT (case_key) DO NOTHING
RETURNING *
"""
_PURGE_DONE = """
WITH gone AS (
    DELETE FROM tianshu_cases WHERE case_key IN (
        SELECT case_key FROM tianshu_cases
        WHERE execution_state IN ('finished', 'failed') AND updated_at < $1
        ORDER BY updated_at LIMIT $2
        FOR UPDATE SKIP LOCKED
    )
    RETURNING case_key
), journal AS (
    DELETE FROM tianshu_journal t USING gone WHERE t.case_key = gone.case_key
), state AS (
    DELETE FROM tianshu_case_state t USING gone WHERE t.case_key = gone.case_key
), waits AS (
    DELETE FROM tianshu_waits t USING gone WHERE t.case_key = gone.case_key
), timers AS (
    DELETE FROM tianshu_timers t USING gone WHERE t.case_key = gone.case_key
)
SELECT count(*) FROM gone
"""
_FILTER_COLUMNS = (
    ("session_id", "session_id"),
    ("workflow_code", "workflow_code"),
    ("execution_state", "execution_state"),
    ("lifecycle_state", "lifecycle"),
    ("parent_key", "parent_key"),
)


def _where(flt: CaseFilter | None) -> tuple[str, list[Any]]:
    """A WHERE clause (or "") and its parameters for a CaseFilter."""
    if flt is None:
        return "", []
    clauses: list[str] = []
    args: list[Any] = []
    for field, column in _FILTER_COLUMNS:
        value = getattr(flt, field)
        if value is not None:
            args.append(value.value if isinstance(value, ExecutionState | Lifecycle) else value)
            clauses.append(f"{column} = ${len(args)}")
    return (f"WHERE {' AND '.join(clauses)}" if clauses else ""), args


def list_query(
    flt: CaseFilter | None, *, limit: int, after: CaseCursor | None = None, offset: int = 0
) -> tuple[str, builtins.list[Any]]:
    """The SQL of `PostgresCaseStore.list` and its parameters (public so that its plan can be read).

    A keyset: the row comparison `(created_at, case_key) > (...)` starts the index scan on
    `tianshu_cases_created_idx` (or, under a filter, that filter's `(..., created_at)` index) right
    after the previous page, so a deep page reads as many rows as the first."""
    where, args = _where(flt)
    if after is not None:
        args += [after.created_at, after.case_key]
        keyset = f"(created_at, case_key) > (${len(args) - 1}, ${len(args)})"
        where = f"{where} AND {keyset}" if where else f"WHERE {keyset}"
    args.append(limit)
    sql = f"SELECT * FROM tianshu_cases {where} ORDER BY created_at, case_key LIMIT ${len(args)}"
    if offset:
        args.append(offset)
        sql += f" OFFSET ${len(args)}"
    return sql, args


class PostgresCaseStore:
    """Cases in `tianshu_cases`.

    Retries: reads, `upsert`, the fenced `save`, `set_lifecycle` and `delete` are idempotent and
    retried. `insert` is retried too; on a retry it reports True when the row it finds is
    exactly the case it was inserting (its own first attempt committed). `mark_runnable` reports
    which rows it moved, which a blind retry would lose, so it is retried only when the failure
    came before the statement was sent.
    """

    def __init__(self, db: PgBackend) -> None:
        self._db = db

    async def insert(self, case: Case, *, fence: Fence | None = None) -> bool:
        """Create the case unless its key exists; True when created. With `fence`, as the
        holder of that case's lease: LeaseLostError, creating nothing, once it has moved on."""
        holder = (fence.case_key, fence.token) if fence is not None else (None, None)
        args = (*case_args(case), case.trace_parent, *holder)

        async def op(conn: Conn, attempt: int) -> tuple[bool, int | None]:
            row = await conn.fetchrow(_INSERT, *args)
            assert row is not None  # a SELECT without FROM always has its row
            if row["created"] is not None or attempt == 1:
                return row["created"] is not None, row["token"]
            found = await conn.fetchrow(_GET, case.case_key)
            return found is not None and case_from_row(found) == case, row["token"]

        created, token = await self._db.run("case insert", op)
        if fence is not None:
            check_fence(fence.case_key, fence.token, token)
        return created

    async def upsert(self, case: Case) -> None:
        """Create or overwrite the case (admin write: not fenced, lease untouched)."""
        await self._db.execute("case upsert", _UPSERT, *case_args(case), case.trace_parent)

    async def get_by_key(self, case_key: str) -> Case | None:
        """The case, or None."""
        row = await self._db.fetchrow("case get", _GET, case_key)
        return None if row is None else case_from_row(row)

    async def get_by_session(self, session_id: str) -> builtins.list[Case]:
        """The session's cases, oldest first."""
        rows = await self._db.fetch(
            "cases by session",
            "SELECT * FROM tianshu_cases WHERE session_id = $1 ORDER BY created_at, case_key",
            session_id,
        )
        return [case_from_row(r) for r in rows]

    async def list(
        self,
        flt: CaseFilter | None = None,
        *,
        limit: int = 100,
        after: CaseCursor | None = None,
        offset: int = 0,
    ) -> builtins.list[Case]:
        """Cases matching the filter, oldest first, after `after` (see `list_query`)."""
        if offset:
            warnings.warn(OFFSET_DEPRECATED, DeprecationWarning, stacklevel=2)
        sql, args = list_query(flt, limit=limit, after=after, offset=offset)
        rows = await self._db.fetch("case list", sql, *args)
        return [case_from_row(r) for r in rows]

    async def count(self, flt: CaseFilter | None = None) -> int:
        """How many cases match the filter."""
        where, args = _where(flt)
        return int(
            await self._db.fetchval("case count", f"SELECT count(*) FROM tianshu_cases {where}", *args)
        )

    async def get_many(self, case_keys: Sequence[str]) -> builtins.list[Case]:
        """The cases of these keys that exist, in one read."""
        rows = await self._db.fetch(
            "case get_many", "SELECT * FROM tianshu_cases WHERE case_key = ANY($1::text[])", list(case_keys)
        )
        return [case_from_row(r) for r in rows]

    async def save(self, case: Case, token: int, *, release: bool = False) -> builtins.list[str]:
        """Write the case as its lease holder; LeaseLostError once another holder took it. The
        key of the parent this save woke (it ended the last child the parent awaits), if any.

        The lifecycle is never written here (an operator's pause or cancel may land during the
        run); the stored one is read back into `case`. Retried: a retry after a lost reply finds
        the child already counted out and wakes nothing (the sweep finds a parent so left)."""
        args = case_args(case)
        row = await self._db.fetchrow(
            "case save", _SAVE_RELEASE if release else _SAVE, *args[:4], *args[5:], token
        )
        if row is None:
            raise LeaseLostError(case.case_key, token)
        case.lifecycle_state = Lifecycle(row["lifecycle"])
        case.failures = 0
        return [] if row["woken"] is None else [row["woken"]]

    async def park(
        self,
        case: Case,
        token: int,
        predicates: Sequence[PollPredicate],
        after: Mapping[tuple[str, str], int],
        children: Sequence[str] = (),
    ) -> bool:
        """Store the case waiting on `predicates`, fenced, lease released, in one statement that
        first rechecks (see `_PARK`); False when it was ready and was stored running instead."""
        case.execution_state = ExecutionState.WAITING
        args = case_args(case)
        preds = builtins.list(predicates)
        try:
            row = await self._db.fetchrow(
                "case park",
                _PARK,
                *args[:4],
                *args[5:],
                token,
                [p.resource_type for p in preds],
                [p.resource_id for p in preds],
                [p.step_name for p in preds],
                [p.intent_desc for p in preds],
                [after.get((p.resource_type, p.resource_id), 0) for p in preds],
                builtins.list(children),
            )
        except asyncpg.PostgresError as exc:
            if exc.sqlstate == _LEASE_LOST:
                raise LeaseLostError(case.case_key, token) from exc
            raise
        if row is None:  # the UPDATE found no row of ours (and tianshu_park may not have run)
            raise LeaseLostError(case.case_key, token)
        case.lifecycle_state = Lifecycle(row["lifecycle"])
        case.failures = 0
        case.execution_state = ExecutionState.RUNNING if row["ready"] else ExecutionState.WAITING
        return not row["ready"]

    async def set_lifecycle(self, case_key: str, lifecycle: Lifecycle) -> bool:
        """Set what an operator asked of the case; False when there is no such case."""
        status = await self._db.execute(
            "case set_lifecycle",
            "UPDATE tianshu_cases SET lifecycle = $2, updated_at = now() WHERE case_key = $1",
            case_key,
            lifecycle.value,
        )
        return status == "UPDATE 1"

    async def mark_runnable(self, case_keys: Sequence[str]) -> builtins.list[str]:
        """Move waiting cases to running and drop their waits; the keys that moved, in the order
        given."""
        if not case_keys:
            return []
        rows = await self._db.fetch(
            "case mark_runnable", _MARK_RUNNABLE, builtins.list(case_keys), idempotent=False
        )
        moved = {r["case_key"] for r in rows}
        return [k for k in dict.fromkeys(case_keys) if k in moved]

    async def runnable(self, *, limit: int = 100, session_id: str | None = None) -> builtins.list[str]:
        """Keys of active running cases whose lease is free or expired, oldest first."""
        rows = await self._db.fetch("case runnable", _SCAN, "running", limit, session_id)
        return [r["case_key"] for r in rows]

    async def waiting(self, *, limit: int = 1000, session_id: str | None = None) -> builtins.list[str]:
        """Keys of active waiting cases whose lease is free or expired, oldest first."""
        rows = await self._db.fetch("case waiting", _SCAN, "waiting", limit, session_id)
        return [r["case_key"] for r in rows]

    async def delete(self, case_key: str) -> None:
        """Remove the case and its journal, state, waits and timers, in one transaction."""

        async def op(conn: Conn, _attempt: int) -> None:
            async with conn.transaction():
                # The case row goes first: a journal append in flight holds it FOR SHARE, so we
                # wait for that append instead of deadlocking against its journal insert.
                await conn.execute("DELETE FROM tianshu_cases WHERE case_key = $1", case_key)
                for table in ("tianshu_journal", "tianshu_case_state", "tianshu_waits", "tianshu_timers"):
                    await conn.execute(f"DELETE FROM {table} WHERE case_key = $1", case_key)

        await self._db.run("case delete", op)

    async def purge_done_before(self, cutoff: datetime, *, limit: int = 1000) -> int:
        """Remove up to `limit` finished or failed cases last updated before `cutoff` (oldest
        first, through tianshu_cases_done_idx), with their journal, state, waits and timers: one
        statement. Rows another transaction holds are skipped; the next call takes them."""
        count = await self._db.fetchval("case purge_done_before", _PURGE_DONE, cutoff, limit)
        return int(count)


class PostgresLeaseStore:
    """Leases on `tianshu_cases` rows, by the database clock, with a growing fencing token.

    Retries: `renew`, `release` and `back_off` are idempotent. A retried `acquire` is safe because its only
    possible wrong answer is None (the first attempt took the lease and the retry sees it held),
    which delays the case by one TTL and never lets two holders run it. A retried
    `create_leased` that finds the key taken returns the lease when the row is exactly its own
    first attempt (same case, owner, token 1).
    """

    def __init__(self, db: PgBackend) -> None:
        self._db = db

    async def acquire(self, case_key: str, owner: str, ttl: float) -> Lease | None:
        """Take the case if its lease is free or expired; None when held or missing. The lease
        carries the case's journal, read in the same round trip (`tianshu_acquire`, migration 0003)."""
        row = await self._db.fetchrow("lease acquire", _ACQUIRE_WITH_JOURNAL, case_key, owner, float(ttl))
        if row is None:
            return None
        case_row = row["c"]
        journal = journal_from_arrays(case_key, row)
        return Lease(case_key, owner, case_row["lease_token"], case_from_row(case_row), journal)

    async def create_leased(self, case: Case, owner: str, ttl: float) -> Lease | None:
        """Insert a new case already leased to `owner` (token 1); None if the key exists."""
        args = (*case_args(case), case.trace_parent)

        async def op(conn: Conn, attempt: int) -> Lease | None:
            row = await conn.fetchrow(_CREATE_LEASED, *args, owner, float(ttl))
            if row is None and attempt > 1:
                row = await conn.fetchrow(_GET, case.case_key)
                if row is not None and not (
                    row["lease_owner"] == owner and row["lease_token"] == 1 and case_from_row(row) == case
                ):
                    row = None
            if row is None:
                return None
            return Lease(case.case_key, owner, row["lease_token"], case_from_row(row))

        return await self._db.run("lease create_leased", op)

    async def renew(self, lease: Lease, ttl: float) -> bool:
        """Extend the lease; False when its token is no longer current."""
        status = await self._db.execute(
            "lease renew",
            "UPDATE tianshu_cases SET lease_expires_at = now() + $3::float8 * interval '1 second' "
            "WHERE case_key = $1 AND lease_token = $2",
            lease.case_key,
            lease.token,
            float(ttl),
        )
        return status == "UPDATE 1"

    async def release(self, lease: Lease) -> None:
        """Free the case for others (no-op when the token is no longer current)."""
        await self._db.execute(
            "lease release",
            "UPDATE tianshu_cases SET lease_owner = NULL, lease_expires_at = NULL "
            "WHERE case_key = $1 AND lease_token = $2",
            lease.case_key,
            lease.token,
        )

    async def back_off(self, lease: Lease, failures: int, delay: float) -> None:
        """Free the case for others only after `delay` seconds (by the database's clock), with its
        count of failed runs (no-op when the token is no longer current)."""
        await self._db.execute(
            "lease back_off",
            "UPDATE tianshu_cases SET lease_owner = NULL, failures = $3, "
            "lease_expires_at = now() + $4::float8 * interval '1 second' "
            "WHERE case_key = $1 AND lease_token = $2",
            lease.case_key,
            lease.token,
            failures,
            float(delay),
        )
