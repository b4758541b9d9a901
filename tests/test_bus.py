"""The NATS bus helpers against a real nats-server (2.15 from the wheel; one test on 2.9 when present)."""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import math
import os
import random
import signal
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import nats.errors
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import RetentionPolicy
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from pydantic import JsonValue, TypeAdapter

from tests._nats import NatsServer, NatsServerFactory, TlsFiles, make_ca
from tianshu_contracts import (
    CASE_COMMAND_ADAPTER,
    DEAD_LETTER_ADAPTER,
    GET_CASE_ADAPTER,
    GET_CASE_REPLY_ADAPTER,
    REFUSAL_ADAPTER,
    CancelCase,
    CaseNotFound,
    DeadLetter,
    DeadLetterReason,
    GetCase,
    PauseCase,
    RequestRefused,
    subjects,
)
from tianshu_core import bus
from tianshu_core.bus import (
    Backoff,
    ConsumerSpec,
    DeadLetterSink,
    Delivery,
    GracefulShutdown,
    NatsSettings,
    NatsStartupError,
    RejectMessage,
    Responder,
    StreamConfigError,
    StreamSpec,
    TianshuStreams,
    Worker,
    WorkerOptions,
)
from tianshu_core.bus.strict import out_of_range_number
from tianshu_core.errors import StoreUnavailableError
from tianshu_core.transient import is_transient

pytestmark = pytest.mark.nats

Command = CancelCase | PauseCase  # what the test lanes carry (the command union's models)
FAST = Backoff(initial_s=0.05, multiplier=1.0, max_s=0.05, jitter=0.0)


def settings(url: str, **overrides: Any) -> NatsSettings:
    values: dict[str, Any] = {
        "url": url,
        "connect_timeout_s": 1.0,
        "startup_timeout_s": 5.0,
        "reconnect_time_wait_s": 0.1,
        "request_timeout_s": 2.0,
    }
    values.update(overrides)
    return NatsSettings(**values)


async def eventually(predicate: Callable[[], bool], within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)


@pytest.fixture
async def nc(nats_url: str) -> AsyncIterator[Client]:
    client = await bus.connect(settings(nats_url), name="tianshu-tests")
    yield client
    await client.close()


@dataclass
class Lane:
    """A work stream, its DLQ stream and a durable consumer, named uniquely for one test."""

    prefix: str
    work: StreamSpec
    dlq: StreamSpec
    consumer: ConsumerSpec
    seen: list[tuple[Any, Delivery]] = field(default_factory=list)

    def subject(self, key: str) -> str:
        return f"{self.prefix}.work.{key}"

    def sink(self, nc: Client, **kw: Any) -> DeadLetterSink:
        return DeadLetterSink(
            nc,
            subject_for=lambda s: f"{self.prefix}.dlq.{s}",
            refusal_subject_for=lambda s: f"{self.prefix}.errors.{s}",
            **kw,
        )

    async def dead_letters(self, js: JetStreamContext) -> list[tuple[DeadLetter, dict[str, str]]]:
        info = await js.stream_info(self.dlq.name)
        out = []
        for seq in range(info.state.first_seq, info.state.last_seq + 1):
            raw = await js.get_msg(self.dlq.name, seq)
            assert raw.data is not None
            out.append((DEAD_LETTER_ADAPTER.validate_json(raw.data), dict(raw.headers or {})))
        return out


async def make_lane(js: JetStreamContext, *, max_deliver: int = -1, ack_wait_s: float = 5) -> Lane:
    tag = uuid.uuid4().hex[:10]
    prefix = f"t{tag}"
    work = StreamSpec(f"W{tag.upper()}", (f"{prefix}.work.>",), retention="workqueue", duplicate_window_s=60)
    dlq = StreamSpec(f"D{tag.upper()}", (f"{prefix}.dlq.>",))
    consumer = ConsumerSpec(
        work.name, f"c{tag}", f"{prefix}.work.>", ack_wait_s=ack_wait_s, max_deliver=max_deliver
    )
    await bus.ensure_streams(js, [work, dlq])
    await bus.ensure_consumer(js, consumer)
    return Lane(prefix, work, dlq, consumer)


async def start_consumer(
    nc: Client,
    lane: Lane,
    handler: Callable[[Command, Delivery], Awaitable[None]] | None = None,
    **options: Any,
) -> Worker[Any]:
    async def record(value: Any, delivery: Delivery) -> None:
        lane.seen.append((value, delivery))

    js = nc.jetstream()
    sub = await bus.pull_subscription(js, lane.consumer)
    tracer = options.pop("tracer", None)
    adapter = options.pop("adapter", CASE_COMMAND_ADAPTER)
    extra = {name: options.pop(name) for name in ("exhausted", "key") if name in options}
    opts = WorkerOptions(**{"fetch_timeout_s": 0.25, "backoff": FAST, **options})
    consumer: Worker[Any] = Worker(
        nc,
        sub,
        adapter,
        handler or record,
        options=opts,
        dead_letters=lane.sink(nc, tracer=tracer),
        name=lane.consumer.durable,
        tracer=tracer,
        **extra,
    )
    consumer.start()
    return consumer


# Streams and consumers -------------------------------------------------------------------------


