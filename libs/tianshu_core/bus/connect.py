"""Connecting to NATS: fail fast at start-up, reconnect forever afterwards.

At start-up a server that refuses the credentials or fails TLS verification is an operator's
mistake: `connect` raises `NatsStartupError` at once with a message that says what to check (and no
secret). A server that cannot be reached is retried for `startup_timeout_s` (compose may start it
after us). Once connected, the client reconnects without limit, and logs each disconnection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import nats.errors
from nats.aio.client import Client

from .errors import NatsStartupError
from .settings import NatsSettings

log = logging.getLogger(__name__)

_AUTH_MARKERS = ("authorization violation", "authentication", "authorization", "user credentials")


def redact(url: str) -> str:
    """A URL with its user and password removed, for logs and error messages."""
    parts = urlsplit(url if "://" in url else f"nats://{url}")
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit(parts._replace(netloc=netloc))


def tls_context(settings: NatsSettings) -> ssl.SSLContext | None:
    """A client TLS context that verifies the server (CA file or system store), or None for plain TCP."""
    if not settings.wants_tls:
        return None
    cafile = str(settings.tls_ca_file) if settings.tls_ca_file is not None else None
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=cafile)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if settings.tls_cert_file is not None and settings.tls_key_file is not None:
        context.load_cert_chain(str(settings.tls_cert_file), str(settings.tls_key_file))
    return context


def _auth_method(settings: NatsSettings) -> str:
    if settings.creds_file is not None:
        return "the credentials file in TIANSHU_NATS_CREDS_FILE"
    if settings.nkey_seed_file is not None:
        return "the NKey seed in TIANSHU_NATS_NKEY_SEED_FILE"
    if settings.token is not None or settings.token_file is not None:
        return "the token in TIANSHU_NATS_TOKEN (or TIANSHU_NATS_TOKEN_FILE)"
    if settings.user is not None:
        return "the user TIANSHU_NATS_USER and its password (TIANSHU_NATS_PASSWORD or _FILE)"
    if any(urlsplit(u).username for u in settings.servers):
        return "the user and password in TIANSHU_NATS_URL"
    return "no credentials (none are configured)"


def _fatal_hint(exc: BaseException, settings: NatsSettings, where: str) -> str | None:
    """A message for an error that retrying cannot fix, or None when it may be transient."""
    if isinstance(exc, ssl.SSLError):
        ca = settings.tls_ca_file or "the system's CA store (set TIANSHU_NATS_TLS_CA_FILE)"
        return (
            f"TLS with NATS at {where} failed ({_describe(exc)}); "
            f"the server's certificate was checked against {ca}"
        )
    if isinstance(exc, nats.errors.SecureConnRequiredError | nats.errors.SecureConnFailedError):
        return f"NATS at {where} requires TLS; set TIANSHU_NATS_TLS_CA_FILE (or TIANSHU_NATS_TLS=true)"
    if isinstance(exc, nats.errors.SecureConnWantedError):
        return f"TLS was asked for, but NATS at {where} does not offer it"
    text = str(exc).lower()
    if isinstance(exc, nats.errors.AuthorizationError | nats.errors.InvalidUserCredentialsError) or any(
        marker in text for marker in _AUTH_MARKERS
    ):
        return (
            f"NATS at {where} refused the connection ({_describe(exc)}) when authenticating with "
            f"{_auth_method(settings)}; check it"
        )
    return None


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().removeprefix("nats: ").strip("'")
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _check_files(settings: NatsSettings) -> None:
    for variable, path in (
        ("TIANSHU_NATS_PASSWORD_FILE", settings.password_file),
        ("TIANSHU_NATS_TOKEN_FILE", settings.token_file),
        ("TIANSHU_NATS_CREDS_FILE", settings.creds_file),
        ("TIANSHU_NATS_NKEY_SEED_FILE", settings.nkey_seed_file),
        ("TIANSHU_NATS_TLS_CA_FILE", settings.tls_ca_file),
        ("TIANSHU_NATS_TLS_CERT_FILE", settings.tls_cert_file),
        ("TIANSHU_NATS_TLS_KEY_FILE", settings.tls_key_file),
    ):
        if path is not None and not path.is_file():
            raise NatsStartupError(f"{variable} names {path}, which is not a readable file")


async def connect(settings: NatsSettings | None = None, *, name: str | None = None) -> Client:
    """Connect to NATS; `NatsStartupError` when that cannot work, endless reconnects once it did."""
    settings = settings or NatsSettings()
    _check_files(settings)
    where = ", ".join(redact(u) for u in settings.servers)
    try:
        context = tls_context(settings)
    except (OSError, ssl.SSLError) as exc:
        raise NatsStartupError(f"cannot load the TLS files for NATS: {_describe(exc)}") from exc

    loop = asyncio.get_running_loop()
    fatal: asyncio.Future[object] = loop.create_future()
    last_error: list[BaseException] = []
    connected = False
    reported_outage = False

    async def on_error(exc: Exception) -> None:
        nonlocal reported_outage
        if not connected:
            last_error[:] = [exc]
            hint = _fatal_hint(exc, settings, where)
            if hint is not None and not fatal.done():
                fatal.set_result(hint)
            log.debug("NATS start-up attempt failed: %s", _describe(exc))
        elif not reported_outage:
            reported_outage = True
            log.warning("NATS error: %s", _describe(exc))
        else:
            log.debug("NATS error: %s", _describe(exc))

    async def on_disconnected() -> None:
        if connected and not nc.is_closed:
            log.warning("disconnected from NATS; reconnecting (without limit)")

    async def on_reconnected() -> None:
        nonlocal reported_outage
        reported_outage = False
        url = nc.connected_url
        log.info("reconnected to NATS at %s", redact(url.geturl()) if url is not None else where)

    async def on_closed() -> None:
        if connected:
            log.info("NATS connection closed")

    async def on_lame_duck() -> None:
        log.warning("the NATS server entered lame duck mode; will move to another server")

    options: dict[str, Any] = {
        "servers": settings.servers,
        "name": name or settings.name,
        "error_cb": on_error,
        "disconnected_cb": on_disconnected,
        "reconnected_cb": on_reconnected,
        "closed_cb": on_closed,
        "lame_duck_mode_cb": on_lame_duck,
        "allow_reconnect": True,
        "max_reconnect_attempts": -1,
        "connect_timeout": settings.connect_timeout_s,
        "reconnect_time_wait": settings.reconnect_time_wait_s,
        "ping_interval": settings.ping_interval_s,
        "drain_timeout": settings.drain_timeout_s,
        "tls": context,
        "tls_hostname": settings.tls_hostname,
        "user": settings.user,
        "password": settings.resolved_password(),
        "token": settings.resolved_token(),
        "user_credentials": str(settings.creds_file) if settings.creds_file is not None else None,
        "nkeys_seed": str(settings.nkey_seed_file) if settings.nkey_seed_file is not None else None,
    }
    nc = Client()
    attempt: asyncio.Future[object] = asyncio.ensure_future(nc.connect(**options))
    try:
        await asyncio.wait(
            {attempt, fatal}, timeout=settings.startup_timeout_s, return_when="FIRST_COMPLETED"
        )
    except asyncio.CancelledError:
        attempt.cancel()
        with contextlib.suppress(Exception):
            await nc.close()
        raise
    if attempt.done() and attempt.exception() is None:
        connected = True
        fatal.cancel()
        url = nc.connected_url
        log.info(
            "connected to NATS at %s (server %s)",
            redact(url.geturl()) if url is not None else where,
            nc.connected_server_version,
        )
        return nc

    failure = attempt.exception() if attempt.done() else None
    if failure is not None:  # nats-py gave up by itself: a bad option, or a missing package
        fatal.cancel()
        with contextlib.suppress(Exception):
            await nc.close()
        if isinstance(failure, ImportError):
            raise NatsStartupError(
                "NKey and credentials-file authentication need the nkeys package: "
                "pip install 'nats-py[nkeys]'"
            ) from failure
        raise NatsStartupError(f"cannot connect to NATS at {where}: {_describe(failure)}") from failure

    attempt.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await attempt
    with contextlib.suppress(Exception):
        await nc.close()
    if fatal.done() and not fatal.cancelled():
        raise NatsStartupError(str(fatal.result()))
    fatal.cancel()
    cause = last_error[0] if last_error else None
    detail = f": {_describe(cause)}" if cause is not None else ""
    raise NatsStartupError(
        f"could not reach NATS at {where} within {settings.startup_timeout_s:g} s{detail} "
        "(TIANSHU_NATS_URL; TIANSHU_NATS_STARTUP_TIMEOUT_S to wait longer)"
    ) from cause
