"""The wire contracts: models, subjects, and the generated schema files that must not drift."""

from __future__ import annotations

import json
import subprocess
import sys
import typing
from datetime import UTC, datetime
from pathlib import Path

import pytest
from pydantic import BaseModel, ValidationError

import tianshu_contracts as tc
from tianshu_contracts import generate, subjects, tokens
from tianshu_contracts.catalog import CHANNELS, MESSAGES, channel_of, template_of
from tianshu_core import ErrorInfo, ExecutionState, Lifecycle, TianshuError
from tianshu_core import tokens as core_tokens

NOW = datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)
ERROR = tc.WireError(type="UnknownWorkflowError", message="unknown workflow 'x'", code="unknown_workflow")
SUMMARY = tc.CaseSummary(
    case_key="order-42",
    session_id="s-1",
    workflow_code="approval",
    execution_state="waiting",
    lifecycle_state="normal",
    input={"amount": 3, "items": ["a", None, 1.5]},
    created_at=NOW,
    updated_at=NOW,
)

EXAMPLES: dict[type[BaseModel], BaseModel] = {
    tc.StartCase: tc.StartCase(workflow_code="approval", case_key="order-42", input={"amount": 3}),
    tc.StartCaseAccepted: tc.StartCaseAccepted(
        case_key="order-42", session_id="order-42", workflow_code="approval", created=True
    ),
    tc.RequestRefused: tc.RequestRefused(error=ERROR),
    tc.CancelCase: tc.CancelCase(case_key="order-42", reason="customer asked"),
    tc.PauseCase: tc.PauseCase(case_key="order-42"),
    tc.ResumeCase: tc.ResumeCase(case_key="order-42"),
    tc.GetCase: tc.GetCase(case_key="order-42"),
    tc.CaseFound: tc.CaseFound(case=SUMMARY),
    tc.CaseNotFound: tc.CaseNotFound(case_key="nope"),
    tc.ListCases: tc.ListCases(session_id="s-1", execution_state="waiting", limit=20, cursor="abc"),
    tc.CasesPage: tc.CasesPage(cases=[SUMMARY], next_cursor="abc"),
    tc.CaseUpdated: tc.CaseUpdated(
        case_key="order-42",
        session_id="s-1",
        workflow_code="approval",
        execution_state="running",
        lifecycle_state="pause",
        updated_at=NOW,
    ),
    tc.CaseFinished: tc.CaseFinished(
        case_key="order-42",
        session_id="s-1",
        workflow_code="approval",
        execution_state="finished",
        lifecycle_state="normal",
        finished_type="approved",
        description="ok",
        output={"approved": True},
        finished_at=NOW,
    ),
    tc.Refusal: tc.Refusal(
        subject=subjects.CASES_START,
        msg_id="m-1",
        stream="TIANSHU_CASES",
        stream_seq=7,
        reason=tc.DeadLetterReason.REFUSED,
        error=ERROR,
        refused_at=NOW,
    ),
    tc.DeadLetter: tc.DeadLetter(
        subject=subjects.CASES_START,
        stream="TIANSHU_CASES",
        stream_seq=7,
        consumer="c",
        delivery_count=1,
        headers={"Nats-Msg-Id": "m-1"},
        payload="not json",
        payload_encoding="utf-8",
        payload_size=8,
        reason=tc.DeadLetterReason.UNDECODABLE,
        error=ERROR,
        dead_lettered_at=NOW,
    ),
    tc.ToolCallRequest: tc.ToolCallRequest(
        call_id="3f2a9c",
        case_key="order-42",
        step="agent/r1/call/call_1",
        tool="search",
        tool_call_id="call_1",
        arguments='{"query": "gpus"}',
        timeout_s=30,
        deadline=NOW,
    ),
    tc.ToolCallResult: tc.ToolCallResult(
        call_id="3f2a9c",
        case_key="order-42",
        step="agent/r1/call/call_1",
        result=tc.ToolResult(call_id="call_1", content="3 results"),
        runner="runner-1",
        duration_s=0.25,
    ),
    tc.LlmCallRequest: tc.LlmCallRequest(
        call_id="9b1c0e",
        case_key="order-42",
        record="agent/r1/llm",
        attempt=1,
        stream=True,
        request=tc.LlmRequest(model="smart", messages=[tc.LlmMessage.user("Refund order 42?")]),
    ),
    tc.LlmCallResult: tc.LlmCallResult(
        call_id="9b1c0e",
        case_key="order-42",
        record="agent/r1/llm",
        route="smart",
        response=tc.LlmResponse.text("Done.", tc.Usage(prompt_tokens=12, completion_tokens=2)),
        attempts=[tc.LlmAttempt(provider="anthropic", model="claude", usage=tc.Usage(prompt_tokens=12))],
        gateway="gateway-1",
        duration_s=0.4,
    ),
    tc.LlmStreamChunk: tc.LlmStreamChunk(
        call_id="9b1c0e", case_key="order-42", attempt=1, seq=1, event=tc.TextDelta(text="Do")
    ),
}


