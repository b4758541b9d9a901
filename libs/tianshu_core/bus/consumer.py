"""The batch consumer: fetch, decode, validate, handle, then ack; nak with backoff; dead-letter poison.

A handler commits its effect (to Postgres) before it returns; only then is the message acked, so a
crash in between means a redelivery, never a lost state change. Handlers must be idempotent.

- a handler that raises `RejectMessage` refuses the message for good: dead letter, refusal, term;
- any other exception is transient: nak with an exponential backoff, until the message has been
  delivered `max_deliver` times; then it is dead-lettered (reason `max_deliveries`);
- a message that is over the size limit, not JSON, or not valid for the subject's `TypeAdapter` is
  poison: dead-lettered at once and terminated, never handed to the handler;
- a message delivered more than `max_deliver` times (its last handler died with its process, or
  overran the ack wait) is dead-lettered on arrival.

Messages of one fetched batch run concurrently, except that those with the same key (by default
their subject, so one resource's events or one case's commands) run one after another in stream
order. A redelivery can still overtake a later message; handlers that need a strict order use
`Delivery.stream_seq`.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import random
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from opentelemetry import trace
from opentelemetry.trace import Span, Status, StatusCode, Tracer
from opentelemetry.util.types import AttributeValue
from pydantic import TypeAdapter, ValidationError

from tianshu_contracts import DeadLetterReason, WireError

from .deadletter import DeadLetterSink
from .delivery import Delivery
from .errors import RejectMessage, wire_error
from .tracing import default_tracer, start_consumer_span

log = logging.getLogger(__name__)

T = TypeVar("T")
Handler = Callable[[T, Delivery], Awaitable[None]]
KeyFn = Callable[[Delivery], str]


@dataclass(frozen=True, slots=True)
class Backoff:
    """Exponential backoff with jitter: `initial_s * multiplier**(n-1)`, capped, ±`jitter`."""

    initial_s: float = 0.5
    multiplier: float = 2.0
    max_s: float = 30.0
    jitter: float = 0.2

    def delay(self, delivery: int) -> float:
        """Seconds to wait before the redelivery that follows failed delivery number `delivery`."""
        base = min(self.max_s, self.initial_s * self.multiplier ** max(0, delivery - 1))
        return max(0.0, base * (1 + random.uniform(-self.jitter, self.jitter)))


@dataclass(frozen=True, slots=True)
class ConsumeOptions:
    """How a `BatchConsumer` fetches and judges messages."""

    batch: int = 64
    """At most this many messages per fetch."""
    fetch_timeout_s: float = 1.0
    """How long one fetch waits for messages; also bounds how long `stop()` takes to be noticed."""
    max_payload_bytes: int = 1024 * 1024
    """Larger messages are dead-lettered unread (`too_large`)."""
    max_deliver: int = 5
    """Deliveries a message gets before it is dead-lettered (`max_deliveries`)."""
    backoff: Backoff = field(default_factory=Backoff)
    progress_interval_s: float | None = 10.0
    """Send "in progress" this often while handlers run; keep it under the consumer's ack wait."""
    fetch_error_pause_s: float = 0.5
    """Pause after a failed fetch (server away, reconnecting)."""


class Outcome(enum.StrEnum):
    """What became of one message."""

    ACKED = "acked"
    NAKED = "naked"
    DEAD_LETTERED = "dead_lettered"
    RELEASED = "released"


def _by_subject(delivery: Delivery) -> str:
    return delivery.subject


def _validation_error(exc: ValidationError, reason: DeadLetterReason) -> WireError:
    problems = [
        f"{'.'.join(str(p) for p in err['loc']) or '(message)'}: {err['msg']}"
        for err in exc.errors(include_url=False, include_input=False)[:10]
    ]
    more = f" (and {exc.error_count() - 10} more)" if exc.error_count() > 10 else ""
    what = (
        "not valid JSON" if reason is DeadLetterReason.UNDECODABLE else "not a valid message for its subject"
    )
    return WireError(
        type="ValidationError", message=f"{what}: {'; '.join(problems)}{more}"[:2000], code=reason.value
    )


