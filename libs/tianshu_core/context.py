"""`WorkflowContext`: what a workflow uses to make its effects durable.

A run replays the workflow from the top. Every durable call (`step`, `wait_for_event`, `sleep`,
`spawn_child`, `await_children`, `set_state`) first looks for its record in the case's journal
and returns it; only what is new is executed and appended.
"""

from __future__ import annotations

import inspect
from collections import defaultdict
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, TypeVar, overload

from pydantic import TypeAdapter, ValidationError

from . import serde
from .errors import (
    CorruptCheckpointError,
    DuplicateStepError,
    LeaseLostError,
    NonDeterminismError,
    TianshuError,
    UnknownWorkflowError,
)
from .models import (
    CHILDREN_RESOURCE,
    TERMINAL_STATES,
    Case,
    ExecutionState,
    Fence,
    JournalEntry,
    JournalKind,
    PollPredicate,
    Timer,
)
from .results import Finished, Waiting, WorkflowResult
from .retry import RetryPolicy
from .telemetry import current_traceparent, in_span
from .tokens import child_case_key, require_plain

if TYPE_CHECKING:
    from tianshu_contracts.llm import LlmRequest

    from .engine import CaseRun
    from .llm import LlmProvider
    from .tools import ToolLoopConfig, ToolRegistry, Toolset

T = TypeVar("T")
StepFn = Callable[[], "T | Awaitable[T]"]


class WaitTimeoutError(TianshuError):
    """A `wait_for_event` with a timeout saw no event in time."""

    code = "wait_timeout"


class Suspend(BaseException):
    """Unwinds a workflow that must wait; the engine catches it and parks the case.

    A BaseException so that a workflow's `except Exception` cannot swallow it.
    """

    def __init__(
        self,
        predicates: Sequence[PollPredicate],
        wake_at: datetime | None = None,
        children: Sequence[str] = (),
    ) -> None:
        super().__init__("workflow suspended")
        self.predicates = list(predicates)
        self.wake_at = wake_at
        self.children = tuple(children)  # the awaited children not ended yet


class StoreFailure(BaseException):
    """A store (or bus) call made on the workflow's behalf failed: the run ends, and the engine
    judges the cause, not the workflow (an outage delays the case, a refused write fails it, any
    other failure backs it off; see `Engine._run_failed`).

    A BaseException so that a workflow's `except Exception` cannot mistake it for its own error.
    """

    def __init__(self, cause: BaseException) -> None:
        super().__init__(f"store failure: {cause!r}")
        self.cause = cause


async def _guard(awaitable: Awaitable[T]) -> T:
    try:
        return await awaitable
    except LeaseLostError:
        raise
    except TianshuError as exc:
        if exc.retryable:
            raise StoreFailure(exc) from exc
        raise
    except Exception as exc:
        raise StoreFailure(exc) from exc


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


@dataclass(frozen=True, slots=True)
class Next:
    """Stage outcome: go to `stage`, first clearing the checkpoints of `clear_stages`."""

    stage: str
    clear_stages: Sequence[str] = ()


StageOutcome = Next | Waiting | Finished
StageFn = Callable[["WorkflowContext"], Awaitable[StageOutcome]]


class _Journal:
    """The replay view of a case's journal: named records by generation, and case state."""

    def __init__(self, entries: Sequence[JournalEntry]) -> None:
        self.records: dict[tuple[str, int], JournalEntry] = {}
        self.state: dict[str, str] = {}
        self.cursors: dict[tuple[str, str], int] = defaultdict(int)
        self.clears: dict[str, int] = defaultdict(int)
        self.next_seq = 1
        for entry in entries:
            self.next_seq = max(self.next_seq, entry.seq + 1)
            kind = entry.kind
            if kind == JournalKind.STATE:
                self.state[entry.name] = entry.data
            elif kind == JournalKind.CLEAR:
                for name in _decode(entry)["names"]:
                    self.clears[name] += 1
            elif kind != JournalKind.REPLAY:
                self.records[(entry.name, self.clears[entry.name])] = entry
                if kind == JournalKind.EVENT:
                    data = _decode(entry)
                    if data.get("event_seq"):
                        key = (data["resource_type"], data["resource_id"])
                        self.cursors[key] = max(self.cursors[key], data["event_seq"])


