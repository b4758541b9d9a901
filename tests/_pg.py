"""Where the test suite's Postgres comes from.

In order: the server named by ``TIANSHU_TEST_DATABASE_URL``; else a ``postgres:15`` container
when a Docker engine answers; else the embedded Postgres of `tianshu_core.local.embedded`, on its own
data directory so that a test run never stops the server a demo is using.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import warnings
from collections.abc import Iterator
from pathlib import Path

from tianshu_core.local import embedded

log = logging.getLogger(__name__)

TEST_DATABASE_URL_ENV = "TIANSHU_TEST_DATABASE_URL"
POSTGRES_IMAGE = "postgres:15"


@contextlib.contextmanager
def postgres_server() -> Iterator[str]:
    """Yield the URL of a Postgres server the tests may create and drop databases on."""
    configured = os.environ.get(TEST_DATABASE_URL_ENV)
    if configured:
        yield configured
    elif docker_answers():
        with _container() as url:
            yield url
    else:
        with _embedded() as url:
            yield url


def docker_answers() -> bool:
    """True when a Docker engine answers a ping within a few seconds."""
    try:
        import docker  # type: ignore[import-untyped]
    except ImportError:
        return False
    # With no engine the SDK leaves a socket for the garbage collector, and the suite's
    # warnings-as-errors would turn its ResourceWarning into an "unraisable exception".
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        try:
            client = docker.from_env(timeout=3)
            try:
                return bool(client.ping())
            finally:
                client.close()
        except Exception:
            return False
        finally:
            gc.collect()


@contextlib.contextmanager
def _container() -> Iterator[str]:
    try:
        from testcontainers.community.postgres import PostgresContainer
    except ImportError:  # testcontainers < 4.10
        from testcontainers.postgres import PostgresContainer  # type: ignore[no-redef, unused-ignore]

    log.info("starting a %s container for the tests", POSTGRES_IMAGE)
    with PostgresContainer(POSTGRES_IMAGE, driver=None) as container:
        yield container.get_connection_url()


def embedded_pgdata() -> Path:
    """The tests' own data directory, next to the demo's."""
    return embedded.default_pgdata().with_name("pgdata-tests")


@contextlib.contextmanager
def _embedded() -> Iterator[str]:
    server = embedded.start(embedded_pgdata())
    try:
        yield server.url
    finally:
        # Stop only a server this session started: another session may be using one it found.
        if server.started:
            embedded.stop(server.pgdata)
