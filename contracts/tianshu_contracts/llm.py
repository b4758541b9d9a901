"""The LLM types: what a workflow's tool loop and the LLM gateway speak.

A conversation is a list of `LlmMessage`; the model answers an `LlmRequest` with an `LlmResponse`
whose `tool_calls` ask for tools; each call is answered by a `ToolResult` sent back as a `tool`
message. Streaming replies are a sequence of `LlmStreamEvent`s. `LlmRequest`, `LlmResponse` and the
stream events carry a `kind` tag so they can travel on the gateway's subjects as they are; the
values nested in them (messages, calls, specs, usage, results) do not.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Mapping, Sequence
from typing import Annotated, Any, Literal

from pydantic import Field, JsonValue, TypeAdapter, model_validator

from ._base import Message, WireModel
from .errors import WireError

Role = Literal["system", "user", "assistant", "tool"]
"""Who speaks a message: `tool` messages carry one tool result back to the model."""

ToolName = Annotated[
    str,
    Field(
        pattern=r"^[A-Za-z0-9_-]+$",
        min_length=1,
        max_length=64,
        description="A tool's name: 1-64 characters of A-Z, a-z, 0-9, '_' or '-' (what LLM APIs accept; "
        "it also stands in the subject tianshu.v1.tools.calls.<tool>).",
    ),
]


class ToolCall(WireModel):
    """The model asks for a tool: `arguments` is JSON text, as the model wrote it (maybe invalid)."""

    id: str = Field(min_length=1, max_length=200, description="The model's id for this call.")
    name: str = Field(min_length=1, max_length=200)
    arguments: str = Field(default="{}", description="JSON text; validated against the tool's schema.")

    @classmethod
    def of(cls, id: str, name: str, arguments: Mapping[str, Any] | None = None) -> ToolCall:
        """A call with its arguments given as a mapping (encoded to JSON text)."""
        return cls(id=id, name=name, arguments=json.dumps(dict(arguments or {})))


def _empty_object_schema() -> dict[str, JsonValue]:
    return {"type": "object", "properties": {}}


class ToolSpec(WireModel):
    """A tool as the model sees it: name, description and a JSON Schema of its parameters."""

    name: ToolName
    description: str = ""
    parameters: dict[str, JsonValue] = Field(
        default_factory=_empty_object_schema,
        description="A JSON Schema (an object schema) for the call's arguments.",
    )


class ToolResult(WireModel):
    """A tool's answer to one call; `is_error` tells the model the call failed and why (`content`)."""

    call_id: str = Field(min_length=1, max_length=200, description="The id of the `ToolCall` it answers.")
    content: str
    is_error: bool = False


class LlmMessage(WireModel):
    """One message of a conversation.

    An assistant message may carry `tool_calls`; a `tool` message answers one of them and names it
    in `tool_call_id`, and says with `is_error` that the call failed (`content` says why), for the
    providers that tell the model so.
    """

    role: Role
    content: str = ""
    tool_calls: list[ToolCall] = Field(default_factory=list)
    tool_call_id: str | None = None
    is_error: bool = False

    @model_validator(mode="after")
    def _consistent(self) -> LlmMessage:
        if self.tool_calls and self.role != "assistant":
            raise ValueError("only assistant messages carry tool_calls")
        if (self.role == "tool") != (self.tool_call_id is not None):
            raise ValueError("a tool message needs a tool_call_id, and only a tool message has one")
        if self.is_error and self.role != "tool":
            raise ValueError("only a tool message can be an error")
        return self

    @classmethod
    def system(cls, content: str) -> LlmMessage:
        """A system message."""
        return cls(role="system", content=content)

    @classmethod
    def user(cls, content: str) -> LlmMessage:
        """A user message."""
        return cls(role="user", content=content)

    @classmethod
    def assistant(cls, content: str = "", tool_calls: Sequence[ToolCall] = ()) -> LlmMessage:
        """An assistant message, with the tool calls it asked for."""
        return cls(role="assistant", content=content, tool_calls=list(tool_calls))

    @classmethod
    def tool(cls, result: ToolResult) -> LlmMessage:
        """The `tool` message that carries `result` back to the model."""
        return cls(role="tool", content=result.content, tool_call_id=result.call_id, is_error=result.is_error)