# What a journal entry records, as a replay checks it against what the code asks for and as
# `NonDeterminismError` names it.
_STEP = "a step"
_EVENT = "an event wait"
_TIMER = "a timer"
_CHILD = "a child"
_CHILDREN = "a children wait"
_RECORDED_AS: dict[str, str] = {JournalKind.STEP: _STEP, JournalKind.EVENT: _EVENT, JournalKind.TIMER: _TIMER}


def _recorded_as(entry: JournalEntry) -> str:
    """What `entry` records. Spawning a child and awaiting children share the kind `child`: an
    await records the children's outcomes (a JSON array), a spawn the child (an object)."""
    if entry.kind == JournalKind.CHILD:
        return _CHILDREN if entry.data.lstrip().startswith("[") else _CHILD
    return _RECORDED_AS.get(entry.kind, f"a {entry.kind} entry")


def _decode(entry: JournalEntry) -> Any:
    try:
        return serde.loads(entry.data)
    except ValueError as exc:
        raise CorruptCheckpointError(entry.case_key, entry.name, f"not valid JSON ({exc})") from exc


class WorkflowContext:
    """The durable API a workflow runs against. One context per run of a case."""

    def __init__(self, run: CaseRun, entries: Sequence[JournalEntry]) -> None:
        self._run = run
        self.case: Case = run.case
        self._journal = _Journal(entries)
        self._generation: dict[str, int] = defaultdict(int)
        self._used: set[str] = set()
        self._auto: dict[str, int] = defaultdict(int)
        self._stage_prefix = ""
        self._deferred: list[JournalEntry] = []
        self._fence = Fence(run.case.case_key, run.token)
        self.spawned: list[str] = []
        self.executed: list[str] = []
        self.replayed: list[str] = []
        # Set when the replay left the history: the case then fails, even if the workflow
        # caught the error and went on.
        self.diverged: NonDeterminismError | None = None

    # -- naming -------------------------------------------------------------------------------

    def _name(self, name: str | None, base: str) -> str:
        if name is None:
            self._auto[base] += 1
            name = f"{base}#{self._auto[base]}"
        return self._stage_prefix + name

    def _claim(self, name: str, asked: str) -> JournalEntry | None:
        """Take `name` for this run: its record, if any, checked to be `asked` (see `_recorded`)."""
        if name in self._used:
            raise DuplicateStepError(self.case.case_key, name)
        serde.require_text(f"the name {name!r}", name)
        self._used.add(name)
        return self._recorded(name, asked)

    def _recorded(self, name: str, asked: str) -> JournalEntry | None:
        """The entry recorded under `name` (in this generation), if any. One that records
        something other than what the code asks for (`asked`: a step, an event wait, ...) is a
        `NonDeterminismError`, never decoded as what it is not."""
        entry = self._journal.records.get((name, self._generation[name]))
        if entry is not None and (recorded := _recorded_as(entry)) != asked:
            raise self._diverge(name, recorded, asked)
        return entry

    def _diverge(self, name: str, recorded: str, asked: str) -> NonDeterminismError:
        """The error of a replay that left its history, kept so that the engine fails the case."""
        error = NonDeterminismError(self.case.case_key, name, recorded, asked)
        if self.diverged is None:
            self.diverged = error
        return error

    def _check_resource(self, name: str, data: Any, resource_type: str, resource_id: str) -> None:
        """An event wait replays only the wait on the resource it recorded."""
        recorded = (data.get("resource_type"), data.get("resource_id"))
        if recorded != (resource_type, resource_id):
            was = "/".join(map(str, recorded))
            raise self._diverge(name, f"{_EVENT} on {was}", f"{_EVENT} on {resource_type}/{resource_id}")

    def _entry(self, kind: JournalKind, name: str, data: str) -> JournalEntry:
        journal = self._journal
        entry = JournalEntry(
            self.case.case_key,
            journal.next_seq,
            kind.value,
            name,
            data,
            self._run.token,
            self._run.clock.now(),
        )
        journal.next_seq += 1
        if kind != JournalKind.STATE and kind != JournalKind.CLEAR:
            journal.records[(name, self._generation[name])] = entry
        return entry

    async def _hold(self) -> None:
        """Go on only while the run holds its lease (`LeaseKeeper.hold`). A store out of reach
        while the lease is confirmed abandons the run, as any store failure does."""
        await _guard(self._run.keeper.hold())

    async def _write(self, write: Callable[[], Awaitable[T]]) -> T:
        """Make one of the run's writes (fenced by its lease token in the store): only while the
        run holds its lease, and a refusal stops the run at its next durable call too."""
        await self._hold()
        try:
            return await _guard(write())
        except LeaseLostError as exc:
            self._run.keeper.lose(exc)
            raise

    async def _append(self, kind: JournalKind, name: str, data: str) -> JournalEntry:
        entry = self._entry(kind, name, data)
        journal = self._run.stores.journal
        if self._deferred:
            batch, self._deferred = [*self._deferred, entry], []
            await self._write(lambda: journal.append_many(batch))
        else:
            await self._write(lambda: journal.append(entry))
        return entry

    def _defer(self, kind: JournalKind, name: str, data: str) -> None:
        """Record an entry that replay can re-derive (a consumed event: the same one is found
        again), so it may ride on the next write's commit instead of paying for its own."""
        self._deferred.append(self._entry(kind, name, data))

    async def flush(self) -> None:
        """Make deferred entries durable (the engine calls this before storing an outcome)."""
        if self._deferred:
            batch, self._deferred = self._deferred, []
            await self._write(lambda: self._run.stores.journal.append_many(batch))

    # -- steps --------------------------------------------------------------------------------

    @overload
    async def step(self, name: str, fn: Callable[[], Awaitable[T]], *, returns: type[T]) -> T: ...
    @overload
    async def step(self, name: str, fn: Callable[[], T], *, returns: type[T]) -> T: ...
    @overload
    async def step(self, name: str, fn: Callable[[], Any], *, returns: None = None) -> Any: ...

    async def step(self, name: str, fn: Callable[[], Any], *, returns: Any = None) -> Any:
        """Run `fn` once and checkpoint its JSON result; on replay return the stored result.

        `fn` may be sync or async. The result is returned as JSON data (what a replay returns too),
        or validated into `returns` (a pydantic model or any type) on both paths. A result that
        cannot be stored fails the step with `UnstorableValueError`, as an error of `fn` would.
        """
        return await self._step(name, lambda full: self._produce(full, fn), returns)

    async def _step(self, name: str, produce: Callable[[str], Awaitable[str]], returns: Any) -> Any:
        """A step whose JSON text `produce(full name)` makes; on replay the stored text."""
        name = self._stage_prefix + name
        entry = self._claim(name, _STEP)
        if entry is not None:
            self.replayed.append(name)
            return self._decode_step(entry, returns)

        async def execute() -> JournalEntry:
            await self._hold()  # no body runs whose result could not be stored
            return await self._append(JournalKind.STEP, name, await produce(name))

        entry = await in_span(
            "tianshu.step", {"tianshu.step": name, "tianshu.case_key": self.case.case_key}, execute
        )
        self.executed.append(name)
        return self._decode_step(entry, returns)

    async def _produce(self, name: str, fn: Callable[[], Any]) -> str:
        """Run a step's body and encode its result: a result that cannot be stored is an error of
        this attempt, so a retry policy around it retries it like any other."""
        value = fn()
        if inspect.isawaitable(value):
            value = await value
        return serde.encode_result(
            f"the result of step {name!r}", value, self._run.config.max_step_result_bytes
        )

    def _decode_step(self, entry: JournalEntry, returns: Any) -> Any:
        data = _decode(entry)
        if returns is None:
            return data
        try:
            return TypeAdapter(returns).validate_python(data)
        except ValidationError as exc:
            raise CorruptCheckpointError(
                entry.case_key, entry.name, f"does not validate as {returns!r}: {exc.errors()[0]['msg']}"
            ) from exc

    async def step_with_retry(
        self, name: str, policy: RetryPolicy, fn: Callable[[], Any], *, returns: Any = None
    ) -> Any:
        """Like `step`, retrying `fn` under `policy`; only a success is stored (a result that
        cannot be stored is a failed attempt)."""
        return await self._step(
            name, lambda full: policy.call(f"step {full!r}", lambda: self._produce(full, fn)), returns
        )

    def clear_steps(self, names: Sequence[str]) -> Awaitable[None]:
        """Forget the checkpoints of `names` so they run again (stage transitions use this)."""
        return self._clear([self._stage_prefix + n for n in names])

    async def _clear(self, names: Sequence[str]) -> None:
        fresh = False
        for name in names:
            self._generation[name] += 1
            self._used.discard(name)
            if self._generation[name] > self._journal.clears[name]:
                self._journal.clears[name] = self._generation[name]
                fresh = True
        if fresh:
            await self._append(JournalKind.CLEAR, "clear", serde.dumps({"names": list(names)}))

    # -- tools --------------------------------------------------------------------------------

    @property
    def llm(self) -> LlmProvider:
        """The model the engine was given (`Engine(llm=...)`; in the scheduler, the LLM gateway's
        client): what `tool_step` asks when the workflow names no provider."""
        llm = self._run.llm
        if llm is None:
            raise TianshuError(
                "no model: give the engine one (Engine(llm=...)) or pass a provider to ctx.tool_step"
            )
        return llm

    @overload
    async def tool_step(
        self,
        name: str,
        tools: ToolRegistry | Toolset,
        request: LlmRequest,
        config: ToolLoopConfig | None = None,
        *,
        llm: LlmProvider | None = None,
    ) -> str: ...

    @overload
    async def tool_step(
        self,
        name: str,
        llm: LlmProvider,
        tools: ToolRegistry | Toolset,
        request: LlmRequest,
        config: ToolLoopConfig | None = None,
    ) -> str: ...

    async def tool_step(self, name: str, *args: Any, **kwargs: Any) -> str:
        """Run the tool-use loop durably and return the model's final text.

        `ctx.tool_step(name, tools, request, config=None, *, llm=None)`; `llm` defaults to `ctx.llm`
        (the older form `ctx.tool_step(name, llm, tools, request, config=None)` works too).

        Ask the model (offering `tools`), run the tool calls of its reply (consecutive read-only calls
        in parallel, any other call alone, results in call order), feed the results back, and
        repeat until it answers without tools, at most `config.max_rounds` times
        (`ToolLoopMaxRoundsError` after that). Each reply and each tool result is recorded as it
        arrives (`<name>/r<k>/llm`, `<name>/r<k>/call/<call id>`), and the final text under `name`,
        so a replay asks neither the model nor a tool again for anything that answered. A
        `ToolRegistry` runs its tools in-process; a `Toolset` runs them with its own executor.
        """
        from .tools import _loop  # imported here: the loop module builds on this one

        llm, tools, request, config = _tool_step_arguments(args, kwargs)
        llm = llm if llm is not None else self.llm
        config = config or _loop.ToolLoopConfig()
        toolset = _loop.as_toolset(tools, config, self._run.tool_executor)
        loop = _loop.ToolLoop(self, name, llm, toolset, config)
        return await self.step(name, lambda: loop.run(request), returns=str)

    # -- state --------------------------------------------------------------------------------

    def get_state(self, name: str, default: Any = None) -> Any:
        """The case-scoped variable `name` (its latest value), or `default`."""
        text = self._journal.state.get(name)
        return default if text is None else serde.loads(text)

    def _state_text(self, what: str, name: str, value: Any) -> str:
        """The JSON text of a state variable's value; UnstorableValueError (naming the variable)
        for a name or value no store can keep."""
        serde.require_text(f"the name of {what} {name!r}", name)
        return serde.encode_result(f"{what} {name!r}", value, self._run.config.max_step_result_bytes)

    async def set_state(self, name: str, value: Any) -> None:
        """Set a case-scoped variable; a replay that writes the same value writes nothing."""
        text = self._state_text("state", name, value)
        if self._journal.state.get(name) == text:
            return
        await self._append(JournalKind.STATE, name, text)
        self._journal.state[name] = text
        data = serde.loads(text)
        await self._write(
            lambda: self._run.stores.state.save(self.case.case_key, name, data, token=self._run.token)
        )

    async def get_session_state(self, name: str, default: Any = None) -> Any:
        """A variable shared by the cases of this session (last write wins, no locking)."""
        entry = await _guard(self._run.stores.state.get_session(self.case.session_id, name))
        return default if entry is None else entry.data

    async def set_session_state(self, name: str, value: Any) -> None:
        """Set a variable shared by the cases of this session."""
        data = serde.loads(self._state_text("session state", name, value))
        await self._write(
            lambda: self._run.stores.state.save_session(self.case.session_id, name, data, fence=self._fence)
        )

    # -- events and time ----------------------------------------------------------------------

    async def poll(self, predicate: PollPredicate) -> Any | None:
        """The payload of the event this predicate matched, consuming the next one if none yet.

        For the explicit style: `if (p := await ctx.poll(pred)) is None: return Waiting([pred])`.
        """
        name = self._stage_prefix + predicate.step_name
        self._used.add(name)
        entry = self._recorded(name, _EVENT)
        if entry is not None:
            data = _decode(entry)
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
            event = await _guard(
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
        entry = self._claim(name, _EVENT)
        if entry is not None:
            self.replayed.append(name)
            data = _decode(entry)
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

    async def _deadline(self, name: str, seconds: float) -> datetime:
        entry = self._recorded(name, _TIMER)
        if entry is not None:
            return datetime.fromisoformat(_decode(entry)["fire_at"])
        fire_at = self._run.clock.now() + timedelta(seconds=seconds)
        await self._append(JournalKind.TIMER, name, serde.dumps({"fire_at": fire_at.isoformat()}))
        timer = Timer(self.case.case_key, name, fire_at)
        await self._write(lambda: self._run.stores.timers.schedule(timer, token=self._run.token))
        return fire_at

    async def sleep(self, seconds: float, *, name: str | None = None) -> None:
        """Sleep durably: the case is parked as a row and woken by a timer (engine clock)."""
        name = self._name(name, "sleep")
        self._claim(name, _TIMER)
        wake_at = await self._deadline(name, seconds)
        if self._run.clock.now() < wake_at:
            raise Suspend([], wake_at)

    # -- children -----------------------------------------------------------------------------

    async def spawn_child(
        self, workflow_code: str, input: Any = None, *, name: str | None = None, case_key: str | None = None
    ) -> ChildHandle:
        """Create a child case in this session, once: a replay returns the same child."""
        name = self._name(name, "child")
        entry = self._claim(name, _CHILD)
        if entry is not None:
            data = _decode(entry)
            was = data["workflow_code"]
            if was != workflow_code:
                asked = f"{_CHILD} of workflow {workflow_code!r}"
                raise self._diverge(name, f"{_CHILD} of workflow {was!r}", asked)
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
            handle.case_key, await _guard(self._run.stores.cases.get_by_key(handle.case_key))
        )

    async def await_children(
        self, handles: Sequence[ChildHandle], *, name: str | None = None
    ) -> list[ChildOutcome]:
        """Wait (as a row) until every child has finished or failed; their outcomes, in order.

        The children are read in one round trip. While some are open the case parks once: the
        last of them to end wakes it, in the transaction that stores its outcome."""
        name = self._name(name, "children")
        entry = self._claim(name, _CHILDREN)
        if entry is not None:
            self.replayed.append(name)
            recorded = _decode(entry)
            self._check_children(name, [o["case_key"] for o in recorded], [h.case_key for h in handles])
            return [ChildOutcome(**{**o, "state": ExecutionState(o["state"])}) for o in recorded]
        keys = [h.case_key for h in handles]
        found = {c.case_key: c for c in await _guard(self._run.stores.cases.get_many(keys))}
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
                name, f"{_CHILDREN} on {len(recorded)} children", f"{_CHILDREN} on {len(asked)} children"
            )
        for i, (was, now) in enumerate(zip(recorded, asked, strict=True), start=1):
            if was != now:
                raise self._diverge(
                    name, f"{_CHILDREN} whose child {i} is {was!r}", f"{_CHILDREN} whose child {i} is {now!r}"
                )

    # -- outcome ------------------------------------------------------------------------------

    async def finish(self, finished_type: str, description: str = "", output: Any = None) -> Finished:
        """The case's outcome; return it from the workflow. Persisted when the run ends.

        An outcome that cannot be stored raises `UnstorableValueError` here, in the workflow."""
        finished = Finished(finished_type, description, output)
        check_outcome(finished, self._run.config.max_step_result_bytes)
        return finished

    def waiting(self, *predicates: PollPredicate) -> Waiting:
        """`Waiting` over the given predicates (the seed's explicit style)."""
        return Waiting(tuple(predicates))

    async def run_stages(self, start: str, stages: Mapping[str, StageFn]) -> WorkflowResult:
        """The seed's stage machine: run `start`, follow `Next`, stop at `Waiting` or `Finished`.

        Names used inside a stage are recorded as `<stage>/<name>`, so `Next(clear_stages=[s])`
        makes stage `s` run its steps again under the same names.
        """
        stage = start
        while True:
            fn = stages.get(stage)
            if fn is None:
                raise TianshuError(f"unknown stage {stage!r}; stages: {', '.join(stages)}")
            self._stage_prefix = f"{stage}/"
            try:
                outcome = await fn(self)
            finally:
                self._stage_prefix = ""
            if not isinstance(outcome, Next):
                return outcome
            await self._clear([n for s in outcome.clear_stages for n in self._names_in_stage(s)])
            stage = outcome.stage

    def _names_in_stage(self, stage: str) -> list[str]:
        prefix = f"{stage}/"
        names = {n for n, _ in self._journal.records if n.startswith(prefix)} | {
            n for n in self._used if n.startswith(prefix)
        }
        return sorted(
            n for n in names if (n, self._generation[n]) in self._journal.records or n in self._used
        )