async def test_tianshu_streams_and_consumers_are_ensured_idempotently(nc: Client) -> None:
    js = nc.jetstream()
    specs = TianshuStreams().specs()
    first = await bus.ensure_streams(js, specs)
    second = await bus.ensure_streams(js, specs)
    assert [s.config.name for s in first] == [
        subjects.STREAM_CASES,
        subjects.STREAM_EVENTS,
        subjects.STREAM_TOOLS,
        subjects.STREAM_TOOL_RESULTS,
        subjects.STREAM_LLM,
        subjects.STREAM_LLM_RESULTS,
        subjects.STREAM_LLM_STREAM,
        subjects.STREAM_DLQ,
    ]
    assert (await js.stream_info(subjects.STREAM_LLM_STREAM)).config.storage == "memory"
    for a, b, spec in zip(first, second, specs, strict=True):
        assert a.created == b.created
        assert spec.differences(b.config) == []
    consumers = bus.scheduler_consumers()
    made = await bus.ensure_consumers(js, consumers)
    again = await bus.ensure_consumers(js, consumers)
    assert [c.name for c in made] == [c.name for c in again]
    assert [c.created for c in made] == [c.created for c in again]
    assert (await js.stream_info(subjects.STREAM_CASES)).config.retention == "workqueue"


async def test_changed_settings_are_applied_and_impossible_changes_explained(
    nc: Client, caplog: pytest.LogCaptureFixture
) -> None:
    js = nc.jetstream()
    lane = await make_lane(js)
    caplog.set_level(logging.INFO, logger="tianshu_core.bus")
    longer = StreamSpec(lane.work.name, lane.work.subjects, retention="workqueue", max_age_s=3600)
    info = await bus.ensure_stream(js, longer)
    assert info.config.max_age == pytest.approx(3600)
    assert f"updated stream {lane.work.name}" in caplog.text
    slower = ConsumerSpec(lane.work.name, lane.consumer.durable, lane.consumer.filter_subject, ack_wait_s=9)
    assert (await bus.ensure_consumer(js, slower)).config.ack_wait == pytest.approx(9)
    assert slower.differences((await js.consumer_info(lane.work.name, lane.consumer.durable)).config) == []
    in_memory = StreamSpec(lane.dlq.name, lane.dlq.subjects, storage="memory")
    with pytest.raises(StreamConfigError, match=r"storage: 'file' -> 'memory'"):
        await bus.ensure_stream(js, in_memory)


async def test_a_work_queue_stream_keeps_its_retention_and_gets_the_other_changes(
    nc: Client, caplog: pytest.LogCaptureFixture
) -> None:
    """The call streams were work queues; NATS cannot change a retention to or from workqueue, so
    a deployment's existing stream keeps it (with a warning) rather than stopping the service."""
    js = nc.jetstream()
    lane = await make_lane(js)
    caplog.set_level(logging.INFO, logger="tianshu_core.bus")
    limits = StreamSpec(lane.work.name, lane.work.subjects, retention="limits", max_age_s=1800)
    info = await bus.ensure_stream(js, limits)
    assert info.config.retention == RetentionPolicy.WORK_QUEUE
    assert info.config.max_age == pytest.approx(1800)
    assert f"stream {lane.work.name} keeps its workqueue retention" in caplog.text
    # The call streams themselves are no work queues any more.
    retention = {spec.name: spec.retention for spec in bus.TianshuStreams().specs()}
    assert retention[subjects.STREAM_TOOLS] == retention[subjects.STREAM_LLM] == "limits"


# Publishing ------------------------------------------------------------------------------------


async def test_publish_with_a_message_id_dedupes_within_the_window(nc: Client) -> None:
    js = nc.jetstream()
    lane = await make_lane(js)
    cmd = CancelCase(case_key="k1")
    first = await bus.publish(js, lane.subject("k1"), cmd, msg_id="cancel-k1")
    repeat = await bus.publish(js, lane.subject("k1"), cmd, msg_id="cancel-k1")
    other = await bus.publish(js, lane.subject("k1"), cmd, msg_id="cancel-k1-again", stream=lane.work.name)
    assert not first.duplicate and repeat.duplicate and not other.duplicate
    assert repeat.seq == first.seq
    assert (await js.stream_info(lane.work.name)).state.messages == 2
    with pytest.raises(nats.js.errors.APIError):  # the stream check refuses a subject another stream owns
        await bus.publish(js, lane.subject("k1"), cmd, msg_id="x", stream=lane.dlq.name)


