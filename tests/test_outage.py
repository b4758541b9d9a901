"""A Postgres outage delays work and loses none.

A scheduler and a tool runner run as processes, with a short delivery budget, against a Postgres of
this test's own (`tianshu_core.local.embedded` on a temporary data directory: the session's server and
the machine's are never stopped) and the session's NATS. Cases of `e2e_wait_then_agent` (a step, a
wait for an event, one tool call, a step) are in three groups when Postgres goes down:

- `waiter`: waiting for their event, which is published during the outage;
- `caller`: parked on a tool call that is running; its result arrives during the outage;
- `late`: started (published on `tianshu.v1.cases.start`) during the outage.

Postgres stays down three times the budget's total backoff (at least 8 s), so a message that spent
its budget on the outage would be dead-lettered long before it ends; then it comes back, on the same
port. Every case must finish, no step body (or tool call, or model reply) that completed may run
again, and the DLQ must hold no letter of this test.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import nats
import pytest

from tests._pg import PrivatePostgres
from tests._services import (
    CaseDb,
    budget_backoff_s,
    eventually,
    executions,
    publish_event,
    publish_start,
    retry_budget_env,
)
from tests._tool_runner import StreamReader
from tests._tool_runner import executions as tool_runs
from tests.e2e_agent import model_calls
from tests.test_tool_service import Stack, assert_steps_once, nap
from tianshu_contracts import DEAD_LETTER_ADAPTER, DeadLetter, subjects
from tianshu_core.stores.postgres import migrate
from tianshu_core.tools import TOOL_RESULT_RESOURCE

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.postgres, pytest.mark.nats]

MAX_DELIVER, RETRY_INITIAL_S, RETRY_MAX_S = 2, 0.2, 0.5
# TIANSHU_TEST_OUTAGE_S makes it longer: 40 s outlasts even the services' default budget (five
# deliveries, each retrying its Postgres calls for seconds), to see a budget spent on an outage.
OUTAGE_S = float(
    os.environ.get("TIANSHU_TEST_OUTAGE_S")
    or max(8.0, 3 * budget_backoff_s(MAX_DELIVER, RETRY_INITIAL_S, RETRY_MAX_S))
)
GROUP = 4  # cases per group
CALL_S = 4.0  # the callers' tool call: it starts before the outage and answers during it
WORKFLOW = "e2e_wait_then_agent"


@pytest.fixture
async def stack(tmp_path: Path, private_pg: PrivatePostgres, nats_url: str) -> AsyncIterator[Stack]:
    await migrate(private_pg.url)
    made = Stack(tmp_path, nats_url, private_pg.url)
    yield made
    made.close()


def spec(key: str, call_s: float) -> dict[str, Any]:
    """The case's input: one round with one `nap` call (tagged with the case key), then the answer."""
    return {"rounds": [[nap(call_s, key)]], "answer": f"answered {key}"}


async def parked_on_its_call(db: CaseDb, stack: Stack, keys: list[str]) -> bool:
    """Every case waits for its tool call's result, and every call has started."""
    started = {r.tag for r in tool_runs(stack.tool_log)}
    for key in keys:
        if key not in started or [w[0] for w in await db.waits(key)] != [TOOL_RESULT_RESOURCE]:
            return False
    return True


