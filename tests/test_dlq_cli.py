"""`tianshu dlq list|show|replay` against a real nats-server and real JetStream streams.

The session's server is shared: every test writes its letters under origins of its own and lists
or replays only those (`--origin`); originals go to a stream of the test's own, which captures
`tianshu.v1.<token>.>`, or to TIANSHU_TOOLS under a tool name of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import sys
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from tests._nats import NatsServerFactory, free_port
from tianshu_contracts import DeadLetter, DeadLetterReason, ToolCallRequest, WireError, subjects
from tianshu_core import bus, cli
from tianshu_core.bus import DeadLetterSink, Delivery, NatsSettings, StreamSpec, TianshuStreams, wire_error

pytestmark = pytest.mark.nats

ROOT = Path(__file__).resolve().parent.parent
MISSING_ID = 10**12


def unique(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:10]}"


@dataclass(frozen=True)
class Done:
    returncode: int
    stdout: str
    stderr: str

    def json(self) -> Any:
        return json.loads(self.stdout)

    @property
    def lines(self) -> list[list[str]]:
        return [line.split("\t") for line in self.stdout.splitlines()]


async def tianshu(nats_url: str, *args: str) -> Done:
    """`tianshu dlq ARGS --nats-url URL`, run in this process (in a thread: it runs its own loop).

    It swaps `sys.stdout` and `sys.stderr` while it runs: never run two at once.
    """

    def run() -> Done:
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = cli.main(["dlq", *args, "--nats-url", nats_url])
            except SystemExit as exc:  # argparse
                code = exc.code if isinstance(exc.code, int) else 2
        return Done(code, out.getvalue(), err.getvalue())

    return await asyncio.to_thread(run)


async def tianshu_process(*args: str, **env: str) -> Done:
    """`python -m tianshu_core.cli ARGS` as a user runs it, with `env` added to the environment."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tianshu_core.cli",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(ROOT), **env},
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return Done(proc.returncode, out.decode(), err.decode())


async def tianshu_streams(js: JetStreamContext) -> None:
    """The Tianshu streams, created when missing; never changed (other tests may tune them)."""
    for spec in TianshuStreams().specs():
        try:
            await js.stream_info(spec.name)
        except NotFoundError:
            await bus.ensure_stream(js, spec)


@pytest.fixture
async def nc(nats_url: str) -> AsyncIterator[Client]:
    client = await bus.connect(NatsSettings(url=nats_url, startup_timeout_s=5.0), name="tianshu-tests")
    await tianshu_streams(client.jetstream())
    yield client
    await client.close()


def make_letter(
    subject: str,
    payload: str = '{"x": 1}',
    *,
    headers: dict[str, str] | None = None,
    reason: DeadLetterReason = DeadLetterReason.REFUSED,
    message: str = "it went wrong",
    at: datetime | None = None,
    truncated: bool = False,
    payload_size: int | None = None,
) -> DeadLetter:
    headers = headers or {}
    return DeadLetter(
        subject=subject,
        stream="TIANSHU_ORIGINAL",
        stream_seq=7,
        consumer="some-consumer",
        delivery_count=3,
        msg_id=headers.get(subjects.HEADER_MSG_ID),
        headers=headers,
        payload=payload,
        payload_encoding="utf-8",
        payload_size=payload_size if payload_size is not None else len(payload.encode()),
        truncated=truncated,
        reason=reason,
        error=WireError(type="HandlerError", message=message, code="handler_failed"),
        dead_lettered_at=at or datetime.now(UTC),
    )


async def put(js: JetStreamContext, letter: DeadLetter) -> int:
    """Store `letter` in the DLQ stream as a service does; its id."""
    ack = await js.publish(subjects.dead_letter(letter.subject), letter.model_dump_json().encode())
    assert ack.stream == subjects.STREAM_DLQ
    return ack.seq