async def test_trace_context_crosses_nats_and_the_consumer_span_joins_the_trace(nc: Client) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("test")
    js = nc.jetstream()
    lane = await make_lane(js)
    in_handler: list[tuple[int, dict[str, str]]] = []

    async def handler(cmd: Command, delivery: Delivery) -> None:
        in_handler.append((trace.get_current_span().get_span_context().trace_id, dict(delivery.headers)))

    consumer = await start_consumer(nc, lane, handler, tracer=tracer)
    with tracer.start_as_current_span("client") as client_span:
        await bus.publish(js, lane.subject("k1"), PauseCase(case_key="k1"), msg_id="m1", tracer=tracer)
    await eventually(lambda: bool(in_handler))
    await consumer.shutdown(2)

    trace_id = client_span.get_span_context().trace_id
    handler_trace, headers = in_handler[0]
    assert handler_trace == trace_id
    assert headers["traceparent"].split("-")[1] == f"{trace_id:032x}"
    assert headers[subjects.HEADER_MSG_ID] == "m1"
    spans: dict[str, ReadableSpan] = {s.name: s for s in exporter.get_finished_spans()}
    producer = next(s for s in spans.values() if s.kind is SpanKind.PRODUCER)
    consumer_span = next(s for s in spans.values() if s.kind is SpanKind.CONSUMER)
    assert producer.context is not None and consumer_span.context is not None
    assert consumer_span.context.trace_id == producer.context.trace_id == trace_id
    assert consumer_span.parent is not None and consumer_span.parent.span_id == producer.context.span_id
    assert consumer_span.attributes is not None
    assert consumer_span.attributes["tianshu.bus.outcome"] == "acked"
    assert consumer_span.attributes["messaging.message.id"] == "m1"


# Consuming -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("failure", "deliveries"),
    [
        # An outage: the worker keeps the message and tries again; no delivery is spent.
        (ConnectionError("database away"), [1, 1]),
        # A bug: the message is given back and comes again as delivery 2.
        (RuntimeError("bug"), [1, 2]),
    ],
)
async def test_a_failed_handler_is_tried_again_then_the_message_is_processed(
    nc: Client, failure: Exception, deliveries: list[int]
) -> None:
    js = nc.jetstream()
    lane = await make_lane(js)
    attempts: list[int] = []

    async def flaky(cmd: Command, delivery: Delivery) -> None:
        attempts.append(delivery.num_delivered)
        if len(attempts) == 1:
            raise failure
        lane.seen.append((cmd, delivery))

    consumer = await start_consumer(nc, lane, flaky, max_deliver=5)
    await bus.publish(js, lane.subject("k1"), CancelCase(case_key="k1"), msg_id="c1")
    await eventually(lambda: bool(lane.seen))
    await consumer.shutdown(2)
    assert attempts == deliveries
    info = await js.consumer_info(lane.work.name, lane.consumer.durable)
    assert info.num_ack_pending == 0 and info.num_pending == 0
    assert (await js.stream_info(lane.work.name)).state.messages == 0  # work queue: acked means gone
    assert (await js.stream_info(lane.dlq.name)).state.messages == 0


async def test_poison_messages_are_dead_lettered_with_their_reason(nc: Client) -> None:
    js = nc.jetstream()
    lane = await make_lane(js)
    refusals: list[Msg] = []
    watch = await nc.subscribe(f"{lane.prefix}.errors.>", cb=functools.partial(_append, refusals))

    async def handler(cmd: Command, delivery: Delivery) -> None:
        if cmd.case_key == "always-fails":
            raise RuntimeError("bug in the handler")
        if cmd.case_key == "refused":
            raise RejectMessage(LookupError("no such workflow"), case_key=cmd.case_key)
        lane.seen.append((cmd, delivery))

    huge = b'{"kind": "cancel_case", "case_key": "big", "reason": "' + b"x" * 1_500_000 + b'"}'
    poison = {
        "bad-json": (b"{not json", DeadLetterReason.UNDECODABLE),
        "not-utf8": (b"\xff\xfe\x00", DeadLetterReason.UNDECODABLE),
        "wrong-types": (b'{"kind": "cancel_case", "case_key": 42}', DeadLetterReason.SCHEMA_INVALID),
        "unknown-kind": (b'{"kind": "explode_case", "case_key": "k"}', DeadLetterReason.SCHEMA_INVALID),
        "no-kind": (b'{"case_key": "k"}', DeadLetterReason.SCHEMA_INVALID),
        "extra-field": (b'{"kind": "pause_case", "case_key": "k", "x": 1}', DeadLetterReason.SCHEMA_INVALID),
        "oversized": (huge, DeadLetterReason.TOO_LARGE),
        "always-fails": (CancelCase(case_key="always-fails").model_dump_json().encode(), "max_deliveries"),
        "refused": (CancelCase(case_key="refused").model_dump_json().encode(), DeadLetterReason.REFUSED),
    }
    consumer = await start_consumer(nc, lane, handler, max_deliver=3)
    for name, (data, _) in poison.items():
        await bus.publish(js, lane.subject(name), data, msg_id=f"id-{name}")
    await bus.publish(js, lane.subject("good"), PauseCase(case_key="good"), msg_id="id-good")
    await eventually(lambda: len(lane.seen) == 1)
    letters = await _wait_for_letters(js, lane, len(poison))
    await consumer.shutdown(2)

    assert isinstance(lane.seen[0][0], PauseCase)
    by_id = {letter.msg_id: (letter, headers) for letter, headers in letters}
    for name, (data, reason) in poison.items():
        letter, headers = by_id[f"id-{name}"]
        assert letter.reason == reason, name
        assert headers[subjects.HEADER_DEAD_LETTER_REASON] == reason
        assert letter.subject == lane.subject(name) and letter.stream == lane.work.name
        assert letter.raw_payload() == data and not letter.truncated and letter.payload_size == len(data)
        assert letter.error.message
    assert by_id["id-always-fails"][0].delivery_count == 3
    assert "bug in the handler" in by_id["id-always-fails"][0].error.message
    assert "1500" in by_id["id-oversized"][0].error.message
    assert by_id["id-refused"][0].error.type == "LookupError"
    assert "case_key" in by_id["id-wrong-types"][0].error.message
    assert by_id["id-not-utf8"][0].payload_encoding == "base64"
    # The sender could watch: one refusal per dead letter, on the errors subject.
    await eventually(lambda: len(refusals) == len(poison))
    announced = {REFUSAL_ADAPTER.validate_json(m.data).msg_id for m in refusals}
    assert announced == set(by_id)
    refused = REFUSAL_ADAPTER.validate_json(next(m.data for m in refusals if b"no such workflow" in m.data))
    assert refused.case_key == "refused"
    # Nothing stays pending in the work stream.
    info = await js.consumer_info(lane.work.name, lane.consumer.durable)
    assert info.num_ack_pending == 0 and info.num_pending == 0
    await watch.unsubscribe()