async def test_a_postgres_outage_delays_work_and_loses_none(
    stack: Stack, private_pg: PrivatePostgres
) -> None:
    run = f"outage-{uuid.uuid4().hex[:8]}"
    budget = retry_budget_env(MAX_DELIVER, RETRY_INITIAL_S, RETRY_MAX_S)
    # A short hot window: the callers park on their call (and the waiters on their event) before
    # the outage, so no run is in flight when Postgres goes down.
    stack.scheduler(**budget, TIANSHU_SCHEDULER_TOOL_HOT_WINDOW_S="0.5")
    await stack.start_runners(1, None, **budget, TIANSHU_TOOL_RUNNER_CONCURRENCY=str(2 * GROUP))
    waiters, callers, late = ([f"{run}-{group}{i}" for i in range(GROUP)] for group in ("w", "c", "l"))
    everyone = [*waiters, *callers, *late]

    nc = await nats.connect(stack.nats_url)
    async with nc, StreamReader(nc.jetstream(), subjects.DEAD_LETTERS) as dlq:

        def letters() -> list[DeadLetter]:
            """The dead letters of this test (its run id is in every case key)."""
            return [DEAD_LETTER_ADAPTER.validate_json(m.data) for m in dlq.messages if run.encode() in m.data]

        def context() -> str:
            mine = "\n".join(f"{x.subject} ({x.reason.value}): {x.error.message}" for x in letters())
            return f"{stack.logs()}\n--- dead letters of this test:\n{mine or '(none)'}"

        db = await CaseDb.open(private_pg.url)
        try:
            for key in waiters:
                await publish_start(nc, WORKFLOW, key, spec(key, 0.05))
            for key in callers:
                await publish_start(nc, WORKFLOW, key, spec(key, CALL_S))
            await db.wait_all([*waiters, *callers], "waiting", within=30, context=context)
            for key in callers:
                await publish_event(nc, "order", key, {"before": key}, msg_id=f"ev-{key}")
            await eventually(
                lambda: parked_on_its_call(db, stack, callers),
                what="the callers parked on their running calls",
                context=context,
            )
        finally:
            await db.close()

        await asyncio.to_thread(private_pg.stop)
        down_at = time.time()
        for key in waiters:
            await publish_event(nc, "order", key, {"during": key}, msg_id=f"ev-{key}")
        for key in late:
            await publish_start(nc, WORKFLOW, key, spec(key, 0.05))
        await asyncio.sleep(max(0.0, down_at + OUTAGE_S - time.time()))
        up_at = time.time()
        await asyncio.to_thread(private_pg.start)

        db = await CaseDb.open(private_pg.url)
        try:
            await db.wait_all(late, "waiting", within=30, context=context)
            for key in late:
                await publish_event(nc, "order", key, {"after": key}, msg_id=f"ev-{key}")

            async def all_finished() -> bool:
                assert not letters(), f"dead-lettered during or after the outage:\n{context()}"
                states = await db.states(everyone)
                return all(states.get(key) == "finished" for key in everyone)

            await eventually(all_finished, what=f"{len(everyone)} cases finished", within=30, context=context)
            outputs = {key: (await db.case(key))["output"] for key in everyone}
            journals = {key: await db.steps(key) for key in everyone}
        finally:
            await db.close()
        await asyncio.sleep(0.5)  # room for a late repeat (of a step, a call, a dead letter) to show
        assert not letters(), context()

    # Every case got its event and its call's result, whichever side of the outage they came on.
    events = {**{k: {"during": k} for k in waiters}, **{k: {"before": k} for k in callers}}
    events |= {k: {"after": k} for k in late}
    assert outputs == {k: {"event": events[k], "answer": f"answered {k}"} for k in everyone}
    # The callers' calls ran before the outage and answered during it (else this tests less than it says).
    calls = {r.tag: r for r in tool_runs(stack.tool_log)}
    for key in callers:
        end = calls[key].end
        assert end is not None and down_at < end < up_at, (key, calls[key], down_at, up_at)
    # Nothing that completed ran again: no step body, no tool call, no model reply.
    ran = executions(stack.workdir)
    assert {(k, step): ran[(k, step)] for k in everyone for step in ("before", "after")} == {
        (k, step): 1 for k in everyone for step in ("before", "after")
    }
    assert Counter(r.tag for r in tool_runs(stack.tool_log)) == Counter(everyone)
    asked = Counter((c.case, c.round) for c in model_calls(stack.workdir))
    assert {k: n for k, n in asked.items() if k[0] in everyone} == dict.fromkeys(
        ((k, r) for k in everyone for r in (1, 2)), 1
    )
    for key in everyone:
        assert_steps_once(journals[key])
    assert all(s.proc is not None and s.proc.poll() is None for s in stack.schedulers), stack.logs()
    assert all(r.alive for r in stack.runners), stack.logs()
