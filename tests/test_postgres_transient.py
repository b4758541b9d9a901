"""Transient failures: dropped connections are retried where that is safe, and only there."""

from __future__ import annotations

import asyncio
import logging
import sys
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any, TypeVar

import asyncpg
import pytest

from tianshu_core.errors import StoreUnavailableError
from tianshu_core.models import Case, ExecutionState, JournalEntry, Lease
from tianshu_core.stores.postgres import (
    PostgresCaseStore,
    PostgresEventStore,
    PostgresJournalStore,
    PostgresLeaseStore,
    RetryConfig,
    connect_postgres,
    is_transient,
    migrate,
)
from tianshu_core.stores.postgres._backend import Op, PgBackend, create_pool
from tianshu_core.stores.protocols import Stores

T = TypeVar("T")
FAST_RETRY = RetryConfig(attempts=10, initial=0.01, cap=0.2, jitter=0.01)


def uid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def make_case() -> Case:
    now = datetime.now(UTC)
    return Case(
        case_key=uid("case"), session_id=uid("sess"), workflow_code="wf", created_at=now, updated_at=now
    )


def test_classification() -> None:
    assert is_transient(asyncpg.exceptions.AdminShutdownError("terminated"))  # 57P01
    assert is_transient(asyncpg.exceptions.CannotConnectNowError("starting"))  # 57P03
    assert is_transient(asyncpg.exceptions.TooManyConnectionsError("full"))  # 53300
    assert is_transient(asyncpg.exceptions.ConnectionDoesNotExistError("gone"))  # 08003
    assert is_transient(asyncpg.InterfaceError("cannot perform operation: connection is closed"))
    # A kept connection that closed: the pool took it back as it closed.
    assert is_transient(
        asyncpg.InterfaceError(
            "cannot call Connection.fetchval(): connection has been released back to the pool"
        )
    )
    assert is_transient(ConnectionResetError())
    assert is_transient(OSError("connection refused"))
    assert not is_transient(asyncpg.exceptions.QueryCanceledError("statement timeout"))  # 57014
    assert not is_transient(asyncpg.exceptions.UniqueViolationError("dup"))
    assert not is_transient(asyncpg.exceptions.SerializationError("40001"))
    assert not is_transient(asyncpg.InterfaceError("pool is closed"))
    assert not is_transient(ValueError("bad"))


@pytest.mark.postgres
async def test_appends_survive_terminated_connections(pg_url: str, caplog: pytest.LogCaptureFixture) -> None:
    """200 concurrent appenders while an admin keeps killing the store's backends."""
    await migrate(pg_url)
    app = uid("tianshu-transient")
    stores = await connect_postgres(pg_url, max_size=6, application_name=app, retry=FAST_RETRY)
    admin = await asyncpg.connect(pg_url)
    leases: list[Lease] = []
    for _ in range(20):
        lease = await stores.leases.create_leased(make_case(), "w", 120)
        assert lease is not None
        leases.append(lease)

    killed = 0
    stop = asyncio.Event()

    async def killer() -> None:
        # A bounded spell of kills (about 0.4 s), shorter than the retry budget of one append
        # (FAST_RETRY: about 1.1 s of backoff): on a loaded machine an attempt can take longer
        # than the pause between kills, and endless kills would then fail appends at random.
        nonlocal killed
        for _ in range(20):
            if stop.is_set():
                return
            killed += await admin.fetchval(
                "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE application_name = $1 AND datname = current_database() AND pid <> pg_backend_pid()) t",
                app,
            )
            await asyncio.sleep(0.02)

    async def writer(i: int) -> None:
        lease = leases[i % 20]
        for j in range(10):
            seq = j * 10 + i // 20
            await stores.journal.append(
                JournalEntry(
                    lease.case_key, seq, "step", f"s{seq}", f'{{"i":{i}}}', lease.token, datetime.now(UTC)
                )
            )
            await asyncio.sleep(0.002)  # spread the appends over many kills

    caplog.set_level(logging.WARNING, logger="tianshu_core.stores.postgres")
    kill_task = asyncio.create_task(killer())
    try:
        results = await asyncio.gather(*(writer(i) for i in range(200)), return_exceptions=True)
    finally:
        stop.set()
        await kill_task
    try:
        assert [r for r in results if r is not None] == []  # none refused, none failed
        assert killed > 0
        assert any("transient" in rec.getMessage() for rec in caplog.records)  # retries happened
        for lease in leases:
            rows = await admin.fetch(
                "SELECT seq, count(*) AS n FROM tianshu_journal WHERE case_key = $1 "
                "GROUP BY seq ORDER BY seq",
                lease.case_key,
            )
            assert [(r["seq"], r["n"]) for r in rows] == [(s, 1) for s in range(100)]
    finally:
        await admin.close()
        await stores.close()


class LostReplyBackend(PgBackend):
    """Simulates a reply lost after the commit: attempt 1 runs, then its connection 'drops'."""

    async def run(self, what: str, op: Op[T], *, idempotent: bool = True) -> T:
        async def flaky(conn: Any, attempt: int) -> T:
            result = await op(conn, attempt)
            if attempt == 1:
                raise asyncpg.exceptions.ConnectionDoesNotExistError(
                    "connection was closed in the middle of operation"
                )
            return result

        return await super().run(what, flaky, idempotent=idempotent)


