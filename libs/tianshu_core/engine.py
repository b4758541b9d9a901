"""The heart of the engine, "run a case once", and the library-mode driver around it.

run once = take the case's lease (fencing token), load its journal, replay the workflow,
execute what is new, persist the outcome and its waits, release. The tick and the scheduler
service are two drivers of this same operation.
"""

from __future__ import annotations

import asyncio
import enum
import hashlib
import logging
import os
import socket
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Protocol

from . import serde
from .clock import Clock, SystemClock
from .context import StoreFailure, Suspend, WorkflowContext, check_outcome
from .errors import (
    CaseExistsError,
    CaseInterruptedError,
    CaseNotFoundError,
    ErrorInfo,
    LeaseLostError,
    PayloadTooLargeError,
    TianshuError,
    UnknownWorkflowError,
)
from .logs import current_case
from .models import (
    Case,
    CaseCursor,
    CaseFilter,
    CasePage,
    Event,
    EventLookahead,
    ExecutionState,
    JournalEntry,
    JournalKind,
    Lease,
    Lifecycle,
    Session,
)
from .results import Finished, Waiting, WorkflowResult
from .stores.protocols import Stores, UsageRow
from .telemetry import current_traceparent, in_span, tracer
from .tokens import new_case_key, require_plain
from .transient import is_refused, is_transient
from .workflow import WorkflowRegistry, default_registry

if TYPE_CHECKING:
    from .llm import LlmProvider
    from .tools import ToolExecutor

log = logging.getLogger(__name__)


def _default_owner() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


class ExecutionMode(enum.StrEnum):
    """How a tick runs its runnable cases."""

    SEQUENTIAL = "sequential"
    PARALLEL = "parallel"


@dataclass(slots=True)
class EngineConfig:
    """Engine settings; every one has a default that works locally."""

    max_step_result_bytes: int = 1024 * 1024
    max_event_payload_bytes: int = 1024 * 1024
    lease_ttl: float = 30.0
    event_retention: timedelta = field(default_factory=lambda: timedelta(days=7))
    history_retention: timedelta | None = None
    owner: str = field(default_factory=_default_owner)
    execution_mode: ExecutionMode = ExecutionMode.SEQUENTIAL
    max_parallel: int = 32
    tick_batch: int = 100
    probe_waiting: bool = False
    max_failed_runs: int = 5
    """A case whose runs fail this many times in a row (not for an outage, nor a refused write)
    fails with the last error."""
    failed_run_backoff: float = 1.0
    """Seconds before a case whose run failed runs again, doubling with each failure in a row."""
    failed_run_backoff_max: float = 60.0
    """The longest such wait, in seconds."""

    def __post_init__(self) -> None:
        if self.max_failed_runs < 1:
            raise ValueError("max_failed_runs must be at least 1")
        if self.failed_run_backoff < 0 or self.failed_run_backoff_max < 0:
            raise ValueError("failed-run backoffs must not be negative")

    def failed_run_delay(self, failures: int) -> float:
        """How long a case waits after its `failures`-th failed run in a row."""
        return min(self.failed_run_backoff * 2.0 ** (failures - 1), self.failed_run_backoff_max)


CaseListener = Callable[[Case], Awaitable[None]]
_waiting_on: ContextVar[tuple[str, ...]] = ContextVar("tianshu_waiting_on", default=())


def waiting_on() -> tuple[str, ...]:
    """Inside a case listener: the resource types the case now waits on (empty unless it waits)."""
    return _waiting_on.get()


WakeListener = Callable[[Sequence[str]], None]


class ResourceFetcher(Protocol):
    """The seed's pull model: asked for each waiting predicate; a value is an event on it."""

    async def fetch(self, resource_type: str, resource_id: str) -> Any | None: ...


class RunStatus(enum.StrEnum):
    """What one "run a case once" did."""

    FINISHED = "finished"
    WAITING = "waiting"
    CONTINUE = "continue"
    FAILED = "failed"
    SKIPPED = "skipped"
    LEASE_LOST = "lease_lost"
    ABANDONED = "abandoned"
    INTERRUPTED = "interrupted"


class TickOutcome(enum.StrEnum):
    """What one tick did: nothing to run, ran something, or stopped for shutdown."""

    IDLE = "idle"
    EXECUTED = "executed"
    SHUTDOWN_REQUESTED = "shutdown_requested"


