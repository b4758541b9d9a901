"""Garbage on every subject the scheduler consumes: refused with a reason, never a crash.

The scheduler runs as a process against a nats-server of this test's own (8 MB max payload, and a
TIANSHU_DLQ stream that holds only what this test caused). Each bad message published on a stream
subject (`tianshu.v1.cases.start`, `tianshu.v1.cases.<key>.command`, `tianshu.v1.events.<type>.<id>`)
must come out as exactly one `DeadLetter` in TIANSHU_DLQ, naming its origin (stream and sequence),
with the expected reason and error code, and be announced as a `Refusal` on `tianshu.v1.errors.…`.
Each bad request on `tianshu.v1.rpc.…` must get a `RequestRefused` reply saying why (requests are
core NATS: nothing is stored, so the reply is where the refusal goes). Afterwards the scheduler
still runs, and good cases started after the garbage finish.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nats
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.api import RawStreamMsg

from tests._nats import NatsServer, NatsServerFactory
from tests._services import SchedulerProcess, executions
from tests.test_scheduler_scale import fresh_database
from tianshu_contracts import (
    DEAD_LETTER_ADAPTER,
    GET_CASE_REPLY_ADAPTER,
    REFUSAL_ADAPTER,
    START_CASE_REPLY_ADAPTER,
    CaseNotFound,
    DeadLetter,
    Refusal,
    RequestRefused,
    StartCaseAccepted,
    subjects,
)
from tianshu_core import Case, ExecutionState, connect_postgres

pytestmark = [pytest.mark.e2e, pytest.mark.nats, pytest.mark.postgres]

LIMIT = 1024 * 1024  # the engine's default payload limit (TIANSHU_MAX_EVENT_PAYLOAD_BYTES)
TOO_LARGE = LIMIT + 512 * 1024  # over the engine's limit, well under the server's 8 MB


def dumps(value: Any) -> bytes:
    return json.dumps(value).encode()


def start_body(**fields: Any) -> bytes:
    return dumps({"kind": "start_case", **fields})


@dataclass(frozen=True)
class Garbage:
    """One bad message, and how the scheduler must judge it."""

    name: str
    subject: str
    body: bytes
    reason: str
    """The DeadLetter's reason (or, for a request, the RequestRefused error's code when it has no
    handler-given code)."""
    code: str | None = None
    """The error code the DeadLetter / RequestRefused must carry (defaults to `reason`)."""
    headers: dict[str, str] | None = None
    says: str | None = None
    """Words the error's message must hold, where the message is what the user acts on."""

    @property
    def expected_code(self) -> str:
        return self.code or self.reason


@pytest.fixture
async def db_url(pg_server_url: str) -> AsyncIterator[str]:
    """A database of this test's own: the scheduler's sweeper would otherwise adopt (and fail, as
    unknown workflows) the runnable cases other tests leave in the session's database."""
    async with fresh_database(pg_server_url, "tianshu_bad_input") as url:
        yield url


@pytest.fixture
def nats_server_8mb(make_nats_server: NatsServerFactory) -> NatsServer:
    server = make_nats_server()
    assert server.max_payload == 8 * 1024 * 1024
    return server


@pytest.fixture
async def nc(nats_server_8mb: NatsServer) -> AsyncIterator[Client]:
    client = await nats.connect(nats_server_8mb.url)
    yield client
    await client.close()


async def case_of(url: str, key: str) -> Case | None:
    stores = await connect_postgres(url, max_size=1)
    try:
        return await stores.cases.get_by_key(key)
    finally:
        await stores.close()


async def wait_state(url: str, key: str, state: ExecutionState, within: float = 20.0) -> Case:
    deadline = time.monotonic() + within
    while True:
        case = await case_of(url, key)
        if case is not None and case.execution_state is state:
            return case
        if time.monotonic() > deadline:
            raise AssertionError(f"case {key} is not {state.value}: {case}")
        await asyncio.sleep(0.05)


async def existing_case(nc: Client, url: str, key: str) -> None:
    """A real case, waiting (so commands on it are about a case that exists)."""
    reply = await nc.request(subjects.RPC_CASES_START, start_body(workflow_code="e2e_wait", case_key=key), 10)
    assert START_CASE_REPLY_ADAPTER.validate_json(reply.data).kind == "start_case_accepted"
    await wait_state(url, key, ExecutionState.WAITING)


