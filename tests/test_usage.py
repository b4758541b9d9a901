"""`tianshu usage` and the usage in `tianshu cases show`, over rows recorded through the store."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from tests.test_cli import tianshu
from tianshu_contracts import UsageSummary
from tianshu_core import Case, Stores, connect_postgres
from tianshu_core.stores.protocols import UsageRow

pytestmark = pytest.mark.postgres

NOW = datetime.now(UTC)


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


@pytest.fixture
async def stores(pg_migrated_url: str) -> AsyncIterator[Stores]:
    opened = await connect_postgres(pg_migrated_url, max_size=2)
    yield opened
    await opened.close()


def row(case_key: str, session_id: str, **fields: Any) -> UsageRow:
    """A call of the `agent` workflow answered now, unless `fields` say otherwise."""
    fields = {"call_id": unique("call"), "workflow_code": "agent", "route": "default", **fields}
    fields.setdefault("provider", "anthropic")
    fields.setdefault("attempts", 1)
    return UsageRow(case_key=case_key, session_id=session_id, created_at=fields.pop("at", NOW), **fields)


def sums(summary: UsageSummary) -> tuple[int | float, ...]:
    """calls, attempts, input, output, cache read and cache write tokens, cost."""
    return tuple(summary.model_dump().values())


def summary(url: str, *args: str) -> tuple[int | float, ...]:
    """`tianshu usage ... --json`, as `sums`."""
    done = tianshu(url, "usage", *args, "--json")
    assert done.returncode == 0, done.stderr
    return sums(UsageSummary.model_validate_json(done.stdout))


async def test_usage_sums_a_session_and_counts_a_call_once(pg_migrated_url: str, stores: Stores) -> None:
    session, case_a, case_b = unique("sess"), unique("case"), unique("case")
    tokens = {"input_tokens": 1200, "output_tokens": 300, "cache_read_tokens": 1000}
    first = row(case_a, session, attempts=2, cost_usd=0.01, **tokens)
    assert await stores.usage.record(first) is True
    # The same result consumed again (a redelivery): nothing changes.
    assert await stores.usage.record(row(case_a, session, call_id=first.call_id, input_tokens=9)) is False
    triage = {"workflow_code": "triage", "input_tokens": 800, "output_tokens": 50, "cache_write_tokens": 400}
    await stores.usage.record(row(case_b, session, **triage))
    await stores.usage.record(row(case_b, session, provider=None, error_class="unavailable", attempts=3))
    await stores.usage.record(
        row(case_b, session, input_tokens=10, cost_usd=0.5, at=NOW - timedelta(hours=2))
    )
    await stores.usage.record(row(unique("case"), unique("sess"), input_tokens=10**6, cost_usd=100.0))

    assert summary(pg_migrated_url, "--session", session) == (4, 7, 2010, 350, 1000, 400, 0.51)
    recent = summary(pg_migrated_url, "--session", session, "--workflow", "agent", "--since", "1h")
    assert recent == (2, 5, 1200, 300, 1000, 0, 0.01)
    assert summary(pg_migrated_url, "--case", case_a) == (1, 2, 1200, 300, 1000, 0, 0.01)
    assert summary(pg_migrated_url, "--session", unique("sess")) == (0, 0, 0, 0, 0, 0, 0.0)

    table = tianshu(pg_migrated_url, "usage", "--session", session)
    assert table.returncode == 0, table.stderr
    assert [line.split() for line in table.stdout.splitlines()] == [
        ["calls", "4"],
        ["attempts", "7"],
        ["input", "tokens", "2,010"],
        ["output", "tokens", "350"],
        ["cache", "read", "tokens", "1,000"],
        ["cache", "write", "tokens", "400"],
        ["cost", "(USD)", "0.5100"],
    ]


def test_usage_errors_are_one_line() -> None:
    unreachable = tianshu("postgresql://postgres@127.0.0.1:1/nowhere", "usage")
    assert unreachable.returncode == 2 and unreachable.stdout == ""
    # Retries are logged as they happen; the error itself is one line, the last.
    assert unreachable.stderr.splitlines()[-1].startswith("error: cannot connect to postgres")
    assert "Traceback" not in unreachable.stderr
    unclear = tianshu("postgresql://postgres@127.0.0.1:1/nowhere", "usage", "--since", "yesterday")
    assert unclear.returncode == 2 and "neither an ISO-8601 time" in unclear.stderr


async def test_cases_show_adds_the_usage_of_the_case(pg_migrated_url: str, stores: Stores) -> None:
    session = unique("sess")
    spent, idle = (
        Case(
            case_key=unique("case"), session_id=session, workflow_code="agent", created_at=NOW, updated_at=NOW
        )
        for _ in range(2)
    )
    for case in (spent, idle):
        assert await stores.cases.insert(case)
    await stores.usage.record(
        row(spent.case_key, session, input_tokens=100, output_tokens=20, cost_usd=0.002)
    )
    await stores.usage.record(row(spent.case_key, session, input_tokens=50, output_tokens=5, attempts=2))

    shown = tianshu(pg_migrated_url, "cases", "show", spent.case_key)
    assert shown.returncode == 0, shown.stderr
    printed = json.loads(shown.stdout)
    assert printed["case_key"] == spent.case_key and printed["workflow_code"] == "agent"
    assert sums(UsageSummary.model_validate(printed["usage"])) == (2, 3, 150, 25, 0, 0, 0.002)

    plain = tianshu(pg_migrated_url, "cases", "show", idle.case_key)
    assert plain.returncode == 0 and "usage" not in json.loads(plain.stdout)
    # What was spent stays when the case goes.
    assert tianshu(pg_migrated_url, "cases", "purge", spent.case_key).returncode == 0
    assert summary(pg_migrated_url, "--case", spent.case_key)[0] == 2
