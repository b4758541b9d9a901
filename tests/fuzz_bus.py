"""Fuzzing the bus: bad messages on every subject the services consume are refused on their first
delivery, and the good traffic among them loses nothing.

    python -m tests.fuzz_bus --examples 500 [--seed N] [--database-url URL] [--workdir DIR]

(`make fuzz`, with FUZZ_EXAMPLES and FUZZ_SEED; tests/test_fuzz.py runs a few dozen in the suite.)

It starts a nats-server of its own (`tests._nats.NatsServer`), a fresh database on the tests' Postgres
(``--database-url``, else ``TIANSHU_TEST_DATABASE_URL``, Docker or the embedded one: `tests._pg`),
and a scheduler, a tool runner and an LLM gateway as processes (the stack of
tests/test_tool_service.py, and the gateway of tests/test_llm_service.py with one route, `ROUTE`,
to the scripted model server run here; all with a short delivery budget). Hypothesis generates
the bad messages, category by category (`CATEGORIES`: each subject these services consume, the
model results and the gateway's model calls included, times a way of being bad), the examples
shared out evenly; the run is the same for the same seed. Each is published with a
`Nats-Msg-Id` of its own. Among them, good cases of `e2e_wait_then_model` (tests/e2e_agent.py: a
wait for an event, a tool call on the runner, then a model call through the gateway) are
started, and get their event once they wait.

The verdict: every good case finished, with its output (the model's answer in it), each step, its
tool call and its model call run once, and no dead letter is about one; every bad message has
exactly one dead letter (`DeadLetter.msg_id` is its Nats-Msg-Id) whose origin is its subject,
with `delivery_count` 1 and a reason its category allows (and, where its category names one, the
error code). Otherwise the summary says what went wrong, by category, and the exit status is 1.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import random
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import nats
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import seed as hypothesis_seed
from hypothesis import strategies as st
from nats.aio.client import Client
from nats.js import JetStreamContext
from pydantic import TypeAdapter, ValidationError

from tests._gateway import GatewayProcess, write_config
from tests._nats import NatsServer
from tests._pg import postgres_server
from tests._services import CaseDb, executions, fresh_database, publish_event, publish_start, retry_budget_env
from tests._tool_runner import StreamReader
from tests._tool_runner import executions as tool_runs
from tests.test_tool_service import Stack, nap
from tianshu_contracts import (
    CASE_COMMAND_ADAPTER,
    DEAD_LETTER_ADAPTER,
    EVENT_PAYLOAD_ADAPTER,
    LLM_CALL_REQUEST_ADAPTER,
    LLM_CALL_RESULT_ADAPTER,
    START_CASE_ADAPTER,
    TOOL_CALL_REQUEST_ADAPTER,
    TOOL_CALL_RESULT_ADAPTER,
    DeadLetter,
    DeadLetterReason,
    subjects,
)
from tianshu_core.local.model_server import ModelServer

LIMIT = 1024 * 1024
"""The services' size limit for a message (TIANSHU_MAX_EVENT_PAYLOAD_BYTES, left at its default)."""
GOOD_WORKFLOW = "e2e_wait_then_model"
ROUTE = "fuzz"
"""The gateway's one route: the scripted model server's `text` (it answers "echo: " + the question)."""
GOOD_EVERY = 8
"""A good case is started after every this many bad messages (and waiting ones get their event)."""
BUDGET = retry_budget_env(max_deliver=2, initial_s=0.2, max_s=0.5)
GATEWAY_ENV = {
    "TIANSHU_LLM_GATEWAY_MAX_DELIVER": "2",
    "TIANSHU_LLM_GATEWAY_RETRY_INITIAL_S": "0.2",
    "TIANSHU_LLM_GATEWAY_RETRY_MAX_S": "0.5",
    # The same size limit as the other services (its default is the server's max_payload, larger).
    "TIANSHU_LLM_GATEWAY_MAX_REQUEST_BYTES": str(LIMIT),
    "TIANSHU_FUZZ_MODEL_KEY": "sk-fuzz",
}

R = DeadLetterReason
PAST = datetime(2020, 1, 1, tzinfo=UTC)


@dataclass(frozen=True)
class Targets:
    """What the bad messages are aimed at: names the services know, and two good cases (`anchors`)
    that exist while the bad messages come, for those that need a real case."""

    run: str
    anchors: tuple[str, str]
    workflow: str = "e2e_agent"
    """A workflow the scheduler runs (a start of it that is bad only in its key or its values)."""
    tool: str = "echo"
    """A tool the runner serves."""
    other_tool: str = "nap"

    @classmethod
    def for_seed(cls, seed: int) -> Targets:
        """Keys named after the seed: each run has a database and a server of its own."""
        run = f"fz{seed}"
        return cls(run, (f"{run}-anchor0", f"{run}-anchor1"))


@dataclass(frozen=True)
class Bad:
    """One bad message, and the dead-letter reasons it may be refused with."""

    category: str
    subject: str
    body: bytes
    expected: frozenset[str]
    code: str | None = None
    """The error code its dead letter must carry, where the reason alone says too little."""

    def preview(self, size: int = 100) -> str:
        body = self.body if len(self.body) <= size else self.body[:size] + b"..."
        return f"{self.subject} {body!r} ({len(self.body)} bytes)"


# -- what the messages are made of ---------------------------------------------------------------

PLAIN_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-"
# Characters a NATS subject token may hold that a plain token may not (no '.', '*', '>', whitespace).
SUBJECT_ONLY_ALPHABET = "~!@#$%^&()=+,;:'\"[]{}|<?/\\`"

plain = st.text(PLAIN_ALPHABET, min_size=1, max_size=16)
texts = st.text(st.characters(exclude_categories=["Cs"], exclude_characters="\x00"), max_size=16)
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | texts,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(texts, inner, max_size=3),
    max_leaves=6,
)
non_strict = st.sampled_from([float("nan"), float("inf"), float("-inf")])
nul_texts = st.builds(lambda a, b: f"{a}\x00{b}", texts, texts)
huge_ints = st.integers(min_value=2**64) | st.integers(max_value=-(2**63) - 1)
"""Beyond what the stores keep (a JSON encoder takes -2^63 … 2^64-1)."""
not_plain = st.builds(
    lambda a, b, c: a + b + c,
    st.text(PLAIN_ALPHABET, max_size=6),
    st.text(SUBJECT_ONLY_ALPHABET, min_size=1, max_size=4),
    st.text(PLAIN_ALPHABET, max_size=6),
) | st.text(PLAIN_ALPHABET, min_size=201, max_size=220)
"""Subject tokens that are no case key, tool name or resource type."""

