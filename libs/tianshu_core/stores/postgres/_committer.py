"""Group commit for journal appends: many concurrent appends, few fenced statements.

How it works. `append` puts its entry on a pending list and waits on a future. When a flush
slot is free, a flush task is scheduled; when it starts (one event-loop turn later, so every
append made in between joins it) it takes everything pending (up to `max_batch`) and writes it
with ONE statement on a pooled connection. Up to `max_flushes` flushes are in flight at once on
different connections; appends arriving meanwhile pile up and form the next batch, so batches
grow exactly when the database is the bottleneck. Each future is resolved when the statement
that carries its row has committed, so `append` returns only once its own row is durable.

When nothing is in flight or pending, the appending coroutine writes its entry itself (no task,
no extra loop turn): a sequential workflow pays one autocommit statement per step, close to a
raw INSERT. Right after a shared flush, the appenders it wakes queue instead, so that their next
appends form one batch again rather than the first going alone.

Every statement is a single autocommit INSERT ... SELECT: no BEGIN/COMMIT round trips for any
batch size. It locks the batch's case rows FOR SHARE, in key order so that concurrent flushes
cannot deadlock, and inserts only rows whose case still has `lease_token = entry.token`. A lease
steal (an UPDATE of the case row) therefore either commits before the lock (the rows are refused)
or waits until the insert has committed (the rows were written under a valid lease).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

from ...errors import CaseInterruptedError, LeaseLostError, StoreUnavailableError
from ...models import JournalEntry
from ._backend import Conn, PgBackend

log = logging.getLogger(__name__)

_INSERT_ONE = """
INSERT INTO tianshu_journal (case_key, seq, kind, name, data, token, created_at)
SELECT $1, $2, $3, $4, $5::json, $6, $7
FROM (SELECT lease_token, lifecycle FROM tianshu_cases WHERE case_key = $1 FOR SHARE) AS c
WHERE c.lease_token = $6 AND c.lifecycle = 'normal'
ON CONFLICT (case_key, seq) DO NOTHING
RETURNING seq
"""
# The batch: `tianshu_append_journal` (migrations 0012, 0015), the same INSERT ... SELECT for many
# rows (the cases locked FOR SHARE in key order), inside a function whose cached plan cannot scan
# tianshu_cases sequentially: one cached while the table was small would keep doing so as it grows.
_INSERT_MANY = "SELECT out_case_key, out_seq FROM tianshu_append_journal($1, $2, $3, $4, $5, $6, $7)"
# Rows the INSERT did not return: either refused by the fence, taken by another writer, or
# written by our own earlier attempt whose commit reply was lost (same kind, name and token).
_EXISTING = """
SELECT j.case_key, j.seq, j.kind, j.name, j.token
FROM tianshu_journal j
JOIN unnest($1::text[], $2::int[]) AS m(case_key, seq) ON j.case_key = m.case_key AND j.seq = m.seq
"""
# Why a case refused a write: another holder (token moved on) or an operator's pause or cancel.
_CASE_STATUS = "SELECT case_key, lease_token, lifecycle FROM tianshu_cases WHERE case_key = ANY($1::text[])"

_Item = tuple[JournalEntry, "asyncio.Future[None]"]
_Refusal = tuple[JournalEntry, LeaseLostError]


class GroupCommitter:
    """Batches concurrent journal appends into shared, fenced, autocommit statements."""

    def __init__(self, db: PgBackend, *, max_flushes: int = 4, max_batch: int = 1000) -> None:
        self._db = db
        self._max_flushes = max(1, max_flushes)
        self._max_batch = max(1, max_batch)
        self._pending: list[_Item] = []
        self._in_flight = 0
        self._scheduled = False
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False
        self._idle = asyncio.Event()
        self._idle.set()
        # True from the moment a shared flush resolves its futures until the loop has run the
        # woken appenders: their next appends should form one batch, not have the first of them
        # go inline alone while the rest queue behind it (that halved the batch size).
        self._just_flushed = False
        # Counters for metrics and benchmarks: statements written and entries they carried.
        self.statements = 0
        self.entries = 0

    async def append(self, entry: JournalEntry) -> None:
        """Durable on return; LeaseLostError when the entry's token is no longer current."""
        if self._closed:
            raise StoreUnavailableError("the journal store is closed")
        if self._in_flight == 0 and not self._pending and not self._just_flushed:
            # Idle: write it ourselves, saving the task hop a flush would cost.
            self._in_flight += 1
            self._idle.clear()
            try:
                failed = await self._write([entry])
            finally:
                self._finished()
            if failed:
                raise failed[0][1]
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append((entry, future))
        self._kick()
        await future

    async def append_many(self, entries: Sequence[JournalEntry]) -> None:
        """Append several entries together: one statement when the committer is idle. Each entry
        is judged on its own; the first refusal is raised once all are settled."""
        if len(entries) == 1:
            return await self.append(entries[0])
        if self._closed:
            raise StoreUnavailableError("the journal store is closed")
        if self._in_flight == 0 and not self._pending and not self._just_flushed:
            self._in_flight += 1
            self._idle.clear()
            try:
                failed = await self._write(entries)
            finally:
                self._finished()
            if failed:
                raise failed[0][1]
            return None
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in entries]
        self._pending.extend(zip(entries, futures, strict=True))
        self._kick()
        results = await asyncio.gather(*futures, return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result
        return None

    def _kick(self) -> None:
        """Schedule a flush if one is needed and a slot is free."""
        if self._pending and not self._scheduled and self._in_flight < self._max_flushes:
            self._scheduled = True
            self._in_flight += 1
            self._idle.clear()
            task = asyncio.get_running_loop().create_task(self._flush())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _settle(self) -> None:
        self._just_flushed = False

    def _finished(self) -> None:
        self._in_flight -= 1
        self._kick()
        if self._in_flight == 0 and not self._pending:
            self._idle.set()

    async def _flush(self) -> None:
        # Taken only now, a loop turn after scheduling, so that appends made meanwhile join.
        self._scheduled = False
        batch = self._pending[: self._max_batch]
        del self._pending[: self._max_batch]
        self._kick()  # more than max_batch pending and a slot free: start the next one now
        try:
            await self._deliver(batch)
        except BaseException:  # cancelled: loop shutdown, or aclose gave up waiting
            _fail(batch, StoreUnavailableError("journal flush was cancelled"))
            raise
        finally:
            self._finished()
        if len(batch) > 1 and not self._just_flushed:
            self._just_flushed = True
            asyncio.get_running_loop().call_soon(self._settle)

    async def _deliver(self, batch: Sequence[_Item]) -> None:
        """Write the batch and settle each entry's future with that entry's own outcome."""
        try:
            refused = await self._write([entry for entry, _ in batch])
        except Exception as exc:
            if len(batch) == 1 or isinstance(exc, StoreUnavailableError):
                _fail(batch, exc)
                return
            # One bad entry (say, data that is not JSON) fails the whole statement: write the
            # entries one by one so that only the bad one fails, not its batch-mates.
            log.warning("journal batch of %d failed (%r); writing its entries one by one", len(batch), exc)
            for item in batch:
                await self._deliver([item])
            return
        refusals = {id(e): exc for e, exc in refused}
        for entry, future in batch:
            if future.done():  # its caller was cancelled
                continue
            refusal = refusals.get(id(entry))
            if refusal is not None:
                future.set_exception(refusal)
            else:
                future.set_result(None)

    async def _write(self, entries: Sequence[JournalEntry]) -> list[_Refusal]:
        """Insert `entries` in one statement (with retries); the entries refused, with why."""

        self.statements += 1
        self.entries += len(entries)

        async def op(conn: Conn, _attempt: int) -> list[_Refusal]:
            # Every attempt is the same idempotent statement: rows an earlier attempt committed
            # conflict and are then recognised as ours by `_missing`.
            if len(entries) == 1:
                e = entries[0]
                seq = await conn.fetchval(
                    _INSERT_ONE, e.case_key, e.seq, e.kind, e.name, e.data, e.token, e.created_at
                )
                return [] if seq is not None else await _missing(conn, entries)
            rows = await conn.fetch(
                _INSERT_MANY,
                [e.case_key for e in entries],
                [e.seq for e in entries],
                [e.kind for e in entries],
                [e.name for e in entries],
                [e.data for e in entries],
                [e.token for e in entries],
                [e.created_at for e in entries],
            )
            if len(rows) == len(entries):
                return []
            written = {(r[0], r[1]) for r in rows}
            return await _missing(conn, [e for e in entries if (e.case_key, e.seq) not in written])

        return await self._db.run("journal append", op)

    async def aclose(self, grace: float = 10.0) -> None:
        """Refuse new appends and wait (up to `grace` seconds) for the ones already accepted."""
        self._closed = True
        try:
            await asyncio.wait_for(self._idle.wait(), grace)
        except TimeoutError:
            log.warning("journal flushes still running after %.1fs; cancelling them", grace)
            for task in list(self._tasks):
                task.cancel()


def _fail(batch: Sequence[_Item], exc: Exception) -> None:
    for _, future in batch:
        if not future.done():
            future.set_exception(exc)


async def _missing(conn: Conn, entries: Sequence[JournalEntry]) -> list[_Refusal]:
    """Of entries the INSERT did not return, those refused (not already stored as our own rows)."""
    rows = await conn.fetch(_EXISTING, [e.case_key for e in entries], [e.seq for e in entries])
    found = {(r["case_key"], r["seq"]): (r["kind"], r["name"], r["token"]) for r in rows}
    # Our own rows from an attempt whose commit reply was lost (e.g. a dropped connection) are fine.
    refused = [e for e in entries if found.get((e.case_key, e.seq)) != (e.kind, e.name, e.token)]
    if not refused:
        return []
    status = {
        r["case_key"]: (r["lease_token"], r["lifecycle"])
        for r in await conn.fetch(_CASE_STATUS, list({e.case_key for e in refused}))
    }
    return [(e, _refusal(e, status.get(e.case_key))) for e in refused]


def _refusal(entry: JournalEntry, status: tuple[int, str] | None) -> LeaseLostError:
    if status is not None and status[0] == entry.token and status[1] != "normal":
        return CaseInterruptedError(entry.case_key, entry.token, status[1])
    return LeaseLostError(entry.case_key, entry.token)
