"""The pool every Postgres store shares, and the one place that runs SQL with retries."""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, NoReturn, TypeAlias, TypeVar
from urllib.parse import parse_qs, urlsplit

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from ...errors import StoreUnavailableError, TianshuError
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


# -- TLS --------------------------------------------------------------------------------------
#
# asyncpg follows libpq: `sslmode=require` encrypts without checking who answers (unless a root
# certificate happens to be found), and no sslmode at all means `prefer`, which tries TLS without
# verification and silently falls back to plain text. A database URL that asks for TLS should get
# an authenticated server, so Tianshu builds the TLS context itself:
#
# - no sslmode (in the URL, else PGSSLMODE), or `disable`: plain TCP, no TLS attempted;
# - `allow`, `prefer`, `require`: TLS is required, and the certificate and the host name are
#   verified (libpq's `verify-full`); no plain-text fallback;
# - `verify-full`: the same; `verify-ca`: the certificate is verified, the host name is not;
# - verification uses `sslrootcert` (or PGSSLROOTCERT), else ~/.postgresql/root.crt when it exists,
#   else the system's CA store (`sslrootcert=system` asks for the system store explicitly);
# - `sslcert`/`sslkey`/`sslpassword` (client certificates), `sslcrl` and
#   `ssl_min_protocol_version` (default TLSv1.2) are honoured as in libpq.
#
# TIANSHU_DATABASE_TLS_INSECURE=true lets `allow`/`prefer`/`require` encrypt WITHOUT verifying,
# for a development server with a self-signed certificate; it is logged as a warning on every
# connect. It never weakens `verify-ca` or `verify-full`, which ask for verification by name.

TLS_INSECURE_ENV = "TIANSHU_DATABASE_TLS_INSECURE"
_TLS_MODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")
_TRUE = frozenset({"1", "true", "yes", "on", "y", "t"})
_FALSE = frozenset({"0", "false", "no", "off", "n", "f", ""})
_TLS_VERSIONS = {
    "tlsv1": ssl.TLSVersion.TLSv1,
    "tlsv1.1": ssl.TLSVersion.TLSv1_1,
    "tlsv1.2": ssl.TLSVersion.TLSv1_2,
    "tlsv1.3": ssl.TLSVersion.TLSv1_3,
}


class PostgresTlsError(TianshuError):
    """TLS with Postgres cannot work as configured: a certificate that does not verify, a server
    without TLS, unreadable certificate files. Retrying cannot fix it; the message says what to check."""

    code = "postgres_tls"


def _tls_params(dsn: str) -> dict[str, str]:
    """The URL's TLS parameters (the last value of each), with libpq's PG* environment fallbacks."""
    query = parse_qs(urlsplit(dsn).query, keep_blank_values=True)
    params = {key: values[-1] for key, values in query.items() if values}
    for key, env in (
        ("sslmode", "PGSSLMODE"),
        ("sslrootcert", "PGSSLROOTCERT"),
        ("sslcert", "PGSSLCERT"),
        ("sslkey", "PGSSLKEY"),
        ("sslcrl", "PGSSLCRL"),
        ("ssl_min_protocol_version", "PGSSLMINPROTOCOLVERSION"),
    ):
        if key not in params and os.environ.get(env):
            params[key] = os.environ[env]
    return params


def _where(dsn: str) -> str:
    """host:port of a URL, without its user or password (for messages)."""
    netloc = urlsplit(dsn).netloc
    return netloc.rpartition("@")[2] or "(default host)"


def tls_insecure_from_env() -> bool:
    """TIANSHU_DATABASE_TLS_INSECURE as a bool (unset: False); a value that is no bool is an error."""
    raw = os.environ.get(TLS_INSECURE_ENV, "").strip().lower()
    if raw in _TRUE:
        return True
    if raw in _FALSE:
        return False
    raise PostgresTlsError(f"{TLS_INSECURE_ENV} must be true or false, not {raw!r}")


