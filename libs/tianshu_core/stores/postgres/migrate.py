"""Forward-only schema migrations: numbered .sql files, each applied once.

A migration runs in its own transaction, unless it has a `-- tianshu:concurrently` line: such a
migration builds indexes on tables that can be large (`CREATE INDEX CONCURRENTLY`, which cannot run
in a transaction and does not stop writes while it works), one statement at a time. An interrupted
concurrent build leaves an INVALID index behind; the next run finds it, drops it and builds it
again. Every statement waits at most `lock_timeout` for a lock, so a migration that meets a long
transaction fails with a clear error (run it again later) instead of queueing every query of the
busy table behind its lock request.

`migrate` holds a session advisory lock while it works, so several processes starting at once
apply each migration exactly once (the others wait, then find nothing left to do). They wait by
polling, outside any statement: a concurrent index build waits for every transaction older than
itself, and a process blocked inside `pg_advisory_lock` would be one, held up by the builder.

Rolling upgrades: code runs on its own schema and on a newer one whose every newer migration keeps
it working. Each migration says which code it keeps working: by default the code of the
migration before it (code one migration behind the schema runs); a `-- compatible-with: NNNN`
line names an older version. The database records it with the migration, so that code which
does not know a migration can still tell whether it may run beside it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from ...errors import MigrationError
from ._backend import connect as _connect_with_tls
from ._retry import RetryConfig, call_with_retry, is_transient

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).with_name("migrations")
# Any constant works; this one spells "tianshu" in a bigint so it will not collide by accident.
_LOCK_KEY = 0x7469616E736875
_FILE = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")
_COMPATIBLE = re.compile(r"^-- compatible-with: (\d{4})$", re.MULTILINE)
# `compatible_with`: the oldest schema version whose code still runs on the schema after this
# migration (NULL in rows written before the column existed: only the code of that version).
_VERSION_TABLE = """
CREATE TABLE IF NOT EXISTS tianshu_schema_migrations (
    version     integer PRIMARY KEY,
    name        text NOT NULL,
    applied_at  timestamptz NOT NULL DEFAULT now()
);
ALTER TABLE tianshu_schema_migrations ADD COLUMN IF NOT EXISTS compatible_with integer
"""
_HINT = "run `tianshu db migrate`"
_CONCURRENTLY = re.compile(r"^-- tianshu:concurrently$", re.MULTILINE)
# A concurrent migration's statements end with a semicolon at the end of a line.
_STATEMENT_END = re.compile(r";[ \t]*$", re.MULTILINE)
_CREATE_INDEX = re.compile(
    r"^\s*CREATE\s+(?:UNIQUE\s+)?INDEX\s+CONCURRENTLY\s+(?:IF\s+NOT\s+EXISTS\s+)?(\w+)", re.IGNORECASE
)
LOCK_TIMEOUT_ENV = "TIANSHU_MIGRATION_LOCK_TIMEOUT_S"
DEFAULT_LOCK_TIMEOUT_S = 10.0
_POLL_S = 0.05


@dataclass(frozen=True, slots=True)
class Migration:
    """One numbered schema change, and the oldest schema version whose code it keeps working."""

    version: int
    name: str
    sql: str
    compatible_with: int
    concurrent: bool = False
    """Applied outside a transaction, statement by statement (see the module's docstring)."""

    def statements(self) -> list[str]:
        """A concurrent migration's statements, in order, without their whole-line comments."""
        statements = []
        for chunk in _STATEMENT_END.split(self.sql):
            lines = [line for line in chunk.splitlines() if not line.lstrip().startswith("--")]
            statement = "\n".join(lines).strip()
            if statement:
                statements.append(statement)
        return statements


@cache
def known_migrations() -> tuple[Migration, ...]:
    """The migrations this code knows, by version."""
    found: list[Migration] = []
    for path in sorted(MIGRATIONS_DIR.glob("*.sql")):
        match = _FILE.match(path.name)
        if match is None:
            raise MigrationError(f"migration file {path.name!r} is not named NNNN_name.sql")
        version, sql = int(match[1]), path.read_text(encoding="utf-8")
        declared = _COMPATIBLE.search(sql)
        compatible_with = int(declared[1]) if declared else (found[-1].version if found else 0)
        if compatible_with >= version:
            # The rule: a migration keeps at least the code of the one before it working.
            raise MigrationError(
                f"migration {path.name!r}: compatible-with {compatible_with} must name an older version"
            )
        concurrent = _CONCURRENTLY.search(sql) is not None
        if concurrent and "$$" in sql:
            raise MigrationError(f"{path.name}: a concurrent migration holds plain statements only")
        found.append(Migration(version, match[2], sql, compatible_with, concurrent))
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise MigrationError(f"two migration files share a version: {versions}")
    return tuple(found)


def latest_version() -> int:
    """The schema version this code expects."""
    known = known_migrations()
    return known[-1].version if known else 0


async def applied_migrations(
    conn: asyncpg.Connection[asyncpg.Record] | PoolConnectionProxy[asyncpg.Record],
) -> dict[int, int | None]:
    """The versions recorded in the database, in order (empty when it was never migrated), each
    with the oldest version whose code it keeps working (None when not recorded)."""
    if await conn.fetchval("SELECT to_regclass('tianshu_schema_migrations')") is None:
        return {}
    # Read through to_jsonb: a database that only older code migrated lacks the column.
    rows = await conn.fetch(
        "SELECT version, (to_jsonb(m) ->> 'compatible_with')::integer FROM tianshu_schema_migrations m"
        " ORDER BY version"
    )
    return {r[0]: r[1] for r in rows}


def _check_runs_on(applied: dict[int, int | None]) -> int | None:
    """Refuse a schema with a migration this code does not know that does not keep it working;
    the schema's version when it is newer than this code (and keeps it working), else None."""
    latest = latest_version()
    newer = {v: v if c is None else c for v, c in applied.items() if v > latest}
    if not newer:
        return None
    needed = max(newer.values())
    if needed > latest:
        blocking = min(v for v, c in newer.items() if c == needed)
        raise MigrationError(
            f"the database schema is at version {max(newer)}, newer than this code knows (latest "
            f"{latest}), and its migration {blocking:04d} works only with the code of version "
            f"{needed} or later; upgrade tianshu before connecting to this database"
        )
    return max(newer)


def lock_timeout_from_env() -> float:
    """TIANSHU_MIGRATION_LOCK_TIMEOUT_S as seconds (unset: DEFAULT_LOCK_TIMEOUT_S)."""
    raw = os.environ.get(LOCK_TIMEOUT_ENV, "").strip()
    try:
        value = float(raw) if raw else DEFAULT_LOCK_TIMEOUT_S
    except ValueError:
        value = -1.0
    if value <= 0:
        raise MigrationError(f"{LOCK_TIMEOUT_ENV} must be a positive number of seconds, not {raw!r}")
    return value


async def migrate_connection(
    conn: asyncpg.Connection[asyncpg.Record], *, lock_timeout: float | None = None
) -> list[int]:
    """Apply pending migrations on `conn`; the versions applied now (empty when up to date).

    `lock_timeout`: seconds any statement may wait for a lock (None: from the environment,
    TIANSHU_MIGRATION_LOCK_TIMEOUT_S, default 10)."""
    timeout_ms = round((lock_timeout or lock_timeout_from_env()) * 1000)
    while True:  # polled: see the module's docstring
        if await conn.fetchval("SELECT pg_try_advisory_lock($1)", _LOCK_KEY):
            break
        await asyncio.sleep(_POLL_S)
    try:
        await conn.execute(f"SET lock_timeout = {timeout_ms}")
        await conn.execute(_VERSION_TABLE)
        applied = await applied_migrations(conn)
        _check_runs_on(applied)
        done = set(applied)
        newly: list[int] = []
        for migration in known_migrations():
            if migration.version in done:
                continue
            log.info("applying migration %04d_%s", migration.version, migration.name)
            try:
                if migration.concurrent:
                    await _apply_concurrently(conn, migration)
                else:
                    async with conn.transaction():
                        await conn.execute(migration.sql)
                        await _record(conn, migration)
            except asyncpg.LockNotAvailableError as exc:
                raise MigrationError(
                    f"migration {migration.version:04d}_{migration.name} waited {timeout_ms} ms for a "
                    f"lock and gave up ({exc}): a long transaction holds the table; run it again "
                    f"when it has ended (or allow more time with {LOCK_TIMEOUT_ENV})"
                ) from exc
            except asyncpg.PostgresError as exc:
                raise MigrationError(
                    f"migration {migration.version:04d}_{migration.name} failed: {exc}"
                ) from exc
            newly.append(migration.version)
        return newly
    finally:
        await conn.execute("RESET lock_timeout")
        await conn.execute("SELECT pg_advisory_unlock($1)", _LOCK_KEY)


async def _record(conn: asyncpg.Connection[asyncpg.Record], migration: Migration) -> None:
    await conn.execute(
        "INSERT INTO tianshu_schema_migrations (version, name, compatible_with) VALUES ($1, $2, $3)",
        migration.version,
        migration.name,
        migration.compatible_with,
    )


async def _apply_concurrently(conn: asyncpg.Connection[asyncpg.Record], migration: Migration) -> None:
    """Each statement on its own, outside a transaction. An index an interrupted build left
    INVALID is dropped and built again; a valid one is kept (`IF NOT EXISTS`), so running the
    migration again after a failure part way through finishes it."""
    for statement in migration.statements():
        index = _CREATE_INDEX.match(statement)
        if index is not None:
            valid = await conn.fetchval(
                "SELECT indisvalid FROM pg_index WHERE indexrelid = to_regclass($1)", index[1]
            )
            if valid is False:
                log.warning("index %s is INVALID (an interrupted build); building it again", index[1])
                await conn.execute(f'DROP INDEX CONCURRENTLY IF EXISTS "{index[1]}"')
        await conn.execute(statement)
    await _record(conn, migration)


async def _connect(dsn: str) -> asyncpg.Connection[asyncpg.Record]:
    """A dedicated connection (the session advisory lock must not go back to a pool)."""

    async def attempt(_number: int) -> asyncpg.Connection[asyncpg.Record]:
        # The same TLS rules as the pool (certificates verified whenever the URL asks for TLS).
        return await _connect_with_tls(dsn, server_settings={"application_name": "tianshu-migrate"})

    return await call_with_retry(RetryConfig(), "postgres connect (migrations)", attempt, is_transient)


async def migrate(dsn: str, *, lock_timeout: float | None = None) -> list[int]:
    """Bring the database at `dsn` up to this code's schema; the versions applied by this call.
    `lock_timeout` as in `migrate_connection`."""
    conn = await _connect(dsn)
    try:
        return await migrate_connection(conn, lock_timeout=lock_timeout)
    finally:
        await conn.close()


async def schema_version(dsn: str) -> int:
    """The newest migration applied to the database at `dsn` (0 when never migrated)."""
    conn = await _connect(dsn)
    try:
        applied = await applied_migrations(conn)
    finally:
        await conn.close()
    return max(applied, default=0)


def check_version(applied: dict[int, int | None]) -> None:
    """Raise MigrationError unless the database has every migration this code knows, and any
    newer ones keep this code working (`applied`: from `applied_migrations`)."""
    ahead = _check_runs_on(applied)
    if ahead is not None:
        log.warning(
            "the database schema is at version %d, newer than this code (%d), which its newer "
            "migrations keep working (a rolling upgrade): upgrade this process",
            ahead,
            latest_version(),
        )
    missing = [m.version for m in known_migrations() if m.version not in applied]
    if not applied:
        raise MigrationError(f"the database has no Tianshu schema; {_HINT} (or connect with migrate=True)")
    if missing:
        raise MigrationError(
            f"the database schema lacks migrations {missing} (this code needs version "
            f"{latest_version()}); {_HINT} (or connect with migrate=True)"
        )
