"""One conformance suite for every store backend: in-memory and Postgres behave alike.

Tests share one Postgres database per session, so each isolates itself with uuid-based keys,
sessions and resources, and scans are always narrowed to the test's own session.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from tianshu_contracts.errors import WireError
from tianshu_contracts.gateway import LlmCallResult, UsageSummary
from tianshu_contracts.llm import LlmAttempt, LlmErrorClass, LlmResponse, Usage
from tianshu_core.engine import Engine
from tianshu_core.errors import ErrorInfo, InvalidCursorError, LeaseLostError
from tianshu_core.models import (
    Case,
    CaseCursor,
    CaseFilter,
    CasePage,
    ExecutionState,
    Fence,
    JournalEntry,
    Lease,
    Lifecycle,
    PollPredicate,
    Session,
    Timer,
)
from tianshu_core.stores.memory import memory_stores
from tianshu_core.stores.postgres import connect_postgres
from tianshu_core.stores.protocols import Stores, UsageRow

BACKENDS = [
    pytest.param("memory", id="memory"),
    pytest.param("postgres", id="postgres", marks=pytest.mark.postgres),
]


@pytest.fixture(scope="session")
async def pg_stores(pg_url: str) -> AsyncIterator[Stores]:
    stores = await connect_postgres(pg_url, migrate=True, max_size=8, application_name="tianshu-conformance")
    yield stores
    await stores.close()


@pytest.fixture(params=BACKENDS)
def stores(request: pytest.FixtureRequest) -> Stores:
    if request.param == "memory":
        return memory_stores()
    pg: Stores = request.getfixturevalue("pg_stores")
    return pg


def uid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


NOW = datetime.now(UTC).replace(microsecond=0)


def make_case(session_id: str | None = None, *, at: int = 0, **fields: Any) -> Case:
    """A case created `at` seconds after NOW (for ordering), with a unique key unless given."""
    fields.setdefault("case_key", uid("case"))
    fields.setdefault("workflow_code", "wf")
    when = NOW + timedelta(seconds=at)
    return Case(session_id=session_id or uid("sess"), created_at=when, updated_at=when, **fields)


def entry(case_key: str, seq: int, token: int, *, name: str | None = None, data: str = "{}") -> JournalEntry:
    return JournalEntry(case_key, seq, "step", name or f"s{seq}", data, token, NOW)


# -- sessions -----------------------------------------------------------------------------------


async def test_session_upsert_get_delete(stores: Stores) -> None:
    sid = uid("sess")
    assert await stores.sessions.get(sid) is None
    session = Session(session_id=sid, metadata={"user": "ann", "n": [1, 2]}, created_at=NOW, updated_at=NOW)
    await stores.sessions.upsert(session)
    assert await stores.sessions.get(sid) == session
    changed = session.model_copy(
        update={"metadata": {"user": "bob"}, "updated_at": NOW + timedelta(seconds=1)}
    )
    await stores.sessions.upsert(changed)
    assert await stores.sessions.get(sid) == changed
    await stores.sessions.delete(sid)
    assert await stores.sessions.get(sid) is None
    await stores.sessions.delete(sid)  # deleting a missing session is fine


# -- cases --------------------------------------------------------------------------------------


async def test_case_insert_get_update(stores: Stores) -> None:
    case = make_case(resource_data={"q": "hi", "nested": {"b": 1, "a": [None, True]}}, private_vars={"x": 1})
    assert await stores.cases.get_by_key(case.case_key) is None
    assert await stores.cases.insert(case) is True
    assert await stores.cases.get_by_key(case.case_key) == case

    other = case.model_copy(update={"workflow_code": "other"})
    assert await stores.cases.insert(other) is False  # idempotent on key: first one stays
    assert await stores.cases.get_by_key(case.case_key) == case

    done = case.model_copy(
        update={
            "execution_state": ExecutionState.FAILED,
            "child_keys": ["c1", "c2"],
            "processing_report": {"steps": 3},
            "finished_type": "error",
            "finished_description": "boom",
            "output": [1, "two"],
            "error": ErrorInfo(type="ValueError", message="boom", code="x", retryable=True),
            "updated_at": NOW + timedelta(seconds=5),
        }
    )
    await stores.cases.upsert(done)
    assert await stores.cases.get_by_key(case.case_key) == done

    fresh = make_case()
    await stores.cases.upsert(fresh)  # upsert creates too
    assert await stores.cases.get_by_key(fresh.case_key) == fresh


async def test_cases_by_session_oldest_first(stores: Stores) -> None:
    sid = uid("sess")
    later = make_case(sid, at=2)
    earlier = make_case(sid, at=1)
    elsewhere = make_case(at=0)
    for case in (later, earlier, elsewhere):
        await stores.cases.insert(case)
    assert await stores.cases.get_by_session(sid) == [earlier, later]
    assert await stores.cases.get_by_session(uid("sess")) == []


async def test_case_list_and_count_filters(stores: Stores) -> None:
    sid, wf, parent = uid("sess"), uid("wf"), uid("parent")
    a = make_case(sid, at=1, workflow_code=wf)
    b = make_case(sid, at=2, workflow_code=wf, execution_state=ExecutionState.WAITING, parent_key=parent)
    c = make_case(sid, at=3, lifecycle_state=Lifecycle.PAUSE, parent_key=parent)
    d = make_case(sid, at=4, execution_state=ExecutionState.FINISHED)
    for case in (d, b, c, a):
        await stores.cases.insert(case)

    async def check(flt: CaseFilter, expected: list[Case]) -> None:
        assert await stores.cases.list(flt) == expected
        assert await stores.cases.count(flt) == len(expected)

    await check(CaseFilter(session_id=sid), [a, b, c, d])
    await check(CaseFilter(workflow_code=wf), [a, b])
    await check(CaseFilter(parent_key=parent), [b, c])
    await check(CaseFilter(session_id=sid, execution_state=ExecutionState.WAITING), [b])
    await check(CaseFilter(session_id=sid, execution_state=ExecutionState.RUNNING), [a, c])
    await check(CaseFilter(session_id=sid, lifecycle_state=Lifecycle.PAUSE), [c])
    await check(CaseFilter(session_id=sid, lifecycle_state=Lifecycle.NORMAL, workflow_code="wf"), [d])
    await check(CaseFilter(session_id=uid("sess")), [])
    assert await stores.cases.list(CaseFilter(session_id=sid), limit=2) == [a, b]
    with pytest.warns(DeprecationWarning, match="offset"):
        assert await stores.cases.list(CaseFilter(session_id=sid), limit=2, offset=3) == [d]
    assert await stores.cases.count() >= 4
    assert len(await stores.cases.list(None, limit=3)) == 3


async def test_case_pages_follow_their_cursor_to_the_end(stores: Stores) -> None:
    """Keyset pages: every case once, in order (created_at, then key for a tie), under a filter
    too, with a case created behind the cursor and one deleted ahead of it meanwhile."""
    sid, wf = uid("sess"), uid("wf")
    cases = [make_case(sid, at=i // 2, case_key=f"{sid}-{i}", workflow_code=wf) for i in range(7)]
    for case in reversed(cases):
        await stores.cases.insert(case)
    engine = Engine(stores)
    flt = CaseFilter(session_id=sid)

    first = await engine.list_cases(flt, limit=2)
    assert first.cases == cases[:2] and first.next_cursor is not None
    await stores.cases.insert(make_case(sid, at=-1, workflow_code=wf))  # behind: not listed now
    await stores.cases.delete(cases[3].case_key)  # ahead: not listed either
    second = await engine.list_cases(flt, limit=2, cursor=first.next_cursor)
    assert second.cases == [cases[2], cases[4]] and second.next_cursor is not None
    # The last page says so: no cursor, rather than a cursor to an empty page.
    last = await engine.list_cases(flt, limit=2, cursor=second.next_cursor)
    assert last == CasePage(cases=cases[5:], next_cursor=None)

    running = CaseFilter(workflow_code=wf, execution_state=ExecutionState.RUNNING)
    assert (await engine.list_cases(running, limit=7)).next_cursor is None

    for bad in ("nonsense", first.next_cursor[:-3], "", CaseCursor(NOW, "x").encode().replace("A", "@")):
        with pytest.raises(InvalidCursorError):
            await engine.list_cases(flt, cursor=bad)
    with pytest.raises(ValueError, match="limit"):
        await engine.list_cases(flt, limit=0)


# -- state --------------------------------------------------------------------------------------


async def test_case_state(stores: Stores) -> None:
    k1, k2 = uid("case"), uid("case")
    assert await stores.state.get(k1, "x") is None
    await stores.state.save(k1, "x", {"v": 1})
    await stores.state.save(k1, "a", [1, 2])
    await stores.state.save(k2, "x", "other case")
    got = await stores.state.get(k1, "x")
    assert got is not None and got.data == {"v": 1} and got.case_key == k1 and got.name == "x"
    await stores.state.save(k1, "x", {"v": 2})
    got = await stores.state.get(k1, "x")
    assert got is not None and got.data == {"v": 2}
    assert [(e.name, e.data) for e in await stores.state.get_all(k1)] == [("a", [1, 2]), ("x", {"v": 2})]

    await stores.state.delete(k1, "a")
    await stores.state.delete(k1, "a")  # idempotent
    assert [e.name for e in await stores.state.get_all(k1)] == ["x"]
    await stores.state.delete_by_case(k1)
    await stores.state.delete_by_case(k1)
    assert await stores.state.get_all(k1) == []
    got = await stores.state.get(k2, "x")
    assert got is not None and got.data == "other case"  # another case's state is untouched


async def test_session_state_is_its_own_namespace(stores: Stores) -> None:
    key = uid("shared")  # the same id used as a case key and as a session id
    await stores.state.save(key, "v", "case")
    await stores.state.save_session(key, "v", "session")
    await stores.state.save_session(key, "w", None)
    case_entry = await stores.state.get(key, "v")
    session_entry = await stores.state.get_session(key, "v")
    assert case_entry is not None and case_entry.data == "case"
    assert session_entry is not None and session_entry.data == "session" and session_entry.session_id == key
    await stores.state.save_session(key, "v", {"n": 2})
    assert [(e.name, e.data) for e in await stores.state.get_all_session(key)] == [
        ("v", {"n": 2}),
        ("w", None),
    ]
    await stores.state.delete_session(key, "w")
    await stores.state.delete_session(key, "w")
    assert [e.name for e in await stores.state.get_all_session(key)] == ["v"]
    await stores.state.delete_by_session(key)
    assert await stores.state.get_all_session(key) == []
    assert await stores.state.get_session(key, "v") is None
    case_entry = await stores.state.get(key, "v")
    assert case_entry is not None and case_entry.data == "case"


# -- leases and fencing ---------------------------------------------------------------------------


async def test_lease_acquire_renew_release(stores: Stores) -> None:
    case = make_case()
    assert await stores.leases.acquire(case.case_key, "a", 30) is None  # no such case
    await stores.cases.insert(case)
    lease = await stores.leases.acquire(case.case_key, "a", 30)
    assert lease is not None and lease.owner == "a" and lease.case == case
    assert await stores.leases.acquire(case.case_key, "b", 30) is None  # held
    assert await stores.leases.renew(lease, 30) is True
    await stores.leases.release(lease)
    again = await stores.leases.acquire(case.case_key, "b", 30)
    assert again is not None and again.token > lease.token
    assert await stores.leases.renew(lease, 30) is False  # stale token
    await stores.leases.release(lease)  # a stale release changes nothing
    assert await stores.leases.acquire(case.case_key, "c", 30) is None


async def test_lease_expires(stores: Stores) -> None:
    case = make_case()
    await stores.cases.insert(case)
    first = await stores.leases.acquire(case.case_key, "a", 0.2)
    assert first is not None
    assert await stores.leases.acquire(case.case_key, "b", 0.2) is None
    await asyncio.sleep(0.35)
    second = await stores.leases.acquire(case.case_key, "b", 30)
    assert second is not None and second.token > first.token and second.owner == "b"
    assert await stores.leases.renew(first, 30) is False


async def test_create_leased(stores: Stores) -> None:
    case = make_case()
    lease = await stores.leases.create_leased(case, "a", 30)
    assert lease is not None and lease.token == 1 and lease.case == case and lease.owner == "a"
    assert await stores.leases.create_leased(case, "b", 30) is None
    assert await stores.cases.insert(case) is False
    assert await stores.leases.acquire(case.case_key, "b", 30) is None
    await stores.cases.save(case, lease.token)  # the creator holds it


async def taken_over(stores: Stores, case: Case) -> tuple[Lease, Lease]:
    """Leases on `case`: `old`, which expired, and `new`, which took the case after it."""
    old = await stores.leases.acquire(case.case_key, "old", 0.1)
    assert old is not None
    await stores.journal.append(entry(case.case_key, 0, old.token))
    await asyncio.sleep(0.25)
    new = await stores.leases.acquire(case.case_key, "new", 30)
    assert new is not None and new.token > old.token
    return old, new


async def test_stale_holder_is_fenced(stores: Stores) -> None:
    sid = uid("sess")
    case = make_case(sid)
    await stores.cases.insert(case)
    old, new = await taken_over(stores, case)

    with pytest.raises(LeaseLostError):
        await stores.cases.save(case.model_copy(update={"output": "stale"}), old.token)
    with pytest.raises(LeaseLostError):
        await stores.journal.append(entry(case.case_key, 1, old.token))

    await stores.journal.append(entry(case.case_key, 1, new.token, name="by-new"))
    done = case.model_copy(update={"execution_state": ExecutionState.FINISHED, "output": "ok"})
    await stores.cases.save(done, new.token)
    assert await stores.cases.get_by_key(case.case_key) == done
    assert [(e.seq, e.name, e.token) for e in await stores.journal.load(case.case_key)] == [
        (0, "s0", old.token),
        (1, "by-new", new.token),
    ]


# Every other write a run makes: refused for the stale holder, the live holder's row untouched.


async def test_a_stale_holder_neither_drops_nor_adds_waits(stores: Stores) -> None:
    case = make_case()
    await stores.cases.insert(case)
    old, new = await taken_over(stores, case)
    live = PollPredicate(resource_type=uid("rt"), resource_id=uid("r"), step_name="live")
    stale = PollPredicate(resource_type=live.resource_type, resource_id=uid("r"), step_name="stale")
    await stores.waits.replace(case.case_key, [live], token=new.token)
    for preds in ([stale], [], [live, stale]):
        with pytest.raises(LeaseLostError):
            await stores.waits.replace(case.case_key, preds, token=old.token)
    assert await stores.waits.for_case(case.case_key) == [live]
    assert await stores.waits.cases_waiting_on(stale.resource_type, stale.resource_id) == []
    assert await stores.waits.cases_waiting_on(live.resource_type, live.resource_id) == [case.case_key]


async def test_a_stale_holder_schedules_no_timer(stores: Stores) -> None:
    case = make_case()
    await stores.cases.insert(case)
    old, new = await taken_over(stores, case)
    # In the far past, so the due() scan sees only this test's timers before `base + 1 day`.
    base = datetime(1975, 1, 1, tzinfo=UTC) + timedelta(minutes=uuid.uuid4().int % 100_000)
    await stores.timers.schedule(Timer(case.case_key, "wake", base), token=new.token)
    for timer in (
        Timer(case.case_key, "wake", base + timedelta(hours=1)),
        Timer(case.case_key, "other", base),
    ):
        with pytest.raises(LeaseLostError):
            await stores.timers.schedule(timer, token=old.token)
    case.execution_state = ExecutionState.WAITING  # parked: due() leaves out running cases' timers
    await stores.cases.upsert(case)
    due = await stores.timers.due(base + timedelta(days=1), limit=10_000)
    assert [t for t in due if t.case_key == case.case_key] == [Timer(case.case_key, "wake", base)]


async def test_a_stale_holder_sets_no_case_variable(stores: Stores) -> None:
    case = make_case()
    await stores.cases.insert(case)
    old, new = await taken_over(stores, case)
    await stores.state.save(case.case_key, "v", "live", token=new.token)
    for name in ("v", "w"):
        with pytest.raises(LeaseLostError):
            await stores.state.save(case.case_key, name, "stale", token=old.token)
    assert [(e.name, e.data) for e in await stores.state.get_all(case.case_key)] == [("v", "live")]


async def test_a_stale_holder_sets_no_session_variable(stores: Stores) -> None:
    case = make_case()
    await stores.cases.insert(case)
    old, new = await taken_over(stores, case)
    sid = case.session_id
    await stores.state.save_session(sid, "v", "live", fence=Fence(case.case_key, new.token))
    for name in ("v", "w"):
        with pytest.raises(LeaseLostError):
            await stores.state.save_session(sid, name, "stale", fence=Fence(case.case_key, old.token))
    assert [(e.name, e.data) for e in await stores.state.get_all_session(sid)] == [("v", "live")]


async def test_a_stale_holder_creates_no_child(stores: Stores) -> None:
    parent = make_case()
    await stores.cases.insert(parent)
    old, new = await taken_over(stores, parent)
    live = make_case(parent.session_id, parent_key=parent.case_key)
    stale = make_case(parent.session_id, parent_key=parent.case_key)
    assert await stores.cases.insert(live, fence=Fence(parent.case_key, new.token)) is True
    with pytest.raises(LeaseLostError):
        await stores.cases.insert(stale, fence=Fence(parent.case_key, old.token))
    with pytest.raises(LeaseLostError):  # the same key again: refused, not "exists"
        await stores.cases.insert(live, fence=Fence(parent.case_key, old.token))
    assert await stores.cases.get_by_key(stale.case_key) is None
    assert [c.case_key for c in await stores.cases.list(CaseFilter(parent_key=parent.case_key))] == [
        live.case_key
    ]


async def test_a_fenced_write_for_a_case_that_does_not_exist_is_refused(stores: Stores) -> None:
    key = uid("case")
    with pytest.raises(LeaseLostError):
        await stores.waits.replace(key, [], token=1)
    with pytest.raises(LeaseLostError):
        await stores.state.save(key, "v", 1, token=1)
    with pytest.raises(LeaseLostError):
        await stores.timers.schedule(Timer(key, "t", NOW), token=1)
    with pytest.raises(LeaseLostError):
        await stores.state.save_session(uid("sess"), "v", 1, fence=Fence(key, 1))
    with pytest.raises(LeaseLostError):
        await stores.cases.insert(make_case(parent_key=key), fence=Fence(key, 1))
    assert await stores.state.get_all(key) == []


async def test_save_with_release_frees_the_case(stores: Stores) -> None:
    sid = uid("sess")
    case = make_case(sid)
    await stores.cases.insert(case)
    lease = await stores.leases.acquire(case.case_key, "a", 30)
    assert lease is not None
    assert await stores.cases.runnable(session_id=sid) == []
    await stores.cases.save(case, lease.token, release=True)
    assert await stores.cases.runnable(session_id=sid) == [case.case_key]
    again = await stores.leases.acquire(case.case_key, "b", 30)
    assert again is not None and again.token > lease.token


async def test_back_off_holds_the_case_and_counts_its_failures_until_a_save(stores: Stores) -> None:
    sid = uid("sess")
    case = make_case(sid)
    await stores.cases.insert(case)
    lease = await stores.leases.acquire(case.case_key, "a", 30)
    assert lease is not None and lease.case.failures == 0
    await stores.leases.back_off(lease, 2, 60)
    assert await stores.cases.runnable(session_id=sid) == []  # nobody takes it while it backs off
    assert await stores.leases.acquire(case.case_key, "b", 30) is None
    stored = await stores.cases.get_by_key(case.case_key)
    assert stored is not None and stored.failures == 2
    await stores.leases.back_off(lease, 3, 0)  # the same holder: its latest word counts
    assert await stores.cases.runnable(session_id=sid) == [case.case_key]
    again = await stores.leases.acquire(case.case_key, "b", 30)
    assert again is not None and again.case.failures == 3
    await stores.leases.back_off(lease, 9, 0)  # a stale holder changes nothing
    held = await stores.cases.get_by_key(case.case_key)
    assert held is not None and held.failures == 3
    assert await stores.leases.acquire(case.case_key, "c", 30) is None
    await stores.cases.save(again.case, again.token, release=True)  # an outcome: the count restarts
    assert again.case.failures == 0
    saved = await stores.cases.get_by_key(case.case_key)
    assert saved is not None and saved.failures == 0


async def test_save_of_missing_case_is_refused(stores: Stores) -> None:
    with pytest.raises(LeaseLostError):
        await stores.cases.save(make_case(), 1)


# -- journal ------------------------------------------------------------------------------------


async def test_journal_append_load_in_order(stores: Stores) -> None:
    case = make_case()
    lease = await stores.leases.create_leased(case, "a", 30)
    assert lease is not None
    # Exact JSON text comes back: key order and spacing as appended.
    texts = ['{"b":1,"a":[1,2]}', "null", '"x"', '{"z": {"y": 1, "x": 2}}', "[]"]
    for seq, text in enumerate(texts):
        await stores.journal.append(entry(case.case_key, seq, lease.token, data=text))
    loaded = await stores.journal.load(case.case_key)
    assert [e.seq for e in loaded] == [0, 1, 2, 3, 4]
    assert [e.data for e in loaded] == texts
    assert all(e.case_key == case.case_key and e.kind == "step" and e.token == lease.token for e in loaded)
    assert loaded[0].created_at == NOW
    assert await stores.journal.load(uid("case")) == []

    await stores.journal.delete_by_case(case.case_key)
    assert await stores.journal.load(case.case_key) == []


async def test_journal_refuses_a_taken_seq(stores: Stores) -> None:
    case = make_case()
    lease = await stores.leases.create_leased(case, "a", 30)
    assert lease is not None
    await stores.journal.append(entry(case.case_key, 0, lease.token, name="first"))
    with pytest.raises(LeaseLostError):
        await stores.journal.append(entry(case.case_key, 0, lease.token, name="second"))
    assert [e.name for e in await stores.journal.load(case.case_key)] == ["first"]


async def test_journal_many_concurrent_appends(stores: Stores) -> None:
    """500 appends from 50 coroutines, five per case, interleaving seqs on each case."""
    leases = []
    for _ in range(10):
        lease = await stores.leases.create_leased(make_case(), "a", 60)
        assert lease is not None
        leases.append(lease)

    async def writer(i: int) -> None:
        lease = leases[i % 10]
        for j in range(10):
            seq = j * 5 + i // 10
            await stores.journal.append(entry(lease.case_key, seq, lease.token, data=f'{{"w":{i},"j":{j}}}'))

    await asyncio.gather(*(writer(i) for i in range(50)))
    for lease in leases:
        loaded = await stores.journal.load(lease.case_key)
        assert [e.seq for e in loaded] == list(range(50))


async def test_journal_refusal_affects_only_the_stale_entry(stores: Stores) -> None:
    stale_case = make_case()
    await stores.cases.insert(stale_case)
    old = await stores.leases.acquire(stale_case.case_key, "old", 0.1)
    assert old is not None
    await asyncio.sleep(0.25)
    assert await stores.leases.acquire(stale_case.case_key, "new", 30) is not None
    good = []
    for _ in range(5):
        lease = await stores.leases.create_leased(make_case(), "a", 30)
        assert lease is not None
        good.append(lease)

    results = await asyncio.gather(
        *(
            stores.journal.append(entry(lease.case_key, seq, lease.token))
            for lease in good
            for seq in range(4)
        ),
        stores.journal.append(entry(stale_case.case_key, 0, old.token)),
        return_exceptions=True,
    )
    assert results[:-1] == [None] * 20
    assert isinstance(results[-1], LeaseLostError)
    for lease in good:
        assert [e.seq for e in await stores.journal.load(lease.case_key)] == [0, 1, 2, 3]
    assert await stores.journal.load(stale_case.case_key) == []


async def test_old_holder_writes_stop_when_the_lease_is_taken(stores: Stores) -> None:
    """Appends racing a lease steal: none under the old token may land after the steal."""
    case = make_case()
    await stores.cases.insert(case)
    old = await stores.leases.acquire(case.case_key, "old", 0.05)
    assert old is not None
    await asyncio.sleep(0.1)  # expired but not yet taken: the old holder still writes
    seqs = itertools.count()

    async def old_writer() -> None:
        while True:
            try:
                await stores.journal.append(entry(case.case_key, next(seqs), old.token))
            except LeaseLostError:
                return

    writers = [asyncio.create_task(old_writer()) for _ in range(20)]
    await asyncio.sleep(0.02)
    new = await stores.leases.acquire(case.case_key, "new", 30)
    assert new is not None
    at_steal = len(await stores.journal.load(case.case_key))
    await asyncio.wait_for(asyncio.gather(*writers), 10)  # each ends refused
    assert len(await stores.journal.load(case.case_key)) == at_steal


@pytest.mark.postgres
async def test_postgres_bad_entry_fails_alone(pg_stores: Stores) -> None:
    """A batch whose statement fails is retried entry by entry: only the bad entry fails."""
    lease = await pg_stores.leases.create_leased(make_case(), "a", 30)
    assert lease is not None
    entries = [entry(lease.case_key, seq, lease.token) for seq in range(6)]
    entries[4].data = "this is not JSON"
    results = await asyncio.gather(*(pg_stores.journal.append(e) for e in entries), return_exceptions=True)
    assert [r is None for r in results] == [True, True, True, True, False, True]
    assert [e.seq for e in await pg_stores.journal.load(lease.case_key)] == [0, 1, 2, 3, 5]


# -- waits, events, timers ----------------------------------------------------------------------


async def test_waits(stores: Stores) -> None:
    k1, k2, rt, r1, r2 = uid("case"), uid("case"), uid("rt"), uid("r"), uid("r")
    p1 = PollPredicate(resource_type=rt, resource_id=r1, step_name="approve", intent_desc="wait for ok")
    p2 = PollPredicate(resource_type=rt, resource_id=r2, step_name="other")
    await stores.waits.replace(k1, [p2, p1])
    await stores.waits.replace(k2, [p1])
    assert await stores.waits.for_case(k1) == [p2, p1]
    assert sorted(await stores.waits.cases_waiting_on(rt, r1)) == sorted([k1, k2])
    assert await stores.waits.cases_waiting_on(rt, r2) == [k1]
    assert await stores.waits.cases_waiting_on(uid("rt"), r1) == []

    await stores.waits.replace(k1, [p1])  # replaces, not adds
    assert await stores.waits.for_case(k1) == [p1]
    assert await stores.waits.cases_waiting_on(rt, r2) == []
    await stores.waits.replace(k1, [])
    assert await stores.waits.for_case(k1) == []
    assert await stores.waits.cases_waiting_on(rt, r1) == [k2]
    await stores.waits.delete_by_case(k2)
    assert await stores.waits.cases_waiting_on(rt, r1) == []


async def test_events_order_and_next_after(stores: Stores) -> None:
    rt, rid = uid("rt"), uid("r")
    t0 = NOW
    since = t0 - timedelta(hours=1)
    e1, new1 = await stores.events.publish(
        rt, rid, {"n": 1}, event_id=None, published_at=t0, dedupe_since=since
    )
    e2, _ = await stores.events.publish(
        rt, rid, {"n": 2}, event_id="id-2", published_at=t0 + timedelta(seconds=1), dedupe_since=since
    )
    other, _ = await stores.events.publish(
        rt, uid("r"), "elsewhere", event_id=None, published_at=t0, dedupe_since=since
    )
    e3, _ = await stores.events.publish(
        rt, rid, [3], event_id=None, published_at=t0 + timedelta(seconds=2), dedupe_since=since
    )
    assert new1 and e1.seq < e2.seq < e3.seq
    assert (e1.resource_type, e1.resource_id, e1.payload, e1.event_id, e1.published_at) == (
        rt,
        rid,
        {"n": 1},
        None,
        t0,
    )

    first = await stores.events.next_after(rt, rid, after_seq=0, not_before=since)
    assert first == e1
    assert await stores.events.next_after(rt, rid, after_seq=e1.seq, not_before=since) == e2
    assert await stores.events.next_after(rt, rid, after_seq=e2.seq, not_before=since) == e3
    assert await stores.events.next_after(rt, rid, after_seq=e3.seq, not_before=since) is None
    # not_before skips events published before it (a new case never sees older events).
    later = t0 + timedelta(seconds=1)
    assert await stores.events.next_after(rt, rid, after_seq=0, not_before=later) == e2
    assert await stores.events.next_after(rt, rid, after_seq=0, not_before=t0 + timedelta(seconds=3)) is None
    assert await stores.events.next_after(rt, other.resource_id, after_seq=0, not_before=since) == other


async def test_event_dedupe_window(stores: Stores) -> None:
    rt, rid = uid("rt"), uid("r")
    t0 = NOW
    first, created = await stores.events.publish(
        rt, rid, {"v": 1}, event_id="msg-1", published_at=t0, dedupe_since=t0 - timedelta(hours=1)
    )
    assert created
    # A repeat within the window is a no-op that returns the stored event.
    again, created = await stores.events.publish(
        rt, rid, {"v": "changed"}, event_id="msg-1", published_at=t0 + timedelta(seconds=5), dedupe_since=t0
    )
    assert not created and again == first
    # The same id on another resource is another event.
    _, created = await stores.events.publish(
        rt, uid("r"), {"v": 1}, event_id="msg-1", published_at=t0, dedupe_since=t0
    )
    assert created
    # Once the window has passed the first one, the id is new again.
    late, created = await stores.events.publish(
        rt,
        rid,
        {"v": 2},
        event_id="msg-1",
        published_at=t0 + timedelta(hours=2),
        dedupe_since=t0 + timedelta(seconds=1),
    )
    assert created and late.seq > first.seq and late.payload == {"v": 2}


async def test_event_purge_before(stores: Stores) -> None:
    rt, rid = uid("rt"), uid("r")
    # Far in the past so no other test's events fall before the cutoff.
    old = datetime(1990, 1, 1, tzinfo=UTC)
    for i in range(3):
        await stores.events.publish(
            rt, rid, i, event_id=None, published_at=old + timedelta(days=i), dedupe_since=old
        )
    assert await stores.events.purge_before(old + timedelta(days=2)) == 2
    remaining = await stores.events.next_after(rt, rid, after_seq=0, not_before=old)
    assert remaining is not None and remaining.payload == 2
    assert await stores.events.purge_before(old) == 0


async def test_event_purge_in_batches_oldest_first(stores: Stores) -> None:
    rt, rid = uid("rt"), uid("r")
    old = datetime(1980, 1, 1, tzinfo=UTC)  # before any other test's events
    for i in range(5):
        await stores.events.publish(
            rt, rid, i, event_id=None, published_at=old + timedelta(days=i), dedupe_since=old
        )
    assert await stores.events.purge_before(old + timedelta(days=4), limit=3) == 3
    remaining = await stores.events.next_after(rt, rid, after_seq=0, not_before=old)
    assert remaining is not None and remaining.payload == 3
    assert await stores.events.purge_before(old + timedelta(days=4), limit=3) == 1
    assert await stores.events.purge_before(old + timedelta(days=4), limit=3) == 0


async def test_purge_done_before_removes_old_ended_cases_and_their_history(stores: Stores) -> None:
    """History retention: finished and failed cases that ended before the cutoff go, with their
    journal, state, waits and timers, at most `limit` a call; nothing else is touched."""
    long_ago = datetime(1985, 1, 1, tzinfo=UTC)  # before any other test's cases

    async def case_at(state: ExecutionState, days: int) -> Case:
        when = long_ago + timedelta(days=days)
        case = make_case(execution_state=state)
        case.created_at = case.updated_at = when
        lease = await stores.leases.create_leased(case, "me", 30)
        assert lease is not None
        await stores.journal.append(entry(case.case_key, 1, lease.token))
        await stores.leases.release(lease)
        await stores.state.save(case.case_key, "v", 1)
        await stores.timers.schedule(Timer(case.case_key, "t", when))
        return case

    finished = [await case_at(ExecutionState.FINISHED, d) for d in (1, 2)]
    failed = await case_at(ExecutionState.FAILED, 3)
    running = await case_at(ExecutionState.RUNNING, 1)
    waiting = await case_at(ExecutionState.WAITING, 1)
    await stores.waits.replace(
        waiting.case_key, [PollPredicate(resource_type="o", resource_id="x", step_name="w")]
    )
    recent = await case_at(ExecutionState.FINISHED, 30)
    cutoff = long_ago + timedelta(days=10)
    assert await stores.cases.purge_done_before(cutoff, limit=2) == 2  # the two oldest
    assert await stores.cases.get_by_key(finished[0].case_key) is None
    assert await stores.cases.get_by_key(failed.case_key) is not None
    assert await stores.cases.purge_done_before(cutoff, limit=2) == 1
    assert await stores.cases.purge_done_before(cutoff, limit=2) == 0
    for gone in (*finished, failed):
        assert await stores.cases.get_by_key(gone.case_key) is None
        assert await stores.journal.load(gone.case_key) == []
        assert await stores.state.get_all(gone.case_key) == []
    due = {t.case_key for t in await stores.timers.due(cutoff, limit=10_000)}
    assert not due & {c.case_key for c in (*finished, failed)}
    for kept in (running, waiting, recent):
        assert await stores.cases.get_by_key(kept.case_key) is not None
        assert len(await stores.journal.load(kept.case_key)) == 1
    assert await stores.waits.for_case(waiting.case_key) != []
    assert waiting.case_key in due
    running.execution_state = ExecutionState.WAITING  # due() leaves out running cases' timers
    await stores.cases.upsert(running)
    assert running.case_key in {t.case_key for t in await stores.timers.due(cutoff, limit=10_000)}


async def test_a_save_that_ends_the_case_drops_its_timers(stores: Stores) -> None:
    """Timers could only wake a case with nothing left to do; a fenced-out save drops nothing."""
    case = make_case()
    lease = await stores.leases.create_leased(case, "me", 30)
    assert lease is not None
    far = datetime(2999, 1, 1, tzinfo=UTC)
    await stores.timers.schedule(Timer(case.case_key, "reply:timeout", far))

    async def timers() -> set[str]:
        return {t.name for t in await stores.timers.due(far, limit=100_000) if t.case_key == case.case_key}

    case.execution_state = ExecutionState.WAITING
    await stores.cases.save(case, lease.token)
    assert await timers() == {"reply:timeout"}  # still waiting: the timer stays
    case.execution_state = ExecutionState.FINISHED
    with pytest.raises(LeaseLostError):
        await stores.cases.save(case, lease.token + 1)
    assert await timers() == {"reply:timeout"}  # refused: nothing dropped
    await stores.cases.save(case, lease.token, release=True)
    assert await timers() == set()


async def test_timers(stores: Stores) -> None:
    k1, k2 = uid("case"), uid("case")
    # In the far past, so the due() scan sees only this test's timers before `base + 1 year`.
    base = datetime(1980, 1, 1, tzinfo=UTC) + timedelta(minutes=uuid.uuid4().int % 100_000)
    t1, t2, t3 = (base + timedelta(seconds=s) for s in (10, 20, 30))
    await stores.timers.schedule(Timer(k1, "wake", t2))
    await stores.timers.schedule(Timer(k1, "nudge", t1))
    await stores.timers.schedule(Timer(k2, "wake", t3))

    def mine(timers: list[Timer]) -> list[Timer]:
        return [t for t in timers if t.case_key in (k1, k2)]

    assert mine(await stores.timers.due(base)) == []
    assert mine(await stores.timers.due(t2)) == [Timer(k1, "nudge", t1), Timer(k1, "wake", t2)]
    await stores.timers.schedule(Timer(k1, "nudge", t3))  # moved, not added
    assert mine(await stores.timers.due(t2)) == [Timer(k1, "wake", t2)]
    assert len(await stores.timers.due(t3 + timedelta(days=365), limit=2)) == 2
    await stores.timers.delete(k1, "wake")
    await stores.timers.delete(k1, "wake")
    same_time = mine(await stores.timers.due(t3))
    assert sorted(same_time, key=lambda t: t.case_key) == sorted(
        [Timer(k1, "nudge", t3), Timer(k2, "wake", t3)], key=lambda t: t.case_key
    )
    await stores.timers.delete_by_case(k1)
    assert mine(await stores.timers.due(t3)) == [Timer(k2, "wake", t3)]


# -- scheduling scans and purge -----------------------------------------------------------------


async def test_runnable_waiting_and_mark_runnable(stores: Stores) -> None:
    sid = uid("sess")
    run1 = make_case(sid, at=1)
    wait1 = make_case(sid, at=2, execution_state=ExecutionState.WAITING)
    run2 = make_case(sid, at=3)
    paused = make_case(sid, at=4, lifecycle_state=Lifecycle.PAUSE)
    done = make_case(sid, at=5, execution_state=ExecutionState.FINISHED)
    wait2 = make_case(sid, at=6, execution_state=ExecutionState.WAITING)
    leased = make_case(sid, at=0)
    for case in (wait2, done, paused, run2, wait1, run1, leased):
        await stores.cases.insert(case)
    lease = await stores.leases.acquire(leased.case_key, "a", 30)
    assert lease is not None
    pred = PollPredicate(resource_type=uid("rt"), resource_id=uid("r"), step_name="w")
    for case in (wait1, wait2, run1):
        await stores.waits.replace(case.case_key, [pred])

    assert await stores.cases.runnable(session_id=sid) == [run1.case_key, run2.case_key]
    assert await stores.cases.runnable(session_id=sid, limit=1) == [run1.case_key]
    assert await stores.cases.waiting(session_id=sid) == [wait1.case_key, wait2.case_key]

    moved = await stores.cases.mark_runnable([wait2.case_key, run1.case_key, done.case_key, uid("missing")])
    assert moved == [wait2.case_key]
    # The moved case's waits went with the move; a case that did not move keeps its waits.
    assert sorted(await stores.waits.cases_waiting_on(pred.resource_type, pred.resource_id)) == sorted(
        [wait1.case_key, run1.case_key]
    )
    assert await stores.cases.mark_runnable([wait2.case_key]) == []
    assert await stores.cases.mark_runnable([]) == []
    got = await stores.cases.get_by_key(wait2.case_key)
    assert got is not None and got.execution_state is ExecutionState.RUNNING
    assert await stores.cases.runnable(session_id=sid) == [run1.case_key, run2.case_key, wait2.case_key]
    assert await stores.cases.waiting(session_id=sid) == [wait1.case_key]

    assert await stores.cases.set_lifecycle(run1.case_key, Lifecycle.PAUSE) is True
    assert await stores.cases.set_lifecycle(uid("missing"), Lifecycle.PAUSE) is False
    assert await stores.cases.runnable(session_id=sid) == [run2.case_key, wait2.case_key]
    await stores.leases.release(lease)
    assert await stores.cases.runnable(session_id=sid) == [leased.case_key, run2.case_key, wait2.case_key]


async def test_case_delete_purges_everything(stores: Stores) -> None:
    case, keep = make_case(), make_case()
    lease = await stores.leases.create_leased(case, "a", 30)
    keep_lease = await stores.leases.create_leased(keep, "a", 30)
    assert lease is not None and keep_lease is not None
    pred = PollPredicate(resource_type=uid("rt"), resource_id=uid("r"), step_name="s")
    for lz in (lease, keep_lease):
        await stores.journal.append(entry(lz.case_key, 0, lz.token))
        await stores.state.save(lz.case_key, "v", 1)
        await stores.waits.replace(lz.case_key, [pred])
        await stores.timers.schedule(Timer(lz.case_key, "t", datetime(1970, 1, 2, tzinfo=UTC)))

    await stores.cases.delete(case.case_key)
    await stores.cases.delete(case.case_key)  # idempotent
    assert await stores.cases.get_by_key(case.case_key) is None
    assert await stores.journal.load(case.case_key) == []
    assert await stores.state.get_all(case.case_key) == []
    assert await stores.waits.for_case(case.case_key) == []
    assert await stores.waits.cases_waiting_on(pred.resource_type, pred.resource_id) == [keep.case_key]
    kept = await stores.cases.get_by_key(keep.case_key)
    assert kept is not None
    kept.execution_state = ExecutionState.WAITING  # due() leaves out running cases' timers
    await stores.cases.upsert(kept)
    due = await stores.timers.due(datetime(1970, 1, 3, tzinfo=UTC), limit=10_000)
    assert [t.case_key for t in due if t.case_key in (case.case_key, keep.case_key)] == [keep.case_key]
    # The other case is untouched.
    assert len(await stores.journal.load(keep.case_key)) == 1
    assert len(await stores.state.get_all(keep.case_key)) == 1
    # The key can be used again.
    assert await stores.cases.insert(case) is True


async def test_publish_and_wake_moves_waiting_cases_and_drops_their_waits(stores: Stores) -> None:
    resource = uid("res")
    pred = PollPredicate(resource_type="order", resource_id=resource, step_name="w")
    waiting = make_case(execution_state=ExecutionState.WAITING)
    running = make_case(execution_state=ExecutionState.RUNNING)
    for case in (waiting, running):
        await stores.cases.insert(case)
        await stores.waits.replace(case.case_key, [pred])
    event, new, woken, taken = await stores.events.publish_and_wake(
        "order", resource, {"n": 1}, event_id="e1", published_at=NOW, dedupe_since=NOW - timedelta(days=1)
    )
    assert (new, woken, taken, event.payload) == (True, [waiting.case_key], [], {"n": 1})
    moved = await stores.cases.get_by_key(waiting.case_key)
    assert moved is not None and moved.execution_state is ExecutionState.RUNNING
    assert await stores.waits.for_case(waiting.case_key) == []
    assert await stores.waits.for_case(running.case_key) == [pred]
    again = await stores.events.publish_and_wake(
        "order", resource, {"n": 1}, event_id="e1", published_at=NOW, dedupe_since=NOW - timedelta(days=1)
    )
    assert again[1:] == (False, [], [])


async def test_publish_and_wake_takes_leases_with_journal_and_the_next_event(stores: Stores) -> None:
    """`take`: the first woken cases (by key) come back leased, each with its journal and the
    event it consumes next after the `after` its wait was stored with; the rest are only woken."""
    resource = uid("res")
    pred = PollPredicate(resource_type="order", resource_id=resource, step_name="w")
    since = NOW - timedelta(days=1)
    first, _ = await stores.events.publish(
        "order", resource, {"n": 1}, event_id=None, published_at=NOW, dedupe_since=since
    )
    # a: has seen nothing (gets the older event); b: has consumed it (gets the new one); c: woken only.
    a, b, c = (
        make_case(case_key=f"{uid('k')}-{tag}", execution_state=ExecutionState.WAITING) for tag in "abc"
    )
    a.case_key, b.case_key, c.case_key = sorted((a.case_key, b.case_key, c.case_key))
    for case in (a, b, c):
        lease = await stores.leases.create_leased(case, "old", 30)
        assert lease is not None
        await stores.journal.append(entry(case.case_key, 1, lease.token, name="before"))
        await stores.leases.release(lease)
    await stores.waits.replace(a.case_key, [pred])
    await stores.waits.replace(b.case_key, [pred], {("order", resource): first.seq})
    await stores.waits.replace(c.case_key, [pred], {("order", resource): first.seq})
    event, new, woken, taken = await stores.events.publish_and_wake(
        "order",
        resource,
        {"n": 2},
        event_id=None,
        published_at=NOW,
        dedupe_since=since,
        take=2,
        owner="me",
        ttl=30,
    )
    assert new and woken == [a.case_key, b.case_key, c.case_key]
    assert [(t.case_key, t.owner, t.token) for t in taken] == [(a.case_key, "me", 2), (b.case_key, "me", 2)]
    for lease in taken:
        assert lease.case.execution_state is ExecutionState.RUNNING
        assert [e.name for e in lease.journal or []] == ["before"]
    lookahead = [(t.lookahead.after_seq, t.lookahead.event) for t in taken if t.lookahead is not None]
    assert lookahead == [(0, first), (first.seq, event)]
    assert event.payload == {"n": 2}
    # The taken leases are held (fenced writes work, others cannot acquire); c is free to run.
    await stores.journal.append(entry(a.case_key, 2, taken[0].token))
    assert await stores.leases.acquire(a.case_key, "other", 30) is None
    assert await stores.leases.acquire(c.case_key, "other", 30) is not None


async def test_publish_and_wake_takes_no_lease_that_is_held(stores: Stores) -> None:
    """A woken case whose lease someone holds is woken but not taken; a repeat takes nothing."""
    resource = uid("res")
    pred = PollPredicate(resource_type="order", resource_id=resource, step_name="w")
    case = make_case(execution_state=ExecutionState.WAITING)
    held = await stores.leases.create_leased(case, "holder", 30)
    assert held is not None
    await stores.waits.replace(case.case_key, [pred])
    since = NOW - timedelta(days=1)
    _, new, woken, taken = await stores.events.publish_and_wake(
        "order", resource, None, event_id="x", published_at=NOW, dedupe_since=since, take=5, owner="me"
    )
    assert (new, woken, taken) == (True, [case.case_key], [])
    await stores.waits.replace(case.case_key, [pred])
    again = await stores.events.publish_and_wake(
        "order", resource, None, event_id="x", published_at=NOW, dedupe_since=since, take=5, owner="me"
    )
    assert again[1:] == (False, [], [])


async def test_lookahead_respects_the_case_creation_time(stores: Stores) -> None:
    """An event published before the case was created is not its next event, on a take too."""
    resource = uid("res")
    pred = PollPredicate(resource_type="order", resource_id=resource, step_name="w")
    case = make_case(at=60, execution_state=ExecutionState.WAITING)
    await stores.cases.insert(case)
    await stores.waits.replace(case.case_key, [pred])
    _, _, woken, taken = await stores.events.publish_and_wake(
        "order", resource, 1, event_id=None, published_at=NOW, dedupe_since=NOW, take=1, owner="me"
    )
    assert woken == [case.case_key] and len(taken) == 1
    assert taken[0].lookahead is not None and taken[0].lookahead.event is None


async def test_journal_append_many_is_all_durable_and_fenced_per_entry(stores: Stores) -> None:
    case = make_case()
    lease = await stores.leases.create_leased(case, "me", 30)
    assert lease is not None
    await stores.journal.append_many(
        [entry(case.case_key, 1, lease.token), entry(case.case_key, 2, lease.token)]
    )
    with pytest.raises(LeaseLostError):
        await stores.journal.append_many(
            [entry(case.case_key, 3, lease.token), entry(case.case_key, 4, lease.token + 5)]
        )
    assert [e.seq for e in await stores.journal.load(case.case_key)] == [1, 2, 3]


# -- model call usage ---------------------------------------------------------------------------


def usage_row(case_key: str, *, at: int = 0, **fields: Any) -> UsageRow:
    fields.setdefault("call_id", uid("call"))
    fields.setdefault("route", "default")
    return UsageRow(case_key=case_key, created_at=NOW + timedelta(seconds=at), **fields)


def sums(summary: UsageSummary) -> tuple[int | float, ...]:
    """calls, attempts, input, output, cache read and cache write tokens, cost."""
    return tuple(summary.model_dump().values())


async def test_usage_record_is_idempotent_on_the_call_id(stores: Stores) -> None:
    tokens = {"input_tokens": 100, "output_tokens": 20, "cache_read_tokens": 60, "cache_write_tokens": 5}
    first = usage_row(uid("case"), session_id=uid("sess"), provider="p", model="m", attempts=2, **tokens)
    first = dataclasses.replace(first, workflow_code="wf", cost_usd=0.25, latency_s=1.5, first_token_s=0.3)
    assert await stores.usage.record(first) is True
    again = dataclasses.replace(first, input_tokens=999, cost_usd=9.0, created_at=NOW + timedelta(hours=1))
    assert await stores.usage.record(again) is False  # the first one stays
    assert await stores.usage.rows(case_key=first.case_key) == [first]
    assert sums(await stores.usage.summary(case_key=first.case_key)) == (1, 2, 100, 20, 60, 5, 0.25)


async def test_publish_and_wake_stores_a_usage_row_once_with_the_answer(stores: Stores) -> None:
    """A model call's answer and its usage row commit together; published again (a redelivered
    result), neither is stored twice."""
    call_id = uid("call")
    first = usage_row(uid("case"), call_id=call_id, provider="p", model="m", attempts=1, input_tokens=5)
    since = NOW - timedelta(days=1)
    _, new, _, _ = await stores.events.publish_and_wake(
        "tianshu_llm_result",
        call_id,
        {"text": "hi"},
        event_id=call_id,
        published_at=NOW,
        dedupe_since=since,
        usage=first,
    )
    assert new and await stores.usage.rows(case_key=first.case_key) == [first]
    again = dataclasses.replace(first, input_tokens=50, attempts=2)
    _, new, _, _ = await stores.events.publish_and_wake(
        "tianshu_llm_result",
        call_id,
        {"text": "hi"},
        event_id=call_id,
        published_at=NOW,
        dedupe_since=since,
        usage=again,
    )
    assert not new and await stores.usage.rows(case_key=first.case_key) == [first]


@pytest.mark.postgres
async def test_an_answer_and_its_usage_row_are_one_transaction(pg_stores: Stores) -> None:
    """Neither is stored without the other: an answer Postgres refuses (jsonb holds no NUL)
    leaves no usage row, and a usage row it refuses leaves no answer."""
    since = NOW - timedelta(days=1)
    answers = [({"text": "a\x00b"}, "default"), ({"text": "fine"}, "a\x00b")]
    for answer, route in answers:
        call_id = uid("call")
        row = usage_row(uid("case"), call_id=call_id, route=route, attempts=1, input_tokens=5)
        with pytest.raises(Exception, match=r"0000|0x00"):
            await pg_stores.events.publish_and_wake(
                "tianshu_llm_result",
                call_id,
                answer,
                event_id=call_id,
                published_at=NOW,
                dedupe_since=since,
                usage=row,
            )
        assert await pg_stores.usage.rows(case_key=row.case_key) == []
        stored = await pg_stores.events.next_after(
            "tianshu_llm_result", call_id, after_seq=0, not_before=since
        )
        assert stored is None


async def test_usage_summary_filters_and_rows_order(stores: Stores) -> None:
    sid, other_sid, case_a, case_b = uid("sess"), uid("sess"), uid("case"), uid("case")
    later = usage_row(
        case_a, at=2, session_id=sid, workflow_code="w1", attempts=1, input_tokens=10, cost_usd=0.5
    )
    earlier = usage_row(case_b, at=1, session_id=sid, workflow_code="w2", attempts=3, output_tokens=7)
    failed = usage_row(case_a, at=3, session_id=sid, workflow_code="w1", error_class="unavailable")
    elsewhere = usage_row(
        uid("case"), session_id=other_sid, workflow_code="w1", input_tokens=1000, cost_usd=1
    )
    for row in (later, earlier, failed, elsewhere):
        assert await stores.usage.record(row) is True

    # A row without a cost estimate adds nothing to the cost.
    assert sums(await stores.usage.summary(session_id=sid)) == (3, 4, 10, 7, 0, 0, 0.5)
    assert (await stores.usage.summary(session_id=sid, workflow_code="w1")).calls == 2
    assert (await stores.usage.summary(case_key=case_a)).input_tokens == 10
    assert (await stores.usage.summary(session_id=sid, since=NOW + timedelta(seconds=2))).calls == 2
    assert await stores.usage.summary(session_id=uid("sess")) == UsageSummary()

    assert await stores.usage.rows(session_id=sid) == [earlier, later, failed]  # oldest first
    assert await stores.usage.rows(session_id=sid, limit=2) == [earlier, later]
    assert await stores.usage.rows(case_key=case_a, session_id=sid) == [later, failed]
    assert await stores.usage.rows(case_key=uid("case")) == []


async def test_usage_outlives_the_case(stores: Stores) -> None:
    """Purging a case (or history retention) leaves what its model calls cost."""
    case = make_case()
    await stores.cases.insert(case)
    row = usage_row(case.case_key, session_id=case.session_id, workflow_code=case.workflow_code)
    await stores.usage.record(row)
    await stores.cases.delete(case.case_key)
    assert await stores.usage.rows(case_key=case.case_key) == [row]


def test_usage_row_from_a_result_sums_every_attempt() -> None:
    refused, used = (
        Usage(prompt_tokens=5),
        Usage(prompt_tokens=100, completion_tokens=20, cache_read_tokens=60),
    )
    overloaded = LlmAttempt(
        provider="openai", model="gpt", error_class=LlmErrorClass.OVERLOADED, usage=refused
    )
    answered = LlmAttempt(
        provider="anthropic", model="claude", usage=used.model_copy(update={"cache_write_tokens": 4})
    )
    result = LlmCallResult(
        call_id="c1",
        case_key="k1",
        record="r",
        route="smart",
        response=LlmResponse(content="hi", provider="anthropic", model="claude"),
        attempts=[overloaded, answered],
        gateway="g",
        duration_s=2.0,
        first_token_s=0.4,
        cost_usd=0.01,
    )
    row = UsageRow.from_result(result, session_id="s", workflow_code="wf")
    assert (row.call_id, row.case_key, row.session_id, row.workflow_code, row.route) == (
        "c1",
        "k1",
        "s",
        "wf",
        "smart",
    )
    assert (row.provider, row.model, row.attempts, row.error_class) == ("anthropic", "claude", 2, None)
    assert (row.input_tokens, row.output_tokens, row.cache_read_tokens, row.cache_write_tokens) == (
        105,
        20,
        60,
        4,
    )
    assert (row.cost_usd, row.latency_s, row.first_token_s) == (0.01, 2.0, 0.4)
    assert row.created_at.tzinfo is not None

    failure = WireError(type="LlmError", code="unavailable", message="no provider answered")
    failed = result.model_copy(
        update={"response": None, "error": failure, "error_class": None, "attempts": [overloaded]}
    )
    row = UsageRow.from_result(failed)
    assert (row.provider, row.model, row.attempts, row.input_tokens) == (None, None, 1, 5)
    assert row.error_class == "unavailable" and row.session_id is None


# -- parking and children's wakes ---------------------------------------------------------------


async def test_park_stores_the_waits_and_the_case_in_one_fenced_write(stores: Stores) -> None:
    case = make_case()
    lease = await stores.leases.create_leased(case, "me", 30)
    assert lease is not None
    pred = PollPredicate(resource_type="order", resource_id=uid("r"), step_name="e")
    with pytest.raises(LeaseLostError):
        await stores.cases.park(case, lease.token + 1, [pred], {})
    assert await stores.waits.for_case(case.case_key) == []  # refused: nothing stored
    assert await stores.cases.park(case, lease.token, [pred], {}) is True
    assert case.execution_state is ExecutionState.WAITING
    assert await stores.waits.for_case(case.case_key) == [pred]
    stored = await stores.cases.get_by_key(case.case_key)
    assert stored is not None and stored.execution_state is ExecutionState.WAITING
    assert await stores.leases.acquire(case.case_key, "other", 30) is not None  # released


async def test_park_with_an_event_already_there_stores_the_case_running(stores: Stores) -> None:
    case = make_case()
    lease = await stores.leases.create_leased(case, "me", 30)
    assert lease is not None
    resource = uid("r")
    first, _ = await stores.events.publish(
        "order", resource, 1, event_id=None, published_at=NOW, dedupe_since=NOW
    )
    pred = PollPredicate(resource_type="order", resource_id=resource, step_name="e")
    # Consumed up to `first`: nothing new, it waits; one more event, and it does not.
    assert await stores.cases.park(case, lease.token, [pred], {("order", resource): first.seq}) is True
    lease = await stores.leases.acquire(case.case_key, "me", 30)
    assert lease is not None
    await stores.events.publish("order", resource, 2, event_id=None, published_at=NOW, dedupe_since=NOW)
    assert await stores.cases.park(case, lease.token, [pred], {("order", resource): first.seq}) is False
    assert case.execution_state is ExecutionState.RUNNING
    assert await stores.waits.for_case(case.case_key) == []


async def test_the_last_awaited_child_to_end_wakes_its_parent_in_its_save(stores: Stores) -> None:
    parent = make_case()
    please = await stores.leases.create_leased(parent, "me", 30)
    assert please is not None
    children = [make_case(parent.session_id, parent_key=parent.case_key) for _ in range(3)]
    for child in children:
        assert await stores.cases.insert(child)
    found = await stores.cases.get_many([c.case_key for c in children] + [uid("missing")])
    assert sorted(c.case_key for c in found) == sorted(c.case_key for c in children)
    leases = [await stores.leases.acquire(c.case_key, "me", 30) for c in children]
    first = children[0]
    first.execution_state = ExecutionState.FINISHED
    assert leases[0] is not None
    assert await stores.cases.save(first, leases[0].token, release=True) == []  # not awaited yet
    pred = PollPredicate(resource_type="tianshu-children", resource_id=parent.case_key, step_name="c")
    keys = [c.case_key for c in children]
    assert await stores.cases.park(parent, please.token, [pred], {}, keys) is True  # two still open
    for child, lease, woken in zip(children[1:], leases[1:], [[], [parent.case_key]], strict=True):
        assert lease is not None
        child.execution_state = ExecutionState.FAILED
        assert await stores.cases.save(child, lease.token, release=True) == woken
    stored = await stores.cases.get_by_key(parent.case_key)
    assert stored is not None and stored.execution_state is ExecutionState.RUNNING
    assert await stores.waits.for_case(parent.case_key) == []
