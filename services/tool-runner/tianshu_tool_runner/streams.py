"""The streams and the shared consumer a tool runner needs, ensured at start-up."""

from __future__ import annotations

from tianshu_contracts import subjects
from tianshu_core.bus import ConsumerSpec, StreamSpec, TianshuStreams
from tianshu_core.bus.streams import DAY_S

# Used only while TianshuStreams does not list the tool streams: once it does, its specs win, so
# that the runners and the schedulers never update a stream back and forth.
_FALLBACK = {
    subjects.STREAM_TOOLS: StreamSpec(
        name=subjects.STREAM_TOOLS,
        subjects=subjects.STREAM_SUBJECTS[subjects.STREAM_TOOLS],
        retention="workqueue",
        max_age_s=7 * DAY_S,
        description="Tool calls: work for the tool runners, removed once answered.",
    ),
    subjects.STREAM_TOOL_RESULTS: StreamSpec(
        name=subjects.STREAM_TOOL_RESULTS,
        subjects=subjects.STREAM_SUBJECTS[subjects.STREAM_TOOL_RESULTS],
        max_age_s=7 * DAY_S,
        description="Tool results, by case, for the schedulers; Nats-Msg-Id is the call id.",
    ),
}


def runner_streams() -> list[StreamSpec]:
    """The dead-letter stream, the tool calls' work queue and the results' stream."""
    known = {spec.name: spec for spec in TianshuStreams().specs()}
    return [
        known[subjects.STREAM_DLQ],
        known.get(subjects.STREAM_TOOLS, _FALLBACK[subjects.STREAM_TOOLS]),
        known.get(subjects.STREAM_TOOL_RESULTS, _FALLBACK[subjects.STREAM_TOOL_RESULTS]),
    ]


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
