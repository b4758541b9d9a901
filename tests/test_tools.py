"""Tools: the LLM contracts, the `@tool` decorator's schemas, the registry, and the executor's
error results (unknown tool, invalid arguments, exceptions, timeouts, oversized results)."""

from __future__ import annotations

import asyncio
import json
from typing import Annotated, Any, Literal

import pytest
from pydantic import BaseModel, Field, ValidationError

import tianshu_contracts as tc
from tianshu_contracts import subjects
from tianshu_core import (
    BaseTool,
    LlmMessage,
    LlmProvider,
    LlmRequest,
    LlmResponse,
    LocalToolExecutor,
    ScriptedLlm,
    TianshuError,
    Tool,
    ToolCall,
    ToolDefinitionError,
    ToolExecutor,
    ToolRegistry,
    ToolResult,
    ToolSafety,
    Toolset,
    Usage,
    tool,
)
from tianshu_core.tools import truncate, truncated_parts

# -- the LLM contracts ----------------------------------------------------------------------------


def test_llm_request_and_response_round_trip_and_need_their_kind_on_the_wire() -> None:
    request = LlmRequest(
        model="gpt-x",
        system_prompt="Be brief.",
        messages=[
            LlmMessage.user("2 + 3?"),
            LlmMessage.assistant("", [ToolCall.of("c1", "add", {"a": 2, "b": 3})]),
            LlmMessage.tool(ToolResult(call_id="c1", content="5")),
        ],
        temperature=0.2,
        max_tokens=100,
        tools=[tc.ToolSpec(name="add", description="Add.")],
    )
    wire = request.model_dump_json()
    assert tc.LLM_REQUEST_ADAPTER.validate_json(wire) == request
    response = LlmResponse.calls(
        ToolCall.of("c2", "add", {"a": 1}), usage=Usage(prompt_tokens=7, completion_tokens=3)
    )
    assert response.usage.total_tokens == 10
    assert tc.LLM_RESPONSE_ADAPTER.validate_json(response.model_dump_json()) == response
    assert response.message() == LlmMessage.assistant("", response.tool_calls)
    data = json.loads(wire)
    del data["kind"]
    with pytest.raises(ValidationError, match="kind"):
        tc.LLM_REQUEST_ADAPTER.validate_json(json.dumps(data))
    data["kind"], data["surprise"] = "llm_request", 1
    with pytest.raises(ValidationError, match="extra"):
        tc.LLM_REQUEST_ADAPTER.validate_json(json.dumps(data))


def test_messages_are_consistent() -> None:
    with pytest.raises(ValidationError, match="tool_call_id"):
        LlmMessage(role="tool", content="5")
    with pytest.raises(ValidationError, match="tool_call_id"):
        LlmMessage(role="user", content="hi", tool_call_id="c1")
    with pytest.raises(ValidationError, match="only a tool message can be an error"):
        LlmMessage(role="assistant", content="hi", is_error=True)
    failed = LlmMessage.tool(ToolResult(call_id="c1", content="tool x failed: boom", is_error=True))
    assert (failed.role, failed.tool_call_id, failed.is_error) == ("tool", "c1", True)
    with pytest.raises(ValidationError, match="only assistant"):
        LlmMessage(role="user", tool_calls=[ToolCall.of("c1", "add")])
    assert ToolCall.of("c1", "add", {"a": 1}).arguments == '{"a": 1}'


@pytest.mark.parametrize(
    "event",
    [
        tc.TextDelta(text="Hel"),
        tc.ToolUse(call=ToolCall.of("c1", "add", {"a": 1})),
        tc.UsageEvent(usage=Usage(prompt_tokens=1, completion_tokens=2)),
        tc.Done(finish_reason="stop"),
        tc.StreamError(error=tc.WireError(type="Overloaded", message="try later", retryable=True)),
    ],
    ids=lambda e: e.kind,
)
def test_stream_events_are_told_apart_by_kind(event: BaseModel) -> None:
    assert tc.LLM_STREAM_EVENT_ADAPTER.validate_json(event.model_dump_json()) == event


