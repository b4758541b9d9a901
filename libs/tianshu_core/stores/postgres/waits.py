"""Waits (what a waiting case waits for) and durable timers."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime

from ...models import CHILDREN_RESOURCE, PollPredicate, Timer
from ._backend import PgBackend
from ._fence import check_fence, fence_cte, held

# The case's waits become the given ones: rows 1..n are written over (or created), the rows past n
# dropped. One statement, so that it can be fenced ($7); the two writes touch different rows.
_REPLACE = f"""
WITH {fence_cte("$1", "$7")},
dropped AS (
    DELETE FROM tianshu_waits WHERE case_key = $1 AND position > cardinality($2::text[]) AND {held("$7")}
), put AS (
    INSERT INTO tianshu_waits
        (case_key, position, resource_type, resource_id, step_name, intent_desc, after_seq)
    SELECT $1, p.ord::int, p.rt, p.rid, p.step, p.intent, p.after
    FROM unnest($2::text[], $3::text[], $4::text[], $5::text[], $6::bigint[])
        WITH ORDINALITY AS p(rt, rid, step, intent, after, ord)
    WHERE {held("$7")}
    ON CONFLICT (case_key, position) DO UPDATE SET
        resource_type = EXCLUDED.resource_type, resource_id = EXCLUDED.resource_id,
        step_name = EXCLUDED.step_name, intent_desc = EXCLUDED.intent_desc, after_seq = EXCLUDED.after_seq
)
SELECT lease_token FROM fence
"""
_SCHEDULE = f"""
WITH {fence_cte("$1", "$4")},
put AS (
    INSERT INTO tianshu_timers (case_key, name, fire_at) SELECT $1, $2, $3 WHERE {held("$4")}
    ON CONFLICT (case_key, name) DO UPDATE SET fire_at = EXCLUDED.fire_at
)
SELECT lease_token FROM fence
"""

# The sweep's safety net: the next `$3` wait rows after ($1, $2) in primary key order (a bounded
# range of tianshu_waits_pkey, never the whole table), and of their cases those still waiting
# although what they wait for is there: an event after the wait's after_seq (a probe of
# tianshu_events_resource_idx, as next_after), or, on the children resource, no awaited child left
# open (children_pending 0, or, for a wait stored without the count, no open child at all, a probe
# of tianshu_cases_parent_idx). Those are moved to running and their waits dropped, in the same
# statement. Also returned: the last row read, where the next sweep goes on.
_WAKE_MET = f"""
WITH batch AS MATERIALIZED (
    SELECT case_key, position, resource_type, resource_id, after_seq FROM tianshu_waits
    WHERE (case_key, position) > ($1, $2)
    ORDER BY case_key, position LIMIT $3
), met AS (
    -- Per row of the batch, its case by primary key (OFFSET 0 keeps it a probe: joined, the
    -- planner may hash the whole table); its open children by tianshu_cases_parent_idx (a scalar
    -- subquery, for the same reason).
    SELECT DISTINCT b.case_key FROM batch b
    CROSS JOIN LATERAL (
        SELECT c.case_key, c.created_at, c.children_pending FROM tianshu_cases c
        WHERE c.case_key = b.case_key AND c.execution_state = 'waiting' OFFSET 0
    ) c
    WHERE CASE
        WHEN b.resource_type = '{CHILDREN_RESOURCE}' THEN
            coalesce(c.children_pending = 0, false) OR (
                SELECT ch.case_key FROM tianshu_cases ch
                WHERE ch.parent_key = c.case_key AND ch.execution_state NOT IN ('finished', 'failed')
                LIMIT 1) IS NULL
        ELSE (
            -- As next_after: the first event of the range, in tianshu_events_resource_idx's order
            -- (under EXISTS the planner may walk tianshu_events_published_idx instead, through
            -- every event published since the case was created).
            SELECT e.seq FROM tianshu_events e
            WHERE e.resource_type = b.resource_type AND e.resource_id = b.resource_id
              AND (e.resource_type, e.resource_id, e.seq) > (b.resource_type, b.resource_id, b.after_seq)
              AND e.published_at >= c.created_at
            ORDER BY e.resource_type, e.resource_id, e.seq LIMIT 1) IS NOT NULL
        END
), moved AS (
    UPDATE tianshu_cases c SET execution_state = 'running', updated_at = now()
    FROM met WHERE c.case_key = met.case_key AND c.execution_state = 'waiting'
    RETURNING c.case_key
), dropped AS (
    DELETE FROM tianshu_waits w USING moved WHERE w.case_key = moved.case_key
), last AS (
    SELECT case_key, position FROM batch ORDER BY case_key DESC, position DESC LIMIT 1
)
SELECT (SELECT coalesce(array_agg(case_key ORDER BY case_key), ARRAY[]::text[]) FROM moved) AS woken,
       (SELECT count(*) FROM batch) AS scanned, last.case_key, last.position
