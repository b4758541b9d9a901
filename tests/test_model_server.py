"""The scripted model server, driven through the real `openai` and `anthropic` SDKs."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from typing import Any

import anthropic
import httpx2
import openai
import pytest

from tianshu_core.local.model_server import (
    SCRIPT_HEADER,
    ModelServer,
    ScriptError,
    key_fingerprint,
    parse_script,
)

KEY = "sk-test-0123456789abcdef"
USER: Any = [{"role": "user", "content": "what is two plus three"}]  # 5 words
OPENAI_TOOLS: Any = [
    {
        "type": "function",
        "function": {
            "name": "add",
            "parameters": {
                "type": "object",
                "properties": {"a": {"type": "string"}, "b": {"type": "integer"}},
                "required": ["a", "b"],
            },
        },
    },
    {"type": "function", "function": {"name": "lookup", "parameters": {"type": "object", "properties": {}}}},
]
ANTHROPIC_TOOLS: Any = [
    {"name": t["function"]["name"], "input_schema": t["function"]["parameters"]} for t in OPENAI_TOOLS
]


@pytest.fixture
async def server() -> AsyncIterator[ModelServer]:
    async with ModelServer() as started:
        yield started


@pytest.fixture
async def oai(server: ModelServer) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(base_url=server.openai_base_url, api_key=KEY, max_retries=0) as client:
        yield client


@pytest.fixture
async def ant(server: ModelServer) -> AsyncIterator[anthropic.AsyncAnthropic]:
    async with anthropic.AsyncAnthropic(
        base_url=server.anthropic_base_url, api_key=KEY, max_retries=0
    ) as client:
        yield client


async def chat(client: openai.AsyncOpenAI, model: str, **kwargs: Any) -> Any:
    return await client.chat.completions.create(model=model, messages=kwargs.pop("messages", USER), **kwargs)


async def message(client: anthropic.AsyncAnthropic, model: str, **kwargs: Any) -> Any:
    kwargs.setdefault("max_tokens", 1000)
    return await client.messages.create(model=model, messages=kwargs.pop("messages", USER), **kwargs)


async def raw(server: ModelServer, method: str, path: str, body: bytes | None = None, **headers: str) -> Any:
    """(status, parsed JSON body) of a plain HTTP request, for what the SDKs cannot send."""

    def call() -> tuple[int, Any]:
        request = urllib.request.Request(server.url + path, data=body, method=method, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as exc:
            with exc:
                return exc.code, json.loads(exc.read())

    return await asyncio.to_thread(call)


# ---- plain answers


async def test_openai_text(server: ModelServer, oai: openai.AsyncOpenAI) -> None:
    reply = await chat(oai, "gpt-4o", temperature=0.2, max_tokens=100)
    assert reply.choices[0].message.content == "echo: what is two plus three"
    assert reply.choices[0].finish_reason == "stop"
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (5, 6)
    [record] = server.stats.requests
    assert (record.path, record.api, record.model, record.stream, record.status) == (
        "/v1/chat/completions",
        "openai",
        "gpt-4o",
        False,
        200,
    )
    assert record.api_key_sha256 == key_fingerprint(KEY)
    assert (record.input_tokens, record.output_tokens, record.step) == (5, 6, "text")
    assert record.body["temperature"] == 0.2 and record.body["max_tokens"] == 100
    assert (server.stats.count, server.stats.input_tokens, server.stats.output_tokens) == (1, 5, 6)


async def test_anthropic_text(server: ModelServer, ant: anthropic.AsyncAnthropic) -> None:
    reply = await message(ant, "claude-sonnet-4-5", system="be brief now", stop_sequences=["END"])
    assert reply.content[0].type == "text" and reply.content[0].text == "echo: what is two plus three"
    assert reply.stop_reason == "end_turn"
    assert (reply.usage.input_tokens, reply.usage.output_tokens) == (8, 6)  # system prompt included
    [record] = server.stats.requests
    assert (record.api, record.path, record.status, record.input_tokens) == (
        "anthropic",
        "/v1/messages",
        200,
        8,
    )
    assert record.body["system"] == "be brief now" and record.body["max_tokens"] == 1000
    assert record.body["stop_sequences"] == ["END"]


async def test_say_option_decodes_words(oai: openai.AsyncOpenAI) -> None:
    reply = await chat(oai, "text,say=hello_world")
    assert reply.choices[0].message.content == "hello world"
    reply = await chat(oai, "text,say=a%2Bb%2C_c%5Fd")
    assert reply.choices[0].message.content == "a+b, c_d"


async def test_openai_tools(server: ModelServer, oai: openai.AsyncOpenAI) -> None:
    reply = await chat(oai, "tools:3", tools=OPENAI_TOOLS)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    calls = choice.message.tool_calls
    assert [c.id for c in calls] == ["call_1", "call_2", "call_3"]
    assert [c.function.name for c in calls] == ["add", "lookup", "add"]  # in order, cycling
    assert [json.loads(c.function.arguments) for c in calls] == [
        {"n": 1, "a": "v1", "b": 1},
        {"n": 2},
        {"n": 3, "a": "v3", "b": 3},
    ]
    assert server.stats.requests[0].body["tools"][0]["function"]["name"] == "add"


async def test_tools_with_none_offered_call_a_tool_named_tool(oai: openai.AsyncOpenAI) -> None:
    calls = (await chat(oai, "tools")).choices[0].message.tool_calls
    assert [(c.id, c.function.name, c.function.arguments) for c in calls] == [("call_1", "tool", '{"n": 1}')]


async def test_anthropic_tools(ant: anthropic.AsyncAnthropic) -> None:
    reply = await message(ant, "tools:3", tools=ANTHROPIC_TOOLS)
    assert reply.stop_reason == "tool_use"
    assert [(b.type, b.id, b.name, b.input) for b in reply.content] == [
        ("tool_use", "toolu_1", "add", {"n": 1, "a": "v1", "b": 1}),
        ("tool_use", "toolu_2", "lookup", {"n": 2}),
        ("tool_use", "toolu_3", "add", {"n": 3, "a": "v3", "b": 3}),
    ]


async def test_anthropic_tool_results_are_recorded(
    server: ModelServer, ant: anthropic.AsyncAnthropic
) -> None:
    turns: Any = [
        {"role": "user", "content": "add them"},
        {
            "role": "assistant",
            "content": [{"type": "tool_use", "id": "toolu_1", "name": "add", "input": {"n": 1}}],
        },
        {
            "role": "user",
            "content": [
                {
                    "type": "tool_result",
                    "tool_use_id": "toolu_1",
                    "content": "no such thing",
                    "is_error": True,
                }
            ],
        },
    ]
    reply = await message(ant, "text", messages=turns)
    assert reply.content[0].text == "echo: add them"  # the person's last words, not the tool result
    # "add them" 2 + tool use 'add {"n": 1}' 3 + "no such thing" 3
    assert reply.usage.input_tokens == 8
    result = server.stats.requests[0].body["messages"][2]["content"][0]
    assert (result["tool_use_id"], result["is_error"]) == ("toolu_1", True)


# ---- streams


async def test_openai_stream_text_with_usage(server: ModelServer, oai: openai.AsyncOpenAI) -> None:
    stream = await chat(oai, "text", stream=True, stream_options={"include_usage": True})
    chunks = [chunk async for chunk in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "echo: what is two plus three"
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) == 6  # a delta a word
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [
        "stop"
    ]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (5, 6)
    [record] = server.stats.requests
    assert record.stream and record.body["stream_options"] == {"include_usage": True}
    assert server.stats.concurrent == 0


async def test_openai_stream_without_include_usage_has_no_usage_chunk(oai: openai.AsyncOpenAI) -> None:
    chunks = [chunk async for chunk in await chat(oai, "text", stream=True)]
    assert all(c.choices and c.usage is None for c in chunks)


async def test_openai_stream_tools_interleave_by_index(oai: openai.AsyncOpenAI) -> None:
    stream = await chat(oai, "tools:3", tools=OPENAI_TOOLS, stream=True)
    calls: dict[int, dict[str, Any]] = {}
    order = []
    finish = []
    async for chunk in stream:
        choice = chunk.choices[0]
        finish.append(choice.finish_reason)
        for delta in choice.delta.tool_calls or []:
            call = calls.setdefault(delta.index, {"id": None, "name": "", "args": []})
            call["id"] = delta.id or call["id"]
            call["name"] += (delta.function and delta.function.name) or ""
            if delta.function and delta.function.arguments:
                call["args"].append(delta.function.arguments)
                order.append(delta.index)
    assert [c["id"] for c in calls.values()] == ["call_1", "call_2", "call_3"]
    assert all(len(c["args"]) >= 3 for c in calls.values())
    assert order != sorted(order)  # the calls' deltas interleave
    assert json.loads("".join(calls[1]["args"])) == {"n": 2}
    assert json.loads("".join(calls[2]["args"])) == {"n": 3, "a": "v3", "b": 3}
    assert [f for f in finish if f] == ["tool_calls"]


async def test_anthropic_stream_text_and_tools(ant: anthropic.AsyncAnthropic) -> None:
    stream = await message(ant, "tools:2,say=let_me_see", tools=ANTHROPIC_TOOLS, stream=True)
    events = [event async for event in stream]
    kinds = [e.type for e in events]
    assert kinds[0] == "message_start" and kinds[-2:] == ["message_delta", "message_stop"]
    text = "".join(
        e.delta.text for e in events if e.type == "content_block_delta" and e.delta.type == "text_delta"
    )
    assert text == "let me see"
    partial: dict[int, list[str]] = {}
    for e in events:
        if e.type == "content_block_delta" and e.delta.type == "input_json_delta":
            partial.setdefault(e.index, []).append(e.delta.partial_json)
    assert sorted(partial) == [1, 2] and all(len(p) >= 3 for p in partial.values())
    assert json.loads("".join(partial[1])) == {"n": 1, "a": "v1", "b": 1}
    starts = [e.content_block for e in events if e.type == "content_block_start"]
    assert [(b.type, getattr(b, "id", None)) for b in starts] == [
        ("text", None),
        ("tool_use", "toolu_1"),
        ("tool_use", "toolu_2"),
    ]
    delta = events[-2]
    assert delta.type == "message_delta" and delta.delta.stop_reason == "tool_use"
    assert delta.usage.output_tokens > 0


async def test_anthropic_stream_helper_assembles_the_message(ant: anthropic.AsyncAnthropic) -> None:
    async with ant.messages.stream(model="text", max_tokens=100, messages=USER) as stream:
        final = await stream.get_final_message()
    assert final.content[0].type == "text" and final.content[0].text == "echo: what is two plus three"
    assert final.stop_reason == "end_turn" and final.usage.output_tokens == 6


async def test_stream_is_open_until_its_last_byte(server: ModelServer, oai: openai.AsyncOpenAI) -> None:
    stream = await chat(oai, "text,gap=0.05", stream=True)
    first = await stream.__anext__()
    assert first.choices[0].delta.role == "assistant"
    assert server.stats.concurrent == 1 and server.stats.count == 0
    rest = [chunk async for chunk in stream]
    assert rest and server.stats.concurrent == 0 and server.stats.count == 1
    assert server.stats.requests[0].seconds >= 0.4  # a gap between each two of its 9 events


# ---- length


async def test_length_honours_max_tokens(oai: openai.AsyncOpenAI, ant: anthropic.AsyncAnthropic) -> None:
    short = await chat(oai, "length", max_tokens=5)
    assert short.choices[0].message.content == "w1 w2 w3 w4 w5" and short.choices[0].finish_reason == "length"
    assert short.usage.completion_tokens == 5
    whole = await chat(oai, "length", max_completion_tokens=50)
    assert len(whole.choices[0].message.content.split()) == 50 and whole.choices[0].finish_reason == "stop"
    cut = await message(ant, "length:20", max_tokens=7)
    assert cut.content[0].text == "w1 w2 w3 w4 w5 w6 w7" and cut.stop_reason == "max_tokens"
    assert (await message(ant, "length:20", max_tokens=20)).stop_reason == "end_turn"


# ---- errors


@pytest.mark.parametrize(
    ("script", "error", "kind", "code"),
    [
        ("error:400", openai.BadRequestError, "invalid_request_error", None),
        ("error:403", openai.PermissionDeniedError, "permission_error", None),
        ("error:429", openai.RateLimitError, "rate_limit_exceeded", "rate_limit_exceeded"),
        (
            "error:429,type=insufficient_quota",
            openai.RateLimitError,
            "insufficient_quota",
            "insufficient_quota",
        ),
        ("error:500", openai.InternalServerError, "server_error", None),
        ("error:502", openai.InternalServerError, "server_error", None),
        ("error:503", openai.InternalServerError, "server_error", None),
        ("error:504", openai.InternalServerError, "server_error", None),
    ],
)
async def test_openai_errors(
    oai: openai.AsyncOpenAI, script: str, error: type[openai.APIStatusError], kind: str, code: str | None
) -> None:
    with pytest.raises(error) as caught:
        await chat(oai, script)
    assert caught.value.status_code == int(script.split(":")[1].split(",")[0])
    body: Any = caught.value.body
    assert (body["type"], body["code"], body["param"]) == (kind, code, None) and body["message"]


async def test_openai_rate_limit_headers_and_message(oai: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.RateLimitError) as caught:
        await chat(oai, "error:429,retry_after=2,retry_after_ms=1500,message=slow_down")
    headers = caught.value.response.headers
    assert (headers["retry-after"], headers["retry-after-ms"]) == ("2", "1500")
    assert caught.value.message.endswith("slow down")


@pytest.mark.parametrize(
    ("script", "error", "kind"),
    [
        ("error:400", anthropic.BadRequestError, "invalid_request_error"),
        ("error:403", anthropic.PermissionDeniedError, "permission_error"),
        ("error:429", anthropic.RateLimitError, "rate_limit_error"),
        ("error:500", anthropic.InternalServerError, "api_error"),
        ("error:503", anthropic.InternalServerError, "api_error"),
        ("error:529", anthropic.OverloadedError, "overloaded_error"),
    ],
)
async def test_anthropic_errors(
    ant: anthropic.AsyncAnthropic, script: str, error: type[anthropic.APIStatusError], kind: str
) -> None:
    with pytest.raises(error) as caught:
        await message(ant, script)
    assert caught.value.status_code == int(script.split(":")[1])
    body: Any = caught.value.body
    assert body["type"] == "error" and body["error"]["type"] == kind


async def test_anthropic_overloaded_is_a_status_error_with_529(ant: anthropic.AsyncAnthropic) -> None:
    with pytest.raises(anthropic.APIStatusError) as caught:
        await message(ant, "error:529,retry_after=3")
    assert isinstance(caught.value, anthropic.InternalServerError)
    assert caught.value.status_code == 529 and caught.value.response.headers["retry-after"] == "3"


async def test_401_echoes_the_whole_key(oai: openai.AsyncOpenAI, ant: anthropic.AsyncAnthropic) -> None:
    with pytest.raises(openai.AuthenticationError) as caught_oai:
        await chat(oai, "error:401")
    body: Any = caught_oai.value.body
    assert body["code"] == "invalid_api_key" and f"Incorrect API key provided: {KEY}" in body["message"]
    assert KEY in str(caught_oai.value)
    with pytest.raises(anthropic.AuthenticationError) as caught_ant:
        await message(ant, "error:401")
    assert KEY in str(caught_ant.value)
    assert caught_ant.value.body == {
        "type": "error",
        "error": {"type": "authentication_error", "message": f"invalid x-api-key: {KEY}"},
    }


async def test_deny_option_and_badkey_step(server: ModelServer) -> None:
    bad, good = "sk-bad-key", "sk-good-key"
    for script in ("text,deny=sk-bad-key|sk-other", "badkey:sk-bad-key"):
        async with (
            openai.AsyncOpenAI(base_url=server.openai_base_url, api_key=bad, max_retries=0) as denied,
            openai.AsyncOpenAI(base_url=server.openai_base_url, api_key=good, max_retries=0) as allowed,
        ):
            with pytest.raises(openai.AuthenticationError, match=bad):
                await chat(denied, script)
            assert (await chat(allowed, script)).choices[0].message.content.startswith("echo:")
    async with anthropic.AsyncAnthropic(
        base_url=server.anthropic_base_url, api_key=bad, max_retries=0
    ) as client:
        with pytest.raises(anthropic.AuthenticationError, match=bad):
            await message(client, "tools,deny=sk-bad-key")


async def test_a_missing_key_is_a_401(server: ModelServer) -> None:
    body = json.dumps({"model": "text", "messages": USER}).encode()
    status, answer = await raw(server, "POST", "/v1/chat/completions", body)
    assert status == 401 and answer["error"]["type"] == "invalid_request_error"
    status, answer = await raw(server, "POST", "/v1/messages", body, **{"anthropic-version": "2023-06-01"})
    assert status == 401 and answer["error"]["type"] == "authentication_error"
    assert [r.status for r in server.stats.requests] == [401, 401]
    assert server.stats.requests[0].api_key_sha256 is None


async def test_bad_body_and_bad_script_are_400s(server: ModelServer, oai: openai.AsyncOpenAI) -> None:
    status, answer = await raw(
        server, "POST", "/v1/chat/completions", b"not json", Authorization=f"Bearer {KEY}"
    )
    assert status == 400 and "JSON" in answer["error"]["message"]
    with pytest.raises(openai.BadRequestError, match="unknown step 'bogus'"):
        await chat(oai, "text+bogus")
    with pytest.raises(openai.BadRequestError, match="error wants a number"):
        await chat(oai, "gpt-4o", extra_headers={SCRIPT_HEADER: "error"})


# ---- broken streams


async def test_sse_error(oai: openai.AsyncOpenAI, ant: anthropic.AsyncAnthropic) -> None:
    got = []
    with pytest.raises(openai.APIError) as caught_oai:
        async for chunk in await chat(oai, "sse_error:2", stream=True):
            got.append(chunk.choices[0].delta.content)
    assert got == ["", "echo:", " what"]
    assert not isinstance(caught_oai.value, openai.APIStatusError)
    assert caught_oai.value.body == {
        "message": "The server had an error while processing your request. Sorry about that!",
        "type": "server_error",
        "param": None,
        "code": None,
    }
    kinds = []
    with pytest.raises(anthropic.APIStatusError) as caught_ant:
        async for event in await message(ant, "sse_error:3", stream=True):
            kinds.append(event.type)
    assert kinds == ["message_start", "content_block_start", *["content_block_delta"] * 3]
    assert caught_ant.value.status_code == 200  # the in-band error of a 200 stream
    assert caught_ant.value.body == {
        "type": "error",
        "error": {"type": "overloaded_error", "message": "Overloaded"},
    }
    with pytest.raises(openai.InternalServerError):
        await chat(oai, "sse_error:2")  # not streamed: a 500
    with pytest.raises(anthropic.InternalServerError):
        await message(ant, "sse_error")


async def test_sse_error_as_an_event(oai: openai.AsyncOpenAI) -> None:
    # `event: error` with the error object bare: the SDK does not raise, it hands over a "chunk"
    # without choices, which a client must take for the error it is.
    chunks = [
        chunk async for chunk in await chat(oai, "sse_error:1,shape=event,type=overloaded", stream=True)
    ]
    assert [c.choices[0].delta.content for c in chunks[:-1]] == ["", "echo:"]
    assert chunks[-1].choices is None
    assert chunks[-1].model_extra == {
        "message": "The server had an error while processing your request. Sorry about that!",
        "type": "overloaded",
        "param": None,
        "code": None,
    }


async def test_cut(server: ModelServer, oai: openai.AsyncOpenAI, ant: anthropic.AsyncAnthropic) -> None:
    got = []
    with pytest.raises(openai.APIConnectionError):
        async for chunk in await chat(oai, "cut:2", stream=True):
            got.append(chunk.choices[0].delta.content)
    assert got == ["", "echo:", " what"]
    kinds = []
    # The anthropic SDK lets httpx's own error through from a stream cut short.
    with pytest.raises(httpx2.RemoteProtocolError):
        async for event in await message(ant, "cut:1", stream=True):
            kinds.append(event.type)
    assert kinds == ["message_start", "content_block_start", "content_block_delta"]
    with pytest.raises(openai.APIConnectionError):
        await chat(oai, "cut")
    with pytest.raises(anthropic.APIConnectionError):
        await message(ant, "cut")
    assert [(r.stream, r.status) for r in server.stats.requests] == [
        (True, 200),
        (True, 200),
        (False, 0),
        (False, 0),
    ]
    assert server.stats.concurrent == 0


async def test_no_finish(oai: openai.AsyncOpenAI, ant: anthropic.AsyncAnthropic) -> None:
    chunks = [chunk async for chunk in await chat(oai, "no_finish", stream=True)]
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "echo: what is two plus three"
    assert all(c.choices[0].finish_reason is None for c in chunks)
    kinds = [event.type async for event in await message(ant, "no_finish", stream=True)]
    assert kinds[-1] == "content_block_stop" and "message_delta" not in kinds and "message_stop" not in kinds


# ---- context


async def test_too_long(oai: openai.AsyncOpenAI, ant: anthropic.AsyncAnthropic) -> None:
    with pytest.raises(openai.BadRequestError) as caught_oai:
        await chat(oai, "too_long,ctx=3")
    body: Any = caught_oai.value.body
    assert (body["code"], body["type"], body["param"]) == (
        "context_length_exceeded",
        "invalid_request_error",
        "messages",
    )
    assert body["message"].startswith(
        "This model's maximum context length is 3 tokens. However, your messages resulted in 5 tokens"
    )
    with pytest.raises(anthropic.BadRequestError) as caught_ant:
        await message(ant, "too_long")
    error: Any = caught_ant.value.body
    assert error["error"] == {
        "type": "invalid_request_error",
        "message": "prompt is too long: 8193 tokens > 8192 maximum",
    }


async def test_context_budget_applies_to_any_step() -> None:
    async with (
        ModelServer(context_tokens=6) as server,
        openai.AsyncOpenAI(base_url=server.openai_base_url, api_key=KEY, max_retries=0) as oai,
        anthropic.AsyncAnthropic(base_url=server.anthropic_base_url, api_key=KEY, max_retries=0) as ant,
    ):
        assert (await chat(oai, "tools:2")).choices[0].finish_reason == "tool_calls"  # 5 tokens fit in 6
        long_turn = [{"role": "user", "content": "one two three four five six seven"}]
        with pytest.raises(openai.BadRequestError, match="resulted in 7 tokens"):
            await chat(oai, "tools:2", messages=long_turn)
        with pytest.raises(anthropic.BadRequestError, match=r"prompt is too long: 8 tokens > 6 maximum"):
            await message(ant, "text", system="system", messages=long_turn)
        # A step's ctx= wins over the server's budget.
        assert (await chat(oai, "text,ctx=100", messages=long_turn)).choices[0].finish_reason == "stop"


# ---- the script counter, the header, caching


async def test_script_counter(
    server: ModelServer, oai: openai.AsyncOpenAI, ant: anthropic.AsyncAnthropic
) -> None:
    with pytest.raises(openai.RateLimitError):
        await chat(oai, "error:429+text")
    assert (await chat(oai, "error:429+text")).choices[0].message.content.startswith("echo:")
    assert (await chat(oai, "error:429+text")).choices[0].finish_reason == "stop"  # the last step stays
    with pytest.raises(anthropic.RateLimitError):  # a count per api
        await message(ant, "error:429+text")
    server.reset()
    assert server.stats.count == 0
    with pytest.raises(openai.RateLimitError):
        await chat(oai, "error:429+text")


async def test_header_overrides_the_model(server: ModelServer, oai: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.InternalServerError):
        await chat(oai, "gpt-4o", extra_headers={SCRIPT_HEADER: "error:503+tools:2"})
    reply = await chat(oai, "gpt-4o", extra_headers={SCRIPT_HEADER: "error:503+tools:2"})
    assert len(reply.choices[0].message.tool_calls) == 2 and reply.model == "gpt-4o"
    assert [r.script for r in server.stats.requests] == ["error:503+tools:2"] * 2


async def test_cache_usage(
    server: ModelServer, oai: openai.AsyncOpenAI, ant: anthropic.AsyncAnthropic
) -> None:
    usage = (await chat(oai, "text,cache=100:20")).usage
    assert (usage.prompt_tokens, usage.prompt_tokens_details.cached_tokens) == (125, 100)
    system: Any = [{"type": "text", "text": "you are kind", "cache_control": {"type": "ephemeral"}}]
    reply = await message(ant, "text,cache=100:20", system=system)
    assert (reply.usage.input_tokens, reply.usage.cache_read_input_tokens) == (8, 100)
    assert reply.usage.cache_creation_input_tokens == 20
    oai_record, ant_record = server.stats.requests
    assert (oai_record.cache_control, ant_record.cache_control) == (False, True)
    assert (ant_record.input_tokens, ant_record.cache_read_tokens, ant_record.cache_write_tokens) == (
        128,
        100,
        20,
    )


# ---- concurrency, stats, modes


async def test_max_concurrent(server: ModelServer, oai: openai.AsyncOpenAI) -> None:
    replies = await asyncio.gather(*(chat(oai, "text,delay=0.3") for _ in range(5)))
    assert len(replies) == 5
    assert server.stats.max_concurrent == 5 and server.stats.concurrent == 0
    server.reset()
    assert server.stats.max_concurrent == 0


async def test_stats_and_reset_over_http(server: ModelServer, oai: openai.AsyncOpenAI) -> None:
    await chat(oai, "text")
    status, stats = await raw(server, "GET", "/_stats")
    assert status == 200 and stats["count"] == 1 and stats["max_concurrent"] == 1
    assert stats["requests"][0]["api_key_sha256"] == key_fingerprint(KEY)
    assert stats["input_tokens"] == 5 and stats["output_tokens"] == 6
    assert (await raw(server, "POST", "/_reset"))[0] == 200
    assert server.stats.count == 0
    models = await oai.models.list()
    assert "text" in [m.id for m in models.data]


async def test_stats_never_hold_a_key(
    server: ModelServer, oai: openai.AsyncOpenAI, ant: anthropic.AsyncAnthropic
) -> None:
    await chat(oai, "text")
    with pytest.raises(openai.AuthenticationError):
        await chat(oai, "error:401")
    with pytest.raises(anthropic.AuthenticationError):
        await message(ant, "text,deny=" + KEY)
    await message(ant, "tools", stream=True)
    assert server.stats.count == 4
    assert KEY not in json.dumps(server.stats.to_json())
    assert KEY not in repr(server.stats.requests)
    _, over_http = await raw(server, "GET", "/_stats")
    assert KEY not in json.dumps(over_http)
    assert {r.api_key_sha256 for r in server.stats.requests} == {key_fingerprint(KEY)}
    assert server.stats.requests[2].model == "text,deny=[redacted]"  # the key in a script is redacted too


def test_in_thread_mode() -> None:
    with ModelServer.in_thread() as server:
        client = openai.OpenAI(base_url=server.openai_base_url, api_key=KEY, max_retries=0)
        with client:
            reply = client.chat.completions.create(model="text,say=from_a_thread", messages=USER)
            chunks = list(client.chat.completions.create(model="text", messages=USER, stream=True))
        assert reply.choices[0].message.content == "from a thread"
        assert chunks[-1].choices[0].finish_reason == "stop"
        assert server.stats.count == 2
        server.reset()
        assert server.stats.count == 0
    with pytest.raises(RuntimeError):
        _ = server.url  # stopped


def test_in_thread_mode_raises_when_it_cannot_listen() -> None:
    with ModelServer.in_thread() as first, pytest.raises(OSError), ModelServer.in_thread(port=first.port):
        pass


def test_module_serves_until_interrupted() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "tianshu_core.local.model_server", "--port", "0", "--host", "127.0.0.1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        match = re.fullmatch(r"model server listening on (http://127\.0\.0\.1:\d+)\n", line)
        assert match, line
        with openai.OpenAI(base_url=match[1] + "/v1", api_key=KEY, max_retries=0) as client:
            reply = client.chat.completions.create(model="text", messages=USER)
        assert reply.choices[0].message.content == "echo: what is two plus three"
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=10)
        assert proc.returncode == 0 and "Traceback" not in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# ---- the language


def test_parse_script() -> None:
    script = parse_script("error:429,retry_after=1+tools:3,delay=0.5,cache=10:2+text")
    assert [str(s) for s in script.steps] == [
        "error:429,retry_after=1",
        "tools:3,delay=0.5,cache=10:2",
        "text",
    ]
    assert [script.step(n).name for n in (1, 2, 3, 4, 99)] == ["error", "tools", "text", "text", "text"]
    tools = script.steps[1]
    assert (tools.count, tools.delay, tools.cache) == (3, 0.5, (10, 2))
    assert parse_script("badkey:a|b,deny=c").steps[0].deny == {"a", "b", "c"}


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "nope",
        "text:1",
        "tools:x",
        "error",
        "error:200",
        "text,delay",
        "text,delay=-1",
        "text,color=red",
        "text,cache=3",
        "sse_error,shape=bare",
    ],
)
def test_parse_script_refuses(bad: str) -> None:
    with pytest.raises(ScriptError):
        parse_script(bad)
