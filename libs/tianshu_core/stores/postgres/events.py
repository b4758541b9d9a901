"""The event inbox: events per resource, in arrival order, deduplicated by publisher id."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from asyncpg import Record

from ...models import Event, EventLookahead, Lease
from ..protocols import UsageRow
from ._backend import Conn, PgBackend
from ._codec import case_from_row, dump, journal_from_arrays, load
from .usage import insert_sql, usage_args

# The resource's events after seq $3, a range of tianshu_events_resource_idx in that index's
# order. Its start is a row comparison: written as `seq > $3 ... ORDER BY seq`, the planner may
# instead walk the primary key from seq $3 and filter by resource, which for a resource holding
# many of the events reads the whole tail of the table when nothing newer is there. Its end is
# the equalities on the resource: a btree scan ends only where a row comparison's first column
# does, so a bound `(type, id, seq) <= (...)` read on through every later resource of the type.
_NEXT_AFTER = """
SELECT seq, event_id, payload::text, published_at FROM tianshu_events
WHERE resource_type = $1 AND resource_id = $2 AND (resource_type, resource_id, seq) > ($1, $2, $3)
  AND published_at >= $4
ORDER BY resource_type, resource_id, seq LIMIT 1
"""
_PUBLISH = (
    "SELECT out_seq, out_payload::text, out_published_at, out_created "
    "FROM tianshu_publish_event($1, $2, $3::jsonb, $4, $5, $6)"
)
_PUBLISH_WAKE_TAKE = """
SELECT out_seq, out_payload::text AS out_payload, out_published_at, out_created, out_woken, out_case,
       j_seq, j_kind, j_name, j_data, j_token, j_created, out_after_seq,
       next_seq, next_event_id, next_payload::text AS next_payload, next_published_at
FROM tianshu_publish_wake_take($1, $2, $3::jsonb, $4, $5, $6, $7, $8, $9)
"""
# The same with a model call's usage row inserted by the same statement: one transaction.
_PUBLISH_WAKE_TAKE_USAGE = f"WITH usage AS ({insert_sql(10)}){_PUBLISH_WAKE_TAKE}"


def _is_own_retry(
    attempt: int, row_published_at: datetime, published_at: datetime, stored: Any, text: str
) -> bool:
    """Whether an event found (not created) is exactly ours, found by a retry: the first attempt
    committed and its reply was lost. Only with an event id: without one, no publish is retried."""
    return attempt > 1 and row_published_at == published_at and stored == load(text)


def _taken_lease(row: Record, event: Event, owner: str) -> Lease:
    """A lease row of `tianshu_publish_wake_take`: the case, its journal and its lookahead."""
    case = case_from_row(row["out_case"])
    key = case.case_key
    journal = journal_from_arrays(key, row)
    following: Event | None = None
    if row["next_seq"] == event.seq:
        following = event
    elif row["next_seq"] is not None:
        following = Event(
            row["next_seq"],
            event.resource_type,
            event.resource_id,
            load(row["next_payload"]),
            row["next_event_id"],
            row["next_published_at"],
        )
    lookahead = EventLookahead(event.resource_type, event.resource_id, row["out_after_seq"], following)
    return Lease(key, owner, row["out_case"]["lease_token"], case, journal, lookahead)


class PostgresEventStore:
    """Events in `tianshu_events`; `published_at` always comes from the engine's clock.

    `publish` runs the `tianshu_publish_event` function (migration 0001): one round trip that
    serialises publishes per resource, so seq order is commit order and dedupe cannot race.
    Retries: with an event id, a retry that finds an event with this id and exactly this
    `published_at` and payload knows it is its own first attempt and still reports it as new.
    Without an id a retry could store the event twice, so it is retried only when the failure
    came before the statement was sent.
    """

    def __init__(self, db: PgBackend) -> None:
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
        """Store the event; with an id seen since `dedupe_since`, return that one and False."""
        text = dump(payload)

        async def op(conn: Conn, attempt: int) -> tuple[Event, bool]:
            row = await conn.fetchrow(
                _PUBLISH, resource_type, resource_id, text, event_id, published_at, dedupe_since
            )
            if row is None:  # the function always returns one row
                raise RuntimeError("tianshu_publish_event returned no row")
            stored = load(row[1])
            created: bool = row[3] or _is_own_retry(attempt, row[2], published_at, stored, text)
            return Event(row[0], resource_type, resource_id, stored, event_id, row[2]), created

        return await self._db.run("event publish", op, idempotent=event_id is not None)

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
    ) -> tuple[Event, bool, list[str], list[Lease]]:
        """`publish` and wake the resource's waiting cases, and lease up to `take` of the woken to
        `owner`, each with its journal and the event it consumes next: one call of
        `tianshu_publish_wake_take` (migration 0004), one commit, which also stores `usage`.

        Retried like `publish`. A retry after a commit whose reply was lost reports no woken
        keys and no leases: the cases it woke are found by the scheduler's sweep, those it leased
        once their lease expires."""
        text = dump(payload)

        async def op(conn: Conn, attempt: int) -> tuple[Event, bool, list[str], list[Lease]]:
            rows = await conn.fetch(
                _PUBLISH_WAKE_TAKE if usage is None else _PUBLISH_WAKE_TAKE_USAGE,
                resource_type,
                resource_id,
                text,
                event_id,
                published_at,
                dedupe_since,
                owner,
                float(ttl),
                take,
                *([] if usage is None else usage_args(usage)),
            )
            if not rows:  # the function always returns the event's row first
                raise RuntimeError("tianshu_publish_wake_take returned no row")
            head = rows[0]
            stored = load(head["out_payload"])
            created: bool = head["out_created"] or _is_own_retry(
                attempt, head["out_published_at"], published_at, stored, text
            )
            event = Event(
                head["out_seq"], resource_type, resource_id, stored, event_id, head["out_published_at"]
            )
            leases = [_taken_lease(row, event, owner) for row in rows[1:]]
            return event, created, list(head["out_woken"] or []), leases

        return await self._db.run("event publish_and_wake", op, idempotent=event_id is not None)

    async def next_after(
        self,
        resource_type: str,
        resource_id: str,
        *,
        after_seq: int,
        not_before: datetime,
    ) -> Event | None:
        """The oldest event on the resource with seq > after_seq published at or after not_before."""
        row = await self._db.fetchrow(
            "event next_after", _NEXT_AFTER, resource_type, resource_id, after_seq, not_before
        )
        if row is None:
            return None
        return Event(row[0], resource_type, resource_id, load(row[2]), row[1], row[3])

    async def purge_before(self, cutoff: datetime, *, limit: int | None = None) -> int:
        """Delete events published before `cutoff` (at most `limit`, oldest first, through
        tianshu_events_published_idx); how many went."""
        count = await self._db.fetchval(
            "event purge",
            "WITH gone AS (DELETE FROM tianshu_events WHERE seq IN ("
            "SELECT seq FROM tianshu_events WHERE published_at < $1 ORDER BY published_at LIMIT $2"
            ") RETURNING 1) SELECT count(*) FROM gone",
            cutoff,
            limit,
        )
        return int(count)