class Usage(WireModel):
    """Tokens a model call used; `total_tokens` defaults to prompt + completion.

    `prompt_tokens` means the same for every provider: every input token, those read from or
    written to the provider's prompt cache included (as OpenAI counts them; an adapter whose API
    counts them apart, such as Anthropic's, adds them up). `cache_read_tokens` and
    `cache_write_tokens` say how many of them the cache served or stored.
    """

    prompt_tokens: int = Field(default=0, ge=0)
    completion_tokens: int = Field(default=0, ge=0)
    total_tokens: int = Field(default=0, ge=0)
    cache_read_tokens: int = Field(default=0, ge=0)
    cache_write_tokens: int = Field(default=0, ge=0)

    @model_validator(mode="before")
    @classmethod
    def _default_total(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("total_tokens") is None:
            data = {**data, "total_tokens": data.get("prompt_tokens", 0) + data.get("completion_tokens", 0)}
        return data

    def __add__(self, other: Usage) -> Usage:
        return Usage(
            prompt_tokens=self.prompt_tokens + other.prompt_tokens,
            completion_tokens=self.completion_tokens + other.completion_tokens,
            total_tokens=self.total_tokens + other.total_tokens,
            cache_read_tokens=self.cache_read_tokens + other.cache_read_tokens,
            cache_write_tokens=self.cache_write_tokens + other.cache_write_tokens,
        )


class LlmErrorClass(enum.StrEnum):
    """Why a model call failed, decided from the status, the error body and the SDK's exception."""

    TRANSIENT = "transient"
    """Timeouts, connection errors, 500, 502, 504: the same call may succeed after a backoff."""
    OVERLOADED = "overloaded"
    """429 rate limit, 503, 529, or a Retry-After longer than the cap: wait, or hand over."""
    QUOTA_EXHAUSTED = "quota_exhausted"
    """A 429 that says the account's quota or credit is spent: waiting does not help."""
    CREDENTIALS = "credentials"
    """401, 403: the key was refused."""
    PROMPT_TOO_LONG = "prompt_too_long"
    """The conversation does not fit the model's context window; the workflow must shorten it."""
    OUTPUT_TRUNCATED = "output_truncated"
    """The reply was cut at the token limit (`finish_reason` `length`)."""
    FATAL = "fatal"
    """400, 404, 422 and anything else that asking again cannot fix."""
    UNAVAILABLE = "unavailable"
    """No answer could be had at all (every provider failed, or no gateway answered in time)."""
    REQUEST_TOO_LARGE = "request_too_large"
    """The request is larger than the transport can carry."""


class LlmAttempt(WireModel):
    """One attempt of a model call: where it went, how it ended, and what it cost."""

    provider: str
    model: str
    error_class: LlmErrorClass | None = None
    """None when this attempt answered."""
    status: int | None = None
    usage: Usage = Field(default_factory=Usage)
    duration_s: float = Field(default=0.0, ge=0)


class LlmRequest(Message):
    """Ask a model for the next message of a conversation, offering it `tools`."""

    kind: Literal["llm_request"] = "llm_request"
    model: str = Field(min_length=1, max_length=200)
    system_prompt: str | None = None
    messages: list[LlmMessage] = Field(default_factory=list)
    temperature: float | None = Field(default=None, ge=0, le=2)
    max_tokens: int | None = Field(default=None, gt=0)
    tools: list[ToolSpec] = Field(default_factory=list)
    prompt_cache: bool = False
    """Ask the provider to cache the prompt's stable prefix (system prompt, tools, history) where
    caching must be asked for (Anthropic's `cache_control`); providers that cache by themselves
    (OpenAI) ignore it."""


class LlmResponse(Message):
    """A model's reply: text, tool calls (several per reply), usage and why it stopped.

    `finish_reason` is `stop`, `tool_calls` or `length` (cut at the token limit) for every
    provider (their own words are mapped to these), or the provider's word for anything else.
    `usage` is what the whole call cost: with retries or a fallback, the sum of every attempt's
    usage, failed attempts included; `attempts` lists them (empty for a provider that does not
    report them). `provider` and `model` say who answered.
    """

    kind: Literal["llm_response"] = "llm_response"
    content: str = ""
    tool_calls: list[ToolCall] = Field(default_factory=list)
    usage: Usage = Field(default_factory=Usage)
    finish_reason: str | None = None
    provider: str | None = None
    model: str | None = None
    attempts: list[LlmAttempt] = Field(default_factory=list)

    @classmethod
    def text(cls, content: str, usage: Usage | None = None) -> LlmResponse:
        """A plain-text reply (it ends a tool loop)."""
        return cls(content=content, finish_reason="stop", usage=usage or Usage())

    @classmethod
    def calls(cls, *tool_calls: ToolCall, content: str = "", usage: Usage | None = None) -> LlmResponse:
        """A reply that asks for tools."""
        return cls(
            content=content, tool_calls=list(tool_calls), finish_reason="tool_calls", usage=usage or Usage()
        )

    def message(self) -> LlmMessage:
        """This reply as the assistant message appended to the conversation."""
        return LlmMessage.assistant(self.content, self.tool_calls)


# Streaming -------------------------------------------------------------------------------------


class TextDelta(Message):
    """A piece of the reply's text, in order."""

    kind: Literal["text_delta"] = "text_delta"
    text: str


class ToolUse(Message):
    """A complete tool call of the reply (the gateway assembles a call's pieces before sending it)."""

    kind: Literal["tool_use"] = "tool_use"
    call: ToolCall


class UsageEvent(Message):
    """The tokens the call used (usually once, near the end)."""

    kind: Literal["usage"] = "usage"
    usage: Usage


class Done(Message):
    """The reply is complete."""

    kind: Literal["done"] = "done"
    finish_reason: str | None = None


class StreamError(Message):
    """The reply failed; nothing follows. `incomplete` is true when deltas went out before the
    failure: the caller has seen part of an answer and must ask again as a new attempt."""

    kind: Literal["stream_error"] = "stream_error"
    error: WireError
    error_class: LlmErrorClass = LlmErrorClass.FATAL
    incomplete: bool = False
    retry_after_s: float | None = Field(default=None, ge=0)
    """How long the provider asked to wait before the next attempt, if it said."""


LlmStreamEvent = Annotated[TextDelta | ToolUse | UsageEvent | Done | StreamError, Field(discriminator="kind")]
"""One event of a streamed reply."""

LLM_REQUEST_ADAPTER: TypeAdapter[LlmRequest] = TypeAdapter(LlmRequest)
LLM_RESPONSE_ADAPTER: TypeAdapter[LlmResponse] = TypeAdapter(LlmResponse)
LLM_STREAM_EVENT_ADAPTER: TypeAdapter[TextDelta | ToolUse | UsageEvent | Done | StreamError] = TypeAdapter(
    LlmStreamEvent
)
