"""The pool every Postgres store shares, and the one place that runs SQL with retries."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any, NoReturn, TypeAlias, TypeVar

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from ...errors import StoreUnavailableError
from ._retry import RetryConfig, call_with_retry, is_transient

log = logging.getLogger(__name__)

T = TypeVar("T")
# asyncpg's classes are generic only in its stubs, hence the string alias.
Conn: TypeAlias = "PoolConnectionProxy[asyncpg.Record]"
Record = asyncpg.Record
# An operation run on a pooled connection; `attempt` counts from 1 so that a write can tell a
# retry (whose first try may have committed) from a first try.
Op = Callable[[Conn, int], Awaitable[T]]


async def _keep_session(_conn: asyncpg.Connection[asyncpg.Record]) -> None:
    """Pool reset hook that sends nothing.

    asyncpg's default reset sends `RESET ALL; UNLISTEN *; ...` on every release: one extra round
    trip per operation, which alone would double the latency of a journal append. The stores use
    no session state (no SET, LISTEN, cursors or session advisory locks), and asyncpg still rolls
    back any transaction left open before this hook runs.
    """


async def create_pool(
    dsn: str,
    *,
    min_size: int,
    max_size: int,
    application_name: str,
    statement_timeout_ms: int | None,
    retry: RetryConfig | None = None,
) -> asyncpg.Pool[asyncpg.Record]:
    """A pool whose connections carry `application_name` (so operators can find them).

    Opening it is retried on transient errors: a service often starts while Postgres does.
    """
    # Every lookup the engine makes has an index. Without this, a generic plan cached while the
    # tables were small (a new database) keeps scanning tianshu_cases sequentially as it grows.
    settings = {"application_name": application_name, "enable_seqscan": "off"}
    if statement_timeout_ms is not None:
        settings["statement_timeout"] = str(int(statement_timeout_ms))

    async def attempt(_number: int) -> asyncpg.Pool[asyncpg.Record]:
        return await asyncpg.create_pool(
            dsn,
            min_size=min_size,
            max_size=max_size,
            server_settings=settings,
            reset=_keep_session,
        )

    try:
        return await call_with_retry(retry or RetryConfig(), "postgres connect", attempt, is_transient)
    except Exception as exc:
        if is_transient(exc):
            raise StoreUnavailableError(f"cannot connect to postgres: {exc!r}") from exc
        raise


class PgBackend:
    """A pool plus the retry policy: every store runs its SQL through `run`.

    Retry rules: a failure while taking a connection from the pool (nothing sent yet) is always
    retried; a failure after the statement may have reached the server is retried only when the
    operation is idempotent, because its first attempt may have committed. Operations that are
    not naturally idempotent make their retries safe by checking, on attempt > 1, whether the
    row they find is their own earlier write (see the stores' docstrings).
    """

    def __init__(self, pool: asyncpg.Pool[asyncpg.Record], retry: RetryConfig | None = None) -> None:
        self.pool = pool
        self.retry = retry or RetryConfig()
        self._closed = False

    async def run(self, what: str, op: Op[T], *, idempotent: bool = True) -> T:
        """Run `op` on a pooled connection, retrying transient failures with backoff."""
        sent = False

        async def attempt(number: int) -> T:
            nonlocal sent
            sent = False
            async with self.pool.acquire() as conn:
                sent = True
                try:
                    return await op(conn, number)
                except asyncpg.exceptions.InternalClientError as exc:
                    # A backend killed mid-statement (e.g. during type introspection on a fresh
                    # connection) can surface as "cannot switch to state N; another operation
                    # is in progress" instead of a connection error (MagicStack/asyncpg#1069).
                    # When the connection is in fact closed, report it as the dropped
                    # connection it is, so the usual transient rules apply.
                    if not conn.is_closed():
                        conn.terminate()  # its protocol state is unknown: never reuse it
                        raise
                    raise asyncpg.exceptions.ConnectionDoesNotExistError(f"connection lost: {exc}") from exc

        def retry_if(exc: BaseException) -> bool:
            return is_transient(exc) and (idempotent or not sent) and not self._closed

        try:
            return await call_with_retry(self.retry, what, attempt, retry_if)
        except Exception as exc:
            self._raise(what, exc, sent, idempotent)

    @staticmethod
    def _raise(what: str, exc: Exception, sent: bool, idempotent: bool) -> NoReturn:
        """Re-raise `exc`; a transient failure that could not be retried becomes StoreUnavailableError."""
        if not is_transient(exc):
            raise exc
        if sent and not idempotent:
            raise StoreUnavailableError(
                f"{what}: connection failed after the statement was sent, so its outcome is "
                f"unknown and it is not retried automatically: {exc!r}"
            ) from exc
        raise StoreUnavailableError(f"{what}: transient database errors persisted: {exc!r}") from exc

    async def fetch(self, what: str, sql: str, *args: Any, idempotent: bool = True) -> list[Record]:
        """All rows of `sql`."""
        return await self.run(what, lambda c, _n: c.fetch(sql, *args), idempotent=idempotent)

    async def fetchrow(self, what: str, sql: str, *args: Any, idempotent: bool = True) -> Record | None:
        """The first row of `sql`, or None."""
        return await self.run(what, lambda c, _n: c.fetchrow(sql, *args), idempotent=idempotent)

    async def fetchval(self, what: str, sql: str, *args: Any, idempotent: bool = True) -> Any:
        """The first column of the first row of `sql`."""
        return await self.run(what, lambda c, _n: c.fetchval(sql, *args), idempotent=idempotent)

    async def execute(self, what: str, sql: str, *args: Any, idempotent: bool = True) -> str:
        """Run `sql` for its effect; returns the command status."""
        return await self.run(what, lambda c, _n: c.execute(sql, *args), idempotent=idempotent)

    async def close(self, grace: float = 10.0) -> None:
        """Close the pool, waiting up to `grace` seconds for connections in use; idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            await asyncio.wait_for(self.pool.close(), grace)
        except TimeoutError:
            log.warning("postgres pool did not close within %.1fs; terminating its connections", grace)
            self.pool.terminate()
