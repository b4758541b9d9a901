"""Every NATS subject, stream, durable consumer and queue group Tianshu uses, in one place.

Subjects carry the contract's version (`tianshu.v1.…`); a breaking change gets a new namespace.

| subject | carries | stream |
|---|---|---|
| `tianshu.v1.cases.start` | `StartCase`, fire and forget | TIANSHU_CASES |
| `tianshu.v1.cases.<case_key>.command` | `CaseCommand`: cancel, pause, resume | TIANSHU_CASES |
| `tianshu.v1.events.<resource_type>.<resource_id>` | an outside event (any JSON) | TIANSHU_EVENTS |
| `tianshu.v1.rpc.cases.start` | `StartCase` request; reply `StartCaseReply` | none |
| `tianshu.v1.rpc.cases.get` | `GetCase` request; reply `GetCaseReply` | none |
| `tianshu.v1.rpc.cases.list` | `ListCases` request; reply `ListCasesReply` | none |
| `tianshu.v1.cases.<case_key>.updated` | `CaseUpdated`: the case changed state | none |
| `tianshu.v1.cases.<case_key>.finished` | `CaseFinished`: ended, failed or cancelled | none |
| `tianshu.v1.errors.<origin>` | `Refusal` of a message sent on `tianshu.v1.<origin>` | none |
| `tianshu.v1.dlq.<origin>` | `DeadLetter` of a message from `tianshu.v1.<origin>` | TIANSHU_DLQ |
| `tianshu.v1.tools.calls.<tool>` | `ToolCallRequest`, for any tool runner | TIANSHU_TOOLS |
| `tianshu.v1.tools.results.<case_key>` | `ToolCallResult` of the case's call | TIANSHU_TOOL_RESULTS |
| `tianshu.v1.llm.calls` | `LlmCallRequest`, for any LLM gateway | TIANSHU_LLM |
| `tianshu.v1.llm.results.<case_key>` | `LlmCallResult` of the case's model call | TIANSHU_LLM_RESULTS |
| `tianshu.v1.llm.stream.<case_key>.<call_id>` | `LlmStreamChunk`s of a streamed call | TIANSHU_LLM_STREAM |

"none" means core NATS: not stored, seen only by those subscribed at the time.

Why these choices:

- A request cannot share a subject with a stream: JetStream answers any message it stores with a
  publish acknowledgement sent to the reply subject, which would reach the requester before the
  scheduler's reply. So requests live under `tianshu.v1.rpc.`, which no stream captures.
- Commands name their case in the subject, so `tianshu.v1.cases.<key>.>` shows everything about one
  case, and permissions can be granted per case. The body repeats the key (a message must make
  sense on its own in the DLQ); `case_command(cmd)` builds the subject from the body, and a consumer
  refuses a command whose body disagrees with its subject.
- Notifications and refusals are core NATS: a client subscribes first, then reads the case
  (`tianshu.v1.rpc.cases.get`) to cover a case that ended before it subscribed. Postgres, not NATS,
  is the record; the DLQ stream keeps every refused message durably.
- Tool calls go to a stream (TIANSHU_TOOLS) that every runner pulls from through one durable
  consumer (`tianshu-tool-runner`): each call goes to one runner, and adding runners adds capacity.
  The stream keeps calls a day, answered or not, so that a call sent again under its id is dropped
  as a duplicate even after a NATS restart (a work queue forgets the ids of what it removed). Model
  calls go to TIANSHU_LLM the same way. Results go to their own stream, by case, so a result
  outlives a scheduler restart and reaches whichever scheduler holds the case.
- Resource ids are encoded with `tokens.encode_token`; resource types and case keys are plain tokens.
"""

from __future__ import annotations

from typing import Final

from .tokens import decode_token, encode_token, require_plain

VERSION: Final = "v1"
PREFIX: Final = f"tianshu.{VERSION}"

