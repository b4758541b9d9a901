"""A worker process for the tool-loop crash tests: runs one tool loop against Postgres until killed.

usage: tool_crash_worker.py DSN CASE_KEY LOG_FILE BLOCK_AT

The scripted model asks, in round 1, for one exclusive call (`r1c1`); in round 2, for three
read-only calls (`r2c1`, `r2c2`, `r2c3`); in round 3 it answers in text. Every model call and
every tool run appends a line to LOG_FILE. BLOCK_AT makes the worker hang where the test kills it:
`llm2` (between rounds: while the model is asked for round 2), `call3` (in the middle of round 2,
in the third call, after the first two have answered), or `none`.
"""

from __future__ import annotations

import asyncio
import os
import sys

from tianshu_core import (
    Engine,
    EngineConfig,
    LlmMessage,
    LlmRequest,
    LlmResponse,
    RunStatus,
    ScriptedLlm,
    ToolCall,
    ToolRegistry,
    ToolSafety,
    WorkflowContext,
    WorkflowRegistry,
    WorkflowResult,
    connect_postgres,
    tool,
)

LEASE_TTL = 1.0
FOREVER = 3600.0


def _append_line(path: str, line: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


def build(log: str, block_at: str) -> tuple[ScriptedLlm, ToolRegistry]:
    async def reply(request: LlmRequest) -> LlmResponse:
        answered = sum(1 for m in request.messages if m.role == "tool")
        k = {0: 1, 1: 2, 4: 3}[answered]
        _append_line(log, f"asked {k}")
        if k == 2 and block_at == "llm2":
            await asyncio.sleep(FOREVER)  # the test SIGKILLs us here
        if k == 1:
            return LlmResponse.calls(ToolCall.of("r1c1", "write", {"key": "r1c1"}))
        if k == 2:
            return LlmResponse.calls(
                *(ToolCall.of(f"r2c{i}", "fetch", {"key": f"r2c{i}"}) for i in (1, 2, 3))
            )
        return LlmResponse.text("finished")

    @tool
    async def write(key: str) -> str:
        """An exclusive tool with a side effect."""
        _append_line(log, f"done {key}")
        return f"wrote {key}"

    @tool(safety=ToolSafety.READ_ONLY)
    async def fetch(key: str) -> str:
        """A read-only tool; the third call hangs when asked to."""
        _append_line(log, f"start {key}")
        if key == "r2c3" and block_at == "call3":
            await asyncio.sleep(FOREVER)  # the test SIGKILLs us here
        await asyncio.sleep(0.01)
        _append_line(log, f"done {key}")
        return f"fetched {key}"

    return ScriptedLlm(reply), ToolRegistry([write, fetch])


async def main(dsn: str, case_key: str, log: str, block_at: str) -> None:
    llm, tools = build(log, block_at)
    reg = WorkflowRegistry()

    @reg.workflow("agent")
    async def agent(ctx: WorkflowContext) -> WorkflowResult:
        request = LlmRequest(model="scripted", messages=[LlmMessage.user("go")])
        text = await ctx.tool_step("agent", llm, tools, request)
        return await ctx.finish("done", output=text)

    stores = await connect_postgres(dsn, max_size=2)
    engine = Engine(stores, reg, config=EngineConfig(lease_ttl=LEASE_TTL))
    await engine.start_case("agent", case_key=case_key)
    for _ in range(600):
        if (await engine.run_case(case_key)).status is not RunStatus.SKIPPED:
            break
        await asyncio.sleep(0.1)  # a killed predecessor's lease has not expired yet
    await stores.close()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]))
