"""An agent workflow and its tools for the service-mode tool-loop tests (tests/test_tool_service.py).

Schedulers load the workflow (`TIANSHU_WORKFLOWS=tests.e2e_agent`), tool runners the tools
(`TIANSHU_TOOLS=tests.e2e_agent`: the module-level `tools` registry). The workflow offers the model
those tools plus `ghost`, which no runner serves. `e2e_wait_then_agent` runs the same loop after a
wait for an event on ("order", its case key), between two steps that record their runs in the
effects log like `tests.e2e_workflows` (tests/test_outage.py). `e2e_wait_then_model` adds a model
call through the scheduler's own model (the LLM gateway) to it (tests/fuzz_bus.py).

The model is a `ScriptedLlm` whose reply is a function of the request and of the case's input:

    {"rounds": [[{"tool": "nap", "args": {"seconds": 0.1, "tag": "t1"}}, ...], ...],
     "answer": "done",                      # the final text, after the last round of calls
     "hold_round": 2, "hold_file": "/p",    # optional: asked for that round, wait until /p exists
     "max_concurrency": 10, "tool_timeout_s": 30, "max_rounds": 10}

The round is 1 + the number of assistant messages in the request; the calls of round k are named
`r<k>c<i>` (i from 1), and a call may give its argument text verbatim (`"raw": "{not json"`). Every
time the model is asked it appends a JSON line to ``$TIANSHU_TEST_EFFECTS/model-calls.jsonl``: the
case, the round, the process, and the tool results it was shown since its previous reply; so tests
count model calls across scheduler processes and check what the model received.

`nap` and `wait_file` record their executions like `tests.e2e_tools.sleep` (start and end lines
with pid and tag in ``$TIANSHU_TEST_TOOL_LOG``), read by `tests._tool_runner.executions`.
"""

from __future__ import annotations

import asyncio
import json
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field

from tests.e2e_tools import Lookup, _record, big, echo, fail, hang, sleep
from tests.e2e_workflows import effect
from tianshu_core import (
    LlmMessage,
    LlmRequest,
    LlmResponse,
    ScriptedLlm,
    ToolCall,
    ToolLoopConfig,
    ToolRegistry,
    ToolSafety,
    WorkflowContext,
    WorkflowRegistry,
    WorkflowResult,
    tool,
)

MODEL_LOG = "model-calls.jsonl"
REQUEST = LlmRequest(model="scripted", messages=[LlmMessage.user("Do the work, then say you are done.")])

registry = WorkflowRegistry()


@tool(safety=ToolSafety.READ_ONLY)
async def nap(seconds: Annotated[float, Field(ge=0, le=60)], tag: str = "") -> str:
    """Sleep (read-only: naps of one round run side by side), recording when it started and ended."""
    execution = uuid.uuid4().hex
    _record("start", execution, tag)
    await asyncio.sleep(seconds)
    _record("end", execution, tag)
    return f"napped {seconds:g} s"


@tool(safety=ToolSafety.READ_ONLY)
async def wait_file(path: str, tag: str = "") -> str:
    """Block until the file `path` exists (a call a test can hold, then let go)."""
    execution = uuid.uuid4().hex
    _record("start", execution, tag)
    while not os.path.exists(path):  # noqa: ASYNC110, ASYNC240 - a file another process creates
        await asyncio.sleep(0.01)
    _record("end", execution, tag)
    return f"found {Path(path).name}"


@tool(safety=ToolSafety.READ_ONLY)
async def nap_nul(seconds: Annotated[float, Field(ge=0, le=60)], tag: str = "") -> str:
    """`nap`, answering with text that holds a NUL character (binary output, say)."""
    await nap(seconds, tag)
    return "binary\x00output"


@tool(safety=ToolSafety.READ_ONLY)
async def quotes(size: Annotated[int, Field(ge=0, le=10_000_000)]) -> str:
    """`size` double quotes: a result whose JSON is twice its length (each is escaped)."""
    return '"' * size


@tool
async def ghost() -> str:
    """Offered to the model by the workflow, but served by no runner."""
    return "unreachable"


tools = ToolRegistry([echo, sleep, fail, hang, big, Lookup(), nap, nap_nul, wait_file, quotes])
"""What the runners serve."""

offered = ToolRegistry([*tools, ghost])
"""What the workflow offers the model."""


# -- the scripted model ------------------------------------------------------------------------


def _append(path: Path, record: dict[str, Any]) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (json.dumps(record) + "\n").encode())
    finally:
        os.close(fd)


