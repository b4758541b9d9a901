"""Serving requests on core NATS (a queue group shared by replicas): decode, validate, answer.

Used for `tianshu.v1.rpc.…`: a malformed or refused request gets a `RequestRefused` reply, so the
requester always learns why, and nothing a requester sends can stop the service.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from opentelemetry import trace
from opentelemetry.trace import Status, StatusCode, Tracer
from pydantic import BaseModel, TypeAdapter, ValidationError

from tianshu_contracts import DeadLetterReason, RequestRefused, WireError, subjects

from .errors import RejectMessage, wire_error
from .publish import encode
from .tracing import default_tracer, inject, start_consumer_span

log = logging.getLogger(__name__)

T = TypeVar("T")
RequestHandler = Callable[[T, Msg], Awaitable[BaseModel]]


class Responder(Generic[T]):
    """Answers requests on `subject` with `handler`'s reply model; `start()`, then `shutdown()`."""

    def __init__(
        self,
        nc: Client,
        subject: str,
        adapter: TypeAdapter[T],
        handler: RequestHandler[T],
        *,
        queue: str = subjects.QUEUE_SCHEDULER,
        max_payload_bytes: int = 1024 * 1024,
        max_concurrency: int = 64,
        tracer: Tracer | None = None,
    ) -> None:
        self._nc = nc
        self.subject = subject
        self._adapter = adapter
        self._handler = handler
        self._queue = queue
        self._max_payload = max_payload_bytes
        self._slots = asyncio.Semaphore(max_concurrency)
        self._tracer = tracer or default_tracer()
        self._sub: Subscription | None = None
        self._unsubscribing: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        """Subscribe (in the queue group, so each request reaches one replica)."""
        self._sub = await self._nc.subscribe(self.subject, queue=self._queue, cb=self._on_request)

    def stop(self) -> None:
        """Take no more requests (requests in flight still get their reply)."""
        if self._sub is not None:
            sub, self._sub = self._sub, None
            self._unsubscribing = asyncio.create_task(sub.unsubscribe())

    async def shutdown(self, timeout_s: float) -> bool:
        """Stop, and wait up to `timeout_s` for the replies in flight; True when all went out."""
        self.stop()
        if self._unsubscribing is not None:
            with contextlib.suppress(Exception):
                await self._unsubscribing
        if not self._tasks:
            return True
        _, late = await asyncio.wait(set(self._tasks), timeout=timeout_s)
        for task in late:
            task.cancel()
        return not late

    async def _on_request(self, msg: Msg) -> None:
        await self._slots.acquire()
        task = asyncio.create_task(self._answer(msg))
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._slots.release()

    async def _answer(self, msg: Msg) -> None:
        span = start_consumer_span(
            self._tracer, msg.subject, msg.headers, {"messaging.message.body.size": len(msg.data)}
        )
        with trace.use_span(span, end_on_exit=True):
            reply = await self._reply_for(msg)
            if isinstance(reply, RequestRefused):
                span.set_status(Status(StatusCode.ERROR, reply.error.code or reply.error.type))
            if not msg.reply:
                log.warning("request on %s has no reply subject; dropped", msg.subject)
                return
            with contextlib.suppress(Exception):
                await self._nc.publish(msg.reply, encode(reply), headers=inject())

    async def _reply_for(self, msg: Msg) -> BaseModel:
        if len(msg.data) > self._max_payload:
            return _refused(
                "PayloadTooLarge",
                f"{len(msg.data)} bytes, over the limit of {self._max_payload} bytes",
                DeadLetterReason.TOO_LARGE,
            )
        try:
            request = self._adapter.validate_json(msg.data)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(map(str, e['loc'])) or '(message)'}: {e['msg']}"
                for e in exc.errors(include_url=False, include_input=False)[:10]
            )
            invalid_json = any(e["type"] == "json_invalid" for e in exc.errors(include_url=False))
            reason = DeadLetterReason.UNDECODABLE if invalid_json else DeadLetterReason.SCHEMA_INVALID
            return _refused("ValidationError", problems[:2000], reason)
        try:
            return await self._handler(request, msg)
        except RejectMessage as exc:
            return RequestRefused(error=exc.error)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("request on %s failed", msg.subject)
            error = wire_error(exc)
            return RequestRefused(
                error=error.model_copy(update={"retryable": True}) if not error.code else error
            )


def _refused(type_: str, message: str, reason: DeadLetterReason) -> RequestRefused:
    return RequestRefused(error=WireError(type=type_, message=message, code=reason.value))