def stream_garbage(run: str, existing: str) -> list[Garbage]:
    """Bad messages for the four stream subjects."""
    start = subjects.CASES_START
    command = subjects.case_command(existing)
    nobody = f"nobody-{run}"
    event = f"tianshu.v1.events.order.{run}"
    deep = "[" * 5000 + "]" * 5000

    def result(case_key: str, content: str = "ok", **fields: Any) -> bytes:
        return dumps(
            {
                "kind": "tool_call_result",
                "call_id": f"call-{run}",
                "case_key": case_key,
                "step": "tool:1",
                "result": {"call_id": "m-1", "content": content, "is_error": False},
                "runner": "fuzz",
                "duration_s": 0.1,
                **fields,
            }
        )

    mine = subjects.tool_result(existing)
    return [
        # tianshu.v1.tools.results.<case_key>
        Garbage("tool result: not JSON", mine, b"result!", "undecodable"),
        Garbage("tool result: wrong types", mine, result(existing, duration_s="slow"), "schema_invalid"),
        Garbage(
            "tool result: for a case that does not exist",
            subjects.tool_result(nobody),
            result(nobody),
            "unknown_case",
        ),
        Garbage("tool result: body names another case", mine, result(nobody), "key_mismatch"),
        Garbage("tool result: NUL in its content", mine, result(existing, "a\u0000b"), "unstorable"),
        Garbage(
            "tool result: NaN duration", mine, result(existing).replace(b"0.1", b"NaN"), "not_strict_json"
        ),
        # tianshu.v1.cases.start
        Garbage("start: not JSON", start, b'{"kind": "start_case", "workflow_code": ', "undecodable"),
        Garbage("start: not UTF-8", start, b"\xff\xfe\x00garbage", "undecodable"),
        Garbage("start: empty body", start, b"", "undecodable"),
        Garbage("start: JSON but not an object", start, b"[1, 2, 3]", "schema_invalid"),
        Garbage("start: JSON null", start, b"null", "schema_invalid"),
        Garbage("start: no kind tag", start, dumps({"workflow_code": "e2e_steps"}), "schema_invalid"),
        Garbage(
            "start: wrong kind", start, dumps({"kind": "cancel_case", "case_key": "x"}), "schema_invalid"
        ),
        Garbage("start: wrong types", start, start_body(workflow_code=42, input={}), "schema_invalid"),
        Garbage(
            "start: unknown field", start, start_body(workflow_code="e2e_steps", priority=1), "schema_invalid"
        ),
        Garbage(
            "start: case key not a subject token",
            start,
            start_body(workflow_code="e2e_steps", case_key="a.b c>"),
            "schema_invalid",
        ),
        Garbage("start: nesting too deep", start, deep.encode(), "undecodable"),
        Garbage(
            "start: unknown workflow code",
            start,
            start_body(workflow_code=f"no_such_{run}"),
            "refused",
            "unknown_workflow",
        ),
        Garbage(
            "start: key of a case of another workflow",
            start,
            start_body(workflow_code="e2e_steps", case_key=existing),
            "refused",
            "case_exists",
        ),
        Garbage(
            "start: NUL in the input (Postgres cannot store it)",
            start,
            start_body(workflow_code="e2e_steps", input={"text": "a\u0000b"}),
            "unstorable",
        ),
        Garbage(
            "start: NUL in the session id",
            start,
            start_body(workflow_code="e2e_steps", session_id="s\u0000"),
            "unstorable",
        ),
        Garbage(
            "start: integer over 64 bits in the input",
            start,
            start_body(workflow_code="e2e_steps", input={"n": 123456789012345678901234567890}),
            "unstorable",
            "unstorable_value",
        ),
        Garbage(
            "start: over the size limit",
            start,
            start_body(workflow_code="e2e_steps", input="x" * TOO_LARGE),
            "too_large",
        ),
        # tianshu.v1.cases.<key>.command
        Garbage("command: not JSON", command, b"cancel!", "undecodable"),
        Garbage(
            "command: unknown kind",
            command,
            dumps({"kind": "explode_case", "case_key": existing}),
            "schema_invalid",
        ),
        Garbage(
            "command: wrong types", command, dumps({"kind": "cancel_case", "case_key": 7}), "schema_invalid"
        ),
        Garbage(
            "command: unknown field",
            command,
            dumps({"kind": "pause_case", "case_key": existing, "force": True}),
            "schema_invalid",
        ),
        Garbage(
            "command: body disagrees with its subject",
            command,
            dumps({"kind": "cancel_case", "case_key": nobody}),
            "key_mismatch",
        ),
        Garbage(
            "command: unknown case key",
            subjects.case_command(nobody),
            dumps({"kind": "cancel_case", "case_key": nobody}),
            "unknown_case",
        ),
        Garbage(
            "command: case key in the subject not a plain token",
            "tianshu.v1.cases.bad~key.command",
            dumps({"kind": "cancel_case", "case_key": existing}),
            "refused",
            "bad_subject",
        ),
        Garbage(
            "command: over the size limit",
            command,
            dumps({"kind": "cancel_case", "case_key": existing, "reason": "x" * TOO_LARGE}),
            "too_large",
        ),
        # tianshu.v1.events.<type>.<id> (the body is any JSON, so only non-JSON and size are bad)
        Garbage("event: not JSON", event, b"{'single': 'quotes'}", "undecodable"),
        Garbage("event: truncated JSON", event, b'{"paid": 4', "undecodable"),
        Garbage("event: not UTF-8", event, b'"\xc3\x28"', "undecodable"),
        Garbage("event: nesting too deep", event, deep.encode(), "undecodable"),
        Garbage("event: NUL in a string", event, dumps({"text": "a\u0000b"}), "unstorable"),
        Garbage("event: NUL in a key", event, dumps({"\u0000": 1}), "unstorable"),
        # Strict JSON: Python's json reads these, RFC 8259 does not allow them.
        Garbage("event: NaN", event, b"NaN", "not_strict_json"),
        Garbage("event: -Infinity", event, b"-Infinity", "not_strict_json"),
        Garbage("event: NaN in an object", event, b'{"x": NaN}', "not_strict_json"),
        Garbage("event: number beyond a double", event, b'{"x": 1e400}', "unstorable"),
        Garbage(
            "start: NaN in the input",
            start,
            b'{"kind": "start_case", "workflow_code": "e2e_steps", "input": {"x": NaN}}',
            "not_strict_json",
        ),
        Garbage(
            "command: Infinity in a field",
            command,
            b'{"kind": "cancel_case", "case_key": "x", "reason": Infinity}',
            "not_strict_json",
        ),
        Garbage(
            "event: integer over 64 bits",
            event,
            b'{"n": 123456789012345678901234567890}',
            "unstorable",
            "unstorable_value",
        ),
        Garbage("event: over the size limit", event, dumps({"blob": "x" * TOO_LARGE}), "too_large"),
        Garbage("event: no resource id", "tianshu.v1.events.order", b"{}", "refused", "bad_subject"),
        Garbage("event: too many tokens", f"{event}.extra", b"{}", "refused", "bad_subject"),
        Garbage(
            "event: undecodable resource id", "tianshu.v1.events.order.~%%%", b"{}", "refused", "bad_subject"
        ),
        Garbage(
            "event: resource type not plain", "tianshu.v1.events.or~der.x", b"{}", "refused", "bad_subject"
        ),
        Garbage(
            "event: plain resource id over 200 characters",
            "tianshu.v1.events.order." + "x" * 201,
            b"{}",
            "refused",
            "bad_subject",
            says="201 characters, over the limit of 200",
        ),
    ]


