"""`AnthropicProvider`: Anthropic's Messages API."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any, Unpack

import anthropic
import httpx2

from tianshu_contracts.llm import (
    Done,
    LlmErrorClass,
    LlmMessage,
    LlmRequest,
    LlmResponse,
    LlmStreamEvent,
    TextDelta,
    ToolCall,
    ToolUse,
    Usage,
    UsageEvent,
)

from ._errors import LlmError
from ._sdk import SdkOptions, SdkProvider, retry_after, status_class, transport_error

DEFAULT_MAX_TOKENS = 4096
"""The `max_tokens` asked for when the request sets none (Anthropic requires one)."""

# Anthropic's words for why a reply stopped, as every provider reports them here.
_STOP = {"end_turn": "stop", "stop_sequence": "stop", "tool_use": "tool_calls", "max_tokens": "length"}
_CACHE = {"type": "ephemeral"}


class AnthropicProvider(SdkProvider[anthropic.AsyncAnthropic]):
    """Messages on the `anthropic` SDK.

    The system prompt (and any `system` message) goes in `system`; tool calls are `tool_use`
    blocks and tool results `tool_result` blocks, consecutive ones in one user turn, as Anthropic
    wants turns to alternate. `max_tokens` is the request's, else `default_max_tokens`.
    `prompt_cache=True` marks the system prompt, the last tool and the last message block
    `cache_control: ephemeral`. Usage counts cached tokens in `prompt_tokens`, as OpenAI does.
    Streams assemble each tool call's input from its pieces, and treat an `error` event, or a
    stream that ends without `message_stop`, as a failure, never as a short answer.

        AnthropicProvider(api_keys=[os.environ["ANTHROPIC_API_KEY"]], model="claude-sonnet-4-5")

    The other options (`base_url`, `model`, `max_concurrency`, `timeout_s`, `context_window`)
    are `SdkProvider`'s.
    """

    kind = "anthropic"

    def __init__(
        self,
        *,
        api_keys: Sequence[str],
        name: str = "anthropic",
        default_max_tokens: int = DEFAULT_MAX_TOKENS,
        **options: Unpack[SdkOptions],
    ) -> None:
        if default_max_tokens < 1:
            raise ValueError(f"provider {name!r}: default_max_tokens must be at least 1")
        self.default_max_tokens = default_max_tokens
        super().__init__(name=name, api_keys=api_keys, **options)

    def _client(self, api_key: str) -> anthropic.AsyncAnthropic:
        return anthropic.AsyncAnthropic(
            api_key=api_key,
            base_url=self.base_url,
            max_retries=0,
            timeout=self.timeout_s,
            http_client=anthropic.DefaultAioHttpClient(),
        )

    async def _complete(
        self, client: anthropic.AsyncAnthropic, request: LlmRequest, model: str
    ) -> LlmResponse:
        return _response(await client.messages.create(**self._body(request, model)))

    async def _stream(
        self, client: anthropic.AsyncAnthropic, request: LlmRequest, model: str
    ) -> AsyncIterator[LlmStreamEvent]:
        events: anthropic.AsyncStream[anthropic.types.RawMessageStreamEvent] = await client.messages.create(
            **self._body(request, model), stream=True
        )
        calls: dict[int, tuple[ToolCall, list[str]]] = {}  # by block index: the call, its input's pieces
        usage = _UsageSoFar()
        stop: str | None = None
        async with events:
            async for event in events:
                if event.type == "message_start":
                    usage.read(event.message.usage)
                elif event.type == "content_block_start" and event.content_block.type == "tool_use":
                    block = event.content_block
                    calls[event.index] = (ToolCall(id=block.id, name=block.name), [])
                elif event.type == "content_block_delta":
                    if event.delta.type == "text_delta" and event.delta.text:
                        yield TextDelta(text=event.delta.text)
                    elif event.delta.type == "input_json_delta" and event.index in calls:
                        calls[event.index][1].append(event.delta.partial_json)
                elif event.type == "content_block_stop" and event.index in calls:
                    call, pieces = calls.pop(event.index)
                    yield ToolUse(call=call.model_copy(update={"arguments": "".join(pieces) or "{}"}))
                elif event.type == "message_delta":
                    usage.read(event.usage)
                    stop = event.delta.stop_reason or stop
                elif event.type == "message_stop":
                    yield UsageEvent(usage=usage.total())
                    yield Done(finish_reason=_finish(stop))
                    return
        raise LlmError("the stream ended without a finish reason", error_class=LlmErrorClass.TRANSIENT)

    def _classify(self, exc: Exception) -> LlmError:
        # APITimeoutError among them. The SDK does not wrap a connection lost in the middle of a
        # stream: httpx2's error comes.
        if isinstance(exc, anthropic.APIConnectionError | httpx2.TransportError):
            return transport_error(exc)
        if not isinstance(exc, anthropic.APIError):
            return LlmError(f"{type(exc).__name__}: {exc}", error_class=LlmErrorClass.FATAL)
        if not isinstance(exc, anthropic.APIStatusError):  # a reply the SDK could not read
            return LlmError(exc.message, error_class=status_class(None, exc.message.lower()))
        text = ": ".join(p for p in (exc.type, exc.api_message) if p) or exc.message
        if exc.status_code < 400:  # an `error` event inside a 200 stream: its type says what it is
            return LlmError(
                f"error in the stream: {text}", error_class=status_class(None, (exc.type or text).lower())
            )
        status, headers = exc.status_code, dict(exc.response.headers)
        kind = status_class(status, text.lower())
        return LlmError(
            f"{status}: {text}", error_class=kind, status=status, retry_after_s=retry_after(headers)
        )

    def _body(self, request: LlmRequest, model: str) -> dict[str, Any]:
        cache = request.prompt_cache
        body: dict[str, Any] = {
            "model": model,
            "max_tokens": request.max_tokens or self.default_max_tokens,
            "messages": _messages(request.messages, cache=cache),
        }
        system = "\n\n".join(
            text
            for text in [request.system_prompt, *(m.content for m in request.messages if m.role == "system")]
            if text
        )
        if system:
            body["system"] = [_cached({"type": "text", "text": system}, cache)]
        if request.tools:
            tools = [
                {"name": t.name, "description": t.description, "input_schema": t.parameters}
                for t in request.tools
            ]
            tools[-1] = _cached(tools[-1], cache)
            body["tools"] = tools
        if request.temperature is not None:
            # The SDK's `create` has no `temperature` argument (2.x); the API still takes it.
            body["extra_body"] = {"temperature": request.temperature}
        return body


@dataclass
class _UsageSoFar:
    """A stream's usage: message_start gives the input side, message_delta the running totals."""

    input: int = 0
    output: int = 0
    cache_read: int = 0
    cache_write: int = 0

    def read(self, usage: anthropic.types.Usage | anthropic.types.MessageDeltaUsage) -> None:
        self.input = _count(usage.input_tokens, self.input)
        self.output = _count(usage.output_tokens, self.output)
        self.cache_read = _count(usage.cache_read_input_tokens, self.cache_read)
        self.cache_write = _count(usage.cache_creation_input_tokens, self.cache_write)

    def total(self) -> Usage:
        return Usage(
            prompt_tokens=self.input + self.cache_read + self.cache_write,
            completion_tokens=self.output,
            cache_read_tokens=self.cache_read,
            cache_write_tokens=self.cache_write,
        )


