"""`make demo`: the approval workflow end to end on real Postgres, in library mode.

Uses the Postgres named by TIANSHU_DATABASE_URL, or starts an embedded one (pip's `pgserver`).
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from examples.approval import ApprovalWorkflow
from tianshu_core import Engine, connect_postgres, default_registry
from tianshu_core.local.embedded import database_url


async def main() -> int:
    url = database_url()
    print(f"postgres: {url.split('@')[-1]}")
    stores = await connect_postgres(url, migrate=True, max_size=4)
    if "approval_explicit" not in default_registry:
        default_registry.register("approval_explicit", ApprovalWorkflow)
    engine = Engine(stores, default_registry)
    try:
        for code, decision in (
            ("approval", {"verdict": "approved"}),
            ("approval_explicit", {"verdict": "rejected", "reason": "Budget too high"}),
        ):
            case = await engine.run_workflow(code, {"title": "Buy 8 GPUs"})
            print(f"[{code}] case {case.case_key}: {case.execution_state.value} for a review decision")
            published = await engine.publish_event("review_decision", case.case_key, decision)
            print(f"[{code}] published {decision} on review_decision/{case.case_key}: woke {published.woken}")
            await engine.run_until_idle()
            done = await engine.get_case(case.case_key)
            print(
                f"[{code}] case {done.case_key}: {done.execution_state.value} "
                f"{done.finished_type!r} ({done.finished_description}) output={done.output}"
            )
            for entry in await engine.history(case.case_key):
                print(f"    journal {entry.seq}: {entry.kind} {entry.name}")
            if done.finished_type != decision["verdict"]:
                print("demo failed: the decision did not reach the workflow", file=sys.stderr)
                return 1
    finally:
        await stores.close()
    print("demo ok")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
