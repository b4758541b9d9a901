"""Scale: 10,000 waiting cases cost the scheduler no memory per case, and waking them is an index lookup.

A waiting case is a row in Postgres, not a task or an object in the scheduler: after a warm-up of
100 cases, bringing 9,900 more to waiting through the scheduler process must not grow its RSS by
more than 50 MB. And the lookups a wake makes are index scans on their own indexes with 10,000
waits stored, planned by Postgres with its default settings (the engine's connections change
none): the statements inside `tianshu_publish_wake_take` (the engine's wake, captured with
auto_explain), `PostgresWaitStore.cases_waiting_on`, `PostgresEventStore.next_after` and the
sweep's scans (the SQL recorded from the stores themselves, EXPLAINed as custom and as generic
plans). The group commit's batch append, whose plan cached on a new database once kept scanning
tianshu_cases as it grew, is planned per call.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import nats
import psutil  # type: ignore[import-untyped]
import pytest
from nats.aio.client import Client

from tests._nats import NatsServerFactory
from tests._services import SchedulerProcess
from tianshu_contracts import subjects
from tianshu_core.stores.postgres import PostgresCaseStore, PostgresEventStore, PostgresWaitStore, migrate
from tianshu_core.stores.postgres._committer import _INSERT_MANY

CASES = 10_000
WARM_UP = 100
RSS_BUDGET = 50 * 1024 * 1024
peak_rss = [0]  # the scheduler's highest RSS seen while polling (for the report line)


@contextlib.asynccontextmanager
async def fresh_database(server_url: str, prefix: str) -> AsyncIterator[str]:
    """A migrated database of its own (10,000 cases should not burden the session's), dropped after."""
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(server_url)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    url = urlunsplit(urlsplit(server_url)._replace(path=f"/{name}"))
    try:
        await migrate(url)
        yield url
    finally:
        admin = await asyncpg.connect(server_url)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()


@pytest.fixture
async def fresh_db(pg_server_url: str) -> AsyncIterator[str]:
    async with fresh_database(pg_server_url, "tianshu_scale") as url:
        yield url


async def count_waiting(conn: asyncpg.Connection[asyncpg.Record]) -> int:
    return int(await conn.fetchval("SELECT count(*) FROM tianshu_cases WHERE execution_state = 'waiting'"))


async def wait_for_waiting(
    conn: asyncpg.Connection[asyncpg.Record], target: int, within: float, sched: SchedulerProcess
) -> float:
    """Seconds until `target` cases are waiting (polling Postgres)."""
    started = time.monotonic()
    while (waiting := await count_waiting(conn)) < target:
        assert sched.proc is not None and sched.proc.poll() is None, sched.log_tail()
        peak_rss[0] = max(peak_rss[0], psutil.Process(sched.pid).memory_info().rss)
        if time.monotonic() - started > within:
            failed = await conn.fetchval(
                "SELECT count(*) FROM tianshu_cases WHERE execution_state = 'failed'"
            )
            raise AssertionError(f"{waiting} of {target} waiting after {within} s ({failed} failed)")
        await asyncio.sleep(0.2)
    return time.monotonic() - started


async def publish_starts(nc: Client, keys: list[str], batch: int = 500) -> None:
    """Fire-and-forget StartCase publishes, `batch` JetStream publishes in flight at a time."""
    js = nc.jetstream()
    for first in range(0, len(keys), batch):
        await asyncio.gather(
            *(
                js.publish(
                    subjects.CASES_START,
                    json.dumps({"kind": "start_case", "workflow_code": "e2e_wait", "case_key": key}).encode(),
                )
                for key in keys[first : first + batch]
            )
        )


@pytest.mark.e2e
@pytest.mark.nats
@pytest.mark.postgres
@pytest.mark.slow
@pytest.mark.timeout(300)
async def test_ten_thousand_waiting_cases_cost_the_scheduler_no_memory_per_case(
    tmp_path: Path, fresh_db: str, make_nats_server: NatsServerFactory
) -> None:
    server = make_nats_server()
    run = uuid.uuid4().hex[:6]
    keys = [f"scale-{run}-{i:05d}" for i in range(CASES)]
    conn = await asyncpg.connect(fresh_db)
    nc = await nats.connect(server.url)
    try:
        with SchedulerProcess(tmp_path, fresh_db, server.url, TIANSHU_LOG_LEVEL="WARNING") as sched:
            process = psutil.Process(sched.pid)
            started = time.monotonic()
            await publish_starts(nc, keys[:WARM_UP])
            await wait_for_waiting(conn, WARM_UP, 30, sched)
            await asyncio.sleep(0.5)  # let the last runs settle
            rss_warm = process.memory_info().rss

            publish_started = time.monotonic()
            await publish_starts(nc, keys[WARM_UP:])
            published = time.monotonic() - publish_started
            took = await wait_for_waiting(conn, CASES, 240, sched)
            await asyncio.sleep(0.5)
            rss_full = process.memory_info().rss

            # Every start was handled and acknowledged: nothing is left pending in the stream.
            info = await nc.jetstream().consumer_info(subjects.STREAM_CASES, subjects.CONSUMER_START)
            assert info.num_pending == 0 and info.num_ack_pending == 0, info
            assert await conn.fetchval("SELECT count(*) FROM tianshu_waits") == CASES
            assert (
                await conn.fetchval("SELECT count(*) FROM tianshu_cases WHERE execution_state <> 'waiting'")
                == 0
            )

            # The 10,000 waits work: one event wakes its case, which finishes with the payload.
            woken = keys[CASES // 2]
            await nc.jetstream().publish(f"tianshu.v1.events.order.{woken}", b'{"late": true}')
            deadline = time.monotonic() + 20
            while (
                await conn.fetchval("SELECT execution_state FROM tianshu_cases WHERE case_key = $1", woken)
            ) != ("finished"):
                assert time.monotonic() < deadline, "the woken case did not finish"
                await asyncio.sleep(0.05)
            assert await count_waiting(conn) == CASES - 1
            assert sched.proc is not None and sched.proc.poll() is None
    finally:
        await nc.close()
        await conn.close()

    mb = 1024 * 1024
    print(
        f"\n{CASES} cases to waiting: warm-up {WARM_UP} in {publish_started - started:.1f} s; "
        f"publish {CASES - WARM_UP} in {published:.1f} s; all waiting {took:.1f} s after the publish began "
        f"({(CASES - WARM_UP) / took:.0f} cases/s); RSS {rss_warm / mb:.1f} MB at {WARM_UP} waiting, "
        f"{rss_full / mb:.1f} MB at {CASES} (+{(rss_full - rss_warm) / mb:.1f} MB; "
        f"peak {peak_rss[0] / mb:.1f} MB)"
    )
    assert rss_full <= rss_warm + RSS_BUDGET, (
        f"RSS grew by {(rss_full - rss_warm) / mb:.1f} MB from {WARM_UP} to {CASES} waiting cases"
    )


# The wake lookups' query plans ----------------------------------------------------------------------


class _Recorder:
    """Stands in for the stores' PgBackend: records the SQL a store method runs, returns no rows."""

    def __init__(self) -> None:
        self.sql: str | None = None
        self.args: tuple[Any, ...] = ()

    async def fetch(self, _what: str, sql: str, *args: Any, **_kw: Any) -> list[Any]:
        self.sql, self.args = sql, args
        return []

    async def fetchrow(self, _what: str, sql: str, *args: Any, **_kw: Any) -> None:
        self.sql, self.args = sql, args


async def engine_sql_of_cases_waiting_on(resource_type: str, resource_id: str) -> tuple[str, tuple[Any, ...]]:
    recorder = _Recorder()
    await PostgresWaitStore(recorder).cases_waiting_on(resource_type, resource_id)  # type: ignore[arg-type]
    assert recorder.sql is not None
    return recorder.sql, recorder.args


async def engine_sql_of_next_after(
    resource_type: str, resource_id: str, after_seq: int, not_before: datetime
) -> tuple[str, tuple[Any, ...]]:
    recorder = _Recorder()
    await PostgresEventStore(recorder).next_after(  # type: ignore[arg-type]
        resource_type, resource_id, after_seq=after_seq, not_before=not_before
    )
    assert recorder.sql is not None
    return recorder.sql, recorder.args


def plan_nodes(plan: dict[str, Any]) -> list[dict[str, Any]]:
    """Every node of an EXPLAIN (FORMAT JSON) plan tree."""
    nodes = [plan]
    for child in plan.get("Plans", []):
        nodes += plan_nodes(child)
    return nodes


def _literal(value: Any) -> str:
    if value is None:
        return "NULL"
    if isinstance(value, datetime):
        return f"'{value.isoformat()}'::timestamptz"
    if isinstance(value, int):
        return str(value)
    return "'" + str(value).replace("'", "''") + "'"


async def explain(
    conn: asyncpg.Connection[asyncpg.Record],
    sql: str,
    args: tuple[Any, ...],
    types: list[str],
    *,
    generic: bool,
) -> dict[str, Any]:
    """The plan Postgres makes for the engine's statement with these parameters.

    `generic`: the plan of a prepared statement reused over and over (as asyncpg's statement cache
    does), made without looking at the values; otherwise the custom plan for these values.
    """
    name = f"plan_{uuid.uuid4().hex[:8]}"
    await conn.execute(f"PREPARE {name} ({', '.join(types)}) AS {sql}")
    try:
        mode = "force_generic_plan" if generic else "force_custom_plan"
        await conn.execute(f"SET plan_cache_mode = {mode}")
        rows = await conn.fetchval(
            f"EXPLAIN (FORMAT JSON) EXECUTE {name} ({', '.join(_literal(a) for a in args)})"
        )
    finally:
        await conn.execute(f"DEALLOCATE {name}")
        await conn.execute("RESET plan_cache_mode")
    plan: dict[str, Any] = json.loads(rows)[0]["Plan"]
    return plan


def assert_index_scan(
    plan: dict[str, Any], index: str, table: str, what: str, *, bitmap_ok: bool = False
) -> None:
    """`table` is read through `index` only: an Index (Only) Scan on it, never a Seq Scan. With
    `bitmap_ok`, a Bitmap Heap Scan fed by a Bitmap Index Scan on that index counts too: Postgres'
    choice when a good share of the table matches (a thousand waiters on one resource)."""
    nodes = plan_nodes(plan)
    kinds = [(n["Node Type"], n.get("Index Name"), n.get("Relation Name")) for n in nodes]
    assert not any(n["Node Type"] == "Seq Scan" for n in nodes), f"{what}: sequential scan in {kinds}"
    scans = [n for n in nodes if n.get("Relation Name") == table]
    assert scans, f"{what}: {table} is not read? {kinds}"
    for scan in scans:
        if bitmap_ok and scan["Node Type"] == "Bitmap Heap Scan":
            feeding = plan_nodes(scan)[1:]
            assert feeding and all(
                n["Node Type"] == "Bitmap Index Scan" and n["Index Name"] == index for n in feeding
            ), f"{what}: {kinds}"
            continue
        assert scan["Node Type"] in ("Index Scan", "Index Only Scan"), f"{what}: {kinds}"
        assert scan["Index Name"] == index, f"{what}: {kinds}"


NOW = datetime.now(UTC)
RETENTION_START = NOW - timedelta(days=7)


@pytest.fixture(scope="module")
async def planned_db(pg_server_url: str) -> AsyncIterator[str]:
    """10,000 waiting cases, each waiting on its own order as the scale test leaves them, a tenth
    of them on one shared resource instead, beside 50,000 finished cases and 50 running ones;
    20,000 events: 10,000 on one busy resource first, then one per order. ANALYZEd, so the
    planner knows all that."""
    async with fresh_database(pg_server_url, "tianshu_plans") as url:
        conn = await asyncpg.connect(url)
        try:
            await conn.execute(
                """
                INSERT INTO tianshu_cases (case_key, session_id, workflow_code, execution_state, lifecycle,
                                           created_at, updated_at)
                SELECT 'c' || i, 'c' || i, 'e2e_wait', 'waiting', 'normal', $1, $1
                FROM generate_series(1, 10000) AS i;
                """,
                NOW,
            )
            await conn.execute(
                """
                INSERT INTO tianshu_waits (case_key, position, resource_type, resource_id, step_name)
                SELECT 'c' || i, 1, 'order', 'o' || i, 'wait' FROM generate_series(1, 10000) AS i;
                UPDATE tianshu_waits SET resource_id = 'shared' WHERE case_key LIKE 'c%0';
                INSERT INTO tianshu_events (resource_type, resource_id, event_id, payload, published_at)
                SELECT 'order', 'busy', 'b' || i, '{"n": 1}', now() FROM generate_series(1, 10000) AS i;
                INSERT INTO tianshu_events (resource_type, resource_id, event_id, payload, published_at)
                SELECT 'order', 'o' || i, 'e' || i, '{"paid": 1}', now() FROM generate_series(1, 10000) AS i;
                INSERT INTO tianshu_cases (case_key, session_id, workflow_code, execution_state, lifecycle,
                                           created_at, updated_at)
                SELECT 'f' || i, 'f' || i, 'e2e_wait', 'finished', 'normal', now() - interval '1 day', now()
                FROM generate_series(1, 50000) AS i;
                INSERT INTO tianshu_cases (case_key, session_id, workflow_code, execution_state, lifecycle,
                                           created_at, updated_at)
                SELECT 'r' || i, 'r' || i, 'e2e_wait', 'running', 'normal', now(), now()
                FROM generate_series(1, 50) AS i;
                ANALYZE tianshu_cases;
                ANALYZE tianshu_waits;
                ANALYZE tianshu_events;
                """
            )
            assert await conn.fetchval("SELECT count(*) FROM tianshu_waits") == CASES
        finally:
            await conn.close()
        yield url


@pytest.fixture
async def plain_conn(planned_db: str) -> AsyncIterator[asyncpg.Connection[asyncpg.Record]]:
    """A plain connection: Postgres' default planner settings."""
    conn = await asyncpg.connect(planned_db)
    try:
        assert await conn.fetchval("SHOW enable_seqscan") == "on"
        yield conn
    finally:
        await conn.close()


@pytest.mark.postgres
@pytest.mark.slow
@pytest.mark.parametrize("generic", [False, True], ids=["custom-plan", "generic-plan"])
@pytest.mark.parametrize(
    ("resource_id", "waiters"),
    [("o4242", 1), ("shared", 1000), ("nobody", 0)],
    ids=["one-waiter", "a-thousand-waiters", "no-waiter"],
)
async def test_cases_waiting_on_is_an_index_lookup(
    plain_conn: asyncpg.Connection[asyncpg.Record], resource_id: str, waiters: int, generic: bool
) -> None:
    """The wake's "who waits on this resource": tianshu_waits_resource_idx, never a Seq Scan."""
    sql, args = await engine_sql_of_cases_waiting_on("order", resource_id)
    assert "tianshu_waits" in sql
    plan = await explain(plain_conn, sql, args, ["text", "text"], generic=generic)
    assert_index_scan(
        plan,
        "tianshu_waits_resource_idx",
        "tianshu_waits",
        f"cases_waiting_on(order, {resource_id}) {generic=}",
        bitmap_ok=waiters >= 1000,
    )
    assert len(await plain_conn.fetch(sql, *args)) == waiters


@pytest.mark.postgres
@pytest.mark.slow
@pytest.mark.parametrize(
    ("resource_id", "after", "generic"),
    [
        pytest.param("o4242", "start", False, id="one-event-custom-plan"),
        pytest.param("o4242", "start", True, id="one-event-generic-plan"),
        pytest.param("o4242", "end", False, id="one-event-none-newer-custom-plan"),
        pytest.param("busy", "middle", True, id="busy-generic-plan"),
        pytest.param("busy", "end", True, id="busy-none-newer-generic-plan"),
        # A resource holding half the events: the custom plan once walked the primary key here.
        pytest.param("busy", "middle", False, id="busy-custom-plan"),
        pytest.param("busy", "end", False, id="busy-none-newer-custom-plan"),
    ],
)
async def test_next_after_is_an_index_lookup(
    plain_conn: asyncpg.Connection[asyncpg.Record], resource_id: str, after: str, generic: bool
) -> None:
    """The run's "next event on this resource after seq N": tianshu_events_resource_idx."""
    bounds = await plain_conn.fetchrow(
        "SELECT min(seq), max(seq) FROM tianshu_events WHERE resource_id = $1", resource_id
    )
    assert bounds is not None
    first, last = bounds
    seq = {"start": 0, "middle": (first + last) // 2, "end": last}[after]
    sql, args = await engine_sql_of_next_after("order", resource_id, seq, RETENTION_START)
    assert "tianshu_events" in sql
    plan = await explain(plain_conn, sql, args, ["text", "text", "bigint", "timestamptz"], generic=generic)
    assert_index_scan(
        plan,
        "tianshu_events_resource_idx",
        "tianshu_events",
        f"next_after({resource_id}, {after}) {generic=}",
    )
    row = await plain_conn.fetchrow(sql, *args)
    assert (row is None) if after == "end" else (row is not None and row["seq"] > seq)


@pytest.mark.postgres
@pytest.mark.slow
@pytest.mark.parametrize("generic", [False, True], ids=["custom-plan", "generic-plan"])
@pytest.mark.parametrize("state", ["running", "waiting"])
async def test_the_runnable_and_waiting_scans_read_active_cases_only(
    plain_conn: asyncpg.Connection[asyncpg.Record], state: str, generic: bool
) -> None:
    """The sweep's scans (`runnable`, `waiting`) go through tianshu_cases_active_idx, which holds
    active cases only, in the generic plan too: 50,000 finished cases are not read."""
    recorder = _Recorder()
    cases = PostgresCaseStore(recorder)  # type: ignore[arg-type]
    await (cases.runnable(limit=100) if state == "running" else cases.waiting(limit=100))
    assert recorder.sql is not None and recorder.args[0] == state
    plan = await explain(plain_conn, recorder.sql, recorder.args, ["text", "int", "text"], generic=generic)
    assert_index_scan(
        plan, "tianshu_cases_active_idx", "tianshu_cases", f"{state} scan {generic=}", bitmap_ok=True
    )
    rows = await plain_conn.fetch(recorder.sql, *recorder.args)
    assert len(rows) == (50 if state == "running" else 100)


@pytest.mark.postgres
async def test_the_batch_append_keeps_an_indexed_plan_as_a_new_database_grows(pg_server_url: str) -> None:
    """The group commit's batch append, run over and over while tianshu_cases holds three rows (a
    new database), then once it holds 20,000: it locks its cases by key, not by reading the table.
    A plan cached at the start (asyncpg prepares every statement) would scan it sequentially
    until the next ANALYZE; `tianshu_append_journal` plans the statement for each call."""
    async with fresh_database(pg_server_url, "tianshu_batch_plan") as url:
        conn = await asyncpg.connect(url)
        try:
            await conn.execute("ALTER TABLE tianshu_cases SET (autovacuum_enabled = false)")
            insert = (
                "INSERT INTO tianshu_cases (case_key, session_id, workflow_code, execution_state, lifecycle,"
                " lease_token, created_at, updated_at)"
                " SELECT 'b' || i, 'b' || i, 'wf', 'running', 'normal', 1, now(), now()"
                " FROM generate_series($1::int, $2::int) AS i"
            )
            await conn.execute(insert, 1, 3)
            keys = ["b1", "b2", "b3"]

            async def append(seq: int) -> None:
                n = len(keys)
                await conn.fetch(
                    _INSERT_MANY, keys, [seq] * n, ["step"] * n, ["s"] * n, ["1"] * n, [1] * n, [NOW] * n
                )

            for seq in range(1, 11):
                await append(seq)
            await conn.execute(insert, 4, 20_000)
            # This backend's sequential scans of the table, as yet unreported (so: read around it).
            scans = "SELECT seq_scan FROM pg_stat_xact_user_tables WHERE relname = 'tianshu_cases'"
            async with conn.transaction():
                before = await conn.fetchval(scans)
                await append(11)
                after = await conn.fetchval(scans)
            assert after == before
            assert await conn.fetchval("SELECT count(*) FROM tianshu_journal") == 33
        finally:
            await conn.close()


@pytest.mark.postgres
@pytest.mark.slow
async def test_next_after_reads_its_own_resource_only(plain_conn: asyncpg.Connection[asyncpg.Record]) -> None:
    """With nothing newer on the resource, the lookup ends where the resource's entries end: it
    does not read on through the 5,000 later orders' events (a row comparison as the range's end
    did: a btree scan stops only where its first column does)."""
    last = await plain_conn.fetchval("SELECT max(seq) FROM tianshu_events WHERE resource_id = 'o4242'")
    sql, args = await engine_sql_of_next_after("order", "o4242", last, RETENTION_START)
    params = ", ".join(_literal(a) for a in args)
    name = f"plan_{uuid.uuid4().hex[:8]}"
    await plain_conn.execute(f"PREPARE {name} (text, text, bigint, timestamptz) AS {sql}")
    try:
        plan = json.loads(
            await plain_conn.fetchval(f"EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) EXECUTE {name} ({params})")
        )[0]["Plan"]
    finally:
        await plain_conn.execute(f"DEALLOCATE {name}")
    assert plan["Shared Hit Blocks"] + plan["Shared Read Blocks"] <= 5, plan


@pytest.mark.postgres
@pytest.mark.slow
async def test_a_park_reads_its_own_resource_only(plain_conn: asyncpg.Connection[asyncpg.Record]) -> None:
    """tianshu_park's look for an event that came meanwhile reads the waited resource's entries of
    tianshu_events_resource_idx, not on through those of the thousands of later orders (migration
    0014; 0008's range, ended by a row comparison, read them all, on every park). Counted in the
    index's block reads, flushed to the statistics around the park (rolled back)."""
    last = await plain_conn.fetchval("SELECT max(seq) FROM tianshu_events WHERE resource_id = 'o4242'")
    blocks = (
        "SELECT idx_blks_hit + idx_blks_read FROM pg_statio_user_indexes "
        "WHERE indexrelname = 'tianshu_events_resource_idx'"
    )

    async def index_blocks() -> int:
        await plain_conn.execute("SELECT pg_stat_force_next_flush()")  # flushed as it commits
        found: int = await plain_conn.fetchval(blocks)
        return found

    before = await index_blocks()
    tr = plain_conn.transaction()
    await tr.start()
    try:
        ready = await plain_conn.fetchval(
            "SELECT ready FROM tianshu_park('c4242', 0, $1, $2, $3, $4, $5, $6)",
            ["order"],
            ["o4242"],
            ["wait"],
            [None],
            [last],
            [],
        )
    finally:
        await tr.rollback()
    read = await index_blocks() - before
    assert ready is False  # nothing newer: the case would wait
    assert read <= 6, read


class _CallRecorder:
    """Records the statement `publish_and_wake` sends (the call of `tianshu_publish_wake_take`)."""

    def __init__(self) -> None:
        self.sql: str | None = None
        self.args: tuple[Any, ...] = ()

    async def run(self, _what: str, op: Any, **_kw: Any) -> Any:
        class Conn:
            async def fetch(conn_self, sql: str, *args: Any) -> list[dict[str, Any]]:  # noqa: N805
                self.sql, self.args = sql, args
                head = {"out_seq": 1, "out_payload": "null", "out_published_at": NOW, "out_created": False}
                return [{**head, "out_woken": []}]

        return await op(Conn(), 1)


async def nested_plans(
    conn: asyncpg.Connection[asyncpg.Record], sql: str, args: tuple[Any, ...], *, generic: bool
) -> list[dict[str, Any]]:
    """The plans of every statement run inside the engine's call (auto_explain's nested
    statements, sent to us as notices), in a transaction rolled back afterwards."""
    notices: list[str] = []

    def on_notice(_conn: Any, message: Any) -> None:
        notices.append(str(message.message))

    # asyncpg reads the types of the result (a composite among them) with queries of its own; let
    # it do so before auto_explain listens.
    await conn.prepare(sql)
    conn.add_log_listener(on_notice)
    try:
        async with conn.transaction():
            try:
                await conn.execute("LOAD 'auto_explain'")
            except asyncpg.PostgresError as exc:
                pytest.skip(f"auto_explain cannot be loaded here: {exc}")
            for setting, value in (
                ("auto_explain.log_min_duration", "0"),
                ("auto_explain.log_nested_statements", "on"),
                ("auto_explain.log_level", "notice"),
                ("auto_explain.log_format", "json"),
                ("plan_cache_mode", "force_generic_plan" if generic else "force_custom_plan"),
            ):
                await conn.execute(f"SET LOCAL {setting} = '{value}'")
            await conn.fetchrow(sql, *args)
            await conn.execute("SET LOCAL auto_explain.log_min_duration = -1")
            raise _RollbackError
    except _RollbackError:
        pass
    finally:
        conn.remove_log_listener(on_notice)
    plans = []
    for notice in notices:
        text = notice.partition("plan:")[2].strip() or notice
        with contextlib.suppress(ValueError):
            plans.append(json.loads(text))
    return plans


class _RollbackError(Exception):
    pass


@pytest.mark.postgres
@pytest.mark.slow
@pytest.mark.parametrize("generic", [False, True], ids=["custom-plan", "generic-plan"])
@pytest.mark.parametrize(
    ("resource_id", "waiters"), [("o4242", 1), ("shared", 1000)], ids=["one-waiter", "a-thousand-waiters"]
)
async def test_the_wake_inside_publish_and_wake_is_an_index_lookup(
    plain_conn: asyncpg.Connection[asyncpg.Record], resource_id: str, waiters: int, generic: bool
) -> None:
    """The engine wakes through `tianshu_publish_wake_take` (migration 0004): the plans of the
    statements inside it, as Postgres runs them, find the waiters through the resource index, and
    the cases and waits they move by key; the lease it takes, the journal and the next event it
    reads are index lookups too. With a thousand waiters (a tenth of all) the custom plan
    may instead read tianshu_cases and tianshu_waits whole for the UPDATE/DELETE by key (a hash join,
    cheaper than 1,000 key lookups at this size); finding who waits stays an index lookup."""
    recorder = _CallRecorder()
    await PostgresEventStore(recorder).publish_and_wake(  # type: ignore[arg-type]
        "order",
        resource_id,
        {"paid": 1},
        event_id=f"plan-{uuid.uuid4().hex}",
        published_at=NOW,
        dedupe_since=RETENTION_START,
        take=1,
        owner="plan-test",
    )
    assert recorder.sql is not None and "tianshu_publish_wake_take" in recorder.sql
    plans = await nested_plans(plain_conn, recorder.sql, recorder.args, generic=generic)
    texts = [p.get("Query Text", "")[:80] for p in plans]
    wake = [p for p in plans if "FROM tianshu_waits" in p.get("Query Text", "")]
    assert len(wake) == 1, f"no single plan of the wake statement among {texts}"
    dedupe = [p for p in plans if "e.event_id = p_event_id" in p.get("Query Text", "")]
    assert dedupe, f"no plan of the dedupe lookup among {texts}"
    bulk = waiters >= 1000 and not generic
    for entry in plans:
        nodes = plan_nodes(entry["Plan"])
        kinds = [(n["Node Type"], n.get("Index Name"), n.get("Relation Name")) for n in nodes]
        seq_scans = {n.get("Relation Name") for n in nodes if n["Node Type"] == "Seq Scan"}
        allowed = {"tianshu_cases", "tianshu_waits"} if bulk and entry is wake[0] else set()
        assert seq_scans <= allowed, f"sequential scan in {entry.get('Query Text', '')[:200]!r}: {kinds}"
    nodes = plan_nodes(wake[0]["Plan"])
    kinds = [(n["Node Type"], n.get("Index Name"), n.get("Relation Name")) for n in nodes]
    by_resource = [n for n in nodes if n.get("Index Name") == "tianshu_waits_resource_idx"]
    assert by_resource and all("resource_type" in n.get("Index Cond", "") for n in by_resource), kinds
    if not bulk:
        cases = [n for n in nodes if n.get("Relation Name") == "tianshu_cases" and "Index Name" in n]
        assert cases and all(n["Index Name"] == "tianshu_cases_pkey" for n in cases), kinds
    # The lease it takes for the first waiter, with that case's journal and next event.
    taken = [p for p in plans if "FROM tianshu_events ev" in p.get("Query Text", "")]
    assert taken, f"no plan of the taken case's reads among {texts}"
    nodes = plan_nodes(taken[0]["Plan"])
    kinds = [(n["Node Type"], n.get("Index Name"), n.get("Relation Name")) for n in nodes]
    events = [n for n in nodes if n.get("Relation Name") == "tianshu_events"]
    assert events and all(n.get("Index Name") == "tianshu_events_resource_idx" for n in events), kinds
    assert any(n.get("Index Name") == "tianshu_journal_pkey" for n in nodes), kinds  # (bitmap) by key