Fill = Callable[[Any], Any]


@st.composite
def holes(draw: st.DrawFn) -> Fill:
    """A JSON value with a hole at a random depth (0 to 5): `fill(x)` is the value with x in it."""
    layers: list[tuple[dict[str, Any], str] | tuple[list[Any], list[Any]]] = []
    for _ in range(draw(st.integers(0, 5))):
        if draw(st.booleans()):
            siblings, key = draw(st.dictionaries(texts, json_values, max_size=2)), draw(texts)
            siblings.pop(key, None)
            layers.append((siblings, key))
        else:
            layers.append((draw(st.lists(json_values, max_size=2)), draw(st.lists(json_values, max_size=2))))

    def fill(value: Any) -> Any:
        for outer, inner in layers:
            if isinstance(outer, dict):
                assert isinstance(inner, str)
                value = {**outer, inner: value}
            else:
                assert isinstance(inner, list)
                value = [*outer, value, *inner]
        return value

    return fill


def dumps(value: Any, ascii_only: bool = True) -> bytes:
    """JSON as Python writes it: NaN and Infinity included (not strict JSON)."""
    return json.dumps(value, allow_nan=True, ensure_ascii=ascii_only).encode()


def _undecodable(data: bytes) -> bool:
    try:
        json.loads(data)
    except ValueError:  # UnicodeDecodeError included
        return True
    return False


def _refuse_constant(name: str) -> Any:
    raise ValueError(name)


def _strict(data: bytes) -> bool:
    try:
        json.loads(data, parse_constant=_refuse_constant)
    except ValueError:
        return False
    return True


# -- the subjects and their valid messages --------------------------------------------------------


@dataclass(frozen=True)
class Inbox:
    """A subject the services consume: its adapter, and how to make a well-formed message for it
    (bad only in being for a case nobody has, where it names one)."""

    name: str
    adapter: TypeAdapter[Any]
    valid: Callable[[Targets], st.SearchStrategy[tuple[str, Any]]]
    bloat: Callable[[Any, str], Any]
    """The message with `text` (a long string) in it, where the message allows any string."""
    fields: dict[str, str] = field(default_factory=dict)
    """Its typed fields and their JSON types ("str" or "float"), for wrong types."""
    any_json: str | None = None
    """The field that takes any JSON ("" for a message that is any JSON)."""
    size_limited: bool = True
    """Whether its consumer refuses a message over `LIMIT` (`too_large`): the model results' takes
    what the NATS server carries, so nothing over LIMIT is too large for it."""


def nobody(t: Targets) -> st.SearchStrategy[str]:
    """A case key no case has."""
    return plain.map(lambda s: f"{t.run}-nobody-{s}")


def _start(t: Targets) -> st.SearchStrategy[tuple[str, Any]]:
    @st.composite
    def make(draw: st.DrawFn) -> tuple[str, Any]:
        body: dict[str, Any] = {"kind": "start_case", "workflow_code": t.workflow}
        if draw(st.booleans()):
            body["case_key"] = draw(nobody(t))
        if draw(st.booleans()):
            body["session_id"] = draw(plain)
        body["input"] = draw(json_values)
        return subjects.CASES_START, body

    return make()


def _command(t: Targets) -> st.SearchStrategy[tuple[str, Any]]:
    @st.composite
    def make(draw: st.DrawFn) -> tuple[str, Any]:
        key = draw(nobody(t))
        body: dict[str, Any] = {"kind": draw(st.sampled_from(["cancel_case", "pause_case", "resume_case"]))}
        body["case_key"] = key
        if draw(st.booleans()):
            body["reason"] = draw(texts)
        return subjects.case_command(key), body

    return make()


def _event(t: Targets) -> st.SearchStrategy[tuple[str, Any]]:
    return st.tuples(plain.map(lambda s: subjects.event("fuzz", f"{t.run}-{s}")), json_values)


def _call_body(t: Targets, key: str, tool: str, text: str) -> dict[str, Any]:
    return {
        "kind": "tool_call_request",
        "call_id": f"{t.run}-call-{key}",
        "case_key": key,
        "step": "agent/r1/call/r1c1",
        "tool": tool,
        "tool_call_id": "r1c1",
        "arguments": json.dumps({"text": text}),
        "timeout_s": 5.0,
    }


def _call(t: Targets) -> st.SearchStrategy[tuple[str, Any]]:
    return st.builds(
        lambda key, text: (subjects.tool_call(t.tool), _call_body(t, key, t.tool, text)), nobody(t), texts
    )


def _result_body(t: Targets, key: str, content: str) -> dict[str, Any]:
    return {
        "kind": "tool_call_result",
        "call_id": f"{t.run}-result-{key}",
        "case_key": key,
        "step": "agent/r1/call/r1c1",
        "result": {"call_id": "r1c1", "content": content, "is_error": False},
        "runner": "fuzz",
        "duration_s": 0.1,
    }


def _result(t: Targets) -> st.SearchStrategy[tuple[str, Any]]:
    return st.builds(
        lambda key, text: (subjects.tool_result(key), _result_body(t, key, text)), nobody(t), texts
    )


def _llm_result_body(t: Targets, key: str, content: str) -> dict[str, Any]:
    return {
        "kind": "llm_call_result",
        "call_id": f"{t.run}-llm-{key}",
        "case_key": key,
        "record": "agent/r1/llm",
        "route": "default",
        "response": {"kind": "llm_response", "content": content, "finish_reason": "stop"},
        "gateway": "fuzz",
        "duration_s": 0.1,
    }


def _llm_result(t: Targets) -> st.SearchStrategy[tuple[str, Any]]:
    return st.builds(
        lambda key, text: (subjects.llm_result(key), _llm_result_body(t, key, text)), nobody(t), texts
    )


def _llm_call_body(t: Targets, key: str, text: str, route: str = ROUTE) -> dict[str, Any]:
    return {
        "kind": "llm_call_request",
        "call_id": f"{t.run}-llm-call-{key}",
        "case_key": key,
        "record": "agent/r1/llm",
        "request": {"kind": "llm_request", "model": route, "messages": [{"role": "user", "content": text}]},
    }


def _llm_call(t: Targets) -> st.SearchStrategy[tuple[str, Any]]:
    """A model call for a case nobody has, on the gateway's route (its answer goes to no case)."""
    return st.builds(lambda key, text: (subjects.LLM_CALLS, _llm_call_body(t, key, text)), nobody(t), texts)


