"""The embedded Postgres: starts from an empty directory (as root too), answers asyncpg over TCP,
is reused while running, keeps its data across a restart, says that it outlives its user, and is
seen and stopped with `tianshu embedded status|stop`."""

from __future__ import annotations

import asyncio
from pathlib import Path

import asyncpg
import pytest

from tianshu_core.cli import main as cli
from tianshu_core.local import embedded


def test_database_url_prefers_the_configured_server(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(embedded.DATABASE_URL_ENV, "postgresql://someone@db.example:5432/app")
    assert embedded.database_url() == "postgresql://someone@db.example:5432/app"


def test_default_pgdata_follows_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(embedded.PGDATA_ENV, str(tmp_path / "data"))
    assert embedded.default_pgdata() == tmp_path / "data"


@pytest.mark.slow
@pytest.mark.postgres
async def test_start_connect_restart_stop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    pgdata = tmp_path / "pgdata"
    server = embedded.start(pgdata)
    try:
        assert server.started
        assert server.url.startswith("postgresql://postgres@127.0.0.1:")
        assert (pgdata / "PG_VERSION").exists()

        again = embedded.start(pgdata)
        assert (again.port, again.pid, again.started) == (server.port, server.pid, False)

        # What `make demo` and `tianshu dev` call: the URL, and on stderr what is left running.
        monkeypatch.delenv(embedded.DATABASE_URL_ENV, raising=False)
        monkeypatch.setenv(embedded.PGDATA_ENV, str(pgdata))
        capsys.readouterr()
        assert embedded.database_url() == server.url
        notice = capsys.readouterr().err
        assert f"127.0.0.1:{server.port} (pid {server.pid}, user {server.user!r}" in notice
        assert "keeps running after this program ends" in notice
        assert "`tianshu embedded stop` stops it" in notice

        assert await asyncio.to_thread(cli, ["embedded", "status"]) == 0
        shown = capsys.readouterr().out
        assert f"{server.url} pid {server.pid} user {server.user} data {pgdata}" in shown

        conn = await asyncpg.connect(server.url)
        try:
            assert await conn.fetchval("SELECT 40 + 2") == 42
            await conn.execute("CREATE TABLE kept (note text); INSERT INTO kept VALUES ('durable')")
        finally:
            await conn.close()

        assert await asyncio.to_thread(cli, ["embedded", "stop", "--pgdata", str(pgdata)]) == 0
        assert "stopped the embedded Postgres" in capsys.readouterr().out
        assert embedded.status(pgdata) is None
        assert await asyncio.to_thread(cli, ["embedded", "status", "--pgdata", str(pgdata)]) == 3
        assert "no embedded Postgres runs" in capsys.readouterr().out
        assert await asyncio.to_thread(cli, ["embedded", "stop"]) == 0
        assert "none was running" in capsys.readouterr().out
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
