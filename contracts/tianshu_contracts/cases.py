"""Starting, commanding and reading cases."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AwareDatetime, Field, JsonValue, TypeAdapter

from ._base import CaseKey, Message, Name, WireModel
from .errors import WireError
from .gateway import UsageSummary

ExecutionState = Literal["running", "waiting", "finished", "failed"]
"""Where a case is in its run (the values of `tianshu_core.ExecutionState`)."""

LifecycleState = Literal["normal", "pause", "stop"]
"""What an operator asked of a case (the values of `tianshu_core.Lifecycle`)."""


class StartCase(Message):
    """Create a case of `workflow_code` and run it; idempotent on `case_key`.

    Published on `tianshu.v1.cases.start` (fire and forget) or sent as a request on
    `tianshu.v1.rpc.cases.start`. Without a case key the scheduler derives one from the message's
    `Nats-Msg-Id` (or makes a fresh one when there is none), so a redelivery starts nothing twice.
    """

    kind: Literal["start_case"] = "start_case"
    workflow_code: Name
    case_key: CaseKey | None = None
    session_id: Name | None = Field(default=None, description="Defaults to the case key.")
    input: JsonValue = Field(default=None, description="The workflow's input, any JSON.")


class StartCaseAccepted(Message):
    """The case exists (`created` is false when it already did: the start was a repeat)."""

    kind: Literal["start_case_accepted"] = "start_case_accepted"
    case_key: CaseKey
    session_id: Name
    workflow_code: Name
    created: bool


class RequestRefused(Message):
    """A request was refused: malformed, unknown workflow, invalid input, or the case is another's."""

    kind: Literal["request_refused"] = "request_refused"
    error: WireError


StartCaseReply = Annotated[StartCaseAccepted | RequestRefused, Field(discriminator="kind")]
"""The reply to a `StartCase` request."""


class CancelCase(Message):
    """Stop a case for good at its next step boundary."""

    kind: Literal["cancel_case"] = "cancel_case"
    case_key: CaseKey
    reason: str | None = Field(default=None, max_length=1000)


class PauseCase(Message):
    """Hold a case: it does not run until resumed (events still reach its inbox)."""

    kind: Literal["pause_case"] = "pause_case"
    case_key: CaseKey
    reason: str | None = Field(default=None, max_length=1000)


class ResumeCase(Message):
    """Let a paused case run again."""

    kind: Literal["resume_case"] = "resume_case"
    case_key: CaseKey
    reason: str | None = Field(default=None, max_length=1000)


CaseCommand = Annotated[CancelCase | PauseCase | ResumeCase, Field(discriminator="kind")]
"""What `tianshu.v1.cases.<case_key>.command` carries."""


class GetCase(Message):
    """Ask for a case's summary (a request on `tianshu.v1.rpc.cases.get`)."""

    kind: Literal["get_case"] = "get_case"
    case_key: CaseKey


class CaseSummary(WireModel):
    """What a client may read about a case."""

    case_key: CaseKey
    session_id: str
    workflow_code: str
    execution_state: ExecutionState
    lifecycle_state: LifecycleState
    parent_key: str | None = None
    child_keys: list[str] = Field(default_factory=list)
    input: JsonValue = None
    finished_type: str | None = None
    finished_description: str | None = None
    output: JsonValue = None
    error: WireError | None = None
    created_at: AwareDatetime
    updated_at: AwareDatetime
    trace_id: str | None = Field(
        default=None,
        description="The trace every run of the case is a span in (32 hex digits; look it up in "
        "Jaeger); null when tracing was off when the case started.",
    )
    usage: UsageSummary | None = Field(
        default=None,
        description="Tokens and estimated cost of the case's model calls (every attempt counted); "
        "null when it made none.",
    )


class CaseFound(Message):
    """The case, as stored."""

    kind: Literal["case_found"] = "case_found"
    case: CaseSummary


