"""The heart of the engine: "run a case once".

run once = take the case's lease (fencing token), load its journal, replay the workflow,
execute what is new, persist the outcome and its waits, release. The tick (`Engine.tick`) and the
scheduler service are two drivers of this same operation.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .. import serde
from ..clock import Clock
from ..context import StoreFailure, Suspend, WorkflowContext, check_outcome
from ..errors import CaseInterruptedError, ErrorInfo, LeaseLostError, TianshuError
from ..logs import current_case
from ..models import Case, ExecutionState, JournalEntry, JournalKind, Lease
from ..results import Finished, Waiting, WorkflowResult
from ..stores.protocols import Stores
from ..telemetry import in_span, tracer
from ..transient import is_refused, is_transient
from ..workflow import WorkflowRegistry
from ._config import EngineConfig
from ._lease import LeaseKeeper
from ._types import CaseListener, CaseRun, RunReport, RunStatus, WakeListener, _waiting_on

if TYPE_CHECKING:
    from ..llm import LlmProvider
    from ..tools import ToolExecutor

log = logging.getLogger(__package__)  # one logger for the engine: `tianshu_core.engine`


class CaseRunner:
    """Runs a case once against a set of stores, and tells listeners what each run stored.
    `Engine` builds its calls (creating cases, events, the library-mode driver) on it."""

    def __init__(
        self,
        stores: Stores,
        registry: WorkflowRegistry,
        clock: Clock,
        config: EngineConfig,
        tool_executor: ToolExecutor | None,
        llm: LlmProvider | None,
    ) -> None:
        self.stores = stores
        # Runs the tools of `ctx.tool_step` given as a ToolRegistry; None: in-process.
        self.tool_executor = tool_executor
        # `ctx.llm`: the model `ctx.tool_step` asks when the workflow names none.
        self.llm = llm
        self.registry = registry
        self.clock = clock
        self.config = config
        self._listeners: list[CaseListener] = []
        self._wake_listeners: list[WakeListener] = []

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
            # For inspection: how many records this run replayed and how many steps it executed
            # (their own records name them). Counts, so that a case's journal grows by one small
            # row per run, not by every name it replays; replay and acquire skip these rows.
            await ctx.internals.append(
                JournalKind.REPLAY,
                "replay",
                serde.dumps({"replayed": len(ctx.replayed), "executed": len(ctx.executed)}),
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
