"""Waits and events in library mode: the payload reaches the workflow, nothing is lost."""

from __future__ import annotations

from typing import Any

import pytest

from tests._backends import Backend
from tianshu_core import (
    ExecutionState,
    InvalidTokenError,
    PayloadTooLargeError,
    PollPredicate,
    RunStatus,
    WaitTimeoutError,
    WorkflowContext,
    WorkflowRegistry,
    WorkflowResult,
    decode_token,
    encode_token,
)


def approval_registry() -> WorkflowRegistry:
    """The seed's approval example, explicit-Waiting style, fixed to read the decision."""
    reg = WorkflowRegistry()

    @reg.workflow("approval")
    async def approval(ctx: WorkflowContext) -> WorkflowResult:
        title = await ctx.step("submitted", lambda: ctx.case.resource_data["title"])
        wait = PollPredicate(
            resource_type="review_decision",
            resource_id=ctx.case.case_key,
            step_name="review_decision_received",
        )
        decision = await ctx.poll(wait)
        if decision is None:
            return ctx.waiting(wait)
        return await ctx.finish(
            decision["decision"], decision.get("reason") or decision["decision"], output={"title": title}
        )

    return reg


async def test_approval_waits_then_finishes_approved(backend: Backend) -> None:
    engine = backend.engine(approval_registry())
    case = await engine.run_workflow("approval", {"title": "Buy GPUs"})
    assert case.execution_state is ExecutionState.WAITING
    await engine.publish_event("review_decision", case.case_key, {"decision": "approved"})
    await engine.run_until_idle()
    done = await engine.get_case(case.case_key)
    assert (done.execution_state, done.finished_type, done.output) == (
        ExecutionState.FINISHED,
        "approved",
        {"title": "Buy GPUs"},
    )


async def test_approval_rejected_with_reason(backend: Backend) -> None:
    engine = backend.engine(approval_registry())
    case = await engine.run_workflow("approval", {"title": "Buy GPUs"})
    await engine.publish_event(
        "review_decision", case.case_key, {"decision": "rejected", "reason": "Budget too high"}
    )
    await engine.run_until_idle()
    done = await engine.get_case(case.case_key)
    assert (done.finished_type, done.finished_description) == ("rejected", "Budget too high")


async def test_approval_without_decision_stays_waiting(backend: Backend) -> None:
    engine = backend.engine(approval_registry())
    case = await engine.run_workflow("approval", {"title": "t"})
    await engine.tick()
    await engine.tick()
    assert (await engine.get_case(case.case_key)).execution_state is ExecutionState.WAITING


def awaiting_registry(times: int = 1) -> WorkflowRegistry:
    reg = WorkflowRegistry()

    @reg.workflow("await")
    async def awaiting(ctx: WorkflowContext) -> WorkflowResult:
        resource = ctx.case.resource_data["resource"]
        got = [await ctx.wait_for_event("order", resource) for _ in range(times)]
        return await ctx.finish("done", output=got)

    return reg


async def test_event_payload_reaches_the_workflow(backend: Backend) -> None:
    engine = backend.engine(awaiting_registry())
    case = await engine.run_workflow("await", {"resource": "o-1"})
    assert case.execution_state is ExecutionState.WAITING
    result = await engine.publish_event("order", "o-1", {"paid": 12.5})
    assert result.woken == [case.case_key]
    await engine.run_until_idle()
    assert (await engine.get_case(case.case_key)).output == [{"paid": 12.5}]


async def test_event_published_before_the_wait_is_not_lost(backend: Backend) -> None:
    engine = backend.engine(awaiting_registry())
    case = await engine.start_case("await", {"resource": "o-early"})
    backend.clock.advance(1)
    await engine.publish_event("order", "o-early", "early")
    await engine.run_until_idle()
    done = await engine.get_case(case.case_key)
    assert (done.execution_state, done.output) == (ExecutionState.FINISHED, ["early"])


async def test_duplicate_event_id_wakes_once(backend: Backend) -> None:
    engine = backend.engine(awaiting_registry(times=2))
    case = await engine.run_workflow("await", {"resource": "o-dup"})
    first = await engine.publish_event("order", "o-dup", 1, event_id="evt-1")
    again = await engine.publish_event("order", "o-dup", 1, event_id="evt-1")
    assert (first.new, again.new, again.woken) == (True, False, [])
    await engine.run_until_idle()
    assert (await engine.get_case(case.case_key)).execution_state is ExecutionState.WAITING
    await engine.publish_event("order", "o-dup", 2, event_id="evt-2")
    await engine.run_until_idle()
    assert (await engine.get_case(case.case_key)).output == [1, 2]


async def test_event_id_dedupe_lasts_only_the_retention(backend: Backend) -> None:
    engine = backend.engine(awaiting_registry())
    await engine.publish_event("order", "o-ret", 1, event_id="same")
    backend.clock.advance(days=8)
    assert (await engine.publish_event("order", "o-ret", 1, event_id="same")).new


