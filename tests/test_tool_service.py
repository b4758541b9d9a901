"""`ctx.tool_step` in service mode: schedulers run the loop, tool runners run the calls, over NATS.

Every test runs real `python -m tianshu_scheduler` and `python -m tianshu_tool_runner` processes
against a nats-server of its own (the tool streams and consumers have fixed names) and a database
of its own (so a sweeper adopts only this test's cases). The workflow is `tests.e2e_agent`'s
`e2e_agent`: a scripted model whose replies follow the case's input, which logs every time it is
asked (and what it was shown) to a file; the tools log every execution with its pid. Time limits
are safety nets against a hang; the only timing assertion is a ratio of sleep-bound work.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nats
import pytest
from nats.aio.client import Client
from nats.js import JetStreamContext

from tests._nats import NatsServerFactory
from tests._otlp import OtlpCollector, by_name, one
from tests._services import CaseDb, SchedulerProcess, eventually, fresh_database, new_key, request_start
from tests._tool_runner import (
    DeadLetters,
    Execution,
    Results,
    ToolRunnerProcess,
    executions,
    first_run,
    max_overlap,
)
from tests.e2e_agent import ModelCall, model_calls
from tianshu_contracts import ToolResult, subjects
from tianshu_core.tools import TOOL_RESULT_RESOURCE, ToolInvocation, nul_message

pytestmark = [pytest.mark.e2e, pytest.mark.nats, pytest.mark.postgres, pytest.mark.slow]

CONSUMER = (subjects.STREAM_TOOLS, subjects.CONSUMER_TOOL_CALLS)


@dataclass
class Stack:
    """This test's nats-server, database and processes; every process is killed at the end."""

    workdir: Path
    nats_url: str
    db_url: str
    schedulers: list[SchedulerProcess] = field(default_factory=list)
    runners: list[ToolRunnerProcess] = field(default_factory=list)

    def scheduler(self, **env: str) -> SchedulerProcess:
        """Start a scheduler serving `tests.e2e_agent`; return once it is ready."""
        replica = SchedulerProcess(
            self.workdir, self.db_url, self.nats_url, TIANSHU_WORKFLOWS="tests.e2e_agent", **env
        )
        self.schedulers.append(replica)
        return replica.start()

    def new_runners(self, n: int, workdir: Path | None = None, **env: str) -> list[ToolRunnerProcess]:
        """`n` runners serving `tests.e2e_agent.tools` (not started); their tool log is in `workdir`."""
        made = [
            ToolRunnerProcess(workdir or self.workdir, self.nats_url, TIANSHU_TOOLS="tests.e2e_agent", **env)
            for _ in range(n)
        ]
        self.runners.extend(made)
        return made

    async def start_runners(self, n: int, workdir: Path | None = None, **env: str) -> list[ToolRunnerProcess]:
        made = self.new_runners(n, workdir, **env)
        await asyncio.to_thread(ToolRunnerProcess.start_all, made)
        return made

    @property
    def tool_log(self) -> Path:
        return self.workdir / "tool-executions.jsonl"

    def logs(self) -> str:
        """For failure messages: the tail of every process's log."""
        procs: list[SchedulerProcess | ToolRunnerProcess] = [*self.schedulers, *self.runners]
        return "\n".join(f"--- {p.name}\n{p.log_tail(20)}" for p in procs if p.proc is not None)

    def close(self) -> None:
        for scheduler in self.schedulers:
            scheduler.kill()
        for runner in self.runners:
            runner.kill()


@pytest.fixture
async def db_url(pg_server_url: str) -> AsyncIterator[str]:
    async with fresh_database(pg_server_url, "tianshu_tools") as url:
        yield url


@pytest.fixture
def stack(tmp_path: Path, make_nats_server: NatsServerFactory, db_url: str) -> Iterator[Stack]:
    server = make_nats_server()
    made = Stack(tmp_path, server.url, db_url)
    yield made
    made.close()