# Subjects and subject patterns.
CASES_START: Final = f"{PREFIX}.cases.start"
CASE_COMMANDS: Final = f"{PREFIX}.cases.*.command"
CASE_UPDATES: Final = f"{PREFIX}.cases.*.updated"
CASE_FINISHES: Final = f"{PREFIX}.cases.*.finished"
EVENTS: Final = f"{PREFIX}.events.>"
RPC_CASES_START: Final = f"{PREFIX}.rpc.cases.start"
RPC_CASES_GET: Final = f"{PREFIX}.rpc.cases.get"
RPC_CASES_LIST: Final = f"{PREFIX}.rpc.cases.list"
ERRORS: Final = f"{PREFIX}.errors.>"
DEAD_LETTERS: Final = f"{PREFIX}.dlq.>"
TOOL_CALLS: Final = f"{PREFIX}.tools.calls.*"
TOOL_RESULTS: Final = f"{PREFIX}.tools.results.*"
LLM_CALLS: Final = f"{PREFIX}.llm.calls"
LLM_RESULTS: Final = f"{PREFIX}.llm.results.*"
LLM_STREAMS: Final = f"{PREFIX}.llm.stream.>"

# Streams.
STREAM_CASES: Final = "TIANSHU_CASES"
STREAM_EVENTS: Final = "TIANSHU_EVENTS"
STREAM_DLQ: Final = "TIANSHU_DLQ"
STREAM_TOOLS: Final = "TIANSHU_TOOLS"
STREAM_TOOL_RESULTS: Final = "TIANSHU_TOOL_RESULTS"
STREAM_LLM: Final = "TIANSHU_LLM"
STREAM_LLM_RESULTS: Final = "TIANSHU_LLM_RESULTS"
STREAM_LLM_STREAM: Final = "TIANSHU_LLM_STREAM"

STREAM_SUBJECTS: Final[dict[str, tuple[str, ...]]] = {
    STREAM_CASES: (CASES_START, CASE_COMMANDS),
    STREAM_EVENTS: (EVENTS,),
    STREAM_DLQ: (DEAD_LETTERS,),
    STREAM_TOOLS: (TOOL_CALLS,),
    STREAM_TOOL_RESULTS: (TOOL_RESULTS,),
    STREAM_LLM: (LLM_CALLS,),
    STREAM_LLM_RESULTS: (LLM_RESULTS,),
    STREAM_LLM_STREAM: (LLM_STREAMS,),
}
"""Which subjects each stream captures; no two overlap, and none captures `tianshu.v1.rpc.>`."""

# Durable pull consumers, shared by every scheduler replica, and the replicas' queue group.
CONSUMER_START: Final = "tianshu-scheduler-start"
CONSUMER_COMMANDS: Final = "tianshu-scheduler-commands"
CONSUMER_EVENTS: Final = "tianshu-scheduler-events"
QUEUE_SCHEDULER: Final = "tianshu-scheduler"
# The tool runners' shared durable consumer of TIANSHU_TOOLS, and the schedulers' of the results.
CONSUMER_TOOL_CALLS: Final = "tianshu-tool-runner"
CONSUMER_TOOL_RESULTS: Final = "tianshu-scheduler-tool-results"
# The LLM gateways' shared durable consumer of TIANSHU_LLM, and the schedulers' of the results.
CONSUMER_LLM_CALLS: Final = "tianshu-llm-gateway"
CONSUMER_LLM_RESULTS: Final = "tianshu-scheduler-llm-results"

# Headers.
HEADER_MSG_ID: Final = "Nats-Msg-Id"
HEADER_DEAD_LETTER_REASON: Final = "Tianshu-Dead-Letter-Reason"

_ROOT = PREFIX + "."


def case_command(case_key: str) -> str:
    """`tianshu.v1.cases.<case_key>.command`."""
    return f"{PREFIX}.cases.{require_plain(case_key, 'case key')}.command"


def case_updated(case_key: str) -> str:
    """`tianshu.v1.cases.<case_key>.updated`."""
    return f"{PREFIX}.cases.{require_plain(case_key, 'case key')}.updated"