def _response(reply: anthropic.types.Message) -> LlmResponse:
    text = [block.text for block in reply.content if block.type == "text"]
    calls = [
        ToolCall(id=block.id, name=block.name, arguments=json.dumps(block.input))
        for block in reply.content
        if block.type == "tool_use"
    ]
    return LlmResponse(
        content="".join(text),
        tool_calls=calls,
        usage=_usage(reply.usage),
        finish_reason=_finish(reply.stop_reason),
    )


def _count(value: int | None, default: int) -> int:
    return default if value is None else value


def _usage(usage: anthropic.types.Usage) -> Usage:
    so_far = _UsageSoFar()
    so_far.read(usage)
    return so_far.total()


def _cached(block: dict[str, Any], cache: bool) -> dict[str, Any]:
    return {**block, "cache_control": _CACHE} if cache else block


def _messages(messages: Sequence[LlmMessage], *, cache: bool) -> list[dict[str, Any]]:
    """The conversation as Anthropic turns: a turn's blocks together, roles alternating."""
    out: list[dict[str, Any]] = []
    for message in messages:
        if message.role == "system":
            continue  # in `system`
        role = "assistant" if message.role == "assistant" else "user"
        blocks = _blocks(message)
        if not blocks:
            continue  # Anthropic refuses empty text; an empty message says nothing anyway
        if out and out[-1]["role"] == role:
            out[-1]["content"].extend(blocks)
        else:
            out.append({"role": role, "content": blocks})
    if cache and out:
        last = out[-1]["content"]
        last[-1] = _cached(last[-1], cache)
    return out


def _blocks(message: LlmMessage) -> list[dict[str, Any]]:
    if message.role == "tool":
        return [
            {
                "type": "tool_result",
                "tool_use_id": message.tool_call_id,
                "content": message.content,
                "is_error": message.is_error,
            }
        ]
    blocks: list[dict[str, Any]] = []
    if message.content:
        blocks.append({"type": "text", "text": message.content})
    blocks.extend(
        {"type": "tool_use", "id": c.id, "name": c.name, "input": _input(c.arguments)}
        for c in message.tool_calls
    )
    return blocks


def _input(arguments: str) -> dict[str, Any]:
    """A tool call's arguments as the object Anthropic wants; `{"_raw": text}` if they are not one."""
    try:
        value = json.loads(arguments)
    except ValueError:
        value = None
    return value if isinstance(value, dict) else {"_raw": arguments}


def _finish(reason: str | None) -> str | None:
    return _STOP.get(reason, reason) if reason else reason