@dataclass(slots=True)
class RunReport:
    """The result of running a case once."""

    case_key: str
    status: RunStatus
    case: Case | None
    executed: list[str] = field(default_factory=list)
    replayed: list[str] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class PublishResult:
    """A published event, whether it was new (not a repeat of its id), and the cases it woke.

    `taken`: those of the woken cases whose leases the publish took for this engine (see
    `Engine.publish_event`'s `take`); run each with `Engine.run_case(key, lease=...)`.
    """

    event: Event
    new: bool
    woken: list[str]
    taken: list[Lease] = field(default_factory=list)


@dataclass(slots=True)
class CaseRun:
    """Everything one run of a case needs; the context reads it."""

    case: Case
    token: int
    stores: Stores
    registry: WorkflowRegistry
    clock: Clock
    config: EngineConfig
    keeper: LeaseKeeper
    tool_executor: ToolExecutor | None = None
    lookahead: EventLookahead | None = None
    llm: LlmProvider | None = None


class Engine:
    """Runs cases against a set of stores: library mode's entry point and the services' heart."""

    def __init__(
        self,
        stores: Stores,
        registry: WorkflowRegistry | None = None,
        *,
        clock: Clock | None = None,
        config: EngineConfig | None = None,
        fetcher: ResourceFetcher | None = None,
        tool_executor: ToolExecutor | None = None,
        llm: LlmProvider | None = None,
    ) -> None:
        self.stores = stores
        # Runs the tools of `ctx.tool_step` given as a ToolRegistry; None: in-process.
        self.tool_executor = tool_executor
        # `ctx.llm`: the model `ctx.tool_step` asks when the workflow names none.
        self.llm = llm
        self.registry = registry if registry is not None else default_registry
        self.clock = clock or SystemClock()
        self.config = config or EngineConfig()
        self.fetcher = fetcher
        self._shutdown = asyncio.Event()
        self._listeners: list[CaseListener] = []
        self._wake_listeners: list[WakeListener] = []
        self._sweep_after: tuple[str, int] | None = None  # where `wake_met` goes on

    def add_wake_listener(self, listener: WakeListener) -> None:
        """Call `listener(keys)` when cases become runnable (woken by an event, timer or child)."""
        self._wake_listeners.append(listener)

    def add_listener(self, listener: CaseListener) -> None:
        """Call `listener(case)` after every run whose outcome was stored (services notify)."""
        self._listeners.append(listener)

    async def _notify(self, case: Case) -> None:
        for listener in self._listeners:
            try:
                await listener(case)
            except Exception:
                log.exception("case %s: a listener failed", case.case_key)

    # -- creating cases -----------------------------------------------------------------------

    def _new_case(self, workflow_code: str, input: Any, case_key: str | None, session_id: str | None) -> Case:
        key = require_plain(case_key, "case key") if case_key else new_case_key()
        now = self.clock.now()
        data = serde.loads(serde.encode_result("the case input", input, self.config.max_event_payload_bytes))
        return Case(
            case_key=key,
            session_id=session_id or key,
            workflow_code=workflow_code,
            resource_data=data,
            created_at=now,
            updated_at=now,
            trace_parent=current_traceparent(),
        )

    async def start_case(
        self,
        workflow_code: str,
        input: Any = None,
        *,
        case_key: str | None = None,
        session_id: str | None = None,
    ) -> Case:
        """Create a running case (idempotent on `case_key`); a tick or scheduler runs it."""
        case = self._new_case(workflow_code, input, case_key, session_id)
        if not await self.stores.cases.insert(case):
            return await self._existing(case)
        return case

    async def _existing(self, case: Case) -> Case:
        found = await self.stores.cases.get_by_key(case.case_key)
        if found is None:
            raise CaseNotFoundError(case.case_key)
        if found.workflow_code != case.workflow_code:
            raise CaseExistsError(
                f"case {case.case_key!r} exists with workflow {found.workflow_code!r}, "
                f"not {case.workflow_code!r}"
            )
        return found

    async def run_workflow(
        self,
        workflow_code: str,
        input: Any = None,
        *,
        case_key: str | None = None,
        session_id: str | None = None,
    ) -> Case:
        """Create a case and run it once, now, until it finishes, waits or fails."""
        if workflow_code not in self.registry:
            # Fail before storing anything: the caller sees the error, no case is left behind.
            raise UnknownWorkflowError(workflow_code, self.registry.codes)
        case = self._new_case(workflow_code, input, case_key, session_id)
        lease = await self.stores.leases.create_leased(case, self.config.owner, self.config.lease_ttl)
        if lease is None:
            await self._existing(case)
            report = await self.run_case(case.case_key)
        else:
            report = await self._run_leased(lease, fresh=True)
        found = report.case or await self.stores.cases.get_by_key(case.case_key)
        if found is None:
            raise CaseNotFoundError(case.case_key)
        return found

    async def open_session(self, session_id: str, metadata: dict[str, Any] | None = None) -> Session:
        """Create or update a session."""
        now = self.clock.now()
        existing = await self.stores.sessions.get(session_id)
        session = Session(
            session_id=session_id,
            metadata=metadata if metadata is not None else (existing.metadata if existing else {}),
            created_at=existing.created_at if existing else now,
            updated_at=now,
        )
        await self.stores.sessions.upsert(session)
        return session

    # -- the heart ----------------------------------------------------------------------------

    async def run_case(self, case_key: str, *, lease: Lease | None = None) -> RunReport:
        """Run a case once if its lease is free and it is active; with `lease` (one this engine
        holds on the case, from `publish_event`'s `taken`), run it under that lease."""
        if lease is None:
            lease = await self.stores.leases.acquire(case_key, self.config.owner, self.config.lease_ttl)
            if lease is None:
                return RunReport(case_key, RunStatus.SKIPPED, None)
        elif lease.case_key != case_key:
            raise ValueError(f"a lease on case {lease.case_key!r} cannot run case {case_key!r}")
        return await self._run_leased(lease, fresh=False)

    async def _run_leased(self, lease: Lease, *, fresh: bool) -> RunReport:
        case = lease.case
        stores = self.stores
        if not case.is_active:
            await stores.leases.release(lease)
            return RunReport(case.case_key, RunStatus.SKIPPED, case)
        return await in_span(
            "tianshu.run_case",
            {"tianshu.case_key": case.case_key, "tianshu.workflow": case.workflow_code},
            lambda: self._run_traced(lease, fresh),
            parent=case.trace_parent,
        )

    async def _run_traced(self, lease: Lease, fresh: bool) -> RunReport:
        token = current_case.set(lease.case.case_key)  # log records name the case
        try:
            return await self._run_logged(lease, fresh)
        finally:
            current_case.reset(token)

    async def _run_logged(self, lease: Lease, fresh: bool) -> RunReport:
        case, stores = lease.case, self.stores
        ctx: WorkflowContext | None = None
        keeper = LeaseKeeper(stores, lease, self.config.lease_ttl)
        keeper.start()
        try:
            entries: Sequence[JournalEntry]
            if fresh:
                entries = ()
            elif lease.journal is not None:
                entries = lease.journal
            else:
                entries = await stores.journal.load(case.case_key)
            run = CaseRun(
                case,
                lease.token,
                stores,
                self.registry,
                self.clock,
                self.config,
                keeper,
                self.tool_executor,
                lease.lookahead,
                self.llm,
            )
            ctx = WorkflowContext(run, entries)
            result: WorkflowResult | BaseException = await self._execute(ctx)
        except asyncio.CancelledError:
            # Shutting down mid-run: hand the case back at once instead of letting the lease expire.
            await asyncio.shield(self._release_quietly(lease))
            raise
        except CaseInterruptedError as exc:
            log.info("case %s: %s", case.case_key, exc)
            await self._release_quietly(lease)
            return _report(case.case_key, RunStatus.INTERRUPTED, None, ctx)
        except LeaseLostError as exc:
            log.warning("case %s: %s; abandoning this run", case.case_key, exc)
            return _report(case.case_key, RunStatus.LEASE_LOST, None, ctx)
        except (StoreFailure, Exception) as exc:
            keeper.stop()  # before any write that ends the run: a late renewal would hold the case
            return await self._run_failed(lease, ctx, exc)
        finally:
            keeper.stop()
        try:
            status = await self._persist(ctx, lease, result)
        except LeaseLostError as exc:
            log.warning("case %s: %s; outcome not stored", case.case_key, exc)
            return _report(case.case_key, RunStatus.LEASE_LOST, None, ctx)
        except (StoreFailure, Exception) as exc:
            return await self._run_failed(lease, ctx, exc)
        return _report(case.case_key, status, case, ctx)

    async def _run_failed(self, lease: Lease, ctx: WorkflowContext | None, exc: BaseException) -> RunReport:
        """A run that ended without storing its outcome, for a reason outside the workflow's own
        code: the store (or the bus) failed, or the engine did.

        An outage (`transient.is_transient`) delays the case and spends nothing: the lease is
        handed back and the case runs again once the store answers. A write the store refused for
        what it carries (`transient.is_refused`) fails the case at once with that error: the same
        write would be refused again. Any other failure backs the case off (its lease is held for
        `failed_run_backoff`, doubling with each failure in a row), and the `max_failed_runs`-th
        failure in a row fails it with the last error.
        """
        case = lease.case
        cause = exc.cause if isinstance(exc, StoreFailure) else exc
        failures = case.failures + 1
        if is_transient(cause):
            kind = "outage"
        elif is_refused(cause):
            kind = "refused"
        else:
            kind = "retry" if failures < self.config.max_failed_runs else "budget_spent"
        with tracer.start_as_current_span(
            "tianshu.run_failed",
            attributes={
                "tianshu.case_key": case.case_key,
                "tianshu.failure": kind,
                "tianshu.failures": failures,
            },
        ) as span:
            span.record_exception(cause)
            status = await self._settle_failed(lease, ctx, cause, kind, failures)
        return _report(case.case_key, status, case if status is RunStatus.FAILED else None, ctx)

    async def _settle_failed(
        self, lease: Lease, ctx: WorkflowContext | None, cause: BaseException, kind: str, failures: int
    ) -> RunStatus:
        """Act on a failed run as `_run_failed` judged it (`kind`)."""
        key = lease.case_key
        if kind == "outage":
            log.warning("case %s: %r; the case runs again once the store answers", key, cause)
            await self._release_quietly(lease)
            return RunStatus.ABANDONED
        if kind == "retry":
            delay = self.config.failed_run_delay(failures)
            log.warning(
                "case %s: run failed (%r), %d of %d failures in a row; it runs again in %.1fs",
                key,
                cause,
                failures,
                self.config.max_failed_runs,
                delay,
                exc_info=cause,
            )
            try:
                await self.stores.leases.back_off(lease, failures, delay)
            except Exception as unstored:
                log.warning("case %s: backoff not stored (%r); the lease expires by itself", key, unstored)
            return RunStatus.ABANDONED
        note = (
            "the store refused this case's write"
            if kind == "refused"
            else f"the case's run failed {failures} times in a row"
        )
        log.error("case %s: %s (%r); the case fails", key, note, cause, exc_info=cause)
        error = ErrorInfo.from_exception(cause)
        error = error.model_copy(update={"message": f"{note}: {error.message}"})
        try:
            return await self._store_outcome(lease, cause, ctx, error=error)
        except LeaseLostError as lost:
            log.warning("case %s: %s; failure not stored", key, lost)
            return RunStatus.LEASE_LOST
        except (StoreFailure, Exception) as failed:
            log.warning("case %s: failure not stored (%r); the case runs again later", key, failed)
            await self._release_quietly(lease)
            return RunStatus.ABANDONED

    async def release(self, lease: Lease) -> None:
        """Hand back a lease this engine holds without running its case (say, one a wake took
        for it that it will not run); a failure is logged, and the lease then expires by itself."""
        await self._release_quietly(lease)

    async def _release_quietly(self, lease: Lease) -> None:
        try:
            await self.stores.leases.release(lease)
        except Exception as exc:
            log.warning("case %s: lease not released (%r); it expires by itself", lease.case_key, exc)

    async def _execute(self, ctx: WorkflowContext) -> WorkflowResult | BaseException:
        result = await self._run_workflow(ctx)
        if ctx.diverged is not None:
            # The replay left the history: whatever the workflow made of the error, the case fails.
            if result is not ctx.diverged:
                log.error("case %s failed: %s", ctx.case.case_key, ctx.diverged)
            return ctx.diverged
        return result

    async def _run_workflow(self, ctx: WorkflowContext) -> WorkflowResult | BaseException:
        try:
            workflow = self.registry.create(ctx.case)
            result = await workflow.run(ctx)
        except Suspend as suspend:
            return _Suspended(suspend.predicates, suspend.wake_at, suspend.children)
        except LeaseLostError:
            raise
        except Exception as exc:
            log.exception("case %s failed", ctx.case.case_key)
            return exc
        if not isinstance(result, WorkflowResult):
            return TianshuError(
                f"workflow {ctx.case.workflow_code!r} returned {type(result).__name__}, "
                "not Finished, Waiting or Continue"
            )
        return result

    async def _persist(
        self, ctx: WorkflowContext, lease: Lease, result: WorkflowResult | BaseException
    ) -> RunStatus:
        await ctx.internals.hold()  # a run that lost its lease stores nothing
        await ctx.flush()
        if ctx.replayed:
            await ctx.internals.append(  # a record of what this run replayed, for inspection
                JournalKind.REPLAY,
                "replay",
                serde.dumps({"replayed": ctx.replayed, "executed": ctx.executed}),
            )
        return await self._store_outcome(lease, result, ctx)

    async def _store_outcome(
        self,
        lease: Lease,
        result: WorkflowResult | BaseException,
        ctx: WorkflowContext | None,
        *,
        error: ErrorInfo | None = None,
    ) -> RunStatus:
        """Store the case's outcome (and its waits), releasing the lease; then tell whoever
        waits on it. `error`: how to record a failure, when not as `result` itself."""
        case, stores = lease.case, self.stores
        case.updated_at = self.clock.now()
        output: Any = None
        if isinstance(result, Finished):
            try:
                output = check_outcome(result, self.config.max_step_result_bytes)
            except TianshuError as exc:
                result = exc
        status: RunStatus
        if isinstance(result, BaseException):
            case.execution_state = ExecutionState.FAILED
            case.error = error or ErrorInfo.from_exception(result)
            # An outcome whose save was refused must not be saved again with the failure.
            case.finished_type = case.finished_description = case.output = None
            status = RunStatus.FAILED
        elif isinstance(result, Finished):
            case.execution_state = ExecutionState.FINISHED
            case.finished_type = result.finished_type
            case.finished_description = result.description
            case.output = output
            status = RunStatus.FINISHED
        elif isinstance(result, Waiting):
            status = RunStatus.WAITING
        else:
            case.execution_state = ExecutionState.RUNNING
            status = RunStatus.CONTINUE
        woken: list[str] = []
        if isinstance(result, Waiting):
            assert ctx is not None  # only a workflow waits
            if not await self._park(ctx, lease, result):
                woken.append(case.case_key)  # met already, stored running: run it again
        else:
            # A child's last save also wakes its parent, in the same commit.
            woken = await stores.cases.save(case, lease.token, release=True)
        try:
            await self._after_stored(case, result, ctx, woken)
        except Exception:
            # The outcome is stored: this run is done whatever the rest does.
            log.exception("case %s: outcome stored, but telling its waiters failed", case.case_key)
        return status

    async def _after_stored(
        self,
        case: Case,
        result: WorkflowResult | BaseException,
        ctx: WorkflowContext | None,
        woken: Sequence[str],
    ) -> None:
        """Start new children, notify listeners, and run what the stored outcome woke."""
        if ctx is not None and ctx.spawned:
            for wake_listener in self._wake_listeners:
                wake_listener(ctx.spawned)  # new children are runnable: start them now
        if self._listeners:
            waits = [p.resource_type for p in result.predicates] if isinstance(result, Waiting) else []
            token = _waiting_on.set(tuple(dict.fromkeys(waits)))
            try:
                await self._notify(case)
            finally:
                _waiting_on.reset(token)
        if woken:
            for wake_listener in self._wake_listeners:
                wake_listener(woken)

    async def _park(self, ctx: WorkflowContext, lease: Lease, waiting: Waiting) -> bool:
        """Store the case waiting, with its waits and the recheck for what came meanwhile, in one
        commit (`CaseStore.park`); False when what it waits for is there and it must run again."""
        wake_at = waiting.wake_at if isinstance(waiting, _Suspended) else None
        children = waiting.children if isinstance(waiting, _Suspended) else ()
        after = {
            (p.resource_type, p.resource_id): ctx.internals.cursor(p.resource_type, p.resource_id)
            for p in waiting.predicates
        }
        case = ctx.case
        if not await self.stores.cases.park(case, lease.token, waiting.predicates, after, children):
            return False
        if (
            wake_at is not None
            and self.clock.now() >= wake_at
            and await self.stores.cases.mark_runnable([case.case_key])
        ):
            # Its timer fell due during the run: a sweep may have fired it while the case was
            # still running (a no-op), so it is woken here.
            case.execution_state = ExecutionState.RUNNING
            return False
        return True

    async def _wake(self, case_keys: Sequence[str]) -> list[str]:
        woken = await self.stores.cases.mark_runnable(case_keys)  # their waits dropped with it
        if woken:
            for listener in self._wake_listeners:
                listener(woken)
        return woken

    # -- events -------------------------------------------------------------------------------

    async def publish_event(
        self,
        resource_type: str,
        resource_id: str,
        payload: Any = None,
        *,
        event_id: str | None = None,
        take: int | None = None,
        usage: UsageRow | None = None,
    ) -> PublishResult:
        """Store an event on (resource_type, resource_id) and wake every case waiting on it.

        Repeating an `event_id` within the event retention stores and wakes nothing.
        `take`: lease up to this many of the woken cases to this engine in the same round trip,
        each with its journal and the event it consumes next (`PublishResult.taken`); the caller
        runs them with `run_case(key, lease=...)`, saving each an acquire and an event lookup.
        `usage`: when the event is a model call's answer, its usage row, committed with it (once
        per call id, however often the answer is published).
        With `take` given (0 included), the caller runs the other woken cases too (`woken`): wake
        listeners are not told of this publish, so that the caller can start the taken ones first.
        """
        require_plain(resource_type, "resource type")
        serde.require_text("the resource id", resource_id)
        size = len(serde.encode(f"the payload of an event on {resource_type}", payload))
        if size > self.config.max_event_payload_bytes:
            raise PayloadTooLargeError(
                f"event payload of {size} bytes is over the limit of {self.config.max_event_payload_bytes}"
            )
        now = self.clock.now()

        async def publish() -> PublishResult:
            event, new, woken, taken = await self.stores.events.publish_and_wake(
                resource_type,
                resource_id,
                payload,
                event_id=event_id,
                published_at=now,
                dedupe_since=now - self.config.event_retention,
                take=take or 0,
                owner=self.config.owner,
                ttl=self.config.lease_ttl,
                usage=usage,
            )
            if woken and take is None:
                for listener in self._wake_listeners:
                    listener(woken)
            return PublishResult(event, new, woken, taken)

        return await in_span(
            "tianshu.publish_event", {"tianshu.resource": f"{resource_type}/{resource_id}"}, publish
        )

    # -- library-mode driver ------------------------------------------------------------------

    def request_shutdown(self) -> None:
        """Ask `tick`/`run_until_idle` to stop; running cases finish their run first."""
        self._shutdown.set()

    async def fire_due_timers(self) -> list[str]:
        """Wake the cases whose timers are due (engine clock)."""
        woken: list[str] = []
        for timer in await self.stores.timers.due(self.clock.now(), limit=self.config.tick_batch):
            woken += await self._wake([timer.case_key])
            await self.stores.timers.delete(timer.case_key, timer.name)
        return woken

    async def wake_met(self) -> list[str]:
        """A safety net for wakes lost outside this engine's own paths (a replica of an older
        release, an event stored without its wake): wake the waiting cases whose condition is
        met among the next `tick_batch` waits, going on where the last call stopped, a full
        round every (waits / tick_batch) calls. Each call reads a bounded range of the waits'
        index, whatever the number of waiting cases."""
        with tracer.start_as_current_span("tianshu.wake_met") as span:
            woken, self._sweep_after = await self.stores.waits.wake_met(
                self._sweep_after, limit=self.config.tick_batch
            )
            span.set_attribute("tianshu.woken", len(woken))
        if woken:
            log.warning("woke %d waiting cases whose condition was met: %s", len(woken), ", ".join(woken))
            for listener in self._wake_listeners:
                listener(woken)
        return woken

    async def _evaluate_waiting(self, session_id: str | None) -> None:
        fetcher = self.fetcher
        if fetcher is None and not self.config.probe_waiting:
            return
        for key in await self.stores.cases.waiting(limit=self.config.tick_batch, session_id=session_id):
            if self.config.probe_waiting:
                await self._wake([key])
                continue
            assert fetcher is not None
            for p in await self.stores.waits.for_case(key):
                value = await fetcher.fetch(p.resource_type, p.resource_id)
                if value is not None:
                    digest = hashlib.sha256(serde.dumps(value).encode()).hexdigest()[:32]
                    await self.publish_event(
                        p.resource_type, p.resource_id, value, event_id=f"fetched-{digest}"
                    )

    async def tick(self, *, session_id: str | None = None) -> TickOutcome:
        """One pass: fire timers, ask the fetcher (or probe, if enabled), run runnable cases."""
        if self._shutdown.is_set():
            return TickOutcome.SHUTDOWN_REQUESTED
        with tracer.start_as_current_span("tianshu.tick"):
            await self.fire_due_timers()
            await self.wake_met()
            await self._evaluate_waiting(session_id)
            keys = await self.stores.cases.runnable(limit=self.config.tick_batch, session_id=session_id)
            if not keys:
                return TickOutcome.IDLE
            if self.config.execution_mode is ExecutionMode.PARALLEL:
                sem = asyncio.Semaphore(self.config.max_parallel)

                async def guarded(key: str) -> None:
                    async with sem:
                        await self._run_isolated(key)

                await asyncio.gather(*(guarded(k) for k in keys))
            else:
                for key in keys:
                    if self._shutdown.is_set():
                        break
                    await self._run_isolated(key)
        return TickOutcome.EXECUTED

    async def _run_isolated(self, key: str) -> None:
        try:
            await self.run_case(key)
        except Exception:
            # A store failure on one case must not stop the others; the lease expires and a
            # later tick retries it.
            log.exception("case %s: run failed before its outcome was stored", key)

    async def run_until_idle(self, *, session_id: str | None = None, max_ticks: int = 10_000) -> int:
        """Tick until nothing is runnable (or shutdown); returns the number of ticks."""
        for n in range(1, max_ticks + 1):
            if await self.tick(session_id=session_id) is not TickOutcome.EXECUTED:
                return n
        raise TianshuError(f"still busy after {max_ticks} ticks")

    # -- operating on cases -------------------------------------------------------------------

    async def get_case(self, case_key: str) -> Case:
        case = await self.stores.cases.get_by_key(case_key)
        if case is None:
            raise CaseNotFoundError(case_key)
        return case

    async def list_cases(
        self, flt: CaseFilter | None = None, *, limit: int = 50, cursor: str | None = None
    ) -> CasePage:
        """A page of the cases matching `flt`, oldest first; its `next_cursor` asks for the next.

        Keyset paging: a page starts right after the last case of the one before, so every page
        costs what the first costs however deep it is, and no case is listed twice or skipped
        when others are created or deleted in between. InvalidCursorError for a cursor that no
        listing returned."""
        if limit < 1:
            raise ValueError(f"limit must be at least 1, not {limit}")
        after = None if cursor is None else CaseCursor.decode(cursor)
        found = await self.stores.cases.list(flt, limit=limit + 1, after=after)
        cases = found[:limit]
        more = len(found) > limit
        return CasePage(cases=cases, next_cursor=CaseCursor.of(cases[-1]).encode() if more else None)

    async def history(self, case_key: str) -> list[JournalEntry]:
        """The case's journal: every durable effect, in order."""
        return await self.stores.journal.load(case_key)

    async def pause(self, case_key: str) -> bool:
        return await self.stores.cases.set_lifecycle(case_key, Lifecycle.PAUSE)

    async def resume(self, case_key: str) -> bool:
        return await self.stores.cases.set_lifecycle(case_key, Lifecycle.NORMAL)

    async def cancel(self, case_key: str) -> bool:
        return await self.stores.cases.set_lifecycle(case_key, Lifecycle.STOP)

    async def purge(self, case_key: str) -> None:
        """Remove a case and its whole history."""
        await self.stores.cases.delete(case_key)

    async def purge_expired(self, *, batch: int = 1000) -> int:
        """Apply the retention settings (engine clock): delete the events older than
        `event_retention`, and the finished or failed cases (with their history) whose last
        change is older than `history_retention`, if set. In batches of `batch` rows, so that no
        statement holds many locks for long; returns how many events and cases went."""
        now = self.clock.now()

        async def in_batches(purge: Callable[[], Awaitable[int]]) -> int:
            total = 0
            while (n := await purge()) > 0:
                total += n
                if n < batch:
                    break
            return total

        with tracer.start_as_current_span("tianshu.purge_expired"):
            cutoff = now - self.config.event_retention
            purged = await in_batches(lambda: self.stores.events.purge_before(cutoff, limit=batch))
            if self.config.history_retention is not None:
                done_before = now - self.config.history_retention
                purged += await in_batches(
                    lambda: self.stores.cases.purge_done_before(done_before, limit=batch)
                )
        return purged