def _model_log() -> Path:
    folder = Path(os.environ.get("TIANSHU_TEST_EFFECTS", "/tmp/tianshu-effects"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder / MODEL_LOG


def calls_of(spec: dict[str, Any], k: int) -> list[ToolCall]:
    """The calls the model asks for in round `k` (none past the last round)."""
    rounds = spec.get("rounds", [])
    if k > len(rounds):
        return []
    out = []
    for i, call in enumerate(rounds[k - 1], start=1):
        arguments = call["raw"] if "raw" in call else json.dumps(call.get("args", {}))
        out.append(ToolCall(id=f"r{k}c{i}", name=call["tool"], arguments=arguments))
    return out


async def _reply(case_key: str, spec: dict[str, Any], request: LlmRequest) -> LlmResponse:
    k = 1 + sum(m.role == "assistant" for m in request.messages)
    last = max((i for i, m in enumerate(request.messages) if m.role == "assistant"), default=-1)
    shown = [[m.tool_call_id, m.content] for m in request.messages[last + 1 :] if m.role == "tool"]
    _append(_model_log(), {"case": case_key, "round": k, "pid": os.getpid(), "results": shown})
    if spec.get("hold_round") == k:
        gate = Path(spec["hold_file"])
        while not gate.exists():  # noqa: ASYNC110, ASYNC240 - killed here, or let go
            await asyncio.sleep(0.01)
    calls = calls_of(spec, k)
    if calls:
        return LlmResponse.calls(*calls)
    return LlmResponse.text(str(spec.get("answer", "done")))


async def _tool_loop(ctx: WorkflowContext) -> str:
    """The tool loop `agent`, driven by the scripted model above with the case's input as its spec."""
    spec: dict[str, Any] = ctx.case.resource_data or {}

    async def reply(request: LlmRequest) -> LlmResponse:
        return await _reply(ctx.case.case_key, spec, request)

    config = ToolLoopConfig(
        max_rounds=int(spec.get("max_rounds", 10)),
        max_concurrency=int(spec.get("max_concurrency", 10)),
        tool_timeout_s=float(spec.get("tool_timeout_s", 30.0)),
    )
    return await ctx.tool_step("agent", ScriptedLlm(reply), offered, REQUEST, config)


@registry.workflow("e2e_agent")
async def agent(ctx: WorkflowContext) -> WorkflowResult:
    """One tool loop (`agent`) driven by the scripted model above; the output is its final text."""
    return await ctx.finish("done", output=await _tool_loop(ctx))


@registry.workflow("e2e_wait_then_agent")
async def wait_then_agent(ctx: WorkflowContext) -> WorkflowResult:
    """A step, a wait for one event on ("order", the case key), the tool loop of `e2e_agent`, a last
    step; the output is the event's payload and the loop's final text.

    The steps `before` and `after` record their runs in the effects log (`tests._services.effects`).
    """
    await ctx.step("before", lambda: effect(ctx, "before"))
    payload: Any = await ctx.wait_for_event("order", ctx.case.case_key)
    text = await _tool_loop(ctx)
    await ctx.step("after", lambda: effect(ctx, "after"))
    return await ctx.finish("done", output={"event": payload, "answer": text})


@registry.workflow("e2e_wait_then_model")
async def wait_then_model(ctx: WorkflowContext) -> WorkflowResult:
    """`e2e_wait_then_agent`, with one more model call before the last step: through `ctx.llm` (in
    the scheduler, the LLM gateway), on the route and with the question of the input's `model`
    (`{"route": ..., "question": ...}`); the output holds its reply as `model` too."""
    spec: dict[str, Any] = ctx.case.resource_data or {}
    await ctx.step("before", lambda: effect(ctx, "before"))
    payload: Any = await ctx.wait_for_event("order", ctx.case.case_key)
    text = await _tool_loop(ctx)
    ask = spec["model"]
    request = LlmRequest(model=str(ask["route"]), messages=[LlmMessage.user(str(ask["question"]))])
    reply = await ctx.tool_step("model", ToolRegistry(), request)
    await ctx.step("after", lambda: effect(ctx, "after"))
    return await ctx.finish("done", output={"event": payload, "answer": text, "model": reply})


# -- reading the model log (for the tests) -----------------------------------------------------


@dataclass(frozen=True)
class ModelCall:
    """One time the model was asked: for which case and round, in which process, shown what."""

    case: str
    round: int
    pid: int
    results: list[tuple[str, str]]


def model_calls(workdir: Path, case: str | None = None) -> list[ModelCall]:
    """Every recorded model call (of `case`, when given), in order."""
    path = workdir / MODEL_LOG
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        r = json.loads(line)
        if case is None or r["case"] == case:
            out.append(ModelCall(r["case"], r["round"], r["pid"], [(i, c) for i, c in r["results"]]))
    return out
