"""`WorkflowContext`: what a workflow uses to make its effects durable, and what unwinds a run.

The context is split by concept: `_journal` (the replay view of a case's journal), `_core`
(naming, journal writes, steps), `_waits` (events and time), `_children`, `_state`, `_context`
(the outcome, the stage machine, the tool loop's entry) and `_internals` (`ctx.internals`, what
the engine and the tool loop build on).
"""

from ._children import ChildHandle, ChildOutcome, SpawnConfig
from ._context import Next, StageFn, StageOutcome, WorkflowContext, check_outcome
from ._internals import ContextInternals
from ._signals import StoreFailure, Suspend, WaitTimeoutError

__all__ = [
    "ChildHandle",
    "ChildOutcome",
    "ContextInternals",
    "Next",
    "SpawnConfig",
    "StageFn",
    "StageOutcome",
    "StoreFailure",
    "Suspend",
    "WaitTimeoutError",
    "WorkflowContext",
    "check_outcome",
]
