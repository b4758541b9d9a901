"""Crash recovery with real processes: SIGKILL a worker, start another, nothing is lost or redone.

(tests/chaos.py does the same to service replicas, at random and at scale: `make chaos`.)"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import uuid
from collections import Counter
from pathlib import Path

import asyncpg
import pytest

from tests import _executions
from tests._services import eventually
from tianshu_core import ExecutionState, connect_postgres

pytestmark = [pytest.mark.postgres, pytest.mark.e2e]
WORKER = str(Path(__file__).with_name("crash_worker.py"))
ROOT = str(Path(__file__).resolve().parent.parent)


def _spawn(*args: str) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": ROOT}
    return subprocess.Popen([sys.executable, WORKER, *args], env=env)


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


@pytest.mark.parametrize("k", [1, 5, 9])
async def test_sigkill_after_step_k_then_rerun(pg_migrated_url: str, k: int) -> None:
    await _executions.create_table(pg_migrated_url)
    key = f"crash-{k}-{uuid.uuid4().hex[:8]}"
    stores = await connect_postgres(pg_migrated_url, max_size=1)
    try:

        async def steps() -> list[str]:
            return [e.name for e in await stores.journal.load(key) if e.kind == "step"]

        async def paused() -> bool:
            return f"s{k}" in await steps()

        first = _spawn("steps", pg_migrated_url, key, str(k))
        try:
            await eventually(paused, what=f"step s{k} checkpointed")
        finally:
            first.send_signal(signal.SIGKILL)
            first.wait()
        assert first.returncode == -signal.SIGKILL
        second = _spawn("steps", pg_migrated_url, key, "0")
        assert await asyncio.to_thread(second.wait, 60) == 0
        ran = await _executions.tally(pg_migrated_url, key)
        assert ran.runs == Counter({(key, f"s{i}"): 1 for i in range(1, 11)})
        assert ran.completed_again == []
        case = await stores.cases.get_by_key(key)
        assert case is not None and case.execution_state is ExecutionState.FINISHED
        assert await steps() == [f"s{i}" for i in range(1, 11)]
    finally:
        await stores.close()


async def test_sigkill_during_200_concurrent_workflows_loses_no_observed_step(
    pg_migrated_url: str, tmp_path: Path
) -> None:
    observed = tmp_path / "observed"
    prefix = f"many-{uuid.uuid4().hex[:8]}"
    worker = _spawn("many", pg_migrated_url, prefix, str(observed), "200")
    try:

        async def observed_600() -> bool:
            return len(_lines(observed)) >= 600

        await eventually(observed_600, what="600 observed steps")
    finally:
        worker.send_signal(signal.SIGKILL)
        worker.wait()
    seen = {tuple(line.split()) for line in _lines(observed) if len(line.split()) == 2}
    assert len(seen) >= 600
    conn = await asyncpg.connect(pg_migrated_url)
    try:
        rows = await conn.fetch(
            "SELECT case_key, name FROM tianshu_journal WHERE case_key LIKE $1 AND kind = 'step'",
            prefix + "-%",
        )
    finally:
        await conn.close()
    stored = {(r["case_key"], r["name"]) for r in rows}
    missing = seen - stored
    assert not missing, f"{len(missing)} observed steps have no checkpoint row, e.g. {sorted(missing)[:3]}"
    assert len(stored) < 2000, "the worker finished before it was killed; the test proved nothing"
