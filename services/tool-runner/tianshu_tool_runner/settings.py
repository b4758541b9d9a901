"""The tool-runner's settings, from the environment (prefix `TIANSHU_`; NATS: `TIANSHU_NATS_`)."""

from __future__ import annotations

import socket

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from tianshu_core.tools import DEFAULT_MAX_RESULT_BYTES, DEFAULT_TIMEOUT_S


class ToolRunnerSettings(BaseSettings):
    """What one runner serves and how: its tools, its concurrency, its time limits."""

    model_config = SettingsConfigDict(env_prefix="TIANSHU_", extra="ignore")

    tools: str = Field(
        default="",
        description="Comma-separated import paths of the modules that define your tools (a module-level "
        "`tools` ToolRegistry, else every module-level tool, such as functions decorated with @tool).",
    )
    tool_runner_name: str = Field(
        default_factory=socket.gethostname, description="Shown in logs and in each result (with the pid)."
    )
    tool_runner_ready_file: str | None = Field(
        default=None, description="Touched once the runner takes calls; removed when it stops."
    )
    tool_runner_concurrency: int = Field(
        default=4,
        ge=1,
        le=10_000,
        description="Calls run at once by this runner; it never holds more unacknowledged calls than this.",
    )
    tool_runner_timeout_s: float = Field(
        default=DEFAULT_TIMEOUT_S,
        gt=0,
        description="The longest a call may run here; the call's own timeout_s, its deadline and the "
        "tool's timeout_s may make it shorter.",
    )
    tool_runner_max_result_bytes: int = Field(
        default=DEFAULT_MAX_RESULT_BYTES,
        ge=256,
        description="Longer results are cut to this many UTF-8 bytes, marker included.",
    )
    tool_runner_ack_wait_s: float = Field(
        default=30.0,
        gt=0,
        description="Ack wait of the shared consumer: a call whose runner went silent this long is "
        "delivered again (give every runner the same value; the last one started sets it).",
    )
    tool_runner_heartbeat_s: float | None = Field(
        default=None,
        gt=0,
        description="How often a running call is reported in progress; unset: a third of the ack wait.",
    )
    tool_runner_max_deliver: int = Field(
        default=5,
        ge=1,
        description="Deliveries a call gets; one delivered more often (its runners died or stalled every "
        "time) is answered with an error result instead of being run again. Outages do not spend it.",
    )
    tool_runner_retry_initial_s: float = Field(
        default=0.2,
        gt=0,
        description="First wait before a call whose handling failed is taken again (doubling each time); "
        "also between attempts to publish a result while NATS is away.",
    )
    tool_runner_retry_max_s: float = Field(
        default=5.0,
        gt=0,
        description="Longest wait between two such attempts.",
    )
    max_event_payload_bytes: int = Field(
        default=1024 * 1024,
        ge=4096,
        description="The schedulers' TIANSHU_MAX_EVENT_PAYLOAD_BYTES (give both the same value): a "
        "result, once wrapped for the scheduler, is cut to fit under it.",
    )
    tool_runner_max_ack_pending: int = Field(
        default=10_000,
        ge=1,
        description="Unacknowledged calls the shared consumer allows across all runners.",
    )
    tool_runner_fetch_timeout_s: float = Field(
        default=1.0,
        gt=0,
        le=30,
        description="How long one pull waits for a call; also how long SIGTERM may wait for it to end.",
    )
    tool_runner_shutdown_timeout_s: float = Field(
        default=20.0,
        gt=0,
        description="SIGTERM: how long running calls may take before they are released to other runners.",
    )

    @model_validator(mode="after")
    def _heartbeat_within_ack_wait(self) -> ToolRunnerSettings:
        beat = self.tool_runner_heartbeat_s
        if beat is not None and beat >= self.tool_runner_ack_wait_s:
            raise ValueError(
                "TIANSHU_TOOL_RUNNER_HEARTBEAT_S must be shorter than TIANSHU_TOOL_RUNNER_ACK_WAIT_S, "
                "or running calls are delivered again"
            )
        return self

    @property
    def tool_modules(self) -> list[str]:
        return [m.strip() for m in self.tools.split(",") if m.strip()]
