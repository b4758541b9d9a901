"""`TianshuClient.follow` and `tianshu cases follow`: a case's streamed model calls and state changes.

No gateway and no scheduler: the tests publish the `LlmStreamChunk`s and `CaseUpdated`s themselves
on a private nats-server whose streams they create as a scheduler would.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg

import tianshu_contracts as wire
from tests._nats import NatsServer, NatsServerFactory
from tianshu_contracts import CaseSummary, CaseUpdated, LlmStreamChunk, TextDelta, subjects
from tianshu_contracts.llm import LlmErrorClass, LlmStreamEvent
from tianshu_core import bus
from tianshu_core import client as client_module
from tianshu_core.bus import NatsSettings, TianshuStreams
from tianshu_core.client import TianshuClient

pytestmark = pytest.mark.nats

Item = LlmStreamChunk | CaseUpdated
DONE = wire.Done(finish_reason="stop")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    """A nats-server of this module's own."""
    with NatsServer(tmp_path_factory.mktemp("follow")) as started:
        yield started


async def _open(url: str) -> tuple[Client, TianshuClient]:
    nc = await bus.connect(NatsSettings(url=url, request_timeout_s=2.0), name="follow-test")
    await bus.ensure_streams(nc.jetstream(), TianshuStreams().specs())
    return nc, TianshuClient(nc, request_timeout_s=2.0)


@pytest.fixture
async def client(server: NatsServer) -> AsyncIterator[TianshuClient]:
    nc, client = await _open(server.url)
    yield client
    await nc.close()


@pytest.fixture(params=["current", "2.9"])
async def any_client(request: pytest.FixtureRequest, server: NatsServer) -> AsyncIterator[TianshuClient]:
    """A client of this module's server (2.15), then of a nats-server 2.9 (skipped without one)."""
    url = server.url
    if request.param == "2.9":
        make: NatsServerFactory = request.getfixturevalue("make_nats_server")
        legacy = make(binary=request.getfixturevalue("legacy_nats_server"))
        assert legacy.version()[:2] == (2, 9)
        url = legacy.url
    nc, client = await _open(url)
    yield client
    await nc.close()


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def failure(error_class: LlmErrorClass) -> wire.StreamError:
    """A stream that broke after some deltas."""
    error = wire.WireError(type="ProviderError", message="broke", code=error_class.value)
    return wire.StreamError(error=error, error_class=error_class, incomplete=True)


class Call:
    """Publishes the chunks of one model call, numbering them per attempt as a gateway does."""

    def __init__(self, client: TianshuClient, case_key: str) -> None:
        self.client = client
        self.case_key = case_key
        self.call_id = unique("call")
        self.attempt = 1
        self.seq = 0

    async def send(self, *events: LlmStreamEvent | str) -> None:
        """Publish the events in order; a str is a text delta."""
        js = self.client.nc.jetstream()
        for event in events:
            self.seq += 1
            chunk = LlmStreamChunk(
                call_id=self.call_id,
                case_key=self.case_key,
                attempt=self.attempt,
                seq=self.seq,
                event=TextDelta(text=event) if isinstance(event, str) else event,
            )
            subject = subjects.llm_stream(self.case_key, self.call_id)
            msg_id = f"{self.call_id}:{self.attempt}:{self.seq}"
            await bus.publish(js, subject, chunk, msg_id=msg_id, stream=subjects.STREAM_LLM_STREAM)

    def next_attempt(self) -> None:
        self.attempt += 1
        self.seq = 0


async def update(
    client: TianshuClient,
    key: str,
    state: str = "finished",
    lifecycle: str = "normal",
    waiting_on: tuple[str, ...] = ("tianshu_llm_result",),
) -> None:
    """Publish the case's `updated` notification as the scheduler does (a waiting case waits, by
    default, on a model's answer)."""
    now = datetime.now(UTC)
    message = CaseUpdated.model_validate(
        {"case_key": key, "session_id": "s", "workflow_code": "wf", "updated_at": now}
        | {"execution_state": state, "lifecycle_state": lifecycle}
        | ({"waiting_on": list(waiting_on)} if state == "waiting" else {})
    )
    await bus.publish_core(client.nc, subjects.case_updated(key), message)
    await client.nc.flush()


