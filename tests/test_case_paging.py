"""`cases list` pages with a keyset: a page deep in a large table costs what the first page costs.

Measured by the plan, not by the clock: EXPLAIN (ANALYZE, BUFFERS) of the store's own query
(`list_query`) on 20,000 cases, for the first page and for the page after case 19,000, unfiltered
and under the filters whose indexes end in `created_at`. The same deep page through the old
OFFSET is measured too, to show what the keyset saves.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from tianshu_core.models import CaseCursor, CaseFilter
from tianshu_core.stores.postgres import migrate
from tianshu_core.stores.postgres.cases import list_query

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

CASES = 20_000
DEEP = 19_000
PAGE = 20


@pytest.fixture
async def conn(pg_server_url: str) -> AsyncIterator[asyncpg.Connection]:
    """A database of its own (no other test's cases in its plans), with CASES cases in it."""
    name = f"tianshu_paging_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(pg_server_url)
    await admin.execute(f'CREATE DATABASE "{name}"')
    url = urlunsplit(urlsplit(pg_server_url)._replace(path=f"/{name}"))
    try:
        await migrate(url)
        connection = await asyncpg.connect(url)
        # Two cases per millisecond: pages also break ties on case_key.
        await connection.execute(
            """
            INSERT INTO tianshu_cases
                (case_key, session_id, workflow_code, execution_state, lifecycle, created_at, updated_at)
            SELECT 'case-' || lpad(i::text, 6, '0'), 'session-' || (i % 4), 'flow-' || (i % 2),
                   'finished', 'normal', t, t
            FROM generate_series(1, $1::int) AS i,
                 LATERAL (SELECT timestamptz '2026-01-01' + (i / 2) * interval '1 ms' AS t) AS at
            """,
            CASES,
        )
        await connection.execute("VACUUM ANALYZE tianshu_cases")
        try:
            yield connection
        finally:
            await connection.close()
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


async def _cost(conn: asyncpg.Connection, sql: str, args: list[Any]) -> tuple[int, int]:
    """(buffers touched, most rows any plan node produced) of one run of the query."""
    plan = json.loads(await conn.fetchval(f"EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) {sql}", *args))
    root = plan[0]["Plan"]
    buffers = int(root["Shared Hit Blocks"] + root["Shared Read Blocks"])

    def most_rows(node: dict[str, Any]) -> int:
        return int(max([node["Actual Rows"], *(most_rows(child) for child in node.get("Plans", []))]))

    return buffers, most_rows(root)


@pytest.mark.parametrize(
    "flt",
    [None, CaseFilter(workflow_code="flow-1"), CaseFilter(session_id="session-2")],
    ids=["all", "workflow", "session"],
)
async def test_a_deep_page_costs_what_the_first_page_costs(
    conn: asyncpg.Connection, flt: CaseFilter | None
) -> None:
    matching = await conn.fetch(*_flat(list_query(flt, limit=CASES)))
    depth = len(matching) * DEEP // CASES
    cursor = CaseCursor(matching[depth - 1]["created_at"], matching[depth - 1]["case_key"])

    # PAGE + 1: what Engine.list_cases asks for, to know whether a next page exists.
    first = await _cost(conn, *list_query(flt, limit=PAGE + 1))
    deep = await _cost(conn, *list_query(flt, limit=PAGE + 1, after=cursor))
    # The page itself is right: the PAGE + 1 cases after the cursor.
    rows = await conn.fetch(*_flat(list_query(flt, limit=PAGE + 1, after=cursor)))
    assert [r["case_key"] for r in rows] == [m["case_key"] for m in matching[depth : depth + PAGE + 1]]

    # Flat: the deep page reads about what the first reads, and no node produces more than a page.
    assert deep[0] <= 2 * first[0] + 2, (first, deep)
    assert deep[1] <= 2 * (PAGE + 1), (first, deep)
    # The OFFSET it replaces read every case before the page.
    by_offset = await _cost(conn, *list_query(flt, limit=PAGE + 1, offset=depth))
    assert by_offset[1] >= depth and by_offset[0] >= 10 * deep[0], (deep, by_offset)


def _flat(query: tuple[str, list[Any]]) -> list[Any]:
    sql, args = query
    return [sql, *args]
