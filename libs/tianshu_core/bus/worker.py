"""The work-queue worker every service consumes JetStream with.

It pulls only what its free slots can take, hands each message to the service's handler (those
with the same key one after another, in stream order), tells the server "in progress" while a
message is held, and settles each message by what became of its handler:

- the handler returned: its effect is durable, so the message is acked;
- it raised `RejectMessage`, or the message was refused before it reached the handler (too large,
  not strict JSON, not valid for the subject, a value the stores cannot keep): the message is
  dead-lettered on this very delivery with the reason, announced on the errors subject, and
  terminated;
- it raised a transient failure (`tianshu_core.transient.is_transient`: Postgres or NATS out of
  reach): the worker keeps the message and runs the handler again after a backoff, for as long as
  the outage lasts; the message's delivery budget is not spent;
- it raised anything else (a bug): the message is given back with a delay and comes again; once
  `max_deliver` deliveries have failed so, it is dead-lettered with the exception's type and text.

A message delivered more than `max_deliver` times (its earlier handlers died with their process,
or their service stopped during an outage) is dead-lettered on arrival, unless the service gave
an `exhausted` handler (the tool runner answers such a call with an error the model sees).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import random
from collections import deque
from collections.abc import Awaitable, Callable
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

from ..transient import is_transient
from .deadletter import DeadLetterSink
from .delivery import Delivery
from .errors import RejectMessage, wire_error
from .strict import holds_nul, non_strict_constant, out_of_range_number
from .tracing import default_tracer, start_consumer_span

log = logging.getLogger(__name__)

T = TypeVar("T")
Handler = Callable[[T, Delivery], Awaitable[None]]
KeyFn = Callable[[Delivery], str]

# After a fetch that found messages, the worker asks for what else is queued with this short
# timeout: nats-py's fetch of several waits its whole timeout for the batch to fill once the
# queue is empty, so the long wait for new work is always a fetch of one.
_DRAIN_TIMEOUT_S = 0.005
# A transient failure is logged at warning level on these attempts, then at debug level.
_LOUD_ATTEMPTS = frozenset({1, 2, 5, 10, 20, 50, 100})


@dataclass(frozen=True, slots=True)
class Backoff:
    """Exponential backoff with jitter: `initial_s * multiplier**(n-1)`, capped, ±`jitter`."""

    initial_s: float = 0.5
    multiplier: float = 2.0
    max_s: float = 30.0
    jitter: float = 0.2

    def delay(self, attempt: int) -> float:
        """Seconds to wait after failed attempt (or delivery) number `attempt`."""
        base = min(self.max_s, self.initial_s * self.multiplier ** max(0, attempt - 1))
        return max(0.0, base * (1 + random.uniform(-self.jitter, self.jitter)))

    def total(self, attempts: int) -> float:
        """The sum of the (unjittered) waits between `attempts` attempts."""
        return sum(min(self.max_s, self.initial_s * self.multiplier**n) for n in range(attempts - 1))


@dataclass(frozen=True, slots=True)
class WorkerOptions:
    """How a `Worker` pulls and judges messages."""

    concurrency: int = 64
    """Messages held at once (handled or queued behind their key); nothing more is pulled."""
    batch: int = 64
    """At most this many messages per fetch (never more than the free slots)."""
    fetch_timeout_s: float = 1.0
    """How long one fetch waits for work; also bounds how long `stop()` takes to be noticed."""
    max_payload_bytes: int = 1024 * 1024
    """Larger messages are dead-lettered unread (`too_large`)."""
    max_deliver: int = 5
    """The delivery budget: deliveries a message whose handler fails (not transiently) gets."""
    backoff: Backoff = field(default_factory=Backoff)
    """Waits before a failed handler's message comes again, and between transient retries."""
    heartbeat_s: float | None = 10.0
    """Send "in progress" this often for every held message; keep it under the ack wait."""
    confirm_acks: bool = False
    """Wait for the server to confirm an ack before freeing the slot (exact slot accounting)."""
    refuse_nul: bool = False
    """Refuse (`unstorable`) a body with a NUL character in a string: for messages that are stored."""
    fetch_error_pause_s: float = 0.5
    """Pause after a failed fetch (server away, reconnecting)."""

    def __post_init__(self) -> None:
        if self.concurrency < 1 or self.batch < 1 or self.max_deliver < 1:
            raise ValueError("concurrency, batch and max_deliver must be at least 1")


