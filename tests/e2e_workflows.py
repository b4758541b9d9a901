"""Workflows the end-to-end tests run in real scheduler processes (TIANSHU_WORKFLOWS=tests.e2e_workflows).

Side effects are appended to files under $TIANSHU_TEST_EFFECTS (one line per execution), so a test
can count how often each step body ran across processes.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any

from tianshu_core import (
    SpawnConfig,
    Waiting,
    WaitTimeoutError,
    WorkflowContext,
    WorkflowRegistry,
    WorkflowResult,
)

registry = WorkflowRegistry()


def effect(ctx: WorkflowContext, what: str) -> str:
    """Record one execution of a step body; the line names the case, the step and this process."""
    folder = Path(os.environ.get("TIANSHU_TEST_EFFECTS", "/tmp/tianshu-effects"))
    folder.mkdir(parents=True, exist_ok=True)
    line = f"{ctx.case.case_key} {what} {os.getpid()} {time.time():.6f}\n"
    fd = os.open(folder / "effects.log", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)
    return what


@registry.workflow("e2e_steps")
async def steps(ctx: WorkflowContext) -> WorkflowResult:
    """N steps, each sleeping `delay_s` (so a test can kill the process mid-run)."""
    n = int((ctx.case.resource_data or {}).get("steps", 10))
    delay = float((ctx.case.resource_data or {}).get("delay_s", 0.0))
    for i in range(n):

        async def body(i: int = i) -> str:
            if delay:
                await asyncio.sleep(delay)
            return effect(ctx, f"s{i}")

        await ctx.step(f"s{i}", body)
    return await ctx.finish("done", output={"steps": n})


@registry.workflow("e2e_wait")
async def wait(ctx: WorkflowContext) -> WorkflowResult:
    """Wait for one event on ("order", input.resource or the case key), then one more step."""
    resource = (ctx.case.resource_data or {}).get("resource") or ctx.case.case_key
    await ctx.step("before", lambda: effect(ctx, "before"))
    payload: Any = await ctx.wait_for_event("order", resource)
    await ctx.step("after", lambda: effect(ctx, "after"))
    return await ctx.finish("done", output=payload)


@registry.workflow("e2e_sleep")
async def sleep(ctx: WorkflowContext) -> WorkflowResult:
    await ctx.step("before", lambda: effect(ctx, "before"))
    await ctx.sleep(float(ctx.case.resource_data["seconds"]))
    await ctx.step("after", lambda: effect(ctx, "after"))
    return await ctx.finish("done")


@registry.workflow("e2e_timeout")
async def timeout(ctx: WorkflowContext) -> WorkflowResult:
    try:
        payload: Any = await ctx.wait_for_event(
            "reply", ctx.case.case_key, timeout=float(ctx.case.resource_data["seconds"])
        )
    except WaitTimeoutError:
        return await ctx.finish("timed_out")
    return await ctx.finish("answered", output=payload)


@registry.workflow("e2e_child")
async def child(ctx: WorkflowContext) -> WorkflowResult:
    """One step; input.delay_s (if given) first."""

    async def work() -> str:
        await asyncio.sleep(float(ctx.case.resource_data.get("delay_s", 0)))
        return effect(ctx, f"child-{ctx.case.resource_data['n']}")

    value = await ctx.step("work", work)
    return await ctx.finish("done", output={"n": ctx.case.resource_data["n"], "did": value})


@registry.workflow("e2e_parent")
async def parent(ctx: WorkflowContext) -> WorkflowResult:
    """Spawn input.children children and await them; input.last_delay_s (if given) makes the last
    one end that much after the others."""
    n = int(ctx.case.resource_data["children"])
    late = ctx.case.resource_data.get("last_delay_s")
    inputs = [{"n": i} for i in range(n)]
    if late:
        inputs[-1]["delay_s"] = late
    handles = await ctx.spawn_children([SpawnConfig("e2e_child", data) for data in inputs])
    outcomes = await ctx.await_children(handles)
    return await ctx.finish("done", output=[o.output for o in outcomes])


@registry.workflow("e2e_slow_step")
async def slow_step(ctx: WorkflowContext) -> WorkflowResult:
    """Three steps; the middle one sleeps `seconds` first, so a test can freeze a replica inside it."""
    seconds = float(ctx.case.resource_data["seconds"])
    await ctx.step("first", lambda: effect(ctx, "first"))

    async def slow() -> str:
        await asyncio.sleep(seconds)
        return effect(ctx, "slow")

    await ctx.step("slow", slow)
    await ctx.step("last", lambda: effect(ctx, "last"))
    return await ctx.finish("done", output={"pid": os.getpid()})


@registry.workflow("e2e_think_then_wait")
async def think_then_wait(ctx: WorkflowContext) -> WorkflowResult:
    """A step, `seconds` of work outside any step (no checkpoint), then a wait and a last step."""
    await ctx.step("before", lambda: effect(ctx, "before"))
    await asyncio.sleep(float(ctx.case.resource_data["seconds"]))
    payload: Any = await ctx.wait_for_event("order", ctx.case.case_key)
    await ctx.step("after", lambda: effect(ctx, "after"))
    return await ctx.finish("done", output=payload)


@registry.workflow("e2e_fence")
async def fence(ctx: WorkflowContext) -> WorkflowResult:
    """A step, then one write of the kind `input.write` names, its value naming this process; then
    a wait that parks the case. In a replica started with TIANSHU_TEST_STALL=<dir>, a run first
    stalls outside any step, after creating <dir>/<case key>, until <dir>/go exists: a test
    freezes the replica there and lets another take the case over."""
    kind = ctx.case.resource_data["write"]
    await ctx.step("before", lambda: effect(ctx, "before"))
    stall = os.environ.get("TIANSHU_TEST_STALL")
    if stall:
        (Path(stall) / ctx.case.case_key).touch()
        while not (Path(stall) / "go").exists():  # noqa: ASYNC110 - a file another process creates
            await asyncio.sleep(0.05)
    me = str(os.getpid())
    if kind == "step":
        await ctx.step(f"step-{me}", lambda: effect(ctx, "step"))
    elif kind == "state":
        await ctx.set_state("who", me)
    elif kind == "session_state":
        await ctx.set_session_state("who", me)
    elif kind == "timer":
        await ctx.sleep(3600, name=f"nap-{me}")
    elif kind == "child":
        await ctx.spawn_child("e2e_child", {"n": me}, name=f"child-{me}")
    elif kind == "waits":
        await ctx.wait_for_event("order", f"{ctx.case.case_key}-{me}")
    else:
        return await ctx.finish("done", output={"pid": me})
    await ctx.wait_for_event("park", ctx.case.case_key)
    return await ctx.finish("unparked")


@registry.workflow("e2e_bad_output")
async def bad_output(ctx: WorkflowContext) -> WorkflowResult:
    """A step, then an output Postgres cannot store: a NUL character the workflow made itself."""
    await ctx.step("made", lambda: effect(ctx, "made"))
    return await ctx.finish("done", output={"text": "a" + chr(0) + "b"})


@registry.workflow("e2e_broken_waiting")
async def broken_waiting(ctx: WorkflowContext) -> WorkflowResult:
    """A step, then a result the engine cannot store (a bug): every run fails the same way."""
    await ctx.step("made", lambda: effect(ctx, "made"))
    effect(ctx, "run")
    return Waiting(["not a predicate"])  # type: ignore[list-item]