def _with(body: dict[str, Any], **changes: Any) -> dict[str, Any]:
    return {**body, **changes}


INBOXES = [
    Inbox(
        "start",
        START_CASE_ADAPTER,
        _start,
        lambda body, text: _with(body, input=text),
        {"kind": "str", "workflow_code": "str", "case_key": "str", "session_id": "str"},
        any_json="input",
    ),
    Inbox(
        "command",
        CASE_COMMAND_ADAPTER,
        _command,
        lambda body, text: _with(body, reason=text),
        {"kind": "str", "case_key": "str", "reason": "str"},
    ),
    Inbox(
        "event", EVENT_PAYLOAD_ADAPTER, _event, lambda body, text: {"blob": text, "was": body}, any_json=""
    ),
    Inbox(
        "call",
        TOOL_CALL_REQUEST_ADAPTER,
        _call,
        lambda body, text: _with(body, arguments=json.dumps({"text": text})),
        {
            "kind": "str",
            "call_id": "str",
            "case_key": "str",
            "step": "str",
            "tool": "str",
            "tool_call_id": "str",
            "arguments": "str",
            "timeout_s": "float",
            "deadline": "str",
        },
    ),
    Inbox(
        "result",
        TOOL_CALL_RESULT_ADAPTER,
        _result,
        lambda body, text: _with(body, result=_with(body["result"], content=text)),
        {
            "kind": "str",
            "call_id": "str",
            "case_key": "str",
            "step": "str",
            "runner": "str",
            "duration_s": "float",
        },
    ),
    Inbox(
        "llm-result",
        LLM_CALL_RESULT_ADAPTER,
        _llm_result,
        lambda body, text: _with(body, response=_with(body["response"], content=text)),
        {
            "kind": "str",
            "call_id": "str",
            "case_key": "str",
            "record": "str",
            "route": "str",
            "gateway": "str",
            "duration_s": "float",
        },
        size_limited=False,
    ),
    Inbox(
        "llm-call",
        LLM_CALL_REQUEST_ADAPTER,
        _llm_call,
        lambda body, text: _with(
            body, request=_with(body["request"], messages=[{"role": "user", "content": text}])
        ),
        {
            "kind": "str",
            "call_id": "str",
            "case_key": "str",
            "record": "str",
            "attempt": "int",
            "deadline": "str",
            "stream": "bool",
            "session_id": "str",
            "workflow_code": "str",
            "request": "object",
        },
    ),
]

# -- the categories -------------------------------------------------------------------------------

Category = Callable[[Targets], st.SearchStrategy[Bad]]
CATEGORIES: dict[str, Category] = {}


def category(name: str) -> Callable[[Category], Category]:
    def register(make: Category) -> Category:
        CATEGORIES[name] = make
        return make

    return register


def _bad(name: str, subject: str, body: bytes, *reasons: DeadLetterReason) -> Bad:
    return Bad(name, subject, body, frozenset(r.value for r in reasons))


def _generic(inbox: Inbox) -> None:
    """Categories every inbox has: not JSON, cut short, not strict JSON, too large; and for typed
    messages wrong types and unknown fields."""
    prefix = inbox.name

    @category(f"{prefix}/random-bytes")
    def random_bytes(t: Targets) -> st.SearchStrategy[Bad]:
        return st.builds(
            lambda sb, data: _bad(f"{prefix}/random-bytes", sb[0], data, R.UNDECODABLE),
            inbox.valid(t),
            st.binary(max_size=64).filter(_undecodable),
        )

    @category(f"{prefix}/truncated")
    def truncated(t: Targets) -> st.SearchStrategy[Bad]:
        @st.composite
        def make(draw: st.DrawFn) -> Bad:
            subject, body = draw(inbox.valid(t))
            data = dumps(body, draw(st.booleans()))
            cut = data[: draw(st.integers(0, len(data) - 1))]
            return _bad(f"{prefix}/truncated", subject, cut, R.UNDECODABLE)

        return make().filter(lambda bad: _undecodable(bad.body))

    @category(f"{prefix}/not-strict-json")
    def not_strict(t: Targets) -> st.SearchStrategy[Bad]:
        """NaN, Infinity or -Infinity anywhere: at a random depth where the message takes any JSON (then
        it is its only fault), as a number field's value, or at a random depth in place of another
        field's value or in a field of its own."""

        @st.composite
        def make(draw: st.DrawFn) -> Bad:
            subject, body = draw(inbox.valid(t))
            hole = draw(holes())
            places = ["any"] if inbox.any_json is not None else []
            if inbox.fields:
                places += [f for f, kind in inbox.fields.items() if kind == "float"] + ["replace", "extra"]
            place = draw(st.sampled_from(places))
            key = draw(st.sampled_from(sorted(body))) if place == "replace" else place

            def put(x: Any) -> Any:
                if place == "any":
                    return {**body, inbox.any_json: hole(x)} if inbox.any_json else hole(x)
                if place in inbox.fields:  # a number field
                    return {**body, place: x}
                return {**body, key: hole(x)}  # in place of a field's value, or in a field of its own

            data = dumps(put(draw(non_strict)), draw(st.booleans()))
            # A message that is not valid either once the constant is a number (its "twin") may be
            # refused for that instead.
            reasons = [R.NOT_STRICT_JSON]
            if _invalid(inbox.adapter, dumps(put(1))):
                reasons.append(R.SCHEMA_INVALID)
            return _bad(f"{prefix}/not-strict-json", subject, data, *reasons)

        return make()

    def oversized(t: Targets) -> st.SearchStrategy[Bad]:
        return st.builds(
            lambda sb, extra: _bad(
                f"{prefix}/oversized", sb[0], dumps(inbox.bloat(sb[1], "x" * (LIMIT + extra))), R.TOO_LARGE
            ),
            inbox.valid(t),
            st.integers(1, 4096),
        )

    if inbox.size_limited:
        category(f"{prefix}/oversized")(oversized)

    if not inbox.fields:
        return

    @category(f"{prefix}/wrong-type")
    def wrong_type(t: Targets) -> st.SearchStrategy[Bad]:
        wrong: dict[str, st.SearchStrategy[Any]] = {
            "str": st.integers() | st.booleans() | st.lists(st.integers(), max_size=2) | st.just({}),
            "float": st.booleans() | st.text("abcxyz", min_size=1) | st.lists(st.integers(), max_size=2),
            "int": st.text("abcxyz", min_size=1)
            | st.lists(st.integers(), max_size=2)
            | st.just({})
            | st.floats(allow_nan=False, allow_infinity=False).filter(lambda x: not x.is_integer()),
            "bool": st.text("abcxyz", min_size=1) | st.lists(st.integers(), max_size=2) | st.integers(2),
            "object": st.integers() | st.booleans() | st.text("abcxyz") | st.lists(st.integers(), max_size=2),
        }

        @st.composite
        def make(draw: st.DrawFn) -> Bad:
            subject, body = draw(inbox.valid(t))
            key = draw(st.sampled_from(sorted(inbox.fields)))
            value = draw(wrong[inbox.fields[key]] | st.just("no_such_kind" if key == "kind" else []))
            return _bad(f"{prefix}/wrong-type", subject, dumps({**body, key: value}), R.SCHEMA_INVALID)

        return make().filter(lambda bad: _invalid(inbox.adapter, bad.body))

    @category(f"{prefix}/unknown-field")
    def unknown_field(t: Targets) -> st.SearchStrategy[Bad]:
        @st.composite
        def make(draw: st.DrawFn) -> Bad:
            subject, body = draw(inbox.valid(t))
            key = draw(texts.filter(lambda k: k not in body))
            value = draw(json_values)
            inner = next((k for k in ("result", "response", "request") if k in body), None)
            # One level down: the ToolResult, the LlmResponse, the LlmRequest.
            if inner is not None and draw(st.booleans()):
                changed = {**body, inner: {**body[inner], key: value}}
            else:
                changed = {**body, key: value}
            return _bad(f"{prefix}/unknown-field", subject, dumps(changed), R.SCHEMA_INVALID)

        return make().filter(lambda bad: _invalid(inbox.adapter, bad.body))


