"""The `tianshu` command: database migrations, case inspection, the scheduler and dead letters over NATS.

`db`, `usage` and `cases list|show|history|purge` read Postgres (`TIANSHU_DATABASE_URL`); `start`,
`events publish`, `cases cancel|pause|resume|follow` and `cases show --via-nats` go through NATS
(`TIANSHU_NATS_*`, see `NatsSettings`), the first ones to a running scheduler; `dlq
list|show|replay` reads and replays the TIANSHU_DLQ stream (see `tianshu_core.dlq`); `dev` runs the
service stack here and `embedded status|start|stop|url` minds the embedded development Postgres (both
in `tianshu_core.local`). Errors print one line, no traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import sys
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import nats.errors
from pydantic import ValidationError

from tianshu_contracts import CaseUpdated, Done, LlmStreamChunk, StreamError, TextDelta, ToolUse, UsageSummary

from . import dlq, serde
from .bus import NatsSettings, connect
from .client import SchedulerUnavailableError, TianshuClient
from .engine import Engine
from .errors import TianshuError
from .local import embedded
from .local.dev import DEFAULT_DATA_DIR, DevOptions, run_dev
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


def _positive(what: str) -> Callable[[str], int]:
    """An argparse type: a positive integer, else an error naming `what` it should be."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = 0
        if value < 1:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what} (a positive integer)")
        return value

    return parse


_letter_id = _positive("a dead letter id")
_page_size = _positive("a page size")


