"""Running LLM gateways as a user does (separate processes), and talking to them over NATS."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import uuid
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from tests._tool_runner import DeadLetters, StreamReader, ToolRunnerProcess
from tianshu_contracts import (
    LLM_CALL_RESULT_ADAPTER,
    LLM_STREAM_CHUNK_ADAPTER,
    LlmCallRequest,
    LlmCallResult,
    LlmStreamChunk,
    subjects,
)
from tianshu_contracts.llm import LlmMessage, LlmRequest, ToolSpec
from tianshu_core.bus import publish
from tianshu_core.llm import LlmInvocation

LLM_STREAMS = (
    subjects.STREAM_LLM,
    subjects.STREAM_LLM_RESULTS,
    subjects.STREAM_LLM_STREAM,
    subjects.STREAM_DLQ,
)


class GatewayProcess(ToolRunnerProcess):
    """One `python -m tianshu_llm_gateway` serving the providers file `config`; `start()` waits
    for its ready file (the rest of the life cycle is the tool runner's helper's)."""

    command = (sys.executable, "-m", "tianshu_llm_gateway")
    kind = "gateway"

    def __init__(self, workdir: Path, nats_url: str, config: Path, **env: str) -> None:
        super().__init__(workdir, nats_url, **env)
        self.env["TIANSHU_LLM_GATEWAY_CONFIG"] = str(config)
        self.env["TIANSHU_LLM_GATEWAY_NAME"] = self.name
        self.env["TIANSHU_LLM_GATEWAY_READY_FILE"] = str(self.ready_file)


def write_config(path: Path, config: Mapping[str, Any]) -> Path:
    """The providers file `config` as YAML at `path`."""
    path.write_text(yaml.safe_dump(dict(config), sort_keys=False))
    return path


def check_config(*args: str, env: Mapping[str, str]) -> subprocess.CompletedProcess[str]:
    """`python -m tianshu_llm_gateway --check-config ARGS...`, its output as text."""
    return subprocess.run(
        [*GatewayProcess.command, "--check-config", *args],
        env=dict(env),
        capture_output=True,
        text=True,
        timeout=60,
    )


# -- calls and results over NATS ---------------------------------------------------------------


def new_call(
    route: str,
    text: str = "hello",
    *,
    stream: bool = False,
    deadline: datetime | None = None,
    tools: Sequence[ToolSpec] = (),
) -> LlmCallRequest:
    """A model call as the scheduler's `NatsLlmClient` sends it."""
    invocation = LlmInvocation.of(f"case-{uuid.uuid4().hex[:10]}", f"llm:{uuid.uuid4().hex[:8]}")
    return LlmCallRequest(
        call_id=invocation.call_id,
        case_key=invocation.case_key,
        record=invocation.record,
        deadline=deadline,
        stream=stream,
        request=LlmRequest(model=route, messages=[LlmMessage.user(text)], tools=list(tools)),
    )


async def send_call(js: JetStreamContext, call: LlmCallRequest) -> None:
    """Publish the call on `tianshu.v1.llm.calls` with Nats-Msg-Id `<call_id>:<attempt>`."""
    await publish(js, subjects.LLM_CALLS, call, msg_id=f"{call.call_id}:{call.attempt}")


async def reset_streams(js: JetStreamContext) -> None:
    """Delete the LLM streams and the DLQ (their consumers with them): the next gateway starts clean."""
    for stream in LLM_STREAMS:
        with contextlib.suppress(NotFoundError):
            await js.delete_stream(stream)


class LlmResults(StreamReader):
    """The results stored in TIANSHU_LLM_RESULTS, by msg id `<call_id>:<attempt>` (repeats kept)."""

    def __init__(self, js: JetStreamContext) -> None:
        super().__init__(js, subjects.LLM_RESULTS)
        self.by_id: dict[str, list[LlmCallResult]] = {}

    async def _on_message(self, msg: Msg) -> None:
        result = LLM_CALL_RESULT_ADAPTER.validate_json(msg.data)
        msg_id = (msg.headers or {}).get(subjects.HEADER_MSG_ID)
        assert msg_id == f"{result.call_id}:{result.attempt}", msg.headers
        self.by_id.setdefault(msg_id, []).append(result)
        await super()._on_message(msg)

    def of(self, call: LlmCallRequest) -> list[LlmCallResult]:
        return self.by_id.get(f"{call.call_id}:{call.attempt}", [])

    async def wait(self, call: LlmCallRequest, *, within: float = 30.0) -> LlmCallResult:
        """The first result of the call."""
        await self.until(lambda: bool(self.of(call)), within=within, what=f"a result of call {call.call_id}")
        return self.of(call)[0]


class Chunks(StreamReader):
    """The stream events of one call (TIANSHU_LLM_STREAM), in the order stored."""

    def __init__(self, js: JetStreamContext, call: LlmCallRequest) -> None:
        super().__init__(js, subjects.llm_stream(call.case_key, call.call_id))

    def all(self) -> list[LlmStreamChunk]:
        return [LLM_STREAM_CHUNK_ADAPTER.validate_json(m.data) for m in self.messages]

    async def wait_end(self, *, within: float = 30.0) -> list[LlmStreamChunk]:
        """The chunks, once one carries a terminal event (Done or StreamError)."""

        def ended() -> bool:
            return any(c.event.kind in ("done", "stream_error") for c in self.all())

        await self.until(ended, within=within, what=f"the end of the stream on {self.subject}")
        return self.all()


class LlmDeadLetters(DeadLetters):
    """The dead letters of model calls (`tianshu.v1.dlq.llm.calls`)."""

    def __init__(self, js: JetStreamContext) -> None:
        StreamReader.__init__(self, js, subjects.dead_letter(subjects.LLM_CALLS))