def rpc_garbage(run: str, existing: str) -> list[Garbage]:
    """Bad requests (`reason` is the RequestRefused error code here)."""
    start, get = subjects.RPC_CASES_START, subjects.RPC_CASES_GET
    return [
        Garbage("rpc start: not JSON", start, b"start please", "undecodable"),
        Garbage("rpc start: not UTF-8", start, b"\x80\x81", "undecodable"),
        Garbage("rpc start: wrong types", start, start_body(workflow_code=["e2e_steps"]), "schema_invalid"),
        Garbage(
            "rpc start: unknown field", start, start_body(workflow_code="e2e_steps", x=1), "schema_invalid"
        ),
        Garbage("rpc start: no kind tag", start, dumps({"workflow_code": "e2e_steps"}), "schema_invalid"),
        Garbage(
            "rpc start: unknown workflow", start, start_body(workflow_code=f"nope_{run}"), "unknown_workflow"
        ),
        Garbage(
            "rpc start: key of a case of another workflow",
            start,
            start_body(workflow_code="e2e_steps", case_key=existing),
            "case_exists",
        ),
        Garbage(
            "rpc start: NUL in the input",
            start,
            start_body(workflow_code="e2e_steps", input="\u0000"),
            "unstorable_value",
        ),
        Garbage(
            "rpc start: over the size limit",
            start,
            start_body(workflow_code="e2e_steps", input="x" * TOO_LARGE),
            "too_large",
        ),
        Garbage("rpc get: not JSON", get, b"\x00\x01", "undecodable"),
        Garbage("rpc get: wrong types", get, dumps({"kind": "get_case", "case_key": None}), "schema_invalid"),
        Garbage(
            "rpc get: unknown field",
            get,
            dumps({"kind": "get_case", "case_key": existing, "all": 1}),
            "schema_invalid",
        ),
        Garbage("rpc get: bad key", get, dumps({"kind": "get_case", "case_key": "a b"}), "schema_invalid"),
        Garbage(
            "rpc get: over the size limit",
            get,
            dumps({"kind": "get_case", "case_key": "x" * TOO_LARGE}),
            "too_large",
        ),
    ]


