"""Chaos: while a few hundred cases run, scheduler replicas and tool runners are SIGKILLed, NATS is
restarted, Postgres backends are terminated and Postgres is stopped and started, at random. No case
may be lost and no completed step may run again.

    python -m tests.chaos [--cases 300] [--duration-s 180] [--seed N] [--schedulers 2] [--runners 2]
                          [--faults a,b] [--features a,b] [--drain-timeout-s 120] [--workdir DIR]

(`make chaos`, with CHAOS_CASES, CHAOS_DURATION_S and CHAOS_SEED; tests/test_chaos.py runs a short
one in the suite.)

It starts a NATS server of its own (`tests._nats.NatsServer`: the wheel's nats-server on a free port,
a temporary store) and a Postgres of its own (`tests._pg.private_postgres`: the embedded server on a
temporary data directory), then the scheduler replicas and the tool runners as processes serving
`tests.chaos_workflows`. The seed draws the plan (`plan()`): when each case starts and its shape
(steps, and some of: a wait for an event, a durable sleep, a tool loop whose calls go through the
runners, children), and when each fault strikes and how long its target stays down:

- `kill_scheduler`, `kill_runner`: SIGKILL one; launch it again after the downtime;
- `restart_nats`: stop the server (SIGTERM or SIGKILL), start it again on its port and store;
- `terminate_backends`: `pg_terminate_backend` on every other connection to the database;
- `restart_postgres`: stop the server (a fast shutdown), start it again on its port.

Faults overlap, one at a time per target. A process that exits by itself is launched again (and
reported). The same seed replays the same plan; what the processes make of it depends on timing.

Every step body and every tool run counts its execution (`tests._executions`). Once the plan is
done and every target is up again, the run waits for every case to end (the drain), then prints
cases lost (not finished with the expected output, children included), completed steps run again,
interrupted steps run again and the time to drain. It fails (exit status 1) when a case is lost, a
completed step ran again or a step was checkpointed twice.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import shutil
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import asyncpg
import nats
from nats.aio.client import Client

from tests import _executions
from tests._executions import Execution
from tests._nats import NatsServer
from tests._pg import PrivatePostgres, private_postgres
from tests._services import (
    SchedulerProcess,
    ServiceProcess,
    is_outage,
    publish_event,
    publish_start,
    until_done,
)
from tests._tool_runner import ToolRunnerProcess
from tests.chaos_workflows import EVENT_TYPE, event_payload, expected_output
from tianshu_core.stores.postgres import migrate

WORKFLOWS = "tests.chaos_workflows"
_FAULT_WEIGHTS = {
    "kill_scheduler": 35,
    "kill_runner": 20,
    "restart_nats": 10,
    "terminate_backends": 20,
    "restart_postgres": 15,
}
FAULTS = tuple(_FAULT_WEIGHTS)
_DOWN_S = {
    "kill_scheduler": (0.0, 1.5),
    "kill_runner": (0.0, 1.5),
    "restart_nats": (0.2, 2.0),
    "terminate_backends": (0.0, 0.0),
    "restart_postgres": (0.5, 3.0),
}
FAULT_EVERY_S = 2.0
"""The mean time between two faults."""
_FEATURE_ODDS = {"event": 0.4, "sleep_s": 0.3, "rounds": 0.4, "children": 0.25}
FEATURES = tuple(_FEATURE_ODDS)
"""What a case does besides its steps: wait for an event, sleep, run a tool loop, spawn children."""
RETRY_S = 0.2
"""How long the harness waits before it tries again what an outage refused (a publish, a query)."""
SETTLE_S = 1.0
"""After the drain: room for a late execution (of a step already checkpointed, say) to show."""
SERVICE_ENV = {
    # Short ack waits: a call or a message held by a killed process comes back soon.
    "TIANSHU_TOOL_RUNNER_ACK_WAIT_S": "3",
    "TIANSHU_SCHEDULER_ACK_WAIT_S": "5",
}
HOT_WINDOWS_S = ("5", "0")
"""The schedulers' tool hot windows, in turn: one keeps its case's coroutine for a call's result,
the next parks the case at once (the result wakes it)."""


# -- the plan ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CaseStart:
    """A case of `chaos`: when it starts (seconds into the run), its input, and how long after its
    start its event is sent (once the case exists: an event older than its case is not its own)."""

    key: str
    at_s: float
    shape: dict[str, Any]
    event_after_s: float


@dataclass(frozen=True)
class Fault:
    """One fault: when it strikes, on which replica or runner (`target`), how long that stays down;
    `hard`: NATS is stopped with SIGKILL rather than SIGTERM."""

    at_s: float
    kind: str
    target: int
    down_s: float
    hard: bool


@dataclass(frozen=True)
class Plan:
    """A run's cases and faults, in order of time."""

    seed: int
    cases: tuple[CaseStart, ...]
    faults: tuple[Fault, ...]


