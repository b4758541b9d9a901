"""`OpenAiProvider`: any OpenAI-compatible chat completions API (OpenAI, Ollama, vLLM, Doubao)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Unpack

import openai

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
from ._sdk import SdkOptions, SdkProvider, retry_after, status_class

# OpenAI's words for why a reply stopped, as every provider reports them here.
_FINISH = {"stop": "stop", "tool_calls": "tool_calls", "function_call": "tool_calls", "length": "length"}


class OpenAiProvider(SdkProvider[openai.AsyncOpenAI]):
    """Chat completions on the `openai` SDK, for any OpenAI-compatible `base_url`.

    Tools go in the function shape, several tool calls per reply come back, tool results are
    sent with their call ids; the system prompt, temperature and max tokens pass through.
    Streams assemble several tool calls by index from arguments split across chunks, always ask
    for usage, and treat an error inside a 200 stream, or a stream that ends without a finish
    reason, as a failure, never as a short answer.

        OpenAiProvider(api_keys=[os.environ["OPENAI_API_KEY"]])
        OpenAiProvider(name="ollama", base_url="http://localhost:11434/v1", api_keys=["ollama"])
    """

    kind = "openai"

    def __init__(
        self, *, api_keys: Sequence[str], name: str = "openai", **options: Unpack[SdkOptions]
    ) -> None:
        super().__init__(name=name, api_keys=api_keys, **options)

    def _client(self, api_key: str) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(
            api_key=api_key, base_url=self.base_url, max_retries=0, timeout=self.timeout_s
        )

    async def _complete(self, client: openai.AsyncOpenAI, request: LlmRequest, model: str) -> LlmResponse:
        reply = await client.chat.completions.create(**_body(request, model))
        if not reply.choices:
            raise LlmError("the reply holds no choice", error_class=LlmErrorClass.TRANSIENT)
        choice = reply.choices[0]
        calls = [
            ToolCall(id=c.id, name=c.function.name, arguments=c.function.arguments or "{}")
            for c in choice.message.tool_calls or []
            if c.type == "function"
        ]
        return LlmResponse(
            content=choice.message.content or "",
            tool_calls=calls,
            usage=_usage(reply.usage),
            finish_reason=_finish(choice.finish_reason),
        )

    async def _stream(
        self, client: openai.AsyncOpenAI, request: LlmRequest, model: str
    ) -> AsyncIterator[LlmStreamEvent]:
        body = {**_body(request, model), "stream": True, "stream_options": {"include_usage": True}}
        chunks = await client.chat.completions.create(**body)
        calls: dict[int, _PartialCall] = {}
        finish: str | None = None
        usage: Usage | None = None
        async with chunks:
            async for chunk in chunks:
                if chunk.choices is None:
                    # Not a chunk: an `event: error` whose data is the error object itself (the
                    # SDK raises only for `{"error": ...}`).
                    text = _body_text(chunk.model_extra or {}) or "an error event with no message"
                    raise LlmError(
                        f"error in the stream: {text}", error_class=status_class(None, text.lower())
                    )
                if chunk.usage is not None:
                    usage = _usage(chunk.usage)
                for choice in chunk.choices:
                    delta = choice.delta
                    if delta.content:
                        yield TextDelta(text=delta.content)
                    for piece in delta.tool_calls or []:
                        partial = calls.setdefault(piece.index, _PartialCall())
                        partial.id = partial.id or piece.id or ""
                        if piece.function is not None:
                            partial.name = partial.name or piece.function.name or ""
                            partial.arguments.append(piece.function.arguments or "")
                    if choice.finish_reason:
                        finish = choice.finish_reason
        if finish is None:
            raise LlmError("the stream ended without a finish reason", error_class=LlmErrorClass.TRANSIENT)
        for index in sorted(calls):
            yield ToolUse(call=calls[index].call(index))
        yield UsageEvent(usage=usage or Usage())
        yield Done(finish_reason=_finish(finish))

    def _classify(self, exc: Exception) -> LlmError:
        if isinstance(exc, openai.APITimeoutError):
            return LlmError("timed out", error_class=LlmErrorClass.TRANSIENT)
        if isinstance(exc, openai.APIConnectionError):
            return LlmError(f"connection failed: {exc}", error_class=LlmErrorClass.TRANSIENT)
        if isinstance(exc, openai.APIStatusError):
            text = _body_text(exc.body) or exc.message
            return LlmError(
                f"{exc.status_code}: {text}",
                error_class=status_class(exc.status_code, text.lower()),
                status=exc.status_code,
                retry_after_s=retry_after(dict(exc.response.headers)),
            )
        if isinstance(exc, openai.APIError):  # an error inside a 200 stream
            text = _body_text(exc.body) or exc.message
            return LlmError(f"error in the stream: {text}", error_class=status_class(None, text.lower()))
        return LlmError(f"{type(exc).__name__}: {exc}", error_class=LlmErrorClass.FATAL)


@dataclass
class _PartialCall:
    id: str = ""
    name: str = ""
    arguments: list[str] = field(default_factory=list)

    def call(self, index: int) -> ToolCall:
        return ToolCall(
            id=self.id or f"call_{index}", name=self.name, arguments="".join(self.arguments) or "{}"
        )


def _body(request: LlmRequest, model: str) -> dict[str, Any]:
    body: dict[str, Any] = {"model": model, "messages": _messages(request)}
    if request.tools:
        body["tools"] = [
            {
                "type": "function",
                "function": {"name": t.name, "description": t.description, "parameters": t.parameters},
            }
            for t in request.tools
        ]
    if request.temperature is not None:
        body["temperature"] = request.temperature
    if request.max_tokens is not None:
        body["max_tokens"] = request.max_tokens
    return body


def _messages(request: LlmRequest) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    if request.system_prompt:
        out.append({"role": "system", "content": request.system_prompt})
    out.extend(_message(m) for m in request.messages)
    return out


def _message(message: LlmMessage) -> dict[str, Any]:
    if message.role == "tool":
        return {"role": "tool", "tool_call_id": message.tool_call_id, "content": message.content}
    if message.role == "assistant" and message.tool_calls:
        return {
            "role": "assistant",
            "content": message.content or None,
            "tool_calls": [
                {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                for c in message.tool_calls
            ],
        }
    return {"role": message.role, "content": message.content}


def _usage(usage: Any) -> Usage:
    if usage is None:
        return Usage()
    details = getattr(usage, "prompt_tokens_details", None)
    cached = getattr(details, "cached_tokens", None) or 0
    return Usage(
        prompt_tokens=usage.prompt_tokens or 0,
        completion_tokens=usage.completion_tokens or 0,
        total_tokens=usage.total_tokens or 0,
        cache_read_tokens=cached,
    )


def _finish(reason: str | None) -> str | None:
    return _FINISH.get(reason, reason) if reason else reason


def _body_text(body: object) -> str:
    """The message of an OpenAI error body (`{"error": {...}}` or the error object itself)."""
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict):
            parts = [str(inner.get(k)) for k in ("code", "type", "message") if inner.get(k)]
            return ": ".join(dict.fromkeys(parts))
        return json.dumps(body)[:2000]
    return str(body)[:2000] if body else ""