@pytest.fixture
async def lost_reply(pg_url: str) -> AsyncIterator[LostReplyBackend]:
    await migrate(pg_url)
    pool = await create_pool(
        pg_url, min_size=1, max_size=2, application_name="tianshu-lost-reply", statement_timeout_ms=None
    )
    db = LostReplyBackend(pool, FAST_RETRY)
    yield db
    await db.close()


@pytest.fixture
async def honest(pg_url: str) -> AsyncIterator[Stores]:
    await migrate(pg_url)
    stores = await connect_postgres(pg_url, max_size=2, application_name="tianshu-honest")
    yield stores
    await stores.close()


@pytest.mark.postgres
async def test_retried_writes_recognise_their_own_first_attempt(lost_reply: LostReplyBackend) -> None:
    cases, leases = PostgresCaseStore(lost_reply), PostgresLeaseStore(lost_reply)
    journal = PostgresJournalStore(lost_reply)

    case = make_case()
    assert await cases.insert(case) is True  # the retry finds exactly our row: still "created"
    assert await cases.get_by_key(case.case_key) == case

    leased = make_case()
    lease = await leases.create_leased(leased, "me", 30)
    assert lease is not None and lease.token == 1

    for seq in range(3):
        await journal.append(
            JournalEntry(leased.case_key, seq, "step", f"s{seq}", "{}", lease.token, leased.created_at)
        )
    assert [e.seq for e in await journal.load(leased.case_key)] == [0, 1, 2]

    events = PostgresEventStore(lost_reply)
    now = datetime.now(UTC)
    event, created = await events.publish(
        "rt", uid("r"), {"a": 1}, event_id="e1", published_at=now, dedupe_since=now
    )
    assert created and event.payload == {"a": 1}


@pytest.mark.postgres
async def test_a_retry_does_not_claim_someone_elses_row(lost_reply: LostReplyBackend, honest: Stores) -> None:
    other = make_case()
    assert await honest.cases.insert(other) is True
    assert (
        await PostgresCaseStore(lost_reply).insert(other.model_copy(update={"workflow_code": "mine"}))
        is False
    )
    assert await PostgresLeaseStore(lost_reply).create_leased(other, "me", 30) is None


@pytest.mark.postgres
async def test_non_idempotent_writes_are_not_retried_blindly(
    lost_reply: LostReplyBackend, honest: Stores
) -> None:
    rt, rid = "rt", uid("r")
    now = datetime.now(UTC)
    with pytest.raises(StoreUnavailableError, match="outcome is unknown"):
        await PostgresEventStore(lost_reply).publish(
            rt, rid, 1, event_id=None, published_at=now, dedupe_since=now
        )
    stored = await honest.events.next_after(rt, rid, after_seq=0, not_before=now)
    assert stored is not None and stored.payload == 1
    assert await honest.events.next_after(rt, rid, after_seq=stored.seq, not_before=now) is None  # once

    waiting = make_case().model_copy(update={"execution_state": ExecutionState.WAITING})
    await honest.cases.insert(waiting)
    with pytest.raises(StoreUnavailableError):
        await PostgresCaseStore(lost_reply).mark_runnable([waiting.case_key])


@pytest.mark.postgres
async def test_a_kept_connection_killed_while_idle_is_not_used_again(pg_url: str) -> None:
    """Connections kept between operations (the backend's lane) can die while they wait; the next
    operation, even one that is never retried once sent, must not land on a dead one."""
    await migrate(pg_url)
    app = uid("tianshu-lane")
    stores = await connect_postgres(pg_url, max_size=4, application_name=app, retry=FAST_RETRY)
    admin = await asyncpg.connect(pg_url)
    try:
        since = datetime.now(UTC)
        for i in range(3):  # fill the lane
            await stores.events.publish(
                "lane", uid("r"), i, event_id=None, published_at=since, dedupe_since=since
            )
        killed = await admin.fetchval(
            "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE application_name = $1 AND pid <> pg_backend_pid()) t",
            app,
        )
        assert killed >= 1
        await asyncio.sleep(0.2)  # the client sees the sockets close
        # Without an event id a publish is not retried once sent: it has to start on a live one.
        event, created = await stores.events.publish(
            "lane", uid("r"), "after", event_id=None, published_at=since, dedupe_since=since
        )
        assert created and event.payload == "after"
    finally:
        await admin.close()
        await stores.close()


async def test_the_schema_check_at_connect_waits_out_a_dropped_connection(
    pg_migrated_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Postgres restarting as a service starts drops its first connection mid-check: the check
    is retried like any statement, instead of the service exiting with a traceback."""
    migrations = sys.modules["tianshu_core.stores.postgres.migrate"]
    real = migrations.applied_migrations
    calls = 0

    async def dropped_once(conn: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise asyncpg.exceptions.ConnectionDoesNotExistError("connection was closed in the middle")
        return await real(conn)

    monkeypatch.setattr(migrations, "applied_migrations", dropped_once)
    stores = await connect_postgres(pg_migrated_url, max_size=2, retry=FAST_RETRY)
    await stores.close()
    assert calls == 2
