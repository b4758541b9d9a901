"""The streams and the shared consumer a tool runner needs, ensured at start-up."""

from __future__ import annotations

from tianshu_contracts import subjects
from tianshu_core.bus import ConsumerSpec, StreamSpec, TianshuStreams


def runner_streams() -> list[StreamSpec]:
    """The dead-letter stream, the tool calls' work queue and the results' stream, with the same
    settings the schedulers ensure (one definition, so nobody updates a stream back and forth)."""
    wanted = (subjects.STREAM_DLQ, subjects.STREAM_TOOLS, subjects.STREAM_TOOL_RESULTS)
    return [spec for spec in TianshuStreams().specs() if spec.name in wanted]


def calls_consumer(*, ack_wait_s: float, max_ack_pending: int) -> ConsumerSpec:
    """The durable pull consumer every runner shares, so that they compete for the same calls.

    `max_ack_pending` bounds all runners together; each runner bounds itself by its concurrency.
    """
    return ConsumerSpec(
        stream=subjects.STREAM_TOOLS,
        durable=subjects.CONSUMER_TOOL_CALLS,
        filter_subject=subjects.TOOL_CALLS,
        ack_wait_s=ack_wait_s,
        max_ack_pending=max_ack_pending,
        description="The tool runners' shared consumer of tool calls.",
    )