async def dead_letters(nc: Client, expected: int, within: float = 60.0) -> list[RawStreamMsg]:
    """Every message of TIANSHU_DLQ, once it holds `expected` (and then a moment more, to catch extras)."""
    js = nc.jetstream()
    deadline = time.monotonic() + within
    while True:
        info = await js.stream_info(subjects.STREAM_DLQ)
        if info.state.messages >= expected:
            break
        if time.monotonic() > deadline:
            raise AssertionError(f"TIANSHU_DLQ holds {info.state.messages} dead letters, not {expected}")
        await asyncio.sleep(0.1)
    await asyncio.sleep(1.0)
    info = await js.stream_info(subjects.STREAM_DLQ)
    return [await js.get_msg(subjects.STREAM_DLQ, seq) for seq in range(1, info.state.last_seq + 1)]


async def test_garbage_on_every_subject_is_refused_with_a_reason_and_the_scheduler_carries_on(
    tmp_path: Path, db_url: str, nats_server_8mb: NatsServer, nc: Client
) -> None:
    run = uuid.uuid4().hex[:8]
    existing = f"bad-input-{run}"
    js = nc.jetstream()
    refusals: list[Refusal] = []
    all_refused = asyncio.Event()
    garbage = stream_garbage(run, existing)

    async def on_refusal(msg: Msg) -> None:
        refusals.append(REFUSAL_ADAPTER.validate_json(msg.data))
        if len({r.msg_id for r in refusals}) >= len(garbage):
            all_refused.set()

    await nc.subscribe(subjects.ERRORS, cb=on_refusal)

    with SchedulerProcess(tmp_path, db_url, nats_server_8mb.url) as sched:
        await existing_case(nc, db_url, existing)

        # Stream subjects: publish every bad message, remember where the stream put it.
        origin: dict[tuple[str, int], Garbage] = {}
        for item in garbage:
            ack = await js.publish(item.subject, item.body, headers={"Nats-Msg-Id": f"{run}-{item.name}"})
            origin[(ack.stream, ack.seq)] = item

        # Requests: each gets a RequestRefused saying why.
        for item in rpc_garbage(run, existing):
            reply = await nc.request(item.subject, item.body, timeout=10)
            adapter = (
                START_CASE_REPLY_ADAPTER
                if item.subject == subjects.RPC_CASES_START
                else GET_CASE_REPLY_ADAPTER
            )
            answer = adapter.validate_json(reply.data)
            assert isinstance(answer, RequestRefused), (item.name, answer)
            assert answer.error.code == item.expected_code, (item.name, answer.error)
            assert answer.error.message, item.name
            assert not answer.error.retryable, (item.name, answer.error)
        # A request nobody can answer (no reply subject) is dropped, and does no harm.
        await nc.publish(subjects.RPC_CASES_START, b"fire and forget")
        # A get for an unknown case is an answer, not a refusal.
        reply = await nc.request(
            subjects.RPC_CASES_GET, dumps({"kind": "get_case", "case_key": f"none-{run}"}), 10
        )
        assert isinstance(GET_CASE_REPLY_ADAPTER.validate_json(reply.data), CaseNotFound)

        # Every stream message is dead-lettered once, with its reason, origin and body.
        letters = await dead_letters(nc, len(garbage))
        assert len(letters) == len(garbage), [m.subject for m in letters]
        seen: set[tuple[str, int]] = set()
        for msg in letters:
            assert msg.data is not None
            letter: DeadLetter = DEAD_LETTER_ADAPTER.validate_json(msg.data)
            assert letter.stream is not None and letter.stream_seq is not None
            key = (letter.stream, letter.stream_seq)
            item = origin[key]
            assert key not in seen, f"{item.name}: dead-lettered twice"
            seen.add(key)
            assert letter.reason.value == item.reason, (item.name, letter.reason, letter.error)
            assert letter.error.code == item.expected_code, (item.name, letter.error)
            assert letter.error.message, item.name
            assert item.says is None or item.says in letter.error.message, (item.name, letter.error)
            assert letter.subject == item.subject and msg.subject == subjects.dead_letter(item.subject)
            assert msg.headers is not None
            assert msg.headers[subjects.HEADER_DEAD_LETTER_REASON] == item.reason
            assert letter.payload_size == len(item.body) and not letter.truncated, item.name
            assert letter.raw_payload() == item.body, item.name
            assert letter.msg_id == f"{run}-{item.name}"
            assert letter.delivery_count == 1, f"{item.name}: refused at once, not after retries"
        assert seen == set(origin)

        # The sender could watch for each refusal, too (core NATS, so give them a moment).
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(all_refused.wait(), 5)
        by_id = {r.msg_id: r for r in refusals}
        for item in garbage:
            refusal = by_id[f"{run}-{item.name}"]
            assert refusal.reason.value == item.reason and refusal.subject == item.subject, item.name

        # The scheduler carries on: good cases started after the garbage finish.
        assert sched.proc is not None and sched.proc.poll() is None
        fire_and_forget = f"after-{run}"
        await js.publish(subjects.CASES_START, start_body(workflow_code="e2e_wait", case_key=fire_and_forget))
        await wait_state(db_url, fire_and_forget, ExecutionState.WAITING)
        await js.publish(f"tianshu.v1.events.order.{fire_and_forget}", dumps({"ok": run}))
        done = await wait_state(db_url, fire_and_forget, ExecutionState.FINISHED)
        assert done.output == {"ok": run}
        reply = await nc.request(
            subjects.RPC_CASES_START, start_body(workflow_code="e2e_steps", input={"steps": 2}), 10
        )
        accepted = START_CASE_REPLY_ADAPTER.validate_json(reply.data)
        assert isinstance(accepted, StartCaseAccepted), accepted
        await wait_state(db_url, accepted.case_key, ExecutionState.FINISHED)
        # The case the bad commands named is untouched: still waiting, still normal.
        untouched = await case_of(db_url, existing)
        assert untouched is not None and untouched.execution_state is ExecutionState.WAITING
        assert untouched.lifecycle_state.value == "normal"
        assert sched.proc.poll() is None
        log = sched.log_file.read_text(errors="replace")

    assert "Traceback" not in log, log[-5000:]
    assert executions(tmp_path)[(fire_and_forget, "after")] == 1


