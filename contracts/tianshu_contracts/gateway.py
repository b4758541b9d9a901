"""Model calls sent to the LLM gateway, their results, and the stream events people follow.

A workflow's model call (in service mode) is published as an `LlmCallRequest` on
`tianshu.v1.llm.calls` (stream TIANSHU_LLM, a work queue every gateway replica competes for). A
gateway answers with an `LlmCallResult` on `tianshu.v1.llm.results.<case_key>` (stream
TIANSHU_LLM_RESULTS). While a streamed call runs, its events go out as `LlmStreamChunk`s on
`tianshu.v1.llm.stream.<case_key>.<call_id>` (stream TIANSHU_LLM_STREAM: memory storage, a short
max age), for people to follow; they are never stored in Postgres.

`call_id` is deterministic (a digest of the case key and the journal record the response goes
under): it is the request's `Nats-Msg-Id` together with the attempt (`<call_id>:<attempt>`), the
result's too, and the key the response is recorded by, so however often a call is delivered its
response is recorded once. `attempt` counts the times the scheduler sent the call (a re-send
after a deadline passed without a result is the next attempt).
"""

from __future__ import annotations

from typing import Literal

from pydantic import AwareDatetime, Field, TypeAdapter, model_validator

from ._base import CallId, CaseKey, Message, WireModel
from .errors import WireError
from .llm import LlmAttempt, LlmErrorClass, LlmRequest, LlmResponse, LlmStreamEvent


class LlmCallRequest(Message):
    """Ask the gateway for a model's reply to `request`; the route is `request.model`.

    Past `deadline` nobody waits for the answer any more: a gateway that gets the call later does
    not send it upstream. `stream` asks for the reply's events on the stream subject too.
    """

    kind: Literal["llm_call_request"] = "llm_call_request"
    call_id: CallId
    case_key: CaseKey
    record: str = Field(min_length=1, max_length=1000, description="The journal name of the response.")
    attempt: int = Field(default=1, ge=1)
    deadline: AwareDatetime | None = None
    stream: bool = False
    session_id: str | None = Field(default=None, max_length=200)
    workflow_code: str | None = Field(default=None, max_length=200)
    request: LlmRequest


class LlmCallResult(Message):
    """The answer to an `LlmCallRequest`: the `response`, or the `error` (its code is the
    `LlmErrorClass`) when no provider of the route answered. `attempts` lists every upstream
    attempt with its usage, failed ones included: together they are what the call cost."""

    kind: Literal["llm_call_result"] = "llm_call_result"
    call_id: CallId
    case_key: CaseKey
    record: str = Field(min_length=1, max_length=1000)
    attempt: int = Field(default=1, ge=1)
    route: str = Field(min_length=1, max_length=200)
    response: LlmResponse | None = None
    error: WireError | None = None
    error_class: LlmErrorClass | None = None
    attempts: list[LlmAttempt] = Field(default_factory=list)
    gateway: str = Field(min_length=1, max_length=200, description="The gateway replica that answered.")
    duration_s: float = Field(default=0.0, ge=0)
    first_token_s: float | None = Field(default=None, ge=0, description="Time to the first delta (streamed).")
    cost_usd: float | None = Field(default=None, ge=0, description="Estimated from the route's prices.")

    @model_validator(mode="after")
    def _one_outcome(self) -> LlmCallResult:
        if (self.response is None) == (self.error is None):
            raise ValueError("a result carries either a response or an error")
        return self


class LlmStreamChunk(Message):
    """One event of a streamed call, in order (`seq` from 1 within the attempt). A failed
    attempt's events are followed by the next attempt's, whose `attempt` is one higher: a reader
    drops the partial text of the attempt that ended in an incomplete `StreamError`."""

    kind: Literal["llm_stream_chunk"] = "llm_stream_chunk"
    call_id: CallId
    case_key: CaseKey
    attempt: int = Field(default=1, ge=1)
    seq: int = Field(ge=1)
    event: LlmStreamEvent


class UsageSummary(WireModel):
    """Tokens and estimated cost summed over model calls."""

    calls: int = 0
    attempts: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0
    cost_usd: float = 0.0


LLM_CALL_REQUEST_ADAPTER: TypeAdapter[LlmCallRequest] = TypeAdapter(LlmCallRequest)
LLM_CALL_RESULT_ADAPTER: TypeAdapter[LlmCallResult] = TypeAdapter(LlmCallResult)
LLM_STREAM_CHUNK_ADAPTER: TypeAdapter[LlmStreamChunk] = TypeAdapter(LlmStreamChunk)