async def test_a_message_whose_earlier_delivery_never_finished_is_dead_lettered(nc: Client) -> None:
    js = nc.jetstream()
    lane = await make_lane(js)
    await bus.publish(js, lane.subject("k"), CancelCase(case_key="k"), msg_id="once")
    # A replica took it and died without an answer: simulated by a nak from a raw subscription.
    raw = await bus.pull_subscription(js, lane.consumer)
    (first,) = await raw.fetch(1, timeout=2)
    await first.nak()
    await raw.unsubscribe()
    consumer = await start_consumer(nc, lane, max_deliver=1)
    (letter, _), *_ = await _wait_for_letters(js, lane, 1)
    await consumer.shutdown(2)
    assert letter.reason == DeadLetterReason.MAX_DELIVERIES and letter.delivery_count == 2
    assert "never finished" in letter.error.message
    assert lane.seen == []


async def test_a_batch_keeps_the_order_of_one_key_and_runs_keys_concurrently(nc: Client) -> None:
    js = nc.jetstream()
    lane = await make_lane(js)
    running = 0
    peak = 0
    order: dict[str, list[str | None]] = {"a": [], "b": []}

    async def slow(cmd: Command, delivery: Delivery) -> None:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await asyncio.sleep(0.05)
        order[cmd.case_key].append(cmd.reason)
        running -= 1

    for i in range(5):
        for key in ("a", "b"):
            await bus.publish(js, lane.subject(key), CancelCase(case_key=key, reason=str(i)))
    consumer = await start_consumer(nc, lane, slow, batch=10)
    await eventually(lambda: sum(map(len, order.values())) == 10)
    await consumer.shutdown(2)
    assert order == {"a": list("01234"), "b": list("01234")}
    assert peak == 2


# The worker's settling -------------------------------------------------------------------------


async def test_not_strict_json_is_refused_on_its_first_delivery(nc: Client) -> None:
    js = nc.jetstream()
    lane = await make_lane(js)
    bad = {
        "nan": b"NaN",
        "minus-inf": b"-Infinity",
        "nested": b'{"x": [1, {"y": NaN}]}',
        "inf": b"[Infinity]",
    }
    consumer = await start_consumer(nc, lane, adapter=TypeAdapter(JsonValue), max_deliver=3)
    for name, data in bad.items():
        await bus.publish(js, lane.subject(name), data, msg_id=f"id-{name}")
    # The words inside a string are text, not values.
    await bus.publish(js, lane.subject("words"), b'{"note": "NaN and Infinity"}', msg_id="id-words")
    letters = await _wait_for_letters(js, lane, len(bad))
    await eventually(lambda: len(lane.seen) == 1)
    await consumer.shutdown(2)
    assert lane.seen[0][0] == {"note": "NaN and Infinity"}
    by_id = {letter.msg_id: letter for letter, _ in letters}
    assert set(by_id) == {f"id-{name}" for name in bad}
    for letter in by_id.values():
        assert letter.reason == DeadLetterReason.NOT_STRICT_JSON and letter.delivery_count == 1
        assert "not strict JSON" in letter.error.message
    assert "-Infinity" in by_id["id-minus-inf"].error.message


async def test_a_nul_character_is_refused_as_unstorable_where_asked(nc: Client) -> None:
    js = nc.jetstream()
    lane = await make_lane(js)
    consumer = await start_consumer(nc, lane, refuse_nul=True)
    nul = b'{"kind": "cancel_case", "case_key": "k", "reason": "a\\u0000b"}'
    escaped = b'{"kind": "cancel_case", "case_key": "k2", "reason": "a\\\\u0000b"}'
    await bus.publish(js, lane.subject("nul"), nul, msg_id="id-nul")
    await bus.publish(js, lane.subject("escaped"), escaped, msg_id="id-escaped")
    (letter, _), *_ = await _wait_for_letters(js, lane, 1)
    await eventually(lambda: len(lane.seen) == 1)
    await consumer.shutdown(2)
    assert letter.msg_id == "id-nul" and letter.delivery_count == 1
    assert letter.reason == DeadLetterReason.UNSTORABLE and "NUL" in letter.error.message
    # A backslash followed by "u0000" is ordinary text.
    assert lane.seen[0][0].reason == "a\\u0000b"


