"""NATS JetStream helpers for Tianshu's services; the engine's heart never imports this package.

- `connect`: fail fast at start-up (credentials, TLS), reconnect without limit afterwards;
- `ensure_streams` / `ensure_consumer`: idempotent start-up set-up, NATS 2.9 compatible;
- `publish`: `Nats-Msg-Id` and W3C trace headers; `publish_core` and `request` for core NATS;
- `Worker`: the one work-queue worker: pull what free slots take, heartbeat, ack after the
  handler commits, hold and retry through an outage, dead-letter bad input on its first delivery;
- `Responder`: request/reply in a queue group; `GracefulShutdown`: SIGTERM in bounded time.
"""

from .connect import connect, redact, tls_context
from .deadletter import DeadLetterSink
from .delivery import Delivery
from .errors import NatsStartupError, RejectMessage, StreamConfigError, wire_error
from .publish import encode, publish, publish_core, published_last, request
from .responder import Responder
from .settings import NatsSettings
from .shutdown import GracefulShutdown, Stoppable
from .streams import (
    ConsumerSpec,
    StreamSpec,
    TianshuStreams,
    ensure_consumer,
    ensure_consumers,
    ensure_stream,
    ensure_streams,
    pull_subscription,
    scheduler_consumers,
)
from .tracing import extract, inject
from .worker import Backoff, Handler, KeyFn, Outcome, Worker, WorkerOptions, by_subject

__all__ = [
    "Backoff",
    "ConsumerSpec",
    "DeadLetterSink",
    "Delivery",
    "GracefulShutdown",
    "Handler",
    "KeyFn",
    "NatsSettings",
    "NatsStartupError",
    "Outcome",
    "RejectMessage",
    "Responder",
    "Stoppable",
    "StreamConfigError",
    "StreamSpec",
    "TianshuStreams",
    "Worker",
    "WorkerOptions",
    "by_subject",
    "connect",
    "encode",
    "ensure_consumer",
    "ensure_consumers",
    "ensure_stream",
    "ensure_streams",
    "extract",
    "inject",
    "publish",
    "publish_core",
    "published_last",
    "pull_subscription",
    "redact",
    "request",
    "scheduler_consumers",
    "tls_context",
    "wire_error",
]