@pytest.fixture
async def nc(stack: Stack) -> AsyncIterator[Client]:
    client = await nats.connect(stack.nats_url)
    yield client
    await client.close()


@pytest.fixture
def js(nc: Client) -> JetStreamContext:
    return nc.jetstream()


@pytest.fixture
async def db(db_url: str) -> AsyncIterator[CaseDb]:
    case_db = await CaseDb.open(db_url)
    yield case_db
    await case_db.close()


# -- helpers -----------------------------------------------------------------------------------


def nap(seconds: float, tag: str) -> dict[str, Any]:
    return {"tool": "nap", "args": {"seconds": seconds, "tag": tag}}


def call_id(key: str, record: str) -> str:
    """The call id the loop sends a call under (its Nats-Msg-Id, and the event resource id)."""
    return ToolInvocation.of(key, record).call_id


def tags(tool_log: Path, prefix: str) -> Counter[str]:
    """How many executions each tag starting with `prefix` had."""
    return Counter(r.tag for r in executions(tool_log) if r.tag.startswith(prefix))


def rounds(calls: list[ModelCall]) -> Counter[int]:
    """How many times the model was asked for each round."""
    return Counter(c.round for c in calls)


async def call_records(db: CaseDb, key: str) -> dict[str, list[ToolResult]]:
    """The case's recorded tool results, by record name (a list: a name must appear once)."""
    out: dict[str, list[ToolResult]] = {}
    for name in await db.steps(key):
        if "/call/" in name:
            out[name] = [ToolResult.model_validate(d) for d in await db.step_data(key, name)]
    return out


def assert_steps_once(steps: list[str]) -> None:
    assert len(steps) == len(set(steps)), f"a record appears twice: {steps}"


async def until(check: Callable[[], Any], what: str, stack: Stack, within: float = 30.0) -> Any:
    """`eventually` for a sync or async check, with every process's log on failure."""

    async def wrapped() -> Any:
        value = check()
        return await value if asyncio.iscoroutine(value) else value

    return await eventually(wrapped, what=what, within=within, context=stack.logs)


# -- 1. scale-out through cases ----------------------------------------------------------------

CASES = 30
CALLS_PER_CASE = 10


async def _scale_run(
    stack: Stack, js: JetStreamContext, nc: Client, db: CaseDb, n_runners: int
) -> tuple[float, int, list[Execution], list[ToolRunnerProcess], list[str]]:
    """Start `n_runners` (concurrency 4); then start 30 cases whose model asks for ten 100 ms naps
    in one reply, and time until every case has finished. Returns the seconds from the moment every
    runner was ready, the highest num_ack_pending seen meanwhile, the executions, runners and keys."""
    workdir = stack.workdir / f"runners-{n_runners}"
    runners = await stack.start_runners(n_runners, workdir, TIANSHU_TOOL_RUNNER_CONCURRENCY="4")
    keys = [new_key(f"scale{n_runners}-{i}") for i in range(CASES)]
    peak, busy = 0, True

    async def sample() -> None:
        nonlocal peak
        while busy:
            info = await js.consumer_info(*CONSUMER)
            peak = max(peak, info.num_ack_pending)
            await asyncio.sleep(0.01)

    sampler = asyncio.create_task(sample())
    try:
        started = time.monotonic()
        await asyncio.gather(
            *(
                request_start(
                    nc,
                    "e2e_agent",
                    {
                        "rounds": [[nap(0.1, f"{key}/{j}") for j in range(CALLS_PER_CASE)]],
                        "answer": "all napped",
                        "max_concurrency": CALLS_PER_CASE,
                    },
                    key=key,
                )
                for key in keys
            )
        )
        await db.wait_all(keys, within=120, interval=0.01, context=stack.logs)
        elapsed = time.monotonic() - started
    finally:
        busy = False
        await sampler
    runs = [r for r in executions(workdir / "tool-executions.jsonl") if r.tag.startswith("scale")]
    for runner in runners:
        runner.kill()
    return elapsed, peak, runs, runners, keys