def test_tool_subjects() -> None:
    assert subjects.tool_call("search") == "tianshu.v1.tools.calls.search"
    assert subjects.tool_result("order-42") == "tianshu.v1.tools.results.order-42"
    assert subjects.matches(subjects.TOOL_CALLS, subjects.tool_call("search"))
    with pytest.raises(ValueError, match="tool name"):
        subjects.tool_call("a.b")
    with pytest.raises(ValidationError):
        tc.ToolCallRequest(
            call_id="x", case_key="k", step="s", tool="not a name", tool_call_id="c", timeout_s=1
        )


# -- the decorator --------------------------------------------------------------------------------


class Forecast(BaseModel):
    """Where and for how long."""

    city: str = Field(description="A city name.")
    days: int = Field(default=3, ge=1, le=14)
    unit: Literal["C", "F"] = "C"


@tool(safety=ToolSafety.READ_ONLY, timeout_s=5)
async def search(
    query: Annotated[str, Field(description="What to look for.")],
    limit: int = 5,
    exact: bool = False,
) -> str:
    """Search the catalogue.

    Returns one line per hit.
    """
    return f"{query}:{limit}:{exact}"


@tool(name="weather", description="The forecast.")
async def forecast(request: Forecast) -> dict[str, Any]:
    return {"city": request.city, "days": request.days, "unit": request.unit}


def test_schema_of_a_typed_function() -> None:
    assert isinstance(search, Tool)
    assert (search.name, search.safety, search.timeout_s) == ("search", ToolSafety.READ_ONLY, 5)
    assert search.description == "Search the catalogue.\n\nReturns one line per hit."
    assert search.parameters_schema == {
        "type": "object",
        "properties": {
            "query": {"type": "string", "description": "What to look for."},
            "limit": {"type": "integer", "default": 5},
            "exact": {"type": "boolean", "default": False},
        },
        "required": ["query"],
        "additionalProperties": False,
    }


def test_schema_of_a_pydantic_model_parameter() -> None:
    assert (forecast.name, forecast.description, forecast.safety) == (
        "weather",
        "The forecast.",
        ToolSafety.EXCLUSIVE,
    )
    expected = Forecast.model_json_schema()
    expected.pop("title")
    expected["properties"] = {
        k: {kk: vv for kk, vv in v.items() if kk != "title"} for k, v in expected["properties"].items()
    }
    assert forecast.parameters_schema == expected
    assert forecast.parameters_schema["required"] == ["city"]
    assert forecast.parameters_schema["properties"]["unit"]["enum"] == ["C", "F"]
    spec = ToolRegistry([forecast]).specs()[0]
    assert (spec.name, spec.parameters) == ("weather", forecast.parameters_schema)


async def test_decorated_tools_execute_with_validated_values() -> None:
    assert await search.execute({"query": "gpu", "limit": "7"}) == "gpu:7:False"
    assert json.loads(await forecast.execute({"city": "Oslo", "unit": "F"})) == {
        "city": "Oslo",
        "days": 3,
        "unit": "F",
    }
    assert await search("direct", 1) == "direct:1:False"  # still the function

    @tool
    def shout(text: str) -> str:
        """A sync function runs in a worker thread."""
        return text.upper()

    assert await shout.execute({"text": "hi"}) == "HI"


def test_bad_definitions_are_refused() -> None:
    async def star(*items: str) -> str:
        return ""

    with pytest.raises(ToolDefinitionError, match="passable by name"):
        tool(star)
    with pytest.raises(ToolDefinitionError, match="tool name"):
        tool(name="has space")(search.fn)
    with pytest.raises(ToolDefinitionError, match="registered already"):
        ToolRegistry([search, search])
    with pytest.raises(ToolDefinitionError, match="not a tool"):
        ToolRegistry().register(object())  # type: ignore[arg-type]

    class BadSchema(BaseTool):
        name = "bad"
        parameters_schema = {"type": "object", "properties": {"a": {"type": "nonsense"}}}  # noqa: RUF012

        async def execute(self, arguments: dict[str, Any]) -> str:
            return ""

    with pytest.raises(ToolDefinitionError, match="invalid parameters schema"):
        ToolRegistry([BadSchema()])


