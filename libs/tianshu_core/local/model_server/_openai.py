"""OpenAI's Chat Completions shape: `POST /v1/chat/completions`, its errors and its SSE chunks."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from ._behaviour import Failure, Prompt, Reply, ToolSpec, Usage, content_text, dicts, positive_int, words
from ._http import bearer_token, sse_frame

_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    403: "permission_error",
    404: "invalid_request_error",
}
_CODES = {429: "rate_limit_exceeded", 404: "model_not_found"}
_MESSAGES = {
    400: "Invalid request (scripted).",
    403: "You are not allowed to sample from this model (scripted).",
    404: "The model does not exist or you do not have access to it (scripted).",
    429: "Rate limit reached for requests (scripted). Please try again in 1s.",
    500: "The server had an error while processing your request. Sorry about that!",
    503: "The engine is currently overloaded, please try again later.",
    "insufficient_quota": "You exceeded your current quota, please check your plan and billing details.",
}
_NO_KEY = (
    "You didn't provide an API key. You need to provide your API key in an Authorization header "
    "using Bearer auth (i.e. Authorization: Bearer YOUR_KEY)."
)


def _usage(usage: Usage) -> dict[str, Any]:
    return {
        "prompt_tokens": usage.total_input,
        "completion_tokens": usage.output,
        "total_tokens": usage.total_input + usage.output,
        "prompt_tokens_details": {"cached_tokens": usage.cache_read, "audio_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0},
    }


def _tools(body: Mapping[str, Any]) -> tuple[ToolSpec, ...]:
    specs = []
    for tool in dicts(body.get("tools")):
        fn = tool.get("function")
        if isinstance(fn, dict) and isinstance(fn.get("name"), str):
            params = fn.get("parameters")
            specs.append(ToolSpec(fn["name"], params if isinstance(params, dict) else {}))
    return tuple(specs)


class OpenAIWire:
    """The OpenAI shape of requests, answers and errors."""

    api = "openai"
    request_id_header = "x-request-id"

    def api_key(self, headers: Mapping[str, str]) -> str | None:
        """The key of `Authorization: Bearer K`."""
        return bearer_token(headers)

    def prompt(self, body: Mapping[str, Any]) -> Prompt:
        """Messages (system ones included), tool calls in them, tools offered, limits, stream options."""
        texts: list[str] = []
        last_user = ""
        for message in dicts(body.get("messages")):
            text = content_text(message.get("content"))
            texts.append(text)
            for call in dicts(message.get("tool_calls")):
                fn = call.get("function")
                if isinstance(fn, dict):
                    texts.append(f"{fn.get('name', '')} {fn.get('arguments', '')}")
            if message.get("role") == "user":
                last_user = text
        options = body.get("stream_options")
        max_tokens = positive_int(body.get("max_completion_tokens"))
        return Prompt(
            model=str(body.get("model", "")),
            stream=body.get("stream") is True,
            last_user_text=last_user,
            tokens=sum(words(t) for t in texts),
            tools=_tools(body),
            max_tokens=max_tokens if max_tokens is not None else positive_int(body.get("max_tokens")),
            include_usage=isinstance(options, dict) and options.get("include_usage") is True,
        )

    def error(self, failure: Failure) -> dict[str, Any]:
        """`{"error": {"message", "type", "param", "code"}}`."""
        status = failure.status
        if failure.context is not None:
            n, limit = failure.context
            message = (
                f"This model's maximum context length is {limit} tokens. However, your messages "
                f"resulted in {n} tokens. Please reduce the length of the messages."
            )
            return {
                "error": {
                    "message": failure.message or message,
                    "type": "invalid_request_error",
                    "param": "messages",
                    "code": "context_length_exceeded",
                }
            }
        kind = failure.type or _TYPES.get(status) or ("server_error" if status >= 500 else _CODES.get(status))
        code = failure.type or _CODES.get(status)
        if status == 401:
            code = code or ("invalid_api_key" if failure.echo_key else None)
            default = (
                f"Incorrect API key provided: {failure.echo_key}. You can find your API key at "
                "https://platform.openai.com/account/api-keys."
                if failure.echo_key
                else _NO_KEY
            )
        else:
            default = _MESSAGES.get(failure.type or "") or _MESSAGES.get(status) or _MESSAGES[500]
        return {
            "error": {
                "message": failure.message or default,
                "type": kind or "invalid_request_error",
                "param": None,
                "code": code,
            }
        }

    def completion(self, reply: Reply, prompt: Prompt, request_id: str) -> dict[str, Any]:
        """A `chat.completion` object."""
        message: dict[str, Any] = {
            "role": "assistant",
            "content": reply.text if reply.text or not reply.tool_calls else None,
            "refusal": None,
        }
        if reply.tool_calls:
            message["tool_calls"] = [
                {
                    "id": f"call_{call.index}",
                    "type": "function",
                    "function": {"name": call.name, "arguments": call.arguments_json},
                }
                for call in reply.tool_calls
            ]
        return {
            "id": f"chatcmpl-{request_id}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": prompt.model,
            "system_fingerprint": None,
            "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": reply.finish}],
            "usage": _usage(reply.usage),
        }

    def stream(self, reply: Reply, prompt: Prompt, request_id: str) -> list[bytes]:
        """`chat.completion.chunk` events: text deltas, tool-call deltas interleaved by index,
        the finish reason, the usage chunk when `stream_options.include_usage` asks for it, `[DONE]`."""
        base: dict[str, Any] = {
            "id": f"chatcmpl-{request_id}",
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": prompt.model,
            "system_fingerprint": None,
        }
        if prompt.include_usage:
            base["usage"] = None

        def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            return sse_frame({**base, "choices": [choice]})

        frames = [chunk({"role": "assistant", "content": "", "refusal": None})]
        frames += [chunk({"content": delta}) for delta in reply.deltas]
        if reply.ending == "cut":
            return frames
        if reply.failure is not None:
            error = {
                "message": reply.failure.message or _MESSAGES[500],
                "type": reply.failure.type or "server_error",
                "param": None,
                "code": None,
            }
            if reply.failure.shape == "event":  # `event: error`, the error object bare
                return [*frames, sse_frame(error, event="error")]
            return [*frames, sse_frame({"error": error})]
        for i, call in enumerate(reply.tool_calls):
            intro = {"index": i, "id": f"call_{call.index}", "type": "function"}
            frames.append(
                chunk({"tool_calls": [{**intro, "function": {"name": call.name, "arguments": ""}}]})
            )
        pieces = [call.argument_chunks() for call in reply.tool_calls]
        for round_ in range(3):
            for i, chunks in enumerate(pieces):
                frames.append(
                    chunk({"tool_calls": [{"index": i, "function": {"arguments": chunks[round_]}}]})
                )
        if reply.finish is not None:
            frames.append(chunk({}, reply.finish))
        if prompt.include_usage:
            frames.append(sse_frame({**base, "choices": [], "usage": _usage(reply.usage)}))
        frames.append(sse_frame("[DONE]"))
        return frames