async def test_three_runners_finish_30_agent_cases_at_least_2_5_times_faster_than_one(
    stack: Stack, js: JetStreamContext, nc: Client, db: CaseDb
) -> None:
    # 30 cases run at once; each runs its ten read-only calls at once.
    stack.scheduler(TIANSHU_SCHEDULER_MAX_RUNS="64")
    report, timings = [], {}
    for n in (1, 3):
        elapsed, peak, runs, runners, keys = await _scale_run(stack, js, nc, db, n)
        timings[n] = elapsed
        # Every call ran exactly once, to its end.
        assert len(runs) == CASES * CALLS_PER_CASE and all(r.end is not None for r in runs)
        assert set(Counter(r.tag for r in runs).values()) == {1}
        # No runner held more than its 4 calls: on the consumer, and in each runner's intervals.
        assert peak <= 4 * n, f"{n} runners held {peak} unacknowledged calls"
        by_pid = {r.pid: [x for x in runs if x.pid == r.pid] for r in runners}
        overlaps = {pid: max_overlap(mine) for pid, mine in by_pid.items()}
        assert all(o <= 4 for o in overlaps.values()), overlaps
        assert all(o == 4 for o in overlaps.values()), f"a runner did not use its 4 slots: {overlaps}"
        assert all(len(mine) >= 50 for mine in by_pid.values()), {p: len(m) for p, m in by_pid.items()}
        # Each case: the model asked twice, shown its ten results in call order the second time.
        for key in keys:
            assert (await db.case(key))["output"] == "all napped"
            asked = model_calls(stack.workdir, key)
            assert [c.round for c in asked] == [1, 2], asked
            assert asked[1].results == [(f"r1c{j}", "napped 0.1 s") for j in range(1, CALLS_PER_CASE + 1)]
            assert len(await call_records(db, key)) == CALLS_PER_CASE
        report.append(
            f"{n} runner(s): {elapsed:.2f} s, peak num_ack_pending {peak}, "
            f"calls per runner {sorted(len(m) for m in by_pid.values())}, "
            f"overlaps {sorted(overlaps.values())}"
        )
    ratio = timings[1] / timings[3]
    print("\n" + "\n".join(report) + f"\nscale 1 -> 3 through cases: {ratio:.2f}x")
    assert ratio >= 2.5, report


# -- 2. a runner killed mid-call ---------------------------------------------------------------


async def test_a_call_whose_runner_is_killed_completes_on_the_other_and_is_recorded_once(
    stack: Stack, js: JetStreamContext, nc: Client, db: CaseDb
) -> None:
    stack.scheduler()
    # A short ack wait: the dead runner's call comes back after 1 s (heartbeats keep live calls).
    runners = await stack.start_runners(2, TIANSHU_TOOL_RUNNER_ACK_WAIT_S="1")
    key = new_key("victim")
    tag = f"{key}/r1c1"
    cid = call_id(key, "agent/r1/call/r1c1")
    async with Results(js) as results:
        await request_start(nc, "e2e_agent", {"rounds": [[nap(1.5, tag)]], "answer": "survived"}, key=key)
        first = await first_run(stack.tool_log, tag)
        victim = next(r for r in runners if r.pid == first.pid)
        survivor = next(r for r in runners if r is not victim)
        victim.kill()
        done = await db.wait_state(key, "finished", context=stack.logs)
        await asyncio.sleep(0.5)  # room for a stray second result to show up
    assert done["output"] == "survived"
    # The call ran on the victim (cut short), then on the survivor, whose result is the only one.
    runs = [r for r in executions(stack.tool_log) if r.tag == tag]
    assert [(r.pid, r.end is not None) for r in runs] == [(victim.pid, False), (survivor.pid, True)]
    assert [r.runner for r in results.of(cid)] == [survivor.runner_id]
    # Recorded once: one journal record, one event on the call id.
    records = await call_records(db, key)
    assert list(records) == ["agent/r1/call/r1c1"]
    assert records["agent/r1/call/r1c1"] == [ToolResult(call_id="r1c1", content="napped 1.5 s")]
    assert await db.event_count(TOOL_RESULT_RESOURCE, cid) == 1
    assert_steps_once(await db.steps(key))
    asked = model_calls(stack.workdir, key)
    assert [(c.round, c.results) for c in asked] == [(1, []), (2, [("r1c1", "napped 1.5 s")])]
    assert survivor.alive


