"""One answer to "is this failure an outage?", for the store's retries, the engine and every
message worker; and to "did the store refuse this work for what it carries?".

A transient failure says nothing about the work itself: the same work may succeed later, once
Postgres or NATS answers again. The stores retry such failures a few times; a message worker
holds the message and tries again for as long as the outage lasts, without spending the
message's delivery budget. Anything else is the work's own fault (a value refused, a bug) and
must not be retried without end. A refusal is the clearest such fault: the store judged the
write itself (a value it cannot keep, a constraint violated), so the same write can never succeed.
"""

from __future__ import annotations

import functools
import sys

import asyncpg

from .errors import TianshuError, UnstorableValueError

# SQLSTATE classes worth retrying: 08 connection exception, 53 insufficient resources (e.g. too
# many connections), 57 operator intervention (admin shutdown, cannot connect now).
_TRANSIENT_CLASSES = ("08", "53", "57")
# 57014 is query_canceled: a statement_timeout or an explicit cancel. Running the same statement
# again would most likely time out again and only add load, so it is not retried.
_NOT_TRANSIENT = frozenset({"57014"})
# SQLSTATE classes of a statement refused for what it carries: 22 data exception (a value the
# column cannot keep: a NUL character in text or jsonb, a lone surrogate, a number out of range),
# 23 integrity constraint violation.
_REFUSED_CLASSES = ("22", "23")

# A closed connection, as asyncpg words it; "pool is closed/closing" is our own shutdown. A pooled
# connection that closes is taken back by the pool at once ("released back to the pool"): one
# kept between operations can be found that way.
_CLOSED_MARKERS = ("connection is closed", "connection was closed", "released back to the pool")


@functools.cache
def _nats_transient() -> tuple[tuple[type[BaseException], ...], type[BaseException]]:
    """NATS away, reconnecting, or too slow to answer (the message or request may go through
    later); and JetStream's API error, transient when its code is 503. Imported on first need:
    the engine alone never imports nats."""
    import nats.errors
    import nats.js.errors

    return (
        nats.errors.ConnectionClosedError,
        nats.errors.ConnectionReconnectingError,
        nats.errors.ConnectionDrainingError,
        nats.errors.NoServersError,
        nats.errors.StaleConnectionError,
        nats.errors.OutboundBufferLimitError,
        nats.errors.FlushTimeoutError,
        nats.errors.NoRespondersError,
        nats.errors.UnexpectedEOF,
        nats.js.errors.ServiceUnavailableError,
        nats.js.errors.NoStreamResponseError,
    ), nats.js.errors.APIError


# OSErrors about files, not about a peer: a handler that meets one has a bug or a bad input.
_LOCAL_OS_ERRORS: tuple[type[OSError], ...] = (
    FileNotFoundError,
    FileExistsError,
    IsADirectoryError,
    NotADirectoryError,
    PermissionError,
)


def is_transient_postgres(exc: BaseException) -> bool:
    """True for Postgres failures that say nothing about the statement itself: a retry may succeed."""
    if isinstance(exc, asyncpg.PostgresError):
        state = exc.sqlstate or ""
        return state[:2] in _TRANSIENT_CLASSES and state not in _NOT_TRANSIENT
    if isinstance(exc, asyncpg.InterfaceError):
        text = str(exc)
        return any(marker in text for marker in _CLOSED_MARKERS)
    # Dropped sockets, refused connections, connect and pool timeouts.
    return isinstance(exc, OSError | TimeoutError) and not isinstance(exc, _LOCAL_OS_ERRORS)


def is_transient(exc: BaseException) -> bool:
    """True when `exc` means Postgres or NATS is out of reach, or one of our errors says retryable
    (`StoreUnavailableError`: the store's own retries ran out). Follows one explicit cause."""
    if isinstance(exc, TianshuError):
        if exc.retryable:
            return True
        cause = exc.__cause__
        return cause is not None and cause is not exc and _is_transient_leaf(cause)
    return _is_transient_leaf(exc)


def _is_transient_leaf(exc: BaseException) -> bool:
    if isinstance(exc, TianshuError):
        return exc.retryable
    if "nats" in sys.modules:  # without it, no NATS error can have been raised
        transient, api_error = _nats_transient()
        if isinstance(exc, transient):
            return True
        if isinstance(exc, api_error):
            # 503: JetStream not ready (a server starting, no quorum); anything else is about the request.
            return getattr(exc, "code", None) == 503
    return is_transient_postgres(exc)


def is_refused(exc: BaseException) -> bool:
    """True when the store refused the work for what it carries (SQLSTATE classes 22 and 23, or a
    value the engine found it could not store): retrying the same write can never succeed."""
    if isinstance(exc, UnstorableValueError):
        return True
    if isinstance(exc, asyncpg.PostgresError):
        return (exc.sqlstate or "")[:2] in _REFUSED_CLASSES
    return False