def kinds(items: list[Item]) -> list[str]:
    """Each item as text: `<attempt>:<text>` for a delta, `<attempt>:<kind>` for another event,
    `[<state>]` for an update (`[<state>/<lifecycle>]` when the lifecycle is not normal)."""
    shown = []
    for item in items:
        if isinstance(item, CaseUpdated):
            lifecycle = "" if item.lifecycle_state == "normal" else f"/{item.lifecycle_state}"
            shown.append(f"[{item.execution_state}{lifecycle}]")
        else:
            event = item.event
            shown.append(f"{item.attempt}:{event.text if isinstance(event, TextDelta) else event.kind}")
    return shown


class Follower:
    """Runs `client.follow` in a task, collecting what it yields."""

    def __init__(self, client: TianshuClient, case_key: str, *, until_done: bool = True) -> None:
        self.items: list[Item] = []
        self._changed = asyncio.Event()
        self.task = asyncio.create_task(self._run(client, case_key, until_done))

    async def _run(self, client: TianshuClient, case_key: str, until_done: bool) -> None:
        async with contextlib.aclosing(client.follow(case_key, until_done=until_done)) as items:
            async for item in items:
                self.items.append(item)
                self._changed.set()

    async def until(self, count: int, within: float = 10.0) -> list[Item]:
        """Wait until it has collected `count` items."""
        async with asyncio.timeout(within):
            while len(self.items) < count:
                self._changed.clear()
                await self._changed.wait()
        return self.items

    async def ended(self, within: float = 10.0) -> list[str]:
        """What it yielded, as `kinds`, once it has stopped by itself."""
        await asyncio.wait_for(self.task, within)
        return kinds(self.items)


async def start(client: TianshuClient, call: Call, first: str, **options: Any) -> Follower:
    """Publish a first delta, then follow the case until that delta came (the follower is live then)."""
    await call.send(first)
    follower = Follower(client, call.case_key, **options)
    await follower.until(1)
    return follower


# -- the client ---------------------------------------------------------------------------------


async def test_every_delta_in_order_then_the_terminal_event(any_client: TianshuClient) -> None:
    call = Call(any_client, unique("case"))
    follower = await start(any_client, call, "Hel")  # stored before the follow: it comes all the same
    texts = [f"w{i} " for i in range(40)]
    await call.send(*texts)
    tool = wire.ToolCall(id="t1", name="search", arguments='{"q": "x"}')
    usage = wire.Usage(prompt_tokens=10, completion_tokens=41)
    await call.send(wire.ToolUse(call=tool), wire.UsageEvent(usage=usage), DONE)
    await update(any_client, call.case_key, "finished")
    ending = ["1:tool_use", "1:usage", "1:done", "[finished]"]
    assert await follower.ended() == ["1:Hel", *(f"1:{t}" for t in texts), *ending]
    assert [c.seq for c in follower.items if isinstance(c, LlmStreamChunk)] == list(range(1, 45))
    info = await any_client.nc.jetstream().stream_info(subjects.STREAM_LLM_STREAM)
    assert info.state.consumer_count == 0  # the follower removed its consumer as it ended


async def test_a_follower_that_joins_mid_call_gets_it_from_its_first_delta(client: TianshuClient) -> None:
    key = unique("case")
    await Call(client, key).send("before", DONE)  # an earlier call, still in the stream: it comes too
    call = Call(client, key)
    await call.send("one ", "two ", "three ")
    await Call(client, unique("case")).send("not mine")
    follower = Follower(client, key)
    await follower.until(5)
    await call.send("four ", "five", DONE)
    await update(client, key, "waiting")
    await update(client, key, "finished")
    after_the_earlier_call = [
        "1:one ",
        "1:two ",
        "1:three ",
        "1:four ",
        "1:five",
        "1:done",
        "[waiting]",
        "[finished]",
    ]
    assert await follower.ended() == ["1:before", "1:done", *after_the_earlier_call]


async def test_a_stream_error_then_the_next_attempt_then_done(any_client: TianshuClient) -> None:
    call = Call(any_client, unique("case"))
    follower = await start(any_client, call, "partial")
    await call.send(failure(LlmErrorClass.OVERLOADED))
    call.next_attempt()
    await call.send("whole ", "answer", DONE)
    await update(any_client, call.case_key, "failed")
    second = ["2:whole ", "2:answer", "2:done"]
    assert await follower.ended() == ["1:partial", "1:stream_error", *second, "[failed]"]
    numbers = [(c.attempt, c.seq) for c in follower.items if isinstance(c, LlmStreamChunk)]
    assert numbers == [(1, 1), (1, 2), (2, 1), (2, 2), (2, 3)]


