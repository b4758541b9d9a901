"""Tools for the tool-runner tests: the runner loads them with `TIANSHU_TOOLS=tests.e2e_tools`.

`sleep` records each execution in the file named by ``TIANSHU_TEST_TOOL_LOG``: a JSON line when it
starts and one when it ends, with its pid and wall-clock times, so that tests compare intervals
(and count executions) across runner processes. A cancelled execution has no end line.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
import uuid
from typing import Annotated, Any

from pydantic import Field

from tianshu_core.tools import BaseTool, ToolRegistry, ToolSafety, tool

TOOL_LOG_ENV = "TIANSHU_TEST_TOOL_LOG"


def _record(event: str, execution: str, tag: str) -> None:
    path = os.environ.get(TOOL_LOG_ENV)
    if not path:
        return
    line = json.dumps({"event": event, "id": execution, "tag": tag, "pid": os.getpid(), "t": time.time()})
    # One write of one short line to a file opened for appending: lines of concurrent runners never mix.
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


@tool(safety=ToolSafety.READ_ONLY)
async def echo(text: str) -> str:
    """Answer with the text given."""
    return text


@tool
async def sleep(seconds: Annotated[float, Field(ge=0, le=60)], tag: str = "") -> str:
    """Sleep, recording when it started and ended (and in which process)."""
    execution = uuid.uuid4().hex
    _record("start", execution, tag)
    await asyncio.sleep(seconds)
    _record("end", execution, tag)
    return f"slept {seconds:g} s"


@tool
async def fail(message: str = "boom") -> str:
    """Raise."""
    raise RuntimeError(message)


@tool
async def hang() -> str:
    """Never answer."""
    await asyncio.Event().wait()
    return "unreachable"


@tool
def hang_sync(seconds: float = 60.0) -> str:
    """Block a worker thread (a sync tool cannot be cancelled)."""
    time.sleep(seconds)
    return "woke up"


@tool
async def big(size: Annotated[int, Field(ge=0, le=10_000_000)]) -> str:
    """A result of `size` bytes: 'é' (two bytes) repeated, with a final 'x' when size is odd."""
    return "é" * (size // 2) + "x" * (size % 2)


class Lookup(BaseTool):
    """A hand-written tool: its arguments are checked against its JSON Schema."""

    name = "lookup"
    description = "Look up a customer by id."
    safety = ToolSafety.READ_ONLY
    parameters_schema: dict[str, Any] = {  # noqa: RUF012 - the BaseTool protocol's class attribute
        "type": "object",
        "properties": {"id": {"type": "integer", "minimum": 1}},
        "required": ["id"],
        "additionalProperties": False,
    }

    async def execute(self, arguments: dict[str, Any]) -> str:
        return f"customer {arguments['id']}"


tools = ToolRegistry([echo, sleep, fail, hang, hang_sync, big, Lookup()])
