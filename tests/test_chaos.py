"""The chaos harness (tests/chaos.py) in the suite: its plan, and a short run.

`make chaos` runs it for minutes (CHAOS_CASES, CHAOS_DURATION_S, CHAOS_SEED).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from tests import chaos

CASES, DURATION_S, SEED = 20, 10.0, 0
"""A short run: enough for every kind of fault it uses to strike and every feature of `chaos` to run."""
FAULTS = chaos.FAULTS


def test_the_plan_has_every_fault_and_feature_and_replays_by_seed() -> None:
    plan = chaos.plan(7, CASES, DURATION_S, schedulers=2, runners=2)
    assert {fault.kind for fault in plan.faults} == set(chaos.FAULTS)
    assert all(any(feature in case.shape for case in plan.cases) for feature in chaos.FEATURES)
    some = chaos.plan(7, CASES, DURATION_S, 2, 2, faults=["kill_runner"], features=["event"])
    assert {fault.kind for fault in some.faults} == {"kill_runner"}
    assert {key for case in some.cases for key in case.shape} == {"steps", "work_s", "event"}
    with pytest.raises(ValueError, match="no such"):
        chaos.plan(7, CASES, DURATION_S, schedulers=2, runners=2, faults=["flood"])
    assert {f.target for f in plan.faults if f.kind == "kill_scheduler"} <= {0, 1}
    assert all(0 <= case.at_s <= DURATION_S for case in plan.cases)
    assert len({case.key for case in plan.cases}) == CASES
    assert chaos.plan(7, CASES, DURATION_S, schedulers=2, runners=2) == plan
    assert chaos.plan(8, CASES, DURATION_S, schedulers=2, runners=2) != plan


def test_a_report_fails_on_a_lost_case_a_completed_step_run_again_or_a_double_checkpoint() -> None:
    assert chaos.Report(seed=1, cases=3).ok
    assert not chaos.Report(seed=1, cases=3, lost=["k: still waiting"]).ok
    assert not chaos.Report(seed=1, cases=3, completed_again=["k s0: ran 2 times"]).ok
    assert not chaos.Report(seed=1, cases=3, checkpointed_twice=["k s0: 2 records"]).ok
    assert chaos.Report(seed=1, cases=3, interrupted_again=5, tool_calls_failed=["k: 1 call failed"]).ok


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.postgres
@pytest.mark.nats
async def test_a_short_chaos_run_loses_no_case_and_runs_no_completed_step_again(tmp_path: Path) -> None:
    plan = chaos.plan(SEED, CASES, DURATION_S, schedulers=2, runners=1, faults=FAULTS)
    report = await chaos.chaos(plan, tmp_path, schedulers=2, runners=1, drain_timeout_s=40)
    assert report.ok, report.summary()
    assert report.faults == Counter(fault.kind for fault in plan.faults), report.summary()
    assert report.drain_s is not None, report.summary()
