"""Shared fixtures: a Postgres server for the session, a fresh database on it, a private Postgres to
stop and start, the suite's duration."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Iterator
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from tests._pg import PrivatePostgres, postgres_server, private_postgres

_SESSION_START = pytest.StashKey[float]()


def pytest_configure(config: pytest.Config) -> None:
    config.stash[_SESSION_START] = time.monotonic()


@pytest.hookimpl(trylast=True)  # after pytest's own summaries, --durations included
def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, config: pytest.Config) -> None:
    started = config.stash.get(_SESSION_START, None)
    if started is not None:
        terminalreporter.write_line(f"suite duration: {time.monotonic() - started:.1f} s")


def _with_database(url: str, database: str) -> str:
    return urlunsplit(urlsplit(url)._replace(path=f"/{database}"))


@pytest.fixture(scope="session")
def pg_server_url() -> Iterator[str]:
    """A server to create databases on: TIANSHU_TEST_DATABASE_URL, else Docker, else embedded."""
    with postgres_server() as url:
        yield url


@pytest.fixture(scope="session")
async def pg_url(pg_server_url: str) -> AsyncIterator[str]:
    """URL of a fresh, empty database, dropped when the session ends."""
    name = f"tianshu_test_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(pg_server_url)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    yield _with_database(pg_server_url, name)
    admin = await asyncpg.connect(pg_server_url)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


@pytest.fixture
def private_pg() -> Iterator[PrivatePostgres]:
    """An embedded Postgres of the test's own, which it may stop and start."""
    with private_postgres() as server:
        yield server


@pytest.fixture
def anyio_backend() -> Iterator[str]:
    yield "asyncio"