def _adapter_for(model: type[BaseModel]) -> typing.Any:
    return next(c.adapter for c in CHANNELS if model in c.messages)


# The generated files ---------------------------------------------------------------------------


def test_checked_in_schemas_match_the_models() -> None:
    problems = generate.drift()
    assert not problems, (
        "contracts/schemas drifted from the models; run `python -m tianshu_contracts.generate`:\n"
        + "\n".join(problems)
    )


def test_drift_is_detected(tmp_path: Path) -> None:
    assert generate.main(["--out", str(tmp_path)]) == 0
    assert generate.main(["--out", str(tmp_path), "--check"]) == 0
    (tmp_path / "StartCase.json").write_text("{}\n")
    (tmp_path / "Stale.json").write_text("{}\n")
    (tmp_path / "GetCase.json").unlink()
    problems = generate.drift(tmp_path)
    assert any(p.startswith("stale") and "StartCase.json" in p for p in problems)
    assert any(p.startswith("extra") and "Stale.json" in p for p in problems)
    assert any(p.startswith("missing") and "GetCase.json" in p for p in problems)
    assert generate.main(["--out", str(tmp_path), "--check"]) == 1
    generate.write(tmp_path)
    assert generate.drift(tmp_path) == []


def test_every_message_has_a_schema_requiring_its_kind() -> None:
    files = generate.expected_files()
    for model in MESSAGES:
        schema = json.loads(files[generate.schema_file(model)])
        assert schema["additionalProperties"] is False, model
        assert schema["required"][0] == "kind", model
        assert schema["properties"]["kind"]["const"] == model.model_fields["kind"].default


def test_asyncapi_document_is_consistent() -> None:
    doc = json.loads(generate.expected_files()[generate.ASYNCAPI_FILE])
    assert doc["asyncapi"] == "3.0.0"
    components = doc["components"]["messages"]
    for model in MESSAGES:
        assert components[model.__name__]["payload"] == {"$ref": f"./{model.__name__}.json"}
    # Every reference points at something that exists.
    refs: list[str] = []

    def walk(node: object) -> None:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/"):
                refs.append(ref)
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(doc)
    assert refs
    for ref in refs:
        target: object = doc
        for part in ref[2:].split("/"):
            assert isinstance(target, dict) and part in target, ref
            target = target[part]
    addresses = {c["address"] for c in doc["channels"].values()}
    assert subjects.CASES_START in addresses and subjects.RPC_CASES_GET in addresses
    assert {c.id for c in CHANNELS} == set(doc["channels"])


# Models ----------------------------------------------------------------------------------------


def test_examples_cover_every_message() -> None:
    assert set(EXAMPLES) == set(MESSAGES)


@pytest.mark.parametrize("model", MESSAGES, ids=lambda m: m.__name__)
def test_round_trip_through_the_subjects_adapter(model: type[BaseModel]) -> None:
    example = EXAMPLES[model]
    wire = example.model_dump_json()
    assert json.loads(wire)["kind"] == model.model_fields["kind"].default
    assert _adapter_for(model).validate_json(wire) == example
    assert model.model_validate_json(wire) == example


@pytest.mark.parametrize("model", MESSAGES, ids=lambda m: m.__name__)
def test_unknown_fields_are_rejected(model: type[BaseModel]) -> None:
    data = json.loads(EXAMPLES[model].model_dump_json())
    data["surprise"] = 1
    with pytest.raises(ValidationError) as info:
        _adapter_for(model).validate_json(json.dumps(data))
    assert "extra_forbidden" in {e["type"] for e in info.value.errors()}


def test_unknown_fields_are_rejected_in_nested_models() -> None:
    data = json.loads(EXAMPLES[tc.RequestRefused].model_dump_json())
    data["error"]["stack"] = "..."
    with pytest.raises(ValidationError):
        tc.START_CASE_REPLY_ADAPTER.validate_json(json.dumps(data))


