"""The surface of a run's context that the engine and its own extensions build on.

The tool loop records its model replies and tool results as steps, and waits for answers that
arrive as events with durable timers of its own; the engine stores the run's outcome after its
waits and deferred records. They need more of a run than a workflow does, but none of the
context's private state: this is all they see.
"""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING

from ..models import Event, JournalEntry, JournalKind
from ._signals import guard

if TYPE_CHECKING:
    from ..tools import ToolExecutor
    from ._context import WorkflowContext


class ContextInternals:
    """`ctx.internals`: names, timers, the clock, the events published for the case, the lease
    and the journal of one run. Not for workflows: what it returns is not replayed for them.

    Names given here are taken as they are recorded (`qualified` adds the current stage)."""

    __slots__ = ("_ctx",)

    def __init__(self, ctx: WorkflowContext) -> None:
        self._ctx = ctx

    def qualified(self, name: str) -> str:
        """`name` as the current stage records it (`<stage>/<name>` inside `run_stages`)."""
        return self._ctx._stage_prefix + name

    def clearings(self, name: str) -> int:
        """How many times the records under `name` (in the current stage) were cleared
        (`clear_steps`): records named after `name` keep a cleared run's apart with it."""
        return self._ctx._generation[self.qualified(name)]

    @property
    def tool_executor(self) -> ToolExecutor | None:
        """What runs the tools of a `ToolRegistry` given to `tool_step` (the tool runners, in
        service mode); None: they run in-process."""
        return self._ctx._run.tool_executor

    def now(self) -> datetime:
        """The engine's clock."""
        return self._ctx._run.clock.now()

    async def deadline(self, name: str, seconds: float) -> datetime:
        """When the durable timer `name` fires: `seconds` from now on its first call (recorded
        and scheduled, so that it wakes the case if it waits), read from the journal after."""
        return await self._ctx._deadline(name, seconds)

    def recorded_deadline(self, name: str) -> datetime | None:
        """When the timer `name` fires, if a run recorded it (None: never set)."""
        return self._ctx._recorded_deadline(name)

    async def published(self, resource_type: str, resource_id: str) -> Event | None:
        """The first event published on the resource since the case was created, read without
        consuming it: no cursor moves, nothing is journaled (an answer to a call of the run)."""
        ctx = self._ctx
        return await guard(
            ctx._run.stores.events.next_after(
                resource_type, resource_id, after_seq=0, not_before=ctx.case.created_at
            )
        )

    def cursor(self, resource_type: str, resource_id: str) -> int:
        """The sequence number of the last event the run consumed on the resource (0: none):
        a parked case waits for what comes after it."""
        return self._ctx._journal.cursors[(resource_type, resource_id)]

    async def hold(self) -> None:
        """Return while the run holds its lease (`LeaseKeeper.hold`); a store out of reach
        abandons the run (`StoreFailure`)."""
        await self._ctx._hold()

    async def append(self, kind: JournalKind, name: str, data: str) -> JournalEntry:
        """Append a record to the case's journal now (with the deferred ones), under the run's
        lease."""
        return await self._ctx._append(kind, name, data)
