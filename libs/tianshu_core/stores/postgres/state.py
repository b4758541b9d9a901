"""Sessions and case- and session-scoped state variables."""

from __future__ import annotations

from typing import Any

from ...models import Fence, Session, SessionStateEntry, StateEntry
from ._backend import PgBackend
from ._codec import dump, load
from ._fence import check_fence, fence_cte, held

# Fenced by the case's token ($4), when given; `updated_at` is the database's clock.
_SAVE = f"""
WITH {fence_cte("$1", "$4")},
put AS (
    INSERT INTO tianshu_case_state (case_key, name, data, updated_at)
    SELECT $1, $2, $3::jsonb, now() WHERE {held("$4")}
    ON CONFLICT (case_key, name) DO UPDATE SET data = EXCLUDED.data, updated_at = EXCLUDED.updated_at
)
SELECT lease_token FROM fence
"""
# Fenced by the writing case ($4) and its token ($5), when given.
_SAVE_SESSION = f"""
WITH {fence_cte("$4", "$5")},
put AS (
    INSERT INTO tianshu_session_state (session_id, name, data, updated_at)
    SELECT $1, $2, $3::jsonb, now() WHERE {held("$5")}
    ON CONFLICT (session_id, name) DO UPDATE SET data = EXCLUDED.data, updated_at = EXCLUDED.updated_at
)
SELECT lease_token FROM fence
"""


class PostgresSessionStore:
    """Sessions in `tianshu_sessions`. Every write is idempotent, so all are retried."""

    def __init__(self, db: PgBackend) -> None:
        self._db = db

    async def upsert(self, session: Session) -> None:
        """Create or replace the session."""
        await self._db.execute(
            "session upsert",
            "INSERT INTO tianshu_sessions (session_id, metadata, created_at, updated_at) "
            "VALUES ($1, $2::jsonb, $3, $4) ON CONFLICT (session_id) DO UPDATE SET "
            "metadata = EXCLUDED.metadata, created_at = EXCLUDED.created_at, "
            "updated_at = EXCLUDED.updated_at",
            session.session_id,
            dump(session.metadata),
            session.created_at,
            session.updated_at,
        )

    async def get(self, session_id: str) -> Session | None:
        """The session, or None."""
        row = await self._db.fetchrow(
            "session get", "SELECT * FROM tianshu_sessions WHERE session_id = $1", session_id
        )
        if row is None:
            return None
        return Session(
            session_id=row["session_id"],
            metadata=load(row["metadata"]),
            created_at=row["created_at"],
            updated_at=row["updated_at"],
        )

    async def delete(self, session_id: str) -> None:
        """Remove the session row (its cases and state are separate)."""
        await self._db.execute(
            "session delete", "DELETE FROM tianshu_sessions WHERE session_id = $1", session_id
        )


class PostgresStateStore:
    """Variables in `tianshu_case_state` and `tianshu_session_state`; last write wins.

    `updated_at` is the database's clock (the protocol passes no time). Every write is an
    upsert or a delete, so all are retried.
    """

    def __init__(self, db: PgBackend) -> None:
        self._db = db

    async def save(self, case_key: str, name: str, data: Any, *, token: int | None = None) -> None:
        """Set a case variable; with `token`, fenced (LeaseLostError once the lease moved on)."""
        found = await self._db.fetchval("state save", _SAVE, case_key, name, dump(data), token)
        check_fence(case_key, token, found)

    async def get(self, case_key: str, name: str) -> StateEntry | None:
        """A case variable, or None."""
        row = await self._db.fetchrow(
            "state get",
            "SELECT data::text, updated_at FROM tianshu_case_state WHERE case_key = $1 AND name = $2",
            case_key,
            name,
        )
        if row is None:
            return None
        return StateEntry(case_key=case_key, name=name, data=load(row[0]), updated_at=row[1])

    async def get_all(self, case_key: str) -> list[StateEntry]:
        """All the case's variables, by name."""
        rows = await self._db.fetch(
            "state get_all",
            "SELECT name, data::text, updated_at FROM tianshu_case_state WHERE case_key = $1 ORDER BY name",
            case_key,
        )
        return [StateEntry(case_key=case_key, name=r[0], data=load(r[1]), updated_at=r[2]) for r in rows]

    async def delete(self, case_key: str, name: str) -> None:
        """Remove a case variable (no-op when absent)."""
        await self._db.execute(
            "state delete",
            "DELETE FROM tianshu_case_state WHERE case_key = $1 AND name = $2",
            case_key,
            name,
        )

    async def delete_by_case(self, case_key: str) -> None:
        """Remove all the case's variables."""
        await self._db.execute(
            "state delete_by_case", "DELETE FROM tianshu_case_state WHERE case_key = $1", case_key
        )

    async def save_session(
        self, session_id: str, name: str, data: Any, *, fence: Fence | None = None
    ) -> None:
        """Set a session variable; with `fence`, as the lease holder of the case writing it."""
        key, token = (fence.case_key, fence.token) if fence is not None else (None, None)
        found = await self._db.fetchval(
            "session state save", _SAVE_SESSION, session_id, name, dump(data), key, token
        )
        if fence is not None:
            check_fence(fence.case_key, fence.token, found)

    async def get_session(self, session_id: str, name: str) -> SessionStateEntry | None:
        """A session variable, or None."""
        row = await self._db.fetchrow(
            "session state get",
            "SELECT data::text, updated_at FROM tianshu_session_state WHERE session_id = $1 AND name = $2",
            session_id,
            name,
        )
        if row is None:
            return None
        return SessionStateEntry(session_id=session_id, name=name, data=load(row[0]), updated_at=row[1])

    async def get_all_session(self, session_id: str) -> list[SessionStateEntry]:
        """All the session's variables, by name."""
        rows = await self._db.fetch(
            "session state get_all",
            "SELECT name, data::text, updated_at FROM tianshu_session_state "
            "WHERE session_id = $1 ORDER BY name",
            session_id,
        )
        return [
            SessionStateEntry(session_id=session_id, name=r[0], data=load(r[1]), updated_at=r[2])
            for r in rows
        ]

    async def delete_session(self, session_id: str, name: str) -> None:
        """Remove a session variable (no-op when absent)."""
        await self._db.execute(
            "session state delete",
            "DELETE FROM tianshu_session_state WHERE session_id = $1 AND name = $2",
            session_id,
            name,
        )

    async def delete_by_session(self, session_id: str) -> None:
        """Remove all the session's variables."""
        await self._db.execute(
            "session state delete_by_session",
            "DELETE FROM tianshu_session_state WHERE session_id = $1",
            session_id,
        )
