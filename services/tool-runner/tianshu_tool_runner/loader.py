"""Loading the user's tools by import path."""

from __future__ import annotations

import importlib
from collections.abc import Iterable, Sequence
from types import ModuleType

from tianshu_core import TianshuError
from tianshu_core.tools import Tool, ToolDefinitionError, ToolRegistry


class ToolLoadError(TianshuError):
    """A module named in TIANSHU_TOOLS could not be imported, or its tools cannot be served."""

    code = "tool_load_error"


def tools_of(module: ModuleType) -> list[Tool]:
    """A module's tools: its `tools` (a ToolRegistry or a list of tools) when it has one, else every
    module-level tool (functions decorated with `@tool`, `BaseTool` instances)."""
    declared = getattr(module, "tools", None)
    if declared is not None:
        if not isinstance(declared, ToolRegistry | list | tuple):
            raise ToolLoadError(
                f"{module.__name__}.tools is a {type(declared).__name__}; make it a ToolRegistry "
                "(or a list of tools), or remove it to serve every module-level tool"
            )
        listed = list(declared)
        wrong = [repr(t) for t in listed if not _is_tool(t)]
        if wrong:
            raise ToolLoadError(f"{module.__name__}.tools holds what are not tools: {', '.join(wrong)}")
        return listed
    found: dict[int, Tool] = {}
    for value in vars(module).values():
        if _is_tool(value):
            found.setdefault(id(value), value)
    return list(found.values())


def _is_tool(value: object) -> bool:
    # A BaseTool subclass has every attribute as a class attribute: only instances are tools.
    return isinstance(value, Tool) and not isinstance(value, type)


def load_tools(modules: Sequence[str]) -> ToolRegistry:
    """Import each module and gather its tools into one registry; two tools may not share a name."""
    if not modules:
        raise ToolLoadError("no tool modules: set TIANSHU_TOOLS to the import paths of your tool modules")
    registry = ToolRegistry()
    origin: dict[str, str] = {}
    for name in modules:
        try:
            module = importlib.import_module(name)
        except Exception as exc:
            raise ToolLoadError(f"cannot import tool module {name!r}: {exc!r}") from exc
        tools = tools_of(module)
        if not tools:
            raise ToolLoadError(
                f"tool module {name!r} defines no tools (a module-level `tools` ToolRegistry, "
                "or functions decorated with @tool)"
            )
        _register(registry, tools, name, origin)
    return registry


def _register(registry: ToolRegistry, tools: Iterable[Tool], module: str, origin: dict[str, str]) -> None:
    for t in tools:
        if registry.get(t.name) is t:  # the same tool imported by two modules
            continue
        if t.name in registry:
            raise ToolLoadError(f"two tools are named {t.name!r}: one in {origin[t.name]}, one in {module}")
        try:
            registry.register(t)
        except ToolDefinitionError as exc:
            raise ToolLoadError(f"tool module {module!r}: {exc}") from exc
        origin[t.name] = module
