"""Anthropic's Messages shape: `POST /v1/messages`, its errors and its named SSE events."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from ._behaviour import (
    Failure,
    Finish,
    Prompt,
    Reply,
    ToolSpec,
    Usage,
    content_text,
    dicts,
    positive_int,
    words,
)
from ._http import bearer_token, sse_frame

_STOP: dict[Finish | None, str | None] = {
    "stop": "end_turn",
    "length": "max_tokens",
    "tool_calls": "tool_use",
    None: None,
}
_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    529: "overloaded_error",
}
_MESSAGES = {
    400: "Invalid request (scripted).",
    403: "Your API key does not have permission to use the specified resource.",
    404: "Not found (scripted).",
    413: "Request exceeds the maximum allowed number of bytes.",
    429: "Number of requests has exceeded your rate limit (scripted).",
    500: "Internal server error",
    529: "Overloaded",
}


def _usage(usage: Usage) -> dict[str, Any]:
    return {
        "input_tokens": usage.input,
        "output_tokens": usage.output,
        "cache_creation_input_tokens": usage.cache_write,
        "cache_read_input_tokens": usage.cache_read,
    }


def _asks_caching(value: object) -> bool:
    if isinstance(value, dict):
        if value.get("cache_control") is not None:
            return True
        return any(_asks_caching(v) for v in value.values())
    return isinstance(value, list) and any(_asks_caching(v) for v in value)


def _text_blocks(content: object) -> list[dict[str, Any]]:
    return [block for block in dicts(content) if block.get("type") == "text"]


def _event(name: str, data: dict[str, Any]) -> bytes:
    return sse_frame({"type": name, **data}, event=name)


class AnthropicWire:
    """The Anthropic shape of requests, answers and errors."""

    api = "anthropic"
    request_id_header = "request-id"

    def api_key(self, headers: Mapping[str, str]) -> str | None:
        """The key of `x-api-key: K` (or of `Authorization: Bearer K`, the SDK's auth_token)."""
        return headers.get("x-api-key", "").strip() or bearer_token(headers)

    def prompt(self, body: Mapping[str, Any]) -> Prompt:
        """The system prompt, messages (tool uses and results included), tools, max_tokens, caching."""
        texts = [content_text(body.get("system"))]
        last_user = ""
        for message in dicts(body.get("messages")):
            content = message.get("content")
            texts.append(content_text(content))
            texts.extend(
                f"{block.get('name', '')} {json.dumps(block.get('input', {}))}"
                for block in dicts(content)
                if block.get("type") == "tool_use"
            )
            if message.get("role") == "user":
                # The person's words: a turn of only tool results leaves the last one standing.
                said = content_text(content if isinstance(content, str) else _text_blocks(content))
                last_user = said or last_user
        tools = tuple(
            ToolSpec(t["name"], t["input_schema"] if isinstance(t.get("input_schema"), dict) else {})
            for t in dicts(body.get("tools"))
            if isinstance(t.get("name"), str)
        )
        return Prompt(
            model=str(body.get("model", "")),
            stream=body.get("stream") is True,
            last_user_text=last_user,
            tokens=sum(words(t) for t in texts),
            tools=tools,
            max_tokens=positive_int(body.get("max_tokens")),
            cache_control=_asks_caching(body),
        )

    def error(self, failure: Failure) -> dict[str, Any]:
        """`{"type": "error", "error": {"type", "message"}}`."""
        status = failure.status
        if failure.context is not None:
            n, limit = failure.context
            message = f"prompt is too long: {n} tokens > {limit} maximum"
        elif status == 401:
            key = failure.echo_key
            message = f"invalid x-api-key: {key}" if key else "x-api-key header is required"
        else:
            message = _MESSAGES.get(status) or _MESSAGES[500]
        kind = (
            failure.type or _TYPES.get(status) or ("api_error" if status >= 500 else "invalid_request_error")
        )
        error = {"type": kind, "message": failure.message or message}
        return {"type": "error", "error": error}

    def completion(self, reply: Reply, prompt: Prompt, request_id: str) -> dict[str, Any]:
        """A `message` object."""
        content: list[dict[str, Any]] = []
        if reply.text or not reply.tool_calls:
            content.append({"type": "text", "text": reply.text})
        content += [
            {"type": "tool_use", "id": f"toolu_{call.index}", "name": call.name, "input": call.arguments}
            for call in reply.tool_calls
        ]
        return {
            "id": f"msg_{request_id}",
            "type": "message",
            "role": "assistant",
            "model": prompt.model,
            "content": content,
            "stop_reason": _STOP[reply.finish],
            "stop_sequence": None,
            "usage": _usage(reply.usage),
        }

    def stream(self, reply: Reply, prompt: Prompt, request_id: str) -> list[bytes]:
        """message_start, ping, a content block per text and tool call (text_delta and
        input_json_delta), then message_delta (stop_reason, usage) and message_stop."""
        start = {**self.completion(reply, prompt, request_id), "content": [], "stop_reason": None}
        start["usage"] = {**_usage(reply.usage), "output_tokens": 0}
        frames = [_event("message_start", {"message": start}), _event("ping", {})]
        index = 0
        if reply.text or not reply.tool_calls:
            frames.append(
                _event("content_block_start", {"index": 0, "content_block": {"type": "text", "text": ""}})
            )
            frames += [
                _event("content_block_delta", {"index": 0, "delta": {"type": "text_delta", "text": delta}})
                for delta in reply.deltas
            ]
            if reply.ending == "cut":
                return frames
            if reply.failure is not None:
                error = {
                    "type": reply.failure.type or "overloaded_error",
                    "message": reply.failure.message or "Overloaded",
                }
                return [*frames, _event("error", {"error": error})]
            frames.append(_event("content_block_stop", {"index": 0}))
            index = 1
        for i, call in enumerate(reply.tool_calls, start=index):
            block = {"type": "tool_use", "id": f"toolu_{call.index}", "name": call.name, "input": {}}
            frames.append(_event("content_block_start", {"index": i, "content_block": block}))
            frames += [
                _event(
                    "content_block_delta",
                    {"index": i, "delta": {"type": "input_json_delta", "partial_json": p}},
                )
                for p in call.argument_chunks()
            ]
            frames.append(_event("content_block_stop", {"index": i}))
        if reply.finish is not None:
            delta = {"stop_reason": _STOP[reply.finish], "stop_sequence": None}
            frames.append(_event("message_delta", {"delta": delta, "usage": _usage(reply.usage)}))
            frames.append(_event("message_stop", {}))
        return frames
