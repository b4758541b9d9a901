"""`OpenAiProvider` and `AnthropicProvider` through the real SDKs, against the scripted model server."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from tianshu_contracts.llm import (
    Done,
    LlmErrorClass,
    LlmMessage,
    LlmRequest,
    LlmStreamEvent,
    StreamError,
    TextDelta,
    ToolCall,
    ToolSpec,
    ToolUse,
    UsageEvent,
)
from tianshu_core import Engine, ToolRegistry, WorkflowContext, WorkflowRegistry, memory_stores, tool
from tianshu_core.llm import AnthropicProvider, LlmError, OpenAiProvider, SdkProvider
from tianshu_core.local.model_server import ModelServer, RequestRecord, key_fingerprint

KEY = "sk-test-0123456789abcdef"
SENTINEL = "sk-SENTINEL-abc123xyz"
QUESTION = "what is two plus three"
TOOLS = [
    ToolSpec(
        name="add",
        description="Add two numbers.",
        parameters={"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"]},
    ),
    ToolSpec(name="lookup"),
]

Provider = SdkProvider[Any]


@dataclass(frozen=True)
class Vendor:
    """One provider kind and what differs between the two in what the server saw."""

    name: str
    provider: Callable[..., Provider]
    base_url: Callable[[ModelServer], str]
    call_id: str
    """The prefix of the server's tool call ids."""
    writes_cache: bool
    """Whether the vendor reports cache writes (Anthropic does, OpenAI does not)."""


OPENAI = Vendor("openai", OpenAiProvider, lambda s: s.openai_base_url, "call_", writes_cache=False)
ANTHROPIC = Vendor(
    "anthropic", AnthropicProvider, lambda s: s.anthropic_base_url, "toolu_", writes_cache=True
)


@pytest.fixture
async def server() -> AsyncIterator[ModelServer]:
    async with ModelServer() as started:
        yield started


class Maker:
    """Makes providers pointed at the server, and closes their SDK clients when the test ends."""

    def __init__(self, server: ModelServer) -> None:
        self.server = server
        self.made: list[Provider] = []

    def __call__(self, vendor: Vendor, keys: tuple[str, ...] = (KEY,), **options: Any) -> Provider:
        provider = vendor.provider(api_keys=list(keys), base_url=vendor.base_url(self.server), **options)
        self.made.append(provider)
        return provider

    async def close(self) -> None:
        for provider in self.made:
            await provider.aclose()


@pytest.fixture
async def make(server: ModelServer) -> AsyncIterator[Maker]:
    maker = Maker(server)
    yield maker
    await maker.close()


@pytest.fixture(params=[OPENAI, ANTHROPIC], ids=lambda v: v.name)
def vendor(request: pytest.FixtureRequest) -> Vendor:
    chosen: Vendor = request.param
    return chosen


def ask(model: str, *, question: str = QUESTION, **fields: Any) -> LlmRequest:
    return LlmRequest(model=model, messages=[LlmMessage.user(question)], **fields)


async def events(provider: Provider, request: LlmRequest) -> list[LlmStreamEvent]:
    return [event async for event in provider.stream(request)]


def texts(stream: list[LlmStreamEvent]) -> list[str]:
    return [e.text for e in stream if isinstance(e, TextDelta)]


def last(server: ModelServer) -> RequestRecord:
    return server.stats.requests[-1]


def ending(stream: list[LlmStreamEvent]) -> StreamError:
    end = stream[-1]
    assert isinstance(end, StreamError), stream
    assert not any(isinstance(e, Done) for e in stream)
    return end


# -- replies ---------------------------------------------------------------------------------------


async def test_text(make: Maker, vendor: Vendor) -> None:
    reply = await make(vendor).complete(ask("text"))
    assert (reply.content, reply.finish_reason) == (f"echo: {QUESTION}", "stop")
    assert (reply.provider, reply.model, reply.tool_calls) == (vendor.name, "text", [])
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens, reply.usage.total_tokens) == (5, 6, 11)


async def test_one_tool_call(make: Maker, vendor: Vendor) -> None:
    reply = await make(vendor).complete(ask("tools", tools=TOOLS))
    assert reply.finish_reason == "tool_calls"
    assert reply.tool_calls == [
        ToolCall(id=f"{vendor.call_id}1", name="add", arguments='{"n": 1, "a": "v1"}')
    ]


