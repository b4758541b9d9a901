"""The `tianshu` command: database migrations, case inspection, and the scheduler over NATS.

`db` and `cases list|show|history|purge` read Postgres (`TIANSHU_DATABASE_URL`); `start`,
`events publish`, `cases cancel|pause|resume` and `cases show --via-nats` go through NATS
(`TIANSHU_NATS_*`, see `NatsSettings`) to a running scheduler. Errors print one line, no traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import asyncpg
import nats.errors
from pydantic import ValidationError

from . import serde
from .bus import NatsSettings
from .client import SchedulerUnavailableError, TianshuClient
from .dev import DEFAULT_DATA_DIR, DevOptions, run_dev
from .engine import Engine
from .errors import TianshuError
from .models import CaseFilter, ExecutionState
from .settings import Settings

_CLI_STARTUP_TIMEOUT_S = 5.0
_COMMANDS = {"cancel": "stop a case for good", "pause": "hold a case", "resume": "let a paused case run"}


def _json_text(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON: {exc}") from exc


def _json_file(path: str) -> Any:
    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise argparse.ArgumentTypeError(f"cannot read {path}: {exc}") from exc
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"{path} is not valid JSON: {exc}") from exc


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tianshu", description="Tianshu: durable workflows for AI agents.")
    parser.add_argument("--database-url", help="Postgres URL (default: $TIANSHU_DATABASE_URL)")
    parser.add_argument("--nats-url", help="NATS URL(s) (default: $TIANSHU_NATS_URL)")
    # Also accepted after the subcommand; SUPPRESS keeps it from resetting the top-level value.
    via_nats = argparse.ArgumentParser(add_help=False)
    via_nats.add_argument("--nats-url", default=argparse.SUPPRESS, help="NATS URL(s) (overrides the above)")
    sub = parser.add_subparsers(dest="group", required=True)

    dev = sub.add_parser(
        "dev",
        help="run the whole stack here: NATS and Postgres (yours, or embedded ones), a scheduler and "
        "tool runners, until Ctrl-C",
    )
    dev.add_argument("--workflows", default="examples.approval", help="TIANSHU_WORKFLOWS for the scheduler")
    dev.add_argument("--tools", default="examples.tools", help="TIANSHU_TOOLS for the tool runners")
    dev.add_argument("--runners", type=int, default=1, help="how many tool runners (default 1; 0: none)")
    dev.add_argument(
        "--nats-port", type=int, default=4222, help="port of the nats-server it starts (0: a free one)"
    )
    dev.add_argument(
        "--data-dir",
        type=Path,
        default=DEFAULT_DATA_DIR,
        help=f"NATS store and logs (default {DEFAULT_DATA_DIR})",
    )

    db = sub.add_parser("db", help="database schema").add_subparsers(dest="command", required=True)
    db.add_parser("migrate", help="apply pending migrations (safe to run concurrently)")
    db.add_parser("version", help="print the schema version")
    db.add_parser(
        "purge-expired",
        help="delete events older than TIANSHU_EVENT_RETENTION_S and, if TIANSHU_HISTORY_RETENTION_S "
        "is set, finished and failed cases older than that (a scheduler does this by itself)",
    )

    start = sub.add_parser("start", parents=[via_nats], help="start a case through a running scheduler")
    start.add_argument("workflow_code")
    given = start.add_mutually_exclusive_group()
    given.add_argument("--input", type=_json_text, metavar="JSON", help="the workflow's input, as JSON")
    given.add_argument(
        "--input-file", dest="input", type=_json_file, metavar="FILE", help="a JSON file ('-': stdin)"
    )
    start.add_argument("--key", help="case key (default: the scheduler makes one); idempotent on it")
    start.add_argument("--session", help="session id (default: the case key)")
    start.add_argument("--wait", action="store_true", help="wait for the outcome; exit 1 unless it finished")
    start.add_argument(
        "--timeout", type=float, metavar="SECONDS", help="with --wait: give up after this many seconds"
    )

    events = sub.add_parser("events", help="publish events").add_subparsers(dest="command", required=True)
    event = events.add_parser("publish", parents=[via_nats], help="publish an event that wakes waiting cases")
    event.add_argument("resource_type")
    event.add_argument("resource_id")
    body = event.add_mutually_exclusive_group()
    body.add_argument(
        "--payload", type=_json_text, metavar="JSON", help="the event's body, as JSON (default: null)"
    )
    body.add_argument(
        "--payload-file", dest="payload", type=_json_file, metavar="FILE", help="a JSON file ('-': stdin)"
    )
    event.add_argument(
        "--id",
        metavar="EVENT_ID",
        help="event id (Nats-Msg-Id): a repeat with the same id wakes nobody twice",
    )

    cases = sub.add_parser("cases", help="inspect cases").add_subparsers(dest="command", required=True)
    ls = cases.add_parser("list", help="list cases, oldest first")
    ls.add_argument("--state", choices=[s.value for s in ExecutionState])
    ls.add_argument("--workflow")
    ls.add_argument("--session")
    ls.add_argument("--limit", type=int, default=50)
    show = cases.add_parser("show", parents=[via_nats], help="one case, with its error if it failed")
    show.add_argument("case_key")
    show.add_argument("--via-nats", action="store_true", help="ask a running scheduler, not Postgres")
    history = cases.add_parser("history", help="a case's journal: every durable effect, in order")
    history.add_argument("case_key")
    purge = cases.add_parser("purge", help="remove a case and its history")
    purge.add_argument("case_key")
    for verb, what in _COMMANDS.items():
        command = cases.add_parser(verb, parents=[via_nats], help=f"{what} (a message to the scheduler)")
        command.add_argument("case_key")
        command.add_argument("--reason")
    return parser


async def _run_nats(args: argparse.Namespace) -> int:
    settings = NatsSettings(url=args.nats_url) if args.nats_url else NatsSettings()
    if "startup_timeout_s" not in settings.model_fields_set:  # a person is waiting: fail sooner
        settings = settings.model_copy(update={"startup_timeout_s": _CLI_STARTUP_TIMEOUT_S})
    async with TianshuClient.connect(settings) as client:
        if args.group == "start":
            accepted = await client.start_case(
                args.workflow_code, args.input, case_key=args.key, session_id=args.session
            )
            if not args.wait:
                print(accepted.model_dump_json(indent=2))
                return 0
            done = await client.wait_for_case(accepted.case_key, timeout=args.timeout)
            print(done.model_dump_json(indent=2))
            return 0 if done.execution_state == "finished" and done.lifecycle_state != "stop" else 1
        if args.group == "events":
            receipt = await client.publish_event(
                args.resource_type, args.resource_id, args.payload, event_id=args.id
            )
            print(json.dumps(dataclasses.asdict(receipt), indent=2))
            return 0
        if args.command == "show":
            case = await client.get_case(args.case_key)
            if case is None:
                print(f"no case with key {args.case_key!r}", file=sys.stderr)
                return 1
            print(case.model_dump_json(indent=2))
            return 0
        return await _send_command(client, args.command, args.case_key, args.reason)


async def _send_command(client: TianshuClient, verb: str, case_key: str, reason: str | None) -> int:
    # A command for a case that does not exist is dead-lettered silently: check first when we can.
    try:
        if await client.get_case(case_key) is None:
            print(f"no case with key {case_key!r}", file=sys.stderr)
            return 1
    except SchedulerUnavailableError as exc:
        print(f"warning: {exc}; the {verb} waits in the stream for a scheduler", file=sys.stderr)
    send = {"cancel": client.cancel, "pause": client.pause, "resume": client.resume}[verb]
    receipt = await send(case_key, reason=reason)
    print(json.dumps(dataclasses.asdict(receipt), indent=2))
    return 0


async def _run(args: argparse.Namespace, settings: Settings) -> int:
    if args.group == "dev":
        if args.runners < 0:
            raise TianshuError("--runners cannot be negative")
        options = DevOptions(
            database_url=args.database_url,
            nats_url=args.nats_url,
            workflows=args.workflows,
            tools=args.tools,
            runners=args.runners,
            nats_port=args.nats_port,
            data_dir=args.data_dir,
        )
        return await run_dev(options)
    if args.group in ("start", "events") or args.command in _COMMANDS or getattr(args, "via_nats", False):
        return await _run_nats(args)
    from .stores.postgres import connect_postgres, migrate, schema_version

    url = args.database_url or settings.database_url
    if args.group == "db":
        if args.command == "migrate":
            applied = await migrate(url)
            print(f"applied migrations: {applied}" if applied else "schema is up to date")
        elif args.command == "purge-expired":
            stores = await connect_postgres(url, max_size=2)
            try:
                purged = await Engine(stores, config=settings.engine_config()).purge_expired()
            finally:
                await stores.close()
            print(f"deleted {purged} expired events and cases")
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
    except ValidationError as exc:  # a bad setting in the environment, or a field out of bounds
        problems = "; ".join(
            # Never the input: a settings error would print the secrets with it.
            f"{'.'.join(map(str, e['loc'])) or 'value'}: {e['msg']}"
            for e in exc.errors(include_url=False, include_input=False)
        )
        print(f"error: invalid {exc.title}: {problems}", file=sys.stderr)
        return 2
    except (
        TianshuError,
        OSError,
        asyncpg.PostgresError,
        asyncpg.InterfaceError,
        nats.errors.Error,
    ) as exc:
        print(f"error: {str(exc) or type(exc).__name__}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