def tls_mode(dsn: str) -> str | None:
    """The sslmode the URL asks for (else PGSSLMODE), or None when neither says."""
    mode = _tls_params(dsn).get("sslmode")
    if mode is None:
        return None
    if mode not in _TLS_MODES:
        raise PostgresTlsError(f"sslmode={mode!r} in the database URL is not one of {', '.join(_TLS_MODES)}")
    return mode


def _trust_anchor(params: dict[str, str]) -> str | None:
    """The CA file to verify against, or None for the system store."""
    rootcert = params.get("sslrootcert")
    if rootcert == "system":
        return None
    if rootcert:
        return rootcert
    default = Path.home() / ".postgresql" / "root.crt"
    return str(default) if default.is_file() else None


def postgres_ssl(dsn: str, *, insecure: bool | None = None) -> ssl.SSLContext | bool:
    """What to pass as asyncpg's `ssl=` for `dsn`: False (plain TCP) or a client TLS context.

    `insecure` (None: read TIANSHU_DATABASE_TLS_INSECURE) lets allow/prefer/require skip the
    certificate check. Raises PostgresTlsError when the certificate files cannot be loaded.
    """
    mode = tls_mode(dsn)
    if mode is None or mode == "disable":
        return False
    params = _tls_params(dsn)
    for key in ("sslrootcert", "sslcert", "sslkey", "sslcrl"):
        path = params.get(key)
        if path and not (key == "sslrootcert" and path == "system") and not Path(path).is_file():
            raise PostgresTlsError(
                f"{key} in the database URL names {path}, which is not a readable file "
                f"(Postgres at {_where(dsn)})"
            )
    if insecure is None:
        insecure = tls_insecure_from_env()
    try:
        if insecure and mode not in ("verify-ca", "verify-full"):
            log.warning(
                "%s=true: TLS to Postgres at %s is encrypted but the server's certificate is NOT "
                "verified (sslmode=%s); anyone on the network path can impersonate the database. "
                "Use this only for a development server with a self-signed certificate.",
                TLS_INSECURE_ENV,
                _where(dsn),
                mode,
            )
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        else:
            if insecure:
                log.warning(
                    "%s is ignored for sslmode=%s: the database URL asks for verification",
                    TLS_INSECURE_ENV,
                    mode,
                )
            context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=_trust_anchor(params))
            context.check_hostname = mode != "verify-ca"
            context.verify_mode = ssl.CERT_REQUIRED
            if params.get("sslcrl"):
                context.load_verify_locations(cafile=params["sslcrl"])
                context.verify_flags |= ssl.VERIFY_CRL_CHECK_CHAIN
        version = params.get("ssl_min_protocol_version", "TLSv1.2").lower()
        if version not in _TLS_VERSIONS:
            raise PostgresTlsError(f"ssl_min_protocol_version={version!r} is not a TLS version")
        context.minimum_version = _TLS_VERSIONS[version]
        if params.get("sslcert"):
            password = params.get("sslpassword")
            context.load_cert_chain(params["sslcert"], params.get("sslkey") or None, password=password)
    except (OSError, ssl.SSLError) as exc:
        raise PostgresTlsError(
            f"cannot load the TLS files named in the database URL (sslrootcert, sslcert, sslkey, "
            f"sslcrl) for Postgres at {_where(dsn)}: {exc}"
        ) from exc
    return context


def _tls_failure(dsn: str, exc: BaseException) -> PostgresTlsError | None:
    """A clear, non-retryable error for a TLS failure at connect time, or None for other failures."""
    mode = tls_mode(dsn)
    if mode is None or mode == "disable":
        return None
    params = _tls_params(dsn)
    where = _where(dsn)
    if isinstance(exc, ssl.SSLCertVerificationError):
        anchor = _trust_anchor(params) or "the system's CA store"
        detail = str(exc.verify_message or exc).rstrip(".")
        if "mismatch" in detail:  # a trusted certificate, issued for another name
            hint = (
                "Connect by a name the certificate holds, or use sslmode=verify-ca to check the "
                "certificate but not the host name."
            )
        else:
            hint = "Set sslrootcert in the database URL to the CA that signed the server's certificate" + (
                f", or {TLS_INSECURE_ENV}=true to encrypt without verifying (development only)."
                if mode not in ("verify-ca", "verify-full")
                else "."
            )
        names = "" if mode == "verify-ca" else ", and its host name against the URL's"
        return PostgresTlsError(
            f"TLS with Postgres at {where} failed: the server's certificate did not verify "
            f"({detail}); it was checked against {anchor}{names} (sslmode={mode}). {hint}"
        )
    if isinstance(exc, ssl.SSLError):
        return PostgresTlsError(f"TLS with Postgres at {where} failed (sslmode={mode}): {exc}")
    if isinstance(exc, ConnectionError) and "rejected SSL upgrade" in str(exc):
        return PostgresTlsError(
            f"Postgres at {where} does not offer TLS, but the database URL asks for it "
            f"(sslmode={mode}); enable ssl on the server, or use sslmode=disable for plain text"
        )
    return None


