"""`Engine`: library mode's entry point and the services' heart.

It creates cases, publishes events, drives runs in library mode (`tick`, `run_until_idle`) and
operates on cases; running a case once is `CaseRunner`'s (`_run`).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from .. import serde
from ..clock import Clock, SystemClock
from ..errors import (
    CaseExistsError,
    CaseNotFoundError,
    PayloadTooLargeError,
    TianshuError,
    UnknownWorkflowError,
)
from ..models import Case, CaseCursor, CaseFilter, CasePage, JournalEntry, Lifecycle, Session
from ..stores.protocols import Stores, UsageRow
from ..telemetry import current_traceparent, in_span, tracer
from ..tokens import new_case_key, require_plain
from ..workflow import WorkflowRegistry, default_registry
from ._config import EngineConfig, ExecutionMode
from ._run import CaseRunner
from ._types import PublishResult, ResourceFetcher, TickOutcome

if TYPE_CHECKING:
    from ..llm import LlmProvider
    from ..tools import ToolExecutor

log = logging.getLogger(__package__)  # one logger for the engine: `tianshu_core.engine`


class Engine(CaseRunner):
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
        super().__init__(
            stores,
            registry if registry is not None else default_registry,
            clock or SystemClock(),
            config or EngineConfig(),
            tool_executor,
            llm,
        )
        self.fetcher = fetcher
        self._shutdown = asyncio.Event()
        self._sweep_after: tuple[str, int] | None = None  # where `wake_met` goes on

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