def _invalid(adapter: TypeAdapter[Any], data: bytes) -> bool:
    """True when `data` is JSON but not a valid message for the adapter."""
    try:
        adapter.validate_json(data)
    except ValidationError as exc:
        return not any(e["type"] == "json_invalid" for e in exc.errors(include_url=False))
    return False


for _inbox in INBOXES:
    _generic(_inbox)


def _start_with(
    name: str, key: str, values: Callable[[Targets], st.SearchStrategy[Any]], reason: DeadLetterReason
) -> None:
    """A category of starts whose field `key` holds one of `values`."""

    @category(name)
    def make(t: Targets) -> st.SearchStrategy[Bad]:
        return st.builds(
            lambda sb, value: _bad(name, sb[0], dumps({**sb[1], key: value}), reason), _start(t), values(t)
        )


_start_with("start/bad-case-key", "case_key", lambda _: not_plain | st.just(""), R.SCHEMA_INVALID)
_start_with(
    "start/unknown-workflow", "workflow_code", lambda _: texts.map(lambda c: f"no_such_{c}"), R.REFUSED
)
_start_with(
    "start/key-of-another-workflows-case", "case_key", lambda t: st.sampled_from(t.anchors), R.REFUSED
)


@category("start/nul")
def _start_nul(t: Targets) -> st.SearchStrategy[Bad]:
    @st.composite
    def make(draw: st.DrawFn) -> Bad:
        subject, body = draw(_start(t))
        if draw(st.booleans()):
            body = {**body, "session_id": draw(nul_texts)}
        else:
            nul = draw(nul_texts)
            leaf = nul if draw(st.booleans()) else {nul: draw(json_values)}
            body = {**body, "input": draw(holes())(leaf)}
        return _bad("start/nul", subject, dumps(body, draw(st.booleans())), R.UNSTORABLE)

    return make()


@category("start/huge-int")
def _start_huge(t: Targets) -> st.SearchStrategy[Bad]:
    return st.builds(
        lambda sb, fill, n: _bad("start/huge-int", sb[0], dumps({**sb[1], "input": fill(n)}), R.UNSTORABLE),
        _start(t),
        holes(),
        huge_ints,
    )


def _addressed(
    prefix: str,
    valid: Callable[[Targets], st.SearchStrategy[tuple[str, Any]]],
    subject_of: Callable[[str], str],
) -> None:
    """Categories of a message addressed to a case by its subject (commands, tool results): for a
    case nobody has; on one good case's subject, naming the other (which must not be touched); on a
    subject whose case token is no case key."""

    @category(f"{prefix}/unknown-case")
    def unknown(t: Targets) -> st.SearchStrategy[Bad]:
        return valid(t).map(lambda sb: _bad(f"{prefix}/unknown-case", sb[0], dumps(sb[1]), R.UNKNOWN_CASE))

    @category(f"{prefix}/key-mismatch")
    def mismatch(t: Targets) -> st.SearchStrategy[Bad]:
        return st.builds(
            lambda sb, flip: _bad(
                f"{prefix}/key-mismatch",
                subject_of(t.anchors[flip]),
                dumps({**sb[1], "case_key": t.anchors[1 - flip]}),
                R.KEY_MISMATCH,
            ),
            valid(t),
            st.integers(0, 1),
        )

    @category(f"{prefix}/bad-subject")
    def bad_subject(t: Targets) -> st.SearchStrategy[Bad]:
        # subject_of() refuses a token that is no case key: put one in a good subject's place.
        return st.builds(
            lambda sb, token: _bad(
                f"{prefix}/bad-subject",
                subject_of("PLACE").replace("PLACE", token),
                dumps(sb[1]),
                R.REFUSED,
                R.KEY_MISMATCH,
            ),
            valid(t),
            not_plain,
        )


_addressed("command", _command, subjects.case_command)
_addressed("result", _result, subjects.tool_result)
_addressed("llm-result", _llm_result, subjects.llm_result)


@category("event/nul")
def _event_nul(t: Targets) -> st.SearchStrategy[Bad]:
    @st.composite
    def make(draw: st.DrawFn) -> Bad:
        subject, _ = draw(_event(t))
        nul = draw(nul_texts)
        leaf = nul if draw(st.booleans()) else {nul: draw(json_values)}
        return _bad("event/nul", subject, dumps(draw(holes())(leaf), draw(st.booleans())), R.UNSTORABLE)

    return make()


@category("event/huge-int")
def _event_huge(t: Targets) -> st.SearchStrategy[Bad]:
    return st.builds(
        lambda sb, fill, n: _bad("event/huge-int", sb[0], dumps(fill(n)), R.UNSTORABLE),
        _event(t),
        holes(),
        huge_ints,
    )