async def test_events_that_are_not_strict_json_wake_nothing_and_the_next_good_one_is_consumed(
    tmp_path: Path, db_url: str, nats_server_8mb: NatsServer, nc: Client
) -> None:
    key = f"strict-{uuid.uuid4().hex[:8]}"
    js = nc.jetstream()
    with SchedulerProcess(tmp_path, db_url, nats_server_8mb.url):
        await js.publish(subjects.CASES_START, start_body(workflow_code="e2e_wait", case_key=key))
        await wait_state(db_url, key, ExecutionState.WAITING)
        subject = f"tianshu.v1.events.order.{key}"
        bad = [b"NaN", b"-Infinity", b'{"x": NaN}']
        for i, body in enumerate(bad):
            await js.publish(subject, body, headers={subjects.HEADER_MSG_ID: f"{key}-bad-{i}"})
        letters = await dead_letters(nc, len(bad))
        mine = [DEAD_LETTER_ADAPTER.validate_json(m.data) for m in letters if m.data is not None]
        mine = [letter for letter in mine if letter.subject == subject]
        assert sorted(letter.msg_id or "" for letter in mine) == [f"{key}-bad-{i}" for i in range(3)]
        assert all(letter.reason.value == "not_strict_json" and letter.delivery_count == 1 for letter in mine)
        # Nothing woke the case, nothing was stored for it: it still waits, and the next good event
        # is the one it consumes (NaN never reaches it as null).
        waiting = await case_of(db_url, key)
        assert waiting is not None and waiting.execution_state is ExecutionState.WAITING
        await js.publish(subject, dumps({"x": 1.5}), headers={subjects.HEADER_MSG_ID: f"{key}-good"})
        done = await wait_state(db_url, key, ExecutionState.FINISHED)
    assert done.output == {"x": 1.5}