# -- 3. the scheduler killed between rounds, and mid-round --------------------------------------


@pytest.mark.parametrize(
    "where", ["between-rounds", "mid-round-answered-while-down", "mid-round-answered-after-restart"]
)
async def test_a_scheduler_killed_in_the_loop_asks_and_runs_nothing_again_that_answered(
    stack: Stack, js: JetStreamContext, nc: Client, db: CaseDb, where: str
) -> None:
    """Round 1: one exclusive call; round 2: three read-only calls, the third blocked until a file
    appears; round 3: the answer. SIGKILL the scheduler while the model is asked for round 2, or once
    two calls of round 2 have answered and the third is running; a new scheduler finishes the loop.
    """
    first = stack.scheduler()
    await stack.start_runners(1)
    key = new_key("crash")
    gate, hold = stack.workdir / f"{key}.gate", stack.workdir / f"{key}.hold"
    spec: dict[str, Any] = {
        "rounds": [
            [{"tool": "sleep", "args": {"seconds": 0.05, "tag": f"{key}/r1c1"}}],
            [
                nap(0.05, f"{key}/r2c1"),
                nap(0.05, f"{key}/r2c2"),
                {"tool": "wait_file", "args": {"path": str(gate), "tag": f"{key}/r2c3"}},
            ],
        ],
        "answer": "finished",
    }
    if where == "between-rounds":
        spec |= {"hold_round": 2, "hold_file": str(hold)}
    blocked = f"{key}/r2c3"
    cid3 = call_id(key, "agent/r2/call/r2c3")

    async def at_kill_point() -> bool:
        steps = set(await db.steps(key))
        if where == "between-rounds":
            asked = rounds(model_calls(stack.workdir, key))
            return asked[2] == 1 and {"agent/r1/llm", "agent/r1/call/r1c1"} <= steps
        started = tags(stack.tool_log, blocked)[blocked] == 1
        return started and {"agent/r2/call/r2c1", "agent/r2/call/r2c2"} <= steps

    async with Results(js) as results:
        await request_start(nc, "e2e_agent", spec, key=key)
        await until(at_kill_point, f"the kill point ({where})", stack)
        first.kill()
        recorded = await db.steps(key)  # what was durable when it died (nothing can come later)
        assert (await db.case(key))["execution_state"] == "running"
        if where == "between-rounds":
            assert recorded == ["agent/r1/llm", "agent/r1/call/r1c1"]
            hold.touch()
            gate.touch()
            second = stack.scheduler()
        elif where == "mid-round-answered-while-down":
            assert set(recorded) == {"agent/r1/llm", "agent/r1/call/r1c1", "agent/r2/llm"} | {
                "agent/r2/call/r2c1",
                "agent/r2/call/r2c2",
            }
            gate.touch()  # the blocked call answers while no scheduler runs: the result waits in its stream
            await results.wait(cid3)
            second = stack.scheduler()
        else:
            second = stack.scheduler()
            # Let the blocked call answer only once the new scheduler holds the case again.
            await until(lambda: _held_by(db, key, second.owner), "the new scheduler holds the case", stack)
            gate.touch()
        done = await db.wait_state(key, "finished", context=stack.logs)
        await asyncio.sleep(0.3)  # room for a stray repeated result
    assert done["output"] == "finished"

    # No call that answered ran again; the blocked one was not run again either (its runner lived).
    assert tags(stack.tool_log, key) == Counter({f"{key}/{c}": 1 for c in ("r1c1", "r2c1", "r2c2", "r2c3")})
    assert all(r.end is not None for r in executions(stack.tool_log))
    assert len(results.of(cid3)) == 1
    # The model was not asked again for a recorded reply; only the one the kill interrupted.
    asked = model_calls(stack.workdir, key)
    assert rounds(asked) == Counter({1: 1, 2: 2 if where == "between-rounds" else 1, 3: 1}), asked
    assert asked[-1].pid == second.pid
    assert asked[-1].results == [
        ("r2c1", "napped 0.05 s"),
        ("r2c2", "napped 0.05 s"),
        ("r2c3", f"found {gate.name}"),
    ]
    timers = [e["name"] for e in await db.journal(key) if e["kind"] == "timer"]
    if where == "mid-round-answered-while-down":
        # The re-sent call was a duplicate whose result was recorded already: taken at once, not
        # awaited for a whole hot window and then as a parked wait (found by this test).
        assert timers == [], timers
    steps = await db.steps(key)
    assert_steps_once(steps)
    assert steps[: len(recorded)] == recorded  # the history before the kill is kept as it was
    assert set(steps) == {
        "agent/r1/llm",
        "agent/r1/call/r1c1",
        "agent/r2/llm",
        "agent/r2/call/r2c1",
        "agent/r2/call/r2c2",
        "agent/r2/call/r2c3",
        "agent/r3/llm",
        "agent",
    }


