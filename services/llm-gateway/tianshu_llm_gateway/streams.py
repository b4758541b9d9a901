"""The streams and the shared consumer an LLM gateway needs, ensured at start-up."""

from __future__ import annotations

from tianshu_contracts import subjects
from tianshu_core.bus import ConsumerSpec, StreamSpec, TianshuStreams

_WANTED = (subjects.STREAM_DLQ, subjects.STREAM_LLM, subjects.STREAM_LLM_RESULTS, subjects.STREAM_LLM_STREAM)


def gateway_streams() -> list[StreamSpec]:
    """The dead letters, the model calls' work queue, their results and their stream events, with
    the settings the schedulers ensure (one definition, so nobody updates a stream back and forth)."""
    return [spec for spec in TianshuStreams().specs() if spec.name in _WANTED]


def calls_consumer(*, ack_wait_s: float) -> ConsumerSpec:
    """The durable pull consumer every gateway shares, so that they compete for the same calls."""
    about = "The LLM gateways' shared consumer of model calls."
    consumer = subjects.CONSUMER_LLM_CALLS
    return ConsumerSpec(subjects.STREAM_LLM, consumer, subjects.LLM_CALLS, ack_wait_s, description=about)
