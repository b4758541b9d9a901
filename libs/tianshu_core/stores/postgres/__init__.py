"""Postgres stores on asyncpg: every store protocol, a group-committed journal, migrations.

Open with `stores = await connect_postgres(dsn, migrate=True)`; `await stores.close()` stops the
journal flusher and closes the pool.
"""

from __future__ import annotations

import logging

from ..protocols import Stores
from . import migrate as _migrations
from ._backend import Conn, PgBackend, create_pool
from ._retry import RetryConfig, is_transient
from .cases import PostgresCaseStore, PostgresLeaseStore
from .events import PostgresEventStore
from .journal import PostgresJournalStore
from .migrate import latest_version, migrate, schema_version
from .state import PostgresSessionStore, PostgresStateStore
from .usage import PostgresUsageStore
from .waits import PostgresTimerStore, PostgresWaitStore

__all__ = [
    "PostgresCaseStore",
    "PostgresEventStore",
    "PostgresJournalStore",
    "PostgresLeaseStore",
    "PostgresSessionStore",
    "PostgresStateStore",
    "PostgresTimerStore",
    "PostgresUsageStore",
    "PostgresWaitStore",
    "RetryConfig",
    "connect_postgres",
    "is_transient",
    "latest_version",
    "migrate",
    "schema_version",
]

log = logging.getLogger(__name__)


async def connect_postgres(
    dsn: str,
    *,
    min_size: int = 1,
    max_size: int = 10,
    migrate: bool = False,
    statement_timeout_ms: int | None = None,
    application_name: str = "tianshu",
    retry: RetryConfig | None = None,
    journal_flushes: int = 4,
) -> Stores:
    """Open a pool on `dsn` and return every store on it.

    With `migrate=True` pending migrations are applied first; otherwise a database whose schema
    is missing or older raises MigrationError saying to run `tianshu db migrate`. One newer than
    this code does too, unless its newer migrations keep this code working (a rolling upgrade:
    see `migrate`). `application_name` tags the pool's connections (operators and tests find
    them by it). `journal_flushes` caps the concurrent journal group commits (each
    holds a pool connection while it runs). `Stores.close()` closes everything.
    """
    if migrate:
        await _migrations.migrate(dsn)
    pool = await create_pool(
        dsn,
        min_size=min_size,
        max_size=max_size,
        application_name=application_name,
        statement_timeout_ms=statement_timeout_ms,
        retry=retry,
    )
    db = PgBackend(pool, retry)

    async def check(conn: Conn, _attempt: int) -> None:
        _migrations.check_version(await _migrations.applied_migrations(conn))

    try:
        # Retried like every statement: a connection dropped at start (a Postgres restarting) is
        # an outage to wait out, not a crash.
        await db.run("schema check", check)
    except BaseException:
        await db.close()
        raise
    log.debug("connected to postgres (pool %d..%d, app %r)", min_size, max_size, application_name)
    return Stores(
        sessions=PostgresSessionStore(db),
        cases=PostgresCaseStore(db),
        leases=PostgresLeaseStore(db),
        journal=PostgresJournalStore(db, max_flushes=min(journal_flushes, max_size)),
        state=PostgresStateStore(db),
        waits=PostgresWaitStore(db),
        events=PostgresEventStore(db),
        timers=PostgresTimerStore(db),
        usage=PostgresUsageStore(db),
    )
