"""Tool calls sent to the tool runners, and their results.

A workflow's tool loop publishes a `ToolCallRequest` on `tianshu.v1.tools.calls.<tool>` (stream
TIANSHU_TOOLS, a work queue: every runner competes for the calls through one durable consumer).
A runner executes it and publishes a `ToolCallResult` on `tianshu.v1.tools.results.<case_key>`.

`call_id` is deterministic and unique across cases (the loop derives it from the case key and the
journal name the result is recorded under): it is the request's `Nats-Msg-Id`, the result's too,
and the key the result is recorded by, so however many times a call is delivered, its result is
recorded once. `tool_call_id` is the model's own id for the call, echoed in `result.call_id`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import AwareDatetime, Field, TypeAdapter

from ._base import CallId, CaseKey, Message
from .llm import ToolName, ToolResult


class ToolCallRequest(Message):
    """Run one tool call and publish its result on `tianshu.v1.tools.results.<case_key>`.

    `arguments` is the model's JSON text as it wrote it: the runner validates it against the tool's
    schema, and invalid arguments, an unknown tool, a timeout or an exception all become a result
    with `is_error` for the model, never a lost call. `timeout_s` bounds the run; past `deadline`
    (when set) nobody waits for the result any more and a runner may answer with an error at once.
    """

    kind: Literal["tool_call_request"] = "tool_call_request"
    call_id: CallId
    case_key: CaseKey
    step: str = Field(min_length=1, max_length=1000, description="The journal name the result goes under.")
    tool: ToolName
    tool_call_id: str = Field(min_length=1, max_length=200, description="The model's id for the call.")
    arguments: str = Field(default="{}", description="JSON text, as the model wrote it.")
    timeout_s: float = Field(gt=0, description="How long the tool may run.")
    deadline: AwareDatetime | None = None


class ToolCallResult(Message):
    """The result of a `ToolCallRequest`, from the runner that executed it."""

    kind: Literal["tool_call_result"] = "tool_call_result"
    call_id: CallId
    case_key: CaseKey
    step: str = Field(min_length=1, max_length=1000)
    result: ToolResult
    runner: str = Field(min_length=1, max_length=200, description="The runner's id.")
    duration_s: float = Field(ge=0, description="How long the tool ran.")


TOOL_CALL_REQUEST_ADAPTER: TypeAdapter[ToolCallRequest] = TypeAdapter(ToolCallRequest)
TOOL_CALL_RESULT_ADAPTER: TypeAdapter[ToolCallResult] = TypeAdapter(ToolCallResult)