async def _held_by(db: CaseDb, key: str, owner: str) -> bool:
    case = await db.case(key)
    return bool(case["lease_owner"] == owner or case["execution_state"] != "running")


# -- 4. bad input from the model ---------------------------------------------------------------


async def test_bad_calls_reach_the_model_as_error_results_and_the_loop_goes_on(
    stack: Stack, js: JetStreamContext, nc: Client, db: CaseDb
) -> None:
    stack.scheduler()
    (runner,) = await stack.start_runners(1)
    key = new_key("bad")
    first_round = [
        {"tool": "echo", "args": {}},  # a required argument missing
        {"tool": "echo", "raw": "{not json"},  # not JSON
        {"tool": "lookup", "args": {"id": 0, "extra": True}},  # against a hand-written JSON Schema
        {"tool": "nosuch", "args": {"q": 1}},  # a tool nobody offered
        {"tool": "ghost", "args": {}},  # offered by the workflow, served by no runner
        {"tool": "fail", "args": {"message": "the disk is full"}},  # raises
        {"tool": "hang", "args": {}},  # past the loop's 0.5 s tool timeout
        {"tool": "echo", "args": {"text": "fine"}},  # and one good call
    ]
    spec = {
        "rounds": [first_round, [{"tool": "echo", "args": {"text": "after the errors"}}]],
        "answer": "recovered",
        "tool_timeout_s": 0.5,
    }
    await request_start(nc, "e2e_agent", spec, key=key)
    done = await db.wait_state(key, "finished", context=stack.logs)
    assert done["output"] == "recovered"

    asked = model_calls(stack.workdir, key)
    assert [c.round for c in asked] == [1, 2, 3]
    shown = dict(asked[1].results)
    assert list(shown) == [f"r1c{i}" for i in range(1, 9)]  # every call answered, in call order
    assert shown["r1c1"] == "invalid arguments for tool echo: text: Field required"
    assert shown["r1c2"].startswith("invalid arguments for tool echo: not valid JSON")
    assert shown["r1c3"].startswith("invalid arguments for tool lookup:")
    assert "'extra' was unexpected" in shown["r1c3"]
    assert shown["r1c4"] == "unknown tool: nosuch"
    assert shown["r1c5"] == "unknown tool: ghost"
    assert shown["r1c6"] == "tool fail failed: RuntimeError: the disk is full"
    assert shown["r1c7"] == "tool hang timed out after 0.5 s"
    assert shown["r1c8"] == "fine"
    assert asked[2].results == [("r2c1", "after the errors")]  # the loop went on, tools still work
    # The recorded results carry is_error, as the model's tool messages do (tests/test_tool_loop.py).
    records = await call_records(db, key)
    flags = {name.rsplit("/", 1)[1]: [r.is_error for r in rs] for name, rs in records.items()}
    assert flags == {**{f"r1c{i}": [True] for i in range(1, 8)}, "r1c8": [False], "r2c1": [False]}
    assert runner.alive


