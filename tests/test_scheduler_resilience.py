"""The scheduler under failure: killed, frozen, stopped, replicated, cut off from NATS, commanded.

Every test runs real `python -m tianshu_scheduler` processes against real Postgres and a real
nats-server, and drives them only the way an outside system can: NATS messages in, the database
(and each step body's line in the effects log) to observe. Waits poll an observable condition;
their time limits are safety nets against a hang, never performance thresholds.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import threading
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import nats
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg

from tests._nats import NatsServerFactory
from tests._services import (
    CaseDb,
    SchedulerProcess,
    effects,
    eventually,
    executions,
    fresh_database,
    new_key,
    pids_by_case,
    publish_event,
    publish_start,
    request_start,
    send_command,
)
from tests.e2e_workflows import registry as e2e_registry
from tianshu_contracts import CancelCase, PauseCase, ResumeCase, subjects
from tianshu_core import Engine, ExecutionState, connect_postgres

pytestmark = [pytest.mark.e2e, pytest.mark.nats, pytest.mark.postgres]

STEPS = [f"s{i}" for i in range(10)]
Spawn = Callable[..., SchedulerProcess]


@pytest.fixture
async def nc(nats_url: str) -> AsyncIterator[Client]:
    client = await nats.connect(nats_url)
    yield client
    await client.close()


@pytest.fixture
async def db(pg_migrated_url: str) -> AsyncIterator[CaseDb]:
    case_db = await CaseDb.open(pg_migrated_url)
    yield case_db
    await case_db.close()


@pytest.fixture
def replicas() -> Iterator[list[SchedulerProcess]]:
    """The scheduler processes a test started; all killed (thawed first) at its end."""
    started: list[SchedulerProcess] = []
    yield started
    for replica in started:
        replica.__exit__()


@pytest.fixture
def spawn(tmp_path: Path, pg_migrated_url: str, nats_url: str, replicas: list[SchedulerProcess]) -> Spawn:
    """`spawn(nats_url_=..., **env)`: start one more scheduler replica and wait until it is ready."""

    def start(*, nats_url_: str | None = None, **env: str) -> SchedulerProcess:
        replica = SchedulerProcess(tmp_path, pg_migrated_url, nats_url_ or nats_url, **env)
        replicas.append(replica)
        return replica.start()

    return start


def logs(replicas: list[SchedulerProcess]) -> Callable[[], str]:
    """For failure messages: the tail of every replica's log."""
    return lambda: "\n".join(f"--- {r.name} (pid {r.pid})\n{r.log_tail(25)}" for r in replicas)


def assert_consistent_history(journal: list[dict[str, Any]]) -> None:
    """seq runs 1, 2, 3, … without a gap; each step name appears once; tokens never go back."""
    assert [e["seq"] for e in journal] == list(range(1, len(journal) + 1)), journal
    names = [e["name"] for e in journal if e["kind"] == "step"]
    assert len(names) == len(set(names)), f"a step checkpointed twice: {names}"
    tokens = [e["token"] for e in journal]
    assert tokens == sorted(tokens), f"lease tokens went back: {tokens}"


async def steps_at_least(db: CaseDb, key: str, n: int) -> list[str] | None:
    steps = await db.steps(key)
    return steps if len(steps) >= n else None


@pytest.mark.slow
async def test_sigkill_mid_workflow_then_a_new_replica_finishes_it(
    tmp_path: Path, spawn: Spawn, replicas: list[SchedulerProcess], nc: Client, db: CaseDb
) -> None:
    first = spawn()
    key = await request_start(nc, "e2e_steps", {"steps": 10, "delay_s": 0.1}, key=new_key("kill"))
    await eventually(lambda: steps_at_least(db, key, 3), what="3 steps done", context=logs(replicas))
    first.kill()
    # What was durable when the process died (read after the kill: nothing of it can come later).
    checkpointed = await db.steps(key)
    assert (await db.case(key))["execution_state"] == "running"
    assert 3 <= len(checkpointed) < 10, checkpointed

    second = spawn()  # takes the case over once the dead replica's lease expires
    done = await db.wait_state(key, "finished", context=logs(replicas))

    assert done["output"] == {"steps": 10}
    journal = await db.journal(key)
    assert_consistent_history(journal)
    assert [e["name"] for e in journal if e["kind"] == "step"] == STEPS  # nothing lost
    runs = executions(tmp_path)
    for step in checkpointed:
        assert runs[(key, step)] == 1, f"{step} was checkpointed before the kill, yet ran again"
    rest = [s for s in STEPS if s not in checkpointed]
    assert all(runs[(key, s)] >= 1 for s in rest)
    # Only the step in flight at the kill may have run twice (at-least-once body).
    assert sum(runs[(key, s)] for s in rest) <= len(rest) + 1, runs
    assert pids_by_case(tmp_path)[key] == {first.pid, second.pid}


