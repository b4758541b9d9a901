"""The workflows and the tool of the chaos harness (tests/chaos.py): schedulers load the workflows
(`TIANSHU_WORKFLOWS=tests.chaos_workflows`), tool runners the tool (`TIANSHU_TOOLS=tests.chaos_workflows`:
the module-level `tools` registry).

Every step body, and every run of the tool, counts its execution in the table of `tests._executions`
in the database of ``TIANSHU_DATABASE_URL``, then works `work_s` seconds, so that a kill can land in
the middle of it. `chaos` takes its shape from its input (drawn by the harness from its seed):

    {"steps": 3, "work_s": 0.1, "event": true, "sleep_s": 0.5, "rounds": [2, 1], "children": 2}

that is: `steps` steps; then, each when asked for, a wait for one event on (`EVENT_TYPE`, the case
key) and a step; a durable sleep and a step; a tool loop whose scripted model asks for `rounds[k-1]`
calls of `counted` in round k, and a step; `children` children (`chaos_child`: one step) awaited, and
a step. Its output is the event's payload, the model's last answer (`ANSWERED` when every call
answered) and the children's outputs.
"""

from __future__ import annotations

import asyncio
import json
import os
from typing import Any

from tests import _executions
from tianshu_core import (
    LlmMessage,
    LlmRequest,
    LlmResponse,
    ScriptedLlm,
    SpawnConfig,
    ToolCall,
    ToolLoopConfig,
    ToolRegistry,
    ToolSafety,
    WorkflowContext,
    WorkflowRegistry,
    WorkflowResult,
    tool,
)

EVENT_TYPE = "chaos"
ANSWERED = "every call answered"
TOOL_LOOP = "agent"
REQUEST = LlmRequest(model="scripted", messages=[LlmMessage.user("Call the tools you are given.")])

registry = WorkflowRegistry()


def _dsn() -> str:
    return os.environ["TIANSHU_DATABASE_URL"]


async def _work(case_key: str, step: str, work_s: float) -> str:
    await _executions.record(_dsn(), case_key, step)
    await asyncio.sleep(work_s)
    return f"ran {step}"


@tool(safety=ToolSafety.READ_ONLY)
async def counted(case_key: str, record: str, work_s: float) -> str:
    """Count this run as one of the step `record` of the case (the loop's record of the call's
    result), then work a while."""
    return await _work(case_key, record, work_s)


tools = ToolRegistry([counted])
"""What the runners serve, and what the workflow offers the model."""


async def _step(ctx: WorkflowContext, name: str, work_s: float) -> Any:
    return await ctx.step(name, lambda: _work(ctx.case.case_key, name, work_s))


def _model(case_key: str, rounds: list[int], work_s: float) -> ScriptedLlm:
    """In round k, `rounds[k-1]` calls of `counted`; then `ANSWERED`, or what went wrong."""

    async def reply(request: LlmRequest) -> LlmResponse:
        k = 1 + sum(m.role == "assistant" for m in request.messages)
        if k <= len(rounds):
            calls = []
            for i in range(1, rounds[k - 1] + 1):
                call_id = f"r{k}c{i}"
                # The loop records the call's result as the step <loop>/r<k>/call/<call id>.
                args = {"case_key": case_key, "record": f"{TOOL_LOOP}/r{k}/call/{call_id}", "work_s": work_s}
                calls.append(ToolCall(id=call_id, name=counted.name, arguments=json.dumps(args)))
            return LlmResponse.calls(*calls)
        results = [m.content for m in request.messages if m.role == "tool"]
        failed = [r for r in results if not r.startswith("ran ")]
        return LlmResponse.text(f"{len(failed)} calls failed: {failed[0]}" if failed else ANSWERED)

    return ScriptedLlm(reply)


@registry.workflow("chaos")
async def chaos(ctx: WorkflowContext) -> WorkflowResult:
    """Steps, then the event, the sleep, the tool loop and the children its input asks for."""
    shape: dict[str, Any] = ctx.case.resource_data or {}
    key, work_s = ctx.case.case_key, float(shape.get("work_s", 0.0))
    for i in range(int(shape.get("steps", 1))):
        await _step(ctx, f"s{i}", work_s)
    output: dict[str, Any] = {}
    if shape.get("event"):
        output["event"] = await ctx.wait_for_event(EVENT_TYPE, key)
        await _step(ctx, "after-event", work_s)
    if shape.get("sleep_s"):
        await ctx.sleep(float(shape["sleep_s"]))
        await _step(ctx, "after-sleep", work_s)
    if shape.get("rounds"):
        model = _model(key, list(shape["rounds"]), work_s)
        output["answer"] = await ctx.tool_step(TOOL_LOOP, model, tools, REQUEST, ToolLoopConfig())
        await _step(ctx, "after-tools", work_s)
    if shape.get("children"):
        configs = [SpawnConfig("chaos_child", {"n": n, "work_s": work_s}) for n in range(shape["children"])]
        outcomes = await ctx.await_children(await ctx.spawn_children(configs))
        output["children"] = [o.output for o in outcomes]
        await _step(ctx, "after-children", work_s)
    return await ctx.finish("done", output=output)


@registry.workflow("chaos_child")
async def chaos_child(ctx: WorkflowContext) -> WorkflowResult:
    """One step; the output is the child's number."""
    await _step(ctx, "work", float(ctx.case.resource_data["work_s"]))
    return await ctx.finish("done", output={"n": ctx.case.resource_data["n"]})


def expected_output(key: str, shape: dict[str, Any]) -> dict[str, Any]:
    """What `chaos` finishes with when all went well (and the harness sent `event_payload(key)`)."""
    output: dict[str, Any] = {}
    if shape.get("event"):
        output["event"] = event_payload(key)
    if shape.get("rounds"):
        output["answer"] = ANSWERED
    if shape.get("children"):
        output["children"] = [{"n": n} for n in range(shape["children"])]
    return output


def event_payload(key: str) -> dict[str, Any]:
    """The payload of the event the harness sends the case."""
    return {"for": key}
