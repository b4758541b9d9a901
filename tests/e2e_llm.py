"""A workflow for the model-call tests in service mode (tests/test_llm_service.py).

`llm_probe` runs the agent's tool loop (`examples.agent`: the example tools, the route from the
case's input `route`) and, when the loop raises `LlmError`, records what the workflow saw in a step
`llm_error` (`{"type", "error_class", "message"}`) before re-raising it, so the case fails with
that error and a test can read the error's class (a failed case keeps only the exception's type,
message and code).
"""

from __future__ import annotations

from examples.tools import tools
from tianshu_core import (
    LlmMessage,
    LlmRequest,
    ToolLoopConfig,
    WorkflowContext,
    WorkflowRegistry,
    WorkflowResult,
)
from tianshu_core.llm import LlmError

registry = WorkflowRegistry()


@registry.workflow("llm_probe")
async def llm_probe(ctx: WorkflowContext) -> WorkflowResult:
    data = ctx.case.resource_data or {}
    request = LlmRequest(
        model=str(data.get("route", "default")),
        messages=[LlmMessage.user(str(data.get("question", "What does a GPU node cost?")))],
    )
    try:
        answer = await ctx.tool_step("agent", tools, request, ToolLoopConfig(max_rounds=4))
    except LlmError as exc:
        seen = {"type": type(exc).__name__, "error_class": exc.error_class.value, "message": str(exc)}
        await ctx.step("llm_error", lambda: seen)
        raise
    return await ctx.finish("answered", output={"answer": answer})
