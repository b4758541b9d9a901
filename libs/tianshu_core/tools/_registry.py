"""`ToolRegistry`: the tools a workflow offers a model, by name."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from tianshu_contracts.llm import ToolSpec

from ._executor import DEFAULT_MAX_RESULT_BYTES, DEFAULT_TIMEOUT_S, LocalToolExecutor, ToolExecutor, Toolset
from ._tool import Tool, ToolDefinitionError, ToolSafety, check_definition, spec_of


class ToolRegistry:
    """Tools by name. Pass it to `ctx.tool_step` to run them in-process, or make a `toolset()`."""

    def __init__(self, tools: Iterable[Tool] = ()) -> None:
        self._tools: dict[str, Tool] = {}
        for t in tools:
            self.register(t)

    def register(self, t: Tool) -> Tool:
        """Add a tool; ToolDefinitionError for a bad definition or a name already taken."""
        if not isinstance(t, Tool):
            raise ToolDefinitionError(
                f"{t!r} is not a tool (needs name, description, safety, parameters_schema, execute); "
                "decorate a function with @tool or subclass BaseTool"
            )
        try:
            check_definition(t)
        except AttributeError as exc:
            raise ToolDefinitionError(f"{t!r} is not a complete tool: {exc}") from exc
        if t.name in self._tools:
            raise ToolDefinitionError(f"a tool named {t.name!r} is registered already")
        self._tools[t.name] = t
        return t

    def get(self, name: str) -> Tool | None:
        """The tool called `name`, or None."""
        return self._tools.get(name)

    def __contains__(self, name: object) -> bool:
        return name in self._tools

    def __iter__(self) -> Iterator[Tool]:
        return iter(self._tools.values())

    def __len__(self) -> int:
        return len(self._tools)

    @property
    def names(self) -> list[str]:
        """The registered names, in registration order."""
        return list(self._tools)

    def specs(self) -> list[ToolSpec]:
        """What the model is shown: each tool's name, description and parameters schema."""
        return [spec_of(t) for t in self._tools.values()]

    def safety(self, name: str) -> ToolSafety | None:
        """A tool's safety, or None for an unknown name."""
        t = self._tools.get(name)
        return None if t is None else t.safety

    def executor(
        self,
        *,
        default_timeout_s: float | None = DEFAULT_TIMEOUT_S,
        max_result_bytes: int = DEFAULT_MAX_RESULT_BYTES,
    ) -> LocalToolExecutor:
        """An executor that runs these tools in this process."""
        return LocalToolExecutor(self, default_timeout_s=default_timeout_s, max_result_bytes=max_result_bytes)

    def toolset(
        self,
        executor: ToolExecutor | None = None,
        *,
        default_timeout_s: float | None = DEFAULT_TIMEOUT_S,
        max_result_bytes: int = DEFAULT_MAX_RESULT_BYTES,
    ) -> Toolset:
        """These tools for `ctx.tool_step`, run by `executor` (default: in-process)."""
        if executor is None:
            executor = self.executor(default_timeout_s=default_timeout_s, max_result_bytes=max_result_bytes)
        return Toolset.of(executor, self._tools.values())
