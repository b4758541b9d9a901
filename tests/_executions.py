"""Step bodies that count their executions in a table, and what the counts say.

A step body (or a tool, in a tool runner) calls `record(dsn, case_key, step)` before it does its
work. That adds one row to `TABLE`, which says whether the case's journal already held the step's
checkpoint when this execution began. Such an execution is a *completed step run again*, which the
engine promises never to do. Any other execution past a step's first is an *interrupted step run
again*: its process died (or lost its lease) before the checkpoint was stored, which the engine
allows (at-least-once for a step's body). The check and the insert are one statement, so they see
one snapshot; the row's id is chosen before the first attempt, so an insert retried after a lost
reply is not counted twice.

Postgres may be away while a body records (tests/chaos.py stops it): `record` retries a transient
failure until the row is in, so an execution is counted unless its process dies first.
"""

from __future__ import annotations

import os
import uuid
from collections import Counter
from dataclasses import dataclass
from datetime import datetime

import asyncpg

from tests._services import until_done

TABLE = "tianshu_test_executions"

_CREATE = f"""
CREATE TABLE IF NOT EXISTS {TABLE} (
    id            uuid PRIMARY KEY,
    case_key      text NOT NULL,
    step          text NOT NULL,
    pid           integer NOT NULL,
    checkpointed  boolean NOT NULL,
    started_at    timestamptz NOT NULL DEFAULT clock_timestamp()
)
"""

_RECORD = f"""
INSERT INTO {TABLE} (id, case_key, step, pid, checkpointed)
SELECT $1, $2, $3, $4, EXISTS (
    SELECT 1 FROM tianshu_journal WHERE case_key = $2 AND kind = 'step' AND name = $3
)
ON CONFLICT (id) DO NOTHING
"""


async def create_table(dsn: str) -> None:
    """Create `TABLE` in the database (a migrated one: `record` reads its journal)."""
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(_CREATE)
    finally:
        await conn.close()


async def record(dsn: str, case_key: str, step: str) -> None:
    """Count one execution of `step` of `case_key`; retries until Postgres takes it."""
    execution = uuid.uuid4()

    async def insert() -> None:
        conn = await asyncpg.connect(dsn, timeout=5)
        try:
            await conn.execute(_RECORD, execution, case_key, step, os.getpid())
        finally:
            await conn.close()

    await until_done(insert)


@dataclass(frozen=True)
class Execution:
    """One recorded execution of a step body (or a tool run)."""

    case_key: str
    step: str
    pid: int
    checkpointed: bool
    """The step's checkpoint was stored already when this execution began."""
    started_at: datetime


@dataclass(frozen=True)
class Tally:
    """The recorded executions, in the order they began."""

    executions: list[Execution]

    @property
    def runs(self) -> Counter[tuple[str, str]]:
        """How many executions each (case key, step) had."""
        return Counter((e.case_key, e.step) for e in self.executions)

    @property
    def completed_again(self) -> list[Execution]:
        """Executions that began when the step's checkpoint was already stored."""
        return [e for e in self.executions if e.checkpointed]

    @property
    def interrupted_again(self) -> int:
        """Executions past a step's first that began before its checkpoint was stored."""
        return len(self.executions) - len(self.runs) - len(self.completed_again)

    def of(self, case_key: str, step: str) -> list[Execution]:
        return [e for e in self.executions if (e.case_key, e.step) == (case_key, step)]


async def tally(dsn: str, prefix: str = "") -> Tally:
    """The executions recorded for the cases whose key starts with `prefix`."""
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            f"SELECT case_key, step, pid, checkpointed, started_at FROM {TABLE} "
            "WHERE starts_with(case_key, $1) ORDER BY started_at",
            prefix,
        )
    finally:
        await conn.close()
    return Tally([Execution(**r) for r in rows])