def test_kind_is_required_on_the_wire_but_defaulted_in_python() -> None:
    assert tc.StartCase(workflow_code="w").kind == "start_case"
    assert tc.START_CASE_ADAPTER.validate_python({"workflow_code": "w"}).workflow_code == "w"
    with pytest.raises(ValidationError, match="kind"):
        tc.START_CASE_ADAPTER.validate_json(b'{"workflow_code": "w"}')
    with pytest.raises(ValidationError):
        tc.START_CASE_ADAPTER.validate_json(b'{"kind": "get_case", "workflow_code": "w"}')
    with pytest.raises(ValidationError) as info:
        tc.CASE_COMMAND_ADAPTER.validate_json(b'{"kind": "explode_case", "case_key": "k"}')
    assert info.value.errors()[0]["type"] == "union_tag_invalid"
    # A message nested in another needs its tag on the wire as well (the check runs after the
    # fields, so it costs no decoding of the whole body into Python objects first).
    result = tc.LlmCallResult(
        call_id="c1",
        case_key="k",
        record="r",
        attempt=1,
        route="m",
        gateway="g",
        duration_s=0.1,
        response=tc.llm.LlmResponse(content="hi"),
    )
    wire = json.loads(result.model_dump_json())
    assert tc.LLM_CALL_RESULT_ADAPTER.validate_json(json.dumps(wire)) == result
    del wire["response"]["kind"]
    with pytest.raises(ValidationError) as info:
        tc.LLM_CALL_RESULT_ADAPTER.validate_json(json.dumps(wire))
    assert [(e["type"], e["loc"]) for e in info.value.errors()] == [("missing_kind", ("response",))]


def test_commands_share_one_subject_and_are_told_apart_by_kind() -> None:
    cmd = tc.CASE_COMMAND_ADAPTER.validate_json(b'{"kind": "pause_case", "case_key": "k"}')
    assert isinstance(cmd, tc.PauseCase)
    reply = tc.GET_CASE_REPLY_ADAPTER.validate_json(EXAMPLES[tc.CaseNotFound].model_dump_json())
    assert isinstance(reply, tc.CaseNotFound)


@pytest.mark.parametrize("key", ["a.b", "a b", "", "x" * 201, "ü", "a>", "*"])
def test_case_keys_must_be_plain_tokens(key: str) -> None:
    with pytest.raises(ValidationError):
        tc.GetCase(case_key=key)


def test_wrong_types_are_rejected() -> None:
    with pytest.raises(ValidationError):
        tc.START_CASE_ADAPTER.validate_json(b'{"kind": "start_case", "workflow_code": 42}')
    with pytest.raises(ValidationError):
        tc.START_CASE_ADAPTER.validate_json(b'{"kind": "start_case", "workflow_code": ""}')
    with pytest.raises(ValidationError):  # naive timestamps are ambiguous
        tc.CaseUpdated.model_validate_json(
            EXAMPLES[tc.CaseUpdated].model_dump_json().replace("Z", "").replace("+00:00", "")
        )


def test_dead_letter_payload_round_trip() -> None:
    for raw in (b'{"a": 1}', b"\xff\x00binary", "ünïcode".encode()):
        payload, encoding = tc.DeadLetter.encode_payload(raw)
        letter = EXAMPLES[tc.DeadLetter].model_copy(update={"payload": payload, "payload_encoding": encoding})
        again = tc.DEAD_LETTER_ADAPTER.validate_json(letter.model_dump_json())
        assert again.raw_payload() == raw
    assert tc.DeadLetter.encode_payload(b"\xff")[1] == "base64"


def test_wire_error_has_the_shape_of_the_cores_error_info() -> None:
    assert set(tc.WireError.model_fields) == set(ErrorInfo.model_fields)
    info = ErrorInfo.from_exception(TianshuError("boom"))
    assert tc.WireError.model_validate(info.model_dump()).message == "boom"
    assert ErrorInfo.model_validate(ERROR.model_dump()).code == "unknown_workflow"


def test_state_names_agree_with_the_core() -> None:
    assert set(typing.get_args(tc.ExecutionState)) == {s.value for s in ExecutionState}
    assert set(typing.get_args(tc.LifecycleState)) == {s.value for s in Lifecycle}