def _origin(text: str) -> str:
    try:
        return dlq.origin_pattern(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _since(text: str) -> datetime:
    try:
        return dlq.parse_since(text, datetime.now(UTC))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


_TIME_HELP = "ISO-8601 (UTC when it names no zone) or a duration back from now (90s, 10m, 2h, 1d)"
_ORIGIN_HELP = (
    "only letters from this original subject or subject pattern, with or without 'tianshu.v1.' "
    "(events.>, tools.calls.search, cases.*.command); one without a final '>' also takes the "
    "subjects below it"
)
_REPLAY_EPILOG = """\
Each letter's original payload is published with its original headers (Nats-Msg-Id and trace
context included) on its original subject, and the letter is deleted once JetStream has
acknowledged it. Per letter, one of:

  replayed   sent; the letter is deleted, so replaying --all twice sends nothing the second time
  duplicate  not sent: the target stream still has its Nats-Msg-Id inside its duplicate window
             (2 minutes by default); the letter stays, replay it once the window has passed
  refused    not sent: its payload was truncated (it cannot be sent as it was), or it is a tool
             call whose deadline has passed (its case may already have been told that the call
             failed; see --force)
  not_found  no letter with that id
  failed     the server did not take it (no stream captures its subject, too large, no ack)

Exit status: 0 when every letter was replayed or is a duplicate (a duplicate is reported but is
not an error: nothing was lost and the letter stays); 1 when any was refused, not found or failed;
2 when the dead letters could not be read at all (no connection, no TIANSHU_DLQ stream).
"""


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
    dev.add_argument("--gateways", type=int, default=1, help="how many LLM gateways (default 1; 0: none)")
    dev.add_argument(
        "--llm-config",
        type=Path,
        help="the LLM gateway's providers file (real models); default: the scripted model server",
    )
    dev.add_argument(
        "--nats-port", type=int, default=4222, help="port of the nats-server it starts (0: a free one)"
    )
    dev.add_argument(
        "--data-dir",
        type=Path,
        default=DEFAULT_DATA_DIR,
        help=f"NATS store and logs (default {DEFAULT_DATA_DIR})",
    )

    embedded_pg = sub.add_parser(
        "embedded",
        help="the embedded development Postgres of `make demo` and `tianshu dev`: it outlives them, "
        "runs as a system user when started by root, and is shared by every checkout on the machine",
    ).add_subparsers(dest="command", required=True)
    for name, text in (
        ("status", "show the server (port, pid, user, data directory); exit 3 when none runs"),
        ("start", "start the server (or reuse the running one) and print its URL"),
        ("stop", "stop the server; stopping one that is not running is not an error"),
        ("url", "print $TIANSHU_DATABASE_URL if set, else the server's URL, starting it if need be"),
    ):
        embedded_pg.add_parser(name, help=text).add_argument(
            "--pgdata", type=Path, help="data directory (default: $TIANSHU_EMBEDDED_PGDATA, else per user)"
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
    ls.add_argument("--limit", type=_page_size, default=50, help="cases per page (default 50)")
    ls.add_argument(
        "--cursor",
        help="the page after the one that printed this cursor (each page prints the next page's "
        "cursor on stderr; no cursor: the first page)",
    )
    show = cases.add_parser(
        "show", parents=[via_nats], help="one case, with its error if it failed and what its model calls cost"
    )
    show.add_argument("case_key")
    show.add_argument("--via-nats", action="store_true", help="ask a running scheduler, not Postgres")
    follow = cases.add_parser(
        "follow",
        parents=[via_nats],
        help="print a case's model output as it streams, and its state changes, until it ends",
    )
    follow.add_argument("case_key")
    follow.add_argument(
        "--json", action="store_true", help="one JSON object a line: each stream chunk and case update"
    )
    history = cases.add_parser("history", help="a case's journal: every durable effect, in order")
    history.add_argument("case_key")
    purge = cases.add_parser("purge", help="remove a case and its history")
    purge.add_argument("case_key")
    for verb, what in _COMMANDS.items():
        command = cases.add_parser(verb, parents=[via_nats], help=f"{what} (a message to the scheduler)")
        command.add_argument("case_key")
        command.add_argument("--reason")

    usage = sub.add_parser(
        "usage", help="tokens and estimated cost of model calls (every call, or those of the filters)"
    )
    usage.add_argument("--session", help="only the calls of this session")
    usage.add_argument("--workflow", help="only the calls of this workflow")
    usage.add_argument("--case", help="only the calls of this case")
    usage.add_argument(
        "--since", type=_since, metavar="TIME", help="only calls made since TIME: " + _TIME_HELP
    )
    usage.add_argument("--json", action="store_true", help="the sums as JSON")

    letters = sub.add_parser(
        "dlq", help="dead letters: messages that could not be handled, kept in the TIANSHU_DLQ stream"
    ).add_subparsers(dest="command", required=True)
    dl_list = letters.add_parser(
        "list",
        parents=[via_nats],
        help="list dead letters, oldest first: id, time, reason, deliveries, subject, error",
    )
    dl_list.add_argument("--origin", type=_origin, metavar="SUBJECT", help=_ORIGIN_HELP)
    dl_list.add_argument(
        "--since",
        type=_since,
        metavar="TIME",
        help="only letters dead-lettered since TIME: " + _TIME_HELP,
    )
    dl_list.add_argument("--json", action="store_true", help="a JSON array: each letter's fields and its id")
    dl_show = letters.add_parser("show", parents=[via_nats], help="one dead letter, payload included")
    dl_show.add_argument("id", type=_letter_id, help="the letter's id (its sequence in TIANSHU_DLQ)")
    dl_show.add_argument("--json", action="store_true", help="the letter's fields and its id, as JSON")
    replay = letters.add_parser(
        "replay",
        parents=[via_nats],
        help="send dead letters back to their original subjects",
        description="Send dead letters back to their original subjects.",
        epilog=_REPLAY_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    replay.add_argument("ids", nargs="*", type=_letter_id, metavar="ID", help="the letters to replay")
    replay.add_argument("--all", action="store_true", help="replay every letter (of --origin, if given)")
    replay.add_argument("--origin", type=_origin, metavar="SUBJECT", help="with --all: " + _ORIGIN_HELP)
    replay.add_argument(
        "--force",
        action="store_true",
        help="send expired tool calls too, with their deadline set to null and their headers "
        "(Nats-Msg-Id) unchanged. Careful: the tool then runs although its case may already have "
        "been told that the call failed",
    )
    replay.add_argument("--json", action="store_true", help="a JSON array of {id, subject, outcome, detail}")
    return parser


def _check(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """What argparse cannot say: `dlq replay` takes IDs or --all, and --origin only with --all."""
    if args.group == "dlq" and args.command == "replay":
        if bool(args.ids) == args.all:
            parser.error("dlq replay: give the letters' IDs, or --all")
        if args.origin is not None and not args.all:
            parser.error("dlq replay: --origin goes with --all")


def _nats_settings(args: argparse.Namespace) -> NatsSettings:
    settings = NatsSettings(url=args.nats_url) if args.nats_url else NatsSettings()
    if "startup_timeout_s" not in settings.model_fields_set:  # a person is waiting: fail sooner
        settings = settings.model_copy(update={"startup_timeout_s": _CLI_STARTUP_TIMEOUT_S})
    return settings


async def _run_nats(args: argparse.Namespace) -> int:
    async with TianshuClient.connect(_nats_settings(args)) as client:
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
        if args.command == "follow":
            return await _follow(client, args.case_key, as_json=args.json)
        if args.command == "show":
            case = await client.get_case(args.case_key)
            if case is None:
                print(f"no case with key {args.case_key!r}", file=sys.stderr)
                return 1
            print(case.model_dump_json(indent=2))
            return 0
        return await _send_command(client, args.command, args.case_key, args.reason)


async def _run_dlq(args: argparse.Namespace) -> int:
    settings = _nats_settings(args)
    nc = await connect(settings, name=settings.name or "tianshu-cli")
    try:
        letters = dlq.DeadLetters(nc, timeout_s=settings.request_timeout_s)
        if args.command == "list":
            found = await letters.list_letters(origin=args.origin, since=args.since)
            if args.json:
                print(json.dumps([stored.to_json() for stored in found], indent=2))
            elif found:
                print("\n".join(dlq.summary_line(stored) for stored in found))
            else:
                print("no dead letters", file=sys.stderr)
            return 0
        if args.command == "show":
            one = await letters.get(args.id)
            if one is None:
                print(f"no dead letter with id {args.id}", file=sys.stderr)
                return 1
            print(json.dumps(one.to_json(), indent=2) if args.json else dlq.describe(one))
            return 0
        results: list[dlq.ReplayResult] = []
        each = letters.replay_each(None if args.all else args.ids, origin=args.origin, force=args.force)
        async with contextlib.aclosing(each):
            async for result in each:
                results.append(result)
                if not args.json:  # as it goes: if the connection drops, what was done is on screen
                    print(dlq.result_line(result), flush=True)
    finally:
        await nc.close()
    if args.json:
        print(json.dumps([result.to_json() for result in results], indent=2))
    else:
        counts = {outcome: sum(r.outcome is outcome for r in results) for outcome in dlq.Outcome}
        summary = ", ".join(f"{n} {outcome.value.replace('_', ' ')}" for outcome, n in counts.items() if n)
        print(summary or "no dead letters to replay", file=sys.stderr)
    return 0 if all(result.ok for result in results) else 1


def _usd(amount: float) -> str:
    return f"{amount:.6f}" if 0 < amount < 0.01 else f"{amount:.4f}"


def _usage_table(summary: UsageSummary) -> str:
    """The sums as two aligned columns."""
    rows = [
        ("calls", f"{summary.calls:,}"),
        ("attempts", f"{summary.attempts:,}"),
        ("input tokens", f"{summary.input_tokens:,}"),
        ("output tokens", f"{summary.output_tokens:,}"),
        ("cache read tokens", f"{summary.cache_read_tokens:,}"),
        ("cache write tokens", f"{summary.cache_write_tokens:,}"),
        ("cost (USD)", _usd(summary.cost_usd)),
    ]
    width = max(len(value) for _, value in rows)
    return "\n".join(f"{name:<20}{value:>{width}}" for name, value in rows)


class _Printer:
    """`cases follow` as text: deltas as they come, everything else a line of its own."""

    def __init__(self) -> None:
        self._mid_line = False
        self._call: tuple[str, int] | None = None

    def _write(self, text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()
        if text:
            self._mid_line = not text.endswith("\n")

    def line(self, text: str) -> None:
        self._write(("\n" if self._mid_line else "") + text + "\n")

    def chunk(self, chunk: LlmStreamChunk) -> None:
        call = (chunk.call_id, chunk.attempt)
        if call != self._call:
            if self._call is None or self._call[0] != chunk.call_id:
                self.line(f"[model call {chunk.call_id}]")
            if chunk.attempt > 1:
                self.line(f"[attempt {chunk.attempt}]")
            self._call = call
        event = chunk.event
        if isinstance(event, TextDelta):
            self._write(event.text)
        elif isinstance(event, ToolUse):
            self.line(f"[tool call: {event.call.name} {event.call.arguments}]")
        elif isinstance(event, Done):
            self.line(f"[done: {event.finish_reason or 'unknown'}]")
        elif isinstance(event, StreamError):
            dropped = f"; the partial text of attempt {chunk.attempt} is dropped" if event.incomplete else ""
            self.line(f"[stream error: {event.error_class.value}{dropped}]")

    def update(self, update: CaseUpdated) -> None:
        self.line(f"[case {update.execution_state}, {update.lifecycle_state}]")


async def _follow(client: TianshuClient, case_key: str, *, as_json: bool) -> int:
    """Print what `TianshuClient.follow` yields; 0 when the case finished, else 1."""
    printer = _Printer()
    last: CaseUpdated | None = None
    async with contextlib.aclosing(client.follow(case_key)) as items:
        async for item in items:
            if as_json:
                print(item.model_dump_json(), flush=True)
            elif isinstance(item, LlmStreamChunk):
                printer.chunk(item)
            else:
                printer.update(item)
            if isinstance(item, CaseUpdated):
                last = item
    ok = last is not None and last.execution_state == "finished" and last.lifecycle_state != "stop"
    return 0 if ok else 1


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


def _run_embedded(args: argparse.Namespace) -> int:
    """`tianshu embedded status|start|stop|url`; 3 from `status` when no server runs, as pg_ctl does."""
    if args.command == "status":
        server = embedded.status(args.pgdata)
        if server is None:
            print(f"no embedded Postgres runs on {args.pgdata or embedded.default_pgdata()}")
            return 3
        print(
            f"running: {server.url} pid {server.pid} user {server.user} data {server.pgdata}\n"
            "It is shared by every checkout on this machine that uses this data directory; "
            "`tianshu embedded stop` stops it."
        )
    elif args.command == "stop":
        stopped = embedded.stop(args.pgdata)
        where = args.pgdata or embedded.default_pgdata()
        print(f"stopped the embedded Postgres on {where}" if stopped else f"none was running on {where}")
    elif args.command == "url" and args.pgdata is None:
        print(embedded.database_url())
    else:
        print(embedded.start(args.pgdata).url)
    return 0


async def _run(args: argparse.Namespace, settings: Settings) -> int:
    if args.group == "dev":
        if args.runners < 0 or args.gateways < 0:
            raise TianshuError("--runners and --gateways cannot be negative")
        if args.llm_config is not None and not args.llm_config.is_file():
            raise TianshuError(f"--llm-config: no file {args.llm_config}")
        options = DevOptions(
            database_url=args.database_url,
            nats_url=args.nats_url,
            workflows=args.workflows,
            tools=args.tools,
            runners=args.runners,
            gateways=args.gateways,
            llm_config=args.llm_config,
            nats_port=args.nats_port,
            data_dir=args.data_dir,
        )
        return await run_dev(options)
    if args.group == "dlq":
        return await _run_dlq(args)
    if args.group == "embedded":
        return await asyncio.to_thread(_run_embedded, args)
    command = getattr(args, "command", None)  # `usage` has none
    if (
        args.group in ("start", "events")
        or command in (*_COMMANDS, "follow")
        or getattr(args, "via_nats", False)
    ):
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
        if args.group == "usage":
            summary = await stores.usage.summary(
                case_key=args.case, session_id=args.session, workflow_code=args.workflow, since=args.since
            )
            print(summary.model_dump_json(indent=2) if args.json else _usage_table(summary))
            return 0
        if args.command == "list":
            flt = CaseFilter(
                execution_state=ExecutionState(args.state) if args.state else None,
                workflow_code=args.workflow,
                session_id=args.session,
            )
            page = await Engine(stores).list_cases(flt, limit=args.limit, cursor=args.cursor)
            for case in page.cases:
                print(
                    f"{case.case_key}\t{case.workflow_code}\t{case.execution_state.value}\t"
                    f"{case.lifecycle_state.value}\t{case.updated_at.isoformat()}"
                )
            # On stderr, so that stdout stays one case per line for scripts.
            if page.next_cursor is not None:
                print(f"next page: --cursor {page.next_cursor}", file=sys.stderr)
            return 0
        if args.command == "purge":
            await stores.cases.delete(args.case_key)
            return 0
        found = await stores.cases.get_by_key(args.case_key)
        if found is None:
            print(f"no case with key {args.case_key!r}", file=sys.stderr)
            return 1
        if args.command == "show":
            shown = found.model_dump(mode="json")
            used = await stores.usage.summary(case_key=found.case_key)
            if used.calls:
                shown["usage"] = used.model_dump(mode="json")
            print(json.dumps(shown, indent=2, ensure_ascii=False))
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
    parser = _parser()
    args = parser.parse_args(argv)
    _check(parser, args)
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
