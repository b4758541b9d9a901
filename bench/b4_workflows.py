"""The workflow of workload B4's step path, loaded by the scheduler the benchmark starts
(`TIANSHU_WORKFLOWS`), and what it shares with `bench.b4`: the prompt, the route, the key.

- `b4_step`: `n` sequential model calls, each in its own step whose body times the same text
  completion twice, alternating: with a bare `openai` client straight to the scripted model server
  (input `base_url`), and through `ctx.llm` with the step's invocation: in the scheduler, the LLM
  gateway's client (`NatsLlmClient`: the call published to JetStream, taken by a gateway, sent
  upstream, its result received on core NATS); the output lists both. Then `loops` one-round
  `ctx.tool_step`s with no tools (the same call, with the loop's lookup and checkpoints), each
  timed whole.
"""

from __future__ import annotations

import time

import openai

from tianshu_core import (
    LlmMessage,
    LlmRequest,
    ToolRegistry,
    WorkflowContext,
    WorkflowRegistry,
    WorkflowResult,
)
from tianshu_core.llm import LlmInvocation

registry = WorkflowRegistry()
KEY = "sk-bench"  # the scripted model server takes any key
PROMPT = "say something short"
ROUTE = "text"  # the gateway's route, and the upstream model (script) it names
REQUEST = LlmRequest(model=ROUTE, messages=[LlmMessage.user(PROMPT)])
MESSAGES: list[openai.types.chat.ChatCompletionMessageParam] = [{"role": "user", "content": PROMPT}]


def _ms(since: float) -> float:
    return (time.perf_counter() - since) * 1000


@registry.workflow("b4_step")
async def step_calls(ctx: WorkflowContext) -> WorkflowResult:
    spec = ctx.case.resource_data
    direct = openai.AsyncOpenAI(api_key=KEY, base_url=str(spec["base_url"]), max_retries=0)
    direct_ms: list[float] = []
    step_ms: list[float] = []
    loop_ms: list[float] = []
    try:
        for i in range(int(spec["n"])):

            async def once(i: int = i) -> list[float]:
                started = time.perf_counter()
                await direct.chat.completions.create(model=ROUTE, messages=MESSAGES)
                bare = _ms(started)
                invocation = LlmInvocation.of(ctx.case.case_key, f"call/{i}")
                started = time.perf_counter()
                await ctx.llm.complete(REQUEST, invocation=invocation)
                return [bare, _ms(started)]

            bare, through = await ctx.step(f"call/{i}", once, returns=list)
            direct_ms.append(bare)
            step_ms.append(through)
    finally:
        await direct.close()
    for i in range(int(spec["loops"])):
        started = time.perf_counter()
        await ctx.tool_step(f"loop{i}", ToolRegistry([]), REQUEST)
        loop_ms.append(_ms(started))
    output = {"direct_ms": direct_ms, "step_ms": step_ms, "loop_ms": loop_ms}
    return await ctx.finish("done", output=output)
