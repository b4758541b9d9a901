"""What a step does to a request, before any wire shape: a reply, a failure or a hang-up.

Both vendors' modules read a request into a `Prompt`, `decide` turns the step and the prompt into
an `Outcome`, and the vendor module writes that outcome in its own shape. Token counts are words
(whitespace-split), so tests can work them out by hand.
"""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from ._script import Step

Finish = Literal["stop", "length", "tool_calls"]
"""Why a reply ended, in OpenAI's words (the Anthropic module maps them)."""
Ending = Literal["finish", "error", "cut", "open"]
"""How a stream ends: a finish reason, an in-band error, a dropped connection, or no finish."""

DEFAULT_CONTEXT_TOKENS = 8192
"""The context length `too_long` reports when neither the step nor the server sets one."""
LENGTH_WORDS = 50
"""How many words the `length` step's full text has unless `length:N` says otherwise."""


def words(text: str) -> int:
    """The tokens of a text: its whitespace-separated words."""
    return len(text.split())


def pieces(text: str) -> list[str]:
    """The text cut into one piece per word, each with the whitespace before it; they join to `text`."""
    parts = re.findall(r"\s*\S+", text)
    if not parts:
        return [text] if text else []
    parts[-1] += text[len("".join(parts)) :]
    return parts


def dicts(value: object) -> list[dict[str, Any]]:
    """The items of a JSON list that are objects (nothing if it is not a list)."""
    return [item for item in value if isinstance(item, dict)] if isinstance(value, list) else []


def content_text(content: object) -> str:
    """The text of a message's content: a string, or its parts' `text` and nested `content`."""
    if isinstance(content, str):
        return content
    texts = []
    for part in dicts(content):
        if isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif "content" in part:
            texts.append(content_text(part["content"]))
    return " ".join(t for t in texts if t)


def positive_int(value: object) -> int | None:
    """`value` if it is a non-negative integer (not a bool), else None."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


@dataclass(frozen=True)
class ToolSpec:
    """A tool the request offers: its name and its JSON Schema."""

    name: str
    schema: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Prompt:
    """What the server needs of a request, read from either vendor's body."""

    model: str
    stream: bool
    last_user_text: str
    tokens: int
    tools: tuple[ToolSpec, ...] = ()
    max_tokens: int | None = None
    include_usage: bool = False
    cache_control: bool = False


