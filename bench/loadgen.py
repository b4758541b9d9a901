"""The load rule every B1 run in bench/ follows, tianshu's and the anchors' alike.

`drive` keeps C workers starting workflows until at least N have started AND at least
B1_MIN_SECONDS have passed, then lets the ones in flight finish; the clock stops when the last
one is done. So every system works at least that long, however fast it is, and no system gets
a per-system N chosen by hand. Stdlib only: the anchors import it (as bench.loadgen, with the
repo root on PYTHONPATH) from their own virtualenv.

Knobs (environment): B1_N (minimum workflows, default 300), B1_S (steps per workflow, 10),
B1_C (workflows at a time, 32), B1_MIN_SECONDS (5).
"""

from __future__ import annotations

import asyncio
import os
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass


def env_int(name: str, default: int) -> int:
    """A positive integer from the environment."""
    raw = os.environ.get(name, "")
    value = int(raw) if raw.strip() else default
    if value <= 0:
        raise SystemExit(f"{name} must be a positive integer, not {raw!r}")
    return value


def env_float(name: str, default: float) -> float:
    """A non-negative number from the environment."""
    raw = os.environ.get(name, "")
    value = float(raw) if raw.strip() else default
    if value < 0:
        raise SystemExit(f"{name} must not be negative, not {raw!r}")
    return value


def pg_url() -> str:
    """The database this run owns (created fresh by bench/run)."""
    url = os.environ.get("BENCH_PG_URL", "")
    if not url:
        raise SystemExit("BENCH_PG_URL is not set (bench/run sets it to a freshly created database)")
    return url


@dataclass(frozen=True)
class B1Params:
    """B1's shape: at least `n` workflows of `steps` no-op steps, `concurrency` at a time."""

    n: int
    steps: int
    concurrency: int
    min_seconds: float

    @classmethod
    def from_env(cls) -> B1Params:
        return cls(
            n=env_int("B1_N", 300),
            steps=env_int("B1_S", 10),
            concurrency=env_int("B1_C", 32),
            min_seconds=env_float("B1_MIN_SECONDS", 5.0),
        )


@dataclass(frozen=True)
class Run:
    """What `drive` did: how many calls completed, in how many seconds (wall clock)."""

    count: int
    seconds: float

    def rate(self, per_call: int = 1) -> float:
        return self.count * per_call / self.seconds


async def drive(
    one: Callable[[], Awaitable[object]], *, min_n: int, concurrency: int, min_seconds: float
) -> Run:
    """Run `one()` from `concurrency` workers until `min_n` calls started and `min_seconds` passed."""
    started = 0
    t0 = time.perf_counter()
    deadline = t0 + min_seconds

    async def worker() -> None:
        nonlocal started
        while started < min_n or time.perf_counter() < deadline:
            started += 1
            await one()

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return Run(started, time.perf_counter() - t0)


def p50(values: list[float]) -> float:
    """The median (the same definition for every system)."""
    return statistics.median(values)


def info(message: str) -> None:
    """A detail line for humans, on stderr; bench/run passes '# ' lines through."""
    print(f"# {message}", file=sys.stderr, flush=True)
