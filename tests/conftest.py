"""Shared fixtures: a fresh Postgres database per test session."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator

import asyncpg
import pytest


def _server_url() -> str:
    url = os.environ.get("TIANSHU_TEST_DATABASE_URL")
    if url:
        return url
    # Fallbacks (testcontainers, embedded) are added by tests/_pg.py.
    return "postgresql://postgres@127.0.0.1:5432/postgres"


def _with_database(url: str, database: str) -> str:
    base, _, _ = url.rpartition("/")
    return f"{base}/{database}"


@pytest.fixture(scope="session")
def pg_server_url() -> str:
    return _server_url()


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
def anyio_backend() -> Iterator[str]:
    yield "asyncio"
