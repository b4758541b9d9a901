"""The engine's settings."""

from __future__ import annotations

import enum
import os
import socket
import uuid
from dataclasses import dataclass, field
from datetime import timedelta


def _default_owner() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


class ExecutionMode(enum.StrEnum):
    """How a tick runs its runnable cases."""

    SEQUENTIAL = "sequential"
    PARALLEL = "parallel"


@dataclass(slots=True)
class EngineConfig:
    """Engine settings; every one has a default that works locally."""

    max_step_result_bytes: int = 1024 * 1024
    max_event_payload_bytes: int = 1024 * 1024
    lease_ttl: float = 30.0
    event_retention: timedelta = field(default_factory=lambda: timedelta(days=7))
    history_retention: timedelta | None = None
    owner: str = field(default_factory=_default_owner)
    execution_mode: ExecutionMode = ExecutionMode.SEQUENTIAL
    max_parallel: int = 32
    tick_batch: int = 100
    probe_waiting: bool = False
    max_failed_runs: int = 5
    """A case whose runs fail this many times in a row (not for an outage, nor a refused write)
    fails with the last error."""
    failed_run_backoff: float = 1.0
    """Seconds before a case whose run failed runs again, doubling with each failure in a row."""
    failed_run_backoff_max: float = 60.0
    """The longest such wait, in seconds."""

    def __post_init__(self) -> None:
        if self.max_failed_runs < 1:
            raise ValueError("max_failed_runs must be at least 1")
        if self.failed_run_backoff < 0 or self.failed_run_backoff_max < 0:
            raise ValueError("failed-run backoffs must not be negative")

    def failed_run_delay(self, failures: int) -> float:
        """How long a case waits after its `failures`-th failed run in a row."""
        return min(self.failed_run_backoff * 2.0 ** (failures - 1), self.failed_run_backoff_max)
