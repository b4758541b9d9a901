"""`TianshuClient` and the `tianshu` CLI against a scheduler running as a process: real NATS, Postgres."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nats
import pytest

from tests._nats import NatsServerFactory
from tests._services import ROOT, SchedulerProcess, executions
from tianshu_contracts import DEAD_LETTER_ADAPTER, REFUSAL_ADAPTER, CaseSummary, subjects
from tianshu_core import (
    CaseFilter,
    CaseWaitTimeoutError,
    InvalidTokenError,
    RequestRefusedError,
    SchedulerUnavailableError,
    TianshuClient,
    connect_postgres,
)

pytestmark = [pytest.mark.e2e, pytest.mark.nats, pytest.mark.postgres]


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


@pytest.fixture(scope="module")
def scheduler(
    tmp_path_factory: pytest.TempPathFactory, pg_migrated_url: str, nats_url: str
) -> Iterator[SchedulerProcess]:
    """One scheduler for the module: the tests isolate by unique case keys and sessions."""
    with SchedulerProcess(tmp_path_factory.mktemp("client"), pg_migrated_url, nats_url) as proc:
        yield proc


@pytest.fixture
async def client(nats_url: str, scheduler: SchedulerProcess) -> AsyncIterator[TianshuClient]:
    async with TianshuClient.connect(nats_url) as connected:
        yield connected


async def until(
    client: TianshuClient, key: str, check: Callable[[CaseSummary], bool], within: float = 5.0
) -> CaseSummary:
    """Read the case through the scheduler until `check` holds."""
    deadline = asyncio.get_running_loop().time() + within
    while True:
        case = await client.get_case(key)
        if case is not None and check(case):
            return case
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"case {key} never got there: {case}")
        await asyncio.sleep(0.02)


def waiting(case: CaseSummary) -> bool:
    return case.execution_state == "waiting"


# -- the client -------------------------------------------------------------------------------


async def test_run_returns_the_output_and_starts_are_idempotent(client: TianshuClient) -> None:
    done = await client.run("e2e_steps", {"steps": 2}, timeout=10)
    assert (done.execution_state, done.lifecycle_state) == ("finished", "normal")
    assert done.finished_type == "done" and done.output == {"steps": 2} and done.error is None

    # A case that ended already: read, not awaited.
    assert (await client.wait_for_case(done.case_key, timeout=1)).output == {"steps": 2}
    again = await client.start_case("e2e_steps", {"steps": 5}, case_key=done.case_key)
    assert not again.created and again.case_key == done.case_key
    summary = await client.get_case(done.case_key)
    assert summary is not None and summary.input == {"steps": 2}
    assert await client.get_case(unique("missing")) is None


async def test_list_cases_pages_with_a_cursor(client: TianshuClient) -> None:
    session = unique("client-list")
    keys = [f"{session}-{i}" for i in range(5)]
    for key in keys:  # one after the other: created in this order
        await client.start_case("e2e_steps", {"steps": 1}, case_key=key, session_id=session)
        await client.wait_for_case(key, timeout=10)

    listed, cursor, pages = [], None, 0
    while True:
        page = await client.list_cases(session_id=session, limit=2, cursor=cursor)
        listed += page.cases
        pages += 1
        if page.next_cursor is None:
            break
        cursor = page.next_cursor
    assert [c.case_key for c in listed] == keys and pages == 3
    assert {c.execution_state for c in listed} == {"finished"} and all(c.input is None for c in listed)
    finished = await client.list_cases(session_id=session, execution_state="finished", limit=10)
    assert len(finished.cases) == 5 and finished.next_cursor is None
    assert (await client.list_cases(session_id=session, execution_state="waiting")).cases == []

    with pytest.raises(RequestRefusedError) as refused:
        await client.list_cases(cursor="not-a-cursor")
    assert refused.value.refusal_code == "invalid_cursor"


async def test_start_publish_event_and_wait(client: TianshuClient, scheduler: SchedulerProcess) -> None:
    key, resource = unique("client-wait"), f"invoice/{uuid.uuid4().hex[:6]} ü"  # not a plain token
    accepted = await client.start_case("e2e_wait", {"resource": resource}, case_key=key, session_id=key)
    assert accepted.created and (accepted.case_key, accepted.workflow_code) == (key, "e2e_wait")
    waiter = asyncio.create_task(client.wait_for_case(key, timeout=10))
    await until(client, key, waiting)

    event_id = unique("evt")
    first = await client.publish_event("order", resource, {"paid": 42}, event_id=event_id)
    repeat = await client.publish_event("order", resource, {"paid": 42}, event_id=event_id)
    assert first.subject == subjects.event("order", resource) and ".~" in first.subject
    assert (first.stream, first.msg_id, first.duplicate) == (subjects.STREAM_EVENTS, event_id, False)
    assert repeat.duplicate and repeat.seq == first.seq

    done = await waiter
    assert done.output == {"paid": 42} and done.execution_state == "finished"
    assert executions(scheduler.workdir)[(key, "after")] == 1


async def test_fire_and_forget_start_is_idempotent_on_its_msg_id(
    client: TianshuClient, pg_migrated_url: str
) -> None:
    session, msg_id = unique("ff-session"), unique("ff-msg")
    first = await client.start_case(
        "e2e_steps", {"steps": 1}, session_id=session, wait_reply=False, msg_id=msg_id
    )
    repeat = await client.start_case(
        "e2e_steps", {"steps": 1}, session_id=session, wait_reply=False, msg_id=msg_id
    )
    assert (first.subject, first.stream, first.msg_id) == (
        subjects.CASES_START,
        subjects.STREAM_CASES,
        msg_id,
    )
    assert not first.duplicate and repeat.duplicate

    # With a key, the case can be awaited before it even exists.
    key = unique("ff-key")
    keyed = await client.start_case("e2e_steps", {"steps": 1}, case_key=key, wait_reply=False)
    assert keyed.msg_id and not keyed.duplicate
    assert (await client.wait_for_case(key, timeout=10)).output == {"steps": 1}

    stores = await connect_postgres(pg_migrated_url, max_size=1)
    try:
        for _ in range(200):
            cases = await stores.cases.list(CaseFilter(session_id=session))
            if cases and cases[0].is_terminal:
                break
            await asyncio.sleep(0.02)
    finally:
        await stores.close()
    assert len(cases) == 1 and cases[0].output == {"steps": 1}


async def test_unknown_workflow_is_refused_by_request_and_dead_lettered_when_published(
    client: TianshuClient,
) -> None:
    with pytest.raises(RequestRefusedError, match="unknown workflow code 'no_such_workflow'") as refused:
        await client.start_case("no_such_workflow", {"x": 1})
    assert refused.value.refusal_code == "unknown_workflow"
    assert refused.value.subject == subjects.RPC_CASES_START

    refusals = await client.nc.subscribe(subjects.refusal(subjects.CASES_START))
    msg_id = unique("unknown")
    await client.start_case("no_such_workflow", wait_reply=False, msg_id=msg_id)
    try:
        while True:
            refusal = REFUSAL_ADAPTER.validate_json((await refusals.next_msg(timeout=5)).data)
            if refusal.msg_id == msg_id:
                break
    finally:
        await refusals.unsubscribe()
    assert refusal.error.code == "unknown_workflow"

    # The dead letter is stored before its refusal is announced.
    stored = await client.nc.jetstream().get_last_msg(
        subjects.STREAM_DLQ, subjects.dead_letter(subjects.CASES_START)
    )
    assert stored.data is not None
    letter = DEAD_LETTER_ADAPTER.validate_json(stored.data)
    assert (letter.msg_id, letter.reason, letter.error.code) == (msg_id, "refused", "unknown_workflow")
    assert json.loads(letter.payload)["workflow_code"] == "no_such_workflow"


async def test_bad_case_keys_are_refused_before_anything_is_sent(client: TianshuClient) -> None:
    for call in (
        client.cancel("has.dot"),
        client.get_case("a b"),
        client.wait_for_case("x>"),
        client.start_case("e2e_steps", case_key="*"),
    ):
        with pytest.raises(InvalidTokenError, match="case key"):
            await call
    with pytest.raises(InvalidTokenError, match="resource type"):
        await client.publish_event("a.b", "1", None)


async def test_cancel_stops_a_waiting_case(client: TianshuClient) -> None:
    key = unique("client-cancel")
    await client.start_case("e2e_wait", case_key=key)
    await until(client, key, waiting)
    with pytest.raises(CaseWaitTimeoutError, match="is waiting") as timed_out:
        await client.wait_for_case(key, timeout=0.2)
    assert isinstance(timed_out.value, TimeoutError)

    waiter = asyncio.create_task(client.wait_for_case(key, timeout=10))
    await asyncio.sleep(0.05)  # let it subscribe: the notification, not the read, ends this wait
    receipt = await client.cancel(key, reason="no longer needed")
    assert receipt.subject == subjects.case_command(key) and receipt.stream == subjects.STREAM_CASES
    done = await waiter
    assert (done.case_key, done.lifecycle_state, done.execution_state) == (key, "stop", "waiting")


async def test_pause_holds_a_case_until_resumed(client: TianshuClient, scheduler: SchedulerProcess) -> None:
    key = unique("client-pause")
    await client.start_case("e2e_wait", case_key=key)
    await until(client, key, waiting)
    await client.pause(key)
    await until(client, key, lambda c: c.lifecycle_state == "pause")

    await client.publish_event("order", key, "while paused")
    # The event wakes the case (runnable again), but a paused case does not run.
    held = await until(client, key, lambda c: c.execution_state == "running")
    await asyncio.sleep(0.3)
    held = await until(client, key, lambda c: c.lifecycle_state == "pause")
    assert held.execution_state == "running" and held.output is None
    assert executions(scheduler.workdir)[(key, "after")] == 0

    await client.resume(key)
    done = await client.wait_for_case(key, timeout=10)
    assert (done.output, done.lifecycle_state, done.execution_state) == ("while paused", "normal", "finished")


async def test_without_a_scheduler_errors_say_so(
    make_nats_server: NatsServerFactory, pg_migrated_url: str
) -> None:
    server = make_nats_server()
    async with TianshuClient.connect(server.url) as client:
        with pytest.raises(
            SchedulerUnavailableError, match=r"no scheduler serves tianshu\.v1\.rpc\.cases\.start"
        ):
            await client.start_case("e2e_steps")
        with pytest.raises(SchedulerUnavailableError, match="TIANSHU_CASES stream is missing"):
            await client.start_case("e2e_steps", wait_reply=False)
        with pytest.raises(SchedulerUnavailableError, match=r"tianshu\.v1\.rpc\.cases\.get"):
            await client.wait_for_case("any", timeout=1)

    raw = await nats.connect(server.url)
    try:
        borrowed = await TianshuClient.connect(raw)
        await borrowed.close()
        assert not raw.is_closed  # a connection the client did not open stays open
    finally:
        await raw.close()

    done = await tianshu(Env(server.url, pg_migrated_url), "start", "e2e_steps")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "error: no scheduler serves tianshu.v1.rpc.cases.start" in done.stderr


def test_importing_the_engine_does_not_import_nats_or_the_vendor_sdks() -> None:
    code = (
        "import sys, tianshu_core; "
        "assert not {'nats', 'openai', 'anthropic'} & set(sys.modules), 'imported too soon'; "
        "from tianshu_core import TianshuClient; assert 'nats' in sys.modules; "
        "from tianshu_core import OpenAiProvider; assert 'openai' in sys.modules; "
        "from tianshu_core.llm import AnthropicProvider; assert 'anthropic' in sys.modules"
    )
    subprocess.run(
        [sys.executable, "-c", code], check=True, timeout=30, env={**os.environ, "PYTHONPATH": str(ROOT)}
    )


# -- the CLI, as a user runs it ---------------------------------------------------------------


@dataclass(frozen=True)
class Env:
    nats_url: str
    database_url: str


@dataclass(frozen=True)
class Done:
    returncode: int
    stdout: str
    stderr: str

    def json(self) -> Any:
        return json.loads(self.stdout)


async def tianshu(env: Env, *args: str) -> Done:
    """`python -m tianshu_core.cli ARGS` with the settings in the environment."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tianshu_core.cli",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={
            **os.environ,
            "PYTHONPATH": str(ROOT),
            "TIANSHU_NATS_URL": env.nats_url,
            "TIANSHU_DATABASE_URL": env.database_url,
        },
    )
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode is not None
    return Done(proc.returncode, out.decode(), err.decode())


