"""Bad input gets a clear error and loses nothing."""

from __future__ import annotations

import datetime as dt
import time
from typing import Any

import pytest
from pydantic import BaseModel

from tests._backends import Backend
from tianshu_core import (
    CaseExistsError,
    Continue,
    CorruptCheckpointError,
    DuplicateWorkflowError,
    ExecutionState,
    InvalidTokenError,
    JournalEntry,
    StepResultTooLargeError,
    UnknownWorkflowError,
    UnstorableValueError,
    WorkflowContext,
    WorkflowRegistry,
    WorkflowResult,
)
from tianshu_core.tokens import is_plain_token, new_case_key


class Reading(BaseModel):
    value: float


def registry(result: Any) -> WorkflowRegistry:
    reg = WorkflowRegistry()

    @reg.workflow("emit")
    async def emit(ctx: WorkflowContext) -> WorkflowResult:
        await ctx.step("ok", lambda: 1)
        await ctx.step("emit", lambda: result)
        return await ctx.finish("done")

    return reg


async def test_unknown_workflow_code_is_refused_before_anything_is_stored(backend: Backend) -> None:
    engine = backend.engine(registry(1))
    with pytest.raises(UnknownWorkflowError, match=r"'missing'.*registered: emit"):
        await engine.run_workflow("missing", case_key="never-stored")
    assert await backend.stores.cases.get_by_key("never-stored") is None


async def test_registering_a_code_twice_is_refused() -> None:
    reg = registry(1)
    with pytest.raises(DuplicateWorkflowError):
        reg.register("emit", lambda _case: None)  # type: ignore[arg-type]


async def test_non_serialisable_step_result_fails_the_case_clearly(backend: Backend) -> None:
    case = await backend.engine(registry(object())).run_workflow("emit")
    assert case.execution_state is ExecutionState.FAILED
    assert case.error is not None and case.error.type == UnstorableValueError.__name__
    assert "'emit'" in case.error.message and "object" in case.error.message
    history = await backend.stores.journal.load(case.case_key)
    assert [e.name for e in history] == ["ok"]


async def test_step_result_over_the_size_limit_is_refused(backend: Backend) -> None:
    engine = backend.engine(registry("x" * 5000), max_step_result_bytes=1000)
    case = await engine.run_workflow("emit")
    assert case.error is not None and case.error.type == StepResultTooLargeError.__name__
    assert "1000" in case.error.message


async def test_corrupt_stored_checkpoint_is_reported(backend: Backend) -> None:
    reg = WorkflowRegistry()

    @reg.workflow("typed")
    async def typed(ctx: WorkflowContext) -> WorkflowResult:
        reading = await ctx.step("reading", lambda: Reading(value=1.5), returns=Reading)
        if ctx.get_state("again") is None:
            await ctx.set_state("again", 1)
            return Continue()
        return await ctx.finish("done", output=reading)

    engine = backend.engine(reg)
    case = await engine.run_workflow("typed")
    await _tamper(backend, case.case_key, "reading", '{"value": "not a number"}')
    await engine.run_until_idle()
    failed = await engine.get_case(case.case_key)
    assert failed.execution_state is ExecutionState.FAILED
    assert failed.error is not None and failed.error.type == CorruptCheckpointError.__name__
    assert "'reading'" in failed.error.message and case.case_key in failed.error.message


async def _tamper(backend: Backend, case_key: str, name: str, data: str) -> None:
    if backend.name == "memory":
        entries: list[JournalEntry] = backend.stores.journal._db.journal[case_key]  # type: ignore[attr-defined]
        for entry in entries:
            if entry.name == name:
                entry.data = data
        return
    import asyncpg

    assert backend.url is not None
    conn = await asyncpg.connect(backend.url)
    try:
        await conn.execute(
            "UPDATE tianshu_journal SET data = $3::jsonb WHERE case_key = $1 AND name = $2",
            case_key,
            name,
            data,
        )
    finally:
        await conn.close()


async def test_bad_case_keys_and_duplicate_starts(backend: Backend) -> None:
    engine = backend.engine(registry(1))
    with pytest.raises(InvalidTokenError):
        await engine.start_case("emit", case_key="has.dot")
    first = await engine.start_case("emit", case_key="idem-1", input={"a": 1})
    again = await engine.start_case("emit", case_key="idem-1", input={"a": 2})
    assert again.resource_data == first.resource_data == {"a": 1}
    with pytest.raises(CaseExistsError):
        await engine.start_case("other", case_key="idem-1")


def test_datetimes_and_models_serialise() -> None:
    from tianshu_core import serde

    when = dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.UTC)
    assert serde.loads(serde.dumps({"at": when, "r": Reading(value=2)})) == {
        "at": "2026-01-02T03:04:05+00:00",
        "r": {"value": 2.0},
    }


def test_new_case_keys_are_plain_unique_and_sort_by_creation() -> None:
    """Engine-made keys: 32 hex digits, time first, so that a later key sorts after every earlier
    one (a new case's rows go to the end of the key indexes, not to a random page)."""
    earlier = [new_case_key() for _ in range(1000)]
    time.sleep(0.002)  # the next millisecond
    later = new_case_key()
    assert len(set(earlier)) == len(earlier)
    assert all(is_plain_token(k) and len(k) == 32 and int(k, 16) >= 0 for k in earlier)
    assert later > max(earlier)