class CaseNotFound(Message):
    """No case has this key."""

    kind: Literal["case_not_found"] = "case_not_found"
    case_key: CaseKey


GetCaseReply = Annotated[CaseFound | CaseNotFound | RequestRefused, Field(discriminator="kind")]
"""The reply to a `GetCase` request."""


class ListCases(Message):
    """Ask for a page of cases, oldest first (a request on `tianshu.v1.rpc.cases.list`).

    Filters left out match any case. The first page has no cursor; each next one passes the
    `next_cursor` of the page before (a keyset: a deep page costs what the first one costs)."""

    kind: Literal["list_cases"] = "list_cases"
    session_id: Name | None = None
    workflow_code: Name | None = None
    execution_state: ExecutionState | None = None
    lifecycle_state: LifecycleState | None = None
    parent_key: CaseKey | None = None
    limit: int = Field(default=50, ge=1, le=500)
    cursor: str | None = Field(
        default=None, min_length=1, max_length=1000, description="The `next_cursor` of the page before."
    )


class CasesPage(Message):
    """A page of cases, oldest first; summaries without `input`, `output` and `usage` (ask
    `GetCase` for those), so a page fits in one message."""

    kind: Literal["cases_page"] = "cases_page"
    cases: list[CaseSummary]
    next_cursor: str | None = Field(
        default=None, description="Pass it as `cursor` for the next page; null on the last page."
    )


ListCasesReply = Annotated[CasesPage | RequestRefused, Field(discriminator="kind")]
"""The reply to a `ListCases` request."""


class CaseUpdated(Message):
    """A case changed state (published on `tianshu.v1.cases.<case_key>.updated`)."""

    kind: Literal["case_updated"] = "case_updated"
    case_key: CaseKey
    session_id: str
    workflow_code: str
    execution_state: ExecutionState
    lifecycle_state: LifecycleState
    updated_at: AwareDatetime
    waiting_on: list[str] = Field(
        default_factory=list,
        description="While the case waits: the resource types of what it waits for (a model's answer "
        "is `tianshu_llm_result`, a tool's result `tianshu-tool-result`); empty for a timer alone.",
    )


class CaseFinished(Message):
    """A case ended, failed or was cancelled (published on `tianshu.v1.cases.<case_key>.finished`).

    `execution_state` is `finished` or `failed`; a cancelled case keeps the state it had and says
    `lifecycle_state: "stop"`.
    """

    kind: Literal["case_finished"] = "case_finished"
    case_key: CaseKey
    session_id: str
    workflow_code: str
    execution_state: ExecutionState
    lifecycle_state: LifecycleState
    finished_type: str | None = None
    description: str | None = None
    output: JsonValue = None
    error: WireError | None = None
    finished_at: AwareDatetime


START_CASE_ADAPTER: TypeAdapter[StartCase] = TypeAdapter(StartCase)
START_CASE_REPLY_ADAPTER: TypeAdapter[StartCaseAccepted | RequestRefused] = TypeAdapter(StartCaseReply)
CASE_COMMAND_ADAPTER: TypeAdapter[CancelCase | PauseCase | ResumeCase] = TypeAdapter(CaseCommand)
GET_CASE_ADAPTER: TypeAdapter[GetCase] = TypeAdapter(GetCase)
GET_CASE_REPLY_ADAPTER: TypeAdapter[CaseFound | CaseNotFound | RequestRefused] = TypeAdapter(GetCaseReply)
LIST_CASES_ADAPTER: TypeAdapter[ListCases] = TypeAdapter(ListCases)
LIST_CASES_REPLY_ADAPTER: TypeAdapter[CasesPage | RequestRefused] = TypeAdapter(ListCasesReply)
CASE_UPDATED_ADAPTER: TypeAdapter[CaseUpdated] = TypeAdapter(CaseUpdated)
CASE_FINISHED_ADAPTER: TypeAdapter[CaseFinished] = TypeAdapter(CaseFinished)