class Outcome(enum.StrEnum):
    """What became of one message."""

    ACKED = "acked"
    NAKED = "naked"
    DEAD_LETTERED = "dead_lettered"
    RELEASED = "released"


def by_subject(delivery: Delivery) -> str:
    """The default ordering key: one subject's messages (a resource's events, a case's commands)."""
    return delivery.subject


def _refusal(reason: DeadLetterReason, type_: str, message: str) -> WireError:
    return WireError(type=type_, message=message[:2000], code=reason.value)


def _validation_error(exc: ValidationError, reason: DeadLetterReason) -> WireError:
    problems = [
        f"{'.'.join(str(p) for p in err['loc']) or '(message)'}: {err['msg']}"
        for err in exc.errors(include_url=False, include_input=False)[:10]
    ]
    more = f" (and {exc.error_count() - 10} more)" if exc.error_count() > 10 else ""
    what = (
        "not valid JSON" if reason is DeadLetterReason.UNDECODABLE else "not a valid message for its subject"
    )
    return _refusal(reason, "ValidationError", f"{what}: {'; '.join(problems)}{more}")


class _Refused(Exception):  # noqa: N818 (internal signal)
    def __init__(self, reason: DeadLetterReason, error: WireError) -> None:
        super().__init__(error.message)
        self.reason = reason
        self.error = error

    @classmethod
    def of(cls, reason: DeadLetterReason, type_: str, message: str) -> _Refused:
        return cls(reason, _refusal(reason, type_, message))