async def test_two_replicas_share_200_cases_and_run_no_step_twice(
    tmp_path: Path, spawn: Spawn, replicas: list[SchedulerProcess], nc: Client, db: CaseDb
) -> None:
    a, b = spawn(), spawn()
    keys = [new_key(f"spread{i}") for i in range(200)]
    for key in keys:  # fire and forget: JetStream publishes, no reply
        await publish_start(nc, "e2e_steps", key, {"steps": 10, "delay_s": 0.005})
    await db.wait_all(keys, within=120, context=logs(replicas))

    runs = executions(tmp_path)
    twice = {(k, s): n for k in keys for s in STEPS if (n := runs[(k, s)]) != 1}
    assert not twice, f"step bodies that did not run exactly once: {twice}"
    pids = pids_by_case(tmp_path)
    per_replica = Counter(pid for key in keys for pid in pids[key])
    assert set(per_replica) <= {a.pid, b.pid}
    for replica in (a, b):
        assert per_replica[replica.pid] >= 50, f"uneven spread: {dict(per_replica)} (a={a.pid}, b={b.pid})"


@pytest.mark.slow
async def test_a_frozen_replica_is_fenced_off_after_another_takes_its_case(
    tmp_path: Path, spawn: Spawn, replicas: list[SchedulerProcess], nc: Client, db: CaseDb
) -> None:
    a, b = spawn(), spawn()
    key = await request_start(nc, "e2e_slow_step", {"seconds": 1.5}, key=new_key("fence"))

    async def holder() -> dict[str, Any] | None:
        case = await db.case(key)
        return case if "first" in await db.steps(key) and case["lease_owner"] else None

    held = await eventually(holder, what="first step done, case held", context=logs(replicas))
    stale = {a.owner: a, b.owner: b}[held["lease_owner"]]
    other = b if stale is a else a
    stale.signal(signal.SIGSTOP)  # frozen inside the slow step, holding the lease
    stale_token = held["lease_token"]

    done = await db.wait_state(key, "finished", context=logs(replicas))
    assert done["output"] == {"pid": other.pid}
    assert done["lease_token"] > stale_token
    history = await db.journal(key)

    stale.signal(signal.SIGCONT)  # it wakes up, finishes its step body and tries to write
    refusal = f"lease on case '{key}' with token {stale_token} is no longer held; write refused"
    await eventually(
        lambda: _true(refusal in stale.log_text()), what="the stale replica's write refused", within=30
    )

    assert await db.journal(key) == history, "a late write got through"
    after = await db.case(key)
    assert (after["execution_state"], after["output"]) == ("finished", {"pid": other.pid})
    assert_consistent_history(history)
    assert [e["name"] for e in history if e["kind"] == "step"] == ["first", "slow", "last"]
    by_name = {e["name"]: e["token"] for e in history if e["kind"] == "step"}
    assert by_name["first"] == stale_token < by_name["slow"] == by_name["last"]
    # The stale body did run to its end (at-least-once), but only the new holder's result counts.
    slow_pids = [pid for k, what, pid in effects(tmp_path) if k == key and what == "slow"]
    assert sorted(slow_pids) == sorted([stale.pid, other.pid])
    runs = executions(tmp_path)
    assert runs[(key, "first")] == runs[(key, "last")] == 1
    assert stale.proc is not None and stale.proc.poll() is None, "the fenced replica should keep serving"


