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


# -- concurrent index builds ----------------------------------------------------------------------

DONE_IDX = "tianshu_cases_done_idx"  # built by 0006, a concurrent migration


def up_to(version: int) -> tuple[Migration, ...]:
    return tuple(m for m in known_migrations() if m.version <= version)


async def index_state(conn: asyncpg.Connection[asyncpg.Record], name: str) -> tuple[int, bool, str] | None:
    """(oid, valid, definition) of the index, or None when there is none."""
    row = await conn.fetchrow(
        "SELECT i.indexrelid::int, i.indisvalid, pg_get_indexdef(i.indexrelid) FROM pg_index i "
        "WHERE i.indexrelid = to_regclass($1)",
        name,
    )
    return None if row is None else (row[0], row[1], row[2])


@pytest.fixture
async def before_0006(fresh_db: str, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[str]:
    """A database migrated to 0005 (the release before 0006); `known_migrations` then gives back
    the whole set, so that the next `migrate` applies 0006 and the rest."""
    known = known_migrations()
    monkeypatch.setattr(MIGRATE_MODULE, "known_migrations", lambda: up_to(5))
    await migrate(fresh_db)
    monkeypatch.setattr(MIGRATE_MODULE, "known_migrations", lambda: known)
    yield fresh_db


def test_0006_is_a_concurrent_index_build() -> None:
    (m0006,) = (m for m in known_migrations() if m.version == 6)
    assert m0006.concurrent
    assert [s.split(" ON ")[0] for s in m0006.statements()] == [
        f"CREATE INDEX CONCURRENTLY IF NOT EXISTS {DONE_IDX}"
    ]
    assert not any(m.concurrent for m in known_migrations() if m.version < 6)


async def test_a_concurrent_build_lets_writes_through_while_it_waits(before_0006: str) -> None:
    """0006 on a busy table: while its build waits for a transaction that writes to tianshu_cases,
    other writes to the table go on (a CREATE INDEX in a transaction would queue them behind it)."""
    busy, writer, watcher = [await asyncpg.connect(before_0006) for _ in range(3)]
    try:
        insert = (
            "INSERT INTO tianshu_cases (case_key, session_id, workflow_code, execution_state, lifecycle, "
            "created_at, updated_at) VALUES ($1, $1, 'wf', 'finished', 'normal', now(), now())"
        )
        open_tx = busy.transaction()
        await open_tx.start()
        await busy.execute(insert, "busy")
        migrating = asyncio.create_task(migrate(before_0006, lock_timeout=60))
        while not await watcher.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'tianshu-migrate' "
            "AND wait_event_type = 'Lock' AND query LIKE '%CREATE INDEX%'"
        ):
            assert not migrating.done(), migrating
            await asyncio.sleep(0.02)
        await writer.execute("SET lock_timeout = '5s'")  # queued behind the build: this fails
        await writer.execute(insert, "meanwhile")
        assert not migrating.done()
        await open_tx.commit()
        assert await migrating == [v for v in all_versions() if v >= 6]
        state = await index_state(watcher, DONE_IDX)
        assert state is not None and state[1]
    finally:
        for conn in (busy, writer, watcher):
            await conn.close()


async def test_a_lock_timeout_fails_the_migration_and_a_rerun_finishes_it(before_0006: str) -> None:
    holder = await asyncpg.connect(before_0006)
    try:
        async with holder.transaction():
            await holder.execute("LOCK TABLE tianshu_cases IN SHARE UPDATE EXCLUSIVE MODE")
            with pytest.raises(MigrationError, match=r"0006_purge_indexes waited 200 ms for a lock"):
                await migrate(before_0006, lock_timeout=0.2)
        assert await recorded(before_0006) == [v for v in all_versions() if v <= 5]
        assert await migrate(before_0006) == [v for v in all_versions() if v >= 6]
        state = await index_state(holder, DONE_IDX)
        assert state is not None and state[1]
    finally:
        await holder.close()


async def test_an_invalid_index_left_by_an_interrupted_build_is_built_again(before_0006: str) -> None:
    conn = await asyncpg.connect(before_0006)
    try:
        # An interrupted build: a concurrent build that failed part way leaves its index INVALID.
        await conn.execute(
            "INSERT INTO tianshu_cases (case_key, session_id, workflow_code, execution_state, lifecycle, "
            "created_at, updated_at) SELECT 'c' || i, 'same', 'wf', 'finished', 'normal', now(), now() "
            "FROM generate_series(1, 2) AS i"
        )
        with pytest.raises(asyncpg.UniqueViolationError):
            await conn.execute(f"CREATE UNIQUE INDEX CONCURRENTLY {DONE_IDX} ON tianshu_cases (session_id)")
        left = await index_state(conn, DONE_IDX)
        assert left is not None and not left[1]
        await migrate(before_0006)
        rebuilt = await index_state(conn, DONE_IDX)
        assert rebuilt is not None and rebuilt[1]
        assert rebuilt[2].endswith(
            "USING btree (updated_at) WHERE (execution_state = ANY (ARRAY['finished'::text, 'failed'::text]))"
        )
    finally:
        await conn.close()


async def test_a_database_that_applied_0006_keeps_its_index(fresh_db: str) -> None:
    await migrate(fresh_db)
    conn = await asyncpg.connect(fresh_db)
    try:
        before = await index_state(conn, DONE_IDX)
        assert await migrate(fresh_db) == []
        assert await index_state(conn, DONE_IDX) == before
    finally:
        await conn.close()


async def test_the_lock_timeout_setting_is_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TIANSHU_MIGRATION_LOCK_TIMEOUT_S", "soon")
    with pytest.raises(MigrationError, match="TIANSHU_MIGRATION_LOCK_TIMEOUT_S must be a positive"):
        MIGRATE_MODULE.lock_timeout_from_env()
    monkeypatch.setenv("TIANSHU_MIGRATION_LOCK_TIMEOUT_S", "2.5")
    assert MIGRATE_MODULE.lock_timeout_from_env() == 2.5


async def test_cases_have_one_index_per_query_and_room_for_lease_updates(fresh_db: str) -> None:
    """0013: the scans' index holds active cases only, and pages keep room for the lease updates
    to stay heap-only."""
    await migrate(fresh_db)
    conn = await asyncpg.connect(fresh_db)
    try:
        rows = await conn.fetch(
            "SELECT indexname, indexdef FROM pg_indexes WHERE tablename = 'tianshu_cases' ORDER BY 1"
        )
        options = await conn.fetchval("SELECT reloptions FROM pg_class WHERE oid = 'tianshu_cases'::regclass")
    finally:
        await conn.close()
    indexes = {r[0]: r[1].partition(" USING btree ")[2] for r in rows}
    assert indexes == {
        "tianshu_cases_pkey": "(case_key)",
        "tianshu_cases_session_idx": "(session_id, created_at)",
        "tianshu_cases_parent_idx": "(parent_key, created_at) WHERE (parent_key IS NOT NULL)",
        "tianshu_cases_workflow_idx": "(workflow_code, created_at)",
        "tianshu_cases_created_idx": "(created_at)",
        "tianshu_cases_done_idx": (
            "(updated_at) WHERE (execution_state = ANY (ARRAY['finished'::text, 'failed'::text]))"
        ),
        "tianshu_cases_active_idx": (
            "(execution_state, created_at, case_key) "
            "WHERE (execution_state = ANY (ARRAY['running'::text, 'waiting'::text]))"
        ),
    }
    assert options == ["fillfactor=90"]
