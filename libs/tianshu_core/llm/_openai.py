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
from ._sdk import SdkOptions, SdkProvider, retry_after, status_class, transport_error

_PATH = "/chat/completions"
# OpenAI's words for why a reply stopped, as every provider reports them here.
_FINISH = {"stop": "stop", "tool_calls": "tool_calls", "function_call": "tool_calls", "length": "length"}


class OpenAiProvider(SdkProvider[openai.AsyncOpenAI]):
    """Chat completions on the `openai` SDK, for any OpenAI-compatible `base_url`.

    Tools go in the function shape, several tool calls per reply come back, tool results are
    sent with their call ids; the system prompt, temperature and max tokens pass through.
    Streams assemble several tool calls by index from arguments split across chunks, always ask
    for usage, and treat an error inside a 200 stream, or a stream that ends without a finish
    reason, as a failure, never as a short answer.

    The request body is built here already in the API's wire shape, so it goes out through the
    SDK's own request path (`client.post`: its authentication, headers, timeouts, error classes
    and SSE reader) without the typed `chat.completions.create` layer, whose per-call walk of the
    parameters' type hints and model building of the reply cost more than the HTTP exchange on
    a local model; and over the SDK's aiohttp transport (`DefaultAioHttpClient`).

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
            api_key=api_key,
            base_url=self.base_url,
            max_retries=0,
            timeout=self.timeout_s,
            http_client=openai.DefaultAioHttpClient(),
        )

    async def _complete(self, client: openai.AsyncOpenAI, request: LlmRequest, model: str) -> LlmResponse:
        reply = await client.post(_PATH, body=_body(request, model), cast_to=object)
        choices = _field(reply, "choices")
        if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
            raise LlmError("the reply holds no choice", error_class=LlmErrorClass.TRANSIENT)
        choice = choices[0]
        message = _field(choice, "message")
        return LlmResponse(
            content=_field(message, "content") or "",
            tool_calls=_tool_calls(_field(message, "tool_calls")),
            usage=_usage(_field(reply, "usage")),
            finish_reason=_finish(_field(choice, "finish_reason")),
        )

    async def _stream(
        self, client: openai.AsyncOpenAI, request: LlmRequest, model: str
    ) -> AsyncIterator[LlmStreamEvent]:
        body = {**_body(request, model), "stream": True, "stream_options": {"include_usage": True}}
        chunks = await client.post(
            _PATH, body=body, cast_to=object, stream=True, stream_cls=openai.AsyncStream[object]
        )
        calls: dict[int, _PartialCall] = {}
        finish: str | None = None
        usage: Usage | None = None
        async with chunks:
            async for chunk in chunks:
                if not isinstance(chunk, dict) or not isinstance(chunk.get("choices", []), list):
                    raise LlmError(
                        f"a malformed chunk: {str(chunk)[:200]}", error_class=LlmErrorClass.TRANSIENT
                    )
                if "choices" not in chunk and "usage" not in chunk:
                    # Not a chunk: an `event: error` whose data is the error object itself (the
                    # SDK raises only for `{"error": ...}`).
                    text = _body_text(chunk) or "an error event with no message"
                    raise LlmError(
                        f"error in the stream: {text}", error_class=status_class(None, text.lower())
                    )
                if chunk.get("usage") is not None:
                    usage = _usage(chunk["usage"])
                for choice in chunk.get("choices") or []:
                    delta = _field(choice, "delta")
                    content = _field(delta, "content")
                    if content:
                        yield TextDelta(text=content)
                    for piece in _field(delta, "tool_calls") or []:
                        if not isinstance(piece, dict):
                            continue
                        partial = calls.setdefault(piece.get("index") or 0, _PartialCall())
                        partial.id = partial.id or piece.get("id") or ""
                        function = piece.get("function")
                        if isinstance(function, dict):
                            partial.name = partial.name or function.get("name") or ""
                            partial.arguments.append(function.get("arguments") or "")
                    reason = _field(choice, "finish_reason")
                    if reason:
                        finish = reason
        if finish is None:
            raise LlmError("the stream ended without a finish reason", error_class=LlmErrorClass.TRANSIENT)
        for index in sorted(calls):
            yield ToolUse(call=calls[index].call(index))
        yield UsageEvent(usage=usage or Usage())
        yield Done(finish_reason=_finish(finish))

    def _classify(self, exc: Exception) -> LlmError:
        if isinstance(exc, openai.APIConnectionError):  # APITimeoutError among them
            return transport_error(exc)
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


def _tool_calls(calls: object) -> list[ToolCall]:
    """A reply's function calls (other kinds of tool call are not asked for)."""
    out: list[ToolCall] = []
    for i, call in enumerate(calls if isinstance(calls, list) else []):
        function = _field(call, "function")
        if _field(call, "type") not in (None, "function") or not isinstance(function, dict):
            continue
        out.append(
            ToolCall(
                id=_field(call, "id") or f"call_{i}",
                name=function.get("name") or "",
                arguments=function.get("arguments") or "{}",
            )
        )
    return out


def _field(value: object, name: str) -> Any:
    """`value[name]` when `value` is a JSON object, else None (a reply's parts may be missing)."""
    return value.get(name) if isinstance(value, dict) else None


def _tokens(value: object, name: str) -> int:
    count = _field(value, name)
    return count if isinstance(count, int) and not isinstance(count, bool) else 0


def _usage(usage: object) -> Usage:
    return Usage(
        prompt_tokens=_tokens(usage, "prompt_tokens"),
        completion_tokens=_tokens(usage, "completion_tokens"),
        total_tokens=_tokens(usage, "total_tokens"),
        cache_read_tokens=_tokens(_field(usage, "prompt_tokens_details"), "cached_tokens"),
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
