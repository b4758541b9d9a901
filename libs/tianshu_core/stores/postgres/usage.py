"""Model call usage: one row per call in `tianshu_llm_usage`, and sums over them."""

from __future__ import annotations

import dataclasses
from typing import Any, Unpack

from tianshu_contracts.gateway import UsageSummary

from ..protocols import UsageFilter, UsageRow
from ._backend import Conn, PgBackend, Record

# The columns of a usage row: UsageRow's fields, by the same names.
_NAMES = tuple(f.name for f in dataclasses.fields(UsageRow))
_COLUMNS = ", ".join(_NAMES)


def insert_sql(first: int = 1) -> str:
    """An insert of one usage row whose values are parameters `$first`.. in `_NAMES` order; a
    row for the call id already there wins (a redelivered or replayed result counts once)."""
    values = ", ".join(f"${n}" for n in range(first, first + len(_NAMES)))
    return f"INSERT INTO tianshu_llm_usage ({_COLUMNS}) VALUES ({values}) ON CONFLICT (call_id) DO NOTHING"


_INSERT = insert_sql() + " RETURNING call_id"
_SELECT = f"SELECT {_COLUMNS} FROM tianshu_llm_usage"
_SUMS = (
    "SELECT count(*), COALESCE(sum(attempts), 0)::bigint, COALESCE(sum(input_tokens), 0)::bigint, "
    "COALESCE(sum(output_tokens), 0)::bigint, COALESCE(sum(cache_read_tokens), 0)::bigint, "
    "COALESCE(sum(cache_write_tokens), 0)::bigint, COALESCE(sum(cost_usd), 0)::float8 "
    "FROM tianshu_llm_usage"
)


def usage_args(row: UsageRow) -> list[Any]:
    """The row's values, for `insert_sql`."""
    return [getattr(row, name) for name in _NAMES]


def _row(record: Record) -> UsageRow:
    return UsageRow(**{name: record[name] for name in _NAMES})


def _where(filters: UsageFilter) -> tuple[str, list[Any]]:
    """A WHERE clause (or "") and its parameters: equality on each filter given, `since` as a
    lower bound on created_at. Built per call, so each shape of query gets its own plan."""
    clauses: list[str] = []
    args: list[Any] = []
    for column, value in filters.items():
        if value is not None:
            args.append(value)
            clauses.append(f"created_at >= ${len(args)}" if column == "since" else f"{column} = ${len(args)}")
    return (f" WHERE {' AND '.join(clauses)}" if clauses else ""), args


class PostgresUsageStore:
    """Usage rows in `tianshu_llm_usage`. `record` inserts or does nothing, so it is retried; on
    a retry it reports True when the row it finds is exactly its own (its first try committed)."""

    def __init__(self, db: PgBackend) -> None:
        self._db = db

    async def record(self, row: UsageRow) -> bool:
        """Store the row unless its call id has one; True when this call stored it."""

        async def op(conn: Conn, attempt: int) -> bool:
            if await conn.fetchval(_INSERT, *usage_args(row)) is not None:
                return True
            if attempt == 1:
                return False
            found = await conn.fetchrow(f"{_SELECT} WHERE call_id = $1", row.call_id)
            return found is not None and _row(found) == row

        return await self._db.run("usage record", op)

    async def summary(self, **filters: Unpack[UsageFilter]) -> UsageSummary:
        """Sums over the matching rows (a row without a cost estimate adds 0 USD)."""
        where, args = _where(filters)
        found = await self._db.fetchrow("usage summary", _SUMS + where, *args)
        assert found is not None  # an aggregate without GROUP BY always has its row
        return UsageSummary(
            calls=found[0],
            attempts=found[1],
            input_tokens=found[2],
            output_tokens=found[3],
            cache_read_tokens=found[4],
            cache_write_tokens=found[5],
            cost_usd=found[6],
        )

    async def rows(
        self, *, case_key: str | None = None, session_id: str | None = None, limit: int = 100
    ) -> list[UsageRow]:
        """The matching rows, oldest first."""
        where, args = _where({"case_key": case_key, "session_id": session_id})
        sql = f"{_SELECT}{where} ORDER BY created_at, call_id LIMIT ${len(args) + 1}"
        return [_row(r) for r in await self._db.fetch("usage rows", sql, *args, max(0, limit))]
