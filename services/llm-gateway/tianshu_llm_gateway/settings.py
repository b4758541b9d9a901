"""The LLM gateway's settings, from the environment (prefix `TIANSHU_`; NATS: `TIANSHU_NATS_`).

Which providers, models and routes it serves is not a setting: that is the providers file
(`TIANSHU_LLM_GATEWAY_CONFIG`, see `config`).
"""

from __future__ import annotations

import socket

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class LlmGatewaySettings(BaseSettings):
    """Where the providers file is, and how one gateway takes calls: concurrency, time limits."""

    model_config = SettingsConfigDict(env_prefix="TIANSHU_", extra="ignore")

    llm_gateway_config: str | None = Field(
        default=None,
        description="Path of the providers file (YAML: providers, models, routes). Required to serve; "
        "`--check-config PATH` may name it instead.",
    )
    llm_gateway_name: str = Field(
        default_factory=socket.gethostname, description="Shown in logs and in each result (with the pid)."
    )
    llm_gateway_ready_file: str | None = Field(
        default=None, description="Touched once the gateway takes calls; removed when it stops."
    )
    llm_gateway_concurrency: int = Field(
        default=64,
        ge=1,
        le=10_000,
        description="Model calls in flight at once in this gateway; it never holds more unacknowledged "
        "calls than this.",
    )
    llm_gateway_ack_wait_s: float = Field(
        default=30.0,
        gt=0,
        description="Ack wait of the shared consumer: a call whose gateway went silent this long is "
        "delivered again (give every gateway the same value; the last one started sets it).",
    )
    llm_gateway_heartbeat_s: float | None = Field(
        default=None,
        gt=0,
        description="How often a call in flight is reported in progress; unset: a third of the ack wait.",
    )
    llm_gateway_max_deliver: int = Field(
        default=5,
        ge=1,
        description="Deliveries a call gets; one delivered more often (its gateways died or stalled "
        "every time) is answered with an `unavailable` error instead of being sent upstream again.",
    )
    llm_gateway_retry_initial_s: float = Field(
        default=0.2,
        gt=0,
        description="First wait before a call whose handling failed is taken again (doubling each time); "
        "also between attempts to publish a result while NATS is away.",
    )
    llm_gateway_retry_max_s: float = Field(
        default=5.0, gt=0, description="Longest wait between two such attempts."
    )
    llm_gateway_fetch_timeout_s: float = Field(
        default=1.0,
        gt=0,
        le=30,
        description="How long one pull waits for a call; also how long SIGTERM may wait for it to end.",
    )
    llm_gateway_shutdown_timeout_s: float = Field(
        default=20.0,
        gt=0,
        description="SIGTERM: how long calls in flight may take before they are released to other gateways.",
    )
    llm_gateway_max_request_bytes: int | None = Field(
        default=None,
        ge=1024,
        description="Larger calls are dead-lettered unread (`too_large`); unset: the NATS server's "
        "max_payload (a call larger than the server carries never arrives).",
    )
    llm_gateway_coalesce_ms: float = Field(
        default=50.0,
        ge=0,
        description="A streamed call's text deltas after the first are sent together, each held at most "
        "this long (0: every delta as it comes).",
    )
    llm_gateway_record_prompts: bool = Field(
        default=False,
        description="Put the prompt and the reply's text in the call's span and debug log (off: only "
        "sizes, tokens and timings).",
    )

    @model_validator(mode="after")
    def _heartbeat_under_ack_wait(self) -> LlmGatewaySettings:
        beat = self.llm_gateway_heartbeat_s
        if beat is not None and beat >= self.llm_gateway_ack_wait_s:
            raise ValueError(
                "TIANSHU_LLM_GATEWAY_HEARTBEAT_S must be shorter than TIANSHU_LLM_GATEWAY_ACK_WAIT_S, "
                "or calls in flight are delivered again"
            )
        return self
