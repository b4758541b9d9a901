"""The scheduler: the engine's heart driven by NATS messages instead of a tick.

It creates cases (`StartCase`), wakes waiting ones (events), obeys commands, fires due timers,
takes over cases whose holder died (expired leases), and tells the world when a case changes.
Every handler commits to Postgres before its message is acknowledged, and is idempotent.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import replace
from datetime import UTC
from pathlib import Path
from typing import Any

import asyncpg
from nats.aio.client import Client
from nats.aio.msg import Msg
from pydantic import BaseModel, JsonValue

from tianshu_contracts import (
    CASE_COMMAND_ADAPTER,
    EVENT_PAYLOAD_ADAPTER,
    GET_CASE_ADAPTER,
    LIST_CASES_ADAPTER,
    START_CASE_ADAPTER,
    CancelCase,
    CaseFinished,
    CaseFound,
    CaseNotFound,
    CasesPage,
    CaseSummary,
    CaseUpdated,
    DeadLetterReason,
    GetCase,
    ListCases,
    PauseCase,
    ResumeCase,
    StartCase,
    StartCaseAccepted,
    WireError,
    subjects,
)
from tianshu_contracts.gateway import LLM_CALL_RESULT_ADAPTER, LlmCallResult
from tianshu_contracts.tools import TOOL_CALL_RESULT_ADAPTER, ToolCallResult
from tianshu_core import (
    Case,
    CaseFilter,
    Engine,
    ExecutionState,
    Lease,
    Lifecycle,
    PublishResult,
    RunStatus,
    Stores,
    TianshuError,
    WorkflowRegistry,
    connect_postgres,
)
from tianshu_core.bus import (
    Backoff,
    Delivery,
    GracefulShutdown,
    NatsSettings,
    RejectMessage,
    Responder,
    TianshuStreams,
    Worker,
    WorkerOptions,
    connect,
    ensure_consumers,
    ensure_streams,
    publish_core,
    pull_subscription,
    scheduler_consumers,
    wire_error,
)
from tianshu_core.bus.llm import NatsLlmClient
from tianshu_core.bus.shutdown import Stoppable
from tianshu_core.bus.tools import NatsToolExecutor
from tianshu_core.engine import waiting_on
from tianshu_core.errors import InvalidCursorError, UnstorableValueError
from tianshu_core.llm import LLM_RESULT_RESOURCE
from tianshu_core.stores.protocols import UsageRow
from tianshu_core.telemetry import trace_id_of
from tianshu_core.tools import TOOL_RESULT_RESOURCE

from .settings import SchedulerSettings

log = logging.getLogger(__name__)

CaseCommandMsg = CancelCase | PauseCase | ResumeCase


class Scheduler:
    """One scheduler replica. `await start()`, then `await serve()` until SIGTERM."""

    def __init__(
        self, settings: SchedulerSettings, registry: WorkflowRegistry, nats: NatsSettings | None = None
    ) -> None:
        self.settings = settings
        self.registry = registry
        self.nats_settings = nats or NatsSettings()
        self.stores: Stores | None = None
        self.engine: Engine | None = None
        self.nc: Client | None = None
        self._workers: list[Stoppable] = []
        self._runs: dict[str, asyncio.Task[None]] = {}
        self._again: set[str] = set()
        # Leases a wake took for us (PublishResult.taken), waiting for their case's next run here.
        self._taken: dict[str, Lease] = {}
        self._slots = asyncio.Semaphore(settings.scheduler_max_runs)
        self._stopping = asyncio.Event()
        self._sweeper: asyncio.Task[None] | None = None
        self._retention: asyncio.Task[None] | None = None
        self._chores: set[asyncio.Task[None]] = set()
        self.runs_done = 0
        self.tools: NatsToolExecutor
        self.llm: NatsLlmClient

    # -- life cycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Connect, set up streams and consumers, and start serving; then signal readiness."""
        s = self.settings
        self.stores = await connect_postgres(
            s.database_url, min_size=s.pool_min_size, max_size=s.pool_max_size, migrate=s.migrate_on_start
        )
        config = replace(s.engine_config(), owner=f"{s.scheduler_name}-{os.getpid()}")
        self.engine = engine = Engine(self.stores, self.registry, config=config)
        engine.add_listener(self._on_case_changed)
        engine.add_wake_listener(self._on_woken)
        self.nc = nc = await connect(self.nats_settings, name=f"tianshu-scheduler-{s.scheduler_name}")
        js = nc.jetstream(timeout=self.nats_settings.request_timeout_s)
        await ensure_streams(js, TianshuStreams(events_max_age_s=s.event_retention_s).specs())
        specs = {c.durable: c for c in scheduler_consumers(ack_wait_s=s.scheduler_ack_wait_s)}
        await ensure_consumers(js, list(specs.values()))
        if s.max_event_payload_bytes > nc.max_payload:
            log.warning(
                "TIANSHU_MAX_EVENT_PAYLOAD_BYTES=%d is over the NATS server's max_payload (%d): "
                "larger events cannot reach the scheduler",
                s.max_event_payload_bytes,
                nc.max_payload,
            )
        options = WorkerOptions(
            max_payload_bytes=s.max_event_payload_bytes,
            max_deliver=s.scheduler_max_deliver,
            backoff=Backoff(initial_s=s.scheduler_retry_initial_s, max_s=s.scheduler_retry_max_s),
            heartbeat_s=s.scheduler_ack_wait_s / 3,
            # Everything the scheduler consumes is stored in Postgres, whose text refuses NUL.
            refuse_nul=True,
        )
        # Few starts at once, so that replicas share a burst of starts instead of one taking all.
        start_options = replace(options, concurrency=8, batch=8)
        subs = {
            durable: await pull_subscription(js, specs[durable])
            for durable in (
                subjects.CONSUMER_START,
                subjects.CONSUMER_COMMANDS,
                subjects.CONSUMER_EVENTS,
                subjects.CONSUMER_TOOL_RESULTS,
                subjects.CONSUMER_LLM_RESULTS,
            )
        }
        # ctx.tool_step's registries run on the tool runners, over NATS.
        self.tools = NatsToolExecutor(
            nc, js, hot_window_s=s.scheduler_tool_hot_window_s, grace_s=s.scheduler_tool_grace_s
        )
        await self.tools.start()
        engine.tool_executor = self.tools
        # ctx.llm: model calls go to the LLM gateways, over NATS.
        self.llm = NatsLlmClient(
            nc,
            js,
            hot_window_s=s.scheduler_llm_hot_window_s,
            timeout_s=s.scheduler_llm_timeout_s,
            grace_s=s.scheduler_llm_grace_s,
            max_attempts=s.scheduler_llm_max_attempts,
            stream=s.scheduler_llm_stream,
        )
        await self.llm.start()
        engine.llm = self.llm
        workers: list[Worker[Any]] = [
            Worker(
                nc,
                subs[subjects.CONSUMER_START],
                START_CASE_ADAPTER,
                self._handle_start,
                options=start_options,
                name="start",
            ),
            Worker(
                nc,
                subs[subjects.CONSUMER_COMMANDS],
                CASE_COMMAND_ADAPTER,
                self._handle_command,
                options=options,
                name="commands",
            ),
            Worker(
                nc,
                subs[subjects.CONSUMER_EVENTS],
                EVENT_PAYLOAD_ADAPTER,
                self._handle_event,
                options=options,
                name="events",
            ),
            Worker(
                nc,
                subs[subjects.CONSUMER_TOOL_RESULTS],
                TOOL_CALL_RESULT_ADAPTER,
                self._handle_tool_result,
                options=options,
                name="tool-results",
            ),
            Worker(
                nc,
                subs[subjects.CONSUMER_LLM_RESULTS],
                LLM_CALL_RESULT_ADAPTER,
                self._handle_llm_result,
                # A result carries a whole model reply: NATS' limit, not the event limit, bounds it.
                options=replace(options, max_payload_bytes=max(s.max_event_payload_bytes, nc.max_payload)),
                name="llm-results",
            ),
        ]
        responders: list[Responder[Any]] = [
            Responder(
                nc,
                subjects.RPC_CASES_START,
                START_CASE_ADAPTER,
                self._rpc_start,
                max_payload_bytes=s.max_event_payload_bytes,
            ),
            Responder(nc, subjects.RPC_CASES_GET, GET_CASE_ADAPTER, self._rpc_get),
            Responder(nc, subjects.RPC_CASES_LIST, LIST_CASES_ADAPTER, self._rpc_list),
        ]
        for responder in responders:
            await responder.start()
        # Readiness means requests are answered: make sure the server has our subscriptions
        # before the ready file appears (a request sent just after could find no responders).
        await nc.flush()
        for worker in workers:
            worker.start()
        self._workers = [
            *workers,
            *responders,
        ]
        self._sweeper = asyncio.create_task(self._sweep(), name="tianshu-sweeper")
        self._retention = asyncio.create_task(self._apply_retention(), name="tianshu-retention")
        if s.scheduler_ready_file:
            _write_ready(Path(s.scheduler_ready_file))
        log.info(
            "scheduler %s ready: %d workflows (%s)",
            s.scheduler_name,
            len(self.registry.codes),
            ", ".join(self.registry.codes),
        )

    async def serve(self) -> bool:
        """Serve until SIGTERM or SIGINT, then shut down within the configured time."""
        assert self.nc is not None
        shutdown = GracefulShutdown(
            self.nc, [*self._workers, _RunsWorker(self)], timeout_s=self.settings.scheduler_shutdown_timeout_s
        )
        shutdown.install()
        await shutdown.wait()
        clean = await shutdown.run()
        await self.close()
        return clean

    async def close(self) -> None:
        self._stopping.set()
        for task in (self._sweeper, self._retention):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self._chores:  # leases being handed back: let them reach the database first
            await asyncio.wait(set(self._chores), timeout=5.0)
        for client in (getattr(self, "llm", None), getattr(self, "tools", None)):
            if client is not None:
                await client.stop()
        if self.nc is not None and not self.nc.is_closed:
            with contextlib.suppress(Exception):
                await self.nc.close()
        if self.stores is not None:
            await self.stores.close()
        if self.settings.scheduler_ready_file:
            _clear_ready(Path(self.settings.scheduler_ready_file))

    # -- running cases ------------------------------------------------------------------------

    def schedule(self, case_key: str, lease: Lease | None = None) -> None:
        """Run the case here soon (under `lease`, if a wake took it for us); if it is running
        here already, run it once more after."""
        if self._stopping.is_set():
            if lease is not None:  # hand it back now rather than when its lease expires
                self._background(self._release(lease))
            return
        if lease is not None:
            self._taken[case_key] = lease
        if case_key in self._runs:
            self._again.add(case_key)
            return
        self._runs[case_key] = asyncio.create_task(self._run(case_key), name=f"tianshu-case-{case_key}")

    def _free_runs(self) -> int:
        return max(0, self.settings.scheduler_max_runs - len(self._runs))

    def _background(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._chores.add(task)
        task.add_done_callback(self._chores.discard)

    async def _release(self, lease: Lease) -> None:
        engine = self.engine
        assert engine is not None
        await engine.release(lease)

    def _on_woken(self, case_keys: Sequence[str]) -> None:
        for key in case_keys:
            self.schedule(key)

    async def _run(self, case_key: str) -> None:
        engine = self.engine
        assert engine is not None
        try:
            async with self._slots:
                while not self._stopping.is_set():
                    self._again.discard(case_key)
                    report = await engine.run_case(case_key, lease=self._taken.pop(case_key, None))
                    self.runs_done += report.status is not RunStatus.SKIPPED
                    if report.status is RunStatus.CONTINUE or case_key in self._again:
                        continue
                    break
        except Exception:
            # A store outage or a bug: the case keeps its state; the sweeper retries it later.
            log.exception("case %s: run failed", case_key)
        finally:
            self._runs.pop(case_key, None)
            left = self._taken.pop(case_key, None)
            if left is not None:  # cancelled (shutdown) or failed before it could run
                await asyncio.shield(self._release(left))

    async def _sweep(self) -> None:
        """Fire due timers, wake waiting cases whose condition is met (a bounded batch of the
        waits each time: `Engine.wake_met`), and adopt runnable cases nobody holds (their holder
        died)."""
        engine, stores = self.engine, self.stores
        assert engine is not None and stores is not None
        interval = self.settings.scheduler_sweep_interval_s
        seen: set[str] = set()
        while not self._stopping.is_set():
            try:
                await engine.fire_due_timers()
                await engine.wake_met()
                free = self.settings.scheduler_max_runs - len(self._runs)
                found = set(await stores.cases.runnable(limit=free)) if free > 0 else set()
                # Adopt a case only when it was runnable and unleased at the last sweep too: one
                # that was just started or woken is about to be run by whoever did that.
                for key in found & seen:
                    if key not in self._runs:
                        self.schedule(key)
                seen = found
            except Exception:
                log.exception("sweep failed; retrying in %.1fs", interval)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), interval)

    async def _apply_retention(self) -> None:
        """Delete expired events and, with a history retention, old finished cases; every
        replica does it (the deletes skip what another holds), first soon after start."""
        engine = self.engine
        assert engine is not None
        interval = self.settings.scheduler_retention_interval_s
        wait = min(interval, 5.0)
        while not self._stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), wait)
            if self._stopping.is_set():
                return
            wait = interval
            try:
                purged = await engine.purge_expired()
                if purged:
                    log.info("retention: %d expired events and cases deleted", purged)
            except Exception:
                log.exception("applying the retention failed; retrying in %.0fs", interval)

    async def _drain_runs(self, timeout_s: float) -> bool:
        """Shutdown: let in-flight runs finish within `timeout_s`, then cancel them (they release
        their leases, so another replica takes over at once)."""
        self._stopping.set()
        tasks = set(self._runs.values())
        if not tasks:
            return True
        _, late = await asyncio.wait(tasks, timeout=timeout_s)
        for task in late:
            task.cancel()
        if late:
            await asyncio.wait(late, timeout=2.0)
            log.warning("released %d cases still running at shutdown", len(late))
        return not late

    # -- handlers -----------------------------------------------------------------------------

    async def _start(self, msg: StartCase, msg_id: str | None) -> tuple[Case, bool]:
        engine = self.engine
        assert engine is not None
        if msg.workflow_code not in self.registry:
            raise RejectMessage(
                wire_error(
                    f"unknown workflow code {msg.workflow_code!r}; this scheduler runs: "
                    f"{', '.join(self.registry.codes) or 'nothing (set TIANSHU_WORKFLOWS)'}",
                    code="unknown_workflow",
                ),
                case_key=msg.case_key,
            )
        key = msg.case_key or (_key_from_msg_id(msg_id) if msg_id else None)
        try:
            existed = key is not None and await engine.stores.cases.get_by_key(key) is not None
            case = await engine.start_case(
                msg.workflow_code, msg.input, case_key=key, session_id=msg.session_id
            )
        except UnstorableValueError as exc:  # say, an integer over 64 bits in the input
            raise _unstorable(exc, case_key=key) from exc
        except TianshuError as exc:
            if exc.retryable:
                raise
            raise RejectMessage(exc, case_key=key) from exc
        except asyncpg.DataError as exc:  # see _unstorable
            raise _unstorable(exc, case_key=key) from exc
        self.schedule(case.case_key)
        return case, not existed

    async def _handle_start(self, msg: StartCase, delivery: Delivery) -> None:
        await self._start(msg, delivery.msg_id or _stream_msg_id(delivery))

    async def _rpc_start(self, msg: StartCase, request: Msg) -> BaseModel:
        headers = request.headers or {}
        case, created = await self._start(msg, headers.get(subjects.HEADER_MSG_ID))
        return StartCaseAccepted(
            case_key=case.case_key,
            session_id=case.session_id,
            workflow_code=case.workflow_code,
            created=created,
        )

    async def _rpc_get(self, msg: GetCase, _request: Msg) -> BaseModel:
        engine = self.engine
        assert engine is not None
        case = await engine.stores.cases.get_by_key(msg.case_key)
        if case is None:
            return CaseNotFound(case_key=msg.case_key)
        usage = await engine.stores.usage.summary(case_key=case.case_key)
        found = summary(case)
        if usage.calls:
            found = found.model_copy(update={"usage": usage})
        return CaseFound(case=found)

    async def _rpc_list(self, msg: ListCases, _request: Msg) -> BaseModel:
        engine = self.engine
        assert engine is not None
        flt = CaseFilter(
            session_id=msg.session_id,
            workflow_code=msg.workflow_code,
            execution_state=None if msg.execution_state is None else ExecutionState(msg.execution_state),
            lifecycle_state=None if msg.lifecycle_state is None else Lifecycle(msg.lifecycle_state),
            parent_key=msg.parent_key,
        )
        try:
            page = await engine.list_cases(flt, limit=msg.limit, cursor=msg.cursor)
        except InvalidCursorError as exc:
            raise RejectMessage(exc) from exc
        # No input or output: a page of 500 cases must fit in one message (GetCase has them).
        cases = [summary(case).model_copy(update={"input": None, "output": None}) for case in page.cases]
        return CasesPage(cases=cases, next_cursor=page.next_cursor)

    async def _handle_event(self, payload: JsonValue, delivery: Delivery) -> None:
        engine = self.engine
        assert engine is not None
        try:
            resource_type, resource_id = subjects.parse_event(delivery.subject)
        except ValueError as exc:
            raise RejectMessage(wire_error(str(exc), code="bad_subject")) from exc
        # Only the canonical subject of a resource: the base64 decoding of `~` tokens skips
        # characters outside its alphabet, so `order.~%%%` would otherwise be an event on the
        # resource '' (found by tests/test_scheduler_bad_input.py).
        if subjects.event(resource_type, resource_id) != delivery.subject:
            raise RejectMessage(
                wire_error(
                    f"{delivery.subject!r} is not the canonical subject of resource "
                    f"{resource_type}/{resource_id!r} ({subjects.event(resource_type, resource_id)!r})",
                    code="bad_subject",
                )
            )
        # Without a Nats-Msg-Id, the stream sequence still makes a redelivery a no-op.
        event_id = delivery.msg_id or _stream_msg_id(delivery)
        try:
            # The woken cases this replica has room for come back leased to it, journal and
            # event included: they run at once, without an acquire and a lookup each.
            published = await engine.publish_event(
                resource_type, resource_id, payload, event_id=event_id, take=self._free_runs()
            )
        except UnstorableValueError as exc:
            raise _unstorable(exc) from exc
        except TianshuError as exc:
            if exc.retryable:
                raise
            raise RejectMessage(exc) from exc
        except (asyncpg.DataError, TypeError) as exc:  # see _unstorable
            raise _unstorable(exc) from exc
        self._run_woken(published)

    def _run_woken(self, published: PublishResult) -> None:
        """Run what a publish woke: the cases it took for us first, then the others."""
        for lease in published.taken:
            self.schedule(lease.case_key, lease)
        taken = {lease.case_key for lease in published.taken}
        for key in published.woken:
            if key not in taken:
                self.schedule(key)

    async def _handle_tool_result(self, result: ToolCallResult, delivery: Delivery) -> None:
        """Record a tool result durably, keyed by its call id: an event on the call, which wakes a
        case parked on it (the slow path). A run awaiting it here gets it at once (the fast path).

        Refused at once: a result whose subject names another case than its body, and one for a
        case that does not exist (nothing could ever read it)."""
        _refuse_misaddressed(result.case_key, delivery.subject, subjects.tool_result)
        # A run awaiting the call here proves the case exists; otherwise ask the store.
        if not self.tools.resolve(result):
            await self._existing_case(result.case_key)
        await self._record_result(
            TOOL_RESULT_RESOURCE, result.call_id, result.case_key, result.model_dump(mode="json")
        )

    async def _handle_llm_result(self, result: LlmCallResult, delivery: Delivery) -> None:
        """Record a model call's answer durably, keyed by its call id, as a tool result is; and its
        usage row, once per call id (the row names the case's session and workflow)."""
        _refuse_misaddressed(result.case_key, delivery.subject, subjects.llm_result)
        self.llm.resolve(result)
        case = await self._existing_case(result.case_key)
        if result.response is not None:
            payload: JsonValue = result.response.model_dump(mode="json")
        else:
            assert result.error is not None
            code = result.error_class.value if result.error_class else result.error.code
            payload = {"error": result.error.model_copy(update={"code": code}).model_dump(mode="json")}
        row = UsageRow.from_result(result, session_id=case.session_id, workflow_code=case.workflow_code)
        await self._record_result(
            LLM_RESULT_RESOURCE,
            result.call_id,
            result.case_key,
            payload,
            usage=row,
        )

    async def _existing_case(self, case_key: str) -> Case:
        """The case a result is for; refused (`unknown_case`) when there is none."""
        engine = self.engine
        assert engine is not None
        case = await engine.stores.cases.get_by_key(case_key)
        if case is None:
            raise RejectMessage.because(
                DeadLetterReason.UNKNOWN_CASE,
                f"a result for case {case_key!r}, which does not exist",
                case_key=case_key,
            )
        return case

    async def _record_result(
        self,
        resource: str,
        call_id: str,
        case_key: str,
        payload: JsonValue,
        *,
        usage: UsageRow | None = None,
    ) -> None:
        """Store a call's result as the event that wakes its case, with its usage row in the same
        transaction; run what it woke.
        A store's refusal of the values refuses the message; an outage is transient."""
        engine = self.engine
        assert engine is not None
        try:
            published = await engine.publish_event(
                resource, call_id, payload, event_id=call_id, take=self._free_runs(), usage=usage
            )
        except UnstorableValueError as exc:
            raise _unstorable(exc, case_key=case_key) from exc
        except TianshuError as exc:
            if exc.retryable:
                raise
            raise RejectMessage(exc, case_key=case_key) from exc
        except (asyncpg.DataError, TypeError) as exc:  # see _unstorable
            raise _unstorable(exc, case_key=case_key) from exc
        self._run_woken(published)

    async def _handle_command(self, msg: CaseCommandMsg, delivery: Delivery) -> None:
        engine = self.engine
        assert engine is not None
        # A subject token that is no case key (`tianshu.v1.cases.a~b.command`) is refused at once;
        # the ValueError used to count as transient, retried until max deliveries (found by
        # tests/test_scheduler_bad_input.py).
        try:
            subject_key = subjects.case_key_of(delivery.subject)
        except ValueError as exc:
            raise RejectMessage(wire_error(str(exc), code="bad_subject")) from exc
        if subject_key != msg.case_key:
            raise RejectMessage.because(
                DeadLetterReason.KEY_MISMATCH,
                f"command for case {msg.case_key!r} sent on {delivery.subject!r}",
            )
        if isinstance(msg, CancelCase):
            found = await engine.cancel(msg.case_key)
        elif isinstance(msg, PauseCase):
            found = await engine.pause(msg.case_key)
        else:
            found = await engine.resume(msg.case_key)
        if not found:
            raise RejectMessage.because(
                DeadLetterReason.UNKNOWN_CASE, f"no case with key {msg.case_key!r}", case_key=msg.case_key
            )
        case = await engine.get_case(msg.case_key)
        await self._on_case_changed(case)
        if isinstance(msg, ResumeCase):
            self.schedule(msg.case_key)

    # -- notifications ------------------------------------------------------------------------

    async def _on_case_changed(self, case: Case) -> None:
        nc = self.nc
        if nc is None or nc.is_closed:
            return
        await publish_core(
            nc,
            subjects.case_updated(case.case_key),
            CaseUpdated(
                case_key=case.case_key,
                session_id=case.session_id,
                workflow_code=case.workflow_code,
                execution_state=case.execution_state.value,
                lifecycle_state=case.lifecycle_state.value,
                updated_at=case.updated_at,
                waiting_on=list(waiting_on()),
            ),
        )
        if case.is_terminal or case.lifecycle_state.value == "stop":
            await publish_core(nc, subjects.case_finished(case.case_key), finished(case))