def case_finished(case_key: str) -> str:
    """`tianshu.v1.cases.<case_key>.finished`: subscribe here to await a case's output."""
    return f"{PREFIX}.cases.{require_plain(case_key, 'case key')}.finished"


def tool_call(tool: str) -> str:
    """`tianshu.v1.tools.calls.<tool>`: where calls of `tool` are published."""
    return f"{PREFIX}.tools.calls.{require_plain(tool, 'tool name')}"


def tool_result(case_key: str) -> str:
    """`tianshu.v1.tools.results.<case_key>`: where the results of the case's tool calls arrive."""
    return f"{PREFIX}.tools.results.{require_plain(case_key, 'case key')}"


def llm_result(case_key: str) -> str:
    """`tianshu.v1.llm.results.<case_key>`: where the answers to the case's model calls arrive."""
    return f"{PREFIX}.llm.results.{require_plain(case_key, 'case key')}"


def llm_stream(case_key: str, call_id: str) -> str:
    """`tianshu.v1.llm.stream.<case_key>.<call_id>`: a streamed model call's events."""
    return f"{PREFIX}.llm.stream.{require_plain(case_key, 'case key')}.{require_plain(call_id, 'call id')}"


def llm_streams_of(case_key: str) -> str:
    """`tianshu.v1.llm.stream.<case_key>.*`: every streamed model call of a case."""
    return f"{PREFIX}.llm.stream.{require_plain(case_key, 'case key')}.*"


def case_key_of(subject: str) -> str:
    """The case key in `tianshu.v1.cases.<case_key>.<verb>`; ValueError for any other subject."""
    tokens = subject.split(".")
    if len(tokens) != 5 or not subject.startswith(f"{PREFIX}.cases."):
        raise ValueError(f"{subject!r} is not a per-case subject ({PREFIX}.cases.<case_key>.<verb>)")
    return require_plain(tokens[3], "case key")


def event(resource_type: str, resource_id: str) -> str:
    """`tianshu.v1.events.<resource_type>.<encoded resource_id>`."""
    return f"{PREFIX}.events.{require_plain(resource_type, 'resource type')}.{encode_token(resource_id)}"


def parse_event(subject: str) -> tuple[str, str]:
    """(resource type, resource id) of an event subject; ValueError when it is not one."""
    tokens = subject.split(".")
    if len(tokens) != 5 or not subject.startswith(f"{PREFIX}.events."):
        raise ValueError(
            f"{subject!r} is not an event subject ({PREFIX}.events.<resource_type>.<resource_id>)"
        )
    return require_plain(tokens[3], "resource type"), decode_token(tokens[4])


def _origin(subject: str) -> str:
    # A subject outside the namespace keeps its whole name under `foreign.` so it stays traceable.
    return subject[len(_ROOT) :] if subject.startswith(_ROOT) else f"foreign.{subject}"


def refusal(subject: str) -> str:
    """Where a refusal of a message published on `subject` is announced: `tianshu.v1.errors.<origin>`."""
    return f"{PREFIX}.errors.{_origin(subject)}"


def dead_letter(subject: str) -> str:
    """Where a dead letter from `subject` is stored: `tianshu.v1.dlq.<origin>`."""
    return f"{PREFIX}.dlq.{_origin(subject)}"


def matches(pattern: str, subject: str) -> bool:
    """NATS subject matching: `*` is one token, a final `>` is one or more tokens."""
    pat, sub = pattern.split("."), subject.split(".")
    for i, token in enumerate(pat):
        if token == ">":
            return len(sub) > i
        if i >= len(sub) or (token != "*" and token != sub[i]):
            return False
    return len(pat) == len(sub)


def overlap(a: str, b: str) -> bool:
    """True when some subject matches both patterns."""
    ta, tb = a.split("."), b.split(".")
    for i in range(max(len(ta), len(tb))):
        x = ta[i] if i < len(ta) else None
        y = tb[i] if i < len(tb) else None
        if x == ">" or y == ">":
            return x is not None and y is not None
        if x is None or y is None:
            return False
        if x != y and "*" not in (x, y):
            return False
    return True