@pytest.fixture
def env(nats_url: str, pg_migrated_url: str, scheduler: SchedulerProcess) -> Env:
    return Env(nats_url, pg_migrated_url)


async def test_cli_start_wait_events_and_show(env: Env, client: TianshuClient) -> None:
    key, session = unique("cli-wait"), unique("cli-session")
    ran, started = await asyncio.gather(
        tianshu(env, "start", "e2e_steps", "--input", '{"steps": 1}', "--wait", "--timeout", "10"),
        tianshu(env, "start", "e2e_wait", "--key", key, "--session", session),
    )
    assert ran.returncode == 0, ran.stderr
    assert (ran.json()["execution_state"], ran.json()["output"]) == ("finished", {"steps": 1})
    assert started.returncode == 0, started.stderr
    assert started.json() | {"kind": None} == {
        "kind": None,
        "case_key": key,
        "session_id": session,
        "workflow_code": "e2e_wait",
        "created": True,
    }

    event_id = unique("cli-evt")
    published = await tianshu(
        env, "events", "publish", "order", key, "--payload", '{"ok": true}', "--id", event_id
    )
    assert published.returncode == 0, published.stderr
    assert published.json() | {"seq": 0} == {
        "subject": f"tianshu.v1.events.order.{key}",
        "stream": "TIANSHU_EVENTS",
        "seq": 0,
        "msg_id": event_id,
        "duplicate": False,
    }
    assert (await client.wait_for_case(key, timeout=10)).output == {"ok": True}

    via_nats, via_postgres = await asyncio.gather(
        tianshu(env, "cases", "show", key, "--via-nats"), tianshu(env, "cases", "show", key)
    )
    assert via_nats.returncode == 0 and via_nats.json()["output"] == {"ok": True}
    assert via_postgres.returncode == 0 and via_postgres.json()["output"] == {"ok": True}
    missing = await tianshu(env, "cases", "show", unique("nope"), "--via-nats")
    assert missing.returncode == 1 and "no case with key" in missing.stderr