FENCED_WRITES = ["step", "state", "session_state", "timer", "child", "waits", "outcome"]


@pytest.mark.slow
async def test_a_frozen_replica_writes_nothing_of_any_kind_once_another_took_its_cases(
    tmp_path: Path, pg_server_url: str, nats_url: str, replicas: list[SchedulerProcess], nc: Client
) -> None:
    """Each case stalls in the first replica just before one kind of write; that replica is
    frozen (SIGSTOP) past its leases; a second replica takes every case and moves it on (makes its
    own write of that kind and parks it), then stops; the first is thawed (SIGCONT). Nothing in
    the database changes after that, and the thawed runs stop at their next durable call."""
    stall = tmp_path / "stall"
    stall.mkdir()
    async with fresh_database(pg_server_url, "tianshu_fence") as url:  # no other test's cases
        db = await CaseDb.open(url)
        try:
            stale = SchedulerProcess(tmp_path, url, nats_url, TIANSHU_TEST_STALL=str(stall))
            replicas.append(stale.start())
            keys = {
                kind: await request_start(nc, "e2e_fence", {"write": kind}, key=new_key(f"fence-{kind}"))
                for kind in FENCED_WRITES
            }
            await eventually(
                lambda: _true(all((stall / key).exists() for key in keys.values())),
                what="every case stalled before its write",
                context=logs(replicas),
            )
            stale.signal(signal.SIGSTOP)

            live = SchedulerProcess(tmp_path, url, nats_url)
            replicas.append(live.start())
            moved_on = {key: "finished" if kind == "outcome" else "waiting" for kind, key in keys.items()}
            await eventually(
                lambda: _moved_on(db, moved_on, keys["child"]),
                what="the live replica moved every case on",
                within=60,
                context=logs(replicas),
            )
            assert live.terminate() == 0  # from here on, only the frozen replica could change anything
            before = await db.everything()

            (stall / "go").touch()
            stale.signal(signal.SIGCONT)
            refusals = [
                re.compile(rf"lease on case {re.escape(repr(k))} with token \d+ is no longer held")
                for k in keys.values()
            ]
            await eventually(
                lambda: _true(all(r.search(stale.log_text()) for r in refusals)),
                what="every thawed run stopped",
                context=logs(replicas),
            )

            assert await db.everything() == before, "a write of the frozen replica landed"
            assert (keys["step"], "step", stale.pid) not in effects(tmp_path), "a stale step body ran"
            assert stale.proc is not None and stale.proc.poll() is None, "it should keep serving"
        finally:
            for replica in replicas:  # before the database goes
                replica.kill()
            await db.close()


async def _moved_on(db: CaseDb, states: dict[str, str], parent: str) -> bool:
    """Every case in its state, and the child the live replica spawned finished."""
    children = await db.pool.fetch("SELECT execution_state FROM tianshu_cases WHERE parent_key = $1", parent)
    return await db.states(list(states)) == states and [c[0] for c in children] == ["finished"]


@pytest.mark.slow
async def test_sigterm_releases_running_cases_in_bounded_time_and_nothing_is_lost(
    tmp_path: Path, spawn: Spawn, replicas: list[SchedulerProcess], nc: Client, db: CaseDb
) -> None:
    first = spawn(TIANSHU_SCHEDULER_SHUTDOWN_TIMEOUT_S="0.5")
    keys = [
        await request_start(nc, "e2e_steps", {"steps": 10, "delay_s": 0.4}, key=new_key(f"term{i}"))
        for i in range(8)
    ]

    async def all_started() -> bool:
        return min((await db.step_counts(keys)).values()) >= 1

    await eventually(all_started, what="every case has a step done", context=logs(replicas))
    first.signal(signal.SIGTERM)
    code = first.wait_exit(timeout_s=30)  # safety net only; the bound is checked just below
    # Bounded: it did not wait for its cases to finish (each had seconds of steps left) ...
    assert set((await db.states(keys)).values()) == {"running"}
    assert code == 3, f"exit code {code}: expected 3 (in-flight work cut short)\n{first.log_tail()}"
    assert "released 8 cases still running at shutdown" in first.log_text()
    # ... and it handed them back instead of leaving them to the lease's expiry.
    for key in keys:
        assert (await db.case(key))["lease_owner"] is None, f"{key} still leased after shutdown"
    checkpointed = {key: await db.steps(key) for key in keys}

    spawn()
    await db.wait_all(keys, context=logs(replicas))
    runs = executions(tmp_path)
    for key in keys:
        journal = await db.journal(key)
        assert_consistent_history(journal)
        assert [e["name"] for e in journal if e["kind"] == "step"] == STEPS
        assert all(runs[(key, s)] == 1 for s in checkpointed[key]), (key, checkpointed[key], runs)
        rest = [s for s in STEPS if s not in checkpointed[key]]
        assert all(runs[(key, s)] >= 1 for s in rest)
        assert sum(runs[(key, s)] for s in rest) <= len(rest) + 1