def test_contracts_do_not_import_the_core() -> None:
    code = (
        "import sys, tianshu_contracts, tianshu_contracts.generate; "
        "sys.exit(any(m.split('.')[0] == 'tianshu_core' for m in sys.modules))"
    )
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


EXPORTS = {
    *("CASE_COMMAND_ADAPTER", "CASE_FINISHED_ADAPTER", "CASE_UPDATED_ADAPTER", "CHANNELS"),
    *("DEAD_LETTER_ADAPTER", "EVENT_PAYLOAD_ADAPTER", "GET_CASE_ADAPTER", "GET_CASE_REPLY_ADAPTER"),
    *("LLM_REQUEST_ADAPTER", "LLM_RESPONSE_ADAPTER", "LLM_STREAM_EVENT_ADAPTER"),
    *("TOOL_CALL_REQUEST_ADAPTER", "TOOL_CALL_RESULT_ADAPTER", "ToolCallRequest", "ToolCallResult"),
    *("Done", "LlmMessage", "LlmRequest", "LlmResponse", "LlmStreamEvent", "Role", "StreamError"),
    *("LlmAttempt", "LlmErrorClass"),
    *("LLM_CALL_REQUEST_ADAPTER", "LLM_CALL_RESULT_ADAPTER", "LLM_STREAM_CHUNK_ADAPTER"),
    *("LlmCallRequest", "LlmCallResult", "LlmStreamChunk", "UsageSummary"),
    *("TextDelta", "ToolCall", "ToolName", "ToolResult", "ToolSpec", "ToolUse", "Usage", "UsageEvent"),
    *("MESSAGES", "REFUSAL_ADAPTER", "START_CASE_ADAPTER", "START_CASE_REPLY_ADAPTER"),
    *("CancelCase", "CaseCommand", "CaseFinished", "CaseFound", "CaseKey", "CaseNotFound", "CaseSummary"),
    *("CaseUpdated", "Channel", "DeadLetter", "DeadLetterReason", "ExecutionState", "GetCase"),
    *("GetCaseReply", "LifecycleState", "Message", "PauseCase", "Refusal", "RequestRefused", "ResumeCase"),
    *("LIST_CASES_ADAPTER", "LIST_CASES_REPLY_ADAPTER", "ListCases", "ListCasesReply", "CasesPage"),
    *("StartCase", "StartCaseAccepted", "StartCaseReply", "WireError", "WireModel"),
    *("catalog", "subjects", "tokens"),
}


def test_public_exports_are_pinned() -> None:
    assert set(tc.__all__) == EXPORTS
    assert len(tc.__all__) == len(EXPORTS)
    for name in tc.__all__:
        assert hasattr(tc, name), name


# Subjects --------------------------------------------------------------------------------------


def _subject_constants() -> dict[str, str]:
    return {
        name: value
        for name, value in vars(subjects).items()
        if name.isupper() and not name.startswith("_")
        if isinstance(value, str) and value.startswith(subjects.PREFIX + ".")
    }


def test_subjects_module_covers_every_channel_and_nothing_else() -> None:
    constants = _subject_constants()
    for channel in CHANNELS:
        if channel.pattern is None:
            continue
        assert any(subjects.overlap(value, channel.pattern) for value in constants.values()), channel.id
    for name, value in constants.items():
        assert any(c.pattern and subjects.overlap(value, c.pattern) for c in CHANNELS), name


def test_streams_capture_their_channels_and_nothing_else() -> None:
    stream_subjects = [(name, s) for name, subs in subjects.STREAM_SUBJECTS.items() for s in subs]
    for i, (_, a) in enumerate(stream_subjects):
        for _, b in stream_subjects[i + 1 :]:
            assert not subjects.overlap(a, b), (a, b)
    for channel in CHANNELS:
        if channel.pattern is None:
            continue
        captured_by = {name for name, s in stream_subjects if subjects.overlap(s, channel.pattern)}
        assert captured_by == ({channel.stream} if channel.stream else set()), channel.id
    for _, s in stream_subjects:
        assert not subjects.overlap(s, f"{subjects.PREFIX}.rpc.>"), s