async def test_cli_cancel_pause_resume(env: Env, client: TianshuClient, tmp_path: Path) -> None:
    key = unique("cli-cmd")
    await client.start_case("e2e_wait", case_key=key)
    await until(client, key, waiting)

    paused = await tianshu(env, "cases", "pause", key, "--reason", "hold on")
    assert paused.returncode == 0 and paused.json()["subject"] == subjects.case_command(key)
    await until(client, key, lambda c: c.lifecycle_state == "pause")
    assert (await tianshu(env, "cases", "resume", key)).returncode == 0
    await until(client, key, lambda c: c.lifecycle_state == "normal")
    cancelled = await tianshu(env, "cases", "cancel", key)
    assert cancelled.returncode == 0, cancelled.stderr
    assert (await client.wait_for_case(key, timeout=10)).lifecycle_state == "stop"

    unknown = await tianshu(env, "cases", "cancel", unique("nope"))
    assert unknown.returncode == 1 and "no case with key" in unknown.stderr

    # --payload-file, and --nats-url after the subcommand.
    body = tmp_path / "event.json"
    body.write_text('{"from": "file"}')
    other = Env("nats://127.0.0.1:1", env.database_url)
    from_file = await tianshu(
        other,
        "events",
        "publish",
        "order",
        unique("r"),
        "--payload-file",
        str(body),
        "--nats-url",
        env.nats_url,
    )
    assert from_file.returncode == 0 and not from_file.json()["duplicate"]


async def test_cli_user_errors_are_one_line_and_exit_2(env: Env) -> None:
    results = await asyncio.gather(
        tianshu(env, "start", "e2e_steps", "--input", "{not json"),
        tianshu(env, "events", "publish", "order", "1", "--payload-file", "/no/such/file.json"),
        tianshu(env, "start", "no_such_workflow"),
        tianshu(env, "start", "e2e_steps", "--key", "has space"),
        tianshu(env, "events", "publish", "bad.type", "1"),
    )
    for done, expected in zip(
        results,
        (
            "argument --input: not valid JSON",
            "cannot read /no/such/file.json",
            "error: the scheduler refused the request on tianshu.v1.rpc.cases.start: unknown workflow code "
            "'no_such_workflow'",
            "error: case key 'has space' must be",
            "error: resource type 'bad.type' must be",
        ),
        strict=True,
    ):
        assert done.returncode == 2, done
        assert expected in done.stderr and "Traceback" not in done.stderr, done.stderr