async def test_three_tool_calls_in_one_reply(make: Maker, vendor: Vendor) -> None:
    reply = await make(vendor).complete(ask("tools:3", tools=TOOLS))
    assert reply.finish_reason == "tool_calls"
    calls = [(c.id, c.name, json.loads(c.arguments)) for c in reply.tool_calls]
    assert calls == [
        (f"{vendor.call_id}1", "add", {"n": 1, "a": "v1"}),
        (f"{vendor.call_id}2", "lookup", {"n": 2}),
        (f"{vendor.call_id}3", "add", {"n": 3, "a": "v3"}),
    ]


async def test_finish_reason_length(make: Maker, vendor: Vendor) -> None:
    provider = make(vendor)
    reply = await provider.complete(ask("length:10", max_tokens=3))
    assert (reply.content, reply.finish_reason) == ("w1 w2 w3", "length")
    stream = await events(provider, ask("length:10", max_tokens=3))
    assert "".join(texts(stream)) == "w1 w2 w3"
    assert stream[-1] == Done(finish_reason="length")


# -- what is sent ----------------------------------------------------------------------------------


def _conversation() -> LlmRequest:
    calls = [ToolCall.of("c1", "add", {"a": "x"}), ToolCall(id="c2", name="lookup", arguments="not json")]
    return LlmRequest(
        model="text",
        messages=[
            LlmMessage.user(QUESTION),
            LlmMessage.assistant("Let me see.", calls),
            LlmMessage(role="tool", content="5", tool_call_id="c1"),
            LlmMessage(role="tool", content="no such thing", tool_call_id="c2", is_error=True),
            LlmMessage.user("and then"),
        ],
        tools=TOOLS,
    )


async def test_openai_sends_tool_calls_and_results_with_their_ids(server: ModelServer, make: Maker) -> None:
    reply = await make(OPENAI).complete(_conversation())
    assert reply.content == "echo: and then"
    messages = last(server).body["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant", "tool", "tool", "user"]
    assert [(c["id"], c["function"]["arguments"]) for c in messages[1]["tool_calls"]] == [
        ("c1", '{"a": "x"}'),
        ("c2", "not json"),
    ]
    assert [(m["tool_call_id"], m["content"]) for m in messages[2:4]] == [
        ("c1", "5"),
        ("c2", "no such thing"),
    ]


async def test_anthropic_sends_tool_results_as_one_user_turn(server: ModelServer, make: Maker) -> None:
    reply = await make(ANTHROPIC).complete(_conversation())
    assert reply.content == "echo: and then"
    messages = last(server).body["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant", "user"]
    assert messages[1]["content"] == [
        {"type": "text", "text": "Let me see."},
        {"type": "tool_use", "id": "c1", "name": "add", "input": {"a": "x"}},
        {"type": "tool_use", "id": "c2", "name": "lookup", "input": {"_raw": "not json"}},
    ]
    assert messages[2]["content"] == [
        {"type": "tool_result", "tool_use_id": "c1", "content": "5", "is_error": False},
        {"type": "tool_result", "tool_use_id": "c2", "content": "no such thing", "is_error": True},
        {"type": "text", "text": "and then"},
    ]
    assert last(server).body["tools"][0] == {
        "name": "add",
        "description": "Add two numbers.",
        "input_schema": TOOLS[0].parameters,
    }


async def test_anthropic_leaves_out_empty_messages_and_keeps_turns_alternating(
    server: ModelServer, make: Maker
) -> None:
    messages = [LlmMessage.user("first"), LlmMessage.assistant(""), LlmMessage.user("second")]
    reply = await make(ANTHROPIC).complete(LlmRequest(model="text", messages=messages))
    assert reply.content == "echo: first second"
    assert last(server).body["messages"] == [
        {"role": "user", "content": [{"type": "text", "text": "first"}, {"type": "text", "text": "second"}]}
    ]


