"""Waiting durably: for an event on a resource, and for time."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from .. import serde
from ..models import JournalKind, PollPredicate, Timer
from ..tokens import require_plain
from ._core import ContextCore
from ._journal import EVENT, TIMER, decode
from ._signals import Suspend, WaitTimeoutError, guard


class Waits(ContextCore):
    """`poll`, `wait_for_event` and `sleep`: a waiting case is parked as a row, not a coroutine."""

    async def poll(self, predicate: PollPredicate) -> Any | None:
        """The payload of the event this predicate matched, consuming the next one if none yet.

        For the explicit style: `if (p := await ctx.poll(pred)) is None: return Waiting([pred])`.
        """
        name = self._stage_prefix + predicate.step_name
        self._used.add(name)
        entry = self._recorded(name, EVENT)
        if entry is not None:
            data = decode(entry)
            self._check_resource(name, data, predicate.resource_type, predicate.resource_id)
            return data.get("payload")
        return await self._consume(name, predicate.resource_type, predicate.resource_id)

    async def _consume(self, name: str, resource_type: str, resource_id: str) -> Any | None:
        key = (resource_type, resource_id)
        cursor = self._journal.cursors[key]
        ahead = self._run.lookahead
        if ahead is not None and (ahead.resource_type, ahead.resource_id, ahead.after_seq) == (*key, cursor):
            event = ahead.event  # read with the lease, as the event woke this case
        else:
            event = await guard(
                self._run.stores.events.next_after(
                    resource_type, resource_id, after_seq=cursor, not_before=self.case.created_at
                )
            )
        if event is None:
            return None
        record = {
            "resource_type": resource_type,
            "resource_id": resource_id,
            "event_seq": event.seq,
            "event_id": event.event_id,
            "payload": event.payload,
        }
        self._defer(JournalKind.EVENT, name, serde.dumps(record))
        self._journal.cursors[key] = event.seq
        return event.payload

    async def wait_for_event(
        self,
        resource_type: str,
        resource_id: str,
        *,
        name: str | None = None,
        timeout: float | None = None,  # noqa: ASYNC109 - a durable timeout, not an asyncio one
        intent: str | None = None,
    ) -> Any:
        """Wait for the next event on (resource_type, resource_id) and return its payload.

        The case is parked as a row while it waits. An event published after the case was
        created but before this call is not lost. With `timeout` (seconds, engine clock),
        raises `WaitTimeoutError` when no event came in time.
        """
        require_plain(resource_type, "resource type")
        serde.require_text("the resource id", resource_id)
        name = self._name(name, f"event-{resource_type}-{resource_id}")
        entry = self._claim(name, EVENT)
        if entry is not None:
            self.replayed.append(name)
            data = decode(entry)
            self._check_resource(name, data, resource_type, resource_id)
            if data.get("timed_out"):
                raise WaitTimeoutError(f"no event on {resource_type}/{resource_id} within {timeout}s")
            return data.get("payload")
        payload = await self._consume(name, resource_type, resource_id)
        if payload is not None or (name, self._generation[name]) in self._journal.records:
            self.executed.append(name)
            return payload
        wake_at = None
        if timeout is not None:
            wake_at = await self._deadline(name + ":timeout", timeout)
            if self._run.clock.now() >= wake_at:
                record = {"resource_type": resource_type, "resource_id": resource_id, "timed_out": True}
                await self._append(JournalKind.EVENT, name, serde.dumps(record))
                raise WaitTimeoutError(f"no event on {resource_type}/{resource_id} within {timeout}s")
        raise Suspend(
            [
                PollPredicate(
                    resource_type=resource_type, resource_id=resource_id, step_name=name, intent_desc=intent
                )
            ],
            wake_at,
        )

    def _recorded_deadline(self, name: str) -> datetime | None:
        """When the timer `name` fires, if it is recorded (in this generation)."""
        entry = self._recorded(name, TIMER)
        return None if entry is None else datetime.fromisoformat(decode(entry)["fire_at"])

    async def _deadline(self, name: str, seconds: float) -> datetime:
        """When the timer `name` fires: `seconds` from now (engine clock) on its first call,
        recorded and scheduled; read from the journal on every later one."""
        recorded = self._recorded_deadline(name)
        if recorded is not None:
            return recorded
        fire_at = self._run.clock.now() + timedelta(seconds=seconds)
        await self._append(JournalKind.TIMER, name, serde.dumps({"fire_at": fire_at.isoformat()}))
        timer = Timer(self.case.case_key, name, fire_at)
        await self._write(lambda: self._run.stores.timers.schedule(timer, token=self._run.token))
        return fire_at

    async def sleep(self, seconds: float, *, name: str | None = None) -> None:
        """Sleep durably: the case is parked as a row and woken by a timer (engine clock)."""
        name = self._name(name, "sleep")
        self._claim(name, TIMER)
        wake_at = await self._deadline(name, seconds)
        if self._run.clock.now() < wake_at:
            raise Suspend([], wake_at)
