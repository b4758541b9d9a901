"""The approval workflow from Tianshu's README, in both styles, reading the reviewer's decision.

Load it into a scheduler with `TIANSHU_WORKFLOWS=examples.approval`.
"""

from __future__ import annotations

from typing import Any

from tianshu_core import BaseWorkflow, PollPredicate, WorkflowContext, WorkflowResult, workflow


def record_submission(resource_data: dict[str, Any]) -> str:
    """The side effect of submitting: here, just the title to review."""
    return str(resource_data["title"])


@workflow("approval")
async def approval(ctx: WorkflowContext) -> WorkflowResult:
    """Submit, wait (as a row, holding nothing) for the reviewer's decision, finish with it."""
    title = await ctx.step("submitted", lambda: record_submission(ctx.case.resource_data))
    decision = await ctx.wait_for_event("review_decision", ctx.case.case_key)
    return await ctx.finish(
        decision["verdict"], decision.get("reason") or decision["verdict"], output={"title": title}
    )


class ApprovalWorkflow(BaseWorkflow):
    """The same workflow in the seed's explicit style: poll, and return `Waiting` when nothing came."""

    async def run(self, ctx: WorkflowContext) -> WorkflowResult:
        title = await ctx.step("submitted", lambda: record_submission(self.case.resource_data))
        wait = PollPredicate(
            resource_type="review_decision",
            resource_id=self.case.case_key,
            step_name="review_decision_received",
            intent_desc="a reviewer approves or rejects the request",
        )
        decision = await ctx.poll(wait)
        if decision is None:
            return ctx.waiting(wait)
        return await ctx.finish(
            decision["verdict"], decision.get("reason") or decision["verdict"], output={"title": title}
        )