def _canonical_event_subject(subject: str) -> bool:
    try:
        return subjects.event(*subjects.parse_event(subject)) == subject
    except ValueError:
        return False


@category("event/bad-subject")
def _event_bad_subject(t: Targets) -> st.SearchStrategy[Bad]:
    events = f"{subjects.PREFIX}.events"
    subject = st.one_of(
        st.just(f"{events}.fuzz"),  # no resource id
        st.builds(
            lambda s, more: f"{events}.fuzz.{t.run}-{s}.{'.'.join(more)}",
            plain,
            st.lists(plain, min_size=1, max_size=3),
        ),
        # An encoded id that does not decode, or that is not the id's canonical token.
        st.builds(
            lambda s: f"{events}.fuzz.~{s}", st.text(SUBJECT_ONLY_ALPHABET + "=", min_size=1, max_size=8)
        ),
        st.builds(lambda s: f"{events}.fuzz.~{base64.urlsafe_b64encode(s.encode()).decode()}", plain),
        st.builds(lambda kind, s: f"{events}.{kind}.{t.run}-{s}", not_plain, plain),
    ).filter(lambda s: not _canonical_event_subject(s))
    return st.builds(lambda s, v: _bad("event/bad-subject", s, dumps(v), R.REFUSED), subject, json_values)


@category("call/unknown-tool")
def _call_unknown_tool(t: Targets) -> st.SearchStrategy[Bad]:
    return st.builds(
        lambda sb, name: _bad(
            "call/unknown-tool",
            subjects.tool_call(f"no_such_{name}"),
            dumps({**sb[1], "tool": f"no_such_{name}"}),
            R.REFUSED,
        ),
        _call(t),
        plain,
    )


@category("call/tool-mismatch")
def _call_mismatch(t: Targets) -> st.SearchStrategy[Bad]:
    """A call of one tool sent on another's subject (tools the runner has, both)."""
    return _call(t).map(
        lambda sb: _bad("call/tool-mismatch", subjects.tool_call(t.other_tool), dumps(sb[1]), R.KEY_MISMATCH)
    )


@category("call/expired")
def _call_expired(t: Targets) -> st.SearchStrategy[Bad]:
    """A call whose deadline passed (before 2020: the same messages on every run of a seed)."""
    return st.builds(
        lambda sb, ago: _bad(
            "call/expired",
            sb[0],
            dumps({**sb[1], "deadline": (PAST - timedelta(seconds=ago)).isoformat()}),
            R.EXPIRED,
        ),
        _call(t),
        st.integers(0, 10**8),
    )


@category("result/nul")
def _result_nul(t: Targets) -> st.SearchStrategy[Bad]:
    """A result for a good case (a call it never made) with a NUL in a string the store would keep."""

    @st.composite
    def make(draw: st.DrawFn) -> Bad:
        key = draw(st.sampled_from(t.anchors))
        body = _result_body(t, key, draw(texts))
        nul = draw(nul_texts)
        where = draw(st.sampled_from(["content", "step", "runner"]))
        if where == "content":
            body["result"] = {**body["result"], "content": nul}
        else:
            body[where] = nul
        return _bad("result/nul", subjects.tool_result(key), dumps(body, draw(st.booleans())), R.UNSTORABLE)

    return make()


@category("llm-result/nul")
def _llm_result_nul(t: Targets) -> st.SearchStrategy[Bad]:
    """A model's answer for a good case (a call it never made) with a NUL in a string the store would keep."""

    @st.composite
    def make(draw: st.DrawFn) -> Bad:
        key = draw(st.sampled_from(t.anchors))
        body = _llm_result_body(t, key, draw(texts))
        nul = draw(nul_texts)
        where = draw(st.sampled_from(["content", "record", "route", "gateway"]))
        if where == "content":
            body["response"] = {**body["response"], "content": nul}
        else:
            body[where] = nul
        return _bad(
            "llm-result/nul", subjects.llm_result(key), dumps(body, draw(st.booleans())), R.UNSTORABLE
        )

    return make()


no_such_route = texts.map(lambda r: f"no_such_{r}")


@category("llm-call/unknown-route")
def _llm_call_unknown_route(t: Targets) -> st.SearchStrategy[Bad]:
    """A call of a route the gateway lacks: answered with a fatal error (to a case nobody has) and
    dead-lettered `refused`, code `unknown_route`."""
    return st.builds(
        lambda key, text, route, stream: Bad(
            "llm-call/unknown-route",
            subjects.LLM_CALLS,
            dumps({**_llm_call_body(t, key, text, route), "stream": stream}),
            frozenset({R.REFUSED.value}),
            "unknown_route",
        ),
        nobody(t),
        texts,
        no_such_route,
        st.booleans(),
    )


@category("llm-call/expired")
def _llm_call_expired(t: Targets) -> st.SearchStrategy[Bad]:
    """A call whose deadline passed (before 2020), on the gateway's route or on one it lacks (the
    deadline is judged first): never sent upstream."""
    return st.builds(
        lambda key, text, route, ago: _bad(
            "llm-call/expired",
            subjects.LLM_CALLS,
            dumps(
                {
                    **_llm_call_body(t, key, text, route),
                    "deadline": (PAST - timedelta(seconds=ago)).isoformat(),
                }
            ),
            R.EXPIRED,
        ),
        nobody(t),
        texts,
        st.just(ROUTE) | no_such_route,
        st.integers(0, 10**8),
    )


@category("llm-call/bad-case-key")
def _llm_call_bad_case_key(t: Targets) -> st.SearchStrategy[Bad]:
    """A case key that could not travel in the result's subject."""
    return st.builds(
        lambda sb, key: _bad(
            "llm-call/bad-case-key", sb[0], dumps({**sb[1], "case_key": key}), R.SCHEMA_INVALID
        ),
        _llm_call(t),
        not_plain | st.just(""),
    )


CALL_FIELDS = ["attempt", "call_id", "record", "session_id", "workflow_code", "deadline"]
REQUEST_FIELDS = ["model", "temperature", "max_tokens", "messages"]