async def test_system_prompt_temperature_and_max_tokens_pass_through(
    server: ModelServer, make: Maker
) -> None:
    request = ask("text", system_prompt="Be brief.", temperature=0.2, max_tokens=77)
    await make(OPENAI).complete(request)
    body = last(server).body
    assert body["messages"][0] == {"role": "system", "content": "Be brief."}
    assert (body["temperature"], body["max_tokens"]) == (0.2, 77)

    request.messages.insert(0, LlmMessage.system("Be kind."))
    await make(ANTHROPIC).complete(request)
    body = last(server).body
    assert body["system"] == [{"type": "text", "text": "Be brief.\n\nBe kind."}]
    assert [m["role"] for m in body["messages"]] == ["user"]
    assert (body["temperature"], body["max_tokens"]) == (0.2, 77)


async def test_anthropic_asks_for_max_tokens_whatever_the_request(server: ModelServer, make: Maker) -> None:
    await make(ANTHROPIC).complete(ask("text"))
    assert last(server).body["max_tokens"] == 4096
    await make(ANTHROPIC, default_max_tokens=99).complete(ask("text"))
    assert last(server).body["max_tokens"] == 99


async def test_prompt_caching_is_asked_of_anthropic_only(server: ModelServer, make: Maker) -> None:
    request = ask("text", system_prompt="Be brief.", tools=TOOLS, prompt_cache=True)
    await make(ANTHROPIC).complete(request)
    record = last(server)
    assert record.cache_control
    ephemeral = {"type": "ephemeral"}
    body = record.body
    assert [b.get("cache_control") for b in body["system"]] == [ephemeral]
    assert [t.get("cache_control") for t in body["tools"]] == [None, ephemeral]
    assert body["messages"][-1]["content"][-1]["cache_control"] == ephemeral

    await make(ANTHROPIC).complete(request.model_copy(update={"prompt_cache": False}))
    assert not last(server).cache_control
    await make(OPENAI).complete(request)
    assert not last(server).cache_control


async def test_cache_usage_counts_cached_tokens_in_the_prompt(
    server: ModelServer, make: Maker, vendor: Vendor
) -> None:
    provider = make(vendor)
    reply = await provider.complete(ask("text,cache=30:7"))
    stream = await events(provider, ask("text,cache=30:7"))
    streamed = next(e.usage for e in stream if isinstance(e, UsageEvent))
    write = 7 if vendor.writes_cache else 0
    for usage in (reply.usage, streamed):
        assert usage.prompt_tokens == last(server).input_tokens == 5 + 30 + 7
        assert (usage.cache_read_tokens, usage.cache_write_tokens) == (30, write)
        assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


# -- streams ---------------------------------------------------------------------------------------


async def test_streamed_text(server: ModelServer, make: Maker, vendor: Vendor) -> None:
    stream = await events(make(vendor), ask("text"))
    assert texts(stream) == ["echo:", " what", " is", " two", " plus", " three"]
    assert stream[-1] == Done(finish_reason="stop")
    assert last(server).stream


async def test_streamed_tool_calls_are_assembled_from_their_pieces(make: Maker, vendor: Vendor) -> None:
    stream = await events(make(vendor), ask("tools:3,say=let_me_see", tools=TOOLS))
    assert "".join(texts(stream)) == "let me see"
    uses = [e.call for e in stream if isinstance(e, ToolUse)]
    assert [(c.id, c.name, json.loads(c.arguments)) for c in uses] == [
        (f"{vendor.call_id}1", "add", {"n": 1, "a": "v1"}),
        (f"{vendor.call_id}2", "lookup", {"n": 2}),
        (f"{vendor.call_id}3", "add", {"n": 3, "a": "v3"}),
    ]
    assert stream[-1] == Done(finish_reason="tool_calls")


async def test_usage_comes_with_the_stream(server: ModelServer, make: Maker, vendor: Vendor) -> None:
    stream = await events(make(vendor), ask("text"))
    usage = [e.usage for e in stream if isinstance(e, UsageEvent)]
    record = last(server)
    assert [(u.prompt_tokens, u.completion_tokens) for u in usage] == [
        (record.input_tokens, record.output_tokens)
    ]
    assert usage[0].completion_tokens == 6
    if vendor is OPENAI:
        assert record.body["stream_options"] == {"include_usage": True}


