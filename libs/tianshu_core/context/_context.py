"""`WorkflowContext`: what a workflow uses to make its effects durable.

A run replays the workflow from the top. Every durable call (`step`, `wait_for_event`, `sleep`,
`spawn_child`, `await_children`, `set_state`) first looks for its record in the case's journal
and returns it; only what is new is executed and appended. Each kind of call lives in its own
module (`_core`: steps; `_waits`: events and time; `_children`; `_state`); this one joins them and
adds the outcome, the stage machine and the tool loop.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, overload

from .. import serde
from ..errors import TianshuError
from ..models import JournalEntry, PollPredicate
from ..results import Finished, Waiting, WorkflowResult
from ._children import Children
from ._internals import ContextInternals
from ._state import State
from ._waits import Waits

if TYPE_CHECKING:
    from tianshu_contracts.llm import LlmRequest

    from ..engine import CaseRun
    from ..llm import LlmProvider
    from ..tools import ToolLoopConfig, ToolRegistry, Toolset


@dataclass(frozen=True, slots=True)
class Next:
    """Stage outcome: go to `stage`, first clearing the checkpoints of `clear_stages`."""

    stage: str
    clear_stages: Sequence[str] = ()


StageOutcome = Next | Waiting | Finished
StageFn = Callable[["WorkflowContext"], Awaitable[StageOutcome]]


class WorkflowContext(Waits, Children, State):
    """The durable API a workflow runs against. One context per run of a case."""

    def __init__(self, run: CaseRun, entries: Sequence[JournalEntry]) -> None:
        super().__init__(run, entries)
        self.internals = ContextInternals(self)
        """What the engine and its own extensions (the tool loop) build on; not for workflows."""

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
        from ..tools import _loop  # imported here: the loop module builds on this one

        llm, tools, request, config = _tool_step_arguments(args, kwargs)
        llm = llm if llm is not None else self.llm
        config = config or _loop.ToolLoopConfig()
        toolset = _loop.as_toolset(tools, config, self.internals.tool_executor)
        loop = _loop.ToolLoop(self, name, llm, toolset, config)
        return await self.step(name, lambda: loop.run(request), returns=str)


def check_outcome(finished: Finished, limit: int) -> Any:
    """The JSON form of a case's output; UnstorableValueError when the outcome (its type, its
    description, its output) cannot be stored, StepResultTooLargeError over `limit` bytes."""
    serde.require_text("the finished type", finished.finished_type)
    serde.require_text("the finish description", finished.description)
    return serde.loads(serde.encode_result("the output of the case", finished.output, limit))


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
