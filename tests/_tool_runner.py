"""Running tool runners as a user does (separate processes), and talking to them over NATS."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Self

from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from tests._services import ServiceProcess
from tests.e2e_tools import TOOL_LOG_ENV
from tianshu_contracts import (
    DEAD_LETTER_ADAPTER,
    TOOL_CALL_RESULT_ADAPTER,
    DeadLetter,
    ToolCallRequest,
    ToolCallResult,
    subjects,
)


class ToolRunnerProcess(ServiceProcess):
    """One `python -m tianshu_tool_runner` serving `tests.e2e_tools` unless ``TIANSHU_TOOLS`` says
    otherwise; `start()` waits for its ready file.

    Runners sharing a `workdir` share the execution log of the `sleep` tool (`tool_log`).
    """

    command = (sys.executable, "-m", "tianshu_tool_runner")
    kind = "runner"

    def __init__(self, workdir: Path, nats_url: str, **env: str) -> None:
        super().__init__(workdir)
        self.tool_log = workdir / "tool-executions.jsonl"
        self.env |= {
            "TIANSHU_NATS_URL": nats_url,
            "TIANSHU_TOOLS": "tests.e2e_tools",
            "TIANSHU_TOOL_RUNNER_NAME": self.name,
            "TIANSHU_TOOL_RUNNER_READY_FILE": str(self.ready_file),
            TOOL_LOG_ENV: str(self.tool_log),
            **env,
        }

    @property
    def runner_id(self) -> str:
        """What its results carry in `runner`."""
        return f"{self.name}-{self.pid}"


# -- executions of the `sleep` tool ------------------------------------------------------------


@dataclass(frozen=True)
class Execution:
    """One run of `sleep`: in which process, when; `end` is None when it never finished."""

    tag: str
    pid: int
    start: float
    end: float | None


def executions(tool_log: Path) -> list[Execution]:
    """The recorded runs of `sleep`, in order of start."""
    starts: dict[str, dict[str, Any]] = {}
    ends: dict[str, float] = {}
    with contextlib.suppress(FileNotFoundError):
        for line in tool_log.read_text().splitlines():
            record = json.loads(line)
            if record["event"] == "start":
                starts[record["id"]] = record
            else:
                ends[record["id"]] = record["t"]
    runs = [Execution(r["tag"], r["pid"], r["t"], ends.get(i)) for i, r in starts.items()]
    return sorted(runs, key=lambda r: r.start)


async def first_run(tool_log: Path, tag: str, *, within: float = 10.0) -> Execution:
    """The first recorded run of `sleep` with `tag`, once it has started."""
    for _ in range(int(within / 0.01)):
        runs = [r for r in executions(tool_log) if r.tag == tag]
        if runs:
            return runs[0]
        await asyncio.sleep(0.01)
    raise AssertionError(f"no run of sleep tagged {tag!r} started within {within:g} s")


def max_overlap(runs: Iterable[Execution]) -> int:
    """The most runs in progress at one instant (an end before a start at the same time)."""
    points = sorted(
        [(r.start, 1) for r in runs] + [(r.end if r.end is not None else float("inf"), -1) for r in runs],
        key=lambda p: (p[0], p[1]),
    )
    level = peak = 0
    for _, step in points:
        level += step
        peak = max(peak, level)
    return peak


# -- calls and results over NATS ---------------------------------------------------------------


def new_call(
    tool: str,
    arguments: dict[str, Any] | str | None = None,
    *,
    case_key: str | None = None,
    timeout_s: float = 30.0,
    deadline: datetime | None = None,
) -> ToolCallRequest:
    """A call as a workflow's tool loop would send it (arguments as JSON text, or given as text)."""
    text = arguments if isinstance(arguments, str) else json.dumps(arguments or {})
    key = case_key or f"case-{uuid.uuid4().hex[:10]}"
    step = f"tool:{uuid.uuid4().hex[:8]}"
    return ToolCallRequest(
        call_id=uuid.uuid4().hex,
        case_key=key,
        step=step,
        tool=tool,
        tool_call_id=f"model-{uuid.uuid4().hex[:8]}",
        arguments=text,
        timeout_s=timeout_s,
        deadline=deadline,
    )


async def send_call(js: JetStreamContext, call: ToolCallRequest) -> None:
    """Publish the call on `tianshu.v1.tools.calls.<tool>` with Nats-Msg-Id = its call id."""
    await js.publish(
        subjects.tool_call(call.tool),
        call.model_dump_json().encode(),
        headers={subjects.HEADER_MSG_ID: call.call_id},
    )


async def reset_streams(js: JetStreamContext) -> None:
    """Delete the tool streams and the DLQ (their consumers with them): the next runner starts clean."""
    for stream in (subjects.STREAM_TOOLS, subjects.STREAM_TOOL_RESULTS, subjects.STREAM_DLQ):
        with contextlib.suppress(NotFoundError):
            await js.delete_stream(stream)


class StreamReader:
    """Everything stored on a subject of a stream, as it arrives (an ordered push consumer)."""

    def __init__(self, js: JetStreamContext, subject: str) -> None:
        self._js = js
        self.subject = subject
        self.messages: list[Msg] = []
        self._arrived = asyncio.Event()
        self._sub: JetStreamContext.PushSubscription | None = None

    async def __aenter__(self) -> Self:
        self._sub = await self._js.subscribe(self.subject, cb=self._on_message, ordered_consumer=True)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()

    async def _on_message(self, msg: Msg) -> None:
        self.messages.append(msg)
        self._arrived.set()

    async def until(self, done: Any, *, within: float, what: str) -> None:
        """Wait until `done()` is true (a safety net against a hang, not a performance limit)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        while not done():
            left = deadline - loop.time()
            if left <= 0:
                raise AssertionError(f"not after {within:g} s: {what}")
            self._arrived.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._arrived.wait(), min(left, 0.25))


class Results(StreamReader):
    """The tool results stored in TIANSHU_TOOL_RESULTS, by call id (repeats kept, to be counted)."""

    def __init__(self, js: JetStreamContext) -> None:
        super().__init__(js, subjects.TOOL_RESULTS)
        self.by_call: dict[str, list[ToolCallResult]] = {}

    async def _on_message(self, msg: Msg) -> None:
        result = TOOL_CALL_RESULT_ADAPTER.validate_json(msg.data)
        assert (msg.headers or {}).get(subjects.HEADER_MSG_ID) == result.call_id, msg.headers
        self.by_call.setdefault(result.call_id, []).append(result)
        await super()._on_message(msg)

    def of(self, call_id: str) -> list[ToolCallResult]:
        return self.by_call.get(call_id, [])

    async def wait(self, call_id: str, *, within: float = 30.0) -> ToolCallResult:
        """The first result of the call."""
        await self.until(lambda: call_id in self.by_call, within=within, what=f"a result of call {call_id}")
        return self.by_call[call_id][0]

    async def wait_all(self, call_ids: Iterable[str], *, within: float = 60.0) -> None:
        wanted = set(call_ids)
        await self.until(
            lambda: wanted <= self.by_call.keys(), within=within, what=f"results of {len(wanted)} calls"
        )


class DeadLetters(StreamReader):
    """The dead letters of tool calls (`tianshu.v1.dlq.tools.calls.>`)."""

    def __init__(self, js: JetStreamContext) -> None:
        super().__init__(js, subjects.dead_letter(f"{subjects.PREFIX}.tools.calls") + ".>")

    def all(self) -> list[DeadLetter]:
        return [DEAD_LETTER_ADAPTER.validate_json(m.data) for m in self.messages]