@category("llm-call/bad-values")
def _llm_call_bad_values(t: Targets) -> st.SearchStrategy[Bad]:
    """Values of the right type out of their range: an attempt under 1, empty or too long names, a
    deadline without a time zone, a temperature out of 0..2, max_tokens under 1, a conversation
    that does not hold together (a tool message without its call, a user message with tool calls,
    a role there is none of)."""
    long = st.text(PLAIN_ALPHABET, min_size=201, max_size=300)
    naive = st.datetimes().map(lambda d: d.isoformat())  # no time zone
    bad_messages = st.sampled_from(
        [
            [{"role": "tool", "content": "x"}],
            [{"role": "user", "content": "x", "tool_call_id": "c1"}],
            [{"role": "user", "content": "x", "is_error": True}],
            [
                {
                    "role": "user",
                    "content": "x",
                    "tool_calls": [{"id": "c1", "name": "echo", "arguments": "{}"}],
                }
            ],
            [{"role": "nobody", "content": "x"}],
            [{"content": "x"}],
        ]
    )

    @st.composite
    def make(draw: st.DrawFn) -> Bad:
        subject, body = draw(_llm_call(t))
        request = body["request"]
        where = draw(st.sampled_from(CALL_FIELDS + REQUEST_FIELDS))
        value: Any
        if where == "attempt":
            value = draw(st.integers(max_value=0))
        elif where == "deadline":
            value = draw(naive)
        elif where in ("session_id", "workflow_code"):  # optional, but at most 200 characters
            value = draw(long)
        elif where == "record":  # 1 to 1000 characters
            value = draw(st.just("") | st.text(PLAIN_ALPHABET, min_size=1001, max_size=1100))
        elif where == "call_id":  # 1 to 200 plain token characters
            value = draw(st.just("") | long | not_plain)
        elif where == "model":  # 1 to 200 characters
            value = draw(st.just("") | long)
        elif where == "temperature":
            value = draw(
                st.floats(max_value=-0.001, allow_nan=False, allow_infinity=False)
                | st.floats(min_value=2.001, allow_nan=False, allow_infinity=False)
            )
        elif where == "max_tokens":
            value = draw(st.integers(max_value=0))
        else:
            value = draw(bad_messages)
        if where in REQUEST_FIELDS:
            body = {**body, "request": {**request, where: value}}
        else:
            body = {**body, where: value}
        return _bad("llm-call/bad-values", subject, dumps(body), R.SCHEMA_INVALID)

    return make().filter(lambda bad: _invalid(LLM_CALL_REQUEST_ADAPTER, bad.body))


@category("llm-call/nul")
def _llm_call_nul(t: Targets) -> st.SearchStrategy[Bad]:
    """A NUL character in what the call's result carries back to the schedulers, which store it."""

    @st.composite
    def make(draw: st.DrawFn) -> Bad:
        subject, body = draw(_llm_call(t))
        body = {**body, "record": draw(nul_texts)}  # a call id with a NUL is no plain token: schema_invalid
        return _bad("llm-call/nul", subject, dumps(body, draw(st.booleans())), R.UNSTORABLE)

    return make()


def problem(bad: Bad) -> str | None:
    """Why `bad` is not bad the way its expected reasons say (a fault of this generator), or None."""
    inbox = next(i for i in INBOXES if bad.category.startswith(i.name + "/"))
    reasons = bad.expected
    if R.TOO_LARGE in reasons:
        return None if len(bad.body) > LIMIT else "not over the size limit"
    if len(bad.body) > LIMIT:
        return "over the size limit"
    if R.UNDECODABLE in reasons:
        return None if _undecodable(bad.body) else "JSON after all"
    if _undecodable(bad.body):
        return "not JSON"
    if R.NOT_STRICT_JSON in reasons:
        return "strict JSON after all" if _strict(bad.body) else None
    if not _strict(bad.body):
        return "not strict JSON"
    if R.SCHEMA_INVALID in reasons:
        return None if _invalid(inbox.adapter, bad.body) else "a valid message after all"
    if _invalid(inbox.adapter, bad.body):
        return "not a valid message"
    unstorable = _unstorable(json.loads(bad.body))
    if R.UNSTORABLE in reasons:
        return None if unstorable else "nothing unstorable in it"
    return "it holds an unstorable value" if unstorable else None


def _unstorable(value: Any) -> bool:
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return not -(2**63) <= value < 2**64
    if isinstance(value, list):
        return any(_unstorable(v) for v in value)
    if isinstance(value, dict):
        return any(_unstorable(k) or _unstorable(v) for k, v in value.items())
    return False


