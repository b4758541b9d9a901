"""Forward-only schema migrations: numbered .sql files, each applied once, in its own transaction.

`migrate` holds a session advisory lock while it works, so several processes starting at once
apply each migration exactly once (the others wait, then find nothing left to do).

Rolling upgrades: code runs on its own schema and on a newer one whose every newer migration keeps
it working. Each migration says which code it keeps working: by default the code of the
migration before it (code one migration behind the schema runs); a `-- compatible-with: NNNN`
line names an older version. The database records it with the migration, so that code which
does not know a migration can still tell whether it may run beside it.
"""

from __future__ import annotations

import logging
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


@dataclass(frozen=True, slots=True)
class Migration:
    """One numbered schema change, and the oldest schema version whose code it keeps working."""

    version: int
    name: str
    sql: str
    compatible_with: int


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
        found.append(Migration(version, match[2], sql, compatible_with))
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


async def migrate_connection(conn: asyncpg.Connection[asyncpg.Record]) -> list[int]:
    """Apply pending migrations on `conn`; the versions applied now (empty when up to date)."""
    await conn.execute("SELECT pg_advisory_lock($1)", _LOCK_KEY)
    try:
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
                async with conn.transaction():
                    await conn.execute(migration.sql)
                    await conn.execute(
                        "INSERT INTO tianshu_schema_migrations (version, name, compatible_with)"
                        " VALUES ($1, $2, $3)",
                        migration.version,
                        migration.name,
                        migration.compatible_with,
                    )
            except asyncpg.PostgresError as exc:
                raise MigrationError(
                    f"migration {migration.version:04d}_{migration.name} failed: {exc}"
                ) from exc
            newly.append(migration.version)
        return newly
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", _LOCK_KEY)


async def _connect(dsn: str) -> asyncpg.Connection[asyncpg.Record]:
    """A dedicated connection (the session advisory lock must not go back to a pool)."""

    async def attempt(_number: int) -> asyncpg.Connection[asyncpg.Record]:
        # The same TLS rules as the pool (certificates verified whenever the URL asks for TLS).
        return await _connect_with_tls(dsn, server_settings={"application_name": "tianshu-migrate"})

    return await call_with_retry(RetryConfig(), "postgres connect (migrations)", attempt, is_transient)


async def migrate(dsn: str) -> list[int]:
    """Bring the database at `dsn` up to this code's schema; the versions applied by this call."""
    conn = await _connect(dsn)
    try:
        return await migrate_connection(conn)
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
