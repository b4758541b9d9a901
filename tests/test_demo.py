"""`make demo` keeps working: the approval demo runs to the end as a user runs it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.postgres, pytest.mark.e2e]
ROOT = Path(__file__).resolve().parent.parent


def test_approval_demo_runs_to_the_end(pg_url: str) -> None:
    env = {**os.environ, "TIANSHU_DATABASE_URL": pg_url}
    done = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "approval_demo.py")],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "'approved'" in done.stdout
    assert "'rejected' (Budget too high)" in done.stdout
    assert done.stdout.rstrip().endswith("demo ok")