async def test_two_cases_waiting_on_one_resource_both_wake(backend: Backend) -> None:
    engine = backend.engine(awaiting_registry())
    a = await engine.run_workflow("await", {"resource": "shared"})
    b = await engine.run_workflow("await", {"resource": "shared"})
    result = await engine.publish_event("order", "shared", "go")
    assert sorted(result.woken) == sorted([a.case_key, b.case_key])
    await engine.run_until_idle()
    for key in (a.case_key, b.case_key):
        assert (await engine.get_case(key)).output == ["go"]


async def test_waiting_twice_gets_successive_events(backend: Backend) -> None:
    engine = backend.engine(awaiting_registry(times=3))
    case = await engine.run_workflow("await", {"resource": "seq"})
    for payload in ("one", "two"):
        backend.clock.advance(1)
        await engine.publish_event("order", "seq", payload)
    await engine.run_until_idle()
    assert (await engine.get_case(case.case_key)).execution_state is ExecutionState.WAITING
    await engine.publish_event("order", "seq", "three")
    await engine.run_until_idle()
    assert (await engine.get_case(case.case_key)).output == ["one", "two", "three"]


async def test_a_new_case_never_sees_older_events(backend: Backend) -> None:
    engine = backend.engine(awaiting_registry())
    await engine.publish_event("order", "old", "stale")
    backend.clock.advance(1)
    case = await engine.run_workflow("await", {"resource": "old"})
    assert case.execution_state is ExecutionState.WAITING
    await engine.publish_event("order", "old", "fresh")
    await engine.run_until_idle()
    assert (await engine.get_case(case.case_key)).output == ["fresh"]


async def test_resource_ids_outside_the_safe_alphabet(backend: Backend) -> None:
    engine = backend.engine(awaiting_registry())
    resource = "user@example.com/inbox 1"
    case = await engine.run_workflow("await", {"resource": resource})
    await engine.publish_event("order", resource, "hi")
    await engine.run_until_idle()
    assert (await engine.get_case(case.case_key)).output == ["hi"]


async def test_bad_events_are_refused(backend: Backend) -> None:
    engine = backend.engine(awaiting_registry(), max_event_payload_bytes=100)
    with pytest.raises(InvalidTokenError):
        await engine.publish_event("order.created", "x", 1)
    with pytest.raises(PayloadTooLargeError):
        await engine.publish_event("order", "x", "y" * 200)


async def test_wait_with_timeout_times_out(backend: Backend) -> None:
    reg = WorkflowRegistry()

    @reg.workflow("timeout")
    async def timeout(ctx: WorkflowContext) -> WorkflowResult:
        try:
            got: Any = await ctx.wait_for_event("reply", ctx.case.case_key, timeout=60)
        except WaitTimeoutError:
            got = "timed out"
        return await ctx.finish("done", output=got)

    engine = backend.engine(reg)
    case = await engine.run_workflow("timeout")
    backend.clock.advance(30)
    await engine.run_until_idle()
    assert (await engine.get_case(case.case_key)).execution_state is ExecutionState.WAITING
    backend.clock.advance(31)
    await engine.run_until_idle()
    assert (await engine.get_case(case.case_key)).output == "timed out"


async def test_wait_with_timeout_gets_event_in_time(backend: Backend) -> None:
    reg = WorkflowRegistry()

    @reg.workflow("intime")
    async def intime(ctx: WorkflowContext) -> WorkflowResult:
        got = await ctx.wait_for_event("reply", ctx.case.case_key, timeout=60)
        return await ctx.finish("done", output=got)

    engine = backend.engine(reg)
    case = await engine.run_workflow("intime")
    await engine.publish_event("reply", case.case_key, "yes")
    backend.clock.advance(120)
    await engine.run_until_idle()
    assert (await engine.get_case(case.case_key)).output == "yes"


async def test_durable_sleep_follows_the_engine_clock(backend: Backend) -> None:
    reg = WorkflowRegistry()
    ran: list[int] = []

    @reg.workflow("sleeper")
    async def sleeper(ctx: WorkflowContext) -> WorkflowResult:
        await ctx.step("before", lambda: ran.append(1))
        await ctx.sleep(3600)
        await ctx.step("after", lambda: ran.append(2))
        return await ctx.finish("done")

    engine = backend.engine(reg)
    case = await engine.run_workflow("sleeper")
    assert case.execution_state is ExecutionState.WAITING
    backend.clock.advance(3599)
    await engine.run_until_idle()
    assert ran == [1]
    backend.clock.advance(2)
    await engine.run_until_idle()
    assert ran == [1, 2]
    assert (await engine.get_case(case.case_key)).execution_state is ExecutionState.FINISHED


