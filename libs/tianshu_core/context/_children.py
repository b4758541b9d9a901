"""Child cases: spawning them once, and waiting (as a row) until they end."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .. import serde
from ..errors import UnknownWorkflowError
from ..models import CHILDREN_RESOURCE, TERMINAL_STATES, Case, ExecutionState, JournalKind, PollPredicate
from ..telemetry import current_traceparent
from ..tokens import child_case_key, require_plain
from ._core import ContextCore
from ._journal import CHILD, CHILDREN, decode
from ._signals import Suspend, guard


@dataclass(frozen=True, slots=True)
class SpawnConfig:
    """A child to spawn: its workflow, input, durable name and (optionally) its case key."""

    workflow_code: str
    input: Any = None
    name: str | None = None
    case_key: str | None = None


@dataclass(frozen=True, slots=True)
class ChildHandle:
    """A spawned child case."""

    case_key: str
    workflow_code: str
    name: str


@dataclass(frozen=True, slots=True)
class ChildOutcome:
    """How a child ended. A child that no longer exists counts as failed."""

    case_key: str
    state: ExecutionState
    finished_type: str | None
    description: str | None
    output: Any
    error: str | None

    @property
    def ok(self) -> bool:
        return self.state is ExecutionState.FINISHED


class Children(ContextCore):
    """`spawn_child`, `spawn_children`, `child_status` and `await_children`."""

    async def spawn_child(
        self, workflow_code: str, input: Any = None, *, name: str | None = None, case_key: str | None = None
    ) -> ChildHandle:
        """Create a child case in this session, once: a replay returns the same child."""
        name = self._name(name, "child")
        entry = self._claim(name, CHILD)
        if entry is not None:
            data = decode(entry)
            was = data["workflow_code"]
            if was != workflow_code:
                asked = f"{CHILD} of workflow {workflow_code!r}"
                raise self._diverge(name, f"{CHILD} of workflow {was!r}", asked)
            return ChildHandle(data["case_key"], data["workflow_code"], name)
        if workflow_code not in self._run.registry:
            raise UnknownWorkflowError(workflow_code, self._run.registry.codes)
        input = serde.loads(
            serde.encode_result(
                f"the input of child {name!r}", input, self._run.config.max_event_payload_bytes
            )
        )
        key = require_plain(case_key, "case key") if case_key else child_case_key(self.case.case_key, name)
        now = self._run.clock.now()
        child = Case(
            case_key=key,
            session_id=self.case.session_id,
            workflow_code=workflow_code,
            parent_key=self.case.case_key,
            resource_data=input,
            created_at=now,
            updated_at=now,
            trace_parent=current_traceparent(),  # the child's runs join this run's trace
        )
        # Insert first, then journal: a crash in between re-inserts the same key, a no-op.
        await self._write(lambda: self._run.stores.cases.insert(child, fence=self._fence))
        await self._append(
            JournalKind.CHILD, name, serde.dumps({"case_key": key, "workflow_code": workflow_code})
        )
        if key not in self.case.child_keys:
            self.case.child_keys.append(key)
        self.spawned.append(key)
        self.executed.append(name)
        return ChildHandle(key, workflow_code, name)

    async def spawn_children(self, configs: Sequence[SpawnConfig]) -> list[ChildHandle]:
        """Spawn several children, in order."""
        return [
            await self.spawn_child(c.workflow_code, c.input, name=c.name, case_key=c.case_key)
            for c in configs
        ]

    async def child_status(self, handle: ChildHandle) -> ChildOutcome:
        return _child_outcome(
            handle.case_key, await guard(self._run.stores.cases.get_by_key(handle.case_key))
        )

    async def await_children(
        self, handles: Sequence[ChildHandle], *, name: str | None = None
    ) -> list[ChildOutcome]:
        """Wait (as a row) until every child has finished or failed; their outcomes, in order.

        The children are read in one round trip. While some are open the case parks once: the
        last of them to end wakes it, in the transaction that stores its outcome."""
        name = self._name(name, "children")
        entry = self._claim(name, CHILDREN)
        if entry is not None:
            self.replayed.append(name)
            recorded = decode(entry)
            self._check_children(name, [o["case_key"] for o in recorded], [h.case_key for h in handles])
            return [ChildOutcome(**{**o, "state": ExecutionState(o["state"])}) for o in recorded]
        keys = [h.case_key for h in handles]
        found = {c.case_key: c for c in await guard(self._run.stores.cases.get_many(keys))}
        outcomes = [_child_outcome(key, found.get(key)) for key in keys]
        open_ = [o.case_key for o in outcomes if o.state not in TERMINAL_STATES]
        if not open_:
            await self._append(JournalKind.CHILD, name, serde.dumps([{**_outcome_dict(o)} for o in outcomes]))
            self.executed.append(name)
            return outcomes
        raise Suspend(
            [PollPredicate(resource_type=CHILDREN_RESOURCE, resource_id=self.case.case_key, step_name=name)],
            children=open_,
        )

    def _check_children(self, name: str, recorded: list[str], asked: list[str]) -> None:
        """A children wait replays only the wait on the children it recorded, in that order."""
        if len(recorded) != len(asked):
            raise self._diverge(
                name, f"{CHILDREN} on {len(recorded)} children", f"{CHILDREN} on {len(asked)} children"
            )
        for i, (was, now) in enumerate(zip(recorded, asked, strict=True), start=1):
            if was != now:
                raise self._diverge(
                    name, f"{CHILDREN} whose child {i} is {was!r}", f"{CHILDREN} whose child {i} is {now!r}"
                )


def _child_outcome(case_key: str, child: Case | None) -> ChildOutcome:
    if child is None:
        return ChildOutcome(case_key, ExecutionState.FAILED, None, None, None, "child case not found")
    return ChildOutcome(
        child.case_key,
        child.execution_state,
        child.finished_type,
        child.finished_description,
        child.output,
        child.error.message if child.error else None,
    )


def _outcome_dict(o: ChildOutcome) -> dict[str, Any]:
    return {
        "case_key": o.case_key,
        "state": o.state.value,
        "finished_type": o.finished_type,
        "description": o.description,
        "output": o.output,
        "error": o.error,
    }
