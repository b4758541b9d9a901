"""The event inbox: events per resource, in arrival order, deduplicated by publisher id."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from asyncpg import Record

from ...models import Event
from ._backend import Conn, PgBackend
from ._codec import dump, load

# The lock tianshu_publish_event takes (migration 0001), held by a publish until it commits.
_PUBLISH_LOCK = "SELECT pg_advisory_xact_lock(1953067880, hashtext($1 || '/' || $2))"
_NEXT_AFTER = """
SELECT seq, event_id, payload::text, published_at FROM tianshu_events
WHERE resource_type = $1 AND resource_id = $2 AND seq > $3 AND published_at >= $4
ORDER BY seq LIMIT 1
"""


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
        event, created, _ = await self._publish(
            "tianshu_publish_event", resource_type, resource_id, payload, event_id, published_at, dedupe_since
        )
        return event, created

    async def publish_and_wake(
        self,
        resource_type: str,
        resource_id: str,
        payload: Any,
        *,
        event_id: str | None,
        published_at: datetime,
        dedupe_since: datetime,
    ) -> tuple[Event, bool, list[str]]:
        """`publish` and wake the resource's waiting cases: one call of `tianshu_publish_and_wake`
        (migration 0002), one commit. Retried like `publish`; a retry after a commit whose reply
        was lost reports no woken keys, and the scheduler's sweep picks those cases up instead."""
        return await self._publish(
            "tianshu_publish_and_wake",
            resource_type,
            resource_id,
            payload,
            event_id,
            published_at,
            dedupe_since,
        )

    async def _publish(
        self,
        function: str,
        resource_type: str,
        resource_id: str,
        payload: Any,
        event_id: str | None,
        published_at: datetime,
        dedupe_since: datetime,
    ) -> tuple[Event, bool, list[str]]:
        text = dump(payload)
        woken = ", out_woken" if function == "tianshu_publish_and_wake" else ""
        sql = (
            f"SELECT out_seq, out_payload::text, out_published_at, out_created{woken} "
            f"FROM {function}($1, $2, $3::jsonb, $4, $5, $6)"
        )

        async def op(conn: Conn, attempt: int) -> tuple[Event, bool, list[str]]:
            row = await conn.fetchrow(
                sql, resource_type, resource_id, text, event_id, published_at, dedupe_since
            )
            if row is None:  # the function always returns one row
                raise RuntimeError(f"{function} returned no row")
            stored = load(row[1])
            created: bool = row[3]
            if not created and attempt > 1 and row[2] == published_at and stored == load(text):
                created = True  # our own first attempt committed; its reply was lost
            event = Event(row[0], resource_type, resource_id, stored, event_id, row[2])
            return event, created, list(row[4] or []) if woken else []

        return await self._db.run(f"event {function}", op, idempotent=event_id is not None)

    async def next_after(
        self,
        resource_type: str,
        resource_id: str,
        *,
        after_seq: int,
        not_before: datetime,
        settled: bool = False,
    ) -> Event | None:
        """The oldest event on the resource with seq > after_seq published at or after not_before.

        `settled`: take the resource's publish lock first (the one `tianshu_publish_event` holds
        until it commits), then read with a fresh snapshot. A publish-and-wake that looked for
        waits before our wait was stored commits its event before we read; one that starts after
        sees our wait. Either way the case is not left waiting on an event that already came.
        """
        if not settled:
            row = await self._db.fetchrow(
                "event next_after", _NEXT_AFTER, resource_type, resource_id, after_seq, not_before
            )
        else:

            async def op(conn: Conn, _attempt: int) -> Record | None:
                async with conn.transaction():
                    await conn.execute(_PUBLISH_LOCK, resource_type, resource_id)
                    return await conn.fetchrow(_NEXT_AFTER, resource_type, resource_id, after_seq, not_before)

            row = await self._db.run("event next_after settled", op)
        if row is None:
            return None
        return Event(row[0], resource_type, resource_id, load(row[2]), row[1], row[3])

    async def purge_before(self, cutoff: datetime) -> int:
        """Delete events published before `cutoff`; how many went."""
        count = await self._db.fetchval(
            "event purge",
            "WITH gone AS (DELETE FROM tianshu_events WHERE published_at < $1 RETURNING 1) "
            "SELECT count(*) FROM gone",
            cutoff,
        )
        return int(count)