def _report(case_key: str, status: RunStatus, case: Case | None, ctx: WorkflowContext | None) -> RunReport:
    """What a run did, with the steps it executed and replayed (none if it never started)."""
    if ctx is None:
        return RunReport(case_key, status, case)
    return RunReport(case_key, status, case, ctx.executed, ctx.replayed)


@dataclass(frozen=True, slots=True)
class _Suspended(Waiting):
    """A `Waiting` produced by an awaitable wait, which may also carry a timer and the awaited
    children still open."""

    wake_at: Any = None
    children: tuple[str, ...] = ()


class LeaseKeeper:
    """Keeps a run's lease: renews it every ttl/3 while the run lasts (which costs nothing for
    short runs), and stops the run at its next durable call once the lease is lost (`hold`).

    The stores refuse every write of a stale holder anyway; this saves the run from executing
    step bodies whose results could never be stored, after a stall (a long pause of the process,
    a SIGSTOP, a suspended VM) in which another process took the case.
    """

    def __init__(self, stores: Stores, lease: Lease, ttl: float) -> None:
        self._stores, self._lease, self._ttl = stores, lease, ttl
        self._task: asyncio.Task[None] | None = None
        # Until then (this process's clock) the lease is surely still ours, without asking: the
        # store's term runs `ttl` from a renewal it received after we sent it. A third of it is
        # left as a margin, for clock rates and for a taken lease that waited to be run.
        self._term = ttl * 2 / 3
        self._sure_until = time.monotonic() + self._term
        self.lost: LeaseLostError | None = None
        self._handle: asyncio.TimerHandle | None = None

    async def hold(self) -> None:
        """Return while the run holds its lease; raise LeaseLostError (the same one from then on)
        once it does not. Free within the lease's term; past it (the heartbeat could not run: the
        process stalled), the lease is renewed first, which finds out whether it is still ours."""
        if self.lost is not None:
            raise self.lost
        if time.monotonic() >= self._sure_until:
            await self._renew()

    def lose(self, exc: LeaseLostError) -> LeaseLostError:
        """The lease is lost (a store refused a write of the run, say): every later `hold`
        raises `exc`, or the loss found first. Returns the error that stands."""
        if self.lost is None:
            self.lost = exc
        return self.lost

    async def _renew(self) -> None:
        sent = time.monotonic()
        if await self._stores.leases.renew(self._lease, self._ttl):
            self._sure_until = max(self._sure_until, sent + self._term)
            return
        raise self.lose(LeaseLostError(self._lease.case_key, self._lease.token))

    def start(self) -> None:
        """Renew the lease every ttl/3 from now on, until `stop`."""
        self._handle = asyncio.get_running_loop().call_later(self._ttl / 3, self._begin)

    def _begin(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._beat())

    async def _beat(self) -> None:
        while True:
            try:
                await self._renew()
            except LeaseLostError:
                log.warning("case %s: lease lost while running", self._lease.case_key)
                return
            except Exception:
                log.exception("case %s: lease renewal failed", self._lease.case_key)
            await asyncio.sleep(self._ttl / 3)

    def stop(self) -> None:
        """Stop renewing (the run has ended); `hold` still answers."""
        if self._handle is not None:
            self._handle.cancel()
        if self._task is not None:
            self._task.cancel()