@pytest.mark.parametrize(
    ("vendor", "script", "error_class"),
    [
        (OPENAI, "sse_error:0", LlmErrorClass.TRANSIENT),
        (OPENAI, "sse_error:0,type=rate_limit_exceeded", LlmErrorClass.OVERLOADED),
        (OPENAI, "sse_error:0,shape=event", LlmErrorClass.TRANSIENT),
        (OPENAI, "sse_error:0,shape=event,type=rate_limit_exceeded", LlmErrorClass.OVERLOADED),
        (ANTHROPIC, "sse_error:0", LlmErrorClass.OVERLOADED),
        (ANTHROPIC, "sse_error:0,type=api_error", LlmErrorClass.TRANSIENT),
    ],
    ids=[
        "openai-server_error",
        "openai-rate_limit",
        "openai-event-server_error",
        "openai-event-rate_limit",
        "anthropic-overloaded",
        "anthropic-api_error",
    ],
)
async def test_an_error_in_the_stream_before_any_delta_is_complete(
    make: Maker, vendor: Vendor, script: str, error_class: LlmErrorClass
) -> None:
    stream = await events(make(vendor), ask(script))
    error = ending(stream)
    assert (error.incomplete, error.error_class) == (False, error_class)
    assert not texts(stream)
    assert error.error.message.startswith(f"{vendor.name}: ")
    assert "error in the stream: " in error.error.message


@pytest.mark.parametrize("script", ["sse_error:2", "sse_error:2,shape=event", "cut:2"])
async def test_a_stream_that_fails_after_deltas_is_incomplete(
    make: Maker, vendor: Vendor, script: str
) -> None:
    stream = await events(make(vendor), ask(script))
    assert texts(stream) == ["echo:", " what"]
    assert len(stream) == 3
    assert ending(stream).incomplete


async def test_a_stream_without_a_finish_reason_is_an_error(make: Maker, vendor: Vendor) -> None:
    stream = await events(make(vendor), ask("no_finish"))
    error = ending(stream)
    assert "".join(texts(stream)) == f"echo: {QUESTION}"
    assert (error.incomplete, error.error_class) == (True, LlmErrorClass.TRANSIENT)
    assert "without a finish reason" in error.error.message


# -- errors ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("script", "error_class", "retry_after_s"),
    [
        ("error:429,retry_after=7", LlmErrorClass.OVERLOADED, 7.0),
        ("error:429,retry_after_ms=1500", LlmErrorClass.OVERLOADED, 1.5),
        ("error:429,type=insufficient_quota", LlmErrorClass.QUOTA_EXHAUSTED, None),
        ("error:503", LlmErrorClass.OVERLOADED, None),
        ("error:529", LlmErrorClass.OVERLOADED, None),
        ("error:500", LlmErrorClass.TRANSIENT, None),
        ("error:502", LlmErrorClass.TRANSIENT, None),
        ("error:504", LlmErrorClass.TRANSIENT, None),
        ("error:403", LlmErrorClass.CREDENTIALS, None),
        ("error:400", LlmErrorClass.FATAL, None),
        ("error:404", LlmErrorClass.FATAL, None),
        ("error:422", LlmErrorClass.FATAL, None),
        ("too_long", LlmErrorClass.PROMPT_TOO_LONG, None),
    ],
)
async def test_error_classes(
    server: ModelServer,
    make: Maker,
    vendor: Vendor,
    script: str,
    error_class: LlmErrorClass,
    retry_after_s: float | None,
) -> None:
    provider = make(vendor)
    with pytest.raises(LlmError) as raised:
        await provider.complete(ask(script))
    err = raised.value
    assert (err.error_class, err.provider, err.retry_after_s) == (error_class, vendor.name, retry_after_s)
    assert err.status == last(server).status
    assert server.stats.count == 1  # the SDK's own retries are off (max_retries=0)
    assert str(err).startswith(f"{vendor.name}: ")
    stream = await events(provider, ask(script))
    assert len(stream) == 1
    streamed = ending(stream)
    assert (streamed.error_class, streamed.incomplete, streamed.retry_after_s) == (
        error_class,
        False,
        retry_after_s,
    )


async def test_a_connection_lost_is_transient(make: Maker, vendor: Vendor) -> None:
    provider = make(vendor)
    with pytest.raises(LlmError) as raised:
        await provider.complete(ask("cut:0"))  # the server hangs up without an answer
    assert (raised.value.error_class, raised.value.status) == (LlmErrorClass.TRANSIENT, None)
    assert "connection" in str(raised.value)
    error = ending(await events(provider, ask("cut:0")))
    assert (error.error_class, error.incomplete) == (LlmErrorClass.TRANSIENT, False)


