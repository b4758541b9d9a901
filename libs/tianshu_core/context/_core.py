"""The core of `WorkflowContext`: naming, replay lookups, journal writes, steps and clearing.

A run replays the workflow from the top. Every durable call first looks for its record in the
case's journal (`ContextCore._claim`) and returns it; only what is new is executed and appended.
The other durable calls (waits, children, state) build on this class in their own modules.
"""

from __future__ import annotations

import inspect
from collections import defaultdict
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar, overload

from pydantic import TypeAdapter, ValidationError

from .. import serde
from ..errors import CorruptCheckpointError, DuplicateStepError, LeaseLostError, NonDeterminismError
from ..models import Case, Fence, JournalEntry, JournalKind
from ..retry import RetryPolicy
from ..telemetry import in_span
from ._journal import EVENT, STEP, Journal, decode, recorded_as
from ._signals import guard

if TYPE_CHECKING:
    from ..engine import CaseRun

T = TypeVar("T")


class ContextCore:
    """What every durable call builds on: the run, the replay view of the journal, the names
    taken in this run and the journal writes. One per run of a case (`WorkflowContext`)."""

    def __init__(self, run: CaseRun, entries: Sequence[JournalEntry]) -> None:
        self._run = run
        self.case: Case = run.case
        self._journal = Journal(entries)
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
        if entry is not None and (recorded := recorded_as(entry)) != asked:
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
            raise self._diverge(name, f"{EVENT} on {was}", f"{EVENT} on {resource_type}/{resource_id}")

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
        await guard(self._run.keeper.hold())

    async def _write(self, write: Callable[[], Awaitable[T]]) -> T:
        """Make one of the run's writes (fenced by its lease token in the store): only while the
        run holds its lease, and a refusal stops the run at its next durable call too."""
        await self._hold()
        try:
            return await guard(write())
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
        entry = self._claim(name, STEP)
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
        data = decode(entry)
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
