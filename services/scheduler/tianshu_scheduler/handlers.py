"""What the scheduler does with each message it consumes and each request it answers.

Every handler commits to Postgres before it returns (so before its message is acknowledged), is
idempotent, and settles its message by what it raises: `RejectMessage` for bad content (a dead
letter at once, with the reason), a retryable error for an outage (redelivered without spending
the budget).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable

import asyncpg
from nats.aio.msg import Msg
from pydantic import BaseModel, JsonValue

from tianshu_contracts import (
    CancelCase,
    CaseFound,
    CaseNotFound,
    CasesPage,
    DeadLetterReason,
    GetCase,
    ListCases,
    PauseCase,
    ResumeCase,
    StartCase,
    StartCaseAccepted,
    subjects,
)
from tianshu_contracts.gateway import LlmCallResult
from tianshu_contracts.llm import LlmErrorClass
from tianshu_contracts.tools import ToolCallResult
from tianshu_core import Case, CaseFilter, ExecutionState, Lifecycle, TianshuError, WorkflowRegistry
from tianshu_core.bus import Delivery, RejectMessage, wire_error
from tianshu_core.bus.llm import NatsLlmClient
from tianshu_core.bus.tools import NatsToolExecutor
from tianshu_core.driver import ServiceDriver
from tianshu_core.engine import CaseListener
from tianshu_core.errors import InvalidCursorError, UnstorableValueError
from tianshu_core.llm import LLM_RESULT_RESOURCE, LlmError
from tianshu_core.stores.protocols import UsageRow
from tianshu_core.tools import TOOL_RESULT_RESOURCE

from .wire import summary

CaseCommandMsg = CancelCase | PauseCase | ResumeCase


_OWNERS_KEPT = 10_000


class SchedulerHandlers:
    """The scheduler's message handlers, over the driver that runs what they start or wake.

    `notify` is told of a case a command changed (the engine tells it of the cases a run changed).
    """

    def __init__(
        self,
        driver: ServiceDriver,
        registry: WorkflowRegistry,
        tools: NatsToolExecutor,
        llm: NatsLlmClient,
        notify: CaseListener,
    ) -> None:
        self.driver = driver
        self.engine = driver.engine
        self.registry = registry
        self.tools = tools
        self.llm = llm
        # The session and workflow of cases whose model answers were stored here (the usage row
        # names them; they never change): one read per case, not one per call.
        self._owners: OrderedDict[str, tuple[str | None, str]] = OrderedDict()
        self.notify = notify

    # -- starting and reading cases -----------------------------------------------------------

    async def _start(self, msg: StartCase, msg_id: str | None) -> tuple[Case, bool]:
        engine = self.engine
        if msg.workflow_code not in self.registry:
            raise RejectMessage(
                wire_error(
                    f"unknown workflow code {msg.workflow_code!r}; this scheduler runs: "
                    f"{', '.join(self.registry.codes) or 'nothing (set TIANSHU_WORKFLOWS)'}",
                    code="unknown_workflow",
                ),
                case_key=msg.case_key,
            )
        key = msg.case_key or (_key_from_msg_id(msg_id) if msg_id else None)
        try:
            existed = key is not None and await engine.stores.cases.get_by_key(key) is not None
            case = await engine.start_case(
                msg.workflow_code, msg.input, case_key=key, session_id=msg.session_id
            )
        except UnstorableValueError as exc:  # say, an integer over 64 bits in the input
            raise _unstorable(exc, case_key=key) from exc
        except TianshuError as exc:
            if exc.retryable:
                raise
            raise RejectMessage(exc, case_key=key) from exc
        except asyncpg.DataError as exc:  # see _unstorable
            raise _unstorable(exc, case_key=key) from exc
        self.driver.schedule(case.case_key)
        return case, not existed

    async def start(self, msg: StartCase, delivery: Delivery) -> None:
        """`StartCase` from the work queue: create the case (idempotent) and run it."""
        await self._start(msg, delivery.msg_id or _stream_msg_id(delivery))

    async def rpc_start(self, msg: StartCase, request: Msg) -> BaseModel:
        """`StartCase` as a request: as `start`, answering whether the case is new."""
        headers = request.headers or {}
        case, created = await self._start(msg, headers.get(subjects.HEADER_MSG_ID))
        return StartCaseAccepted(
            case_key=case.case_key,
            session_id=case.session_id,
            workflow_code=case.workflow_code,
            created=created,
        )

    async def rpc_get(self, msg: GetCase, _request: Msg) -> BaseModel:
        """`GetCase`: the case as it crosses the wire, with its model usage if it has any."""
        engine = self.engine
        case = await engine.stores.cases.get_by_key(msg.case_key)
        if case is None:
            return CaseNotFound(case_key=msg.case_key)
        usage = await engine.stores.usage.summary(case_key=case.case_key)
        found = summary(case)
        if usage.calls:
            found = found.model_copy(update={"usage": usage})
        return CaseFound(case=found)

    async def rpc_list(self, msg: ListCases, _request: Msg) -> BaseModel:
        """`ListCases`: one keyset page of the cases that match (`Engine.list_cases`)."""
        flt = CaseFilter(
            session_id=msg.session_id,
            workflow_code=msg.workflow_code,
            execution_state=None if msg.execution_state is None else ExecutionState(msg.execution_state),
            lifecycle_state=None if msg.lifecycle_state is None else Lifecycle(msg.lifecycle_state),
            parent_key=msg.parent_key,
        )
        try:
            page = await self.engine.list_cases(flt, limit=msg.limit, cursor=msg.cursor)
        except InvalidCursorError as exc:
            raise RejectMessage(exc) from exc
        # No input or output: a page of 500 cases must fit in one message (GetCase has them).
        cases = [summary(case).model_copy(update={"input": None, "output": None}) for case in page.cases]
        return CasesPage(cases=cases, next_cursor=page.next_cursor)

    # -- events and results -------------------------------------------------------------------

    async def event(self, payload: JsonValue, delivery: Delivery) -> None:
        """An event on `tianshu.v1.events.<type>.<id>`: store it and run what it woke."""
        try:
            resource_type, resource_id = subjects.parse_event(delivery.subject)
        except ValueError as exc:
            raise RejectMessage(wire_error(str(exc), code="bad_subject")) from exc
        # Only the canonical subject of a resource: the base64 decoding of `~` tokens skips
        # characters outside its alphabet, so `order.~%%%` would otherwise be an event on the
        # resource '' (found by tests/test_scheduler_bad_input.py).
        if subjects.event(resource_type, resource_id) != delivery.subject:
            raise RejectMessage(
                wire_error(
                    f"{delivery.subject!r} is not the canonical subject of resource "
                    f"{resource_type}/{resource_id!r} ({subjects.event(resource_type, resource_id)!r})",
                    code="bad_subject",
                )
            )
        # Without a Nats-Msg-Id, the stream sequence still makes a redelivery a no-op.
        event_id = delivery.msg_id or _stream_msg_id(delivery)
        await self._publish(resource_type, resource_id, payload, event_id=event_id)

    async def tool_result(self, result: ToolCallResult, delivery: Delivery) -> None:
        """Record a tool result durably, keyed by its call id: an event on the call, which wakes a
        case parked on it (the slow path). A run awaiting it here gets it at once (the fast path).

        Refused at once: a result whose subject names another case than its body, and one for a
        case that does not exist (nothing could ever read it)."""
        _refuse_misaddressed(result.case_key, delivery.subject, subjects.tool_result)
        # A run awaiting the call here proves the case exists; otherwise ask the store.
        if not self.tools.resolve(result):
            await self._existing_case(result.case_key)
        await self._publish(
            TOOL_RESULT_RESOURCE,
            result.call_id,
            result.model_dump(mode="json"),
            event_id=result.call_id,
            case_key=result.case_key,
        )

    async def llm_result(self, result: LlmCallResult, delivery: Delivery) -> None:
        """Record a model call's answer durably, keyed by its call id, as a tool result is; and its
        usage row, once per call id (the row names the case's session and workflow)."""
        _refuse_misaddressed(result.case_key, delivery.subject, subjects.llm_result)
        self.llm.resolve(result)
        await self.record_llm_result(result)

    async def answered(self, result: LlmCallResult) -> None:
        """The fast path's `NatsLlmClient(record=...)`: a run that got its answer on core NATS
        stores it (and its usage row) before it goes on, as the consumer will (a no-op then).
        An answer the store refuses fails the run as its journal would have: with the
        `UnstorableValueError`, else an `LlmError` (`fatal`) saying why."""
        try:
            await self.record_llm_result(result)
        except RejectMessage as refused:
            if isinstance(refused.__cause__, TianshuError):
                raise refused.__cause__ from None
            raise LlmError(refused.error.message, error_class=LlmErrorClass.FATAL) from None

    async def record_llm_result(self, result: LlmCallResult) -> None:
        """Store a model call's answer as an event on its call id with its usage row, in one
        transaction; a second time is a no-op."""
        owner = self._owners.get(result.case_key)
        if owner is None:
            case = await self._existing_case(result.case_key)
            owner = self._owners[result.case_key] = (case.session_id, case.workflow_code)
            if len(self._owners) > _OWNERS_KEPT:
                self._owners.popitem(last=False)
        if result.response is not None:
            payload: JsonValue = result.response.model_dump(mode="json")
        else:
            assert result.error is not None
            code = result.error_class.value if result.error_class else result.error.code
            payload = {"error": result.error.model_copy(update={"code": code}).model_dump(mode="json")}
        row = UsageRow.from_result(result, session_id=owner[0], workflow_code=owner[1])
        await self._publish(
            LLM_RESULT_RESOURCE,
            result.call_id,
            payload,
            event_id=result.call_id,
            case_key=result.case_key,
            usage=row,
        )

    async def _existing_case(self, case_key: str) -> Case:
        """The case a result is for; refused (`unknown_case`) when there is none."""
        case = await self.engine.stores.cases.get_by_key(case_key)
        if case is None:
            raise RejectMessage.because(
                DeadLetterReason.UNKNOWN_CASE,
                f"a result for case {case_key!r}, which does not exist",
                case_key=case_key,
            )
        return case

    async def _publish(
        self,
        resource_type: str,
        resource_id: str,
        payload: JsonValue,
        *,
        event_id: str | None,
        case_key: str | None = None,
        usage: UsageRow | None = None,
    ) -> None:
        """Store an event (a call's result: with its usage row, in the same transaction) and run
        what it woke. A store's refusal of the values refuses the message; an outage is
        transient. `case_key`: the case a result is for, named in a dead letter."""
        try:
            await self.driver.publish_event(
                resource_type, resource_id, payload, event_id=event_id, usage=usage
            )
        except UnstorableValueError as exc:
            raise _unstorable(exc, case_key=case_key) from exc
        except TianshuError as exc:
            if exc.retryable:
                raise
            raise RejectMessage(exc, case_key=case_key) from exc
        except (asyncpg.DataError, TypeError) as exc:  # see _unstorable
            raise _unstorable(exc, case_key=case_key) from exc

    # -- commands -----------------------------------------------------------------------------

    async def command(self, msg: CaseCommandMsg, delivery: Delivery) -> None:
        """Cancel, pause or resume a case; tell the world; a resumed case runs."""
        engine = self.engine
        # A subject token that is no case key (`tianshu.v1.cases.a~b.command`) is refused at once;
        # the ValueError used to count as transient, retried until max deliveries (found by
        # tests/test_scheduler_bad_input.py).
        try:
            subject_key = subjects.case_key_of(delivery.subject)
        except ValueError as exc:
            raise RejectMessage(wire_error(str(exc), code="bad_subject")) from exc
        if subject_key != msg.case_key:
            raise RejectMessage.because(
                DeadLetterReason.KEY_MISMATCH,
                f"command for case {msg.case_key!r} sent on {delivery.subject!r}",
            )
        if isinstance(msg, CancelCase):
            found = await engine.cancel(msg.case_key)
        elif isinstance(msg, PauseCase):
            found = await engine.pause(msg.case_key)
        else:
            found = await engine.resume(msg.case_key)
        if not found:
            raise RejectMessage.because(
                DeadLetterReason.UNKNOWN_CASE, f"no case with key {msg.case_key!r}", case_key=msg.case_key
            )
        case = await engine.get_case(msg.case_key)
        await self.notify(case)
        if isinstance(msg, ResumeCase):
            self.driver.schedule(msg.case_key)


def _unstorable(exc: Exception, *, case_key: str | None = None) -> RejectMessage:
    """Refuse at once a valid message whose values cannot be stored; retrying cannot change that.

    Found by tests/test_scheduler_bad_input.py: Postgres refuses a NUL character in text and
    jsonb (`\\u0000`: asyncpg.DataError, SQLSTATE class 22), and the JSON encoder an integer over
    64 bits (TypeError). Both escaped the handlers as if transient: five deliveries with backoff,
    then a `max_deliveries` dead letter (and a request got a reply saying "retryable").
    """
    return RejectMessage(
        wire_error(f"this message's values cannot be stored: {exc}", code="unstorable_value"),
        reason=DeadLetterReason.UNSTORABLE,
        case_key=case_key,
    )


def _refuse_misaddressed(case_key: str, subject: str, subject_of: Callable[[str], str]) -> None:
    """Refuse (`key_mismatch`) a result whose subject is not the one its body's case key names
    (a key no subject can carry included)."""
    try:
        expected: str | None = subject_of(case_key)
    except ValueError:
        expected = None
    if subject != expected:
        raise RejectMessage.because(
            DeadLetterReason.KEY_MISMATCH,
            f"a result for case {case_key!r} sent on {subject!r}",
            case_key=case_key,
        )


def _key_from_msg_id(msg_id: str) -> str:
    """A case key derived from a message id: a repeated StartCase with that id starts nothing new."""
    return "m-" + hashlib.sha256(msg_id.encode()).hexdigest()[:32]


def _stream_msg_id(delivery: Delivery) -> str | None:
    if delivery.stream is None or delivery.stream_seq is None:
        return None
    return f"{delivery.stream}:{delivery.stream_seq}"