@dataclass(frozen=True)
class ToolCall:
    """One tool call of a reply; `index` is 1-based (ids `call_1`, `toolu_1`...)."""

    index: int
    name: str
    arguments: Mapping[str, Any]

    @property
    def arguments_json(self) -> str:
        """The arguments as the JSON text a vendor sends."""
        return json.dumps(self.arguments)

    @property
    def tokens(self) -> int:
        """Its output tokens: the words of its name and its arguments' JSON."""
        return words(f"{self.name} {self.arguments_json}")

    def argument_chunks(self, n: int = 3) -> list[str]:
        """The arguments' JSON cut into `n` pieces (at least one character each where it can)."""
        text = self.arguments_json
        size = max(1, -(-len(text) // n))
        chunks = [text[i : i + size] for i in range(0, len(text), size)]
        return chunks + [""] * (n - len(chunks))


@dataclass(frozen=True)
class Usage:
    """Token counts: `input` is the uncached prompt; cache reads and writes come on top."""

    input: int
    output: int
    cache_read: int = 0
    cache_write: int = 0

    @property
    def total_input(self) -> int:
        """Every prompt token, cached or not."""
        return self.input + self.cache_read + self.cache_write


@dataclass(frozen=True)
class Reply:
    """A 200 answer: its text (in `deltas` for a stream), tool calls, finish reason and usage."""

    text: str
    deltas: tuple[str, ...]
    usage: Usage
    tool_calls: tuple[ToolCall, ...] = ()
    finish: Finish | None = "stop"
    ending: Ending = "finish"
    failure: Failure | None = None
    """The in-band error that ends a stream whose `ending` is "error"."""


@dataclass(frozen=True)
class Failure:
    """An HTTP error; the vendor module fills in the type and message it leaves out."""

    status: int
    type: str | None = None
    message: str | None = None
    echo_key: str | None = None
    """The API key to quote in a 401's message, as the vendors do."""
    context: tuple[int, int] | None = None
    """(prompt tokens, context length) of a prompt-too-long error."""
    retry_after: str | None = None
    retry_after_ms: str | None = None
    shape: str | None = None
    """How an in-band OpenAI error is framed: "data" (`data: {"error": {...}}`, the default) or
    "event" (`event: error` with the bare error object)."""

    def headers(self) -> list[tuple[str, str]]:
        """The retry headers it carries."""
        out = []
        if self.retry_after is not None:
            out.append(("retry-after", self.retry_after))
        if self.retry_after_ms is not None:
            out.append(("retry-after-ms", self.retry_after_ms))
        return out


@dataclass(frozen=True)
class Hangup:
    """Close the connection without answering."""


Outcome = Reply | Failure | Hangup


def _value(k: int, schema: Mapping[str, Any]) -> Any:
    enum = schema.get("enum")
    if isinstance(enum, list) and enum:
        return enum[0]
    kind = schema.get("type", "string")
    if isinstance(kind, list):
        kind = next((t for t in kind if t != "null"), "string")
    values: dict[str, Any] = {"integer": k, "number": k, "boolean": True, "array": [], "object": {}}
    return values.get(kind, f"v{k}") if kind != "null" else None


def tool_arguments(k: int, schema: Mapping[str, Any]) -> dict[str, Any]:
    """`{"n": k}` and a value for each required property (`"v{k}"` for a string)."""
    props = schema.get("properties")
    props = props if isinstance(props, dict) else {}
    required = schema.get("required")
    args: dict[str, Any] = {}
    if "n" in props or schema.get("additionalProperties") is not False:
        args["n"] = k
    for name in required if isinstance(required, list) else []:
        prop = props.get(name)
        args[str(name)] = _value(k, prop if isinstance(prop, dict) else {})
    return args


def tool_calls(n: int, tools: Sequence[ToolSpec]) -> tuple[ToolCall, ...]:
    """`n` calls of the offered tools in order, cycling; a tool named `tool` if none is offered."""
    offered = list(tools) or [ToolSpec("tool")]
    calls = []
    for k in range(1, n + 1):
        spec = offered[(k - 1) % len(offered)]
        calls.append(ToolCall(k, spec.name, tool_arguments(k, spec.schema)))
    return tuple(calls)


def _text_reply(step: Step, prompt: Prompt, text: str, usage: Usage) -> Reply:
    parts = pieces(text)
    finish: Finish = "stop"
    if prompt.max_tokens is not None and len(parts) > prompt.max_tokens:
        parts, finish = parts[: prompt.max_tokens], "length"
    cut = "".join(parts)
    usage = Usage(usage.input, words(cut), usage.cache_read, usage.cache_write)
    if step.name == "no_finish":
        return Reply(cut, tuple(parts), usage, finish=None, ending="open")
    return Reply(cut, tuple(parts), usage, finish=finish)


def _broken_stream(step: Step, text: str, usage: Usage) -> Reply:
    source = pieces(text) or ["x"]
    deltas = tuple(itertools.islice(itertools.cycle(source), step.count))
    sent = "".join(deltas)
    usage = Usage(usage.input, words(sent), usage.cache_read, usage.cache_write)
    if step.name == "cut":
        return Reply(sent, deltas, usage, finish=None, ending="cut")
    failure = Failure(
        500, type=step.options.get("type"), message=step.message, shape=step.options.get("shape")
    )
    return Reply(sent, deltas, usage, finish=None, ending="error", failure=failure)


def decide(step: Step, prompt: Prompt, key: str, context_tokens: int | None) -> Outcome:
    """What `step` answers to `prompt`, sent with API key `key`, under a server context budget."""
    if key in step.deny:
        return Failure(401, echo_key=key)
    budget = step.ctx if step.ctx is not None else context_tokens
    if step.name == "too_long" or (budget is not None and prompt.tokens > budget):
        limit = budget if budget is not None else DEFAULT_CONTEXT_TOKENS
        return Failure(400, context=(max(prompt.tokens, limit + 1), limit))
    if step.name == "error":
        status = step.count
        return Failure(
            status,
            type=step.options.get("type"),
            message=step.message,
            echo_key=key if status == 401 else None,
            retry_after=step.options.get("retry_after"),
            retry_after_ms=step.options.get("retry_after_ms"),
        )
    read, write = step.cache
    usage = Usage(prompt.tokens, 0, read, write)
    text = step.say if step.say is not None else f"echo: {prompt.last_user_text}"
    if step.name in ("sse_error", "cut"):
        if prompt.stream:
            return _broken_stream(step, text, usage)
        if step.name == "cut":
            return Hangup()
        return Failure(500, type=step.options.get("type"), message=step.message)
    if step.name == "tools":
        calls = tool_calls(step.count, prompt.tools)
        preamble = step.say or ""
        output = words(preamble) + sum(c.tokens for c in calls)
        out = Usage(usage.input, output, read, write)
        return Reply(preamble, tuple(pieces(preamble)), out, tool_calls=calls, finish="tool_calls")
    if step.name == "length" and step.say is None:
        text = " ".join(f"w{i}" for i in range(1, step.count + 1))
    return _text_reply(step, prompt, text, usage)


class Wire(Protocol):
    """One vendor's API shape: how it sends keys and prompts, and how it writes outcomes."""

    api: str
    """"openai" or "anthropic"."""
    request_id_header: str

    def api_key(self, headers: Mapping[str, str]) -> str | None:
        """The API key the request carries, if any."""
        ...

    def prompt(self, body: Mapping[str, Any]) -> Prompt:
        """What the server needs of the request's JSON body."""
        ...

    def error(self, failure: Failure) -> dict[str, Any]:
        """The vendor's error body for `failure`."""
        ...

    def completion(self, reply: Reply, prompt: Prompt, request_id: str) -> dict[str, Any]:
        """The vendor's non-stream answer."""
        ...

    def stream(self, reply: Reply, prompt: Prompt, request_id: str) -> list[bytes]:
        """The vendor's server-sent events for `reply`, up to where its `ending` says."""
        ...