async def test_resource_fetcher_pull_model(backend: Backend) -> None:
    class Decisions:
        def __init__(self) -> None:
            self.asked: list[tuple[str, str]] = []
            self.ready: dict[str, Any] = {}

        async def fetch(self, resource_type: str, resource_id: str) -> Any | None:
            self.asked.append((resource_type, resource_id))
            return self.ready.get(resource_id)

    fetcher = Decisions()
    engine = backend.engine(approval_registry())
    engine.fetcher = fetcher
    case = await engine.run_workflow("approval", {"title": "t"}, session_id="pull-model")
    await engine.tick(session_id="pull-model")
    assert fetcher.asked == [("review_decision", case.case_key)]
    fetcher.ready[case.case_key] = {"decision": "approved"}
    await engine.run_until_idle(session_id="pull-model")
    assert (await engine.get_case(case.case_key)).finished_type == "approved"


@pytest.mark.parametrize(
    "value", ["plain-id_09", "a.b", "with space", "ünïcode", "", "~tilde", "*", ">", "x" * 300]
)
def test_token_encoding_is_reversible_and_subject_safe(value: str) -> None:
    token = encode_token(value)
    assert decode_token(token) == value
    assert token and not any(c in token for c in ". *>\t\n")


# -- a publish that takes the woken cases (the scheduler's wake path) -----------------------------


class _CountingEvents:
    """The event store, counting `next_after` lookups (a taken case should need none)."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.lookups = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    async def next_after(self, *args: Any, **kwargs: Any) -> Any:
        self.lookups += 1
        return await self._inner.next_after(*args, **kwargs)


async def test_a_taken_case_runs_under_its_lease_without_a_lookup(backend: Backend) -> None:
    """`take`: the woken case comes back leased, with the event it consumes; running it under that
    lease needs no acquire and no event lookup, and wake listeners are left to the caller."""
    engine = backend.engine(awaiting_registry(times=2))
    heard: list[str] = []
    engine.add_wake_listener(heard.extend)
    case = await engine.run_workflow("await", {"resource": "taken"})
    for payload in ("one", "two"):
        backend.clock.advance(1)
        result = await engine.publish_event("order", "taken", payload, take=4)
        assert result.woken == [case.case_key] and [t.case_key for t in result.taken] == [case.case_key]
        counting = _CountingEvents(backend.stores.events)
        engine.stores.events = counting
        try:
            report = await engine.run_case(case.case_key, lease=result.taken[0])
        finally:
            engine.stores.events = counting._inner
        # After "one", the second wait looks for an event (its recheck is part of the park's
        # commit, not a lookup of its own); "two" needs none.
        assert counting.lookups == (1 if payload == "one" else 0)
        assert report.status is (RunStatus.WAITING if payload == "one" else RunStatus.FINISHED)
    assert heard == []
    assert (await engine.get_case(case.case_key)).output == ["one", "two"]


async def test_a_taken_case_gets_the_oldest_event_it_has_not_consumed(backend: Backend) -> None:
    """Two events before the case runs: the first publish's take holds the case, the second wakes
    nothing; the run consumes both in order (its lookahead is the first, the second is looked up)."""
    engine = backend.engine(awaiting_registry(times=2))
    case = await engine.run_workflow("await", {"resource": "two"})
    backend.clock.advance(1)
    first = await engine.publish_event("order", "two", "one", take=1)
    second = await engine.publish_event("order", "two", "two", take=1)
    assert [t.case_key for t in first.taken] == [case.case_key] and second.woken == []
    await engine.run_case(case.case_key, lease=first.taken[0])
    assert (await engine.get_case(case.case_key)).output == ["one", "two"]


async def test_a_stale_lookahead_is_not_used(backend: Backend) -> None:
    """A wait stored without its position (a row from before migration 0004 reads after_seq 0) must
    not make the case consume again an event it has already consumed."""
    engine = backend.engine(awaiting_registry(times=2))
    case = await engine.run_workflow("await", {"resource": "stale"})
    backend.clock.advance(1)
    await engine.publish_event("order", "stale", "one")
    await engine.run_until_idle()
    waits = await backend.stores.waits.for_case(case.case_key)
    assert len(waits) == 1
    await backend.stores.waits.replace(case.case_key, waits)  # position lost: after_seq 0
    result = await engine.publish_event("order", "stale", "two", take=1)
    lookahead = result.taken[0].lookahead
    assert lookahead is not None and lookahead.after_seq == 0 and lookahead.event is not None
    assert lookahead.event.payload == "one"  # what a blind use would hand the workflow again
    await engine.run_case(case.case_key, lease=result.taken[0])
    assert (await engine.get_case(case.case_key)).output == ["one", "two"]


async def test_run_case_refuses_a_lease_on_another_case(backend: Backend) -> None:
    engine = backend.engine(awaiting_registry())
    a = await engine.run_workflow("await", {"resource": "mine"})
    backend.clock.advance(1)
    result = await engine.publish_event("order", "mine", 1, take=1)
    with pytest.raises(ValueError, match="cannot run case"):
        await engine.run_case("someone-else", lease=result.taken[0])
    await engine.release(result.taken[0])
    await engine.run_until_idle()
    assert (await engine.get_case(a.case_key)).output == [1]