@pytest.mark.parametrize("path", ["fast", "parked"])
async def test_a_result_holding_a_nul_reaches_the_model_as_an_error_at_once(
    stack: Stack, js: JetStreamContext, nc: Client, db: CaseDb, path: str
) -> None:
    # Postgres cannot store a NUL: the runner answers with an error the model sees, on the fast
    # path (the case kept its coroutine) and past the hot window (the case parked as a wait).
    hot, seconds = ("5", 0.05) if path == "fast" else ("0.2", 1.0)
    stack.scheduler(TIANSHU_SCHEDULER_TOOL_HOT_WINDOW_S=hot)
    await stack.start_runners(1)
    key = new_key(f"nul-{path}")
    call = {"tool": "nap_nul", "args": {"seconds": seconds, "tag": key}}
    await request_start(nc, "e2e_agent", {"rounds": [[call]], "answer": "told"}, key=key)
    # Within the safety net, far below the call's deadline (30 s timeout + 30 s grace): at once.
    done = await db.wait_state(key, "finished", context=stack.logs)
    assert done["output"] == "told"
    asked = model_calls(stack.workdir, key)
    assert asked[1].results == [("r1c1", nul_message("nap_nul"))]
    timers = [e["name"] for e in await db.journal(key) if e["kind"] == "timer"]
    assert timers == ([] if path == "fast" else ["agent/r1/call/r1c1:wait"])
    records = await call_records(db, key)
    assert records == {
        "agent/r1/call/r1c1": [ToolResult(call_id="r1c1", content=nul_message("nap_nul"), is_error=True)]
    }
    assert tags(stack.tool_log, key) == Counter({key: 1})
    assert (await js.stream_info(subjects.STREAM_DLQ)).state.messages == 0


async def test_a_call_whose_deadline_passed_while_no_runner_ran_is_never_executed(
    stack: Stack, js: JetStreamContext, nc: Client, db: CaseDb
) -> None:
    # Deadline: 0.2 s hot window + 0.5 s tool timeout + 0.3 s grace after the call is sent.
    stack.scheduler(TIANSHU_SCHEDULER_TOOL_HOT_WINDOW_S="0.2", TIANSHU_SCHEDULER_TOOL_GRACE_S="0.3")
    key = new_key("expired")
    spec = {"rounds": [[nap(0.1, key)]], "answer": "gave up", "tool_timeout_s": 0.5}
    await request_start(nc, "e2e_agent", spec, key=key)
    done = await db.wait_state(key, "finished", context=stack.logs)
    assert done["output"] == "gave up"
    asked = model_calls(stack.workdir, key)
    assert asked[1].results == [("r1c1", "tool nap: no result arrived before the deadline")]
    # Now a runner starts: the call it finds has expired; it is dead-lettered, never run.
    async with DeadLetters(js) as letters:
        await stack.start_runners(1)
        await until(lambda: letters.all() or None, "the expired call's dead letter", stack)
        (letter,) = letters.all()
    assert letter.reason.value == "expired" and letter.delivery_count == 1
    assert letter.msg_id == call_id(key, "agent/r1/call/r1c1")
    assert tags(stack.tool_log, key) == Counter()  # the tool's side-effect counter stays 0
    info = await js.consumer_info(*CONSUMER)
    assert info.num_ack_pending == 0 and info.num_pending == 0


# -- 5. the slow path --------------------------------------------------------------------------