@pytest.mark.slow
async def test_sleep_and_wait_timeout_fire_after_a_scheduler_restart(
    tmp_path: Path, spawn: Spawn, replicas: list[SchedulerProcess], nc: Client, db: CaseDb
) -> None:
    first = spawn()
    sleeper = await request_start(nc, "e2e_sleep", {"seconds": 4}, key=new_key("sleep"))
    timing_out = await request_start(nc, "e2e_timeout", {"seconds": 4}, key=new_key("timeout"))
    answered = await request_start(nc, "e2e_timeout", {"seconds": 120}, key=new_key("answer"))
    for key in (sleeper, timing_out, answered):
        await db.wait_state(key, "waiting", context=logs(replicas))
    assert first.terminate() == 0
    # Nothing was in flight: the stop drained NATS instead of waiting out the drain timeout.
    assert "timed out" not in first.log_text() and "did not finish" not in first.log_text()

    # The old scheduler is gone and no timer has fired yet: only the database remembers them.
    for key in (sleeper, timing_out, answered):
        assert (await db.case(key))["execution_state"] == "waiting"
        assert await db.timers(key), f"{key} has no timer"

    second = spawn()
    await publish_event(nc, "reply", answered, {"ok": True})
    slept = await db.wait_state(sleeper, "finished", context=logs(replicas))
    timed_out = await db.wait_state(timing_out, "finished", context=logs(replicas))
    replied = await db.wait_state(answered, "finished", context=logs(replicas))

    assert slept["finished_type"] == "done"
    assert timed_out["finished_type"] == "timed_out"
    assert (replied["finished_type"], replied["output"]) == ("answered", {"ok": True})
    ran = [(what, pid) for key, what, pid in effects(tmp_path) if key == sleeper]
    assert ran == [("before", first.pid), ("after", second.pid)]
    for key in (sleeper, timing_out):
        assert await db.timers(key) == []


async def test_scheduler_rides_out_a_nats_server_restart_without_losing_events(
    tmp_path: Path,
    spawn: Spawn,
    replicas: list[SchedulerProcess],
    db: CaseDb,
    make_nats_server: NatsServerFactory,
) -> None:
    server = make_nats_server()  # this test's own server: the session's is never disturbed
    # A short ack wait: a message pushed to the scheduler just before the outage comes again soon.
    sched = spawn(nats_url_=server.url, TIANSHU_SCHEDULER_ACK_WAIT_S="3")
    client = await nats.connect(server.url, reconnect_time_wait=0.1, max_reconnect_attempts=-1)
    try:
        before = [await request_start(client, "e2e_wait", key=new_key(f"pre{i}")) for i in range(10)]
        after = [await request_start(client, "e2e_wait", key=new_key(f"post{i}")) for i in range(5)]
        for key in before + after:
            await db.wait_state(key, "waiting", context=logs(replicas))

        # The scheduler is frozen while these are published, so it cannot have handled any of them
        # when the server goes down: they exist only in the stream (or, pushed to the frozen
        # process by a pull request still open, as unacknowledged deliveries).
        sched.signal(signal.SIGSTOP)
        for i, key in enumerate(before):
            await publish_event(client, "order", key, {"before": i}, msg_id=f"ev-{key}")
        server.stop()
        assert set((await db.states(before)).values()) == {"waiting"}
        server.start()
        sched.signal(signal.SIGCONT)  # finds its connection gone and has to reconnect by itself
        await eventually(
            lambda: _true("reconnected to NATS" in sched.log_text()),
            what="scheduler reconnected",
            context=logs(replicas),
        )
        await eventually(lambda: _true(client.is_connected), what="test client reconnected")

        for i, key in enumerate(after):
            await publish_event(client, "order", key, {"after": i}, msg_id=f"ev-{key}")
        # A request after the restart reaches the scheduler's responder too.
        probe = await request_start(client, "e2e_steps", {"steps": 1}, key=new_key("probe"))

        await db.wait_all([*before, *after, probe], context=logs(replicas))
        for i, key in enumerate(before):
            assert (await db.case(key))["output"] == {"before": i}
        for i, key in enumerate(after):
            assert (await db.case(key))["output"] == {"after": i}
        runs = executions(tmp_path)
        assert all(runs[(key, "after")] == 1 for key in before + after)
        assert sched.proc is not None and sched.proc.poll() is None
    finally:
        await client.close()