def _beyond_a_double(data: bytes) -> str | None:
    """What `out_of_range_number` says, without its pre-check: the body parsed every time."""
    try:
        json.loads(data, parse_float=_finite_only)
    except OverflowError as exc:
        return str(exc)[:40]
    except ValueError:
        return None
    return None


def _finite_only(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise OverflowError(text)
    return value


def test_a_number_beyond_a_double_is_found_whatever_its_shape() -> None:
    huge = [
        b"1e400",
        b"\xef\xbb\xbf 1e400",  # json reads a body behind a UTF-8 BOM
        b'{"x": 1E+400}',
        b'{"x" :\n\t-1e0400, "y": 2}',
        b"[1.5e309]",
        b'{"x": 1.8e308}',
        b'{"x": 1' + b"0" * 400 + b".5}",
        # 250 digits and a two-digit exponent: 1e349 (the earlier `\d{300}` missed it).
        b'{"x": 1' + b"0" * 249 + b".0e99}",
        b'{"x": 1' + b"0" * 400 + b"e-50}",
        b'{"x":[1, 2e300,\r\n-3e400]}',
        b"[ 1e400x]",  # json reads the number before it finds the body is no JSON
    ]
    for data in huge:
        assert out_of_range_number(data) is not None, data
        assert out_of_range_number(data) == _beyond_a_double(data), data
    fine = [
        b'{"x": 1.7e308, "y": 1e-400, "z": -1E-999}',
        b'{"id": "3e141f7e0099", "note": "1e400 in a string", "k": "a,1e400"}',
        b'{"n": 1' + b"0" * 400 + b"}",  # an integer: Python reads it whole
        b'{"x": 1' + b"0" * 200 + b".5}",
        b'{"x": 1' + b"0" * 200 + b"e99}",
    ]
    for data in fine:
        assert out_of_range_number(data) is None, data
    # The look at the body's shape only spares the parse: it answers as the parse alone would.
    rng = random.Random(20240611)

    def digits(low: int, high: int) -> str:
        return "".join(rng.choice("0123456789") for _ in range(rng.randint(low, high)))

    for _ in range(2000):
        whole = rng.choice("123456789") + digits(0, rng.choice((3, 220, 320)))
        number = rng.choice(("", "-")) + whole
        if rng.random() < 0.5:
            number += "." + digits(1, 5)
        if rng.random() < 0.7:
            number += rng.choice("eE") + rng.choice(("", "+", "-")) + digits(1, 4)
        space = rng.choice(("", " ", "\n", " \t\r\n"))
        for text in (
            number,
            f"{space}{number}{space}",
            f"[{space}{number}]",
            f'{{"a": "x{number}y",{space}"b"{space}:{space}{number}}}',
            f"[1,{number}x]",
            f'"{number}"',
        ):
            body = text.encode()
            assert out_of_range_number(body) == _beyond_a_double(body), body


async def test_an_outage_longer_than_the_budget_spends_no_delivery(nc: Client) -> None:
    js = nc.jetstream()
    lane = await make_lane(js)
    attempts: list[int] = []

    async def outage(cmd: Command, delivery: Delivery) -> None:
        attempts.append(delivery.num_delivered)
        if len(attempts) <= 6:
            raise asyncpg.exceptions.CannotConnectNowError("the database system is starting up")
        lane.seen.append((cmd, delivery))

    consumer = await start_consumer(nc, lane, outage, max_deliver=2)
    await bus.publish(js, lane.subject("k"), CancelCase(case_key="k"), msg_id="k")
    await eventually(lambda: bool(lane.seen))
    await consumer.shutdown(2)
    assert attempts == [1] * 7  # held and tried again: never redelivered, never dead-lettered
    assert (await js.stream_info(lane.dlq.name)).state.messages == 0
    info = await js.consumer_info(lane.work.name, lane.consumer.durable)
    assert info.num_ack_pending == 0 and info.num_redelivered == 0


async def test_stopping_during_an_outage_gives_the_message_back(nc: Client, nats_url: str) -> None:
    js = nc.jetstream()
    lane = await make_lane(js)
    tried = asyncio.Event()

    async def down(cmd: Command, delivery: Delivery) -> None:
        tried.set()
        raise nats.errors.NoServersError()

    client = await bus.connect(settings(nats_url))
    consumer = await start_consumer(client, lane, down)
    await bus.publish(js, lane.subject("k"), CancelCase(case_key="k"))
    await tried.wait()
    began = time.monotonic()
    assert await consumer.shutdown(5)
    assert time.monotonic() - began < 2
    other = await bus.pull_subscription(js, lane.consumer)
    (msg,) = await other.fetch(1, timeout=2)
    assert msg.metadata.num_delivered == 2
    await msg.ack()
    await client.close()


async def test_the_worker_holds_no_more_than_its_free_slots(nc: Client) -> None:
    js = nc.jetstream()
    lane = await make_lane(js)
    running = 0
    peak = 0
    pending: list[int] = []

    async def slow(cmd: Command, delivery: Delivery) -> None:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        pending.append((await js.consumer_info(lane.work.name, lane.consumer.durable)).num_ack_pending)
        await asyncio.sleep(0.05)
        lane.seen.append((cmd, delivery))
        running -= 1

    for i in range(12):
        await bus.publish(js, lane.subject(f"k{i}"), CancelCase(case_key=f"k{i}"))
    consumer = await start_consumer(nc, lane, slow, concurrency=3, batch=8)
    await eventually(lambda: len(lane.seen) == 12)
    await consumer.shutdown(2)
    assert peak == 3
    assert max(pending) <= 3, pending


async def test_a_long_handler_is_kept_in_progress_and_runs_once(nc: Client) -> None:
    js = nc.jetstream()
    lane = await make_lane(js, ack_wait_s=1)
    runs: list[int] = []

    async def long(cmd: Command, delivery: Delivery) -> None:
        runs.append(delivery.num_delivered)
        await asyncio.sleep(3)
        lane.seen.append((cmd, delivery))

    consumer = await start_consumer(nc, lane, long, heartbeat_s=0.3)
    await bus.publish(js, lane.subject("k"), CancelCase(case_key="k"))
    await eventually(lambda: bool(lane.seen), within=10)
    await consumer.shutdown(2)
    assert runs == [1]
    info = await js.consumer_info(lane.work.name, lane.consumer.durable)
    assert info.num_redelivered == 0 and info.num_ack_pending == 0


async def test_an_exhausted_message_goes_to_the_exhausted_handler(nc: Client) -> None:
    js = nc.jetstream()
    lane = await make_lane(js)
    await bus.publish(js, lane.subject("k"), CancelCase(case_key="k"), msg_id="once")
    raw = await bus.pull_subscription(js, lane.consumer)
    (first,) = await raw.fetch(1, timeout=2)
    await first.nak()  # a runner died with it
    await raw.unsubscribe()
    answered: list[int] = []

    async def exhausted(cmd: Command, delivery: Delivery) -> None:
        answered.append(delivery.num_delivered)

    consumer = await start_consumer(nc, lane, max_deliver=1, exhausted=exhausted)
    await eventually(lambda: bool(answered))
    await consumer.shutdown(2)
    assert answered == [2] and lane.seen == []
    assert (await js.stream_info(lane.dlq.name)).state.messages == 0


def test_one_classifier_says_what_an_outage_is() -> None:
    assert is_transient(asyncpg.exceptions.AdminShutdownError("terminated"))
    assert is_transient(asyncpg.exceptions.TooManyConnectionsError("full"))
    assert is_transient(ConnectionRefusedError())
    assert is_transient(TimeoutError())  # a pool or NATS timeout
    assert is_transient(nats.errors.TimeoutError())
    assert is_transient(nats.errors.ConnectionClosedError())
    assert is_transient(nats.errors.NoServersError())
    assert is_transient(StoreUnavailableError("out of retries"))
    assert not is_transient(asyncpg.exceptions.UniqueViolationError("dup"))
    assert not is_transient(asyncpg.exceptions.CharacterNotInRepertoireError("NUL"))
    assert not is_transient(asyncpg.exceptions.QueryCanceledError("statement timeout"))
    assert not is_transient(FileNotFoundError("/no/such/file"))
    assert not is_transient(RuntimeError("a bug"))
    assert not is_transient(ValueError("bad input"))


# Connecting ------------------------------------------------------------------------------------


async def test_token_auth(make_nats_server: NatsServerFactory, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    server = make_nats_server(token="right-token-4f2a")
    client = await bus.connect(settings(server.url, token="right-token-4f2a"))
    assert client.is_connected
    await client.close()
    started = time.monotonic()
    with pytest.raises(NatsStartupError) as info:
        await bus.connect(settings(server.url, token="wrong-token-9c1b"))
    assert time.monotonic() - started < 3, "a refused token must fail at once, not after the start-up timeout"
    message = str(info.value)
    assert "refused" in message and "TIANSHU_NATS_TOKEN" in message and "127.0.0.1" in message
    assert "wrong-token-9c1b" not in message
    with pytest.raises(NatsStartupError, match="no credentials"):
        await bus.connect(settings(server.url))
    assert "right-token-4f2a" not in caplog.text and "wrong-token-9c1b" not in caplog.text


async def test_token_from_a_file(make_nats_server: NatsServerFactory, tmp_path: Path) -> None:
    server = make_nats_server(token="file-token")
    secret = tmp_path / "token"
    secret.write_text("file-token\n")
    client = await bus.connect(settings(server.url, token_file=secret))
    await client.close()
    with pytest.raises(NatsStartupError, match="not a readable file"):
        await bus.connect(settings(server.url, token_file=tmp_path / "missing"))


async def test_nkey_auth(make_nats_server: NatsServerFactory, tmp_path: Path) -> None:
    nkeys = pytest.importorskip("nkeys")

    def user_seed(name: str) -> tuple[Path, str]:
        seed: bytes = nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER)
        path = tmp_path / f"{name}.nk"
        path.write_bytes(seed + b"\n")
        return path, nkeys.from_seed(bytearray(seed)).public_key.decode()

    allowed, public_key = user_seed("allowed")
    stranger, _ = user_seed("stranger")
    server = make_nats_server(nkey_users=(public_key,))
    client = await bus.connect(settings(server.url, nkey_seed_file=allowed))
    assert client.is_connected
    await client.close()
    with pytest.raises(NatsStartupError, match="TIANSHU_NATS_NKEY_SEED_FILE") as info:
        await bus.connect(settings(server.url, nkey_seed_file=stranger))
    assert stranger.read_text().strip() not in str(info.value)


async def test_tls_verifies_the_server_against_the_ca(
    make_nats_server: NatsServerFactory, tls_files: TlsFiles, tmp_path: Path
) -> None:
    server = make_nats_server(tls=tls_files)
    client = await bus.connect(settings(server.url, tls_ca_file=tls_files.ca))
    assert client.is_connected
    await client.close()
    other_ca, _ = make_ca(tmp_path / "other", "other")
    started = time.monotonic()
    with pytest.raises(NatsStartupError, match=r"(?i)certificate verify failed") as info:
        await bus.connect(settings(server.url, tls_ca_file=other_ca))
    assert time.monotonic() - started < 3
    assert str(other_ca) in str(info.value)
    with pytest.raises(NatsStartupError, match=r"(?i)certificate"):  # the system store does not know it
        await bus.connect(settings(server.url))


async def test_an_unreachable_server_fails_after_the_startup_timeout(
    make_nats_server: NatsServerFactory,
) -> None:
    server = make_nats_server()
    server.stop()
    started = time.monotonic()
    with pytest.raises(NatsStartupError, match="could not reach NATS"):
        await bus.connect(settings(server.url, startup_timeout_s=0.5))
    assert time.monotonic() - started < 3


async def test_the_client_reconnects_by_itself_after_a_server_restart(
    make_nats_server: NatsServerFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="tianshu_core.bus")
    server: NatsServer = make_nats_server()
    client = await bus.connect(settings(server.url))
    js = client.jetstream()
    lane = await make_lane(js)
    consumer = await start_consumer(client, lane)
    await bus.publish(js, lane.subject("before"), CancelCase(case_key="before"))
    await eventually(lambda: len(lane.seen) == 1)

    await asyncio.to_thread(server.stop)
    await eventually(lambda: not client.is_connected, within=5)
    await asyncio.sleep(0.3)  # the consumer's fetches fail while the server is away
    await asyncio.to_thread(server.start)
    await eventually(lambda: client.is_connected, within=10)

    for _ in range(50):  # JetStream may need a moment after the restart
        try:
            await bus.publish(js, lane.subject("after"), PauseCase(case_key="after"), msg_id="after-1")
            break
        except (nats.errors.TimeoutError, nats.js.errors.APIError, nats.js.errors.NoStreamResponseError):
            await asyncio.sleep(0.1)
    await eventually(lambda: len(lane.seen) == 2, within=10)
    assert isinstance(lane.seen[1][0], PauseCase)
    assert "reconnected to NATS" in caplog.text
    await consumer.shutdown(2)
    await client.close()


# Request and reply -----------------------------------------------------------------------------


async def test_responder_answers_and_refuses_with_reasons(nc: Client) -> None:
    subject = f"t{uuid.uuid4().hex[:10]}.rpc.get"

    async def get(request: GetCase, msg: Msg) -> CaseNotFound:
        if request.case_key == "refuse":
            raise RejectMessage("not yours")
        if request.case_key == "crash":
            raise RuntimeError("oops")
        return CaseNotFound(case_key=request.case_key)

    responder = Responder(nc, subject, GET_CASE_ADAPTER, get, queue="q", max_payload_bytes=1024)
    await responder.start()
    reply = await bus.request(nc, subject, GetCase(case_key="k1"), GET_CASE_REPLY_ADAPTER, timeout_s=2)
    assert reply == CaseNotFound(case_key="k1")
    refused = await bus.request(nc, subject, b"{nope", GET_CASE_REPLY_ADAPTER, timeout_s=2)
    assert isinstance(refused, RequestRefused) and refused.error.code == "undecodable"
    refused = await bus.request(nc, subject, b'{"kind": "get_case"}', GET_CASE_REPLY_ADAPTER, timeout_s=2)
    assert isinstance(refused, RequestRefused) and refused.error.code == "schema_invalid"
    refused = await bus.request(nc, subject, b"x" * 2000, GET_CASE_REPLY_ADAPTER, timeout_s=2)
    assert isinstance(refused, RequestRefused) and refused.error.code == "too_large"
    refused = await bus.request(nc, subject, GetCase(case_key="refuse"), GET_CASE_REPLY_ADAPTER, timeout_s=2)
    assert isinstance(refused, RequestRefused) and refused.error.message == "not yours"
    crashed = await bus.request(nc, subject, GetCase(case_key="crash"), GET_CASE_REPLY_ADAPTER, timeout_s=2)
    assert isinstance(crashed, RequestRefused) and crashed.error.retryable
    assert await responder.shutdown(1)
    await nc.flush()
    with pytest.raises(nats.errors.NoRespondersError):
        await bus.request(nc, subject, GetCase(case_key="k1"), GET_CASE_REPLY_ADAPTER, timeout_s=1)


# Shutdown --------------------------------------------------------------------------------------


async def test_graceful_shutdown_finishes_in_flight_work_then_drains(nats_url: str) -> None:
    client = await bus.connect(settings(nats_url))
    js = client.jetstream()
    lane = await make_lane(js)
    started = asyncio.Event()

    async def slow(cmd: Command, delivery: Delivery) -> None:
        started.set()
        await asyncio.sleep(0.3)
        lane.seen.append((cmd, delivery))

    consumer = await start_consumer(client, lane, slow)
    await bus.publish(js, lane.subject("k"), CancelCase(case_key="k"))
    await started.wait()
    shutdown = GracefulShutdown(client, [consumer], timeout_s=5)
    shutdown.install()
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        await asyncio.wait_for(shutdown.wait(), 2)
    finally:
        shutdown.uninstall()
    began = time.monotonic()
    assert await shutdown.run()
    assert time.monotonic() - began < 2
    assert len(lane.seen) == 1 and client.is_closed
    check = await bus.connect(settings(nats_url))
    info = await check.jetstream().consumer_info(lane.work.name, lane.consumer.durable)
    assert info.num_ack_pending == 0 and info.num_pending == 0
    await check.close()


async def test_shutdown_releases_work_that_overruns_the_time_limit(nc: Client, nats_url: str) -> None:
    js = nc.jetstream()
    lane = await make_lane(js)
    started = asyncio.Event()

    async def stuck(cmd: Command, delivery: Delivery) -> None:
        started.set()
        await asyncio.sleep(60)

    client = await bus.connect(settings(nats_url))
    consumer = await start_consumer(client, lane, stuck)
    await bus.publish(js, lane.subject("k"), CancelCase(case_key="k"))
    await started.wait()
    began = time.monotonic()
    assert not await GracefulShutdown(client, [consumer], timeout_s=0.3).run()
    assert time.monotonic() - began < 1.5
    # Released at once, not after the ack wait: another replica gets it right away.
    other = await bus.pull_subscription(js, lane.consumer)
    (msg,) = await other.fetch(1, timeout=1)
    assert msg.metadata.num_delivered == 2
    await msg.ack()


# NATS 2.9 --------------------------------------------------------------------------------------


async def test_the_bus_works_on_nats_2_9(
    make_nats_server: NatsServerFactory, legacy_nats_server: Path
) -> None:
    server = make_nats_server(binary=legacy_nats_server)
    assert server.version()[:2] == (2, 9)
    client = await bus.connect(settings(server.url))
    js = client.jetstream()
    specs = TianshuStreams().specs()
    await bus.ensure_streams(js, specs)
    await bus.ensure_streams(js, specs)
    await bus.ensure_consumers(js, bus.scheduler_consumers())
    await bus.ensure_consumers(js, bus.scheduler_consumers(ack_wait_s=20))  # an update
    lane = await make_lane(js)
    attempts: list[int] = []

    async def flaky(cmd: Command, delivery: Delivery) -> None:
        attempts.append(delivery.num_delivered)
        if delivery.num_delivered == 1:
            raise RuntimeError("a bug, once")
        lane.seen.append((cmd, delivery))

    consumer = await start_consumer(client, lane, flaky, max_deliver=3)
    ack = await bus.publish(js, lane.subject("k"), CancelCase(case_key="k"), msg_id="m")
    assert (await bus.publish(js, lane.subject("k"), CancelCase(case_key="k"), msg_id="m")).duplicate
    assert ack.seq == 1
    await bus.publish(js, lane.subject("bad"), b"{bad")
    await eventually(lambda: len(lane.seen) == 1)
    letters = await _wait_for_letters(js, lane, 1)
    await consumer.shutdown(2)
    assert letters[0][0].reason == DeadLetterReason.UNDECODABLE
    assert attempts[:2] == [1, 2]
    await client.close()


def test_public_exports_are_pinned() -> None:
    assert set(bus.__all__) == {
        *("Backoff", "Worker", "WorkerOptions", "ConsumerSpec", "DeadLetterSink", "Delivery"),
        *("GracefulShutdown", "Handler", "KeyFn", "NatsSettings", "NatsStartupError", "Outcome"),
        *("RejectMessage", "by_subject"),
        *("Responder", "Stoppable", "StreamConfigError", "StreamSpec", "TianshuStreams", "connect"),
        *("encode", "ensure_consumer", "ensure_consumers", "ensure_stream", "ensure_streams", "extract"),
        *("inject", "publish", "publish_core", "published_last", "pull_subscription", "redact", "request"),
        *("scheduler_consumers", "tls_context", "wire_error"),
    }


def test_secrets_never_print_and_urls_are_redacted(tmp_path: Path) -> None:
    conf = settings("nats://alice:hunter2@example.org:4222", password="p4ss", token=None)
    assert "p4ss" not in repr(conf) and "p4ss" not in str(conf.model_dump())
    assert conf.resolved_password() == "p4ss"
    assert bus.redact(conf.url) == "nats://example.org:4222"
    with pytest.raises(ValueError, match="not both"):
        settings("nats://x", token="a", token_file=tmp_path / "t")


# Helpers ---------------------------------------------------------------------------------------


async def _append(into: list[Msg], msg: Msg) -> None:
    into.append(msg)


async def _wait_for_letters(
    js: JetStreamContext, lane: Lane, count: int
) -> list[tuple[DeadLetter, dict[str, str]]]:
    deadline = time.monotonic() + 10
    while (await js.stream_info(lane.dlq.name)).state.messages < count:
        if time.monotonic() > deadline:
            raise AssertionError(f"fewer than {count} dead letters")
        await asyncio.sleep(0.02)
    return await lane.dead_letters(js)
