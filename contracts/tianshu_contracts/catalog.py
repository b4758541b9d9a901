"""The channels: which message travels on which subject, in which stream, sent or received by whom.

The AsyncAPI document is generated from this table, and `template_of` gives spans and logs a
low-cardinality name for a concrete subject.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, JsonValue, TypeAdapter

from . import subjects
from .cases import (
    CASE_COMMAND_ADAPTER,
    CASE_FINISHED_ADAPTER,
    CASE_UPDATED_ADAPTER,
    GET_CASE_ADAPTER,
    GET_CASE_REPLY_ADAPTER,
    LIST_CASES_ADAPTER,
    LIST_CASES_REPLY_ADAPTER,
    START_CASE_ADAPTER,
    START_CASE_REPLY_ADAPTER,
    CancelCase,
    CaseFinished,
    CaseFound,
    CaseNotFound,
    CasesPage,
    CaseUpdated,
    GetCase,
    ListCases,
    PauseCase,
    RequestRefused,
    ResumeCase,
    StartCase,
    StartCaseAccepted,
)
from .dead_letters import DEAD_LETTER_ADAPTER, REFUSAL_ADAPTER, DeadLetter, Refusal
from .gateway import (
    LLM_CALL_REQUEST_ADAPTER,
    LLM_CALL_RESULT_ADAPTER,
    LLM_STREAM_CHUNK_ADAPTER,
    LlmCallRequest,
    LlmCallResult,
    LlmStreamChunk,
)
from .tools import TOOL_CALL_REQUEST_ADAPTER, TOOL_CALL_RESULT_ADAPTER, ToolCallRequest, ToolCallResult

EVENT_PAYLOAD_ADAPTER: TypeAdapter[JsonValue] = TypeAdapter(JsonValue)
"""An outside event's body: any JSON (the subject names the resource)."""

_PARAM = re.compile(r"\{([a-z_]+)\}")


@dataclass(frozen=True)
class Channel:
    """One subject (or subject family) and what travels on it."""

    id: str
    address: str | None
    """The subject, with `{param}` for a variable token; None for a request's reply inbox."""
    description: str
    messages: tuple[type[BaseModel], ...]
    """The models it carries; empty for the outside events, whose body is the publisher's JSON."""
    adapter: TypeAdapter[Any]
    action: Literal["send", "receive"]
    """From Tianshu's side: `receive` what clients send it, `send` what it publishes."""
    stream: str | None = None
    reply: str | None = None
    """The id of the channel a request's reply travels on."""
    parameters: dict[str, str] = field(default_factory=dict)

    @property
    def pattern(self) -> str | None:
        """The address as a NATS subject pattern (each parameter becomes `*`)."""
        return None if self.address is None else _PARAM.sub("*", self.address)


