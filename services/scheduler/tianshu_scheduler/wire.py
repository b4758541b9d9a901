"""A case as it crosses the wire: its summary, and the notices the scheduler publishes of it."""

from __future__ import annotations

from datetime import UTC

from nats.aio.client import Client

from tianshu_contracts import CaseFinished, CaseSummary, CaseUpdated, WireError, subjects
from tianshu_core import Case
from tianshu_core.bus import publish_core
from tianshu_core.engine import waiting_on
from tianshu_core.telemetry import trace_id_of


async def publish_case_changed(nc: Client, case: Case) -> None:
    """Tell the world a case changed (`CaseUpdated`) and, if it ended, how (`CaseFinished`).
    A case listener: inside one, `waiting_on()` names what the case now waits on."""
    await publish_core(
        nc,
        subjects.case_updated(case.case_key),
        CaseUpdated(
            case_key=case.case_key,
            session_id=case.session_id,
            workflow_code=case.workflow_code,
            execution_state=case.execution_state.value,
            lifecycle_state=case.lifecycle_state.value,
            updated_at=case.updated_at,
            waiting_on=list(waiting_on()),
        ),
    )
    if case.is_terminal or case.lifecycle_state.value == "stop":
        await publish_core(nc, subjects.case_finished(case.case_key), finished(case))


def _wire_error(case: Case) -> WireError | None:
    if case.error is None:
        return None
    return WireError(
        type=case.error.type, message=case.error.message, code=case.error.code, retryable=case.error.retryable
    )


def summary(case: Case) -> CaseSummary:
    """A case as it crosses the wire."""
    return CaseSummary(
        case_key=case.case_key,
        session_id=case.session_id,
        workflow_code=case.workflow_code,
        execution_state=case.execution_state.value,
        lifecycle_state=case.lifecycle_state.value,
        parent_key=case.parent_key,
        child_keys=list(case.child_keys),
        input=case.resource_data,
        finished_type=case.finished_type,
        finished_description=case.finished_description,
        output=case.output,
        error=_wire_error(case),
        created_at=case.created_at,
        updated_at=case.updated_at,
        trace_id=trace_id_of(case.trace_parent),
    )


def finished(case: Case) -> CaseFinished:
    """The `CaseFinished` notification of a case that ended, failed or was cancelled."""
    return CaseFinished(
        case_key=case.case_key,
        session_id=case.session_id,
        workflow_code=case.workflow_code,
        execution_state=case.execution_state.value,
        lifecycle_state=case.lifecycle_state.value,
        finished_type=case.finished_type,
        description=case.finished_description,
        output=case.output,
        error=_wire_error(case),
        finished_at=case.updated_at if case.updated_at.tzinfo else case.updated_at.replace(tzinfo=UTC),
    )
