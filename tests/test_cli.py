"""The `tianshu` command, run as a user runs it."""

from __future__ import annotations

import re
import subprocess
import sys
import uuid
from datetime import UTC, datetime, timedelta

import pytest

from tianshu_core import Case, Engine, WorkflowContext, WorkflowRegistry, WorkflowResult, connect_postgres

pytestmark = pytest.mark.postgres


def tianshu(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tianshu_core.cli", "--database-url", url, *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


async def test_migrate_list_show_history_purge(pg_migrated_url: str) -> None:
    assert tianshu(pg_migrated_url, "db", "migrate").stdout.strip() == "schema is up to date"
    assert int(tianshu(pg_migrated_url, "db", "version").stdout) >= 1

    reg = WorkflowRegistry()

    @reg.workflow("cli_demo")
    async def cli_demo(ctx: WorkflowContext) -> WorkflowResult:
        await ctx.step("greet", lambda: "hello")
        raise RuntimeError("went wrong on purpose")

    stores = await connect_postgres(pg_migrated_url, max_size=2)
    try:
        case = await Engine(stores, reg).run_workflow("cli_demo", session_id="cli-session")
    finally:
        await stores.close()

    listed = tianshu(pg_migrated_url, "cases", "list", "--session", "cli-session", "--state", "failed")
    assert listed.returncode == 0 and case.case_key in listed.stdout and "failed" in listed.stdout
    shown = tianshu(pg_migrated_url, "cases", "show", case.case_key)
    assert shown.returncode == 0 and "went wrong on purpose" in shown.stdout and "Traceback" in shown.stdout
    history = tianshu(pg_migrated_url, "cases", "history", case.case_key)
    assert history.returncode == 0 and "step   greet" in history.stdout and '"hello"' in history.stdout
    assert tianshu(pg_migrated_url, "cases", "purge", case.case_key).returncode == 0
    missing = tianshu(pg_migrated_url, "cases", "show", case.case_key)
    assert missing.returncode == 1 and "no case with key" in missing.stderr


async def test_cases_list_pages_with_the_cursor_it_prints(pg_migrated_url: str) -> None:
    session = f"cli-pages-{uuid.uuid4().hex[:8]}"
    now = datetime.now(UTC)
    stores = await connect_postgres(pg_migrated_url, max_size=2)
    try:
        keys = [f"{session}-{i}" for i in range(5)]
        for i, key in enumerate(keys):
            at = now + timedelta(seconds=i)
            await stores.cases.insert(
                Case(case_key=key, session_id=session, workflow_code="w", created_at=at, updated_at=at)
            )
    finally:
        await stores.close()

    listed: list[str] = []
    cursor: list[str] = []
    for _ in range(3):
        page = tianshu(pg_migrated_url, "cases", "list", "--session", session, "--limit", "2", *cursor)
        assert page.returncode == 0, page.stderr
        listed += [line.split("\t")[0] for line in page.stdout.splitlines()]
        found = re.search(r"^next page: (--cursor \S+)$", page.stderr, re.MULTILINE)
        cursor = found.group(1).split() if found else []
    assert listed == keys and not cursor  # the third page is the last, and says so by printing none

    bad = tianshu(pg_migrated_url, "cases", "list", "--cursor", "not-a-cursor")
    assert bad.returncode == 2 and "is not a cursor a case listing returned" in bad.stderr
    assert "Traceback" not in bad.stderr
    zero = tianshu(pg_migrated_url, "cases", "list", "--limit", "0")
    assert zero.returncode == 2 and "not a page size" in zero.stderr


def test_unreachable_database_gives_a_clear_error() -> None:
    done = tianshu("postgresql://postgres@127.0.0.1:1/nowhere", "db", "version")
    assert done.returncode != 0
    assert "Traceback" not in done.stderr
    assert "error:" in done.stderr


async def test_purge_expired_applies_the_retention_settings(pg_server_url: str) -> None:
    from datetime import UTC, datetime, timedelta

    from tests._services import fresh_database

    async with fresh_database(pg_server_url, "tianshu_cli") as url:
        stores = await connect_postgres(url, max_size=1)
        try:
            now = datetime.now(UTC)
            for age in (timedelta(days=10), timedelta(hours=1)):
                await stores.events.publish(
                    "order",
                    "o1",
                    {"age_s": age.total_seconds()},
                    event_id=None,
                    published_at=now - age,
                    dedupe_since=now,
                )
            done = tianshu(url, "db", "purge-expired")  # default retention: 7 days
            assert done.returncode == 0, done.stderr
            assert done.stdout.strip() == "deleted 1 expired events and cases"
            left = await stores.events.next_after(
                "order", "o1", after_seq=0, not_before=now - timedelta(days=30)
            )
            assert left is not None and left.payload == {"age_s": 3600.0}
        finally:
            await stores.close()