async def test_anthropic_credit_balance_is_quota_exhausted(make: Maker) -> None:
    script = "error:400,message=Your_credit_balance_is_too_low_to_access_the_Anthropic_API."
    with pytest.raises(LlmError) as raised:
        await make(ANTHROPIC).complete(ask(script))
    assert raised.value.error_class is LlmErrorClass.QUOTA_EXHAUSTED


async def test_a_timeout_is_transient(make: Maker, vendor: Vendor) -> None:
    provider = make(vendor, timeout_s=0.5)
    with pytest.raises(LlmError) as raised:
        await provider.complete(ask("text,delay=2"))
    assert raised.value.error_class is LlmErrorClass.TRANSIENT
    assert "timed out" in str(raised.value)
    stream = await events(provider, ask("text,delay=2"))
    assert ending(stream).error_class is LlmErrorClass.TRANSIENT


async def test_a_refused_key_never_shows(
    server: ModelServer,
    make: Maker,
    vendor: Vendor,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from tianshu_core import telemetry

    exporter = InMemorySpanExporter()
    tracing = TracerProvider()
    tracing.add_span_processor(SimpleSpanProcessor(exporter))
    monkeypatch.setattr(telemetry, "tracer", tracing.get_tracer("test"))
    caplog.set_level(logging.DEBUG)

    provider = make(vendor, keys=(SENTINEL,))
    with pytest.raises(LlmError) as raised:
        await provider.complete(ask("error:401"))
    stream = await events(provider, ask("error:401"))
    err = raised.value
    assert err.error_class is LlmErrorClass.CREDENTIALS
    assert (err.provider, err.status) == (vendor.name, 401)
    assert vendor.name in str(err)
    assert "[REDACTED]" in str(err)  # the server quoted the key: it was cut out
    assert ending(stream).error_class is LlmErrorClass.CREDENTIALS
    assert [r.api_key_sha256 for r in server.stats.requests] == [key_fingerprint(SENTINEL)] * 2

    seen = [str(err), repr(err), repr(err.args), repr(err.wire()), repr(stream), repr(provider)]
    assert caplog.records  # the SDKs log every request at DEBUG
    seen += [f"{r.getMessage()} {r.exc_text or ''} {r.args!r}" for r in caplog.records]
    spans = exporter.get_finished_spans()
    assert [s.name for s in spans] == [f"tianshu.llm.{vendor.name}"] * 2
    for span in spans:
        assert span.status.description and vendor.name in span.status.description
        seen += [repr(dict(span.attributes or {})), span.status.description]
        seen += [repr(dict(e.attributes or {})) for e in span.events]
    assert not [text for text in seen if "SENTINEL" in text or "abc123xyz" in text]


async def test_a_refused_key_hands_over_to_the_next(server: ModelServer, make: Maker, vendor: Vendor) -> None:
    keys = ("sk-first-key-000000", "sk-second-key-11111")
    script = f"text,deny={keys[0]}"
    reply = await make(vendor, keys=keys).complete(ask(script))
    assert reply.content == f"echo: {QUESTION}"
    stream = await events(make(vendor, keys=keys), ask(script))
    assert stream[-1] == Done(finish_reason="stop")
    fingerprints = [r.api_key_sha256 for r in server.stats.requests]
    assert fingerprints == [key_fingerprint(k) for k in keys] * 2
    assert [r.status for r in server.stats.requests] == [401, 200] * 2


async def test_every_key_refused_is_one_credentials_error(
    server: ModelServer, make: Maker, vendor: Vendor
) -> None:
    keys = ("sk-first-key-000000", "sk-second-key-11111")
    script = f"text,deny={'|'.join(keys)}"
    with pytest.raises(LlmError) as raised:
        await make(vendor, keys=keys).complete(ask(script))
    err = raised.value
    assert (err.error_class, err.provider) == (LlmErrorClass.CREDENTIALS, vendor.name)
    assert str(err).startswith(f"{vendor.name}: all 2 of its API keys were refused")
    assert [r.api_key_sha256 for r in server.stats.requests] == [key_fingerprint(k) for k in keys]
    assert not any(k in str(err) for k in keys)


async def test_max_concurrency_bounds_the_calls_in_flight(
    server: ModelServer, make: Maker, vendor: Vendor
) -> None:
    provider = make(vendor, max_concurrency=2)
    replies = await asyncio.gather(*(provider.complete(ask("text,delay=0.2")) for _ in range(5)))
    assert [r.content for r in replies] == [f"echo: {QUESTION}"] * 5
    assert (server.stats.count, server.stats.max_concurrent) == (5, 2)


async def test_a_shared_limit_bounds_several_providers_together(
    server: ModelServer, make: Maker, vendor: Vendor
) -> None:
    first = make(vendor, max_concurrency=2)
    second = make(vendor, limit=first.limit)
    assert first.limit is not None and second.limit is first.limit
    calls = [p.complete(ask("text,delay=0.2")) for p in (first, second) for _ in range(3)]
    assert len(await asyncio.gather(*calls)) == 6
    assert (server.stats.count, server.stats.max_concurrent) == (6, 2)
    with pytest.raises(ValueError, match="not both"):
        make(vendor, max_concurrency=1, limit=first.limit)


# -- a tool loop over ctx.llm ----------------------------------------------------------------------


@tool
async def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


async def test_a_tool_loop_over_ctx_llm(server: ModelServer, make: Maker, vendor: Vendor) -> None:
    registry = WorkflowRegistry()
    request = ask("tools:1+text", question="What is 1 + 1?")

    @registry.workflow("agent")
    async def agent(ctx: WorkflowContext) -> Any:
        text = await ctx.tool_step("agent", ToolRegistry([add]), request)
        return await ctx.finish("done", output=text)

    engine = Engine(memory_stores(), registry, llm=make(vendor))
    case = await engine.run_workflow("agent")
    assert case.output == "echo: What is 1 + 1?"
    first, second = server.stats.requests
    assert [t.get("name") or t.get("function", {}).get("name") for t in first.body["tools"]] == ["add"]
    if vendor is OPENAI:
        results = [(m["tool_call_id"], m["content"]) for m in second.body["messages"] if m["role"] == "tool"]
    else:
        blocks = [b for m in second.body["messages"] if m["role"] == "user" for b in m["content"]]
        results = [(b["tool_use_id"], b["content"]) for b in blocks if b["type"] == "tool_result"]
    assert results == [(f"{vendor.call_id}1", "2")]


# -- an OpenAI-compatible server that answers something else ---------------------------------------


async def _serve_once_each(bodies: dict[str, tuple[str, bytes]]) -> tuple[asyncio.Server, str]:
    """A bare HTTP server: a POST whose body names a model in `bodies` gets that (content type,
    body) back with status 200; what a real OpenAI-compatible server should never send."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(
                    int(line.split(b":", 1)[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length:")
                )
                asked = json.loads(await reader.readexactly(length))
                kind, body = bodies[asked["model"]]
                writer.write(
                    b"HTTP/1.1 200 OK\r\nContent-Type: "
                    + kind.encode()
                    + b"\r\nContent-Length: "
                    + str(len(body)).encode()
                    + b"\r\n\r\n"
                    + body
                )
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    return server, f"http://127.0.0.1:{port}/v1"


async def test_an_openai_reply_or_chunk_of_the_wrong_shape_is_a_transient_error() -> None:
    sse = "text/event-stream"
    bodies = {
        "no-choices": ("application/json", b'{"id": "x", "object": "chat.completion"}'),
        "a-list": ("application/json", b"[1, 2, 3]"),
        "not-json": ("text/plain", b"hello"),
        "list-chunk": (sse, b"data: [1, 2]\n\n"),
        "choices-null": (sse, b'data: {"choices": null}\n\n'),
    }
    server, url = await _serve_once_each(bodies)
    provider = OpenAiProvider(api_keys=["sk-test"], base_url=url)
    try:
        for model in ("no-choices", "a-list", "not-json"):
            with pytest.raises(LlmError) as raised:
                await provider.complete(ask(model))
            assert raised.value.error_class is LlmErrorClass.TRANSIENT, model
            assert "the reply holds no choice" in str(raised.value), model
        for model in ("list-chunk", "choices-null"):
            error = ending(await events(provider, ask(model)))
            assert (error.error_class, error.incomplete) == (LlmErrorClass.TRANSIENT, False), model
            assert "malformed chunk" in error.error.message, model
    finally:
        await provider.aclose()
        server.close()
        await server.wait_closed()