async def connect(dsn: str, **kwargs: Any) -> asyncpg.Connection[asyncpg.Record]:
    """One connection (not pooled) with Tianshu's TLS rules; PostgresTlsError on a TLS failure."""
    try:
        return await asyncpg.connect(dsn, ssl=postgres_ssl(dsn), **kwargs)
    except (OSError, ssl.SSLError) as exc:
        failure = _tls_failure(dsn, exc)
        if failure is not None:
            raise failure from exc
        raise


async def create_pool(
    dsn: str,
    *,
    min_size: int,
    max_size: int,
    application_name: str,
    statement_timeout_ms: int | None,
    retry: RetryConfig | None = None,
    tls_insecure: bool | None = None,
) -> asyncpg.Pool[asyncpg.Record]:
    """A pool whose connections carry `application_name` (so operators can find them).

    Opening it is retried on transient errors: a service often starts while Postgres does.
    TLS follows the URL as `postgres_ssl` says (verified whenever TLS is asked for); a TLS
    failure is not retried and raises PostgresTlsError. `tls_insecure` (None: from the
    environment, TIANSHU_DATABASE_TLS_INSECURE) skips verification for sslmode=require.
    """
    tls = postgres_ssl(dsn, insecure=tls_insecure)
    # Planner settings stay the server's: the statements whose cached plans went wrong as a new
    # database grew are planned per call instead (see tianshu_append_journal, migration 0012).
    settings = {"application_name": application_name}
    if statement_timeout_ms is not None:
        settings["statement_timeout"] = str(int(statement_timeout_ms))

    async def attempt(_number: int) -> asyncpg.Pool[asyncpg.Record]:
        try:
            return await asyncpg.create_pool(
                dsn,
                min_size=min_size,
                max_size=max_size,
                server_settings=settings,
                reset=_keep_session,
                ssl=tls,
            )
        except (OSError, ssl.SSLError) as exc:
            failure = _tls_failure(dsn, exc)
            if failure is not None:
                raise failure from exc  # not transient: retrying cannot fix a certificate
            raise

    try:
        return await call_with_retry(retry or RetryConfig(), "postgres connect", attempt, is_transient)
    except Exception as exc:
        if is_transient(exc):
            raise StoreUnavailableError(f"cannot connect to postgres: {exc!r}") from exc
        raise


def _attached(conn: Conn) -> bool:
    """False for a pool proxy the pool has taken back (its connection closed): using it raises."""
    try:
        conn.is_closed()
    except asyncpg.InterfaceError:
        return False
    return True


def _idle_and_open(conn: Conn) -> bool:
    """The connection can take the next statement: attached, open, no transaction left open."""
    return _attached(conn) and not conn.is_closed() and not conn.is_in_transaction()