@pytest.mark.slow
async def test_cancel_pause_and_resume_by_message(
    tmp_path: Path, spawn: Spawn, replicas: list[SchedulerProcess], nc: Client, db: CaseDb
) -> None:
    spawn()
    cancelled = await request_start(nc, "e2e_steps", {"steps": 10, "delay_s": 0.2}, key=new_key("cancel"))
    paused = await request_start(nc, "e2e_steps", {"steps": 10, "delay_s": 0.2}, key=new_key("pause"))
    waiter = await request_start(nc, "e2e_wait", key=new_key("cwait"))
    finished_sub = await nc.subscribe(subjects.case_finished(cancelled))
    await eventually(lambda: steps_at_least(db, cancelled, 2), what="2 steps", context=logs(replicas))
    await eventually(lambda: steps_at_least(db, paused, 2), what="2 steps", context=logs(replicas))
    await db.wait_state(waiter, "waiting", context=logs(replicas))

    cancel_at = len(await db.steps(cancelled))
    await send_command(nc, CancelCase(case_key=cancelled, reason="test"))
    pause_at = len(await db.steps(paused))
    await send_command(nc, PauseCase(case_key=paused))
    await send_command(nc, CancelCase(case_key=waiter))

    async def steps_once(key: str, lifecycle: str) -> list[str] | None:
        """The steps checkpointed when the command is seen to have taken effect."""
        if (await db.case(key))["lifecycle"] != lifecycle:
            return None
        return await db.steps(key)  # read after the change: the fence refuses anything later

    async def run_ended(key: str) -> bool:
        return (await db.case(key))["lease_owner"] is None

    stopped_steps = await eventually(partial(steps_once, cancelled, "stop"), what="cancel took effect")
    paused_steps = await eventually(partial(steps_once, paused, "pause"), what="pause took effect")
    for key in (cancelled, paused, waiter):
        await eventually(partial(run_ended, key), what=f"run of {key} ended", context=logs(replicas))
    assert (await db.case(waiter))["lifecycle"] == "stop"
    notice = json.loads((await finished_sub.next_msg(timeout=10)).data)
    assert (notice["kind"], notice["lifecycle_state"]) == ("case_finished", "stop")
    # Stopped at the next step boundary: the step in flight when the command took effect was not
    # checkpointed, and neither was anything after it.
    assert await db.steps(cancelled) == stopped_steps and cancel_at <= len(stopped_steps) < 10
    assert await db.steps(paused) == paused_steps and pause_at <= len(paused_steps) < 10
    # An event for the cancelled waiter must not bring it back.
    await publish_event(nc, "order", waiter, {"late": True})

    # Let the scheduler get through many sweeps (and the event) with a case of its own, then look again.
    probe = await request_start(nc, "e2e_steps", {"steps": 10, "delay_s": 0.1}, key=new_key("probe"))
    await db.wait_state(probe, "finished", context=logs(replicas))
    assert await db.steps(cancelled) == stopped_steps
    assert await db.steps(paused) == paused_steps
    for key, lifecycle in ((cancelled, "stop"), (paused, "pause"), (waiter, "stop")):
        case = await db.case(key)
        assert case["lifecycle"] == lifecycle and case["execution_state"] != "finished", case
    runs = executions(tmp_path)
    assert runs[(waiter, "after")] == 0
    # Bodies after the last checkpoint: only the one in flight when the command came may have run.
    assert sum(runs[(cancelled, s)] for s in STEPS[len(stopped_steps) :]) <= 1

    await send_command(nc, ResumeCase(case_key=paused))
    done = await db.wait_state(paused, "finished", context=logs(replicas))
    assert done["lifecycle"] == "normal"
    journal = await db.journal(paused)
    assert_consistent_history(journal)
    assert [e["name"] for e in journal if e["kind"] == "step"] == STEPS
    runs = executions(tmp_path)
    assert all(runs[(paused, s)] == 1 for s in paused_steps)
    assert (await db.case(cancelled))["execution_state"] == "running"  # still stopped, not finished