def plan(
    seed: int,
    cases: int,
    duration_s: float,
    schedulers: int,
    runners: int,
    faults: Sequence[str] = FAULTS,
    features: Sequence[str] = FEATURES,
) -> Plan:
    """The cases and faults of a run: the same for the same arguments. Every kind of fault in
    `faults` strikes at least once; cases have only `features`, each of the first cases one of them
    for sure."""
    for chosen, known in ((faults, FAULTS), (features, FEATURES)):
        if unknown := set(chosen) - set(known):
            raise ValueError(f"no such {sorted(unknown)}: choose among {', '.join(known)}")
    rng = random.Random(seed)
    starts = sorted(rng.uniform(0, duration_s) for _ in range(cases))
    made = tuple(
        CaseStart(
            f"chaos{seed}-{i:04d}",
            round(at, 3),
            _shape(rng, features[i] if i < len(features) else None, features),
            round(rng.uniform(0, 3), 3),
        )
        for i, at in enumerate(starts)
    )
    n = max(len(faults), round(duration_s / FAULT_EVERY_S))
    weights = [_FAULT_WEIGHTS[kind] for kind in faults]
    kinds = [*faults, *rng.choices(faults, weights=weights, k=n - len(faults))]
    rng.shuffle(kinds)
    times = sorted(rng.uniform(0, duration_s) for _ in range(n))
    targets = {"kill_scheduler": schedulers, "kill_runner": runners}
    strikes = tuple(
        Fault(
            round(at, 3),
            kind,
            rng.randrange(targets.get(kind, 1)),
            round(rng.uniform(*_DOWN_S[kind]), 3),
            rng.random() < 0.5,
        )
        for at, kind in zip(times, kinds, strict=True)
    )
    return Plan(seed, made, strikes)


def _shape(rng: random.Random, forced: str | None, features: Sequence[str]) -> dict[str, Any]:
    shape: dict[str, Any] = {"steps": rng.randint(1, 4), "work_s": rng.choice((0.0, 0.05, 0.2, 0.5, 1.0))}
    drawn = {
        "event": True,
        "sleep_s": round(rng.uniform(0.2, 2.0), 2),
        "rounds": [rng.randint(1, 3) for _ in range(rng.randint(1, 2))],
        "children": rng.randint(1, 3),
    }
    for feature, value in drawn.items():
        if rng.random() < _FEATURE_ODDS[feature] or feature == forced:
            shape[feature] = value
    return {k: v for k, v in shape.items() if k in features or k in ("steps", "work_s")}


# -- the report ----------------------------------------------------------------------------------