class BatchConsumer(Generic[T]):
    """Runs one durable pull subscription: `start()`, then `shutdown()` (or `stop()` and await `run()`)."""

    def __init__(
        self,
        nc: Client,
        subscription: JetStreamContext.PullSubscription,
        adapter: TypeAdapter[T],
        handler: Handler[T],
        *,
        options: ConsumeOptions | None = None,
        dead_letters: DeadLetterSink | None = None,
        key: KeyFn = _by_subject,
        name: str | None = None,
        tracer: Tracer | None = None,
    ) -> None:
        self._nc = nc
        self._sub = subscription
        self._adapter = adapter
        self._handler = handler
        self.options = options or ConsumeOptions()
        self._tracer = tracer or default_tracer()
        self._dead_letters = dead_letters or DeadLetterSink(nc, tracer=self._tracer)
        self._key = key
        self.name = name or "consumer"
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    # Life cycle ----------------------------------------------------------------------------

    def start(self) -> asyncio.Task[None]:
        """Run the fetch loop in a task (returned; also kept for `shutdown`)."""
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self.run(), name=f"tianshu-consumer-{self.name}")
        return self._task

    def stop(self) -> None:
        """Fetch no more; the batch in hand is finished, then `run()` returns."""
        self._stopping.set()

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    async def shutdown(self, timeout_s: float) -> bool:
        """Stop, give in-flight handlers `timeout_s` to finish, then cancel them (their messages are
        released for redelivery). True when everything finished in time."""
        self.stop()
        task = self._task
        if task is None or task.done():
            return True
        done, _ = await asyncio.wait({task}, timeout=timeout_s)
        if done:
            return True
        log.warning("consumer %s: handlers still running after %.1f s; cancelling them", self.name, timeout_s)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        return False

    async def run(self) -> None:
        """Fetch and handle batches until `stop()` (or the connection closes for good)."""
        opts = self.options
        while not self._stopping.is_set():
            if self._nc.is_closed:
                log.info("consumer %s: connection closed; stopping", self.name)
                return
            try:
                msgs = await self._sub.fetch(opts.batch, timeout=opts.fetch_timeout_s)
            except (nats.errors.TimeoutError, TimeoutError):
                continue  # nothing to do (or the fetch was lost to a reconnect)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("consumer %s: fetch failed: %r", self.name, exc)
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), opts.fetch_error_pause_s)
                continue
            if self._stopping.is_set():
                await asyncio.gather(*(self._release(m) for m in msgs))
                return
            try:
                await self.process(msgs)
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug of ours must not stop the service; the ack wait brings them back
                log.exception("consumer %s: a batch of %d failed unexpectedly", self.name, len(msgs))

    # Handling ------------------------------------------------------------------------------

    async def process(self, msgs: Sequence[Msg]) -> list[Outcome]:
        """Handle one batch (see the module's docstring); the outcomes in the batch's order."""
        deliveries = [Delivery.of(m) for m in msgs]
        groups: dict[str, list[int]] = {}
        for i, delivery in enumerate(deliveries):
            groups.setdefault(self._key(delivery), []).append(i)
        outcomes: list[Outcome] = [Outcome.RELEASED] * len(deliveries)
        pending = {id(m): m for m in msgs}

        async def run_group(indexes: list[int]) -> None:
            for n, i in enumerate(indexes):
                try:
                    outcomes[i] = await self.handle(deliveries[i])
                except asyncio.CancelledError:
                    await asyncio.gather(*(self._release(deliveries[j].raw) for j in indexes[n + 1 :]))
                    raise
                finally:
                    pending.pop(id(deliveries[i].raw), None)

        keepalive = (
            asyncio.create_task(self._keep_alive(pending, self.options.progress_interval_s))
            if self.options.progress_interval_s
            else None
        )
        try:
            if len(groups) == 1:
                await run_group(next(iter(groups.values())))
            else:
                await asyncio.gather(*(run_group(indexes) for indexes in groups.values()))
        finally:
            if keepalive is not None:
                keepalive.cancel()
        return outcomes

    async def handle(self, delivery: Delivery) -> Outcome:
        """Judge, handle and settle one message inside a CONSUMER span joined to the sender's trace."""
        attributes: dict[str, AttributeValue] = {
            "messaging.message.body.size": delivery.size,
            "messaging.nats.delivery_count": delivery.num_delivered,
        }
        if delivery.msg_id is not None:
            attributes["messaging.message.id"] = delivery.msg_id
        if delivery.consumer is not None:
            attributes["messaging.consumer.group.name"] = delivery.consumer
        if delivery.stream is not None and delivery.stream_seq is not None:
            attributes["messaging.nats.stream"] = delivery.stream
            attributes["messaging.nats.stream_seq"] = delivery.stream_seq
        span = start_consumer_span(self._tracer, delivery.subject, delivery.headers, attributes)
        with trace.use_span(span, end_on_exit=True, record_exception=False, set_status_on_exception=False):
            outcome = await self._handle(delivery, span)
            span.set_attribute("tianshu.bus.outcome", outcome.value)
            return outcome

    async def _handle(self, delivery: Delivery, span: Span) -> Outcome:
        opts = self.options
        if delivery.num_delivered > opts.max_deliver:
            return await self._dead_letter(
                delivery,
                DeadLetterReason.MAX_DELIVERIES,
                WireError(
                    type="MaxDeliveriesExceeded",
                    message=f"delivered {delivery.num_delivered} times (limit {opts.max_deliver}); "
                    "an earlier attempt never finished",
                    code=DeadLetterReason.MAX_DELIVERIES.value,
                ),
                span,
            )
        if delivery.size > opts.max_payload_bytes:
            return await self._dead_letter(
                delivery,
                DeadLetterReason.TOO_LARGE,
                WireError(
                    type="PayloadTooLarge",
                    message=f"{delivery.size} bytes, over the limit of {opts.max_payload_bytes} bytes",
                    code=DeadLetterReason.TOO_LARGE.value,
                ),
                span,
            )
        try:
            value = self._adapter.validate_json(delivery.raw.data)
        except ValidationError as exc:
            invalid_json = any(e["type"] == "json_invalid" for e in exc.errors(include_url=False))
            reason = DeadLetterReason.UNDECODABLE if invalid_json else DeadLetterReason.SCHEMA_INVALID
            return await self._dead_letter(delivery, reason, _validation_error(exc, reason), span)

        try:
            await self._handler(value, delivery)
        except RejectMessage as exc:
            return await self._dead_letter(delivery, exc.reason, exc.error, span, case_key=exc.case_key)
        except asyncio.CancelledError:
            await self._release(delivery.raw)
            raise
        except Exception as exc:
            span.record_exception(exc)
            span.set_status(Status(StatusCode.ERROR, type(exc).__name__))
            if delivery.num_delivered >= opts.max_deliver:
                error = wire_error(exc)
                error = error.model_copy(
                    update={
                        "message": f"failed on all {delivery.num_delivered} deliveries; last: {error.message}"
                    }
                )
                return await self._dead_letter(delivery, DeadLetterReason.MAX_DELIVERIES, error, span)
            delay = opts.backoff.delay(delivery.num_delivered)
            log.warning(
                "consumer %s: handler failed on %s seq %s (delivery %d of %d), retrying in %.2f s: %r",
                self.name,
                delivery.subject,
                delivery.stream_seq,
                delivery.num_delivered,
                opts.max_deliver,
                delay,
                exc,
            )
            return await self._settle(delivery.raw.nak(delay=delay), Outcome.NAKED, "nak")
        return await self._settle(delivery.raw.ack(), Outcome.ACKED, "ack")

    async def _dead_letter(
        self,
        delivery: Delivery,
        reason: DeadLetterReason,
        error: WireError,
        span: Span,
        *,
        case_key: str | None = None,
    ) -> Outcome:
        span.set_attribute("tianshu.bus.dead_letter_reason", reason.value)
        span.set_status(Status(StatusCode.ERROR, f"dead-lettered: {reason.value}"))
        try:
            await self._dead_letters.send(delivery, reason, error, case_key=case_key)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            # Never drop what could not be stored: try again later.
            delay = self.options.backoff.delay(delivery.num_delivered)
            log.error(
                "consumer %s: could not dead-letter %s seq %s (%s), retrying in %.2f s: %r",
                self.name,
                delivery.subject,
                delivery.stream_seq,
                reason.value,
                delay,
                exc,
            )
            return await self._settle(delivery.raw.nak(delay=delay), Outcome.NAKED, "nak")
        return await self._settle(delivery.raw.term(), Outcome.DEAD_LETTERED, "terminate")

    async def _settle(self, settle: Awaitable[None], outcome: Outcome, verb: str) -> Outcome:
        try:
            await settle
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the ack wait runs out and the message comes again: handlers are idempotent
            log.warning("consumer %s: could not %s a message: %r", self.name, verb, exc)
        return outcome

    async def _release(self, msg: Msg) -> None:
        """Give a message back at once (nak without delay) so another replica can take it."""
        with contextlib.suppress(Exception):
            await msg.nak()

    async def _keep_alive(self, pending: dict[int, Msg], interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            for msg in list(pending.values()):
                with contextlib.suppress(Exception):
                    await msg.in_progress()
