"""`ctx.tool_step`: the seed's tool-loop entries, the partition rule, checkpoints and replay."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from tests._backends import Backend
from tianshu_contracts.tools import ToolCallResult
from tianshu_core import (
    Continue,
    ExecutionState,
    LlmMessage,
    LlmRequest,
    LlmResponse,
    RetryPolicy,
    ScriptedLlm,
    ToolCall,
    ToolInvocation,
    ToolLoopConfig,
    ToolRegistry,
    ToolResult,
    ToolSafety,
    Toolset,
    WorkflowContext,
    WorkflowRegistry,
    WorkflowResult,
    connect_postgres,
    tool,
)
from tianshu_core.tools import TOOL_RESULT_RESOURCE, ToolCallPending
from tianshu_core.tools._loop import _partition

REQUEST = LlmRequest(model="scripted", messages=[LlmMessage.user("What is 2 + 3?")])
Interval = tuple[str, float, float]


@tool
async def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


def _agent(
    llm: ScriptedLlm,
    tools: ToolRegistry | Toolset,
    config: ToolLoopConfig | None = None,
    *,
    name: str = "agent",
) -> WorkflowRegistry:
    reg = WorkflowRegistry()

    @reg.workflow("agent")
    async def agent(ctx: WorkflowContext) -> WorkflowResult:
        text = await ctx.tool_step(name, llm, tools, REQUEST, config)
        return await ctx.finish("done", output=text)

    return reg


def _tool_messages(request: LlmRequest) -> list[tuple[str | None, str]]:
    return [(m.tool_call_id, m.content) for m in request.messages if m.role == "tool"]


# -- the seed's tool-loop entries -----------------------------------------------------------------


async def test_text_only_reply_is_one_round(backend: Backend) -> None:
    llm = ScriptedLlm(["Five."])
    case = await backend.engine(_agent(llm, ToolRegistry([add]))).run_workflow("agent")
    assert (case.execution_state, case.output) == (ExecutionState.FINISHED, "Five.")
    assert llm.calls == 1
    assert [s.name for s in llm.requests[0].tools] == ["add"]
    history = await backend.stores.journal.load(case.case_key)
    assert [(e.kind, e.name) for e in history] == [("step", "agent/r1/llm"), ("step", "agent")]


async def test_one_tool_call_is_two_rounds_with_the_right_call_id(backend: Backend) -> None:
    llm = ScriptedLlm([LlmResponse.calls(ToolCall.of("call_7", "add", {"a": 2, "b": 3})), "It is 5."])
    case = await backend.engine(_agent(llm, ToolRegistry([add]))).run_workflow("agent")
    assert case.output == "It is 5."
    assert llm.calls == 2
    second = llm.requests[1].messages
    assert [m.role for m in second] == ["user", "assistant", "tool"]
    assert [c.id for c in second[1].tool_calls] == ["call_7"]
    assert (second[2].tool_call_id, second[2].content) == ("call_7", "5")
    names = [e.name for e in await backend.stores.journal.load(case.case_key)]
    assert names == ["agent/r1/llm", "agent/r1/call/call_7", "agent/r2/llm", "agent"]


async def test_max_rounds_is_an_error_naming_max_rounds(backend: Backend) -> None:
    runs: list[int] = []

    @tool
    async def again() -> str:
        """Always wants more."""
        runs.append(1)
        return "more"

    llm = ScriptedLlm(lambda req: LlmResponse.calls(ToolCall.of(f"c{len(req.messages)}", "again")))
    reg = _agent(llm, ToolRegistry([again]), ToolLoopConfig(max_rounds=3))
    case = await backend.engine(reg).run_workflow("agent")
    assert case.execution_state is ExecutionState.FAILED
    assert case.error is not None
    assert (case.error.type, case.error.code) == ("ToolLoopMaxRoundsError", "tool_loop_max_rounds")
    assert "max_rounds=3" in case.error.message
    # Three model calls; the tools of the last reply are not run, since nobody would read them.
    assert (llm.calls, len(runs)) == (3, 2)


async def test_tool_errors_are_fed_back_and_the_loop_goes_on(backend: Backend) -> None:
    @tool
    async def boom() -> str:
        """Raises."""
        raise RuntimeError("disk on fire")

    @tool
    async def hang() -> str:
        """Never answers."""
        await asyncio.sleep(60)
        return "late"

    calls = [
        ToolCall.of("c1", "boom"),
        ToolCall.of("c2", "no_such_tool"),
        ToolCall(id="c3", name="add", arguments='{"a": "two"}'),
        ToolCall.of("c4", "hang"),
        ToolCall.of("c5", "add", {"a": 1, "b": 1}),
    ]
    llm = ScriptedLlm([LlmResponse.calls(*calls), "Recovered."])
    reg = _agent(llm, ToolRegistry([add, boom, hang]), ToolLoopConfig(tool_timeout_s=0.05))
    case = await backend.engine(reg).run_workflow("agent")
    assert case.output == "Recovered."
    tool_msgs = [m for m in llm.requests[1].messages if m.role == "tool"]
    assert [m.tool_call_id for m in tool_msgs] == ["c1", "c2", "c3", "c4", "c5"]
    contents = [m.content for m in tool_msgs]
    assert contents[0] == "tool boom failed: RuntimeError: disk on fire"
    assert contents[1] == "unknown tool: no_such_tool"
    assert contents[2].startswith("invalid arguments for tool add: ")
    assert "a: " in contents[2] and "b: Field required" in contents[2]
    assert contents[3] == "tool hang timed out after 0.05 s"
    assert contents[4] == "2"
    assert [m.is_error for m in tool_msgs] == [True, True, True, True, False]  # the model is told
    records = {e.name: e.data for e in await backend.stores.journal.load(case.case_key) if "/call/" in e.name}
    errors = [ToolResult.model_validate_json(records[f"agent/r1/call/c{i}"]).is_error for i in range(1, 6)]
    assert errors == [True, True, True, True, False]


# -- several calls per reply, the partition rule --------------------------------------------------


def _timed_tools(intervals: list[Interval], sleeps: dict[str, float]) -> ToolRegistry:
    async def timed(key: str) -> str:
        start = time.monotonic()
        await asyncio.sleep(sleeps.get(key, 0.05))
        intervals.append((key, start, time.monotonic()))
        return f"{key} done"

    @tool(safety=ToolSafety.READ_ONLY)
    async def look(key: str) -> str:
        """Read-only."""
        return await timed(key)

    @tool(safety=ToolSafety.EXCLUSIVE)
    async def change(key: str) -> str:
        """Exclusive."""
        return await timed(key)

    return ToolRegistry([look, change])


def _overlap(a: Interval, b: Interval) -> bool:
    return a[1] < b[2] and b[1] < a[2]


async def test_several_calls_keep_their_order(backend: Backend) -> None:
    intervals: list[Interval] = []
    sleeps = {"k1": 0.09, "k2": 0.05, "k3": 0.01}  # the later the call, the sooner it finishes
    calls = [ToolCall.of(f"c{i}", "look", {"key": f"k{i}"}) for i in (1, 2, 3)]
    llm = ScriptedLlm([LlmResponse.calls(*calls), "ok"])
    await backend.engine(_agent(llm, _timed_tools(intervals, sleeps))).run_workflow("agent")
    assert [k for k, _, _ in intervals] == ["k3", "k2", "k1"]
    assert _tool_messages(llm.requests[1]) == [("c1", "k1 done"), ("c2", "k2 done"), ("c3", "k3 done")]


async def test_read_only_calls_overlap_and_exclusive_calls_overlap_nothing(backend: Backend) -> None:
    intervals: list[Interval] = []
    plan = [("ro1", "look"), ("ro2", "look"), ("ex1", "change"), ("ro3", "look"), ("ro4", "look")]
    plan += [("ex2", "change"), ("ex3", "change")]
    calls = [ToolCall.of(key, name, {"key": key}) for key, name in plan]
    llm = ScriptedLlm([LlmResponse.calls(*calls), "ok"])
    await backend.engine(_agent(llm, _timed_tools(intervals, {}))).run_workflow("agent")
    by_key = {i[0]: i for i in intervals}
    assert _overlap(by_key["ro1"], by_key["ro2"])
    assert _overlap(by_key["ro3"], by_key["ro4"])
    for ex in ("ex1", "ex2", "ex3"):
        others = [i for k, i in by_key.items() if k != ex]
        assert not any(_overlap(by_key[ex], o) for o in others), ex
    # Groups follow call order: the first pair ends before ex1 starts, ex1 before the second pair.
    assert max(by_key["ro1"][2], by_key["ro2"][2]) <= by_key["ex1"][1]
    assert by_key["ex1"][2] <= min(by_key["ro3"][1], by_key["ro4"][1])
    assert [c for c, _ in _tool_messages(llm.requests[1])] == [key for key, _ in plan]


async def test_max_concurrency_bounds_the_overlap(backend: Backend) -> None:
    intervals: list[Interval] = []
    calls = [ToolCall.of(f"c{i}", "look", {"key": f"k{i}"}) for i in range(6)]
    llm = ScriptedLlm([LlmResponse.calls(*calls), "ok"])
    reg = _agent(llm, _timed_tools(intervals, {}), ToolLoopConfig(max_concurrency=2))
    await backend.engine(reg).run_workflow("agent")
    assert len(intervals) == 6
    points = sorted([(s, 1) for _, s, _ in intervals] + [(e, -1) for _, _, e in intervals])
    running = peak = 0
    for _, delta in points:
        running += delta
        peak = max(peak, running)
    assert peak == 2


def test_partition_rule() -> None:
    safety = {"r": ToolSafety.READ_ONLY, "x": ToolSafety.EXCLUSIVE, "?": ToolSafety.EXCLUSIVE}
    calls = [ToolCall.of(str(i), n) for i, n in enumerate(["r", "r", "x", "r", "?", "r", "r", "r", "x", "x"])]
    groups = _partition(calls, lambda c: safety[c.name])
    assert groups == [[0, 1], [2], [3], [4], [5, 6, 7], [8], [9]]


async def test_oversized_result_is_cut_with_a_marker(backend: Backend) -> None:
    @tool(safety=ToolSafety.READ_ONLY)
    async def dump() -> str:
        """Too much."""
        return "x" * 5000

    llm = ScriptedLlm([LlmResponse.calls(ToolCall.of("c1", "dump")), "ok"])
    await backend.engine(
        _agent(llm, ToolRegistry([dump]), ToolLoopConfig(max_result_bytes=200))
    ).run_workflow("agent")
    [(_, content)] = _tool_messages(llm.requests[1])
    assert len(content.encode()) <= 200
    kept = len(content.split("\n[truncated")[0])
    assert content == "x" * kept + f"\n[truncated: {kept} of 5000 bytes]"


async def test_repeated_call_ids_in_one_reply_get_their_own_records(backend: Backend) -> None:
    llm = ScriptedLlm(
        [
            LlmResponse.calls(
                ToolCall.of("0", "add", {"a": 1, "b": 1}), ToolCall.of("0", "add", {"a": 2, "b": 2})
            ),
            "ok",
        ]
    )
    case = await backend.engine(_agent(llm, ToolRegistry([add]))).run_workflow("agent")
    assert _tool_messages(llm.requests[1]) == [("0", "2"), ("0", "4")]
    names = [e.name for e in await backend.stores.journal.load(case.case_key)]
    assert "agent/r1/call/0" in names and "agent/r1/call/0#2" in names


# -- checkpoints and replay -----------------------------------------------------------------------


async def test_replay_asks_neither_the_model_nor_the_tools_again(backend: Backend) -> None:
    runs: Counter[str] = Counter()

    @tool
    async def count(key: str) -> str:
        """Counts its runs."""
        runs[key] += 1
        return key

    llm = ScriptedLlm([LlmResponse.calls(ToolCall.of("c1", "count", {"key": "a"})), "final"])
    reg = WorkflowRegistry()
    seen: list[str] = []

    @reg.workflow("agent")
    async def agent(ctx: WorkflowContext) -> WorkflowResult:
        text = await ctx.tool_step("agent", llm, ToolRegistry([count]), REQUEST)
        seen.append(text)
        if ctx.get_state("again") is None:
            await ctx.set_state("again", True)
            return Continue()
        return await ctx.finish("done", output=text)

    engine = backend.engine(reg)
    await engine.run_workflow("agent")
    await engine.run_until_idle()
    assert seen == ["final", "final"]
    assert (llm.calls, runs) == (2, Counter({"a": 1}))


async def test_cleared_loop_runs_again_under_new_records(backend: Backend) -> None:
    llm = ScriptedLlm(lambda req: LlmResponse.text(f"answer {len(req.messages)}"))
    reg = WorkflowRegistry()

    @reg.workflow("agent")
    async def agent(ctx: WorkflowContext) -> WorkflowResult:
        first = await ctx.tool_step("agent", llm, ToolRegistry(), REQUEST)
        await ctx.clear_steps(["agent"])
        second = await ctx.tool_step("agent", llm, ToolRegistry(), REQUEST)
        return await ctx.finish("done", output=[first, second])

    case = await backend.engine(reg).run_workflow("agent")
    assert case.output == ["answer 1", "answer 1"]
    assert llm.calls == 2
    names = [e.name for e in await backend.stores.journal.load(case.case_key) if e.kind == "step"]
    assert names == ["agent/r1/llm", "agent", "agent@1/r1/llm", "agent"]


async def test_model_call_is_retried_when_asked(backend: Backend) -> None:
    failures = [ConnectionError("reset")]

    def flaky(req: LlmRequest) -> LlmResponse:
        if failures:
            raise failures.pop()
        return LlmResponse.text("ok")

    llm = ScriptedLlm(flaky)
    policy = RetryPolicy(max_attempts=3, base_delay=0.001, max_delay=0.002, jitter=0.0)
    case = await backend.engine(_agent(llm, ToolRegistry(), ToolLoopConfig(llm_retry=policy))).run_workflow(
        "agent"
    )
    assert (case.output, llm.calls) == ("ok", 2)


async def test_one_span_per_model_call_and_per_tool_call(
    backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tianshu_core import telemetry

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    monkeypatch.setattr(telemetry, "tracer", provider.get_tracer("test"))
    calls = [ToolCall.of("c1", "add", {"a": 1, "b": 2}), ToolCall.of("c2", "nope")]
    llm = ScriptedLlm([LlmResponse.calls(*calls), "3"])
    await backend.engine(_agent(llm, ToolRegistry([add]))).run_workflow("agent")
    spans = exporter.get_finished_spans()
    llm_spans = [s for s in spans if s.name == "tianshu.llm"]
    tool_spans = [s for s in spans if s.name == "tianshu.tool"]
    assert [s.attributes and s.attributes["tianshu.round"] for s in llm_spans] == [1, 2]
    assert [s.attributes and s.attributes["tianshu.tool"] for s in tool_spans] == ["add", "nope"]
    assert [s.attributes and s.attributes["gen_ai.tool.call.id"] for s in tool_spans] == ["c1", "c2"]
    run = next(s for s in spans if s.name == "tianshu.run_case")
    assert run.context is not None
    assert {s.context.trace_id for s in spans if s.context is not None} == {run.context.trace_id}


# -- the executor seam ----------------------------------------------------------------------------


class RecordingExecutor:
    """Runs calls with a local executor, keeping what it was handed."""

    def __init__(self, registry: ToolRegistry, pending: int = 0, wait_s: float = 60) -> None:
        self.local = registry.executor()
        self.seen: list[tuple[ToolCall, ToolInvocation | None]] = []
        self.pending, self.wait_s = pending, wait_s

    async def execute(
        self, call: ToolCall, *, timeout_s: float | None = None, invocation: ToolInvocation | None = None
    ) -> ToolResult:
        self.seen.append((call, invocation))
        if self.pending:
            self.pending -= 1
            raise ToolCallPending(self.wait_s)
        return await self.local.execute(call, timeout_s=timeout_s)


async def test_a_toolset_runs_calls_with_its_own_executor(backend: Backend) -> None:
    registry = ToolRegistry([add])
    executor = RecordingExecutor(registry)
    llm = ScriptedLlm([LlmResponse.calls(ToolCall.of("c1", "add", {"a": 2, "b": 2})), "four"])
    case = await backend.engine(_agent(llm, registry.toolset(executor))).run_workflow("agent")
    assert case.output == "four"
    [(call, invocation)] = executor.seen
    assert call.id == "c1" and invocation is not None
    assert (invocation.case_key, invocation.step) == (case.case_key, "agent/r1/call/c1")
    assert invocation == ToolInvocation.of(case.case_key, "agent/r1/call/c1")
    assert len(invocation.call_id) == 32


async def test_a_pending_call_parks_the_case_until_its_result_arrives(backend: Backend) -> None:
    registry = ToolRegistry([add])
    executor = RecordingExecutor(registry, pending=1)
    llm = ScriptedLlm([LlmResponse.calls(ToolCall.of("c1", "add", {"a": 2, "b": 2})), "four"])
    engine = backend.engine(_agent(llm, registry.toolset(executor)))
    case = await engine.run_workflow("agent")
    assert case.execution_state is ExecutionState.WAITING
    [(_, invocation)] = executor.seen
    assert invocation is not None
    await engine.run_until_idle()  # nothing to do until the result comes
    result = ToolCallResult(
        call_id=invocation.call_id,
        case_key=case.case_key,
        step=invocation.step,
        result=ToolResult(call_id="c1", content="4"),
        runner="runner-1",
        duration_s=0.01,
    )
    woken = await engine.publish_event(
        TOOL_RESULT_RESOURCE, invocation.call_id, result.model_dump(mode="json"), event_id=invocation.call_id
    )
    assert woken.woken == [case.case_key]
    await engine.run_until_idle()
    done = await engine.get_case(case.case_key)
    assert (done.execution_state, done.output) == (ExecutionState.FINISHED, "four")
    assert len(executor.seen) == 1  # the replay did not send the call again
    assert _tool_messages(llm.requests[1]) == [("c1", "4")]
    assert llm.calls == 2


async def test_a_pending_call_in_a_parallel_group_lets_the_others_answer(backend: Backend) -> None:
    registry = _timed_tools([], {})
    executor = RecordingExecutor(registry, pending=1)  # the first call is pending, the second answers
    calls = [ToolCall.of("c1", "look", {"key": "a"}), ToolCall.of("c2", "look", {"key": "b"})]
    llm = ScriptedLlm([LlmResponse.calls(*calls), "both"])
    engine = backend.engine(_agent(llm, registry.toolset(executor)))
    case = await engine.run_workflow("agent")
    assert case.execution_state is ExecutionState.WAITING
    names = [e.name for e in await backend.stores.journal.load(case.case_key)]
    assert "agent/r1/call/c2" in names and "agent/r1/call/c1" not in names
    invocation = next(i for c, i in executor.seen if c.id == "c1")
    assert invocation is not None
    result = ToolCallResult(
        call_id=invocation.call_id,
        case_key=case.case_key,
        step=invocation.step,
        result=ToolResult(call_id="c1", content="a late"),
        runner="runner-2",
        duration_s=3,
    )
    await engine.publish_event(TOOL_RESULT_RESOURCE, invocation.call_id, result.model_dump(mode="json"))
    await engine.run_until_idle()
    assert (await engine.get_case(case.case_key)).output == "both"
    assert [c.id for c, _ in executor.seen] == ["c1", "c2"]
    assert _tool_messages(llm.requests[1]) == [("c1", "a late"), ("c2", "b done")]


async def test_a_pending_call_past_its_deadline_is_an_error_result(backend: Backend) -> None:
    registry = ToolRegistry([add])
    executor = RecordingExecutor(registry, pending=1, wait_s=5)
    llm = ScriptedLlm([LlmResponse.calls(ToolCall.of("c1", "add", {"a": 2, "b": 2})), "gave up"])
    engine = backend.engine(_agent(llm, registry.toolset(executor)))
    case = await engine.run_workflow("agent")
    assert case.execution_state is ExecutionState.WAITING
    backend.clock.advance(10)
    await engine.run_until_idle()
    done = await engine.get_case(case.case_key)
    assert (done.execution_state, done.output) == (ExecutionState.FINISHED, "gave up")
    assert _tool_messages(llm.requests[1]) == [("c1", "tool add: no result arrived before the deadline")]
    assert len(executor.seen) == 1


# -- crashes (a real process, SIGKILLed) ------------------------------------------------------------

WORKER = str(Path(__file__).with_name("tool_crash_worker.py"))
ROOT = str(Path(__file__).resolve().parent.parent)


def _spawn(*args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, WORKER, *args], env={**os.environ, "PYTHONPATH": ROOT})


async def _wait_for(predicate: Callable[[], Any], within: float = 30.0) -> None:
    deadline = time.monotonic() + within
    while not await predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not reached")
        await asyncio.sleep(0.02)


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


@pytest.mark.postgres
@pytest.mark.e2e
@pytest.mark.parametrize(
    ("block_at", "recorded_before_kill"),
    [
        ("llm2", {"agent/r1/llm", "agent/r1/call/r1c1"}),
        ("call3", {"agent/r2/llm", "agent/r2/call/r2c1", "agent/r2/call/r2c2"}),
    ],
    ids=["between-rounds", "mid-round-after-2-of-3"],
)
async def test_sigkill_then_rerun_repeats_nothing_that_answered(
    pg_migrated_url: str, tmp_path: Path, block_at: str, recorded_before_kill: set[str]
) -> None:
    log = tmp_path / "log"
    key = f"tools-{block_at}-{uuid.uuid4().hex[:8]}"
    stores = await connect_postgres(pg_migrated_url, max_size=1)
    marker = "asked 2" if block_at == "llm2" else "start r2c3"

    async def ready() -> bool:
        names = {e.name for e in await stores.journal.load(key)}
        return marker in _lines(log) and recorded_before_kill <= names

    try:
        first = _spawn(pg_migrated_url, key, str(log), block_at)
        try:
            await _wait_for(ready)
        finally:
            first.send_signal(signal.SIGKILL)
            first.wait()
        assert first.returncode == -signal.SIGKILL
        before = Counter(_lines(log))
        second = _spawn(pg_migrated_url, key, str(log), "none")
        assert await asyncio.to_thread(second.wait, 60) == 0
        case = await stores.cases.get_by_key(key)
        assert case is not None
        assert (case.execution_state, case.output) == (ExecutionState.FINISHED, "finished")
        names = [e.name for e in await stores.journal.load(key) if e.kind == "step"]
    finally:
        await stores.close()
    runs = Counter(_lines(log))
    # Each tool call answered exactly once, across both processes.
    assert all(runs[f"done {c}"] == 1 for c in ("r1c1", "r2c1", "r2c2", "r2c3")), runs
    # The model was asked once per recorded reply; only the reply the kill interrupted is asked again.
    assert runs["asked 1"] == 1 and runs["asked 3"] == 1
    assert runs["asked 2"] == (2 if block_at == "llm2" else 1)
    if block_at == "call3":
        assert before["done r2c1"] == before["done r2c2"] == 1 and before["done r2c3"] == 0
        assert runs["start r2c3"] == 2  # it had started, never answered, so it ran again
    assert names == [
        "agent/r1/llm",
        "agent/r1/call/r1c1",
        "agent/r2/llm",
        *sorted(n for n in names if n.startswith("agent/r2/call/")),
        "agent/r3/llm",
        "agent",
    ]
    assert sorted(n for n in names if n.startswith("agent/r2/call/")) == [
        "agent/r2/call/r2c1",
        "agent/r2/call/r2c2",
        "agent/r2/call/r2c3",
    ]


async def test_a_call_whose_result_was_recorded_while_no_run_awaited_it_is_not_run_again(
    backend: Backend,
) -> None:
    """The run that sent a call died before recording its result; the result came as an event on
    the call id meanwhile (long after any NATS duplicate window): the replay takes it."""
    from tianshu_core.context import StoreFailure

    registry = ToolRegistry([add])
    sent: list[ToolInvocation] = []
    engine_box: list[Any] = []

    class SendsThenDies:
        async def execute(
            self, call: ToolCall, *, timeout_s: float | None = None, invocation: ToolInvocation | None = None
        ) -> ToolResult:
            assert invocation is not None
            sent.append(invocation)
            result = ToolCallResult(
                call_id=invocation.call_id,
                case_key=invocation.case_key,
                step=invocation.step,
                result=ToolResult(call_id=call.id, content="4"),
                runner="runner-1",
                duration_s=0.01,
            )
            await engine_box[0].publish_event(
                TOOL_RESULT_RESOURCE,
                invocation.call_id,
                result.model_dump(mode="json"),
                event_id=invocation.call_id,
            )
            raise StoreFailure(ConnectionError("the scheduler lost its store before recording"))

    llm = ScriptedLlm(
        lambda request: (
            "four"
            if _tool_messages(request)
            else LlmResponse.calls(ToolCall.of("c1", "add", {"a": 2, "b": 2}))
        )
    )
    engine = backend.engine(_agent(llm, registry.toolset(SendsThenDies())))
    engine_box.append(engine)
    case = await engine.start_case("agent", session_id=f"recorded-{uuid.uuid4().hex[:6]}")
    await engine.run_case(case.case_key)  # abandoned: the reply is recorded, the call's result not
    backend.clock.advance(3600)
    await engine.run_until_idle(session_id=case.session_id)
    done = await engine.get_case(case.case_key)
    assert (done.execution_state, done.output) == (ExecutionState.FINISHED, "four")
    assert len(sent) == 1
    assert llm.calls == 2  # the first reply was replayed, not asked again