@dataclass
class Report:
    """What a run did and found; `ok` says whether it passed."""

    seed: int
    cases: int
    children: int = 0
    executions: int = 0
    faults: Counter[str] = field(default_factory=Counter)
    lost: list[str] = field(default_factory=list)
    """Cases (children among them) that did not finish with their expected output: `key: why`."""
    completed_again: list[str] = field(default_factory=list)
    interrupted_again: int = 0
    checkpointed_twice: list[str] = field(default_factory=list)
    tool_calls_failed: list[str] = field(default_factory=list)
    """Cases whose model was told a call failed (past its deadline, say): allowed, but shown."""
    drain_s: float | None = None
    """From the moment every target was up again until every case ended; None: not within the limit."""
    exits: list[str] = field(default_factory=list)
    """Processes that exited by themselves (and were launched again)."""

    @property
    def ok(self) -> bool:
        return not (self.lost or self.completed_again or self.checkpointed_twice)

    def summary(self) -> str:
        faults = ", ".join(f"{self.faults[k]} {k}" for k in FAULTS)
        drain = f"{self.drain_s:.1f} s" if self.drain_s is not None else "not drained"
        lines = [
            f"chaos: seed {self.seed}: {self.cases} cases and {self.children} children, "
            f"{self.executions} step executions; faults: {faults}",
            f"chaos: cases lost: {len(self.lost)}",
            f"chaos: completed steps run again: {len(self.completed_again)}",
            f"chaos: interrupted steps run again: {self.interrupted_again}",
            f"chaos: time to drain: {drain}",
        ]
        for title, items in (
            ("lost", self.lost),
            ("completed step run again", self.completed_again),
            ("checkpointed twice", self.checkpointed_twice),
            ("tool call failed", self.tool_calls_failed),
            ("exited by itself", self.exits),
        ):
            lines += [f"chaos:   {title}: {item}" for item in items[:10]]
            if len(items) > 10:
                lines.append(f"chaos:   ... {len(items) - 10} more {title}")
        lines.append(f"chaos: {'PASS' if self.ok else 'FAIL'}")
        return "\n".join(lines)

    def figures(self) -> str:
        """One line of figures, in the benchmarks' `tianshu name=value` form."""
        drain = f"{self.drain_s:.1f}" if self.drain_s is not None else "nan"
        return (
            f"tianshu chaos_cases_lost={len(self.lost)} "
            f"chaos_completed_run_again={len(self.completed_again)} "
            f"chaos_interrupted_run_again={self.interrupted_again} chaos_drain_s={drain}"
        )


# -- the run -------------------------------------------------------------------------------------


async def chaos(
    the_plan: Plan,
    workdir: Path,
    *,
    schedulers: int = 2,
    runners: int = 2,
    drain_timeout_s: float = 120.0,
) -> Report:
    """One run of `the_plan` (see the module's docstring); the processes' logs stay in `workdir`."""
    nats_server = NatsServer(workdir / "nats")
    await asyncio.to_thread(nats_server.start)
    try:
        with private_postgres("tianshu-chaos-") as pg:
            await migrate(pg.url)
            await _executions.create_table(pg.url)
            system = System(workdir, nats_server, pg, schedulers, runners)
            try:
                return await system.run(the_plan, drain_timeout_s)
            finally:
                await asyncio.to_thread(system.close)
    finally:
        nats_server.stop()


