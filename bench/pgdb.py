"""Fresh benchmark databases, and the check that commits stay durable (synchronous_commit=on).

Usage: python bench/pgdb.py BASE_URL            prints 'postgres synchronous_commit=on fsync=… …'
       python bench/pgdb.py BASE_URL NAME       drops and creates database NAME, checks
                                                synchronous_commit=on inside it, prints its URL
BASE_URL names the server (any database path in it is replaced). Exits non-zero if synchronous_commit
is not 'on' as seen by a new connection (server, database and role settings and URL options).
"""

from __future__ import annotations

import asyncio
import re
import sys
from urllib.parse import urlsplit, urlunsplit

import asyncpg


def with_database(base: str, name: str) -> str:
    """`base` with its database replaced by `name`."""
    parts = urlsplit(base)
    return urlunsplit(parts._replace(path="/" + name))


async def durable_settings(url: str) -> dict[str, str]:
    conn = await asyncpg.connect(url)
    try:
        return {
            key: str(await conn.fetchval(f"SHOW {key}"))
            for key in ("synchronous_commit", "fsync", "server_version")
        }
    finally:
        await conn.close()


def require_synchronous_commit(settings: dict[str, str], where: str) -> None:
    if settings["synchronous_commit"] != "on":
        raise SystemExit(
            f"bench: synchronous_commit={settings['synchronous_commit']} in {where}; "
            "the benchmarks compare durable commits and need it 'on'"
        )


async def recreate(base: str, name: str) -> str:
    if not re.fullmatch(r"[a-z_][a-z0-9_]*", name):
        raise SystemExit(f"bench: bad database name {name!r}")
    admin = await asyncpg.connect(with_database(base, "postgres"))
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    url = with_database(base, name)
    require_synchronous_commit(await durable_settings(url), f"database {name}")
    return url


async def main(argv: list[str]) -> None:
    if len(argv) == 1:
        settings = await durable_settings(with_database(argv[0], "postgres"))
        require_synchronous_commit(settings, "the server")
        print("postgres " + " ".join(f"{k}={v.split()[0]}" for k, v in settings.items()), flush=True)
    elif len(argv) == 2:
        print(await recreate(argv[0], argv[1]), flush=True)
    else:
        raise SystemExit(__doc__)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1:]))
