"""Rolling upgrades: code runs behind the schema as far as the newer migrations keep it working.

"The code of an older release" is this code with a shorter migration list: its version check is
what decides whether it starts. Every test is generic over the migration list, so it holds for
each migration added later.
"""

from __future__ import annotations

import sys
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import nats
import pytest

from tests._nats import NatsServerFactory
from tests._services import eventually, fresh_database, request_start
from tianshu_core import (
    Engine,
    ExecutionState,
    MigrationError,
    WorkflowContext,
    WorkflowRegistry,
    WorkflowResult,
    connect_postgres,
)
from tianshu_core.bus import NatsSettings
from tianshu_core.stores.postgres import migrate, schema_version
from tianshu_core.stores.postgres.migrate import Migration, known_migrations
from tianshu_scheduler.service import Scheduler
from tianshu_scheduler.settings import SchedulerSettings

# The package exports the function `migrate`, which shadows the module of the same name.
MIGRATE_MODULE = sys.modules["tianshu_core.stores.postgres.migrate"]
ALL = known_migrations()

pytestmark = pytest.mark.postgres


@pytest.fixture
async def db(pg_server_url: str) -> AsyncIterator[str]:
    """A database migrated to every migration this code has."""
    async with fresh_database(pg_server_url, "tianshu_upgrade") as url:
        yield url


@pytest.fixture
async def empty_db(pg_server_url: str) -> AsyncIterator[str]:
    name = f"tianshu_upgrade_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(pg_server_url)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        yield urlunsplit(urlsplit(pg_server_url)._replace(path=f"/{name}"))
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


Knowing = Callable[[Sequence[Migration]], None]


@pytest.fixture
def knowing(monkeypatch: pytest.MonkeyPatch) -> Knowing:
    """`knowing(migrations)`: from now on, this code knows only `migrations`."""

    def know(migrations: Sequence[Migration]) -> None:
        known = tuple(migrations)
        monkeypatch.setattr(MIGRATE_MODULE, "known_migrations", lambda: known)

    return know


def runs_on(code: int, schema: int) -> bool:
    """By the rule: may the code of the first `code` migrations run on the first `schema`?"""
    return all(m.compatible_with <= ALL[code - 1].version for m in ALL[code:schema])


def oldest_running_code() -> int:
    """How many migrations the oldest code that runs on the full schema knows."""
    return min(n for n in range(1, len(ALL) + 1) if runs_on(n, len(ALL)))


def registry() -> WorkflowRegistry:
    reg = WorkflowRegistry()

    @reg.workflow("upgrade")
    async def upgrade(ctx: WorkflowContext) -> WorkflowResult:
        title = await ctx.step("title", lambda: "Buy GPUs")
        decision = await ctx.wait_for_event("decision", ctx.case.case_key)
        return await ctx.finish("done", output={"title": title, "decision": decision})

    return reg


async def test_code_behind_the_schema_starts_and_works(db: str, knowing: Knowing) -> None:
    known = ALL[: oldest_running_code()]
    knowing(known)
    assert await migrate(db) == []  # nothing to apply: the database is ahead
    assert await schema_version(db) == ALL[-1].version > known[-1].version
    for migrate_first in (False, True):
        stores = await connect_postgres(db, migrate=migrate_first, max_size=2)
        try:
            engine = Engine(stores, registry())
            case = await engine.run_workflow("upgrade")
            await engine.publish_event("decision", case.case_key, "approved")
            await engine.run_until_idle()
            done = await engine.get_case(case.case_key)
        finally:
            await stores.close()
        assert (done.execution_state, done.output) == (
            ExecutionState.FINISHED,
            {"title": "Buy GPUs", "decision": "approved"},
        )


async def test_scheduler_behind_the_schema_starts_and_runs_cases(
    db: str, knowing: Knowing, make_nats_server: NatsServerFactory
) -> None:
    knowing(ALL[: oldest_running_code()])
    url = make_nats_server().url
    scheduler = Scheduler(
        SchedulerSettings(database_url=db, migrate_on_start=True, pool_max_size=4),
        registry(),
        NatsSettings(url=url),
    )
    await scheduler.start()
    nc = await nats.connect(url)
    try:
        key = await request_start(nc, "upgrade")
        assert scheduler.engine is not None
        engine = scheduler.engine

        async def waiting() -> bool:
            return (await engine.get_case(key)).execution_state is ExecutionState.WAITING

        await eventually(waiting, what="the case waits for its decision")
        await engine.publish_event("decision", key, "approved")

        async def finished() -> bool:
            return (await engine.get_case(key)).execution_state is ExecutionState.FINISHED

        await eventually(finished, what="the case finishes")
    finally:
        await nc.close()
        await scheduler.close()


async def test_code_further_behind_is_refused_with_a_clear_message(db: str, knowing: Knowing) -> None:
    n = oldest_running_code() - 1
    assert n >= 1
    knowing(ALL[:n])
    blocking = next(m for m in ALL[n:] if m.compatible_with > ALL[n - 1].version)
    message = (
        f"schema is at version {ALL[-1].version}, newer than this code knows "
        f"\\(latest {ALL[n - 1].version}\\), and its migration {blocking.version:04d} works only "
        f"with the code of version {blocking.compatible_with} or later; upgrade tianshu"
    )
    with pytest.raises(MigrationError, match=message):
        await connect_postgres(db)
    with pytest.raises(MigrationError, match=message):
        await migrate(db)
    scheduler = Scheduler(SchedulerSettings(database_url=db, migrate_on_start=True), registry())
    with pytest.raises(MigrationError, match=message):
        await scheduler.start()
    await scheduler.close()