@dataclass(frozen=True)
class Origin:
    """A stream of one test's own, capturing `tianshu.v1.<token>.>`, where its originals go."""

    token: str
    stream: str

    def subject(self, key: str) -> str:
        return f"{subjects.PREFIX}.{self.token}.{key}"

    async def count(self, js: JetStreamContext) -> int:
        return (await js.stream_info(self.stream)).state.messages


@pytest.fixture
async def origin(nc: Client) -> AsyncIterator[Origin]:
    token = unique("dlqtest")
    js = nc.jetstream()
    spec = StreamSpec(name=token.upper(), subjects=(f"{subjects.PREFIX}.{token}.>",), storage="memory")
    await bus.ensure_stream(js, spec)
    yield Origin(token, spec.name)
    await js.delete_stream(spec.name)


async def dead_letter(
    nc: Client, origin: Origin, key: str, payload: bytes, headers: dict[str, str] | None = None
) -> int:
    """Publish a message to `origin`, fetch it, dead-letter it with `DeadLetterSink`; the letter's id."""
    js = nc.jetstream()
    subject = origin.subject(key)
    await js.publish(subject, payload, headers=headers)
    sub = await js.pull_subscribe(subject, stream=origin.stream)
    try:
        [msg] = await sub.fetch(1, timeout=5)
        sink = DeadLetterSink(nc, refusal_subject_for=None)
        await sink.send(Delivery.of(msg), DeadLetterReason.MAX_DELIVERIES, wire_error(RuntimeError("boom")))
        await msg.ack()
    finally:
        await sub.unsubscribe()
    stored = await js.get_msg(subjects.STREAM_DLQ, subject=subjects.dead_letter(subject))
    assert stored.seq is not None
    return stored.seq


# -- list --------------------------------------------------------------------------------------------


async def test_list_filters_by_origin_and_since(nc: Client, nats_url: str) -> None:
    js = nc.jetstream()
    token = unique("dlqlist")
    now = datetime.now(UTC)
    old = make_letter(f"tianshu.v1.{token}.a.k1", at=now - timedelta(days=2))
    new = make_letter(f"tianshu.v1.{token}.a.k2", reason=DeadLetterReason.TOO_LARGE)
    loud = make_letter(f"tianshu.v1.{token}.b.k3", message="line one\nline two \x1b[31mred" + "x" * 300)
    ids = [await put(js, letter) for letter in (old, new, loud)]

    everything = await tianshu(nats_url, "list", "--origin", f"{token}.>")
    assert everything.returncode == 0, everything.stderr
    assert [line[0] for line in everything.lines] == [str(i) for i in ids]
    first = everything.lines[0]
    assert first[1:5] == [
        old.dead_lettered_at.isoformat(timespec="seconds").replace("+00:00", "Z"),
        "refused",
        "3 deliveries",
        old.subject,
    ]
    assert first[5] == "handler_failed: it went wrong"
    shortened = everything.lines[2][5]
    assert shortened.startswith("handler_failed: line one line two \\x1b[31mred") and shortened.endswith("…")
    assert len(shortened) < 120 and "\x1b" not in everything.stdout

    # With the prefix or without; a subject without a final '>' also takes those below it.
    by_prefix = await tianshu(nats_url, "list", "--origin", f"tianshu.v1.{token}.a")
    assert [line[0] for line in by_prefix.lines] == [str(ids[0]), str(ids[1])]
    by_wildcard = await tianshu(nats_url, "list", "--origin", f"{token}.*.k3")
    assert [line[0] for line in by_wildcard.lines] == [str(ids[2])]

    recent = await tianshu(nats_url, "list", "--origin", f"{token}.>", "--since", "1d")
    assert [line[0] for line in recent.lines] == [str(ids[1]), str(ids[2])]
    three_days = (now - timedelta(days=3)).isoformat().replace("+00:00", "Z")
    since_iso = await tianshu(nats_url, "list", "--origin", f"{token}.>", "--since", three_days)
    assert [line[0] for line in since_iso.lines] == [str(i) for i in ids]
    unclear = await tianshu(nats_url, "list", "--origin", f"{token}.>", "--since", "yesterday")
    assert unclear.returncode == 2 and "neither an ISO-8601 time" in unclear.stderr

    nothing = await tianshu(nats_url, "list", "--origin", f"{token}.c")
    assert (nothing.returncode, nothing.stdout, nothing.stderr) == (0, "", "no dead letters\n")
    bad = await tianshu(nats_url, "list", "--origin", f"{token}..a")
    assert bad.returncode == 2 and "is not a subject or subject pattern" in bad.stderr