class System:
    """The servers and processes under test, and what the faults did to them."""

    def __init__(
        self, workdir: Path, nats_server: NatsServer, pg: PrivatePostgres, schedulers: int, runners: int
    ) -> None:
        self.nats_server = nats_server
        self.pg = pg
        self.schedulers = [
            SchedulerProcess(
                workdir,
                pg.url,
                nats_server.url,
                TIANSHU_WORKFLOWS=WORKFLOWS,
                TIANSHU_SCHEDULER_TOOL_HOT_WINDOW_S=HOT_WINDOWS_S[i % len(HOT_WINDOWS_S)],
                **SERVICE_ENV,
            )
            for i in range(schedulers)
        ]
        self.runners = [
            ToolRunnerProcess(
                workdir, nats_server.url, TIANSHU_TOOLS=WORKFLOWS, TIANSHU_DATABASE_URL=pg.url, **SERVICE_ENV
            )
            for _ in range(runners)
        ]
        self.processes: list[ServiceProcess] = [*self.schedulers, *self.runners]
        self.down: set[int] = set()
        """ids of the processes a fault holds down (the watchdog leaves them be)."""
        self.locks: dict[str, asyncio.Lock] = {}
        self.faults_log = workdir / "faults.log"
        self.faults: Counter[str] = Counter()
        self.exits: list[str] = []

    def close(self) -> None:
        for process in self.processes:
            process.kill()

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.log_tail(20)}" for p in self.processes if p.proc is not None)

    async def run(self, the_plan: Plan, drain_timeout_s: float) -> Report:
        await asyncio.to_thread(ServiceProcess.start_all, self.processes, 60.0)
        nc = await nats.connect(
            self.nats_server.url, max_reconnect_attempts=-1, reconnect_time_wait=RETRY_S, error_cb=_quiet
        )
        stop_watching = asyncio.Event()
        watchdog = asyncio.create_task(self._watch(stop_watching))
        try:
            t0 = time.monotonic()
            await asyncio.gather(
                self._start_cases(nc, the_plan.cases, t0),
                self._send_events(nc, the_plan.cases, t0),
                *(self._strike(fault, t0) for fault in the_plan.faults),
            )
            healed = time.monotonic()
            drained = await self._drain([c.key for c in the_plan.cases], drain_timeout_s)
            drain_s = time.monotonic() - healed if drained else None
            await asyncio.sleep(SETTLE_S)
            report = await self._verdict(the_plan, drain_s)
        finally:
            stop_watching.set()
            await watchdog
            await nc.close()
        return report

    # -- the faults --------------------------------------------------------------------------

    async def _strike(self, fault: Fault, t0: float) -> None:
        await _sleep_until(t0 + fault.at_s)
        if fault.kind in ("kill_scheduler", "kill_runner"):
            group = self.schedulers if fault.kind == "kill_scheduler" else self.runners
            process: ServiceProcess = group[fault.target]
            async with self._outage(process.name, f"SIGKILL {process.name} (pid {process.pid})"):
                self.down.add(id(process))
                try:
                    await asyncio.to_thread(process.kill)
                    await asyncio.sleep(fault.down_s)
                    process.launch()
                finally:
                    self.down.discard(id(process))
        elif fault.kind == "restart_nats":
            async with self._outage("nats", f"NATS stopped ({'SIGKILL' if fault.hard else 'SIGTERM'})"):
                await asyncio.to_thread(self.nats_server.stop, kill=fault.hard)
                await asyncio.sleep(fault.down_s)
                await asyncio.to_thread(self.nats_server.start)
        elif fault.kind == "terminate_backends":
            async with self._outage("postgres", "Postgres backends terminated"):
                await until_done(self._terminate_backends)
        else:
            async with self._outage("postgres", "Postgres stopped"):
                await asyncio.to_thread(self.pg.stop)
                await asyncio.sleep(fault.down_s)
                await asyncio.to_thread(self.pg.start)
        self.faults[fault.kind] += 1

    @contextlib.asynccontextmanager
    async def _outage(self, target: str, what: str) -> AsyncIterator[None]:
        """One fault at a time on `target`; each noted in `faults.log` (for reading the processes'
        logs side by side), when it strikes and when its target is back."""
        async with self.locks.setdefault(target, asyncio.Lock()):
            self._note(what)
            yield
            self._note(f"{what}: back")

    def _note(self, line: str) -> None:
        now = time.time()
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now)) + f",{int(now % 1 * 1000):03d}"
        with self.faults_log.open("a") as log:
            log.write(f"{stamp} {line}\n")

    async def _terminate_backends(self) -> None:
        conn = await asyncpg.connect(self.pg.url, timeout=5)
        try:
            await conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE pid <> pg_backend_pid() AND backend_type = 'client backend'"
            )
        finally:
            await conn.close()

    async def _watch(self, stop: asyncio.Event) -> None:
        """Launch again a process that exited by itself (one that could not start while Postgres or
        NATS was away, say); note it."""
        while not stop.is_set():
            for process in self.processes:
                if id(process) in self.down or process.proc is None or process.alive:
                    continue
                self.exits.append(f"{process.name} (exit status {process.proc.returncode})")
                process.launch()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.5)

    # -- the traffic -------------------------------------------------------------------------

    async def _start_cases(self, nc: Client, cases: Sequence[CaseStart], t0: float) -> None:
        for case in cases:
            await _sleep_until(t0 + case.at_s)
            await until_done(partial(publish_start, nc, "chaos", case.key, case.shape))

    async def _send_events(self, nc: Client, cases: Sequence[CaseStart], t0: float) -> None:
        pending = {c.key: c for c in cases if c.shape.get("event")}
        while pending:
            await asyncio.sleep(RETRY_S)
            now = time.monotonic() - t0
            due = [key for key, c in pending.items() if now >= c.at_s + c.event_after_s]
            if not due:
                continue
            try:
                existing = await self._existing(due)
            except Exception as exc:
                if not is_outage(exc):
                    raise
                continue
            for key in existing:
                payload = event_payload(key)
                await until_done(partial(publish_event, nc, EVENT_TYPE, key, payload, msg_id=f"ev-{key}"))
                del pending[key]

    async def _existing(self, keys: list[str]) -> list[str]:
        rows = await self._fetch("SELECT case_key FROM tianshu_cases WHERE case_key = ANY($1::text[])", keys)
        return [r["case_key"] for r in rows]

    async def _fetch(self, query: str, *args: Any) -> list[asyncpg.Record]:
        conn = await asyncpg.connect(self.pg.url, timeout=5)
        try:
            return list(await conn.fetch(query, *args))
        finally:
            await conn.close()

    # -- the verdict -------------------------------------------------------------------------

    async def _drain(self, keys: list[str], timeout_s: float) -> bool:
        """Until every case exists and every case (children too) has ended; False past `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with contextlib.suppress(Exception):
                rows = await self._fetch("SELECT case_key, execution_state FROM tianshu_cases")
                ended = {r["case_key"] for r in rows if r["execution_state"] in ("finished", "failed")}
                if len(ended) == len(rows) and ended.issuperset(keys):
                    return True
            await asyncio.sleep(0.25)
        return False

    async def _verdict(self, the_plan: Plan, drain_s: float | None) -> Report:
        report = Report(the_plan.seed, len(the_plan.cases), drain_s=drain_s, exits=self.exits)
        report.faults = self.faults
        rows = await self._fetch(
            "SELECT case_key, parent_key, execution_state, output::text AS output, error::text AS error "
            "FROM tianshu_cases"
        )
        cases = {r["case_key"]: r for r in rows}
        waits = await self._fetch(
            "SELECT case_key, string_agg(format('%s %s (%s)', resource_type, resource_id, step_name), ', ') "
            "AS waits FROM tianshu_waits GROUP BY case_key"
        )
        waiting_on = {r["case_key"]: r["waits"] for r in waits}

        def unfinished(row: asyncpg.Record) -> str | None:
            state = row["execution_state"]
            if state == "finished":
                return None
            if state == "failed":
                return f"failed: {row['error']}"
            return f"still {state}" + (
                f" on {waiting_on[row['case_key']]}" if row["case_key"] in waiting_on else ""
            )

        report.children = sum(r["parent_key"] is not None for r in rows)
        for case in the_plan.cases:
            row = cases.get(case.key)
            if row is None:
                report.lost.append(f"{case.key}: never created")
                continue
            why = unfinished(row)
            if why is None:
                output = json.loads(row["output"])
                expected = expected_output(case.key, case.shape)
                # A call past its deadline is an error the model is told of: allowed, but shown.
                if (answer := output.pop("answer", None)) != expected.pop("answer", None):
                    report.tool_calls_failed.append(f"{case.key}: {answer}")
                if output != expected:
                    why = f"finished with {output}, not {expected}"
            if why is not None:
                report.lost.append(f"{case.key}: {why}")
        report.lost += [
            f"{r['case_key']} (a child): {why}"
            for r in rows
            if r["parent_key"] is not None and (why := unfinished(r)) is not None
        ]
        ran = await _executions.tally(self.pg.url)
        report.executions = len(ran.executions)
        report.completed_again = [
            f"{e.case_key} {e.step}: ran at " + ", ".join(_when(x) for x in ran.of(e.case_key, e.step))
            for e in ran.completed_again
        ]
        report.interrupted_again = ran.interrupted_again
        twice = await self._fetch(
            "SELECT case_key, name, count(*) AS n FROM tianshu_journal WHERE kind = 'step' "
            "GROUP BY case_key, name HAVING count(*) > 1"
        )
        report.checkpointed_twice = [f"{r['case_key']} {r['name']}: {r['n']} records" for r in twice]
        return report


def _when(execution: Execution) -> str:
    """When and where it ran, as the processes' logs say it (local time, pid)."""
    moment = execution.started_at.astimezone().strftime("%H:%M:%S.%f")[:-3]
    return f"{moment} (pid {execution.pid}{', checkpointed already' if execution.checkpointed else ''})"


