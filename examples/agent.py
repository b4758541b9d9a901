"""An agent: a durable tool loop whose model runs behind the LLM gateway.

Load it into a scheduler with `TIANSHU_WORKFLOWS=examples.agent` and the example tools into a tool
runner with `TIANSHU_TOOLS=examples.tools` (`tianshu dev --workflows examples.agent` does both).
The model is the engine's (`ctx.llm`: the gateway's client in service mode), asked for the route
in the case's input (`route`, default `default`). `lookup` is read-only, so the lookups of one
reply run side by side; `save_note` runs alone. Every reply and every tool result is a
checkpoint: a scheduler killed mid-loop asks nothing again that already answered.

    tianshu start agent --input '{"question": "What do GPUs and storage cost?"}' --wait
    tianshu cases follow KEY      # the model's answer as it streams
"""

from __future__ import annotations

from tianshu_core import LlmMessage, LlmRequest, ToolLoopConfig, WorkflowContext, WorkflowResult, workflow

from .tools import tools

SYSTEM = (
    "You price infrastructure for a reviewer. Look items up with `lookup` (one call per item, "
    "several at once if you like), keep a short note with `save_note`, then answer in one sentence."
)


@workflow("agent")
async def agent(ctx: WorkflowContext) -> WorkflowResult:
    """Answer the case's `question` with the example tools; the output is the model's last text."""
    data = ctx.case.resource_data or {}
    request = LlmRequest(
        model=str(data.get("route", "default")),
        system_prompt=SYSTEM,
        messages=[LlmMessage.user(str(data.get("question", "What does a GPU node cost?")))],
    )
    answer = await ctx.tool_step("agent", tools, request, ToolLoopConfig(max_rounds=6))
    return await ctx.finish("answered", output={"answer": answer})
