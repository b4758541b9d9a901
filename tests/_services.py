"""Running the services as a user does: separate processes, configured by the environment."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


class SchedulerProcess:
    """One `python -m tianshu_scheduler` replica; `start()` waits for its ready file."""

    def __init__(self, workdir: Path, database_url: str, nats_url: str, **env: str) -> None:
        self.name = f"sched-{uuid.uuid4().hex[:6]}"
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.ready_file = workdir / f"{self.name}.ready"
        self.log_file = workdir / f"{self.name}.log"
        self.env = {
            **os.environ,
            "PYTHONPATH": str(ROOT),
            "TIANSHU_DATABASE_URL": database_url,
            "TIANSHU_NATS_URL": nats_url,
            "TIANSHU_WORKFLOWS": "tests.e2e_workflows,examples.approval",
            "TIANSHU_SCHEDULER_NAME": self.name,
            "TIANSHU_SCHEDULER_READY_FILE": str(self.ready_file),
            "TIANSHU_TEST_EFFECTS": str(workdir),
            "TIANSHU_LEASE_TTL_S": "2",
            "TIANSHU_SCHEDULER_SWEEP_INTERVAL_S": "0.2",
            **env,
        }
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 30.0) -> SchedulerProcess:
        self.ready_file.unlink(missing_ok=True)
        with self.log_file.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tianshu_scheduler"],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + timeout_s
        while not self.ready_file.exists():
            if self.proc.poll() is not None:
                raise RuntimeError(f"scheduler exited with {self.proc.returncode}:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"scheduler not ready after {timeout_s} s:\n{self.log_tail()}")
            time.sleep(0.02)
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def signal(self, sig: signal.Signals) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def terminate(self, timeout_s: float = 60.0) -> int:
        """SIGTERM and wait; the exit code."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout_s)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def __enter__(self) -> SchedulerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
        self.kill()


def effects(workdir: Path) -> list[tuple[str, str, int]]:
    """(case key, what, pid) for every recorded step-body execution."""
    path = workdir / "effects.log"
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        key, what, pid, _ = line.split()
        out.append((key, what, int(pid)))
    return out


def executions(workdir: Path) -> Counter[tuple[str, str]]:
    """How many times each (case key, step) body ran."""
    return Counter((key, what) for key, what, _ in effects(workdir))
