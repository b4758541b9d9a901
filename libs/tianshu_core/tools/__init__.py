"""Tools a model can call, how calls are executed, and the durable tool-use loop.

- `_tool`: the `Tool` protocol, `BaseTool`, the `@tool` decorator, `ToolSafety`.
- `_registry`: `ToolRegistry`.
- `_executor`: the `ToolExecutor` seam, `LocalToolExecutor` (in-process), `Toolset`.
- `_loop`: `ToolLoopConfig` and the loop behind `ctx.tool_step`.
"""

from ._executor import (
    DEFAULT_MAX_RESULT_BYTES,
    DEFAULT_TIMEOUT_S,
    LocalToolExecutor,
    ToolCallPending,
    ToolExecutor,
    ToolInvocation,
    Toolset,
    error_result,
    nul_message,
    parse_arguments,
    truncate,
    truncated_parts,
)
from ._loop import TOOL_RESULT_RESOURCE, ToolLoopConfig, ToolLoopMaxRoundsError
from ._registry import ToolRegistry
from ._tool import (
    BaseTool,
    FunctionTool,
    Tool,
    ToolDefinitionError,
    ToolSafety,
    check_arguments,
    spec_of,
    tool,
)

__all__ = [
    "DEFAULT_MAX_RESULT_BYTES",
    "DEFAULT_TIMEOUT_S",
    "TOOL_RESULT_RESOURCE",
    "BaseTool",
    "FunctionTool",
    "LocalToolExecutor",
    "Tool",
    "ToolCallPending",
    "ToolDefinitionError",
    "ToolExecutor",
    "ToolInvocation",
    "ToolLoopConfig",
    "ToolLoopMaxRoundsError",
    "ToolRegistry",
    "ToolSafety",
    "Toolset",
    "check_arguments",
    "error_result",
    "nul_message",
    "parse_arguments",
    "spec_of",
    "tool",
    "truncate",
    "truncated_parts",
]