async def test_list_json_is_each_letters_fields_and_its_id(nc: Client, nats_url: str) -> None:
    js = nc.jetstream()
    token = unique("dlqjson")
    letters = [make_letter(f"tianshu.v1.{token}.k{i}", headers={"X-Trace": str(i)}) for i in range(2)]
    ids = [await put(js, letter) for letter in letters]

    listed = await tianshu(nats_url, "list", "--origin", token, "--json")
    assert listed.returncode == 0, listed.stderr
    assert listed.json() == [
        {"id": i, **letter.model_dump(mode="json")} for i, letter in zip(ids, letters, strict=True)
    ]
    recent = await tianshu(nats_url, "list", "--origin", token, "--since", "10m", "--json")
    assert [row["id"] for row in recent.json()] == ids
    empty = await tianshu(nats_url, "list", "--origin", f"{token}.none", "--json")
    assert (empty.returncode, empty.json()) == (0, [])


# -- show --------------------------------------------------------------------------------------------


async def test_show_prints_the_whole_letter(nc: Client, nats_url: str) -> None:
    js = nc.jetstream()
    token = unique("dlqshow")
    payload = json.dumps({"order": "o-1", "note": "beware \x1b]0;pwned\x07"})
    letter = make_letter(
        f"tianshu.v1.{token}.k",
        payload,
        headers={"Nats-Msg-Id": "msg-1", "X-Custom": "yes"},
        reason=DeadLetterReason.SCHEMA_INVALID,
        message="bad \x1b[2J input",
    )
    letter_id = await put(js, letter)

    shown = await tianshu(nats_url, "show", str(letter_id))
    assert shown.returncode == 0, shown.stderr
    text = shown.stdout
    assert text.startswith(f"dead letter {letter_id}\n")
    for expected in (
        "reason          schema_invalid",
        f"subject         {letter.subject}",
        "from            TIANSHU_ORIGINAL seq 7, consumer some-consumer",
        "deliveries      3",
        "msg id          msg-1",
        "error           HandlerError [handler_failed]: bad \\x1b[2J input",
        "    Nats-Msg-Id: msg-1",
        "    X-Custom: yes",
        f"payload         {len(payload)} bytes, utf-8",
        '      "order": "o-1",',
    ):
        assert expected in text, (expected, text)
    assert "\x1b" not in text and "\x07" not in text and '"beware \\u001b]0;pwned\\u0007"' in text

    as_json = await tianshu(nats_url, "show", str(letter_id), "--json")
    assert as_json.returncode == 0
    assert as_json.json() == {"id": letter_id, **letter.model_dump(mode="json")}


async def test_show_of_an_unknown_id_is_a_clear_error(nc: Client, nats_url: str) -> None:
    for args in (("show", str(MISSING_ID)), ("show", str(MISSING_ID), "--json")):
        missing = await tianshu(nats_url, *args)
        assert (missing.returncode, missing.stdout) == (1, "")
        assert missing.stderr == f"no dead letter with id {MISSING_ID}\n"
    not_an_id = await tianshu(nats_url, "show", "abc")
    assert not_an_id.returncode == 2 and "'abc' is not a dead letter id" in not_an_id.stderr


# -- replay ------------------------------------------------------------------------------------------