CHANNELS: tuple[Channel, ...] = (
    Channel(
        id="casesStart",
        address=subjects.CASES_START,
        description="Start a case, fire and forget. A refusal is dead-lettered and announced on "
        "tianshu.v1.errors.cases.start.",
        messages=(StartCase,),
        adapter=START_CASE_ADAPTER,
        action="receive",
        stream=subjects.STREAM_CASES,
    ),
    Channel(
        id="caseCommand",
        address=f"{subjects.PREFIX}.cases.{{case_key}}.command",
        description="Cancel, pause or resume a case. The body's case_key must equal the subject's.",
        messages=(CancelCase, PauseCase, ResumeCase),
        adapter=CASE_COMMAND_ADAPTER,
        action="receive",
        stream=subjects.STREAM_CASES,
        parameters={"case_key": "The case's key."},
    ),
    Channel(
        id="event",
        address=f"{subjects.PREFIX}.events.{{resource_type}}.{{resource_id}}",
        description="An outside event on a resource; the body is the publisher's own JSON, and its "
        "Nats-Msg-Id header, when set, is the event id (a repeat within the retention is a no-op).",
        messages=(),
        adapter=EVENT_PAYLOAD_ADAPTER,
        action="receive",
        stream=subjects.STREAM_EVENTS,
        parameters={
            "resource_type": "A plain token: A-Z, a-z, 0-9, '_' or '-'.",
            "resource_id": "The resource id, as tokens.encode_token encodes it.",
        },
    ),
    Channel(
        id="rpcCasesStart",
        address=subjects.RPC_CASES_START,
        description="Start a case and learn its key (request and reply; no stream).",
        messages=(StartCase,),
        adapter=START_CASE_ADAPTER,
        action="receive",
        reply="rpcCasesStartReply",
    ),
    Channel(
        id="rpcCasesStartReply",
        address=None,
        description="The reply to a start request, on the requester's inbox.",
        messages=(StartCaseAccepted, RequestRefused),
        adapter=START_CASE_REPLY_ADAPTER,
        action="send",
    ),
    Channel(
        id="rpcCasesGet",
        address=subjects.RPC_CASES_GET,
        description="Read a case (request and reply; no stream).",
        messages=(GetCase,),
        adapter=GET_CASE_ADAPTER,
        action="receive",
        reply="rpcCasesGetReply",
    ),
    Channel(
        id="rpcCasesGetReply",
        address=None,
        description="The reply to a get request, on the requester's inbox.",
        messages=(CaseFound, CaseNotFound, RequestRefused),
        adapter=GET_CASE_REPLY_ADAPTER,
        action="send",
    ),
    Channel(
        id="rpcCasesList",
        address=subjects.RPC_CASES_LIST,
        description="List cases, a page at a time (request and reply; no stream).",
        messages=(ListCases,),
        adapter=LIST_CASES_ADAPTER,
        action="receive",
        reply="rpcCasesListReply",
    ),
    Channel(
        id="rpcCasesListReply",
        address=None,
        description="The reply to a list request, on the requester's inbox.",
        messages=(CasesPage, RequestRefused),
        adapter=LIST_CASES_REPLY_ADAPTER,
        action="send",
    ),
    Channel(
        id="caseUpdated",
        address=f"{subjects.PREFIX}.cases.{{case_key}}.updated",
        description="A case changed state (core NATS, not stored).",
        messages=(CaseUpdated,),
        adapter=CASE_UPDATED_ADAPTER,
        action="send",
        parameters={"case_key": "The case's key."},
    ),
    Channel(
        id="caseFinished",
        address=f"{subjects.PREFIX}.cases.{{case_key}}.finished",
        description="A case ended, failed or was cancelled (core NATS, not stored): subscribe, then "
        "read the case, to await its output without a race.",
        messages=(CaseFinished,),
        adapter=CASE_FINISHED_ADAPTER,
        action="send",
        parameters={"case_key": "The case's key."},
    ),
    Channel(
        id="errors",
        address=f"{subjects.PREFIX}.errors.{{origin}}",
        description="Why a message was refused (core NATS, not stored). The origin is the refused "
        "message's subject without its tianshu.v1. prefix, and may span several tokens.",
        messages=(Refusal,),
        adapter=REFUSAL_ADAPTER,
        action="send",
        parameters={"origin": "The refused message's subject without tianshu.v1. (one or more tokens)."},
    ),
    Channel(
        id="deadLetters",
        address=f"{subjects.PREFIX}.dlq.{{origin}}",
        description="Messages that could not be handled, with the reason (kept in TIANSHU_DLQ).",
        messages=(DeadLetter,),
        adapter=DEAD_LETTER_ADAPTER,
        action="send",
        stream=subjects.STREAM_DLQ,
        parameters={"origin": "The original subject without tianshu.v1. (one or more tokens)."},
    ),
    Channel(
        id="toolCalls",
        address=f"{subjects.PREFIX}.tools.calls.{{tool}}",
        description="A tool call for any tool runner (TIANSHU_TOOLS is a work queue: one shared durable "
        "consumer, each call acknowledged by the runner that recorded its result). Nats-Msg-Id is the "
        "call_id, so a repeat within the duplicate window is dropped.",
        messages=(ToolCallRequest,),
        adapter=TOOL_CALL_REQUEST_ADAPTER,
        action="send",
        stream=subjects.STREAM_TOOLS,
        parameters={"tool": "The tool's name."},
    ),
    Channel(
        id="toolResults",
        address=f"{subjects.PREFIX}.tools.results.{{case_key}}",
        description="The result of a tool call made by the case; Nats-Msg-Id is the call_id, and the "
        "result is recorded once per call_id however often it is delivered.",
        messages=(ToolCallResult,),
        adapter=TOOL_CALL_RESULT_ADAPTER,
        action="receive",
        stream=subjects.STREAM_TOOL_RESULTS,
        parameters={"case_key": "The key of the case that made the call."},
    ),
    Channel(
        id="llmCalls",
        address=subjects.LLM_CALLS,
        description="A model call for any LLM gateway (TIANSHU_LLM is a work queue: one shared durable "
        "consumer). Nats-Msg-Id is '<call_id>:<attempt>': a redelivery is dropped, a new attempt is not.",
        messages=(LlmCallRequest,),
        adapter=LLM_CALL_REQUEST_ADAPTER,
        action="send",
        stream=subjects.STREAM_LLM,
    ),
    Channel(
        id="llmResults",
        address=f"{subjects.PREFIX}.llm.results.{{case_key}}",
        description="The answer to a model call made by the case: a response or an error with its "
        "class, and every upstream attempt's usage. Recorded once per call_id.",
        messages=(LlmCallResult,),
        adapter=LLM_CALL_RESULT_ADAPTER,
        action="receive",
        stream=subjects.STREAM_LLM_RESULTS,
        parameters={"case_key": "The key of the case that made the call."},
    ),
    Channel(
        id="llmStream",
        address=f"{subjects.PREFIX}.llm.stream.{{case_key}}.{{call_id}}",
        description="The events of a streamed model call, in order, for people to follow "
        "(TIANSHU_LLM_STREAM: memory storage, kept minutes); never stored in Postgres.",
        messages=(LlmStreamChunk,),
        adapter=LLM_STREAM_CHUNK_ADAPTER,
        action="receive",
        stream=subjects.STREAM_LLM_STREAM,
        parameters={"case_key": "The key of the case that made the call.", "call_id": "The call's id."},
    ),
)