def generate(targets: Targets, examples: int, seed: int) -> list[Bad]:
    """`examples` bad messages, shared out evenly over the categories (at least one each), in an
    order shuffled by `seed`; the same seed gives the same messages."""
    plan: list[Bad] = []
    names = sorted(CATEGORIES)
    for n, name in enumerate(names):
        share = max(1, examples // len(names) + (n < examples % len(names)))

        @hypothesis_seed(seed)
        @settings(
            max_examples=share,
            deadline=None,
            database=None,
            phases=[Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
        @given(CATEGORIES[name](targets))
        def collect(bad: Bad) -> None:
            plan.append(bad)

        collect()
    random.Random(seed).shuffle(plan)
    return plan


# -- running it -----------------------------------------------------------------------------------


class GoodCases:
    """Good cases of `e2e_wait_then_model` (a tool loop of naps on the runner, then a model call
    through the gateway), each given its event once it waits."""

    def __init__(self, nc: Client, db: CaseDb, run: str) -> None:
        self._nc = nc
        self._db = db
        self._run = run
        self.keys: list[str] = []
        self._sent: set[str] = set()

    @staticmethod
    def question(key: str) -> str:
        return f"good {key}"

    @classmethod
    def output(cls, key: str) -> Any:
        # The scripted model server's `text` echoes the question.
        return {"event": {"good": key}, "answer": f"ok {key}", "model": f"echo: {cls.question(key)}"}

    async def start(self, key: str | None = None) -> str:
        key = key or f"{self._run}-good{len(self.keys)}"
        spec = {
            "rounds": [[nap(0.05, key)]],
            "answer": f"ok {key}",
            "model": {"route": ROUTE, "question": self.question(key)},
        }
        await publish_start(self._nc, GOOD_WORKFLOW, key, spec)
        self.keys.append(key)
        return key

    async def release(self) -> None:
        """The event of each case that waits for it now."""
        waiting = [k for k in self.keys if k not in self._sent]
        if not waiting:
            return
        states = await self._db.states(waiting)
        for key in waiting:
            if states.get(key) == "waiting":
                await publish_event(self._nc, "order", key, {"good": key}, msg_id=f"ev-{key}")
                self._sent.add(key)

    async def finish(self, within: float) -> dict[str, str]:
        """Release and wait until every case finished; what is wrong with those that did not."""
        deadline = time.monotonic() + within
        while True:
            await self.release()
            states = await self._db.states(self.keys)
            if all(states.get(k) == "finished" for k in self.keys) or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.1)
        lost = {k: f"{states.get(k, 'never created')} after {within:g} s" for k in self.keys}
        for key in self.keys:
            if states.get(key) == "finished":
                output = (await self._db.case(key))["output"]
                if output == self.output(key):
                    del lost[key]
                else:
                    lost[key] = f"finished with output {output!r}"
        return lost


CONSUMERS = [
    (subjects.STREAM_CASES, subjects.CONSUMER_START),
    (subjects.STREAM_CASES, subjects.CONSUMER_COMMANDS),
    (subjects.STREAM_EVENTS, subjects.CONSUMER_EVENTS),
    (subjects.STREAM_TOOLS, subjects.CONSUMER_TOOL_CALLS),
    (subjects.STREAM_TOOL_RESULTS, subjects.CONSUMER_TOOL_RESULTS),
    (subjects.STREAM_LLM_RESULTS, subjects.CONSUMER_LLM_RESULTS),
    (subjects.STREAM_LLM, subjects.CONSUMER_LLM_CALLS),
]


async def settle(js: JetStreamContext, within: float) -> list[str]:
    """Wait until no consumer has a message left to deliver or to settle (twice in a row); what was
    still pending when `within` ran out."""
    deadline = time.monotonic() + within
    quiet = 0
    while True:
        busy = []
        for stream, durable in CONSUMERS:
            info = await js.consumer_info(stream, durable)
            if info.num_pending or info.num_ack_pending:
                busy.append(f"{durable}: {info.num_pending} pending, {info.num_ack_pending} unacknowledged")
        quiet = 0 if busy else quiet + 1
        if quiet >= 2:
            return []
        if time.monotonic() > deadline:
            return busy
        await asyncio.sleep(0.25)


VERDICTS = {
    "ok": "one dead letter, on its first delivery, from its subject, for a reason its category allows",
    "none": "no dead letter",
    "late": "dead-lettered on a later delivery",
    "many": "more than one dead letter",
    "reason": "dead-lettered for a reason (or with an error code) its category does not allow",
    "subject": "its dead letter names another subject",
}


@dataclass
class Report:
    """What came of one run; `ok` when nothing went wrong, `summary()` says what did."""

    seed: int
    sent: list[tuple[str, Bad]]
    letters: list[DeadLetter]
    lost: dict[str, str]
    good_keys: list[str]
    ran_twice: list[str] = field(default_factory=list)
    unsettled: list[str] = field(default_factory=list)

    def verdicts(self) -> Iterator[tuple[Bad, str, str | None]]:
        """(message, its verdict: a key of `VERDICTS`, a detail) for every bad message."""
        by_id: dict[str | None, list[DeadLetter]] = defaultdict(list)
        for letter in self.letters:
            by_id[letter.msg_id].append(letter)
        for msg_id, bad in self.sent:
            found = by_id.get(msg_id, [])
            if not found:
                yield bad, "none", None
                continue
            letter = found[0]
            detail = (
                f"{letter.reason.value} on delivery {letter.delivery_count}: {letter.error.message[:160]}"
            )
            if len(found) > 1:
                yield bad, "many", f"{len(found)} dead letters; the first {detail}"
            elif letter.delivery_count != 1:
                yield bad, "late", detail
            elif letter.reason.value not in bad.expected:
                yield bad, "reason", f"{detail}; expected {' or '.join(sorted(bad.expected))}"
            elif bad.code is not None and letter.error.code != bad.code:
                yield bad, "reason", f"{detail}; expected the code {bad.code}, not {letter.error.code}"
            elif letter.subject != bad.subject:
                yield bad, "subject", letter.subject
            else:
                yield bad, "ok", None

    def about_good_cases(self) -> list[DeadLetter]:
        """Dead letters of good traffic: not of a fuzzed message, and naming a good case."""
        fuzzed = {msg_id for msg_id, _ in self.sent}
        return [
            letter
            for letter in self.letters
            if letter.msg_id not in fuzzed and any(k in letter.model_dump_json() for k in self.good_keys)
        ]

    def others(self) -> list[DeadLetter]:
        """Dead letters of neither a fuzzed message nor good traffic (results of calls that ran, ...)."""
        fuzzed = {msg_id for msg_id, _ in self.sent}
        mine = {id(x) for x in self.about_good_cases()}
        return [x for x in self.letters if x.msg_id not in fuzzed and id(x) not in mine]

    @property
    def ok(self) -> bool:
        return (
            all(v == "ok" for _, v, _ in self.verdicts())
            and not self.lost
            and not self.about_good_cases()
            and not self.ran_twice
        )

    def summary(self, examples_per_verdict: int = 3) -> str:
        verdicts = list(self.verdicts())
        table: dict[str, Counter[str]] = defaultdict(Counter)
        shown: Counter[tuple[str, str]] = Counter()
        examples = []
        for bad, verdict, detail in verdicts:
            table[bad.category][verdict] += 1
            if verdict != "ok" and shown[(bad.category, verdict)] < examples_per_verdict:
                shown[(bad.category, verdict)] += 1
                examples.append(
                    f"  [{bad.category}] {verdict}: {bad.preview()}{f' ({detail})' if detail else ''}"
                )
        failed = sum(v != "ok" for _, v, _ in verdicts)
        out = [
            f"fuzz_bus (seed {self.seed}): {len(verdicts)} bad messages in {len(table)} categories, "
            f"{len(self.good_keys)} good cases",
            f"{'PASSED' if self.ok else 'FAILED'}: {failed} bad messages not refused as they should be, "
            f"{len(self.lost)} good cases lost",
            "",
            f"{'category':40} {'sent':>5}" + "".join(f"{v:>8}" for v in VERDICTS),
        ]
        for name in sorted(table):
            counts = table[name]
            out.append(
                f"{name:40} {sum(counts.values()):5}" + "".join(f"{counts[v] or '':>8}" for v in VERDICTS)
            )
        out += ["", *(f"{v:>8}: {meaning}" for v, meaning in VERDICTS.items())]
        if examples:
            out += ["", "examples:", *examples]
        if self.lost:
            out += ["", "good cases lost:", *(f"  {k}: {why}" for k, why in sorted(self.lost.items()))]
        if self.ran_twice:
            out += ["", "ran more than once:", *(f"  {what}" for what in self.ran_twice)]
        if about := self.about_good_cases():
            out += ["", "dead letters of good traffic:"]
            out += [f"  {x.subject} ({x.reason.value}): {x.error.message[:160]}" for x in about]
        if others := self.others():
            counts = Counter(f"{x.subject.rsplit('.', 1)[0]}.* {x.reason.value}" for x in others)
            out += ["", "other dead letters (of what fuzzed messages made the services send; not judged):"]
            out += [f"  {n} × {what}" for what, n in counts.most_common()]
        if self.unsettled:
            out += ["", "still pending at the end:", *(f"  {u}" for u in self.unsettled)]
        return "\n".join(out)


async def fuzz(examples: int, seed: int, server_url: str, workdir: Path, *, settle_s: float = 60.0) -> Report:
    """One run (see the module's docstring); the services' logs stay in `workdir`."""
    targets = Targets.for_seed(seed)
    plan = generate(targets, examples, seed)
    faulty = [(bad.category, why, bad.preview()) for bad in plan if (why := problem(bad))]
    assert not faulty, f"the generator made messages that are not bad as said: {faulty[:5]}"
    server = NatsServer(workdir / "nats")
    await asyncio.to_thread(server.start)
    try:
        async with fresh_database(server_url, "tianshu_fuzz") as db_url, ModelServer() as upstream:
            stack = Stack(workdir, server.url, db_url)
            gateway = GatewayProcess(
                workdir, server.url, providers(workdir / "providers.yaml", upstream), **GATEWAY_ENV
            )
            try:
                return await _drive(stack, gateway, upstream, targets, plan, seed, settle_s)
            finally:
                gateway.kill()
                stack.close()
    finally:
        server.stop()


def providers(path: Path, upstream: ModelServer) -> Path:
    """The gateway's providers file: the route `ROUTE`, one model at the scripted server (`text`)."""
    return write_config(
        path,
        {
            "providers": [
                {
                    "name": "scripted",
                    "kind": "openai",
                    "base_url": upstream.openai_base_url,
                    "api_key_env": ["TIANSHU_FUZZ_MODEL_KEY"],
                }
            ],
            "models": [{"name": "fuzz-model", "provider": "scripted", "upstream": "text"}],
            "routes": [{"name": ROUTE, "chain": ["fuzz-model"]}],
        },
    )


async def _drive(
    stack: Stack,
    gateway: GatewayProcess,
    upstream: ModelServer,
    targets: Targets,
    plan: list[Bad],
    seed: int,
    settle_s: float,
) -> Report:
    await asyncio.gather(
        asyncio.to_thread(stack.scheduler, **BUDGET),
        stack.start_runners(1, None, **BUDGET),
        asyncio.to_thread(gateway.start),
    )
    nc = await nats.connect(stack.nats_url)
    db = await CaseDb.open(stack.db_url)
    try:
        js = nc.jetstream()
        good = GoodCases(nc, db, targets.run)
        async with StreamReader(js, subjects.DEAD_LETTERS) as dlq:
            for key in targets.anchors:
                await good.start(key)
            await db.wait_all(
                list(targets.anchors),
                "waiting",
                within=30,
                context=lambda: f"{stack.logs()}\n--- {gateway.name}\n{gateway.log_tail(20)}",
            )
            sent = []
            for i, bad in enumerate(plan):
                msg_id = f"{targets.run}-bad{i:05d}"
                await js.publish(bad.subject, bad.body, headers={subjects.HEADER_MSG_ID: msg_id})
                sent.append((msg_id, bad))
                if i % GOOD_EVERY == GOOD_EVERY - 1:
                    await good.start()
                    await good.release()
            lost = await good.finish(within=settle_s)
            unsettled = await settle(js, within=settle_s)
            stored = (await js.stream_info(subjects.STREAM_DLQ)).state.messages
            with contextlib.suppress(AssertionError):
                await dlq.until(lambda: len(dlq.messages) >= stored, within=10, what="the dead letters")
            letters = [DEAD_LETTER_ADAPTER.validate_json(m.data) for m in dlq.messages]
        ran = executions(stack.workdir)
        calls = Counter(r.tag for r in tool_runs(stack.tool_log))
        twice = [
            f"{k} step {s}: {ran[(k, s)]} times"
            for k in good.keys
            for s in ("before", "after")
            if ran[(k, s)] > 1
        ]
        twice += [f"{k} tool call: {calls[k]} times" for k in good.keys if calls[k] > 1]
        asked = Counter(_question(r.body) for r in upstream.stats.requests)
        twice += [
            f"{k} model call: {asked[good.question(k)]} times"
            for k in good.keys
            if asked[good.question(k)] > 1
        ]
        return Report(seed, sent, letters, lost, good.keys, twice, unsettled)
    finally:
        await db.close()
        await nc.close()


def _question(body: dict[str, Any]) -> str | None:
    """The last user message of a request to the model server, as the scripted `text` echoes it."""
    users = [m.get("content") for m in body.get("messages", []) if m.get("role") == "user"]
    return users[-1] if users and isinstance(users[-1], str) else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.fuzz_bus", description=(__doc__ or "").split("\n\n")[0]
    )
    parser.add_argument("--examples", type=int, default=500, help="bad messages to send (default 500)")
    parser.add_argument("--seed", type=int, default=None, help="replay a run (default: a random seed)")
    parser.add_argument(
        "--database-url",
        default=None,
        help="a Postgres server to make the run's database on (default: tests._pg)",
    )
    parser.add_argument(
        "--workdir", type=Path, default=None, help="where the services' logs go (default: a temp dir)"
    )
    parser.add_argument(
        "--settle-s",
        type=float,
        default=60.0,
        help="how long good cases and pending messages may take (default 60)",
    )
    options = parser.parse_args(argv)
    seed = options.seed if options.seed is not None else random.randrange(2**31)
    workdir = options.workdir or Path(tempfile.mkdtemp(prefix="tianshu-fuzz-"))
    workdir.mkdir(parents=True, exist_ok=True)
    print(f"fuzz_bus: seed {seed}, {options.examples} examples, logs in {workdir}", flush=True)

    async def run(url: str) -> Report:
        return await fuzz(options.examples, seed, url, workdir, settle_s=options.settle_s)

    if options.database_url:
        report = asyncio.run(run(options.database_url))
    else:
        with postgres_server() as url:
            report = asyncio.run(run(url))
    print(report.summary())
    if not report.ok:
        print(
            f"replay: python -m tests.fuzz_bus --examples {options.examples} --seed {seed}", file=sys.stderr
        )
    return 0 if report.ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