async def test_a_call_past_the_hot_window_parks_the_case_and_its_result_wakes_it_after_a_restart(
    stack: Stack, js: JetStreamContext, nc: Client, db: CaseDb
) -> None:
    first = stack.scheduler(TIANSHU_SCHEDULER_TOOL_HOT_WINDOW_S="0.5")
    await stack.start_runners(1)
    key = new_key("slow")
    tag = f"{key}/r1c1"
    cid = call_id(key, "agent/r1/call/r1c1")
    await request_start(nc, "e2e_agent", {"rounds": [[nap(3.0, tag)]], "answer": "woken"}, key=key)
    # Past the hot window the case parks as an ordinary wait on the call id.
    await db.wait_state(key, "waiting", context=stack.logs)
    assert await db.waits(key) == [(TOOL_RESULT_RESOURCE, cid, "agent/r1/call/r1c1")]
    assert "agent/r1/call/r1c1:wait" in [e["name"] for e in await db.journal(key) if e["kind"] == "timer"]
    assert await db.timers(key) == ["agent/r1/call/r1c1:wait"]

    # Restart the scheduler while the tool runs.
    assert await asyncio.to_thread(first.terminate, 30) == 0, first.log_tail()
    stopped_at = time.time()
    (running,) = [r for r in executions(stack.tool_log) if r.tag == tag]
    assert running.end is None, "the tool ended before the scheduler was stopped"
    second = stack.scheduler(TIANSHU_SCHEDULER_TOOL_HOT_WINDOW_S="0.5")

    done = await db.wait_state(key, "finished", context=stack.logs)
    assert done["output"] == "woken"
    (run,) = [r for r in executions(stack.tool_log) if r.tag == tag]  # one execution, no second
    assert run.end is not None and run.end > stopped_at
    records = await call_records(db, key)
    assert records == {"agent/r1/call/r1c1": [ToolResult(call_id="r1c1", content="napped 3 s")]}
    assert await db.event_count(TOOL_RESULT_RESOURCE, cid) == 1
    asked = model_calls(stack.workdir, key)
    assert [(c.round, c.pid) for c in asked] == [(1, first.pid), (2, second.pid)]
    assert asked[1].results == [("r1c1", "napped 3 s")]
    assert await db.waits(key) == []  # (its timer stays until due, then wakes nothing: the case ended)
    assert_steps_once(await db.steps(key))


# -- the partition rule and the result limit, through the service -------------------------------


async def test_read_only_calls_overlap_an_exclusive_one_overlaps_nothing_and_long_results_are_cut(
    stack: Stack, nc: Client, db: CaseDb
) -> None:
    stack.scheduler()
    await stack.start_runners(2, TIANSHU_TOOL_RUNNER_MAX_RESULT_BYTES="2000")
    key = new_key("partition")
    first_round = [
        nap(0.3, f"{key}/a"),
        nap(0.3, f"{key}/b"),
        {"tool": "sleep", "args": {"seconds": 0.3, "tag": f"{key}/x"}},  # exclusive
        nap(0.3, f"{key}/c"),
        nap(0.3, f"{key}/d"),
    ]
    spec = {"rounds": [first_round, [{"tool": "big", "args": {"size": 10_001}}]], "answer": "cut"}
    await request_start(nc, "e2e_agent", spec, key=key)
    assert (await db.wait_state(key, "finished", context=stack.logs))["output"] == "cut"

    runs = {r.tag.rsplit("/", 1)[1]: r for r in executions(stack.tool_log) if r.tag.startswith(key)}
    assert sorted(runs) == ["a", "b", "c", "d", "x"]

    def overlap(p: str, q: str) -> bool:
        one, two = runs[p], runs[q]
        assert one.end is not None and two.end is not None
        return one.start < two.end and two.start < one.end

    # Compared as intervals (from whichever runner ran each), not durations.
    assert overlap("a", "b") and overlap("c", "d")
    assert not any(overlap("x", other) for other in "abcd"), runs
    asked = model_calls(stack.workdir, key)
    assert [i for i, _ in asked[1].results] == [f"r1c{i}" for i in range(1, 6)]  # call order kept
    # The long result reached the model cut to the runners' limit, with the marker.
    ((call, content),) = asked[2].results
    assert call == "r2c1" and len(content.encode()) <= 2000
    kept = len(content.encode()) - len(content.split("\n")[-1].encode()) - 1
    assert content.endswith(f"\n[truncated: {kept} of 10001 bytes]") and kept > 1900