async def test_it_stops_when_the_case_ends_and_not_before(client: TianshuClient) -> None:
    call = Call(client, unique("case"))
    follower = await start(client, call, "a")
    await update(client, call.case_key, "waiting")
    await update(client, call.case_key, "running")
    await follower.until(3)
    assert not follower.task.done()
    await call.send("b", DONE)
    await update(client, call.case_key, "running", "stop")  # cancelled
    assert await follower.ended() == ["1:a", "[waiting]", "[running]", "1:b", "1:done", "[running/stop]"]


@pytest.mark.parametrize("waiting_on", [("review_decision",), ("tianshu-children",), ()])
async def test_it_stops_when_the_case_waits_on_something_other_than_a_model_or_a_tool(
    client: TianshuClient, waiting_on: tuple[str, ...]
) -> None:
    call = Call(client, unique("case"))
    follower = await start(client, call, "a")
    await update(client, call.case_key, "waiting", waiting_on=("tianshu-tool-result",))  # a tool runs
    await follower.until(2)
    assert not follower.task.done()
    await call.send("b", DONE)
    await update(client, call.case_key, "waiting", waiting_on=waiting_on)  # an event, a child, a timer
    assert await follower.ended() == ["1:a", "[waiting]", "1:b", "1:done", "[waiting]"]


async def test_an_end_seen_while_catching_up_comes_after_the_whole_backlog(client: TianshuClient) -> None:
    call = Call(client, unique("case"))
    # Large deltas, so that the server holds most of them back (flow control) while the update,
    # on core NATS, overtakes them.
    texts = [f"{i} " + "x" * 100_000 for i in range(120)]
    follower = await start(client, call, "first")
    await call.send(*texts, DONE)
    await update(client, call.case_key, "finished")
    assert await follower.ended(30) == ["1:first", *(f"1:{t}" for t in texts), "1:done", "[finished]"]


async def test_without_until_done_it_goes_on_after_the_end(client: TianshuClient) -> None:
    call = Call(client, unique("case"))
    follower = await start(client, call, "a", until_done=False)
    await update(client, call.case_key, "finished")
    await follower.until(2)
    await call.send("b")
    assert kinds(await follower.until(3)) == ["1:a", "[finished]", "1:b"]
    assert not follower.task.done()
    follower.task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await follower.task


class FakeScheduler:
    """Answers `get_case` for one case, in the state the test sets."""

    def __init__(self, client: TianshuClient, key: str, state: str) -> None:
        now = datetime.now(UTC)
        self.nc = client.nc
        self.state = state
        self._case: dict[str, Any] = {"case_key": key, "session_id": "s", "workflow_code": "wf"}
        self._case |= {"lifecycle_state": "normal", "created_at": now, "updated_at": now}

    async def _answer(self, msg: Msg) -> None:
        case = CaseSummary.model_validate({**self._case, "execution_state": self.state})
        await msg.respond(wire.CaseFound(case=case).model_dump_json().encode())

    async def __aenter__(self) -> FakeScheduler:
        self._sub = await self.nc.subscribe(subjects.RPC_CASES_GET, cb=self._answer)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._sub.unsubscribe()


async def test_a_case_that_had_ended_ends_the_follow_after_the_stored_events(client: TianshuClient) -> None:
    call = Call(client, unique("case"))
    await call.send("all ", "over", DONE)
    async with FakeScheduler(client, call.case_key, "finished"):
        assert await Follower(client, call.case_key).ended() == ["1:all ", "1:over", "1:done", "[finished]"]