FROM (SELECT 1) AS one LEFT JOIN last ON true
"""


class PostgresWaitStore:
    """Predicates in `tianshu_waits`, one row each, indexed by (resource_type, resource_id).

    `replace` is one statement that makes the case's waits exactly the given ones, so it is
    idempotent and retried.
    """

    def __init__(self, db: PgBackend) -> None:
        self._db = db

    async def replace(
        self,
        case_key: str,
        predicates: Sequence[PollPredicate],
        after: Mapping[tuple[str, str], int] | None = None,
        *,
        token: int | None = None,
    ) -> None:
        """Make `predicates` the case's whole set of waits (empty: no waits). `after` gives, per
        resource, the seq of the last event the case consumed there (default 0). With `token`,
        fenced: LeaseLostError, and no wait dropped or added, once the lease has moved on."""
        preds = list(predicates)
        cursors = after or {}
        found = await self._db.fetchval(
            "waits replace",
            _REPLACE,
            case_key,
            [p.resource_type for p in preds],
            [p.resource_id for p in preds],
            [p.step_name for p in preds],
            [p.intent_desc for p in preds],
            [cursors.get((p.resource_type, p.resource_id), 0) for p in preds],
            token,
        )
        check_fence(case_key, token, found)

    async def for_case(self, case_key: str) -> list[PollPredicate]:
        """The case's predicates, in the order they were given."""
        rows = await self._db.fetch(
            "waits for_case",
            "SELECT resource_type, resource_id, step_name, intent_desc FROM tianshu_waits "
            "WHERE case_key = $1 ORDER BY position",
            case_key,
        )
        return [
            PollPredicate(resource_type=r[0], resource_id=r[1], step_name=r[2], intent_desc=r[3])
            for r in rows
        ]

    async def cases_waiting_on(self, resource_type: str, resource_id: str) -> list[str]:
        """Keys of the cases with a predicate on this resource (an index lookup)."""
        rows = await self._db.fetch(
            "waits cases_waiting_on",
            "SELECT DISTINCT case_key FROM tianshu_waits WHERE resource_type = $1 AND resource_id = $2 "
            "ORDER BY case_key",
            resource_type,
            resource_id,
        )
        return [r[0] for r in rows]

    async def delete_by_case(self, case_key: str) -> None:
        """Drop the case's predicates."""
        await self._db.execute("waits delete", "DELETE FROM tianshu_waits WHERE case_key = $1", case_key)

    async def wake_met(
        self, after: tuple[str, int] | None, *, limit: int
    ) -> tuple[list[str], tuple[str, int] | None]:
        """Look at the next `limit` waits after `after` (see `_WAKE_MET`) and wake the cases among
        them whose condition is met; the keys woken, and where to go on (None: from the start).
        Retried: keys lost with a reply are of cases now running, which the sweep adopts."""
        key, position = after or ("", 0)
        row = await self._db.fetchrow("waits wake_met", _WAKE_MET, key, position, limit)
        assert row is not None  # one row, always
        more = row["scanned"] >= limit and row["case_key"] is not None
        return list(row["woken"]), ((row["case_key"], row["position"]) if more else None)


class PostgresTimerStore:
    """Timers in `tianshu_timers`, by the engine's clock (times are passed in). All retried."""

    def __init__(self, db: PgBackend) -> None:
        self._db = db

    async def schedule(self, timer: Timer, *, token: int | None = None) -> None:
        """Create or move the case's timer `name`; with `token`, fenced (LeaseLostError)."""
        found = await self._db.fetchval(
            "timer schedule", _SCHEDULE, timer.case_key, timer.name, timer.fire_at, token
        )
        check_fence(timer.case_key, token, found)

    async def due(self, now: datetime, *, limit: int = 100) -> list[Timer]:
        """Timers with fire_at <= now, earliest first; not those of cases still running (a run
        that parks after its timer fell due needs that timer, which the sweep would drop)."""
        rows = await self._db.fetch(
            "timer due",
            "SELECT t.case_key, t.name, t.fire_at FROM tianshu_timers t WHERE t.fire_at <= $1 "
            "AND NOT EXISTS (SELECT 1 FROM tianshu_cases c WHERE c.case_key = t.case_key "
            "AND c.execution_state = 'running') "
            "ORDER BY t.fire_at, t.case_key, t.name LIMIT $2",
            now,
            limit,
        )
        return [Timer(r[0], r[1], r[2]) for r in rows]

    async def delete(self, case_key: str, name: str) -> None:
        """Remove one timer (no-op when absent)."""
        await self._db.execute(
            "timer delete", "DELETE FROM tianshu_timers WHERE case_key = $1 AND name = $2", case_key, name
        )

    async def delete_by_case(self, case_key: str) -> None:
        """Remove all the case's timers."""
        await self._db.execute(
            "timer delete_by_case", "DELETE FROM tianshu_timers WHERE case_key = $1", case_key
        )
