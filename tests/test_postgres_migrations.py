"""Schema migrations: fresh apply, re-run, concurrent starters, and the version checks."""

from __future__ import annotations

import asyncio
import sys
import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest

from tianshu_core.errors import MigrationError
from tianshu_core.stores.postgres import connect_postgres, latest_version, migrate, schema_version
from tianshu_core.stores.postgres.migrate import Migration, known_migrations

# The package exports the function `migrate`, which shadows the module of the same name.
MIGRATE_MODULE = sys.modules["tianshu_core.stores.postgres.migrate"]

pytestmark = pytest.mark.postgres

TABLES = {
    "tianshu_schema_migrations",
    "tianshu_sessions",
    "tianshu_cases",
    "tianshu_journal",
    "tianshu_case_state",
    "tianshu_session_state",
    "tianshu_waits",
    "tianshu_events",
    "tianshu_timers",
    "tianshu_llm_usage",
}


@pytest.fixture
async def fresh_db(pg_server_url: str) -> AsyncIterator[str]:
    """A new empty database for one test (migrations need a database of their own)."""
    name = f"tianshu_mig_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(pg_server_url)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    yield f"{pg_server_url.rpartition('/')[0]}/{name}"
    admin = await asyncpg.connect(pg_server_url)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


async def recorded(dsn: str) -> list[int]:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch("SELECT version FROM tianshu_schema_migrations ORDER BY version")
        return [r[0] for r in rows]
    finally:
        await conn.close()


def all_versions() -> list[int]:
    return [m.version for m in known_migrations()]


async def test_fresh_database_is_migrated_and_rerun_is_a_no_op(fresh_db: str) -> None:
    assert await schema_version(fresh_db) == 0
    assert await migrate(fresh_db) == all_versions()
    assert await schema_version(fresh_db) == latest_version() >= 1
    conn = await asyncpg.connect(fresh_db)
    try:
        tables = {
            r[0] for r in await conn.fetch("SELECT tablename FROM pg_tables WHERE tablename LIKE 'tianshu_%'")
        }
    finally:
        await conn.close()
    assert tables >= TABLES

    assert await migrate(fresh_db) == []
    assert await recorded(fresh_db) == all_versions()


async def test_usage_table_has_its_indexes(fresh_db: str) -> None:
    await migrate(fresh_db)
    conn = await asyncpg.connect(fresh_db)
    try:
        rows = await conn.fetch("SELECT indexdef FROM pg_indexes WHERE tablename = 'tianshu_llm_usage'")
    finally:
        await conn.close()
    columns = {r[0].partition(" USING btree ")[2] for r in rows}
    assert columns == {"(call_id)", "(case_key)", "(session_id, created_at)", "(created_at)"}


async def test_concurrent_migrations_apply_each_version_once(fresh_db: str) -> None:
    results = await asyncio.gather(*(migrate(fresh_db) for _ in range(5)))
    applied = sorted(v for result in results for v in result)
    assert applied == all_versions()  # each version applied by exactly one of the five
    assert await recorded(fresh_db) == all_versions()


async def test_newer_database_is_refused(fresh_db: str) -> None:
    await migrate(fresh_db)
    conn = await asyncpg.connect(fresh_db)
    try:
        await conn.execute("INSERT INTO tianshu_schema_migrations (version, name) VALUES (9999, 'future')")
    finally:
        await conn.close()
    assert await schema_version(fresh_db) == 9999
    with pytest.raises(MigrationError, match="newer than this code"):
        await migrate(fresh_db)
    with pytest.raises(MigrationError, match="newer than this code"):
        await connect_postgres(fresh_db)


async def test_unmigrated_database_is_refused_with_a_hint(fresh_db: str) -> None:
    app = f"tianshu-mig-{uuid.uuid4().hex[:8]}"
    with pytest.raises(MigrationError, match="tianshu db migrate"):
        await connect_postgres(fresh_db, application_name=app)
    conn = await asyncpg.connect(fresh_db)
    try:
        left = await conn.fetchval("SELECT count(*) FROM pg_stat_activity WHERE application_name = $1", app)
    finally:
        await conn.close()
    assert left == 0  # the refused connect closed its pool


async def test_connect_with_migrate(fresh_db: str) -> None:
    stores = await connect_postgres(fresh_db, migrate=True, max_size=2)
    try:
        assert await stores.cases.count() == 0
    finally:
        await stores.close()
    await stores.close()  # idempotent
    assert await schema_version(fresh_db) == latest_version()


async def test_failed_migration_rolls_back_and_is_not_recorded(
    fresh_db: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    known = known_migrations()
    bad = Migration(
        latest_version() + 1,
        "broken",
        "CREATE TABLE tianshu_half_done (x int); SELECT * FROM no_such_table;",
        latest_version(),
    )
    monkeypatch.setattr(MIGRATE_MODULE, "known_migrations", lambda: (*known, bad))
    with pytest.raises(MigrationError, match="broken"):
        await migrate(fresh_db)
    assert await recorded(fresh_db) == [m.version for m in known]
    conn = await asyncpg.connect(fresh_db)
    try:
        assert await conn.fetchval("SELECT to_regclass('tianshu_half_done')") is None
    finally:
        await conn.close()
