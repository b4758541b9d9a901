"""The service-mode driver of the engine's heart: cases run as messages and sweeps name them.

The heart is one operation, `Engine.run_case`. Library mode drives it with `Engine.tick`, which
walks the runnable cases. A service drives it by reacting: a start, a command or a result names a
case to run (`schedule`), an event runs the cases it woke (`publish_event`), and a sweep fires due
timers, wakes waiting cases whose condition is met and adopts the cases whose holder died. This
driver knows nothing of NATS: the scheduler service wires its messages to these calls.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Coroutine, Sequence
from typing import Any

from .engine import Engine, PublishResult, RunStatus
from .models import Lease
from .stores.protocols import UsageRow

log = logging.getLogger(__name__)


class ServiceDriver:
    """Runs an engine's cases in the background, at most `max_runs` at once, until shut down.

    driver = ServiceDriver(engine, max_runs=64)
    driver.start()                          # the sweep and the retention, in the background
    driver.schedule(case_key)               # a case to run now (again, if it is running here)
    await driver.publish_event("order", "42", payload)   # store an event, run what it woke
    await driver.shutdown(timeout_s=20)     # let runs finish, then cancel (they hand back)
    await driver.close()

    A case runs here at most once at a time: scheduled while it runs, it runs once more after.
    Every lease a wake took for this driver is either used by its case's next run here or handed
    back, so that no taken case waits for its lease to expire.
    """

    def __init__(
        self,
        engine: Engine,
        *,
        max_runs: int = 64,
        sweep_interval_s: float = 0.5,
        retention_interval_s: float = 300.0,
    ) -> None:
        if max_runs < 1:
            raise ValueError("max_runs must be at least 1")
        self.engine = engine
        self.max_runs = max_runs
        self.sweep_interval_s = sweep_interval_s
        self.retention_interval_s = retention_interval_s
        self.runs_done = 0
        """Runs of a case this driver made (skipped ones, whose lease another held, not counted)."""
        self._runs: dict[str, asyncio.Task[None]] = {}
        self._again: set[str] = set()
        # Leases a wake took for us (PublishResult.taken), waiting for their case's next run here.
        self._taken: dict[str, Lease] = {}
        self._slots = asyncio.Semaphore(max_runs)
        self._stopping = asyncio.Event()
        self._loops: list[asyncio.Task[None]] = []
        self._chores: set[asyncio.Task[None]] = set()
        engine.add_wake_listener(self._on_woken)

    # -- life cycle ---------------------------------------------------------------------------

    def start(self) -> None:
        """Start the sweep (every `sweep_interval_s`) and the retention (every
        `retention_interval_s`, first soon after start) in the background."""
        self._loops = [
            asyncio.create_task(self._sweep(), name="tianshu-sweeper"),
            asyncio.create_task(self._apply_retention(), name="tianshu-retention"),
        ]

    def stop(self) -> None:
        """Run nothing new: a case scheduled from now on is not run (a lease taken for it is
        handed back), and a running case is not run again after its current run."""
        self._stopping.set()

    async def shutdown(self, timeout_s: float) -> bool:
        """Stop, let in-flight runs finish within `timeout_s`, then cancel them (they release
        their leases, so another replica takes over at once); False when some were cancelled."""
        self.stop()
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

    async def close(self) -> None:
        """Stop, end the sweep and the retention, and let leases being handed back reach the
        store (for at most 5 seconds)."""
        self.stop()
        for task in self._loops:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._chores:
            await asyncio.wait(set(self._chores), timeout=5.0)

    async def wait_idle(self) -> None:
        """Return once no case runs here and no lease is being handed back."""
        while self._runs or self._chores:
            await asyncio.gather(*self._runs.values(), *self._chores, return_exceptions=True)

    @property
    def running(self) -> frozenset[str]:
        """The keys of the cases running here (or waiting for a free slot to run)."""
        return frozenset(self._runs)

    @property
    def free_runs(self) -> int:
        """How many more cases could start running here now."""
        return max(0, self.max_runs - len(self._runs))

    # -- running cases ------------------------------------------------------------------------

    def schedule(self, case_key: str, lease: Lease | None = None) -> None:
        """Run the case here soon (under `lease`, if a wake took it for us); if it is running
        here already, run it once more after."""
        if self._stopping.is_set():
            if lease is not None:  # hand it back now rather than when its lease expires
                self._background(self.engine.release(lease))
            return
        if lease is not None:
            self._taken[case_key] = lease
        if case_key in self._runs:
            self._again.add(case_key)
            return
        self._runs[case_key] = asyncio.create_task(self._run(case_key), name=f"tianshu-case-{case_key}")

    async def publish_event(
        self,
        resource_type: str,
        resource_id: str,
        payload: Any = None,
        *,
        event_id: str | None = None,
        usage: UsageRow | None = None,
    ) -> PublishResult:
        """`Engine.publish_event`, and run what it woke. The woken cases this driver has room for
        come back leased to it, journal and event included: they run at once, without an acquire
        and a lookup each, and the others after them."""
        published = await self.engine.publish_event(
            resource_type, resource_id, payload, event_id=event_id, take=self.free_runs, usage=usage
        )
        for lease in published.taken:
            self.schedule(lease.case_key, lease)
        taken = {lease.case_key for lease in published.taken}
        for key in published.woken:
            if key not in taken:
                self.schedule(key)
        return published

    def _background(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._chores.add(task)
        task.add_done_callback(self._chores.discard)

    def _on_woken(self, case_keys: Sequence[str]) -> None:
        for key in case_keys:
            self.schedule(key)

    async def _run(self, case_key: str) -> None:
        engine = self.engine
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
            # A store outage or a bug: the case keeps its state; the sweep retries it later.
            log.exception("case %s: run failed", case_key)
        finally:
            self._runs.pop(case_key, None)
            left = self._taken.pop(case_key, None)
            if left is not None:  # cancelled (shutdown) or failed before it could run
                await asyncio.shield(engine.release(left))

    # -- background loops ---------------------------------------------------------------------

    async def _sweep(self) -> None:
        """Fire due timers, wake waiting cases whose condition is met (a bounded batch of the
        waits each time: `Engine.wake_met`), and adopt runnable cases nobody holds (their holder
        died)."""
        engine, interval = self.engine, self.sweep_interval_s
        seen: set[str] = set()
        while not self._stopping.is_set():
            try:
                await engine.fire_due_timers()
                await engine.wake_met()
                free = self.free_runs
                found = set(await engine.stores.cases.runnable(limit=free)) if free > 0 else set()
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
        interval = self.retention_interval_s
        wait = min(interval, 5.0)
        while not self._stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), wait)
            if self._stopping.is_set():
                return
            wait = interval
            try:
                purged = await self.engine.purge_expired()
                if purged:
                    log.info("retention: %d expired events and cases deleted", purged)
            except Exception:
                log.exception("applying the retention failed; retrying in %.0fs", interval)