class _RunsWorker:
    """Lets GracefulShutdown wait for the scheduler's in-flight runs like for any worker."""

    def __init__(self, scheduler: Scheduler) -> None:
        self._scheduler = scheduler

    def stop(self) -> None:
        self._scheduler._stopping.set()

    async def shutdown(self, timeout_s: float) -> bool:
        return await self._scheduler._drain_runs(timeout_s)


def _write_ready(path: Path) -> None:
    path.write_text(f"{os.getpid()}\n")


def _clear_ready(path: Path) -> None:
    path.unlink(missing_ok=True)


def _unstorable(exc: Exception, *, case_key: str | None = None) -> RejectMessage:
    """Refuse at once a valid message whose values cannot be stored; retrying cannot change that.

    Found by tests/test_scheduler_bad_input.py: Postgres refuses a NUL character in text and
    jsonb (`\\u0000`: asyncpg.DataError, SQLSTATE class 22), and the JSON encoder an integer over
    64 bits (TypeError). Both escaped the handlers as if transient: five deliveries with backoff,
    then a `max_deliveries` dead letter (and a request got a reply saying "retryable").
    """
    return RejectMessage(
        wire_error(f"this message's values cannot be stored: {exc}", code="unstorable_value"),
        reason=DeadLetterReason.UNSTORABLE,
        case_key=case_key,
    )