@pytest.mark.parametrize("tool", ["big", "quotes"])
async def test_a_result_the_runner_cuts_still_fits_the_schedulers_event_limit_once_wrapped(
    stack: Stack, js: JetStreamContext, nc: Client, db: CaseDb, tool: str
) -> None:
    # The runner's result limit (256 KiB) does not fit under the event limit (64 KiB) both
    # services are given: the runner says so at start and cuts results to what fits once wrapped,
    # JSON escaping included (`quotes`: each of its bytes takes two in JSON). A result that did
    # not fit would be dead-lettered `too_large` by the scheduler, and the model told at the
    # call's deadline that no result arrived.
    limit = 64 * 1024
    stack.scheduler(TIANSHU_MAX_EVENT_PAYLOAD_BYTES=str(limit), TIANSHU_SCHEDULER_TOOL_GRACE_S="1")
    (runner,) = await stack.start_runners(
        1, TIANSHU_MAX_EVENT_PAYLOAD_BYTES=str(limit), TIANSHU_TOOL_RUNNER_MAX_RESULT_BYTES=str(256 * 1024)
    )
    key = new_key(f"fit-{tool}")
    call = {"tool": tool, "args": {"size": 200_000}}
    await request_start(
        nc, "e2e_agent", {"rounds": [[call]], "answer": "fitted", "tool_timeout_s": 5}, key=key
    )
    done = await db.wait_state(key, "finished", context=stack.logs)
    assert done["output"] == "fitted"
    ((call_id, content),) = model_calls(stack.workdir, key)[1].results
    assert call_id == "r1c1" and content.endswith(" of 200000 bytes]"), content[-200:]
    assert len(ToolResult(call_id="r1c1", content=content).model_dump_json().encode()) < limit
    assert (
        "does not fit under the NATS max_payload (8388608) and TIANSHU_MAX_EVENT_PAYLOAD_BYTES (65536)"
        in (runner.log_text())
    )
    assert (await js.stream_info(subjects.STREAM_DLQ)).state.messages == 0


# -- tracing -----------------------------------------------------------------------------------


async def test_a_tool_call_is_traced_across_the_scheduler_and_the_runner(
    stack: Stack, nc: Client, db: CaseDb
) -> None:
    """Both services export over OTLP; the runner's span for a call joins the case's trace."""
    collector = OtlpCollector()
    try:
        otlp = {"OTEL_EXPORTER_OTLP_ENDPOINT": collector.url, "OTEL_BSP_SCHEDULE_DELAY": "100"}
        scheduler = stack.scheduler(**otlp)
        (runner,) = await stack.start_runners(1, None, **otlp)
        key = new_key("traced")
        spec = {"rounds": [[{"tool": "echo", "args": {"text": "hi"}}]], "answer": "done"}
        await request_start(nc, "e2e_agent", spec, key=key)
        await db.wait_state(key, "finished", context=stack.logs)
        assert scheduler.terminate() == 0 and runner.terminate() == 0  # flush the buffered spans
    finally:
        collector.close()
    spans = collector.spans
    runs = [s for s in by_name(spans, "tianshu.run_case") if s["attributes"]["tianshu.case_key"] == key]
    assert runs and len({r["trace_id"] for r in runs}) == 1
    case_trace = runs[0]["trace_id"]
    on_runner = [s for s in spans if s["service"] == "tianshu-tool-runner" and s["trace_id"] == case_trace]
    assert on_runner, (
        f"no runner span in the case's trace: {sorted({(s['service'], s['name']) for s in spans})}"
    )
    assert one(spans, "tianshu.tool")["trace_id"] == case_trace
