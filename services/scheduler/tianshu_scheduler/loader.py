"""Loading the user's workflows by import path."""

from __future__ import annotations

import importlib
from collections.abc import Sequence

from tianshu_core import TianshuError, WorkflowRegistry, default_registry


class WorkflowLoadError(TianshuError):
    """A module named in TIANSHU_WORKFLOWS could not be imported."""

    code = "workflow_load_error"


def load_workflows(modules: Sequence[str]) -> WorkflowRegistry:
    """Import each module; its `@workflow` functions land in the default registry, and a module-level
    `registry` (a WorkflowRegistry) is merged in too."""
    registry = WorkflowRegistry()
    for name in modules:
        try:
            module = importlib.import_module(name)
        except Exception as exc:
            raise WorkflowLoadError(f"cannot import workflow module {name!r}: {exc!r}") from exc
        own = getattr(module, "registry", None)
        if isinstance(own, WorkflowRegistry):
            registry.merge(own)
    registry.merge(default_registry)
    return registry