class PgBackend:
    """A pool plus the retry policy: every store runs its SQL through `run`.

    Retry rules: a failure while taking a connection from the pool (nothing sent yet) is always
    retried; a failure after the statement may have reached the server is retried only when the
    operation is idempotent, because its first attempt may have committed. Operations that are
    not naturally idempotent make their retries safe by checking, on attempt > 1, whether the
    row they find is their own earlier write (see the stores' docstrings).
    """

    def __init__(
        self, pool: asyncpg.Pool[asyncpg.Record], retry: RetryConfig | None = None, *, lane: int = 2
    ) -> None:
        self.pool = pool
        self.retry = retry or RetryConfig()
        self._closed = False
        # The lane: up to `lane` connections kept out of the pool between operations, reused
        # directly. asyncpg's acquire and release cost about 50 us an operation (a shielded task,
        # several loop turns): a sixth of a step's commit here. The lane is always smaller than
        # the pool, so a caller that finds it busy takes a pooled connection and never waits on it.
        self._lane = max(0, min(lane, pool.get_max_size() - 1))
        self._spare: list[Conn] = []
        self._held = 0

    async def _take(self) -> tuple[Conn, bool]:
        """A connection, and whether it belongs to the lane."""
        while self._spare:
            conn = self._spare.pop()
            if _idle_and_open(conn):
                return conn, True
            self._held -= 1  # it closed while it waited here: the pool has taken it back
            await self._release(conn)
        if self._held < self._lane:
            self._held += 1
            try:
                return await self.pool.acquire(), True
            except BaseException:
                self._held -= 1
                raise
        return await self.pool.acquire(), False

    def _pool_has_room(self) -> bool:
        """Whether the pool can serve a caller at once: an idle connection, or room for a new one.
        When it cannot, callers are queued inside it, where a connection kept in the lane would
        never reach them (a burst of runs went 12% slower so): the lane then gives its back."""
        pool = self.pool
        return pool.get_idle_size() > 0 or pool.get_size() < pool.get_max_size()

    async def _give(self, conn: Conn, in_lane: bool, clean: bool) -> None:
        """Back to the lane if it is in a known, idle state and the pool is not short of
        connections; anything else goes to the pool, which resets it or, if it is broken,
        replaces it."""
        if in_lane and clean and not self._closed and _idle_and_open(conn) and self._pool_has_room():
            self._spare.append(conn)
            return
        if in_lane:
            self._held -= 1
        await self._release(conn)

    async def _release(self, conn: Conn) -> None:
        """Back to the pool. A connection whose backend was terminated may have been taken back by
        the pool already, its proxy not yet detached: asyncpg then calls the release a second one
        ("called on a free connection holder"); there is nothing left to give back."""
        try:
            await self.pool.release(conn)
        except asyncpg.exceptions.InternalClientError:
            if _attached(conn) and not conn.is_closed():
                raise
            log.debug("a closed connection was back in the pool already")

    async def run(self, what: str, op: Op[T], *, idempotent: bool = True) -> T:
        """Run `op` on a pooled connection, retrying transient failures with backoff."""
        sent = False

        async def attempt(number: int) -> T:
            nonlocal sent
            sent = False
            conn, in_lane = await self._take()
            clean = False
            try:
                sent = True
                result = await op(conn, number)
                clean = True
                return result
            except asyncpg.exceptions.InternalClientError as exc:
                # A backend killed mid-statement (e.g. during type introspection on a fresh
                # connection) can surface as "cannot switch to state N; another operation
                # is in progress" instead of a connection error (MagicStack/asyncpg#1069).
                # When the connection is in fact closed (or the pool took it back as it
                # closed), report it as the dropped connection it is, so the usual transient
                # rules apply.
                if _attached(conn) and not conn.is_closed():
                    conn.terminate()  # its protocol state is unknown: never reuse it
                    raise
                raise asyncpg.exceptions.ConnectionDoesNotExistError(f"connection lost: {exc}") from exc
            except asyncpg.PostgresError as exc:
                # The server answered: unless it is ending the session (an admin shutdown, a
                # connection failure), the connection is sound and only the statement failed.
                clean = not is_transient(exc)
                raise
            finally:
                await asyncio.shield(self._give(conn, in_lane, clean))

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
        spare, self._spare = self._spare, []
        for conn in spare:
            self._held -= 1
            await self._release(conn)
        try:
            await asyncio.wait_for(self.pool.close(), grace)
        except TimeoutError:
            log.warning("postgres pool did not close within %.1fs; terminating its connections", grace)
            self.pool.terminate()