async def test_replay_one_sends_the_original_and_deletes_the_letter(
    nc: Client, nats_url: str, origin: Origin
) -> None:
    js = nc.jetstream()
    letter_id = await dead_letter(nc, origin, "k1", b'{"n": 1}', headers={"X-Custom": "kept"})
    assert await origin.count(js) == 1

    replayed = await tianshu(nats_url, "replay", str(letter_id))
    assert replayed.returncode == 0, replayed.stderr
    [[line_id, outcome, subject, detail]] = replayed.lines
    assert (line_id, outcome, subject) == (str(letter_id), "replayed", origin.subject("k1"))
    assert detail == f"{origin.stream} seq 2"
    assert replayed.stderr == "1 replayed\n"

    sent = await js.get_msg(origin.stream, 2)
    assert (sent.subject, sent.data) == (origin.subject("k1"), b'{"n": 1}')
    assert sent.headers is not None and sent.headers["X-Custom"] == "kept"
    assert (await tianshu(nats_url, "show", str(letter_id))).returncode == 1

    again = await tianshu(nats_url, "replay", str(letter_id), "--json")
    assert again.returncode == 1
    assert again.json() == [
        {
            "id": letter_id,
            "subject": None,
            "outcome": "not_found",
            "detail": f"no dead letter with id {letter_id}",
        }
    ]
    assert await origin.count(js) == 2


async def test_replay_all_twice_sends_nothing_the_second_time(
    nc: Client, nats_url: str, origin: Origin
) -> None:
    js = nc.jetstream()
    ids = [await dead_letter(nc, origin, f"k{i}", f'{{"n": {i}}}'.encode()) for i in range(3)]
    elsewhere = await put(js, make_letter(f"tianshu.v1.{unique('dlqother')}.k"))

    first = await tianshu(nats_url, "replay", "--all", "--origin", f"{origin.token}.>", "--json")
    assert first.returncode == 0, first.stderr
    assert [(row["id"], row["outcome"]) for row in first.json()] == [(i, "replayed") for i in ids]
    assert await origin.count(js) == 6
    data = [(await js.get_msg(origin.stream, seq)).data for seq in (4, 5, 6)]
    assert data == [b'{"n": 0}', b'{"n": 1}', b'{"n": 2}']

    second = await tianshu(nats_url, "replay", "--all", "--origin", f"{origin.token}.>")
    assert (second.returncode, second.stdout, second.stderr) == (0, "", "no dead letters to replay\n")
    assert await origin.count(js) == 6
    assert (await tianshu(nats_url, "show", str(elsewhere))).returncode == 0  # not of that origin

    usage = [
        await tianshu(nats_url, *args)
        for args in (("replay",), ("replay", "1", "--all"), ("replay", "1", "--origin", "events.>"))
    ]
    assert [done.returncode for done in usage] == [2, 2, 2]
    assert "give the letters' IDs, or --all" in usage[1].stderr
    assert "--origin goes with --all" in usage[2].stderr


async def test_replay_within_the_duplicate_window_is_reported_and_keeps_the_letter(
    nc: Client, nats_url: str, origin: Origin
) -> None:
    js = nc.jetstream()
    msg_id = unique("event-")
    letter_id = await dead_letter(nc, origin, "dup", b'{"n": 1}', headers={subjects.HEADER_MSG_ID: msg_id})
    stored = await tianshu(nats_url, "show", str(letter_id), "--json")
    assert stored.json()["msg_id"] == msg_id

    text = await tianshu(nats_url, "replay", str(letter_id))
    assert text.returncode == 0, text.stderr  # not an error: nothing is lost
    [[_, outcome, _, detail]] = text.lines
    assert outcome == "duplicate" and text.stderr == "1 duplicate\n"
    assert detail == (
        f"not sent: {origin.stream} already has Nats-Msg-Id {msg_id!r} within its duplicate window "
        "(2m); the letter stays, replay it once the window has passed"
    )
    as_json = await tianshu(nats_url, "replay", str(letter_id), "--json")
    assert as_json.returncode == 0 and as_json.json()[0]["outcome"] == "duplicate"
    assert await origin.count(js) == 1
    assert (await tianshu(nats_url, "show", str(letter_id))).returncode == 0