def _refuse_misaddressed(case_key: str, subject: str, subject_of: Callable[[str], str]) -> None:
    """Refuse (`key_mismatch`) a result whose subject is not the one its body's case key names
    (a key no subject can carry included)."""
    try:
        expected: str | None = subject_of(case_key)
    except ValueError:
        expected = None
    if subject != expected:
        raise RejectMessage.because(
            DeadLetterReason.KEY_MISMATCH,
            f"a result for case {case_key!r} sent on {subject!r}",
            case_key=case_key,
        )


def _key_from_msg_id(msg_id: str) -> str:
    """A case key derived from a message id: a repeated StartCase with that id starts nothing new."""
    return "m-" + hashlib.sha256(msg_id.encode()).hexdigest()[:32]


def _stream_msg_id(delivery: Delivery) -> str | None:
    if delivery.stream is None or delivery.stream_seq is None:
        return None
    return f"{delivery.stream}:{delivery.stream_seq}"


def _wire_error(case: Case) -> WireError | None:
    if case.error is None:
        return None
    return WireError(
        type=case.error.type, message=case.error.message, code=case.error.code, retryable=case.error.retryable
    )


def summary(case: Case) -> CaseSummary:
    """A case as it crosses the wire."""
    return CaseSummary(
        case_key=case.case_key,
        session_id=case.session_id,
        workflow_code=case.workflow_code,
        execution_state=case.execution_state.value,
        lifecycle_state=case.lifecycle_state.value,
        parent_key=case.parent_key,
        child_keys=list(case.child_keys),
        input=case.resource_data,
        finished_type=case.finished_type,
        finished_description=case.finished_description,
        output=case.output,
        error=_wire_error(case),
        created_at=case.created_at,
        updated_at=case.updated_at,
        trace_id=trace_id_of(case.trace_parent),
    )


def finished(case: Case) -> CaseFinished:
    """The `CaseFinished` notification of a case that ended, failed or was cancelled."""
    return CaseFinished(
        case_key=case.case_key,
        session_id=case.session_id,
        workflow_code=case.workflow_code,
        execution_state=case.execution_state.value,
        lifecycle_state=case.lifecycle_state.value,
        finished_type=case.finished_type,
        description=case.finished_description,
        output=case.output,
        error=_wire_error(case),
        finished_at=case.updated_at if case.updated_at.tzinfo else case.updated_at.replace(tzinfo=UTC),
    )
