"""Defining workflows (a class or a decorated function) and finding them by code."""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar, cast

from .errors import DuplicateWorkflowError, UnknownWorkflowError
from .models import Case
from .results import WorkflowResult

if TYPE_CHECKING:
    from .context import WorkflowContext

WorkflowFn = Callable[["WorkflowContext"], Awaitable[WorkflowResult]]
T = TypeVar("T", bound=Any)


class BaseWorkflow(ABC):
    """A workflow written as a class; a fresh instance runs each time the case runs."""

    def __init__(self, case: Case) -> None:
        self.case = case

    @abstractmethod
    async def run(self, ctx: WorkflowContext) -> WorkflowResult:
        """Run (or replay) the case; completed steps return their stored results."""


WorkflowFactory = Callable[[Case], BaseWorkflow]


class _FunctionWorkflow(BaseWorkflow):
    def __init__(self, case: Case, fn: WorkflowFn) -> None:
        super().__init__(case)
        self._fn = fn

    async def run(self, ctx: WorkflowContext) -> WorkflowResult:
        return await self._fn(ctx)


class WorkflowRegistry:
    """Workflow code → factory of a workflow instance for one run."""

    def __init__(self) -> None:
        self._factories: dict[str, WorkflowFactory] = {}

    def register(self, code: str, factory: WorkflowFactory | type[BaseWorkflow] | WorkflowFn) -> None:
        """Register a BaseWorkflow subclass, a factory taking the case, or an async function."""
        if code in self._factories:
            raise DuplicateWorkflowError(f"workflow code {code!r} is registered twice")
        self._factories[code] = _as_factory(factory)

    def workflow(self, code: str) -> Callable[[T], T]:
        """Decorator: register an async function (or a BaseWorkflow subclass) under `code`."""

        def decorate(target: T) -> T:
            self.register(code, target)
            return target

        return decorate

    def create(self, case: Case) -> BaseWorkflow:
        """A fresh workflow instance for one run of `case`."""
        factory = self._factories.get(case.workflow_code)
        if factory is None:
            raise UnknownWorkflowError(case.workflow_code, list(self._factories))
        return factory(case)

    def __contains__(self, code: object) -> bool:
        return code in self._factories

    @property
    def codes(self) -> list[str]:
        return sorted(self._factories)

    def merge(self, other: WorkflowRegistry) -> None:
        """Add every workflow of `other` (codes must not clash)."""
        for code, factory in other._factories.items():
            if code in self._factories and self._factories[code] is not factory:
                raise DuplicateWorkflowError(f"workflow code {code!r} is registered twice")
            self._factories[code] = factory


def _as_factory(target: WorkflowFactory | type[BaseWorkflow] | WorkflowFn) -> WorkflowFactory:
    if isinstance(target, type) and issubclass(target, BaseWorkflow):
        return target
    if inspect.iscoroutinefunction(target):
        fn = cast(WorkflowFn, target)
        return lambda case: _FunctionWorkflow(case, fn)
    return cast(WorkflowFactory, target)


default_registry = WorkflowRegistry()


def workflow(code: str) -> Callable[[T], T]:
    """Register an async function `fn(ctx) -> WorkflowResult` in the default registry."""
    return default_registry.workflow(code)