async def test_expired_tool_call_is_refused_unless_forced(nc: Client, nats_url: str) -> None:
    js = nc.jetstream()
    tool = unique("dlqtool")
    subject = subjects.tool_call(tool)
    now = datetime.now(UTC)

    def call(deadline: datetime) -> ToolCallRequest:
        return ToolCallRequest(
            call_id=unique("call-"),
            case_key=unique("case-"),
            step="tools/1",
            tool=tool,
            tool_call_id="tc-1",
            arguments='{"q": "x"}',
            timeout_s=5.0,
            deadline=deadline,
        )

    expired_at = now - timedelta(minutes=5)
    expired, pending = call(expired_at), call(now + timedelta(hours=1))
    ids = [
        await put(
            js,
            make_letter(
                subject,
                request.model_dump_json(),
                headers={subjects.HEADER_MSG_ID: request.call_id},
                reason=reason,
            ),
        )
        # Whatever the reason it was dead-lettered for: the deadline decides.
        for request, reason in (
            (expired, DeadLetterReason.MAX_DELIVERIES),
            (pending, DeadLetterReason.REFUSED),
        )
    ]
    try:
        shown = await tianshu(nats_url, "show", str(ids[0]))
        assert "note            an expired tool call: replay refuses it unless --force" in shown.stdout

        refused = await tianshu(nats_url, "replay", *map(str, ids), "--json")
        assert refused.returncode == 1, refused.stderr
        assert [row["outcome"] for row in refused.json()] == ["refused", "replayed"]
        assert refused.json()[0]["detail"] == (
            f"expired tool call: its deadline {expired_at.isoformat()} has passed, so its case "
            "may already have been told it failed (--force sends it anyway)"
        )
        assert (await tianshu(nats_url, "show", str(ids[0]))).returncode == 0  # kept
        sent = await js.get_msg(subjects.STREAM_TOOLS, subject=subject)
        assert json.loads(sent.data or b"")["deadline"] == pending.model_dump(mode="json")["deadline"]
        await js.delete_msg(subjects.STREAM_TOOLS, sent.seq or 0)

        forced = await tianshu(nats_url, "replay", str(ids[0]), "--force")
        assert forced.returncode == 0, forced.stderr
        [[_, outcome, to, detail]] = forced.lines
        assert (outcome, to) == ("replayed", subject)
        assert detail.endswith(f" (forced: deadline {expired_at.isoformat()} cleared)")
        sent = await js.get_msg(subjects.STREAM_TOOLS, subject=subject)
        body = json.loads(sent.data or b"")
        assert body["deadline"] is None
        assert body == expired.model_dump(mode="json") | {"deadline": None}
        assert sent.headers is not None and sent.headers[subjects.HEADER_MSG_ID] == expired.call_id
        assert (await tianshu(nats_url, "show", str(ids[0]))).returncode == 1  # deleted once sent
    finally:  # leave no call of an unknown tool for a later test's runner
        with contextlib.suppress(NotFoundError):
            while True:
                last = await js.get_msg(subjects.STREAM_TOOLS, subject=subject)
                await js.delete_msg(subjects.STREAM_TOOLS, last.seq or 0)


async def test_truncated_letter_is_refused_and_unknown_ids_and_failures_reported(
    nc: Client, nats_url: str
) -> None:
    js = nc.jetstream()
    token = unique("dlqcut")
    letter = make_letter(f"tianshu.v1.{token}.big", '{"blob": "aaaa', truncated=True, payload_size=9_000_000)
    letter_id = await put(js, letter)
    nowhere = await put(js, make_letter(f"tianshu.v1.{unique('dlqnostream')}.k"))  # no stream of it

    done = await tianshu(nats_url, "replay", str(letter_id), str(MISSING_ID), str(nowhere))
    assert done.returncode == 1
    assert done.lines == [
        [
            str(letter_id),
            "refused",
            letter.subject,
            "truncated payload: the letter kept 14 of its 9000000 bytes, so it cannot be sent as it was",
        ],
        [str(MISSING_ID), "not_found", "-", f"no dead letter with id {MISSING_ID}"],
        [str(nowhere), "failed", done.lines[2][2], f"no stream captures {done.lines[2][2]}"],
    ]
    assert done.stderr == "1 refused, 1 not found, 1 failed\n"
    assert (await tianshu(nats_url, "show", str(nowhere))).returncode == 0  # kept
    forced = await tianshu(nats_url, "replay", "--all", "--origin", token, "--force", "--json")
    assert forced.returncode == 1 and forced.json()[0]["outcome"] == "refused"
    assert (await tianshu(nats_url, "show", str(letter_id))).returncode == 0


