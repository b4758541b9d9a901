"""Forward-only schema migrations: numbered .sql files, each applied once, in its own transaction.

`migrate` holds a session advisory lock while it works, so several processes starting at once
apply each migration exactly once (the others wait, then find nothing left to do).
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
_VERSION_TABLE = """
CREATE TABLE IF NOT EXISTS tianshu_schema_migrations (
    version     integer PRIMARY KEY,
    name        text NOT NULL,
    applied_at  timestamptz NOT NULL DEFAULT now()
)
"""
_HINT = "run `tianshu db migrate`"


@dataclass(frozen=True, slots=True)
class Migration:
    """One numbered schema change."""

    version: int
    name: str
    sql: str


@cache
def known_migrations() -> tuple[Migration, ...]:
    """The migrations this code knows, by version."""
    found = []
    for path in sorted(MIGRATIONS_DIR.glob("*.sql")):
        match = _FILE.match(path.name)
        if match is None:
            raise MigrationError(f"migration file {path.name!r} is not named NNNN_name.sql")
        found.append(Migration(int(match[1]), match[2], path.read_text(encoding="utf-8")))
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise MigrationError(f"two migration files share a version: {versions}")
    return tuple(found)


def latest_version() -> int:
    """The schema version this code expects."""
    known = known_migrations()
    return known[-1].version if known else 0


async def applied_versions(
    conn: asyncpg.Connection[asyncpg.Record] | PoolConnectionProxy[asyncpg.Record],
) -> list[int]:
    """Versions recorded in the database (empty when it was never migrated)."""
    if await conn.fetchval("SELECT to_regclass('tianshu_schema_migrations')") is None:
        return []
    rows = await conn.fetch("SELECT version FROM tianshu_schema_migrations ORDER BY version")
    return [r[0] for r in rows]


def _check_not_newer(applied: list[int]) -> None:
    if applied and applied[-1] > latest_version():
        raise MigrationError(
            f"the database schema is at version {applied[-1]}, newer than this code knows "
            f"(latest {latest_version()}); upgrade tianshu before connecting to this database"
        )


async def migrate_connection(conn: asyncpg.Connection[asyncpg.Record]) -> list[int]:
    """Apply pending migrations on `conn`; the versions applied now (empty when up to date)."""
    await conn.execute("SELECT pg_advisory_lock($1)", _LOCK_KEY)
    try:
        await conn.execute(_VERSION_TABLE)
        applied = await applied_versions(conn)
        _check_not_newer(applied)
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
                        "INSERT INTO tianshu_schema_migrations (version, name) VALUES ($1, $2)",
                        migration.version,
                        migration.name,
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
        applied = await applied_versions(conn)
    finally:
        await conn.close()
    return applied[-1] if applied else 0


def check_version(applied: list[int]) -> None:
    """Raise MigrationError unless the database has exactly the migrations this code knows."""
    _check_not_newer(applied)
    missing = [m.version for m in known_migrations() if m.version not in set(applied)]
    if not applied:
        raise MigrationError(f"the database has no Tianshu schema; {_HINT} (or connect with migrate=True)")
    if missing:
        raise MigrationError(
            f"the database schema lacks migrations {missing} (this code needs version "
            f"{latest_version()}); {_HINT} (or connect with migrate=True)"
        )