async def test_a_cancel_between_checkpoints_is_not_undone_by_the_run_it_interrupts(
    tmp_path: Path, spawn: Spawn, replicas: list[SchedulerProcess], nc: Client, db: CaseDb
) -> None:
    spawn()
    key = await request_start(nc, "e2e_think_then_wait", {"seconds": 1}, key=new_key("think"))
    await eventually(lambda: steps_at_least(db, key, 1), what="first step", context=logs(replicas))
    # The run is now working outside any step: nothing it writes before it parks the case is a
    # checkpoint, so no fenced journal append notices the cancel.
    await send_command(nc, CancelCase(case_key=key))

    async def parked() -> dict[str, Any] | None:
        case = await db.case(key)
        return case if case["execution_state"] == "waiting" and case["lease_owner"] is None else None

    case = await eventually(parked, what="the run parked the case", context=logs(replicas))
    assert case["lifecycle"] == "stop", f"the cancel was undone: {case}"
    await publish_event(nc, "order", key, {"late": True})
    probe = await request_start(nc, "e2e_steps", {"steps": 5, "delay_s": 0.1}, key=new_key("probe"))
    await db.wait_state(probe, "finished", context=logs(replicas))
    assert executions(tmp_path)[(key, "after")] == 0
    assert (await db.case(key))["lifecycle"] == "stop"


async def test_parent_with_20_children_finishes_with_their_outputs_in_order(
    tmp_path: Path, spawn: Spawn, replicas: list[SchedulerProcess], nc: Client, db: CaseDb
) -> None:
    spawn()
    spawn()
    key = await request_start(nc, "e2e_parent", {"children": 20}, key=new_key("fan"))
    done = await db.wait_state(key, "finished", within=60, context=logs(replicas))

    assert done["output"] == [{"n": i, "did": f"child-{i}"} for i in range(20)]
    children = await db.pool.fetch(
        "SELECT case_key, execution_state, resource_data::text AS input FROM tianshu_cases "
        "WHERE parent_key = $1",
        key,
    )
    assert len(children) == 20
    assert {c["execution_state"] for c in children} == {"finished"}
    runs = executions(tmp_path)
    for child in children:
        n = json.loads(child["input"])["n"]
        assert runs[(child["case_key"], f"child-{n}")] == 1
    journal = await db.journal(key)
    assert_consistent_history(journal)


async def _true(value: bool) -> bool:
    return value