MESSAGES: tuple[type[BaseModel], ...] = tuple(dict.fromkeys(m for c in CHANNELS for m in c.messages))
"""Every message model, once, in channel order."""

_MULTI_TOKEN = {"errors", "deadLetters"}


def _patterns() -> tuple[tuple[tuple[str, ...], Channel], ...]:
    out = []
    for channel in CHANNELS:
        pattern = channel.pattern
        if pattern is None:
            continue
        if channel.id in _MULTI_TOKEN:
            pattern = pattern.removesuffix("*") + ">"
        out.append((tuple(pattern.split(".")), channel))
    return tuple(out)


# Split once: every message published or consumed names its span after its channel.
_PATTERNS = _patterns()


def channel_of(subject: str) -> Channel | None:
    """The channel a concrete subject belongs to, or None."""
    tokens = subject.split(".")
    for pattern, channel in _PATTERNS:
        if _matches(pattern, tokens):
            return channel
    return None


def _matches(pattern: tuple[str, ...], tokens: list[str]) -> bool:
    """`subjects.matches` on split subjects: `*` is one token, a final `>` one or more."""
    for i, token in enumerate(pattern):
        if token == ">":
            return len(tokens) > i
        if i >= len(tokens) or (token != "*" and token != tokens[i]):
            return False
    return len(pattern) == len(tokens)


@functools.lru_cache(maxsize=4096)
def template_of(subject: str) -> str:
    """A low-cardinality name for `subject` (its channel's address), for span names and metrics."""
    channel = channel_of(subject)
    return channel.address if channel is not None and channel.address is not None else subject