class Worker(Generic[T]):
    """Consumes one durable pull subscription: `start()`, then `shutdown()` (or `stop()`, await `run()`).

    `adapter` decodes a body; `handler(value, delivery)` does the work and returns once its
    effect is durable. `key` orders messages (None: no order, all run concurrently).
    """

    def __init__(
        self,
        nc: Client,
        subscription: JetStreamContext.PullSubscription,
        adapter: TypeAdapter[T],
        handler: Handler[T],
        *,
        options: WorkerOptions | None = None,
        dead_letters: DeadLetterSink | None = None,
        key: KeyFn | None = by_subject,
        exhausted: Handler[T] | None = None,
        name: str | None = None,
        tracer: Tracer | None = None,
    ) -> None:
        self._nc = nc
        self._sub = subscription
        self._adapter = adapter
        self._handler = handler
        self._exhausted = exhausted
        self.options = options or WorkerOptions()
        self._tracer = tracer or default_tracer()
        self._dead_letters = dead_letters or DeadLetterSink(nc, tracer=self._tracer)
        self._key = key
        self.name = name or "worker"
        self._stopping = asyncio.Event()
        self._freed = asyncio.Event()
        self._held: dict[int, Msg] = {}  # delivered and not settled: what the heartbeat covers
        self._lanes: dict[str, deque[Delivery]] = {}  # per key: what waits behind its running message
        self._tasks: set[asyncio.Task[None]] = set()
        self._task: asyncio.Task[None] | None = None
        self._pulled = asyncio.Event()  # the pull loop has ended
        self.handled = 0

    # Life cycle ----------------------------------------------------------------------------

    def start(self) -> asyncio.Task[None]:
        """Run the worker in a task (returned; also kept for `shutdown`)."""
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self.run(), name=f"tianshu-worker-{self.name}")
        return self._task

    def stop(self) -> None:
        """Pull no more; what is held is finished (a transient retry gives its message back)."""
        self._stopping.set()
        self._freed.set()

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    @property
    def held(self) -> int:
        """Messages delivered to this worker and not settled yet."""
        return len(self._held)

    async def shutdown(self, timeout_s: float) -> bool:
        """Stop, give held messages `timeout_s` to finish, then cancel their handlers (their
        messages are given back for redelivery). True when everything finished in time.

        Messages are given back only once the last pull has ended (within the fetch timeout of
        `stop()`): one given back while that pull is still open on the server could be handed
        straight back to it, and would then wait out the ack wait.
        """
        self.stop()
        task = self._task
        if task is None or task.done():
            return True
        done, _ = await asyncio.wait({task}, timeout=timeout_s)
        if done:
            return True
        log.warning(
            "worker %s: giving back %d messages still held after %.1f s",
            self.name,
            len(self._held),
            timeout_s,
        )
        # The handlers stop now; each gives its message back once the last pull has ended.
        for handler in list(self._tasks):
            handler.cancel()
        done, _ = await asyncio.wait({task}, timeout=self.options.fetch_timeout_s + 3.0)
        if not done:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        return False

    async def _unsubscribe(self) -> None:
        """Drop the pull subscription once pulling is over: nats-py's `fetch` takes leftover status
        messages without `task_done()`, so a pull subscription never lets `Client.drain()` finish
        (every SIGTERM would wait out the whole drain timeout). Acks do not need it; the durable
        consumer on the server stays."""
        with contextlib.suppress(Exception):  # closed or reconnecting: nothing to drain
            await self._sub.unsubscribe()

    async def _pull_over(self) -> None:
        """Wait (boundedly) until no pull of this worker is open on the server."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._pulled.wait(), self.options.fetch_timeout_s + 1.0)

    async def run(self) -> None:
        """Pull and dispatch until `stop()` (or the connection closes for good); then wait for
        the held messages to be settled."""
        beat = (
            asyncio.create_task(self._heartbeats(self.options.heartbeat_s))
            if self.options.heartbeat_s
            else None
        )
        try:
            try:
                await self._pull()
            finally:
                self._pulled.set()
                await self._unsubscribe()
            while self._tasks:
                await asyncio.wait(set(self._tasks))
        except asyncio.CancelledError:
            for t in self._tasks:
                t.cancel()
            if self._tasks:
                await asyncio.wait(set(self._tasks), timeout=2.0)
            raise
        finally:
            if beat is not None:
                beat.cancel()

    # Pulling -------------------------------------------------------------------------------

    async def _pull(self) -> None:
        opts = self.options
        while not self._stopping.is_set():
            if self._nc.is_closed:
                log.info("worker %s: connection closed; stopping", self.name)
                return
            free = opts.concurrency - len(self._held)
            if free <= 0:
                self._freed.clear()
                if opts.concurrency - len(self._held) <= 0 and not self._stopping.is_set():
                    await self._freed.wait()
                continue
            try:
                msgs = await self._sub.fetch(1, timeout=opts.fetch_timeout_s)
            except (nats.errors.TimeoutError, TimeoutError):
                continue  # nothing to do (or the pull was lost to a reconnect)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("worker %s: fetch failed: %r", self.name, exc)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), opts.fetch_error_pause_s)
                continue
            self._take(msgs)
            # Drain only what the server says is queued behind it: an idle queue costs no extra pull.
            more = min(opts.batch, opts.concurrency) - len(msgs)
            more = min(more, _queued_behind(msgs))
            free = opts.concurrency - len(self._held)
            while more > 0 and free > 0 and not self._stopping.is_set():
                want = min(more, free)
                try:
                    msgs = await self._sub.fetch(want, timeout=_DRAIN_TIMEOUT_S)
                except asyncio.CancelledError:
                    raise
                except Exception:  # nothing more queued (a timeout), or the server is away
                    break
                self._take(msgs)
                if len(msgs) < want:
                    break
                more -= len(msgs)
                free = opts.concurrency - len(self._held)
            # Let the handlers just dispatched start (up to their first wait on I/O) before the next
            # pull is built and sent: it waits for later work, and the message in hand comes first.
            # (A drain's pull above goes out first: the handlers run while it is answered.)
            await asyncio.sleep(0)

    def _take(self, msgs: list[Msg]) -> None:
        for msg in msgs:
            if self._stopping.is_set():
                task = asyncio.create_task(self._give_back(msg))
            else:
                self._dispatch(Delivery.of(msg))
                continue
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _dispatch(self, delivery: Delivery) -> None:
        self._held[id(delivery.raw)] = delivery.raw
        key = self._key(delivery) if self._key is not None else None
        if key is not None:
            lane = self._lanes.get(key)
            if lane is not None:
                lane.append(delivery)
                return
            self._lanes[key] = deque()
        task = asyncio.create_task(self._lane(key, delivery), name=f"tianshu-{self.name}-msg")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _lane(self, key: str | None, first: Delivery) -> None:
        """Handle `first`, then whatever arrived behind it with the same key, in order."""
        delivery: Delivery | None = first
        try:
            while delivery is not None:
                try:
                    await self.handle(delivery)
                except asyncio.CancelledError:
                    raise
                except Exception:  # a bug of ours must not stop the service; the message comes again
                    log.exception("worker %s: handling %s failed unexpectedly", self.name, delivery.subject)
                    await _release(delivery.raw)
                finally:
                    self._settled(delivery)
                lane = self._lanes.get(key) if key is not None else None
                delivery = lane.popleft() if lane else None
        except asyncio.CancelledError:
            lane = self._lanes.get(key) if key is not None else None
            while lane:
                rest = lane.popleft()
                await self._give_back(rest.raw)
                self._settled(rest)
            raise
        finally:
            if key is not None:
                self._lanes.pop(key, None)

    def _settled(self, delivery: Delivery) -> None:
        self._held.pop(id(delivery.raw), None)
        self._freed.set()

    async def _heartbeats(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            for msg in list(self._held.values()):
                with contextlib.suppress(Exception):  # settled meanwhile, or reconnecting
                    await msg.in_progress()

    # Handling ------------------------------------------------------------------------------

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
            self.handled += 1
            return outcome

    def judge(self, delivery: Delivery) -> T:
        """The message's value, or `_Refused` with the reason it cannot be handled at all."""
        opts = self.options
        data = delivery.raw.data
        if delivery.size > opts.max_payload_bytes:
            raise _Refused.of(
                DeadLetterReason.TOO_LARGE,
                "PayloadTooLarge",
                f"{delivery.size} bytes, over the limit of {opts.max_payload_bytes} bytes",
            )
        constant = non_strict_constant(data)
        if constant is not None:
            raise _Refused.of(
                DeadLetterReason.NOT_STRICT_JSON,
                "NotStrictJson",
                f"not strict JSON: {constant} is not a JSON value (RFC 8259); send a number, string or null",
            )
        try:
            value = self._adapter.validate_json(data)
        except ValidationError as exc:
            invalid_json = any(e["type"] == "json_invalid" for e in exc.errors(include_url=False))
            reason = DeadLetterReason.UNDECODABLE if invalid_json else DeadLetterReason.SCHEMA_INVALID
            raise _Refused(reason, _validation_error(exc, reason)) from exc
        huge = out_of_range_number(data)
        if huge is not None:
            raise _Refused.of(
                DeadLetterReason.UNSTORABLE,
                "UnstorableValue",
                f"the number {huge} is beyond the range of a 64-bit float; send it as a string",
            )
        if opts.refuse_nul and holds_nul(data):
            raise _Refused.of(
                DeadLetterReason.UNSTORABLE,
                "UnstorableValue",
                "a string holds a NUL character (\\u0000), which Postgres cannot store",
            )
        return value

    async def _handle(self, delivery: Delivery, span: Span) -> Outcome:
        opts = self.options
        try:
            value = self.judge(delivery)
        except _Refused as refused:
            return await self._dead_letter(delivery, refused.reason, refused.error, span)
        handler = self._handler
        if delivery.num_delivered > opts.max_deliver:
            if self._exhausted is None:
                exceeded = _Refused.of(
                    DeadLetterReason.MAX_DELIVERIES,
                    "MaxDeliveriesExceeded",
                    f"delivered {delivery.num_delivered} times (limit {opts.max_deliver}); "
                    "an earlier attempt never finished",
                )
                return await self._dead_letter(delivery, exceeded.reason, exceeded.error, span)
            handler = self._exhausted
        attempt = 0
        while True:
            try:
                await handler(value, delivery)
            except RejectMessage as exc:
                return await self._dead_letter(delivery, exc.reason, exc.error, span, case_key=exc.case_key)
            except asyncio.CancelledError:
                await self._give_back(delivery.raw)
                raise
            except Exception as exc:
                if not is_transient(exc):
                    return await self._failed(delivery, exc, span)
                attempt += 1
                if not await self._pause_after_transient(delivery, exc, attempt, span):
                    await self._give_back(delivery.raw)
                    return Outcome.RELEASED
                continue
            return await self._ack(delivery)

    async def _pause_after_transient(
        self, delivery: Delivery, exc: BaseException, attempt: int, span: Span
    ) -> bool:
        """Wait before the next attempt; False when the worker stops meanwhile (give it back)."""
        if self._stopping.is_set():
            return False
        delay = self.options.backoff.delay(attempt)
        level = logging.WARNING if attempt in _LOUD_ATTEMPTS else logging.DEBUG
        log.log(
            level,
            "worker %s: %s seq %s failed transiently (attempt %d), trying again in %.2f s: %r",
            self.name,
            delivery.subject,
            delivery.stream_seq,
            attempt,
            delay,
            exc,
        )
        span.add_event(
            "transient failure",
            {
                "exception.type": type(exc).__name__,
                "tianshu.bus.attempt": attempt,
                "tianshu.bus.delay_s": delay,
            },
        )
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), delay)
        return not self._stopping.is_set()

    async def _failed(self, delivery: Delivery, exc: Exception, span: Span) -> Outcome:
        """A handler bug: spend a delivery; dead-letter once the budget is spent."""
        opts = self.options
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
            "worker %s: handler failed on %s seq %s (delivery %d of %d), again in %.2f s: %r",
            self.name,
            delivery.subject,
            delivery.stream_seq,
            delivery.num_delivered,
            opts.max_deliver,
            delay,
            exc,
        )
        await _settle(self.name, delivery.raw.nak(delay=delay), "nak")
        return Outcome.NAKED

    async def _ack(self, delivery: Delivery) -> Outcome:
        if self.options.confirm_acks:
            await _settle(
                self.name, delivery.raw.ack_sync(timeout=max(1.0, self.options.fetch_timeout_s)), "ack"
            )
        else:
            await _settle(self.name, delivery.raw.ack(), "ack")
        return Outcome.ACKED

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
        attempt = 0
        while True:
            try:
                await self._dead_letters.send(delivery, reason, error, case_key=case_key)
                break
            except asyncio.CancelledError:
                await self._give_back(delivery.raw)
                raise
            except Exception as exc:
                # Never drop what could not be stored: keep it and try again (NATS away).
                attempt += 1
                if not await self._pause_after_transient(delivery, exc, attempt, span):
                    await self._give_back(delivery.raw)
                    return Outcome.RELEASED
        await _settle(self.name, delivery.raw.term(), "terminate")
        return Outcome.DEAD_LETTERED

    async def _give_back(self, msg: Msg) -> None:
        """Give a message back once this worker's last pull is over."""
        await self._pull_over()
        await _release(msg)


def _queued_behind(msgs: list[Msg]) -> int:
    """How many messages the server had queued for this consumer after the last of `msgs`."""
    if not msgs:
        return 0
    try:
        return int(msgs[-1].metadata.num_pending)
    except Exception:  # not a JetStream message: assume more may be there
        return 1 << 30


async def _settle(name: str, settle: Awaitable[object], verb: str) -> None:
    try:
        await settle
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # the ack wait runs out and the message comes again: handlers are idempotent
        log.warning("worker %s: could not %s a message: %r", name, verb, exc)


async def _release(msg: Msg) -> None:
    """Give a message back at once (nak without delay) so another replica can take it."""
    with contextlib.suppress(Exception):
        await msg.nak()