async def test_the_sweep_runs_a_case_whose_event_was_stored_while_no_scheduler_ran(
    tmp_path: Path,
    spawn: Spawn,
    replicas: list[SchedulerProcess],
    db: CaseDb,
    pg_migrated_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("TIANSHU_TEST_EFFECTS", str(tmp_path))
    key = new_key("unseen")
    stores = await connect_postgres(pg_migrated_url, max_size=2)
    try:
        parked = await Engine(stores, e2e_registry).run_workflow("e2e_wait", case_key=key)
        assert parked.execution_state is ExecutionState.WAITING
        # Its event stored without its wake, as a replica of an older release dying between the
        # two could leave it; no scheduler runs.
        now = datetime.now(UTC)
        await stores.events.publish(
            "order", key, {"late": 1}, event_id=None, published_at=now, dedupe_since=now
        )
    finally:
        await stores.close()
    spawn()
    done = await db.wait_state(key, "finished", context=logs(replicas))
    assert done["output"] == {"late": 1}


class _SlowLink:
    """A TCP proxy to Postgres that holds every chunk `delay_s` each way, as a distant database
    would: whatever a scheduler does in round trips after a commit takes long enough for a kill
    to land in the middle of it. It runs on a thread of its own (starting a scheduler blocks the
    test's loop)."""

    def __init__(self, url: str, delay_s: float) -> None:
        parts = urlsplit(url)
        self._target = (parts.hostname or "127.0.0.1", parts.port or 5432)
        self._url, self._delay_s = parts, delay_s
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    def start(self) -> str:
        """Listen; the URL to give the scheduler."""
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._serve, "127.0.0.1", 0), self._loop
        ).result(10)
        port = self._server.sockets[0].getsockname()[1]
        user = f"{self._url.username}@" if self._url.username else ""
        return urlunsplit(self._url._replace(netloc=f"{user}127.0.0.1:{port}"))

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in self._writers:
            writer.close()
        pipes = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for pipe in pipes:
            pipe.cancel()
        await asyncio.gather(*pipes, return_exceptions=True)
        await asyncio.sleep(0.05)  # the transports' last callbacks close their sockets

    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        self._writers.add(client_w)
        try:
            server_r, server_w = await asyncio.open_connection(*self._target)
        except OSError:
            client_w.close()
            return
        self._writers.add(server_w)
        await asyncio.gather(self._pipe(client_r, server_w), self._pipe(server_r, client_w))

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                await asyncio.sleep(self._delay_s)
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()


@pytest.mark.slow
async def test_sigkill_loop_over_a_parent_of_50_children_loses_no_wake(
    tmp_path: Path,
    spawn: Spawn,
    replicas: list[SchedulerProcess],
    nc: Client,
    db: CaseDb,
    pg_migrated_url: str,
) -> None:
    """SIGKILL the scheduler as soon as children report their end, the last one's above all (the
    moment its parent's wake must already be committed), and restart it each time; three parents
    in a row, the scheduler's database 5 ms away each way. A child's report is sent after its
    outcome is stored: one whose scheduler died in between never comes, so the children already
    ended are read back after each restart."""
    ended: asyncio.Queue[str] = asyncio.Queue()

    async def on_finished(msg: Msg) -> None:
        await ended.put(subjects.case_key_of(msg.subject))

    async def ended_children(parent: str) -> set[str]:
        rows = await db.pool.fetch(
            "SELECT case_key FROM tianshu_cases WHERE parent_key = $1 AND execution_state = 'finished'",
            parent,
        )
        return {r["case_key"] for r in rows}

    sub = await nc.subscribe(subjects.CASE_FINISHES, cb=on_finished)
    link = _SlowLink(pg_migrated_url, delay_s=0.005)
    database_url = link.start()
    replica = spawn(TIANSHU_DATABASE_URL=database_url)
    kills = 0
    try:
        for round_ in range(3):
            # The last child ends a while after the others: by then the parent has parked.
            key = await request_start(
                nc, "e2e_parent", {"children": 50, "last_delay_s": 1.0}, key=new_key(f"fan50-{round_}")
            )
            seen: set[str] = set()
            kill_at = [1, 25, 50]  # kill when this many children have ended
            while kill_at:
                child = await asyncio.wait_for(ended.get(), 60)
                if child == key:
                    break
                seen.add(child)
                if len(seen) >= kill_at[0]:
                    replica.kill()
                    kills += 1
                    kill_at = [n for n in kill_at if n > len(seen)]
                    replica = spawn(TIANSHU_DATABASE_URL=database_url)
                    seen |= await ended_children(key)
            done = await db.wait_state(key, "finished", within=60, context=logs(replicas))
            assert done["output"] == [{"n": i, "did": f"child-{i}"} for i in range(50)]
    finally:
        await sub.unsubscribe()
        replica.kill()
        link.close()
    assert kills >= 6, f"only {kills} kills"
