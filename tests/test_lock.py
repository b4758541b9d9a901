"""uv.lock pins every install (`make venv`, CI, the Dockerfile): it must agree with pyproject.toml,
and the check that `make lint` runs (`uv lock --check`) must fail when the two disagree."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# uv is a dev dependency: the venv running the tests has the uv that the lock names.
UV = Path(sys.executable).with_name("uv")


def _check(project: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(UV), "lock", "--check", "--project", str(project)],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A copy of the project's metadata and lock: what `uv lock --check` reads."""
    for name in ("pyproject.toml", "uv.lock"):
        shutil.copy(ROOT / name, tmp_path / name)
    return tmp_path


def test_the_lock_agrees_with_pyproject(project: Path) -> None:
    checked = _check(project)
    assert checked.returncode == 0, checked.stderr


def test_a_requirement_the_lock_does_not_know_fails_the_check(project: Path) -> None:
    pyproject = project / "pyproject.toml"
    text = pyproject.read_text()
    assert '"pyyaml>=6"' in text
    pyproject.write_text(text.replace('"pyyaml>=6"', '"pyyaml>=6.0.1"'))
    checked = _check(project)
    assert checked.returncode != 0
    assert "needs to be updated" in checked.stderr


def test_make_venv_bootstraps_the_uv_the_lock_names() -> None:
    """The Makefile and the Dockerfile read uv's version from the lock; the running uv is that one."""
    locked = re.search(r'^name = "uv"\nversion = "([^"]+)"$', (ROOT / "uv.lock").read_text(), re.MULTILINE)
    assert locked is not None
    running = subprocess.run([str(UV), "--version"], capture_output=True, text=True, check=True).stdout
    assert running.split()[1] == locked.group(1)
    found = subprocess.run(
        ["make", "-s", "-C", str(ROOT), "--eval", "print-uv: ; @echo $(UV_VERSION)", "print-uv"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert found.stdout.strip() == locked.group(1)
