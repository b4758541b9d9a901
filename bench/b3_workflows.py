"""The workflows and tools of workload B3, loaded by the scheduler (`TIANSHU_WORKFLOWS`) and the tool
runners (`TIANSHU_TOOLS`, the module-level `tools`) the benchmark starts.

- `b3_rt`: `n` sequential calls of the no-op tool, each in its own step whose body times the call
  through the engine's tool executor (the one `ctx.tool_step` uses: NATS to a runner and back); the
  output lists those round trips, and the time of each whole step (its checkpoint included).
- `b3_loop`: `n` sequential one-call `ctx.tool_step` loops (model, no-op call, model), each timed.
- `b3_scale`: one `ctx.tool_step` whose model asks for `calls` read-only naps of `seconds` at once.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from tianshu_core import (
    LlmMessage,
    LlmRequest,
    LlmResponse,
    ScriptedLlm,
    ToolCall,
    ToolInvocation,
    ToolLoopConfig,
    ToolRegistry,
    ToolSafety,
    WorkflowContext,
    WorkflowRegistry,
    WorkflowResult,
    tool,
)
from tianshu_core.errors import TianshuError

registry = WorkflowRegistry()
REQUEST = LlmRequest(model="scripted", messages=[LlmMessage.user("go")])


@tool(safety=ToolSafety.READ_ONLY)
async def noop() -> str:
    """Do nothing."""
    return "ok"


@tool(safety=ToolSafety.READ_ONLY)
async def nap(seconds: float) -> str:
    """Sleep `seconds`."""
    await asyncio.sleep(seconds)
    return "napped"


tools = ToolRegistry([noop, nap])


def first_calls_then_done(calls: list[ToolCall]) -> Callable[[LlmRequest], LlmResponse]:
    """A model that asks for `calls` in its first reply and answers "done" in the next.

    A function of the request, not a list of replies: a case that parks and runs again replays the
    first reply from its journal and asks only for the second, which a fresh list would get wrong.
    """

    def reply(request: LlmRequest) -> LlmResponse:
        answered = any(m.role == "assistant" for m in request.messages)
        return LlmResponse.text("done") if answered else LlmResponse.calls(*calls)

    return reply


def _ms(since: float) -> float:
    return (time.perf_counter() - since) * 1000


@registry.workflow("b3_rt")
async def round_trips(ctx: WorkflowContext) -> WorkflowResult:
    n = int(ctx.case.resource_data["n"])
    # Instrumentation: the executor the engine gives `ctx.tool_step` (a NatsToolExecutor in the
    # scheduler), called the way the loop calls it for one call of a registry's tool.
    executor = ctx.internals.tool_executor
    if executor is None:
        raise TianshuError("b3_rt needs the scheduler's tool executor")
    rt_ms: list[float] = []
    step_ms: list[float] = []
    for i in range(n):

        async def once(i: int = i) -> float:
            call = ToolCall(id=f"c{i}", name="noop", arguments="{}")
            invocation = ToolInvocation.of(ctx.case.case_key, f"rt/{i}")
            started = time.perf_counter()
            result = await executor.execute(call, timeout_s=30.0, invocation=invocation)
            elapsed = _ms(started)
            if result.is_error:
                raise TianshuError(f"no-op call failed: {result.content}")
            return elapsed

        started = time.perf_counter()
        rt_ms.append(await ctx.step(f"rt/{i}", once, returns=float))
        step_ms.append(_ms(started))
    return await ctx.finish("done", output={"rt_ms": rt_ms, "step_ms": step_ms})


@registry.workflow("b3_loop")
async def loops(ctx: WorkflowContext) -> WorkflowResult:
    n = int(ctx.case.resource_data["n"])
    loop_ms: list[float] = []
    for i in range(n):
        llm = ScriptedLlm(first_calls_then_done([ToolCall.of("c1", "noop")]))
        started = time.perf_counter()
        await ctx.tool_step(f"loop{i}", llm, tools, REQUEST)
        loop_ms.append(_ms(started))
    return await ctx.finish("done", output={"loop_ms": loop_ms})


@registry.workflow("b3_scale")
async def scale(ctx: WorkflowContext) -> WorkflowResult:
    spec: dict[str, Any] = ctx.case.resource_data
    calls = [ToolCall.of(f"c{j}", "nap", {"seconds": spec["seconds"]}) for j in range(int(spec["calls"]))]
    llm = ScriptedLlm(first_calls_then_done(calls))
    config = ToolLoopConfig(max_concurrency=len(calls))
    return await ctx.finish("done", output=await ctx.tool_step("naps", llm, tools, REQUEST, config))
