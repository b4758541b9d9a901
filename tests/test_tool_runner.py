"""The tool-runner service end to end: real nats-server, runners as processes, calls sent by hand.

The module has a nats-server of its own: the runners' stream and consumer names are fixed, so the
tests cannot isolate by name; each test that starts runners deletes the tool streams first. Calls
are published with nats-py as the scheduler's tool loop would, and results read from the
TIANSHU_TOOL_RESULTS stream.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import nats
import pytest
from nats.aio.client import Client
from nats.js import JetStreamContext

from tests._nats import NatsServer
from tests._tool_runner import (
    DeadLetters,
    Execution,
    Results,
    ToolRunnerProcess,
    executions,
    first_run,
    max_overlap,
    new_call,
    reset_streams,
    send_call,
)
from tianshu_contracts import ToolCallRequest, ToolCallResult, subjects
from tianshu_contracts.llm import ToolResult
from tianshu_core.bus import ensure_consumer, ensure_streams, pull_subscription
from tianshu_core.tools import nul_message
from tianshu_tool_runner.loader import ToolLoadError, load_tools
from tianshu_tool_runner.settings import ToolRunnerSettings
from tianshu_tool_runner.streams import calls_consumer, runner_streams

pytestmark = [pytest.mark.nats, pytest.mark.e2e]

CONSUMER = (subjects.STREAM_TOOLS, subjects.CONSUMER_TOOL_CALLS)


@pytest.fixture(scope="module")
def nats_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """This module's own nats-server (overrides the session's)."""
    with NatsServer(tmp_path_factory.mktemp("nats-tools")) as server:
        yield server.url


@pytest.fixture(scope="module")
async def nc(nats_url: str) -> AsyncIterator[Client]:
    client = await nats.connect(nats_url)
    yield client
    await client.close()


@pytest.fixture(scope="module")
def js(nc: Client) -> JetStreamContext:
    return nc.jetstream()


@pytest.fixture
async def clean(js: JetStreamContext) -> None:
    """No calls, results, consumer or dead letters left by an earlier test."""
    await reset_streams(js)


async def settled(js: JetStreamContext, within: float = 5.0) -> None:
    """Until the consumer has no call left, delivered or not."""
    for _ in range(int(within / 0.02)):
        info = await js.consumer_info(*CONSUMER)
        if info.num_ack_pending == 0 and info.num_pending == 0:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"calls left on the consumer after {within:g} s: {info}")


def sleeps(runs: list[Execution], tag: str) -> list[Execution]:
    return [r for r in runs if r.tag == tag]


# -- one runner, many kinds of calls -------------------------------------------------------------


@pytest.fixture(scope="class")
async def serving(
    js: JetStreamContext, nats_url: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[ToolRunnerProcess]:
    """One runner for a class of tests (results cut at 2000 bytes)."""
    await reset_streams(js)
    runner = ToolRunnerProcess(
        tmp_path_factory.mktemp("serving"), nats_url, TIANSHU_TOOL_RUNNER_MAX_RESULT_BYTES="2000"
    )
    runner.start()
    yield runner
    runner.kill()


class TestServing:
    """One runner serves every kind of call: answers, errors, dead letters."""

    @pytest.fixture
    def runner(self, serving: ToolRunnerProcess) -> ToolRunnerProcess:
        return serving

    @pytest.fixture
    async def results(self, js: JetStreamContext, runner: ToolRunnerProcess) -> AsyncIterator[Results]:
        async with Results(js) as results:
            yield results

    async def test_echo_round_trip(
        self, js: JetStreamContext, runner: ToolRunnerProcess, results: Results
    ) -> None:
        call = new_call("echo", {"text": "hello, tools"})
        await send_call(js, call)
        got = await results.wait(call.call_id)
        assert (got.call_id, got.case_key, got.step) == (call.call_id, call.case_key, call.step)
        assert got.result.call_id == call.tool_call_id
        assert got.result.content == "hello, tools"
        assert not got.result.is_error
        assert got.runner == runner.runner_id
        assert got.duration_s >= 0
        await settled(js)  # answered, then acknowledged: the work queue keeps nothing

    async def test_a_hand_written_tool_is_checked_against_its_json_schema(
        self, js: JetStreamContext, results: Results
    ) -> None:
        good, bad = new_call("lookup", {"id": 7}), new_call("lookup", {"id": 0, "extra": True})
        for call in (good, bad):
            await send_call(js, call)
        assert (await results.wait(good.call_id)).result.content == "customer 7"
        answer = (await results.wait(bad.call_id)).result
        assert answer.is_error
        assert answer.content.startswith("invalid arguments for tool lookup:")
        assert "id: 0 is less than the minimum of 1" in answer.content
        assert "'extra' was unexpected" in answer.content

    async def test_bad_calls_become_error_results_and_the_runner_keeps_serving(
        self, js: JetStreamContext, runner: ToolRunnerProcess, results: Results
    ) -> None:
        calls = {
            "missing argument": new_call("echo", {}),
            "wrong type": new_call("echo", {"text": ["not", "text"]}),
            "not json": new_call("echo", "{not json"),
            "not an object": new_call("echo", "[1, 2]"),
            "unknown tool": new_call("nosuch", {"q": 1}),
            "nul in its result": new_call("echo", {"text": "a\x00b"}),
            "raises": new_call("fail", {"message": "the disk is full"}),
            "hangs": new_call("hang", {}, timeout_s=0.3),
            "hangs in a thread": new_call("hang_sync", {"seconds": 30}, timeout_s=0.3),
        }
        started = time.monotonic()
        for call in calls.values():
            await send_call(js, call)
        answers = {what: (await results.wait(call.call_id)).result for what, call in calls.items()}
        assert time.monotonic() - started < 10
        assert all(a.is_error for a in answers.values()), answers
        assert answers["missing argument"].content == "invalid arguments for tool echo: text: Field required"
        assert answers["wrong type"].content.startswith("invalid arguments for tool echo: text: ")
        assert answers["not json"].content.startswith("invalid arguments for tool echo: not valid JSON")
        assert answers["not an object"].content == (
            "invalid arguments for tool echo: expected a JSON object, got list"
        )
        assert answers["unknown tool"].content == "unknown tool: nosuch"
        # Postgres cannot store a NUL: the model is told at once instead of the call failing later.
        assert answers["nul in its result"].content == nul_message("echo")
        assert answers["raises"].content == "tool fail failed: RuntimeError: the disk is full"
        assert answers["hangs"].content == "tool hang timed out after 0.3 s"
        assert answers["hangs in a thread"].content == "tool hang_sync timed out after 0.3 s"
        # Still serving, and every call was answered exactly once.
        follow_up = new_call("echo", {"text": "still here"})
        await send_call(js, follow_up)
        assert (await results.wait(follow_up.call_id)).result.content == "still here"
        assert runner.alive
        assert all(len(results.of(c.call_id)) == 1 for c in calls.values())

    async def test_an_oversized_result_arrives_cut_with_the_marker(
        self, js: JetStreamContext, results: Results
    ) -> None:
        call = new_call("big", {"size": 10_001})
        await send_call(js, call)
        answer = (await results.wait(call.call_id)).result
        assert not answer.is_error
        assert len(answer.content.encode()) <= 2000
        kept = len(answer.content.encode()) - len(answer.content.split("\n")[-1].encode()) - 1
        assert answer.content.endswith(f"\n[truncated: {kept} of 10001 bytes]")
        assert answer.content.startswith("éé") and kept > 1900

    async def test_a_call_past_its_deadline_is_dead_lettered_expired_without_running(
        self, js: JetStreamContext, runner: ToolRunnerProcess, results: Results
    ) -> None:
        past = new_call(
            "sleep", {"seconds": 5, "tag": "late"}, deadline=datetime.now(UTC) - timedelta(seconds=1)
        )
        soon = new_call("hang", {}, timeout_s=30, deadline=datetime.now(UTC) + timedelta(seconds=0.5))
        async with DeadLetters(js) as letters:
            for call in (past, soon):
                await send_call(js, call)
            await letters.until(
                lambda: any(d.msg_id == past.call_id for d in letters.all()), within=5, what="a letter"
            )
            (letter,) = [d for d in letters.all() if d.msg_id == past.call_id]
        # Its case has told the model the call failed: running it now would be an unseen side effect.
        assert letter.reason.value == "expired" and letter.delivery_count == 1, letter
        assert letter.msg_id == past.call_id
        assert "deadline" in letter.error.message and letter.error.code == "expired"
        assert sleeps(executions(runner.tool_log), "late") == []
        assert past.call_id not in results.by_call
        # A deadline sooner than the timeout cuts the run short.
        cut = await results.wait(soon.call_id, within=5)
        assert cut.result.is_error and cut.result.content.startswith("tool hang timed out after 0.")
        assert cut.duration_s < 2

    async def test_undecodable_and_invalid_calls_are_dead_lettered(
        self, js: JetStreamContext, runner: ToolRunnerProcess, results: Results
    ) -> None:
        mismatched = new_call("echo", {"text": "x"})
        body = json.loads(mismatched.model_dump_json())
        async with DeadLetters(js) as letters:
            await js.publish(subjects.tool_call("echo"), b"\xff not json")
            await js.publish(subjects.tool_call("echo"), json.dumps({"kind": "tool_call_request"}).encode())
            await js.publish(subjects.tool_call("lookup"), json.dumps(body).encode())
            mine = {subjects.tool_call("echo"), subjects.tool_call("lookup")}
            await letters.until(
                lambda: sum(d.subject in mine for d in letters.all()) >= 3, within=10, what="3 letters"
            )
            by_reason = {d.reason.value: d for d in letters.all() if d.subject in mine}
        assert set(by_reason) == {"undecodable", "schema_invalid", "key_mismatch"}
        assert by_reason["schema_invalid"].error.message.startswith("not a valid message for its subject: ")
        assert "call_id: Field required" in by_reason["schema_invalid"].error.message
        assert by_reason["key_mismatch"].error.code == "key_mismatch"
        assert by_reason["key_mismatch"].subject == subjects.tool_call("lookup")
        assert all(letter.delivery_count == 1 for letter in by_reason.values())
        assert mismatched.call_id not in results.by_call
        await settled(js)  # terminated: the term follows the dead letter, unconfirmed
        assert runner.alive

    async def test_sigterm_exits_even_with_a_sync_tool_stuck_in_its_thread(
        self, js: JetStreamContext, runner: ToolRunnerProcess, results: Results
    ) -> None:
        # Last in the class: it stops the class's runner. "hangs in a thread" above left a thread
        # sleeping 30 s; a normal interpreter exit would wait for it.
        stuck = new_call("hang_sync", {"seconds": 30}, timeout_s=0.2)
        await send_call(js, stuck)
        assert (await results.wait(stuck.call_id)).result.is_error
        started = time.monotonic()
        assert runner.terminate(timeout_s=15) == 0, runner.log_tail()
        assert time.monotonic() - started < 5
        assert "sync tool calls still running in threads; exiting without them" in runner.log_text()


# -- heartbeats, crashes, shutdown -------------------------------------------------------------


@pytest.mark.usefixtures("clean")
async def test_a_tool_three_times_longer_than_the_ack_wait_runs_once(
    js: JetStreamContext, nats_url: str, tmp_path: Path
) -> None:
    with ToolRunnerProcess(tmp_path, nats_url, TIANSHU_TOOL_RUNNER_ACK_WAIT_S="1") as runner:
        async with Results(js) as results:
            call = new_call("sleep", {"seconds": 3.0, "tag": "long"})
            await send_call(js, call)
            answer = await results.wait(call.call_id, within=15)
        assert answer.result.content == "slept 3 s"
        runs = sleeps(executions(runner.tool_log), "long")
        assert len(runs) == 1 and runs[0].end is not None, runs
        await settled(js)
        info = await js.consumer_info(*CONSUMER)
        assert info.config.ack_wait == 1.0
        assert info.num_redelivered == 0 and info.delivered.consumer_seq == 1, info
        assert len(results.of(call.call_id)) == 1


@pytest.mark.usefixtures("clean")
async def test_a_call_whose_runner_is_killed_completes_on_another(
    js: JetStreamContext, nats_url: str, tmp_path: Path
) -> None:
    runners = [ToolRunnerProcess(tmp_path, nats_url, TIANSHU_TOOL_RUNNER_ACK_WAIT_S="1") for _ in range(2)]
    try:
        ToolRunnerProcess.start_all(runners)
        async with Results(js) as results:
            call = new_call("sleep", {"seconds": 1.5, "tag": "victim"})
            await send_call(js, call)
            first = await first_run(runners[0].tool_log, "victim")
            victim = next(r for r in runners if r.pid == first.pid)
            survivor = next(r for r in runners if r is not victim)
            victim.kill()
            answer = await results.wait(call.call_id, within=20)
            await asyncio.sleep(0.5)  # room for a stray second result to show up
        assert answer.runner == survivor.runner_id
        assert answer.result.content == "slept 1.5 s"
        assert len(results.of(call.call_id)) == 1
        runs = sleeps(executions(runners[0].tool_log), "victim")
        assert [(r.pid, r.end is not None) for r in runs] == [(victim.pid, False), (survivor.pid, True)]
        await settled(js)
        info = await js.consumer_info(*CONSUMER)
        assert info.delivered.consumer_seq == 2  # delivered twice: to the victim, then the survivor
    finally:
        for runner in runners:
            runner.kill()


@pytest.mark.usefixtures("clean")
async def test_a_call_whose_result_a_dead_runner_published_is_not_run_again(
    js: JetStreamContext, nats_url: str, tmp_path: Path
) -> None:
    """A runner that dies after publishing a call's result and before its ack (this test plays
    it: it takes the call and publishes the result, and never acks) leaves the call to be
    delivered again; the next runner finds the result there and does not run the tool again
    (found by the short chaos run)."""
    await ensure_streams(js, runner_streams())
    spec = calls_consumer(ack_wait_s=1.0, max_ack_pending=ToolRunnerSettings().tool_runner_max_ack_pending)
    await ensure_consumer(js, spec)
    dead = await pull_subscription(js, spec)
    call = new_call("sleep", {"seconds": 0.1, "tag": "answered"})
    await send_call(js, call)
    [taken] = await dead.fetch(1, timeout=5)
    assert json.loads(taken.data)["call_id"] == call.call_id
    done = ToolCallResult(
        call_id=call.call_id,
        case_key=call.case_key,
        step=call.step,
        result=ToolResult(call_id=call.tool_call_id, content="slept 0.1 s"),
        runner="dead-runner",
        duration_s=0.1,
    )
    await js.publish(
        subjects.tool_result(call.case_key),
        done.model_dump_json().encode(),
        headers={subjects.HEADER_MSG_ID: call.call_id},
    )
    with ToolRunnerProcess(tmp_path, nats_url, TIANSHU_TOOL_RUNNER_ACK_WAIT_S="1") as runner:
        await settled(js, within=15)  # delivered again after the ack wait, and acknowledged
        info = await js.consumer_info(*CONSUMER)
        assert info.delivered.consumer_seq == 2, info
        assert sleeps(executions(runner.tool_log), "answered") == []


@pytest.mark.usefixtures("clean")
async def test_sigterm_lets_a_running_call_finish(
    js: JetStreamContext, nats_url: str, tmp_path: Path
) -> None:
    with ToolRunnerProcess(tmp_path, nats_url, TIANSHU_TOOL_RUNNER_SHUTDOWN_TIMEOUT_S="10") as runner:
        async with Results(js) as results:
            call = new_call("sleep", {"seconds": 1.0, "tag": "finishing"})
            await send_call(js, call)
            await first_run(runner.tool_log, "finishing")
            started = time.monotonic()
            runner.signal(signal.SIGTERM)
            code = await asyncio.to_thread(runner.wait_exit, 15)
            took = time.monotonic() - started
            answer = await results.wait(call.call_id, within=2)
        assert code == 0, runner.log_tail()
        assert 0.8 < took < 4.0, took  # the call's second, plus at most the fetch timeout
        assert answer.runner == runner.runner_id and not answer.result.is_error
        runs = sleeps(executions(runner.tool_log), "finishing")
        assert len(runs) == 1 and runs[0].end is not None
        info = await js.consumer_info(*CONSUMER)
        assert info.num_ack_pending == 0 and info.num_pending == 0


@pytest.mark.usefixtures("clean")
async def test_sigterm_gives_back_calls_that_outlast_the_shutdown_timeout(
    js: JetStreamContext, nats_url: str, tmp_path: Path
) -> None:
    # The default ack wait (30 s): the call comes back at once because it is released, not because
    # the ack wait ran out.
    # The call sleeps long enough that the first runner cannot finish it while the second starts,
    # however loaded the machine.
    seconds, ack_wait = 6.0, 30.0
    first = ToolRunnerProcess(tmp_path, nats_url, TIANSHU_TOOL_RUNNER_SHUTDOWN_TIMEOUT_S="0.5").start()
    second = ToolRunnerProcess(tmp_path, nats_url)
    try:
        async with Results(js) as results:
            call = new_call("sleep", {"seconds": seconds, "tag": "released"})
            await send_call(js, call)
            await first_run(first.tool_log, "released")
            await asyncio.to_thread(second.start)
            started = time.monotonic()
            first.signal(signal.SIGTERM)
            code = await asyncio.to_thread(first.wait_exit, 15)
            exited = time.monotonic() - started
            answer = await results.wait(call.call_id, within=ack_wait)
            answered = time.monotonic() - started
        assert code == 3, first.log_tail()  # not a clean shutdown: a call was cut short
        assert exited < seconds, exited  # it did not wait for the call
        assert answer.runner == second.runner_id
        assert answered < ack_wait, answered  # released at once, not after the ack wait
        runs = sleeps(executions(first.tool_log), "released")
        assert [(r.pid, r.end is not None) for r in runs] == [(first.pid, False), (second.pid, True)]
        assert "giving back 1 messages still held after 0.5 s" in first.log_text()
    finally:
        first.kill()
        second.kill()


async def test_a_call_sent_again_after_a_nats_restart_does_not_run_again(tmp_path: Path) -> None:
    """A scheduler that replays a case before its tool result is recorded sends the call again,
    with the same Nats-Msg-Id: the calls' stream must still know that id after a NATS restart (a
    work queue forgets the ids of the messages it removed, and the call ran twice)."""
    with NatsServer(tmp_path / "nats") as server:
        client = await nats.connect(server.url, max_reconnect_attempts=-1, reconnect_time_wait=0.2)
        js = client.jetstream()
        runner = ToolRunnerProcess(tmp_path, server.url).start()
        try:
            async with Results(js) as results:
                call = new_call("sleep", {"seconds": 0.0, "tag": "once"})
                await send_call(js, call)
                await results.wait(call.call_id, within=15)
            await asyncio.to_thread(server.restart)
            ack = await js.publish(
                subjects.tool_call(call.tool),
                call.model_dump_json().encode(),
                headers={subjects.HEADER_MSG_ID: call.call_id},
                timeout=15,
            )
            assert ack.duplicate, "the calls' stream forgot the call's id"
            # A call sent later with another id is run: the runner is serving after the restart.
            async with Results(js) as results:
                later = new_call("sleep", {"seconds": 0.0, "tag": "later"})
                await send_call(js, later)
                await results.wait(later.call_id, within=30)
            assert [r.tag for r in executions(runner.tool_log)] == ["once", "later"]
        finally:
            runner.kill()
            await client.close()


# -- concurrency and scale-out -----------------------------------------------------------------


async def _run_batch(
    js: JetStreamContext, nats_url: str, workdir: Path, n_runners: int, calls: int = 300
) -> tuple[float, int, list[Execution], list[ToolRunnerProcess]]:
    """Start `n_runners` (concurrency 4), then time `calls` 100 ms sleeps sent by 30 cases at once.

    Returns the seconds from the moment every runner was ready to the last result, the highest
    num_ack_pending seen on the consumer meanwhile, the executions and the runners.
    """
    await reset_streams(js)
    runners = [
        ToolRunnerProcess(workdir, nats_url, TIANSHU_TOOL_RUNNER_CONCURRENCY="4") for _ in range(n_runners)
    ]
    try:
        await asyncio.to_thread(ToolRunnerProcess.start_all, runners)
        batch: list[ToolCallRequest] = [
            new_call("sleep", {"seconds": 0.1, "tag": f"s{i}"}, case_key=f"scale-{n_runners}-{i % 30}")
            for i in range(calls)
        ]
        peak = 0
        busy = True

        async def sample() -> None:
            nonlocal peak
            while busy:
                info = await js.consumer_info(*CONSUMER)
                peak = max(peak, info.num_ack_pending)
                await asyncio.sleep(0.01)

        async with Results(js) as results:
            sampler = asyncio.create_task(sample())
            started = time.monotonic()
            await asyncio.gather(*(send_call(js, c) for c in batch))
            await results.wait_all((c.call_id for c in batch), within=60)
            elapsed = time.monotonic() - started
            busy = False
            await sampler
        assert all(len(results.of(c.call_id)) == 1 for c in batch)
        assert not any(r.result.is_error for c in batch for r in results.of(c.call_id))
        return elapsed, peak, executions(runners[0].tool_log), runners
    finally:
        for runner in runners:
            runner.kill()


@pytest.mark.slow
async def test_three_runners_finish_at_least_2_5_times_faster_than_one_holding_at_most_4_calls_each(
    js: JetStreamContext, nats_url: str, tmp_path: Path
) -> None:
    report = []
    timings = {}
    for n in (1, 3):
        elapsed, peak, runs, runners = await _run_batch(js, nats_url, tmp_path / f"x{n}", n)
        timings[n] = elapsed
        assert len(runs) == 300 and all(r.end is not None for r in runs)  # each call ran once
        assert peak <= 4 * n, f"{n} runners held {peak} unacknowledged calls"
        by_pid = {r.pid: [x for x in runs if x.pid == r.pid] for r in runners}
        overlaps = {pid: max_overlap(mine) for pid, mine in by_pid.items()}
        assert all(o <= 4 for o in overlaps.values()), overlaps
        assert all(o == 4 for o in overlaps.values()), f"a runner did not use its 4 slots: {overlaps}"
        assert all(len(mine) >= 50 for mine in by_pid.values()), {p: len(m) for p, m in by_pid.items()}
        report.append(
            f"{n} runner(s): {elapsed:.2f} s, peak num_ack_pending {peak}, "
            f"calls per runner {sorted(len(m) for m in by_pid.values())}, "
            f"overlaps {sorted(overlaps.values())}"
        )
    ratio = timings[1] / timings[3]
    print("\n" + "\n".join(report) + f"\nscale 1 -> 3: {ratio:.2f}x")
    assert ratio >= 2.5, report


# -- loading tools and settings (no NATS) ------------------------------------------------------


def _module(tmp_path: Path, name: str, source: str) -> str:
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))
    return name


def test_load_tools_takes_a_registry_or_every_module_level_tool(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.syspath_prepend(str(tmp_path))
    decorated = _module(
        tmp_path,
        "tr_decorated",
        """
        from tianshu_core.tools import tool
        from tests.e2e_tools import echo  # imported: served from here too, once

        @tool
        async def shout(text: str) -> str:
            return text.upper()

        def helper() -> None: ...
        """,
    )
    registry = load_tools(["tests.e2e_tools", decorated])
    assert registry.names == ["echo", "sleep", "fail", "hang", "hang_sync", "big", "lookup", "shout"]


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("raise ImportError('no such thing')", "cannot import tool module"),
        ("x = 1", "defines no tools"),
        ("tools = 3", ".tools is a int; make it a ToolRegistry"),
        ("tools = [1]", ".tools holds what are not tools: 1"),
        (
            "from tianshu_core.tools import tool\n@tool\nasync def echo(text: str) -> str: ...\n",
            "two tools are named 'echo'",
        ),
    ],
)
def test_load_tools_refuses_what_cannot_be_served(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, source: str, message: str
) -> None:
    monkeypatch.syspath_prepend(str(tmp_path))
    name = _module(tmp_path, f"tr_bad_{abs(hash(source))}", source)
    with pytest.raises(ToolLoadError, match=message.replace("(", r"\(").replace(".", r"\.")):
        load_tools(["tests.e2e_tools", name])
    with pytest.raises(ToolLoadError, match="set TIANSHU_TOOLS"):
        load_tools([])


def test_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TIANSHU_TOOLS", " a.b , c ,")
    monkeypatch.setenv("TIANSHU_TOOL_RUNNER_CONCURRENCY", "8")
    settings = ToolRunnerSettings()
    assert settings.tool_modules == ["a.b", "c"]
    assert settings.tool_runner_concurrency == 8 and settings.tool_runner_ack_wait_s == 30
    monkeypatch.setenv("TIANSHU_TOOL_RUNNER_HEARTBEAT_S", "30")
    with pytest.raises(ValueError, match="must be shorter than TIANSHU_TOOL_RUNNER_ACK_WAIT_S"):
        ToolRunnerSettings()


def test_the_console_script_says_what_is_missing(tmp_path: Path) -> None:
    script = Path(sys.executable).parent / "tianshu-tool-runner"
    env = {"PATH": str(script.parent), "TIANSHU_TOOLS": ""}
    done = subprocess.run([str(script)], env=env, capture_output=True, text=True, timeout=30, cwd=tmp_path)
    assert done.returncode == 2
    assert "tianshu-tool-runner: no tool modules: set TIANSHU_TOOLS" in done.stderr
