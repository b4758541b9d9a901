"""What one run of a workflow returns: go on, wait, or done."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .models import PollPredicate


class WorkflowResult:
    """Base of the three outcomes of a run: `Continue`, `Waiting` and `Finished`."""

    __slots__ = ()


@dataclass(frozen=True, slots=True)
class Continue(WorkflowResult):
    """Run the case again at the next tick."""


@dataclass(frozen=True, slots=True)
class Waiting(WorkflowResult):
    """Park the case until an event arrives on one of the predicates' resources."""

    predicates: Sequence[PollPredicate] = field(default_factory=tuple)


@dataclass(frozen=True, slots=True)
class Finished(WorkflowResult):
    """The case is done, with a type (e.g. "approved"), a description and an output."""

    finished_type: str
    description: str = ""
    output: Any = None
