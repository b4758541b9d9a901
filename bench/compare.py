"""Sets tianshu's B1-B4, B6 and B7 beside the anchors measured in the same run: the ratios and targets.

Usage: python bench/compare.py RESULTS      (RESULTS: the lines the systems printed, one each)
Prints 'ratios tianshu/dbos=…x tianshu/langgraph=…x seq_p50/asyncpg_commit_p50=…x …', then one
'target <ratio><op><bound>x PASS|MISS' line per target (a bound computed from another ratio of the
run shows how, and its value). Exits 1, naming the system, if a system's line or one of its figures
is missing; a MISS is reported, not an error.
"""

from __future__ import annotations

import math
import operator
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

REQUIRED: dict[str, tuple[str, ...]] = {
    "tianshu": (
        "b1_steps_per_s",
        "b1_seq_step_p50_ms",
        "b2_wake_p50_ms",
        "b2_wake_p99_ms",
        "b3_tool_rt_p50_ms",
        "b3_tool_rt_p99_ms",
        "b3_scale_1_to_3",
        "nats_rr_p50_ms",
        "b4_provider_overhead_p50_ms",
        "b4_provider_bare_p50_ms",
        "b4_gateway_overhead_p50_ms",
        "b4_gateway_overhead_p99_ms",
        "b4_nats_rr_p50_ms",
        "b4_ttft_overhead_p50_ms",
        "b4_concurrent_ratio",
        "b4_step_overhead_ratio",
        "b6_children_per_child_ratio_1000_10",
        "b7_wake_age_ratio",
    ),
    "dbos": ("steps_per_s", "wake_p50_ms", "wake_p99_ms"),
    "langgraph": ("steps_per_s",),
    "asyncpg": ("commit_p50_ms", "commits_per_s"),
}


@dataclass(frozen=True)
class RatioPlus:
    """A bound computed in the run: another of its ratios plus a constant."""

    ratio: str
    plus: float

    def resolve(self, ratios: dict[str, float]) -> tuple[float, str]:
        value = ratios[self.ratio] + self.plus
        return value, f"{self.ratio}+{self.plus:g}={value:.2f}"


# (ratio, comparison, bound): tianshu's throughput over the anchors', its step latency over one commit's,
# its wake latency over DBOS's, a tool call's round trip over a bare NATS request/reply (both measured
# by B3 on one server), B3's scale-out from one tool runner to three, what a model provider adds to the
# bare SDK call (B4, both against the scripted model server), and B4's LLM gateway: what a bare call
# through it adds (p50, p99) and what it adds to the first streamed token, over a bare NATS
# request/reply of the same run; a workflow step's model call (scheduler and gateway) over the bare
# SDK call, at most B3's tool round trip over its request/reply plus one; its throughput over the
# bare SDK's at 32 calls at a time; B7: the median of a case's last ten wakes over its first ten.
TARGETS: list[tuple[str, str, float | RatioPlus]] = [
    ("tianshu/dbos", ">=", 30.0),
    ("tianshu/langgraph", ">=", 12.0),
    ("seq_p50/asyncpg_commit_p50", "<=", 1.5),
    ("b2_wake_p50/dbos_wake_p50", "<=", 0.5),
    ("b2_wake_p99/dbos_wake_p99", "<=", 1.0),
    ("b3_tool_rt_p50/nats_rr_p50", "<=", 8.0),
    ("b3_scale_1_to_3", ">=", 2.5),
    ("b4_provider_overhead/bare_p50", "<=", 0.10),
    ("b4_gateway_overhead_p50/b4_nats_rr_p50", "<=", 4.0),
    ("b4_gateway_overhead_p99/b4_nats_rr_p50", "<=", 10.0),
    ("b4_ttft_overhead_p50/b4_nats_rr_p50", "<=", 4.0),
    ("b4_step_overhead_ratio", "<=", RatioPlus("b3_tool_rt_p50/nats_rr_p50", 1.0)),
    ("b4_concurrent_ratio", ">=", 0.5),
    ("b6_children_per_child_ratio_1000_10", "<=", 2.0),
    ("b7_wake_age_ratio", "<=", 1.5),
]
# Differences of two medians (or p99s): noise can make them zero or negative; they only have to be numbers.
SIGNED = frozenset(
    {
        "b4_provider_overhead_p50_ms",
        "b4_gateway_overhead_p50_ms",
        "b4_gateway_overhead_p99_ms",
        "b4_ttft_overhead_p50_ms",
    }
)
COMPARE: dict[str, Callable[[float, float], bool]] = {">=": operator.ge, "<=": operator.le}