def check_outcome(finished: Finished, limit: int) -> Any:
    """The JSON form of a case's output; UnstorableValueError when the outcome (its type, its
    description, its output) cannot be stored, StepResultTooLargeError over `limit` bytes."""
    serde.require_text("the finished type", finished.finished_type)
    serde.require_text("the finish description", finished.description)
    return serde.loads(serde.encode_result("the output of the case", finished.output, limit))


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


def _tool_step_arguments(
    args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[LlmProvider | None, ToolRegistry | Toolset, LlmRequest, ToolLoopConfig | None]:
    """(llm, tools, request, config) of either form of `tool_step`'s arguments."""
    names = ("tools", "request", "config")
    llm = kwargs.pop("llm", None)
    # A model answers `complete`; a ToolRegistry or Toolset does not.
    if args and callable(getattr(args[0], "complete", None)):
        if llm is not None:
            raise TypeError("tool_step: the model given twice (positionally and as llm=)")
        llm, args = args[0], args[1:]
    values = dict(zip(names, args, strict=False))
    for key, value in kwargs.items():
        if key not in names or key in values:
            raise TypeError(f"tool_step: unexpected or repeated argument {key!r}")
        values[key] = value
    if "tools" not in values or "request" not in values:
        raise TypeError("tool_step(name, tools, request, config=None, *, llm=None): tools and request needed")
    return llm, values["tools"], values["request"], values.get("config")