def test_subject_builders() -> None:
    assert subjects.case_command("order-42") == "tianshu.v1.cases.order-42.command"
    assert subjects.case_finished("k") == "tianshu.v1.cases.k.finished"
    assert subjects.case_updated("k") == "tianshu.v1.cases.k.updated"
    assert subjects.case_key_of("tianshu.v1.cases.start.command") == "start"
    with pytest.raises(ValueError, match="per-case"):
        subjects.case_key_of(subjects.CASES_START)
    with pytest.raises(ValueError, match="case key"):
        subjects.case_command("a.b")
    subject = subjects.event("order", "inv/2024 ü")
    assert subject.startswith("tianshu.v1.events.order.~")
    assert subjects.parse_event(subject) == ("order", "inv/2024 ü")
    assert subjects.parse_event("tianshu.v1.events.order.o-1") == ("order", "o-1")
    with pytest.raises(ValueError, match="event subject"):
        subjects.parse_event("tianshu.v1.events.order.a.b")
    assert subjects.dead_letter(subjects.CASES_START) == "tianshu.v1.dlq.cases.start"
    assert subjects.refusal(subject).startswith("tianshu.v1.errors.events.order.~")
    assert subjects.dead_letter("other.thing") == "tianshu.v1.dlq.foreign.other.thing"


def test_subject_matching() -> None:
    assert subjects.matches("a.*.c", "a.b.c") and not subjects.matches("a.*.c", "a.b.c.d")
    assert subjects.matches("a.>", "a.b.c") and not subjects.matches("a.>", "a")
    assert subjects.overlap("a.*.c", "a.b.>") and not subjects.overlap("a.b", "a.b.c")
    assert subjects.overlap("a.>", "a.*") and not subjects.overlap("a.>", "a")


def test_channel_lookup_gives_low_cardinality_names() -> None:
    assert template_of("tianshu.v1.cases.k1.command") == "tianshu.v1.cases.{case_key}.command"
    assert template_of(subjects.event("order", "x")) == "tianshu.v1.events.{resource_type}.{resource_id}"
    assert template_of("tianshu.v1.dlq.events.a.b") == "tianshu.v1.dlq.{origin}"
    assert template_of("elsewhere.x") == "elsewhere.x"
    channel = channel_of(subjects.CASES_START)
    assert channel is not None and channel.stream == subjects.STREAM_CASES


# Tokens ----------------------------------------------------------------------------------------

SAMPLES = [
    "plain",
    "with-dash_and_underscore",
    "a.b",
    "a b",
    "ü",
    "emoji 🎉",
    "~tilde",
    "",
    "x" * 200,
    "x" * 201,
    "/path/to?q=1&r=*",
    ">",
    "\x00",
]


@pytest.mark.parametrize("value", SAMPLES)
def test_token_encoding_agrees_with_the_core(value: str) -> None:
    encoded = tokens.encode_token(value)
    assert encoded == core_tokens.encode_token(value)
    assert tokens.is_plain_token(value) == core_tokens.is_plain_token(value)
    if value:
        assert tokens.decode_token(encoded) == core_tokens.decode_token(encoded) == value


@pytest.mark.parametrize("bad", ["a.b", "~!!!", "~_w"])
def test_token_decoding_errors_agree_with_the_core(bad: str) -> None:
    core_error: BaseException | None = None
    try:
        core_tokens.decode_token(bad)
    except Exception as exc:
        core_error = exc
    if core_error is None:
        assert tokens.decode_token(bad) == core_tokens.decode_token(bad)
    else:
        with pytest.raises(ValueError):
            tokens.decode_token(bad)


@pytest.mark.parametrize(
    ("bad", "broken"),
    [
        ("x" * 201, "it has 201 characters, over the limit of 200"),
        ("order 42", "' ' (at index 5) is not allowed"),
        ("", "it is empty"),
    ],
)
def test_a_refused_resource_id_says_which_rule_it_broke_and_how_to_encode(bad: str, broken: str) -> None:
    with pytest.raises(ValueError, match="neither a plain nor an encoded token") as refused:
        subjects.parse_event(f"tianshu.v1.events.order.{bad}")
    message = str(refused.value)
    assert broken in message
    assert "unpadded URL-safe base64 of its UTF-8 bytes" in message and "encode_token()" in message
    # A long id is shown cut, not whole.
    assert len(message) < 600
    # The id the message tells us to send is taken, and is the one that was meant.
    if bad:
        assert subjects.parse_event(f"tianshu.v1.events.order.{tokens.encode_token(bad)}") == ("order", bad)


def test_the_longest_plain_resource_id_is_200_characters() -> None:
    assert tokens.MAX_TOKEN_LENGTH == 200
    assert subjects.parse_event("tianshu.v1.events.order." + "x" * 200) == ("order", "x" * 200)
    assert tokens.encode_token("x" * 201).startswith("~")
