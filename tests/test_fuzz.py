"""The bus fuzz harness (tests/fuzz_bus.py) in the suite: its generator, and a short run.

`make fuzz` runs it longer (FUZZ_EXAMPLES, FUZZ_SEED).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests import fuzz_bus

EXAMPLES = 70
"""A bit more than one per category."""


def test_the_generator_covers_every_category_with_messages_bad_as_said_and_replays_by_seed() -> None:
    targets = fuzz_bus.Targets.for_seed(7)
    plan = fuzz_bus.generate(targets, 200, seed=7)
    assert {bad.category for bad in plan} == set(fuzz_bus.CATEGORIES)
    faulty = [(bad.category, why, bad.preview()) for bad in plan if (why := fuzz_bus.problem(bad))]
    assert not faulty
    assert fuzz_bus.generate(targets, 200, seed=7) == plan
    assert fuzz_bus.generate(targets, 200, seed=8) != plan


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.postgres
@pytest.mark.nats
async def test_fuzzed_bad_messages_are_refused_at_once_and_good_cases_finish(
    tmp_path: Path, pg_server_url: str
) -> None:
    report = await fuzz_bus.fuzz(EXAMPLES, 0, pg_server_url, tmp_path, settle_s=30)
    if not report.ok:
        pytest.fail(report.summary(), pytrace=False)
