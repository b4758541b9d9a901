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

import asyncio
import os
import uuid
from collections import Counter
from dataclasses import dataclass

import asyncpg

from tianshu_core.transient import is_transient

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

RETRY_S = 0.1


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
    while True:
        try:
            conn = await asyncpg.connect(dsn, timeout=5)
            try:
                await conn.execute(_RECORD, execution, case_key, step, os.getpid())
            finally:
                await conn.close()
            return
        except Exception as exc:
            if not is_transient(exc):
                raise
        await asyncio.sleep(RETRY_S)


@dataclass(frozen=True)
class Tally:
    """The recorded executions: how many per (case key, step), and which ran a completed step."""

    runs: Counter[tuple[str, str]]
    completed_again: Counter[tuple[str, str]]
    """Executions that began when the step's checkpoint was already stored."""

    @property
    def interrupted_again(self) -> int:
        """Executions past a step's first that began before its checkpoint was stored."""
        return sum(self.runs.values()) - len(self.runs) - sum(self.completed_again.values())


async def tally(dsn: str, prefix: str = "") -> Tally:
    """The executions recorded for the cases whose key starts with `prefix`."""
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            f"SELECT case_key, step, checkpointed FROM {TABLE} WHERE starts_with(case_key, $1)", prefix
        )
    finally:
        await conn.close()
    return Tally(
        runs=Counter((r["case_key"], r["step"]) for r in rows),
        completed_again=Counter((r["case_key"], r["step"]) for r in rows if r["checkpointed"]),
    )
