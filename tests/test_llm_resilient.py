"""`ResilientLlmProvider` through the real SDKs against the project's scripted model server.

Every provider points at one `ModelServer`; what each answers is the script its `model` names
(see `tianshu_core.local.model_server`), and the server's stats say what it was asked.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
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
    StreamError,
    TextDelta,
)
from tianshu_core import Engine, ToolLoopConfig, ToolRegistry, WorkflowContext, WorkflowRegistry, tool
from tianshu_core.llm import (
    AnthropicProvider,
    LlmError,
    OpenAiProvider,
    ResiliencePolicy,
    ResilientLlmProvider,
)
from tianshu_core.local.model_server import ModelServer
from tianshu_core.retry import RetryPolicy
from tianshu_core.stores.memory import memory_stores

REQUEST = LlmRequest(model="asked-for", messages=[LlmMessage.user("hello there")])
FAST = ResiliencePolicy(backoff_initial_s=0.01, backoff_max_s=0.05, jitter_s=0.0, cooldown_s=0.5)
SENTINEL = "sk-SENTINEL-d41d8cd98f00b204"


_OPEN: list[OpenAiProvider | AnthropicProvider] = []


@pytest.fixture
async def server() -> AsyncIterator[ModelServer]:
    async with ModelServer() as running:
        yield running
        while _OPEN:  # the SDK clients' connection pools, before the server goes
            await _OPEN.pop().aclose()


def openai(server: ModelServer, model: str, name: str = "openai", **kw: Any) -> OpenAiProvider:
    kw.setdefault("api_keys", ["sk-test-openai"])
    made = OpenAiProvider(name=name, base_url=server.openai_base_url, model=model, **kw)
    _OPEN.append(made)
    return made


def anthropic(server: ModelServer, model: str, name: str = "anthropic", **kw: Any) -> AnthropicProvider:
    kw.setdefault("api_keys", ["sk-ant-test"])
    made = AnthropicProvider(name=name, base_url=server.anthropic_base_url, model=model, **kw)
    _OPEN.append(made)
    return made


def asked(server: ModelServer, model: str) -> int:
    """How many requests the server got for the script `model`."""
    return sum(1 for r in server.stats.requests if r.model == model)


def trail(response_or_error: Any) -> list[tuple[str, str | None]]:
    return [(a.provider, a.error_class and a.error_class.value) for a in response_or_error.attempts]


async def test_a_429_is_retried_after_the_wait_its_retry_after_asked_for(
    server: ModelServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "tianshu_core.llm")
    # The policy's own backoff would be 30 s: only Retry-After makes this quick.
    policy = ResiliencePolicy(backoff_initial_s=30, jitter_s=0)
    llm = ResilientLlmProvider([openai(server, "error:429,retry_after=1+text")], policy)
    started = time.monotonic()
    reply = await llm.complete(REQUEST)
    assert time.monotonic() - started >= 1.0
    assert reply.content == "echo: hello there"
    assert trail(reply) == [("openai", "overloaded"), ("openai", None)]
    assert any("next in 1.00 s" in r.getMessage() for r in caplog.records)


async def test_a_stream_is_retried_as_a_call_is_and_its_log_counts_attempts_alike(
    server: ModelServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "tianshu_core.llm")
    policy = ResiliencePolicy(backoff_initial_s=0.01, jitter_s=0, max_attempts=3)
    script = "error:500+error:502+text,say=third_time"
    events = [e async for e in ResilientLlmProvider([openai(server, script, "s")], policy).stream(REQUEST)]
    assert "".join(e.text for e in events if isinstance(e, TextDelta)) == "third time"
    assert isinstance(events[-1], Done)
    script = "error:500+error:502+text,say=once_more"
    reply = await ResilientLlmProvider([openai(server, script, "c")], policy).complete(REQUEST)
    assert trail(reply) == [("c", "transient"), ("c", "transient"), ("c", None)]
    waits = [r.getMessage().split(" (")[0] for r in caplog.records if "next in" in r.getMessage()]
    # The stream's first attempt is outside the retry controller, as the call's is: both count alike.
    assert waits == ["model call: attempt 1 failed", "model call: attempt 2 failed"] * 2
    # Three attempts at most: a fourth failure is the stream's end, not a fourth request.
    script = "error:500+error:500+error:500+text"
    events = [e async for e in ResilientLlmProvider([openai(server, script, "x")], policy).stream(REQUEST)]
    assert isinstance(events[-1], StreamError) and asked(server, script) == 3


async def test_a_retry_after_over_the_cap_hands_over_to_the_fallback(server: ModelServer) -> None:
    primary = openai(server, "error:429,retry_after=120", "primary")
    llm = ResilientLlmProvider([primary, openai(server, "text,say=fallback", "fallback")], FAST)
    started = time.monotonic()
    reply = await llm.complete(REQUEST)
    assert time.monotonic() - started < 30  # never waited the two minutes
    assert reply.content == "fallback" and reply.provider == "fallback"
    assert trail(reply) == [("primary", "overloaded"), ("fallback", None)]
    # Alone, it is an error: nobody waits two minutes inside a call.
    with pytest.raises(LlmError) as alone:
        await ResilientLlmProvider([openai(server, "error:429,retry_after=120", "alone")], FAST).complete(
            REQUEST
        )
    assert alone.value.error_class is LlmErrorClass.OVERLOADED and alone.value.retry_after_s == 120


async def test_a_retry_after_over_the_cap_is_overloaded_whatever_the_status(server: ModelServer) -> None:
    # A 500 is transient, but one that asks for two minutes is an overloaded provider: hand over.
    primary = openai(server, "error:500,retry_after=120", "primary")
    llm = ResilientLlmProvider([primary, openai(server, "text,say=fallback", "fallback")], FAST)
    reply = await llm.complete(REQUEST)
    assert reply.provider == "fallback" and trail(reply) == [("primary", "overloaded"), ("fallback", None)]
    # Alone, one attempt and an overloaded error: no retry waits the two minutes.
    alone = ResilientLlmProvider([openai(server, "error:502,retry_after=120", "alone")], FAST)
    with pytest.raises(LlmError) as failed:
        await alone.complete(REQUEST)
    assert failed.value.error_class is LlmErrorClass.OVERLOADED and failed.value.status == 502
    assert asked(server, "error:502,retry_after=120") == 1


async def test_the_retry_statuses_are_a_setting(server: ModelServer) -> None:
    fallback = openai(server, "text,say=fallback", "fallback")
    # A 503 left out of the setting is not retried, nor handed over.
    strict = ResiliencePolicy(backoff_initial_s=0.01, jitter_s=0, retry_statuses=frozenset({429}))
    with pytest.raises(LlmError) as failed:
        await ResilientLlmProvider([openai(server, "error:503+text", "primary"), fallback], strict).complete(
            REQUEST
        )
    assert failed.value.error_class is LlmErrorClass.OVERLOADED and trail(failed.value) == [
        ("primary", "overloaded")
    ]
    assert asked(server, "text,say=fallback") == 0
    # A 409 is fatal by default (one attempt); listed, it is retried.
    with pytest.raises(LlmError) as fatal:
        await ResilientLlmProvider([openai(server, "error:409+text")], FAST).complete(REQUEST)
    assert fatal.value.error_class is LlmErrorClass.FATAL and len(fatal.value.attempts) == 1
    server.reset()
    lenient = ResiliencePolicy(
        backoff_initial_s=0.01, jitter_s=0, retry_statuses=ResiliencePolicy().retry_statuses | {409}
    )
    reply = await ResilientLlmProvider([openai(server, "error:409+text")], lenient).complete(REQUEST)
    assert reply.content == "echo: hello there"
    assert trail(reply) == [("openai", "fatal"), ("openai", None)]


async def test_a_503_hands_over_and_the_primary_cools_down_then_is_tried_again(server: ModelServer) -> None:
    llm = ResilientLlmProvider(
        [openai(server, "error:503+text", "primary"), openai(server, "text,say=fallback", "fallback")], FAST
    )
    first = await llm.complete(REQUEST)
    assert first.provider == "fallback" and trail(first) == [("primary", "overloaded"), ("fallback", None)]
    second = await llm.complete(REQUEST)  # the primary cools down: not asked
    assert second.provider == "fallback" and asked(server, "error:503+text") == 1
    await _sleep(FAST.cooldown_s + 0.1)
    third = await llm.complete(REQUEST)
    assert third.provider == "primary" and third.content == "echo: hello there"
    assert asked(server, "error:503+text") == 2


async def test_an_overloaded_anthropic_falls_back_to_an_openai_compatible_provider(
    server: ModelServer,
) -> None:
    llm = ResilientLlmProvider([anthropic(server, "error:529"), openai(server, "text,say=from_openai")], FAST)
    reply = await llm.complete(REQUEST)
    assert reply.content == "from openai" and reply.provider == "openai"
    assert trail(reply) == [("anthropic", "overloaded"), ("openai", None)]
    assert reply.attempts[0].status == 529


async def test_a_400_is_one_attempt_and_fatal(server: ModelServer) -> None:
    llm = ResilientLlmProvider([openai(server, "error:400"), openai(server, "text", "fallback")], FAST)
    with pytest.raises(LlmError) as failed:
        await llm.complete(REQUEST)
    err = failed.value
    assert err.error_class is LlmErrorClass.FATAL and err.status == 400 and err.provider == "openai"
    assert asked(server, "error:400") == 1 and asked(server, "text") == 0
    assert trail(err) == [("openai", "fatal")]


async def test_a_timeout_is_retried(server: ModelServer) -> None:
    slow = openai(server, "text,delay=2+text", timeout_s=0.5)
    reply = await ResilientLlmProvider([slow], FAST).complete(REQUEST)
    assert reply.content == "echo: hello there"
    assert trail(reply) == [("openai", "transient"), ("openai", None)]


async def test_a_refused_key_moves_to_the_next_at_once(
    server: ModelServer, caplog: pytest.LogCaptureFixture, spans: InMemorySpanExporter
) -> None:
    caplog.set_level(logging.WARNING)
    provider = openai(server, "text,deny=sk-first", api_keys=["sk-first", "sk-second"])
    reply = await ResilientLlmProvider([provider], FAST).complete(REQUEST)
    assert reply.content == "echo: hello there" and trail(reply) == [("openai", None)]
    # The rotation is a span event naming the key by position, never the key.
    (span,) = spans.get_finished_spans()
    (event,) = [e for e in span.events if e.name == "api key refused"]
    assert event.attributes == {"tianshu.llm.key_index": 1, "tianshu.llm.keys": 2}
    assert [r.status for r in server.stats.requests] == [401, 200]
    assert not any("next in" in r.getMessage() for r in caplog.records)  # no backoff
    # The next call starts with the key that answered.
    await provider.complete(REQUEST)
    assert [r.status for r in server.stats.requests] == [401, 200, 200]


async def test_every_key_refused_is_one_clear_error_naming_the_provider(server: ModelServer) -> None:
    provider = openai(server, "text,deny=sk-a|sk-b", "billing", api_keys=["sk-a", "sk-b"])
    with pytest.raises(LlmError) as refused:
        await ResilientLlmProvider([provider], FAST).complete(REQUEST)
    err = refused.value
    assert err.error_class is LlmErrorClass.CREDENTIALS and err.provider == "billing"
    assert "all 2 of its API keys were refused" in str(err) and str(err).startswith("billing: ")
    assert "sk-a" not in str(err) and "sk-b" not in str(err)


@pytest.mark.parametrize("script", ["sse_error:2", "cut:2"])
async def test_a_stream_that_fails_after_two_deltas_ends_incomplete_without_fallback(
    server: ModelServer, script: str
) -> None:
    llm = ResilientLlmProvider(
        [openai(server, script), openai(server, "text,say=fallback", "fallback")], FAST
    )
    events = [e async for e in llm.stream(REQUEST)]
    assert [type(e) for e in events] == [TextDelta, TextDelta, StreamError]
    end = events[-1]
    assert isinstance(end, StreamError) and end.incomplete
    assert end.error_class in (LlmErrorClass.TRANSIENT, LlmErrorClass.OVERLOADED)
    assert asked(server, "text,say=fallback") == 0


async def test_a_stream_failing_before_its_first_delta_falls_back(server: ModelServer) -> None:
    llm = ResilientLlmProvider(
        [anthropic(server, "error:529"), openai(server, "text,say=streamed_fallback", "fallback")], FAST
    )
    events = [e async for e in llm.stream(REQUEST)]
    assert "".join(e.text for e in events if isinstance(e, TextDelta)) == "streamed fallback"
    assert isinstance(events[-1], Done)
    # A stream that never finishes is a failure, never a short answer.
    alone = ResilientLlmProvider([openai(server, "no_finish")], ResiliencePolicy(max_attempts=1))
    events = [e async for e in alone.stream(REQUEST)]
    assert isinstance(events[-1], StreamError) and not any(isinstance(e, Done) for e in events)


class _Unruly:
    """A provider whose stream breaks the protocol: it raises `LlmError`, or stops without `Done`."""

    def __init__(self, name: str, *, deltas: int, ending: str) -> None:
        self.name = name
        self.deltas = deltas
        self.ending = ending
        self.calls = 0

    async def complete(self, request: LlmRequest, *, invocation: Any = None) -> Any:
        raise AssertionError("not asked")

    async def stream(self, request: LlmRequest, *, invocation: Any = None) -> AsyncIterator[Any]:
        self.calls += 1
        for i in range(self.deltas):
            yield TextDelta(text=f"d{i}")
        if self.ending == "raise":
            raise LlmError("busy", error_class=LlmErrorClass.OVERLOADED, provider=self.name)


@pytest.mark.parametrize("ending", ["raise", "silent"])
async def test_a_stream_that_raises_or_stops_without_done_is_a_failure_of_its_attempt(
    server: ModelServer, ending: str
) -> None:
    # Before the first delta: the next provider answers.
    unruly = _Unruly("unruly", deltas=0, ending=ending)
    llm = ResilientLlmProvider([unruly, openai(server, "text,say=fallback", "fallback")], FAST)
    events = [e async for e in llm.stream(REQUEST)]
    assert "".join(e.text for e in events if isinstance(e, TextDelta)) == "fallback"
    assert isinstance(events[-1], Done) and unruly.calls == 1
    # After it: the stream ends with an incomplete StreamError, no fallback.
    unruly = _Unruly("unruly", deltas=2, ending=ending)
    llm = ResilientLlmProvider([unruly, openai(server, "text,say=late", "late")], FAST)
    events = [e async for e in llm.stream(REQUEST)]
    assert [type(e) for e in events] == [TextDelta, TextDelta, StreamError]
    end = events[-1]
    assert isinstance(end, StreamError) and end.incomplete
    assert asked(server, "text,say=late") == 0


async def test_the_token_limit_by_default_and_opt_in(server: ModelServer) -> None:
    request = REQUEST.model_copy(update={"max_tokens": 10})
    cut = await ResilientLlmProvider([openai(server, "length:50")], FAST).complete(request)
    assert cut.finish_reason == "length" and len(cut.content.split()) == 10 and len(cut.attempts) == 1
    server.reset()
    policy = ResiliencePolicy(backoff_initial_s=0.01, jitter_s=0, length_retry_ceiling=100)
    whole = await ResilientLlmProvider([openai(server, "length:50")], policy).complete(request)
    assert whole.finish_reason == "stop" and len(whole.content.split()) == 50
    sent = [r.body["max_tokens"] for r in server.stats.requests]
    assert sent == [10, 20, 40, 80]
    # Every attempt was paid for: the usage is their sum.
    assert whole.usage.completion_tokens == 10 + 20 + 40 + 50
    assert whole.usage.completion_tokens == sum(a.usage.completion_tokens for a in whole.attempts)


async def test_the_opt_in_token_limit_returns_the_cut_reply_when_no_whole_one_comes(
    server: ModelServer,
) -> None:
    request = REQUEST.model_copy(update={"max_tokens": 10})
    # Attempts run out before the ceiling: the last cut reply, paid for, is the answer.
    policy = ResiliencePolicy(backoff_initial_s=0.01, jitter_s=0, max_attempts=2, length_retry_ceiling=1000)
    cut = await ResilientLlmProvider([openai(server, "length:500")], policy).complete(request)
    assert cut.finish_reason == "length" and len(cut.content.split()) == 20
    assert cut.usage.completion_tokens == 10 + 20 and len(cut.attempts) == 2
    # The larger limit fails (as a limit over the model's own may): the cut reply again.
    policy = ResiliencePolicy(backoff_initial_s=0.01, jitter_s=0, length_retry_ceiling=1000)
    cut = await ResilientLlmProvider([openai(server, "length:500+error:400")], policy).complete(request)
    assert cut.finish_reason == "length" and len(cut.content.split()) == 10
    assert trail(cut) == [("openai", None), ("openai", "fatal")]


async def test_a_prompt_too_long_is_not_retried(server: ModelServer) -> None:
    llm = ResilientLlmProvider([openai(server, "too_long"), openai(server, "text", "fallback")], FAST)
    with pytest.raises(LlmError) as failed:
        await llm.complete(REQUEST)
    assert failed.value.error_class is LlmErrorClass.PROMPT_TOO_LONG
    assert asked(server, "too_long") == 1 and asked(server, "text") == 0


async def test_a_fallback_whose_window_is_too_small_is_skipped(server: ModelServer) -> None:
    long_request = REQUEST.model_copy(update={"messages": [LlmMessage.user("word " * 400)]})
    llm = ResilientLlmProvider(
        [
            openai(server, "error:503", "primary"),
            openai(server, "text,say=small", "small", context_window=100),
            openai(server, "text,say=large", "large", context_window=100_000),
        ],
        FAST,
    )
    reply = await llm.complete(long_request)
    assert reply.provider == "large" and asked(server, "text,say=small") == 0
    assert trail(reply) == [("primary", "overloaded"), ("large", None)]


async def test_transient_failures_are_retried_and_every_attempt_is_counted(server: ModelServer) -> None:
    llm = ResilientLlmProvider([openai(server, "error:500+error:502+text,cache=4:0")], FAST)
    reply = await llm.complete(REQUEST)
    assert trail(reply) == [("openai", "transient"), ("openai", "transient"), ("openai", None)]
    assert reply.usage.cache_read_tokens == 4
    assert reply.usage == sum((a.usage for a in reply.attempts), start=type(reply.usage)())


async def test_the_provider_concurrency_limit_holds_through_the_chain(server: ModelServer) -> None:
    import asyncio

    provider = openai(server, "text,delay=0.2", max_concurrency=2)
    llm = ResilientLlmProvider([provider], FAST)
    await asyncio.gather(*(llm.complete(REQUEST) for _ in range(6)))
    assert server.stats.max_concurrent == 2 and server.stats.count == 6


@pytest.fixture
def spans(monkeypatch: pytest.MonkeyPatch) -> InMemorySpanExporter:
    from tianshu_core import telemetry

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    monkeypatch.setattr(telemetry, "tracer", provider.get_tracer("test"))
    return exporter


async def test_a_key_echoed_by_a_401_reaches_no_error_log_or_span(
    server: ModelServer, caplog: pytest.LogCaptureFixture, spans: InMemorySpanExporter
) -> None:
    caplog.set_level(logging.DEBUG)
    llm = ResilientLlmProvider(
        [
            openai(server, "error:401", api_keys=[SENTINEL]),
            anthropic(server, "error:401", api_keys=[SENTINEL]),
        ],
        FAST,
    )
    with pytest.raises(LlmError) as refused:
        await llm.complete(REQUEST)
    events = [e async for e in llm.stream(REQUEST)]
    # The upstream answers did quote it (a 401 of the scripted server quotes the key it was sent):
    # the redaction is what keeps it out.
    assert [r.status for r in server.stats.requests] == [401, 401, 401, 401]
    texts = [str(refused.value), repr(refused.value), *(a.model_dump_json() for a in refused.value.attempts)]
    texts += [e.model_dump_json() for e in events]
    texts += [r.getMessage() for r in caplog.records]
    finished = spans.get_finished_spans()
    assert len(finished) == 4 and all(
        s.attributes and s.attributes["tianshu.llm.error_class"] for s in finished
    )
    for span in finished:
        texts += [str(span.attributes), str(span.status.description), str(span.events)]
    assert not [t for t in texts if SENTINEL in t]
    assert refused.value.error_class is LlmErrorClass.CREDENTIALS


async def test_llm_retry_with_a_resilient_provider_is_refused(server: ModelServer) -> None:
    registry = WorkflowRegistry()
    llm = ResilientLlmProvider([openai(server, "text")], FAST)

    @registry.workflow("nested")
    async def nested(ctx: WorkflowContext) -> Any:
        config = ToolLoopConfig(llm_retry=RetryPolicy(max_attempts=3))
        return await ctx.finish(
            "done", output=await ctx.tool_step("agent", ToolRegistry([]), REQUEST, config)
        )

    engine = Engine(memory_stores(), registry, llm=llm)
    case = await engine.start_case("nested", {})
    await engine.run_case(case.case_key)
    failed = await engine.get_case(case.case_key)
    assert failed.error is not None and "two nested retry loops" in failed.error.message
    assert server.stats.count == 0


async def test_a_workflow_sees_a_failed_call_as_llm_error_with_its_class_provider_and_status(
    server: ModelServer,
) -> None:
    registry = WorkflowRegistry()

    @registry.workflow("sees")
    async def sees(ctx: WorkflowContext) -> Any:
        try:
            await ctx.tool_step("agent", ToolRegistry([]), REQUEST)
        except LlmError as err:
            seen = {"class": err.error_class.value, "provider": err.provider, "status": err.status}
            return await ctx.finish("done", output={**seen, "text": str(err)})
        return await ctx.finish("done", output=None)

    llm = ResilientLlmProvider([openai(server, "error:401", "vendor", api_keys=[SENTINEL])], FAST)
    case = await Engine(memory_stores(), registry, llm=llm).run_workflow("sees")
    assert case.output is not None, case.error
    assert {k: case.output[k] for k in ("class", "provider", "status")} == {
        "class": "credentials",
        "provider": "vendor",
        "status": 401,
    }
    assert SENTINEL not in case.output["text"] and "[REDACTED]" in case.output["text"]


async def test_a_tool_loop_over_ctx_llm_with_a_fallback_chain(server: ModelServer) -> None:
    registry = WorkflowRegistry()

    @tool
    def add(a: int = 0, n: int = 0) -> str:
        """Add."""
        return f"added {a + n}"

    tools = ToolRegistry([add])

    @registry.workflow("chain")
    async def chain(ctx: WorkflowContext) -> Any:
        request = LlmRequest(model="m", messages=[LlmMessage.user("please add")])
        return await ctx.finish("done", output=await ctx.tool_step("agent", tools, request))

    llm = ResilientLlmProvider(
        [anthropic(server, "error:529"), openai(server, "tools:1+text,say=all_done")], FAST
    )
    engine = Engine(memory_stores(), registry, llm=llm)
    case = await engine.start_case("chain", {})
    while (await engine.get_case(case.case_key)).execution_state.value not in ("finished", "failed"):
        await engine.run_case(case.case_key)
    done = await engine.get_case(case.case_key)
    assert done.output == "all done", done.error
    second = [r for r in server.stats.requests if r.model == "tools:1+text,say=all_done"][1]
    assert {"role": "tool", "tool_call_id": "call_1", "content": "added 1"} in second.body["messages"]


async def _sleep(seconds: float) -> None:
    import asyncio

    await asyncio.sleep(seconds)