# -- the executor ---------------------------------------------------------------------------------


class Lookup(BaseTool):
    """A hand-written tool: its arguments are checked against its JSON Schema."""

    name = "lookup"
    description = "Look up a customer."
    safety = ToolSafety.READ_ONLY
    parameters_schema = {  # noqa: RUF012
        "type": "object",
        "properties": {"id": {"type": "string", "minLength": 3}, "limit": {"type": "integer"}},
        "required": ["id"],
        "additionalProperties": False,
    }

    async def execute(self, arguments: dict[str, Any]) -> str:
        return f"customer {arguments['id']}"


@tool
async def fail(kind: str) -> str:
    """Raises what it is asked to."""
    if kind == "timeout":
        raise TimeoutError("upstream timed out")
    raise ValueError(f"bad {kind}")


@tool(timeout_s=0.05)
async def slow() -> str:
    """Slower than its own timeout."""
    await asyncio.sleep(10)
    return "late"


@tool
async def big(n: int) -> str:
    """Returns n bytes of text."""
    return "é" * (n // 2)


REGISTRY = ToolRegistry([search, forecast, Lookup(), fail, slow, big])


async def _run(name: str, arguments: str | dict[str, Any], **options: Any) -> ToolResult:
    text = arguments if isinstance(arguments, str) else json.dumps(arguments)
    executor = LocalToolExecutor(REGISTRY, **options)
    return await executor.execute(ToolCall(id="c1", name=name, arguments=text))


async def test_a_valid_call_answers() -> None:
    assert await _run("lookup", {"id": "abc"}) == ToolResult(call_id="c1", content="customer abc")
    result = await _run("weather", {"city": "Oslo"})
    assert not result.is_error and json.loads(result.content)["days"] == 3


async def test_unknown_tool() -> None:
    assert await _run("nope", {}) == ToolResult(call_id="c1", content="unknown tool: nope", is_error=True)


@pytest.mark.parametrize(
    ("name", "arguments", "problem"),
    [
        ("search", "{not json", "not valid JSON"),
        ("search", "[1, 2]", "expected a JSON object, got list"),
        ("search", {}, "query: Field required"),
        ("search", {"query": "x", "limit": "many"}, "limit: Input should be a valid integer"),
        ("search", {"query": "x", "surprise": 1}, "surprise: Extra inputs are not permitted"),
        ("weather", {"city": "Oslo", "days": 99}, "days: Input should be less than or equal to 14"),
        ("lookup", {"id": "ab"}, "id: 'ab' is too short"),
        ("lookup", {"limit": 1}, "(arguments): 'id' is a required property"),
        ("lookup", {"id": "abc", "x": 1}, "Additional properties are not allowed ('x' was unexpected)"),
    ],
)
async def test_invalid_arguments_name_the_problem(
    name: str, arguments: str | dict[str, Any], problem: str
) -> None:
    result = await _run(name, arguments)
    assert result.is_error
    assert result.content.startswith(f"invalid arguments for tool {name}: ")
    assert problem in result.content


async def test_an_exception_is_an_error_result() -> None:
    result = await _run("fail", {"kind": "input"})
    assert (result.is_error, result.content) == (True, "tool fail failed: ValueError: bad input")
    # A TimeoutError the tool raises itself is its failure, not our timeout.
    result = await _run("fail", {"kind": "timeout"})
    assert result.content == "tool fail failed: TimeoutError: upstream timed out"


async def test_timeouts_the_tools_own_and_the_calls() -> None:
    started = asyncio.get_running_loop().time()
    result = await _run("slow", {})
    assert (result.is_error, result.content) == (True, "tool slow timed out after 0.05 s")
    assert asyncio.get_running_loop().time() - started < 1
    result = await _run("slow", {}, default_timeout_s=0.01)
    assert result.content == "tool slow timed out after 0.01 s"  # the smaller limit wins


async def test_cancellation_is_not_swallowed() -> None:
    executor = LocalToolExecutor(REGISTRY)
    task = asyncio.ensure_future(executor.execute(ToolCall.of("c1", "slow")))
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_an_oversized_result_is_cut_with_a_marker() -> None:
    result = await _run("big", {"n": 1000}, max_result_bytes=100)
    assert not result.is_error
    assert len(result.content.encode()) <= 100
    body, marker = result.content.split("\n")
    assert marker == f"[truncated: {len(body.encode())} of 1000 bytes]"
    assert set(body) == {"é"}  # cut between characters, never inside one
    assert (await _run("big", {"n": 100}, max_result_bytes=100)).content == "é" * 50


def test_truncate() -> None:
    assert truncate("short", 10) == "short"
    cut = truncate("a" * 1000, 64)
    assert cut == "a" * len(cut.split("\n")[0]) + f"\n[truncated: {len(cut.split(chr(10))[0])} of 1000 bytes]"
    assert len(cut) <= 64


def test_a_cut_text_cut_again_still_names_the_original_size() -> None:
    first = truncate("a" * 1000, 500)
    kept, total = truncated_parts(first)
    assert total == 1000 and first == kept + f"\n[truncated: {len(kept)} of 1000 bytes]"
    again = truncate(kept, 100, total=total)
    assert len(again) <= 100 and again.endswith(" of 1000 bytes]")
    assert truncated_parts(again) == (again.split("\n")[0], 1000)
    # A part that fits is still marked: it is not the whole text.
    assert truncate("a" * 10, 100, total=1000) == "a" * 10 + "\n[truncated: 10 of 1000 bytes]"
    # Text that was never cut, or only looks so, is whole.
    assert truncated_parts("plain") == ("plain", 5)
    assert truncated_parts("x\n[truncated: 7 of 1000 bytes]") == ("x\n[truncated: 7 of 1000 bytes]", 30)


class Echo:
    """A tool that only follows the `Tool` protocol: its JSON Schema is checked all the same."""

    name = "echo"
    description = "Echo."
    safety = ToolSafety.READ_ONLY
    parameters_schema: dict[str, Any] = {  # noqa: RUF012
        "type": "object",
        "properties": {"text": {"type": "string"}},
        "required": ["text"],
    }

    async def execute(self, arguments: dict[str, Any]) -> str:
        return str(arguments["text"])


async def test_a_protocol_only_tool() -> None:
    registry = ToolRegistry([Echo()])
    executor = registry.executor()
    assert (await executor.execute(ToolCall.of("c1", "echo", {"text": "hi"}))).content == "hi"
    result = await executor.execute(ToolCall.of("c2", "echo", {"text": 3}))
    assert result.is_error and "text: 3 is not of type 'string'" in result.content


def test_registry_and_toolset() -> None:
    assert REGISTRY.names == ["search", "weather", "lookup", "fail", "slow", "big"]
    assert "lookup" in REGISTRY and len(REGISTRY) == 6
    assert REGISTRY.safety("lookup") is ToolSafety.READ_ONLY and REGISTRY.safety("nope") is None
    toolset = REGISTRY.toolset()
    assert isinstance(toolset, Toolset) and isinstance(toolset.executor, ToolExecutor)
    assert [s.name for s in toolset.specs] == REGISTRY.names
    assert toolset.knows("search") and not toolset.knows("nope")
    assert toolset.safety_of("search") is ToolSafety.READ_ONLY
    assert toolset.safety_of("fail") is ToolSafety.EXCLUSIVE
    assert toolset.safety_of("nope") is ToolSafety.EXCLUSIVE


# -- the scripted model ---------------------------------------------------------------------------


async def test_scripted_llm_from_a_list_and_from_a_function() -> None:
    request = LlmRequest(model="m", messages=[LlmMessage.user("hi")])
    llm = ScriptedLlm([LlmResponse.calls(ToolCall.of("c1", "search")), "done"])
    assert isinstance(llm, LlmProvider)
    assert (await llm.complete(request)).tool_calls[0].id == "c1"
    assert (await llm.complete(request)).content == "done"
    with pytest.raises(TianshuError, match="asked 3 times"):
        await llm.complete(request)
    assert llm.calls == 3 and llm.requests[0] == request

    echo = ScriptedLlm(lambda req: f"{len(req.messages)} messages")
    assert (await echo.complete(request)) == LlmResponse.text("1 messages")