async def test_a_lost_end_is_found_by_reading_the_case(
    client: TianshuClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`updated` is core NATS (lost during a reconnect): a follower that hears nothing reads the case."""
    monkeypatch.setattr(client_module, "_RECHECK_S", 0.1)
    call = Call(client, unique("case"))
    async with FakeScheduler(client, call.case_key, "running") as scheduler:
        follower = await start(client, call, "a")
        await asyncio.sleep(0.3)  # read while running: it goes on
        assert not follower.task.done()
        scheduler.state = "finished"
        assert await follower.ended() == ["1:a", "[finished]"]


async def test_a_server_without_the_stream_is_a_clear_error(make_nats_server: NatsServerFactory) -> None:
    nc = await bus.connect(NatsSettings(url=make_nats_server().url), name="follow-test")
    try:
        with pytest.raises(client_module.SchedulerUnavailableError, match="no TIANSHU_LLM_STREAM stream"):
            async for _ in TianshuClient(nc).follow("k"):
                pass
    finally:
        await nc.close()


# -- the CLI ------------------------------------------------------------------------------------


class Cli:
    """`tianshu cases follow` as a process, its output read as it comes (not by line)."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.seen = bytearray()

    @classmethod
    async def start(cls, url: str, *args: str) -> Cli:
        command = [sys.executable, "-m", "tianshu_core.cli", "--nats-url", url, "cases", "follow", *args]
        pipe = asyncio.subprocess.PIPE
        return cls(await asyncio.create_subprocess_exec(*command, stdout=pipe, stderr=pipe))

    async def wait_for(self, want: bytes, within: float = 20) -> None:
        assert self.proc.stdout is not None
        async with asyncio.timeout(within):
            while want not in self.seen:
                data = await self.proc.stdout.read(4096)
                if not data:
                    raise AssertionError(f"output ended without {want!r}: {bytes(self.seen)!r}")
                self.seen += data

    async def result(self) -> tuple[int, str, str]:
        """Exit status, all of stdout, stderr, once it has ended by itself."""
        try:
            out, err = await asyncio.wait_for(self.proc.communicate(), 20)
        finally:
            if self.proc.returncode is None:
                self.proc.kill()
                await self.proc.wait()
        assert self.proc.returncode is not None
        return self.proc.returncode, (bytes(self.seen) + out).decode(), err.decode()


async def test_the_cli_prints_the_stream_live(server: NatsServer, client: TianshuClient) -> None:
    call = Call(client, unique("case"))
    await call.send("Hel")
    cli = await Cli.start(server.url, call.case_key)
    await cli.wait_for(b"Hel")  # the first delta, before any newline: flushed as it came
    await call.send("lo", failure(LlmErrorClass.TRANSIENT))
    await cli.wait_for(b"[stream error: transient")
    call.next_attempt()
    lookup = wire.ToolCall(id="t", name="lookup", arguments='{"id": 7}')
    await call.send("Hello", wire.ToolUse(call=lookup), wire.Done(finish_reason="tool_calls"))
    await cli.wait_for(b"[done: tool_calls]")
    await update(client, call.case_key, "waiting")
    await cli.wait_for(b"[case waiting, normal]")
    assert cli.proc.returncode is None  # still following
    await update(client, call.case_key, "finished")
    status, out, err = await cli.result()
    assert status == 0, err
    assert out.splitlines() == [
        f"[model call {call.call_id}]",
        "Hello",
        "[stream error: transient; the partial text of attempt 1 is dropped]",
        "[attempt 2]",
        "Hello",
        '[tool call: lookup {"id": 7}]',
        "[done: tool_calls]",
        "[case waiting, normal]",
        "[case finished, normal]",
    ]


async def test_the_cli_json_lines_and_a_failed_case_exit_1(server: NatsServer, client: TianshuClient) -> None:
    call = Call(client, unique("case"))
    await call.send("hi", DONE)
    cli = await Cli.start(server.url, call.case_key, "--json")
    await cli.wait_for(b'"done"')
    await update(client, call.case_key, "failed")
    status, out, err = await cli.result()
    lines: list[dict[str, Any]] = [json.loads(line) for line in out.splitlines()]
    assert [line["kind"] for line in lines] == ["llm_stream_chunk", "llm_stream_chunk", "case_updated"]
    assert lines[0]["event"] == {"kind": "text_delta", "text": "hi"}
    assert lines[2]["execution_state"] == "failed"
    assert status == 1, err


async def test_the_cli_error_for_a_bad_key_is_one_line(server: NatsServer) -> None:
    status, out, err = await (await Cli.start(server.url, "bad.key")).result()
    assert status == 2 and out == ""
    assert err.startswith("error:") and len(err.strip().splitlines()) == 1
