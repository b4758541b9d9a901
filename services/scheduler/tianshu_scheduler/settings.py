"""The scheduler's settings, from the environment (prefix `TIANSHU_`)."""

from __future__ import annotations

import socket

from pydantic import Field

from tianshu_core.settings import Settings


class SchedulerSettings(Settings):
    """Core settings (database, limits, retention) plus the scheduler's own."""

    workflows: str = Field(
        default="",
        description="Comma-separated import paths of the modules that define your workflows.",
    )
    scheduler_name: str = Field(default_factory=socket.gethostname, description="Shown in logs and leases.")
    scheduler_ready_file: str | None = Field(
        default=None, description="Touched once the scheduler serves; removed when it stops."
    )
    scheduler_max_runs: int = Field(default=64, ge=1, description="Cases run at once by this replica.")
    scheduler_sweep_interval_s: float = Field(
        default=0.5, gt=0, description="How often to look for due timers and cases whose holder died."
    )
    scheduler_retention_interval_s: float = Field(
        default=300.0,
        gt=0,
        description="How often to apply the retention settings: delete events older than "
        "TIANSHU_EVENT_RETENTION_S and, if TIANSHU_HISTORY_RETENTION_S is set, finished and failed "
        "cases older than that.",
    )
    scheduler_shutdown_timeout_s: float = Field(
        default=20.0, gt=0, description="SIGTERM: how long in-flight work may take before it is released."
    )
    scheduler_ack_wait_s: float = Field(
        default=30.0, gt=0, description="Ack wait of its JetStream consumers."
    )
    scheduler_max_deliver: int = Field(
        default=5,
        ge=1,
        description="Delivery budget of a message whose handler fails for its own reasons; then it is "
        "dead-lettered. Outages (Postgres or NATS out of reach) do not spend it.",
    )
    scheduler_retry_initial_s: float = Field(
        default=0.5,
        gt=0,
        description="First wait before a failed message is handled again (doubling each time).",
    )
    scheduler_retry_max_s: float = Field(
        default=30.0,
        gt=0,
        description="Longest wait between two attempts; during an outage, the longest a message "
        "waits after the outage ends.",
    )

    scheduler_tool_hot_window_s: float = Field(
        default=5.0,
        ge=0,
        description="How long a case keeps its coroutine waiting for a tool result before it parks "
        "as an ordinary wait (the result still wakes it).",
    )
    scheduler_llm_hot_window_s: float = Field(
        default=120.0,
        ge=0,
        description="How long a case keeps its coroutine waiting for a model's answer through the LLM "
        "gateway before it parks as an ordinary wait (model calls are slow: parking and replaying "
        "every round would cost more than it saves).",
    )
    scheduler_llm_timeout_s: float = Field(
        default=300.0,
        gt=0,
        description="How long a gateway may take to answer one model call (retries and fallback "
        "included); with the hot window and the grace, the call's deadline.",
    )
    scheduler_llm_grace_s: float = Field(
        default=30.0,
        ge=0,
        description="Added to a model call's deadline for a redelivery to another gateway.",
    )
    scheduler_llm_max_attempts: int = Field(
        default=3,
        ge=1,
        description="How often a model call is sent when its deadline passes with no answer (a gateway "
        "outage); after the last, the workflow gets LlmError with class `unavailable`.",
    )
    scheduler_llm_stream: bool = Field(
        default=True,
        description="Ask the gateways to publish every model call's events for followers "
        "(`tianshu cases follow`).",
    )
    scheduler_tool_grace_s: float = Field(
        default=30.0,
        ge=0,
        description="A tool call's deadline is the hot window, the call's timeout and this grace (for a "
        "redelivery to another runner); past it the case tells the model the call failed, and a runner "
        "that receives the call then does not run it.",
    )

    @property
    def workflow_modules(self) -> list[str]:
        return [m.strip() for m in self.workflows.split(",") if m.strip()]
