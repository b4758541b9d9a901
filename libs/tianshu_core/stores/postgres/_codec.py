"""Rows to models and back: the column lists and JSON handling the stores share."""

from __future__ import annotations

from typing import Any

import orjson

from ... import serde
from ...models import Case, JournalEntry
from ._backend import Record

# Column order of a case row without its lease columns; `case_args` follows it.
CASE_COLUMNS = (
    "case_key, session_id, workflow_code, execution_state, lifecycle, parent_key, child_keys, "
    "resource_data, private_vars, processing_report, finished_type, finished_description, output, "
    "error, created_at, updated_at"
)
# Placeholders for CASE_COLUMNS, with the JSONB ones cast from text.
CASE_VALUES = (
    "$1, $2, $3, $4, $5, $6, $7::jsonb, $8::jsonb, $9::jsonb, $10::jsonb, $11, $12, $13::jsonb, "
    "$14::jsonb, $15, $16"
)
# SET list that overwrites every case column but the key (and never the lease).
CASE_SET = (
    "session_id = $2, workflow_code = $3, execution_state = $4, lifecycle = $5, parent_key = $6, "
    "child_keys = $7::jsonb, resource_data = $8::jsonb, private_vars = $9::jsonb, "
    "processing_report = $10::jsonb, finished_type = $11, finished_description = $12, "
    "output = $13::jsonb, error = $14::jsonb, created_at = $15, updated_at = $16"
)


# SET list for a run's fenced save: like CASE_SET but never the lifecycle, which belongs to the
# operator (a cancel or pause that lands while the case runs must not be written back over).
# Parameters: case_args without the lifecycle ($5), so $2..$15; `state`: the execution state's
# expression (a park decides it in SQL).
def run_set(state: str = "$4") -> str:
    """The SET list of a run's fenced save, with `state` for the execution state."""
    return (
        f"session_id = $2, workflow_code = $3, execution_state = {state}, parent_key = $5, "
        "child_keys = $6::jsonb, resource_data = $7::jsonb, private_vars = $8::jsonb, "
        "processing_report = $9::jsonb, finished_type = $10, finished_description = $11, "
        "output = $12::jsonb, error = $13::jsonb, created_at = $14, updated_at = $15"
    )


RUN_SET = run_set()


def dump(value: Any) -> str:
    """JSON text for a JSONB parameter."""
    return serde.dumps(value)


def dump_nullable(value: Any) -> str | None:
    """JSON text, or SQL NULL for None (the nullable payload columns)."""
    return None if value is None else serde.dumps(value)


def load(text: str | None) -> Any:
    """Decode a JSON(B) column; SQL NULL is None."""
    return None if text is None else orjson.loads(text)


def case_args(case: Case) -> tuple[Any, ...]:
    """Parameters $1..$16 for CASE_COLUMNS."""
    return (
        case.case_key,
        case.session_id,
        case.workflow_code,
        case.execution_state.value,
        case.lifecycle_state.value,
        case.parent_key,
        dump(case.child_keys),
        dump_nullable(case.resource_data),
        dump(case.private_vars),
        dump_nullable(case.processing_report),
        case.finished_type,
        case.finished_description,
        dump_nullable(case.output),
        None if case.error is None else case.error.model_dump_json(),
        case.created_at,
        case.updated_at,
    )


def case_from_row(row: Record) -> Case:
    """A Case from a row holding at least CASE_COLUMNS, trace_parent and failures."""
    return Case.model_validate(
        {
            "case_key": row["case_key"],
            "session_id": row["session_id"],
            "workflow_code": row["workflow_code"],
            "execution_state": row["execution_state"],
            "lifecycle_state": row["lifecycle"],
            "parent_key": row["parent_key"],
            "child_keys": load(row["child_keys"]),
            "resource_data": load(row["resource_data"]),
            "private_vars": load(row["private_vars"]),
            "processing_report": load(row["processing_report"]),
            "finished_type": row["finished_type"],
            "finished_description": row["finished_description"],
            "output": load(row["output"]),
            "error": load(row["error"]),
            "created_at": row["created_at"],
            "updated_at": row["updated_at"],
            "trace_parent": row["trace_parent"],
            "failures": row["failures"],
        }
    )


def journal_from_arrays(case_key: str, row: Record) -> list[JournalEntry]:
    """A journal read as parallel arrays (`j_seq`, `j_kind`, ... of `tianshu_acquire` and
    `tianshu_publish_wake_take`): one array per column, NULL when the journal is empty."""
    return [
        JournalEntry(case_key, seq, kind, name, data, token, created)
        for seq, kind, name, data, token, created in zip(
            row["j_seq"] or [],
            row["j_kind"] or [],
            row["j_name"] or [],
            row["j_data"] or [],
            row["j_token"] or [],
            row["j_created"] or [],
            strict=True,
        )
    ]
