"""Running the services as a user does: separate processes, configured by the environment."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, Self, TypeVar
from urllib.parse import urlsplit, urlunsplit

import asyncpg
from nats.aio.client import Client

from tianshu_contracts import CancelCase, PauseCase, ResumeCase, subjects
from tianshu_core.transient import is_transient

T = TypeVar("T")

ROOT = Path(__file__).resolve().parent.parent


class ServiceProcess:
    """One service run as a user runs it: `command` in a process of its own, configured by `env`,
    logging to ``<workdir>/<name>.log``. `start()` waits for the ready file the service touches once it
    serves; `launch()` and `wait_ready()` are its two halves, to start several side by side, or to
    restart one that cannot get ready yet (while Postgres or NATS is away)."""

    command: tuple[str, ...]
    kind: str
    """The first part of `name`."""

    def __init__(self, workdir: Path) -> None:
        self.name = f"{self.kind}-{uuid.uuid4().hex[:6]}"
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.ready_file = workdir / f"{self.name}.ready"
        self.log_file = workdir / f"{self.name}.log"
        self.env: dict[str, str] = {**os.environ, "PYTHONPATH": str(ROOT)}
        self.proc: subprocess.Popen[bytes] | None = None

    def launch(self) -> Self:
        """Start the process without waiting for it to be ready."""
        self.ready_file.unlink(missing_ok=True)
        with self.log_file.open("ab") as log:
            self.proc = subprocess.Popen(self.command, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        return self

    def wait_ready(self, timeout_s: float = 30.0) -> Self:
        assert self.proc is not None
        deadline = time.monotonic() + timeout_s
        while not self.ready_file.exists():
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.kind} exited with {self.proc.returncode}:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"{self.kind} not ready after {timeout_s} s:\n{self.log_tail()}")
            time.sleep(0.02)
        return self

    def start(self, timeout_s: float = 30.0) -> Self:
        return self.launch().wait_ready(timeout_s)

    @staticmethod
    def start_all(processes: Sequence[ServiceProcess], timeout_s: float = 30.0) -> None:
        """Start them side by side; return once every one is ready."""
        for process in processes:
            process.launch()
        for process in processes:
            process.wait_ready(timeout_s)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, sig: signal.Signals) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def terminate(self, timeout_s: float = 60.0) -> int:
        """SIGTERM and wait; the exit code."""
        self.signal(signal.SIGTERM)
        return self.wait_exit(timeout_s)

    def wait_exit(self, timeout_s: float) -> int:
        """Wait for the process to end on its own; its exit code (TimeoutExpired past the limit)."""
        assert self.proc is not None
        return self.proc.wait(timeout=timeout_s)

    def kill(self) -> None:
        """SIGKILL (a stopped process too) and reap."""
        if self.alive:
            assert self.proc is not None
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)

    def log_text(self) -> str:
        """Everything the process logged so far."""
        try:
            return self.log_file.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.kill()


class SchedulerProcess(ServiceProcess):
    """One `python -m tianshu_scheduler` replica serving `tests.e2e_workflows` and `examples.approval`
    unless ``TIANSHU_WORKFLOWS`` says otherwise; its step bodies record their runs under `workdir`."""

    command = (sys.executable, "-m", "tianshu_scheduler")
    kind = "scheduler"

    def __init__(self, workdir: Path, database_url: str, nats_url: str, **env: str) -> None:
        super().__init__(workdir)
        self.env |= {
            "TIANSHU_DATABASE_URL": database_url,
            "TIANSHU_NATS_URL": nats_url,
            "TIANSHU_WORKFLOWS": "tests.e2e_workflows,examples.approval",
            "TIANSHU_SCHEDULER_NAME": self.name,
            "TIANSHU_SCHEDULER_READY_FILE": str(self.ready_file),
            "TIANSHU_TEST_EFFECTS": str(workdir),
            "TIANSHU_LEASE_TTL_S": "2",
            "TIANSHU_SCHEDULER_SWEEP_INTERVAL_S": "0.2",
            **env,
        }

    @property
    def owner(self) -> str:
        """The lease owner this replica writes on the cases it holds."""
        return f"{self.name}-{self.pid}"


def retry_budget_env(max_deliver: int, initial_s: float, max_s: float) -> dict[str, str]:
    """The delivery budget and the retry backoff of a scheduler and a tool runner alike (pass it to
    both: each reads its own prefix)."""
    env = {}
    for service in ("SCHEDULER", "TOOL_RUNNER"):
        env[f"TIANSHU_{service}_MAX_DELIVER"] = str(max_deliver)
        env[f"TIANSHU_{service}_RETRY_INITIAL_S"] = str(initial_s)
        env[f"TIANSHU_{service}_RETRY_MAX_S"] = str(max_s)
    return env


def budget_backoff_s(max_deliver: int, initial_s: float, max_s: float) -> float:
    """The budget's total backoff: the wait after each of its deliveries, min(max, initial·2^(n-1)),
    summed over n = 1 … max_deliver (the services' jitter aside)."""
    return sum(min(max_s, initial_s * 2.0 ** (n - 1)) for n in range(1, max_deliver + 1))


def effects(workdir: Path) -> list[tuple[str, str, int]]:
    """(case key, what, pid) for every recorded step-body execution."""
    path = workdir / "effects.log"
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        key, what, pid, _ = line.split()
        out.append((key, what, int(pid)))
    return out


def executions(workdir: Path) -> Counter[tuple[str, str]]:
    """How many times each (case key, step) body ran."""
    return Counter((key, what) for key, what, _ in effects(workdir))


def pids_by_case(workdir: Path) -> dict[str, set[int]]:
    """The processes that ran step bodies of each case."""
    out: dict[str, set[int]] = {}
    for key, _what, pid in effects(workdir):
        out.setdefault(key, set()).add(pid)
    return out


# -- talking to the scheduler over NATS, as an outside system does -------------------------------


def new_key(prefix: str) -> str:
    """A case key no other test uses."""
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


async def request_start(nc: Client, code: str, input: Any = None, key: str | None = None) -> str:
    """Start a case by request on `tianshu.v1.rpc.cases.start`; the case key from the reply."""
    body: dict[str, Any] = {"kind": "start_case", "workflow_code": code, "input": input}
    if key:
        body["case_key"] = key
    reply = json.loads(
        (await nc.request(subjects.RPC_CASES_START, json.dumps(body).encode(), timeout=10)).data
    )
    assert reply["kind"] == "start_case_accepted", reply
    return str(reply["case_key"])


async def publish_start(nc: Client, code: str, key: str, input: Any = None) -> None:
    """Start a case fire-and-forget: a JetStream publish on `tianshu.v1.cases.start`."""
    body = {"kind": "start_case", "workflow_code": code, "case_key": key, "input": input}
    await nc.jetstream().publish(
        subjects.CASES_START, json.dumps(body).encode(), headers={subjects.HEADER_MSG_ID: f"start-{key}"}
    )


async def send_command(nc: Client, command: CancelCase | PauseCase | ResumeCase) -> None:
    """A JetStream publish of a case command on `tianshu.v1.cases.<key>.command`."""
    await nc.jetstream().publish(
        subjects.case_command(command.case_key),
        command.model_dump_json().encode(),
        headers={subjects.HEADER_MSG_ID: f"{command.kind}-{command.case_key}-{uuid.uuid4().hex[:8]}"},
    )


async def publish_event(
    nc: Client, resource_type: str, resource_id: str, payload: Any, msg_id: str | None = None
) -> None:
    """A plain nats-py JetStream publish on `tianshu.v1.events.<type>.<id>`."""
    headers = {subjects.HEADER_MSG_ID: msg_id} if msg_id else None
    await nc.jetstream().publish(
        subjects.event(resource_type, resource_id), json.dumps(payload).encode(), headers=headers
    )


# -- watching the database ---------------------------------------------------------------------


async def eventually(
    check: Callable[[], Awaitable[T | None]],
    *,
    what: str,
    within: float = 30.0,
    interval: float = 0.02,
    context: Callable[[], str] | None = None,
) -> T:
    """Poll `check` until it returns something other than None (or False); that value.

    `within` is a safety net against a hang, not a performance threshold.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while True:
        value = await check()
        if value is not None and value is not False:
            return value
        if loop.time() > deadline:
            detail = f"\n{context()}" if context is not None else ""
            raise AssertionError(f"not after {within:g} s: {what}{detail}")
        await asyncio.sleep(interval)


def is_outage(exc: BaseException) -> bool:
    """Whether `exc` says Postgres or NATS is out of reach: the services' rule (`is_transient`), and
    asyncpg's InternalClientError, which a connection whose backend was terminated can raise
    instead of a connection error (MagicStack/asyncpg#1069; the Postgres store handles it too)."""
    return isinstance(exc, asyncpg.InternalClientError) or is_transient(exc)


async def until_done(attempt: Callable[[], Awaitable[T]], *, retry_s: float = 0.1) -> T:
    """`attempt()` again and again while it fails for an outage (no limit: the outage ends)."""
    while True:
        try:
            return await attempt()
        except Exception as exc:
            if not is_outage(exc):
                raise
        await asyncio.sleep(retry_s)


class CaseDb:
    """Read-only looks at the test database: case rows, journals, timers."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    @classmethod
    async def open(cls, url: str) -> CaseDb:
        pool = await asyncpg.create_pool(url, min_size=1, max_size=2)
        assert pool is not None
        return cls(pool)

    async def close(self) -> None:
        await self.pool.close()

    async def case(self, key: str) -> dict[str, Any]:
        row = await self.pool.fetchrow(
            "SELECT case_key, execution_state, lifecycle, finished_type, output::text AS output, "
            "error::text AS error, lease_owner, lease_token FROM tianshu_cases WHERE case_key = $1",
            key,
        )
        assert row is not None, f"no case {key}"
        out = dict(row)
        out["output"] = None if out["output"] is None else json.loads(out["output"])
        return out

    async def states(self, keys: Sequence[str]) -> dict[str, str]:
        """execution_state of each case."""
        rows = await self.pool.fetch(
            "SELECT case_key, execution_state FROM tianshu_cases WHERE case_key = ANY($1::text[])", list(keys)
        )
        return {r["case_key"]: r["execution_state"] for r in rows}

    async def journal(self, key: str) -> list[dict[str, Any]]:
        """The case's journal rows in seq order: seq, kind, name, token."""
        rows = await self.pool.fetch(
            "SELECT seq, kind, name, token FROM tianshu_journal WHERE case_key = $1 ORDER BY seq", key
        )
        return [dict(r) for r in rows]

    async def steps(self, key: str) -> list[str]:
        """Names of the case's checkpointed steps, in seq order."""
        return [e["name"] for e in await self.journal(key) if e["kind"] == "step"]

    async def step_counts(self, keys: Sequence[str]) -> dict[str, int]:
        """How many steps each case has checkpointed."""
        rows = await self.pool.fetch(
            "SELECT case_key, count(*) AS n FROM tianshu_journal "
            "WHERE case_key = ANY($1::text[]) AND kind = 'step' GROUP BY case_key",
            list(keys),
        )
        counts = dict.fromkeys(keys, 0)
        counts.update({r["case_key"]: r["n"] for r in rows})
        return counts

    async def timers(self, key: str) -> list[str]:
        rows = await self.pool.fetch("SELECT name FROM tianshu_timers WHERE case_key = $1", key)
        return [r["name"] for r in rows]

    async def wait_state(self, key: str, state: str, *, within: float = 30.0, **kw: Any) -> dict[str, Any]:
        """The case once its execution_state is `state` (fails early if it ends in another one)."""

        async def check() -> dict[str, Any] | None:
            case = await self.case(key)
            if case["execution_state"] == state:
                return case
            if case["execution_state"] in ("finished", "failed"):
                raise AssertionError(f"case {key} ended {case['execution_state']}, not {state}: {case}")
            return None

        return await eventually(check, what=f"case {key} {state}", within=within, **kw)

    async def wait_all(
        self, keys: Sequence[str], state: str = "finished", *, within: float = 60.0, **kw: Any
    ) -> None:
        """Until every case is in `state`."""

        async def check() -> bool:
            states = await self.states(keys)
            failed = {k: s for k, s in states.items() if s == "failed" and state != "failed"}
            assert not failed, f"cases failed: {failed}"
            return sum(s == state for s in states.values()) == len(keys)

        await eventually(check, what=f"{len(keys)} cases {state}", within=within, **kw)

    # -- tool loops (tests/test_tool_service.py) -----------------------------------------------

    async def step_data(self, key: str, name: str) -> list[Any]:
        """The decoded data of every step record named `name` in the case's journal (one if all is well)."""
        rows = await self.pool.fetch(
            "SELECT data::text AS data FROM tianshu_journal WHERE case_key = $1 AND kind = 'step' "
            "AND name = $2 ORDER BY seq",
            key,
            name,
        )
        return [json.loads(r["data"]) for r in rows]

    async def waits(self, key: str) -> list[tuple[str, str, str]]:
        """(resource type, resource id, step name) of each predicate the case waits on."""
        rows = await self.pool.fetch(
            "SELECT resource_type, resource_id, step_name FROM tianshu_waits WHERE case_key = $1 "
            "ORDER BY position",
            key,
        )
        return [(r["resource_type"], r["resource_id"], r["step_name"]) for r in rows]

    async def everything(self) -> dict[str, list[str]]:
        """Every row of every Tianshu table, as text, sorted: the whole database, to compare."""
        tables = await self.pool.fetch(
            "SELECT tablename FROM pg_tables "
            "WHERE schemaname = current_schema() AND tablename LIKE 'tianshu%'"
        )
        return {
            t["tablename"]: sorted(
                r[0] for r in await self.pool.fetch(f'SELECT t::text FROM "{t["tablename"]}" t')
            )
            for t in tables
        }

    async def event_count(self, resource_type: str, resource_id: str) -> int:
        """How many events are stored on the resource."""
        n = await self.pool.fetchval(
            "SELECT count(*) FROM tianshu_events WHERE resource_type = $1 AND resource_id = $2",
            resource_type,
            resource_id,
        )
        return int(n)


@contextlib.asynccontextmanager
async def fresh_database(server_url: str, prefix: str = "tianshu_svc") -> AsyncIterator[str]:
    """A new, migrated database on the server (dropped afterwards): no other test's cases in it, so a
    scheduler's sweeper adopts only this test's."""
    from tianshu_core.stores.postgres import migrate

    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    url = urlunsplit(urlsplit(server_url)._replace(path=f"/{name}"))
    admin = await asyncpg.connect(server_url)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    try:
        await migrate(url)
        yield url
    finally:
        admin = await asyncpg.connect(server_url)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()