# -- NATS 2.9, and secrets ---------------------------------------------------------------------------


async def test_list_show_and_replay_work_on_nats_2_9(
    legacy_nats_server: Path, make_nats_server: NatsServerFactory
) -> None:
    server = make_nats_server(binary=legacy_nats_server)
    assert server.version()[:2] == (2, 9)
    nc = await bus.connect(NatsSettings(url=server.url))
    try:
        js = nc.jetstream()
        await bus.ensure_streams(js, TianshuStreams().specs())
        subject = subjects.event("order", "o-1")
        letter = make_letter(subject, '{"ok": true}', headers={"Nats-Msg-Id": "evt-1"})
        ids = [await put(js, letter), await put(js, make_letter(subjects.tool_call("search")))]

        listed = await tianshu(server.url, "list", "--origin", "events.order")
        assert [line[0] for line in listed.lines] == [str(ids[0])]
        assert (await tianshu(server.url, "show", str(ids[0]), "--json")).json()["subject"] == subject
        replayed = await tianshu(server.url, "replay", "--all", "--origin", "tianshu.v1.events.>")
        assert replayed.returncode == 0 and replayed.lines[0][:2] == [str(ids[0]), "replayed"]
        sent = await js.get_msg(subjects.STREAM_EVENTS, subject=subject)
        assert sent.data == b'{"ok": true}' and sent.headers == {"Nats-Msg-Id": "evt-1"}
        assert [line[0] for line in (await tianshu(server.url, "list")).lines] == [str(ids[1])]
    finally:
        await nc.close()


async def test_nats_secrets_never_appear_in_the_output(make_nats_server: NatsServerFactory) -> None:
    token = unique("right-token-")
    server = make_nats_server(token=token)
    sentinel = unique("SENTINEL-secret-")
    host = f"127.0.0.1:{server.port}"
    fast = {"TIANSHU_NATS_STARTUP_TIMEOUT_S": "1", "TIANSHU_NATS_URL": f"nats://{host}"}
    runs = await asyncio.gather(
        tianshu_process("--nats-url", f"nats://{sentinel}@{host}", "dlq", "list", **fast),
        tianshu_process("dlq", "show", "1", **(fast | {"TIANSHU_NATS_URL": f"nats://ops:{sentinel}@{host}"})),
        tianshu_process("dlq", "replay", "--all", "--json", **(fast | {"TIANSHU_NATS_TOKEN": sentinel})),
        tianshu_process(
            "dlq", "list", "--nats-url", f"nats://{sentinel}@127.0.0.1:{free_port()}", "--json", **fast
        ),
        # The right token: connected, and this server has no TIANSHU_DLQ stream.
        tianshu_process("dlq", "list", **(fast | {"TIANSHU_NATS_TOKEN": token})),
    )
    for done in runs:
        output = done.stdout + done.stderr
        assert done.returncode == 2, done
        assert done.stdout == "" and done.stderr.startswith("error: ") and len(done.stderr.splitlines()) == 1
        assert sentinel not in output and token not in output, output
        assert "Traceback" not in output
    assert "refused the connection" in runs[0].stderr and "could not reach NATS" in runs[3].stderr
    assert "there is no TIANSHU_DLQ stream on this NATS server" in runs[4].stderr
