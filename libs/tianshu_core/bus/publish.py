"""Publishing: JetStream with a deterministic `Nats-Msg-Id`, core NATS, and requests; all traced."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TypeVar

from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.api import PubAck
from opentelemetry import trace
from opentelemetry.trace import Tracer
from pydantic import BaseModel, TypeAdapter

from tianshu_contracts.subjects import HEADER_MSG_ID

from .tracing import default_tracer, inject, start_producer_span

T = TypeVar("T")

Payload = BaseModel | bytes


def encode(payload: Payload) -> bytes:
    """A model as compact JSON (its `kind` included); bytes as they are."""
    return payload.model_dump_json().encode() if isinstance(payload, BaseModel) else payload


def _headers(msg_id: str | None, headers: Mapping[str, str] | None) -> dict[str, str]:
    carrier = dict(headers or {})
    if msg_id is not None:
        carrier[HEADER_MSG_ID] = msg_id
    return inject(carrier)


async def publish(
    js: JetStreamContext,
    subject: str,
    payload: Payload,
    *,
    msg_id: str | None = None,
    headers: Mapping[str, str] | None = None,
    stream: str | None = None,
    timeout_s: float | None = None,
    tracer: Tracer | None = None,
) -> PubAck:
    """Publish to JetStream and wait for the stream's acknowledgement.

    `msg_id` becomes `Nats-Msg-Id`: the stream drops a repeat within its duplicate window (the
    returned ack says `duplicate=True`). `stream` makes the server refuse the message unless that
    stream captures `subject`. The trace context of a PRODUCER span goes into the headers.
    """
    data = encode(payload)
    span = start_producer_span(
        tracer or default_tracer(),
        subject,
        {"messaging.message.body.size": len(data), **({"messaging.message.id": msg_id} if msg_id else {})},
    )
    with trace.use_span(span, end_on_exit=True, record_exception=True, set_status_on_exception=True):
        ack = await js.publish(
            subject, data, timeout=timeout_s, stream=stream, headers=_headers(msg_id, headers)
        )
        span.set_attribute("messaging.nats.stream", ack.stream)
        span.set_attribute("messaging.nats.stream_seq", ack.seq)
        if ack.duplicate:
            span.set_attribute("messaging.nats.duplicate", True)
        return ack


async def published_last(js: JetStreamContext, stream: str, subject: str, msg_id: str) -> bool:
    """Whether the last message `stream` holds on `subject` is the one published as `msg_id`: how
    a service taking a call again tells that the one that died with it had already answered it
    (its result is the last on the case's subject). False when it cannot tell (no message yet,
    NATS slow): the caller does the work again, and its repeated result is a duplicate."""
    try:
        last = await js.get_last_msg(stream, subject)
    except Exception:
        return False
    return (last.headers or {}).get(HEADER_MSG_ID) == msg_id


async def publish_core(
    nc: Client,
    subject: str,
    payload: Payload,
    *,
    headers: Mapping[str, str] | None = None,
    tracer: Tracer | None = None,
) -> None:
    """Publish on core NATS (no stream, no acknowledgement): notifications and refusals."""
    data = encode(payload)
    span = start_producer_span(
        tracer or default_tracer(), subject, {"messaging.message.body.size": len(data)}
    )
    with trace.use_span(span, end_on_exit=True, record_exception=True, set_status_on_exception=True):
        await nc.publish(subject, data, headers=_headers(None, headers))


async def request(
    nc: Client,
    subject: str,
    payload: Payload,
    reply: TypeAdapter[T],
    *,
    timeout_s: float = 5.0,
    headers: Mapping[str, str] | None = None,
    tracer: Tracer | None = None,
) -> T:
    """Send a request and validate its reply with `reply` (a `ValidationError` when it does not fit).

    Raises `nats.errors.NoRespondersError` when nobody serves `subject`, `nats.errors.TimeoutError`
    when no reply comes in `timeout_s` seconds.
    """
    data = encode(payload)
    span = start_producer_span(
        tracer or default_tracer(), subject, {"messaging.message.body.size": len(data)}
    )
    with trace.use_span(span, end_on_exit=True, record_exception=True, set_status_on_exception=True):
        answer = await nc.request(subject, data, timeout=timeout_s, headers=_headers(None, headers))
        return reply.validate_json(answer.data)
