"""The `tianshu` command: database migrations and case inspection."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence
from typing import Any

import asyncpg

from . import serde
from .errors import TianshuError
from .models import CaseFilter, ExecutionState
from .settings import Settings


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tianshu", description="Tianshu: durable workflows for AI agents.")
    parser.add_argument("--database-url", help="Postgres URL (default: $TIANSHU_DATABASE_URL)")
    sub = parser.add_subparsers(dest="group", required=True)

    db = sub.add_parser("db", help="database schema").add_subparsers(dest="command", required=True)
    db.add_parser("migrate", help="apply pending migrations (safe to run concurrently)")
    db.add_parser("version", help="print the schema version")

    cases = sub.add_parser("cases", help="inspect cases").add_subparsers(dest="command", required=True)
    ls = cases.add_parser("list", help="list cases, oldest first")
    ls.add_argument("--state", choices=[s.value for s in ExecutionState])
    ls.add_argument("--workflow")
    ls.add_argument("--session")
    ls.add_argument("--limit", type=int, default=50)
    show = cases.add_parser("show", help="one case, with its error if it failed")
    show.add_argument("case_key")
    history = cases.add_parser("history", help="a case's journal: every durable effect, in order")
    history.add_argument("case_key")
    purge = cases.add_parser("purge", help="remove a case and its history")
    purge.add_argument("case_key")
    return parser


async def _run(args: argparse.Namespace, settings: Settings) -> int:
    from .stores.postgres import connect_postgres, migrate, schema_version

    url = args.database_url or settings.database_url
    if args.group == "db":
        if args.command == "migrate":
            applied = await migrate(url)
            print(f"applied migrations: {applied}" if applied else "schema is up to date")
        else:
            print(await schema_version(url))
        return 0
    stores = await connect_postgres(url, max_size=2)
    try:
        if args.command == "list":
            flt = CaseFilter(
                execution_state=ExecutionState(args.state) if args.state else None,
                workflow_code=args.workflow,
                session_id=args.session,
            )
            for case in await stores.cases.list(flt, limit=args.limit):
                print(
                    f"{case.case_key}\t{case.workflow_code}\t{case.execution_state.value}\t"
                    f"{case.lifecycle_state.value}\t{case.updated_at.isoformat()}"
                )
            return 0
        if args.command == "purge":
            await stores.cases.delete(args.case_key)
            return 0
        found = await stores.cases.get_by_key(args.case_key)
        if found is None:
            print(f"no case with key {args.case_key!r}", file=sys.stderr)
            return 1
        if args.command == "show":
            print(found.model_dump_json(indent=2))
            return 0
        for entry in await stores.journal.load(args.case_key):
            data: Any = serde.loads(entry.data)
            print(
                f"{entry.seq:>5} {entry.created_at.isoformat()} {entry.kind:<6} {entry.name} "
                f"{serde.dumps(data)[:200]}"
            )
        return 0
    finally:
        await stores.close()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `tianshu` console script."""
    args = _parser().parse_args(argv)
    try:
        return asyncio.run(_run(args, Settings()))
    except (TianshuError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