async def _quiet(_exc: Exception) -> None:
    """The harness's NATS client reconnects across every restart of the server: not worth a trace."""


async def _sleep_until(moment: float) -> None:
    await asyncio.sleep(max(0.0, moment - time.monotonic()))


# -- the command ---------------------------------------------------------------------------------


@contextlib.contextmanager
def _workdir(given: Path | None) -> Iterator[Path]:
    """`given`, else a temporary directory."""
    if given is not None:
        given.mkdir(parents=True, exist_ok=True)
        yield given
        return
    yield Path(tempfile.mkdtemp(prefix="tianshu-chaos-"))


def _names(option: str) -> list[str]:
    return [name.strip() for name in option.split(",") if name.strip()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.chaos", description=(__doc__ or "").split("\n\n")[0]
    )
    parser.add_argument("--cases", type=int, default=300, help="cases to start (default 300)")
    parser.add_argument(
        "--duration-s", type=float, default=180.0, help="how long the faults go on (default 180)"
    )
    parser.add_argument("--seed", type=int, default=None, help="replay a run's plan (default: a random seed)")
    parser.add_argument("--schedulers", type=int, default=2, help="scheduler replicas (default 2)")
    parser.add_argument("--runners", type=int, default=2, help="tool runners (default 2)")
    parser.add_argument(
        "--drain-timeout-s",
        type=float,
        default=120.0,
        help="how long the cases may take to end once the faults are over (default 120)",
    )
    parser.add_argument(
        "--faults",
        default=",".join(FAULTS),
        help="the kinds of fault to strike with, comma-separated (default: all of them)",
    )
    parser.add_argument(
        "--features",
        default=",".join(FEATURES),
        help="what cases may do besides their steps, comma-separated (default: all of it)",
    )
    parser.add_argument(
        "--workdir", type=Path, default=None, help="where the processes' logs go (default: a temp dir)"
    )
    options = parser.parse_args(argv)
    seed = options.seed if options.seed is not None else random.randrange(2**31)
    faults, features = _names(options.faults), _names(options.features)
    try:
        the_plan = plan(
            seed, options.cases, options.duration_s, options.schedulers, options.runners, faults, features
        )
    except ValueError as exc:
        parser.error(str(exc))
    replay = (
        f"python -m tests.chaos --cases {options.cases} --duration-s {options.duration_s:g} --seed {seed}"
        f" --schedulers {options.schedulers} --runners {options.runners}"
        f" --faults {','.join(faults)} --features {','.join(features)}"
    )
    with _workdir(options.workdir) as workdir:
        print(
            f"chaos: seed {seed}: {options.cases} cases and {len(the_plan.faults)} faults over "
            f"{options.duration_s:g} s; logs in {workdir}\nchaos: replay: {replay}",
            flush=True,
        )
        report = asyncio.run(
            chaos(
                the_plan,
                workdir,
                schedulers=options.schedulers,
                runners=options.runners,
                drain_timeout_s=options.drain_timeout_s,
            )
        )
        print(report.summary())
        print(report.figures())
        if report.ok and options.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    if not report.ok:
        print(f"chaos: replay: {replay}", file=sys.stderr)
    return 0 if report.ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
