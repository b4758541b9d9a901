"""The journal: each case's ordered history of durable effects, appended by group commit."""

from __future__ import annotations

from collections.abc import Sequence

from ...models import JournalEntry
from ._backend import PgBackend
from ._committer import GroupCommitter

_LOAD = """
SELECT case_key, seq, kind, name, data::text AS data, token, created_at
FROM tianshu_journal WHERE case_key = $1 ORDER BY seq
"""


class PostgresJournalStore:
    """Journal rows in `tianshu_journal`, keyed (case_key, seq), each with its lease token.

    `append` goes through a GroupCommitter (see `_committer`); it is idempotent, so a retry after
    a dropped connection is safe. `aclose` stops the committer and closes the backend's pool:
    `Stores.close()` calls it, which is how closing the Stores releases every connection.
    """

    def __init__(self, db: PgBackend, *, max_flushes: int = 4) -> None:
        self._db = db
        self._committer = GroupCommitter(db, max_flushes=max_flushes)

    async def append(self, entry: JournalEntry) -> None:
        """Durable on return; LeaseLostError when `entry.token` is stale.

        Like any write, an append whose caller is cancelled may or may not have been stored.
        """
        await self._committer.append(entry)

    async def append_many(self, entries: Sequence[JournalEntry]) -> None:
        """Several entries of one case, in seq order, in one statement where possible."""
        await self._committer.append_many(entries)

    async def load(self, case_key: str) -> list[JournalEntry]:
        """The case's entries ordered by seq, `data` as the JSON text that was appended."""
        rows = await self._db.fetch("journal load", _LOAD, case_key)
        return [JournalEntry(r[0], r[1], r[2], r[3], r[4], r[5], r[6]) for r in rows]

    async def delete_by_case(self, case_key: str) -> None:
        """Drop the case's journal."""
        await self._db.execute("journal delete", "DELETE FROM tianshu_journal WHERE case_key = $1", case_key)

    async def aclose(self) -> None:
        """Wait for accepted appends, refuse new ones, then close the pool; idempotent."""
        await self._committer.aclose()
        await self._db.close()