def resolve(bound: float | RatioPlus, ratios: dict[str, float]) -> tuple[float, str]:
    """A target's bound in this run, and how to show it."""
    return bound.resolve(ratios) if isinstance(bound, RatioPlus) else (bound, f"{bound:g}")


def parse(text: str) -> dict[str, dict[str, float]]:
    """'system key=value key=value' lines → {system: {key: value}}; other lines are ignored."""
    found: dict[str, dict[str, float]] = {}
    for line in text.splitlines():
        system, _, rest = line.strip().partition(" ")
        if system not in REQUIRED:
            continue
        figures = found.setdefault(system, {})  # a system may print several lines (B1, B2)
        for pair in rest.split():
            key, sep, value = pair.partition("=")
            try:
                figures[key] = float(value) if sep else float("nan")
            except ValueError:
                continue
    return found


def check(found: dict[str, dict[str, float]]) -> list[str]:
    """One message per system whose line or figures are missing or unusable."""
    problems = []
    for system, keys in REQUIRED.items():
        if system not in found:
            problems.append(f"{system}: no '{system} …' line")
            continue
        bad = [
            k
            for k in keys
            if not (
                math.isfinite(found[system].get(k, math.nan))
                if k in SIGNED
                else found[system].get(k, 0.0) > 0.0
            )
        ]  # missing, nan, zero
        if bad:
            problems.append(f"{system}: missing or non-positive {', '.join(bad)}")
    return problems


def ratios(found: dict[str, dict[str, float]]) -> dict[str, float]:
    t = found["tianshu"]
    return {
        "tianshu/dbos": t["b1_steps_per_s"] / found["dbos"]["steps_per_s"],
        "tianshu/langgraph": t["b1_steps_per_s"] / found["langgraph"]["steps_per_s"],
        "seq_p50/asyncpg_commit_p50": t["b1_seq_step_p50_ms"] / found["asyncpg"]["commit_p50_ms"],
        "b2_wake_p50/dbos_wake_p50": t["b2_wake_p50_ms"] / found["dbos"]["wake_p50_ms"],
        "b2_wake_p99/dbos_wake_p99": t["b2_wake_p99_ms"] / found["dbos"]["wake_p99_ms"],
        "b3_tool_rt_p50/nats_rr_p50": t["b3_tool_rt_p50_ms"] / t["nats_rr_p50_ms"],
        "b3_scale_1_to_3": t["b3_scale_1_to_3"],
        "b4_provider_overhead/bare_p50": t["b4_provider_overhead_p50_ms"] / t["b4_provider_bare_p50_ms"],
        "b4_gateway_overhead_p50/b4_nats_rr_p50": t["b4_gateway_overhead_p50_ms"] / t["b4_nats_rr_p50_ms"],
        "b4_gateway_overhead_p99/b4_nats_rr_p50": t["b4_gateway_overhead_p99_ms"] / t["b4_nats_rr_p50_ms"],
        "b4_ttft_overhead_p50/b4_nats_rr_p50": t["b4_ttft_overhead_p50_ms"] / t["b4_nats_rr_p50_ms"],
        "b4_step_overhead_ratio": t["b4_step_overhead_ratio"],
        "b4_concurrent_ratio": t["b4_concurrent_ratio"],
        "b6_children_per_child_ratio_1000_10": t["b6_children_per_child_ratio_1000_10"],
        "b7_wake_age_ratio": t["b7_wake_age_ratio"],
    }


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    found = parse(Path(argv[0]).read_text())
    problems = check(found)
    if problems:
        for problem in problems:
            print(f"bench: compare FAILED: {problem}", file=sys.stderr)
        return 1
    r = ratios(found)
    print("ratios " + " ".join(f"{name}={value:.2f}x" for name, value in r.items()))
    for name, op, bound in TARGETS:
        limit, shown = resolve(bound, r)
        verdict = "PASS" if COMPARE[op](r[name], limit) else "MISS"
        print(f"target {name}{op}{shown}x {verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