async def test_a_migration_may_keep_older_code_working(db: str, knowing: Knowing) -> None:
    """A release that brings several migrations marks each `-- compatible-with:` the last
    migration of the release before it; the database records it, and that code runs."""
    latest = ALL[-1].version
    release = [
        Migration(latest + 1, "release_a", "CREATE TABLE tianshu_release_a (x int)", latest),
        Migration(latest + 2, "release_b", "CREATE TABLE tianshu_release_b (x int)", latest),
    ]
    knowing([*ALL, *release])
    assert await migrate(db) == [latest + 1, latest + 2]
    knowing(ALL)
    stores = await connect_postgres(db, max_size=1)  # two migrations behind, and it starts
    await stores.close()
    knowing(ALL[:-1])
    with pytest.raises(MigrationError, match=f"its migration {latest + 1:04d} works only with the code"):
        await connect_postgres(db)


def test_the_compatible_with_line_is_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path
    (folder / "0001_a.sql").write_text("CREATE TABLE a (x int);\n")
    (folder / "0002_b.sql").write_text("CREATE TABLE b (x int);\n")
    (folder / "0003_c.sql").write_text("-- compatible-with: 0001\nCREATE TABLE c (x int);\n")
    monkeypatch.setattr(MIGRATE_MODULE, "MIGRATIONS_DIR", folder)
    read = MIGRATE_MODULE.known_migrations.__wrapped__()
    assert [(m.version, m.compatible_with) for m in read] == [(1, 0), (2, 1), (3, 1)]
    (folder / "0004_d.sql").write_text("-- compatible-with: 0004\nCREATE TABLE d (x int);\n")
    with pytest.raises(MigrationError, match="compatible-with 4 must name an older version"):
        MIGRATE_MODULE.known_migrations.__wrapped__()


# -- what every migration must keep ------------------------------------------------------------


@dataclass(frozen=True)
class Schema:
    """What code reaches in the schema: table columns and functions."""

    columns: dict[tuple[str, str], tuple[str, bool, bool]]  # (table, column): (type, not null, default)
    functions: dict[str, str]  # name(identity arguments): result type


async def snapshot(dsn: str) -> Schema:
    conn = await asyncpg.connect(dsn)
    try:
        columns = await conn.fetch(
            "SELECT c.relname, a.attname, format_type(a.atttypid, a.atttypmod), a.attnotnull, a.atthasdef"
            "  FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid"
            "  JOIN pg_namespace n ON n.oid = c.relnamespace"
            " WHERE n.nspname = 'public' AND c.relkind = 'r' AND c.relname LIKE 'tianshu%'"
            "   AND a.attnum > 0 AND NOT a.attisdropped"
        )
        functions = await conn.fetch(
            "SELECT p.proname || '(' || pg_get_function_identity_arguments(p.oid) || ')',"
            "       pg_get_function_result(p.oid)"
            "  FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace"
            " WHERE n.nspname = 'public' AND p.proname LIKE 'tianshu%'"
        )
    finally:
        await conn.close()
    return Schema({(r[0], r[1]): (r[2], r[3], r[4]) for r in columns}, {r[0]: r[1] for r in functions})


def broken(old: Schema, new: Schema) -> list[str]:
    """What code written against `old` would miss in `new`."""
    problems = []
    for (table, column), (kind, not_null, _) in old.columns.items():
        now = new.columns.get((table, column))
        if now is None:
            problems.append(f"column {table}.{column} is gone")
        elif now[0] != kind:
            problems.append(f"column {table}.{column} changed type from {kind} to {now[0]}")
        elif now[1] and not not_null and not now[2]:
            problems.append(f"column {table}.{column} became NOT NULL without a default")
    tables = {table for table, _ in old.columns}
    for (table, column), (_, not_null, default) in new.columns.items():
        if table in tables and (table, column) not in old.columns and not_null and not default:
            problems.append(f"new column {table}.{column} is NOT NULL without a default")
    for function, result in old.functions.items():
        if function not in new.functions:
            problems.append(f"function {function} is gone")
        elif new.functions[function] != result:
            problems.append(f"function {function} now returns {new.functions[function]}, not {result}")
    return problems


async def test_each_schema_keeps_what_the_code_it_runs_used(empty_db: str, knowing: Knowing) -> None:
    """Migrated one migration at a time, each schema has every column and function of each older
    schema whose code it keeps working, with the same types; what it adds, older inserts omit."""
    schemas: dict[int, Schema] = {}
    for n in range(1, len(ALL) + 1):
        knowing(ALL[:n])
        await migrate(empty_db)
        schemas[n] = await snapshot(empty_db)
    problems = [
        f"{ALL[j - 1].version:04d} breaks the code of {ALL[i - 1].version:04d}: {problem}"
        for j in schemas
        for i in range(1, j)
        if runs_on(i, j)
        for problem in broken(schemas[i], schemas[j])
    ]
    assert problems == []
