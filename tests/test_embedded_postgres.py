"""The embedded Postgres: starts from an empty directory (as root too), answers asyncpg over TCP,
is reused while running, keeps its data across a restart, and stops."""

from __future__ import annotations

from pathlib import Path

import asyncpg
import pytest

from tianshu_core import embedded


def test_database_url_prefers_the_configured_server(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(embedded.DATABASE_URL_ENV, "postgresql://someone@db.example:5432/app")
    assert embedded.database_url() == "postgresql://someone@db.example:5432/app"


def test_default_pgdata_follows_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(embedded.PGDATA_ENV, str(tmp_path / "data"))
    assert embedded.default_pgdata() == tmp_path / "data"


@pytest.mark.slow
@pytest.mark.postgres
async def test_start_connect_restart_stop(tmp_path: Path) -> None:
    pgdata = tmp_path / "pgdata"
    server = embedded.start(pgdata)
    try:
        assert server.started
        assert server.url.startswith("postgresql://postgres@127.0.0.1:")
        assert (pgdata / "PG_VERSION").exists()

        again = embedded.start(pgdata)
        assert (again.port, again.pid, again.started) == (server.port, server.pid, False)

        conn = await asyncpg.connect(server.url)
        try:
            assert await conn.fetchval("SELECT 40 + 2") == 42
            await conn.execute("CREATE TABLE kept (note text); INSERT INTO kept VALUES ('durable')")
        finally:
            await conn.close()

        assert embedded.stop(pgdata)
        assert embedded.status(pgdata) is None
        assert not embedded.stop(pgdata)

        restarted = embedded.start(pgdata)
        assert restarted.started
        conn = await asyncpg.connect(restarted.url)
        try:
            assert await conn.fetchval("SELECT note FROM kept") == "durable"
        finally:
            await conn.close()
    finally:
        embedded.stop(pgdata)
    assert embedded.status(pgdata) is None
