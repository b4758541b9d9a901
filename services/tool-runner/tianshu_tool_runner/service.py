"""The tool runner: takes calls from the shared consumer, runs them, publishes their results.

How many calls a runner holds: it asks the server for one call at a time, and only while one of
its `concurrency` slots is free; a slot is freed once the call's acknowledgement is confirmed.
So a runner never holds more unacknowledged calls than it can run, and the calls it cannot run
yet stay on the server, for whichever runner frees a slot first.

One call: decode it (an undecodable or invalid message is dead-lettered, never retried), run it
with the in-process `LocalToolExecutor` (arguments validated against the tool's schema, a timeout,
every failure an `is_error` result for the model, long results cut with a marker) while a
heartbeat reports it in progress, publish its `ToolCallResult` with `Nats-Msg-Id` = call id (a
redelivered call's repeated result is a duplicate the results stream drops), and only then
acknowledge it. A runner that dies mid-call acknowledges nothing: the call comes back to another
runner after the ack wait. SIGTERM stops the pulling, lets running calls finish within the
shutdown timeout and gives the others back at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import threading
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from opentelemetry import trace
from opentelemetry.trace import Span, Status, StatusCode, Tracer
from opentelemetry.util.types import AttributeValue
from pydantic import ValidationError

from tianshu_contracts import (
    TOOL_CALL_REQUEST_ADAPTER,
    DeadLetterReason,
    ToolCall,
    ToolCallRequest,
    ToolCallResult,
    WireError,
    subjects,
)
from tianshu_core.bus import (
    Backoff,
    DeadLetterSink,
    Delivery,
    GracefulShutdown,
    NatsSettings,
    connect,
    encode,
    ensure_consumer,
    ensure_streams,
    publish,
    pull_subscription,
)
from tianshu_core.bus.tracing import default_tracer, start_consumer_span
from tianshu_core.tools import LocalToolExecutor, ToolInvocation, ToolRegistry, error_result, truncate

from .settings import ToolRunnerSettings
from .streams import calls_consumer, runner_streams

log = logging.getLogger(__name__)

P = ParamSpec("P")
T = TypeVar("T")

# Room under the server's max_payload for the result's envelope and headers.
_HEADROOM = 16 * 1024
_BACKOFF = Backoff(initial_s=0.2, max_s=5.0)


class ToolRunner:
    """One tool runner. `await start()`, then `await serve()` until SIGTERM (or `stop()`/`shutdown()`)."""

    def __init__(
        self,
        settings: ToolRunnerSettings,
        registry: ToolRegistry,
        nats: NatsSettings | None = None,
        *,
        tracer: Tracer | None = None,
    ) -> None:
        self.settings = settings
        self.registry = registry
        self.nats_settings = nats or NatsSettings()
        self.runner_id = f"{settings.tool_runner_name}-{os.getpid()}"[-200:]
        self.nc: Client | None = None
        self.threads = ToolThreads(max(32, 2 * settings.tool_runner_concurrency))
        self.calls_answered = 0
        self._tracer = tracer or default_tracer()
        self._js: JetStreamContext | None = None
        self._sub: JetStreamContext.PullSubscription | None = None
        self._executor: LocalToolExecutor | None = None
        self._dead_letters: DeadLetterSink | None = None
        self._heartbeat_s = settings.tool_runner_ack_wait_s / 3
        self._running: set[asyncio.Task[None]] = set()
        self._held: dict[int, Msg] = {}  # delivered and not yet settled: what the heartbeat covers
        self._changed = asyncio.Event()  # a slot was freed, or stop() was called
        self._stopping = asyncio.Event()
        self._puller: asyncio.Task[None] | None = None
        self._beater: asyncio.Task[None] | None = None

    # -- life cycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Connect, ensure the streams and the shared consumer, start pulling; then signal readiness."""
        s = self.settings
        asyncio.get_running_loop().set_default_executor(self.threads)  # where sync tools run
        self.nc = nc = await connect(self.nats_settings, name=f"tianshu-tool-runner-{s.tool_runner_name}")
        self._js = js = nc.jetstream(timeout=self.nats_settings.request_timeout_s)
        await ensure_streams(js, runner_streams())
        spec = calls_consumer(
            ack_wait_s=s.tool_runner_ack_wait_s, max_ack_pending=s.tool_runner_max_ack_pending
        )
        info = await ensure_consumer(js, spec)
        self._heartbeat_s = self._heartbeat_interval(info.config.ack_wait or spec.ack_wait_s)
        self._sub = await pull_subscription(js, spec)
        self._executor = LocalToolExecutor(
            self.registry,
            default_timeout_s=s.tool_runner_timeout_s,
            max_result_bytes=self._result_limit(nc.max_payload),
        )
        self._dead_letters = DeadLetterSink(nc, tracer=self._tracer)
        self._puller = asyncio.create_task(self._pull(), name="tianshu-tool-runner-pull")
        self._beater = asyncio.create_task(self._heartbeats(), name="tianshu-tool-runner-heartbeat")
        if s.tool_runner_ready_file:
            _write_ready(Path(s.tool_runner_ready_file))
        log.info(
            "tool runner %s ready: %d tools (%s), concurrency %d, heartbeat every %.2f s",
            self.runner_id,
            len(self.registry),
            ", ".join(self.registry.names),
            s.tool_runner_concurrency,
            self._heartbeat_s,
        )

    async def serve(self) -> bool:
        """Serve until SIGTERM or SIGINT, then shut down within the configured time; True when clean."""
        assert self.nc is not None
        shutdown = GracefulShutdown(self.nc, [self], timeout_s=self.settings.tool_runner_shutdown_timeout_s)
        shutdown.install()
        await shutdown.wait()
        clean = await shutdown.run()
        await self.close()
        return clean

    def stop(self) -> None:
        """Take no more calls (the pull in flight still ends, and what it brings is given back)."""
        self._stopping.set()
        self._changed.set()

    async def shutdown(self, timeout_s: float) -> bool:
        """Stop, let running calls finish within `timeout_s`, give the rest back; True when all finished.

        Calls are given back only once this runner's last pull has ended (within the fetch timeout
        of `stop()`): a call released while that pull is still open on the server could be handed
        straight back to it, and would then wait out the ack wait. So a shutdown takes at most the
        longer of `timeout_s` and the fetch timeout.
        """
        self.stop()
        deadline = time.monotonic() + timeout_s
        clean = True
        running = set(self._running)
        if running:
            log.info("waiting for %d running calls", len(running))
            await asyncio.wait(running, timeout=max(0.0, deadline - time.monotonic()))
        if self._puller is not None and not self._puller.done():
            # Not cancelled: that would leave its pull open on the server, taking the next call.
            grace = self.settings.tool_runner_fetch_timeout_s + 1.0
            done, _ = await asyncio.wait({self._puller}, timeout=grace)
            if not done:
                clean = False
                self._puller.cancel()
        late = {task for task in running if not task.done()}
        if late:
            clean = False
            log.warning("giving back %d calls still running at shutdown", len(late))
            for task in late:
                task.cancel()  # each one naks its call: another runner takes it at once
            await asyncio.wait(late, timeout=2.0)
        if self._sub is not None:
            # A pull subscription never lets `Client.drain()` finish (see the scheduler's
            # _PullWorker); nothing is left to receive on it.
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()
        return clean

    async def close(self) -> None:
        """Stop the heartbeat, close the connection, remove the ready file."""
        self._stopping.set()
        for task in (self._puller, self._beater):
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self.nc is not None and not self.nc.is_closed:
            with contextlib.suppress(Exception):
                await self.nc.close()
        if self.settings.tool_runner_ready_file:
            _clear_ready(Path(self.settings.tool_runner_ready_file))
        log.info("tool runner %s stopped; it answered %d calls", self.runner_id, self.calls_answered)

    def _heartbeat_interval(self, ack_wait_s: float) -> float:
        configured = self.settings.tool_runner_heartbeat_s
        if configured is None:
            return ack_wait_s / 3
        if configured >= ack_wait_s:
            log.warning(
                "heartbeat interval %.2f s is not shorter than the consumer's ack wait (%.2f s, set by "
                "another runner?); using %.2f s",
                configured,
                ack_wait_s,
                ack_wait_s / 3,
            )
            return ack_wait_s / 3
        return configured

    def _result_limit(self, max_payload: int) -> int:
        wanted = self.settings.tool_runner_max_result_bytes
        room = max(1024, max_payload - _HEADROOM)
        if wanted > room:
            log.warning(
                "TIANSHU_TOOL_RUNNER_MAX_RESULT_BYTES=%d does not fit in the server's max_payload (%d); "
                "results are cut to %d bytes",
                wanted,
                max_payload,
                room,
            )
        return min(wanted, room)

    # -- pulling ------------------------------------------------------------------------------

    async def _pull(self) -> None:
        """Fetch one call per free slot; wait for a slot when all are taken."""
        sub, nc = self._sub, self.nc
        assert sub is not None and nc is not None
        limit = self.settings.tool_runner_concurrency
        timeout = self.settings.tool_runner_fetch_timeout_s
        while not self._stopping.is_set():
            if nc.is_closed:
                log.info("NATS connection closed; no more calls")
                return
            if len(self._running) >= limit:
                self._changed.clear()
                if len(self._running) >= limit and not self._stopping.is_set():
                    await self._changed.wait()
                continue
            try:
                # One at a time: a pull for k calls would hold up to k of them, and nats-py's fetch of
                # several waits for the whole batch (until its timeout) when fewer are queued.
                msgs = await sub.fetch(1, timeout=timeout)
            except (nats.errors.TimeoutError, TimeoutError):
                continue
            except Exception as exc:  # server away, reconnecting: try again shortly
                log.warning("fetching tool calls failed: %r", exc)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), 0.5)
                continue
            for msg in msgs:
                if self._stopping.is_set():
                    await _release(msg)
                else:
                    self._begin(msg)

    def _begin(self, msg: Msg) -> None:
        task = asyncio.create_task(self._take(msg), name="tianshu-tool-call")
        self._running.add(task)
        task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._running.discard(task)
        self._changed.set()

    async def _heartbeats(self) -> None:
        """Report every held call in progress, often enough that none reaches the ack wait."""
        while True:
            await asyncio.sleep(self._heartbeat_s)
            for msg in list(self._held.values()):
                with contextlib.suppress(Exception):  # settled meanwhile, or reconnecting
                    await msg.in_progress()

    # -- one call -----------------------------------------------------------------------------

    async def _take(self, msg: Msg) -> None:
        """Handle one delivered call inside a CONSUMER span joined to the sender's trace."""
        delivery = Delivery.of(msg)
        self._held[id(msg)] = msg
        attributes: dict[str, AttributeValue] = {
            "messaging.message.body.size": delivery.size,
            "messaging.nats.delivery_count": delivery.num_delivered,
        }
        if delivery.msg_id is not None:
            attributes["messaging.message.id"] = delivery.msg_id
        span = start_consumer_span(self._tracer, delivery.subject, delivery.headers, attributes)
        try:
            with trace.use_span(
                span, end_on_exit=True, record_exception=False, set_status_on_exception=False
            ):
                outcome = await self._handle(delivery, span)
                span.set_attribute("tianshu.bus.outcome", outcome)
        except asyncio.CancelledError:
            await _release(msg)
            raise
        except Exception:  # a bug of ours: without heartbeats the call comes back after the ack wait
            log.exception("tool call %s (seq %s) failed unexpectedly", delivery.msg_id, delivery.stream_seq)
        finally:
            self._held.pop(id(msg), None)

    async def _handle(self, delivery: Delivery, span: Span) -> str:
        try:
            request = TOOL_CALL_REQUEST_ADAPTER.validate_json(delivery.raw.data)
        except ValidationError as exc:
            invalid_json = any(e["type"] == "json_invalid" for e in exc.errors(include_url=False))
            reason = DeadLetterReason.UNDECODABLE if invalid_json else DeadLetterReason.SCHEMA_INVALID
            return await self._dead_letter(delivery, reason, _invalid(exc, reason), span)
        if delivery.subject != subjects.tool_call(request.tool):
            error = WireError(
                type="SubjectMismatch",
                message=f"a call of tool {request.tool!r} sent on {delivery.subject!r}",
                code="subject_mismatch",
            )
            return await self._dead_letter(
                delivery, DeadLetterReason.REFUSED, error, span, case_key=request.case_key
            )
        span.set_attribute("tianshu.case_key", request.case_key)
        span.set_attribute("tianshu.tool", request.tool)
        span.set_attribute("tianshu.tool.call_id", request.call_id)
        result = await self._answer(request, delivery)
        if result.result.is_error:
            span.set_attribute("tianshu.tool.is_error", True)
        try:
            await self._publish(result)
        except Exception as exc:
            delay = _BACKOFF.delay(delivery.num_delivered)
            log.error("could not publish the result of call %s; giving it back: %r", request.call_id, exc)
            span.set_status(Status(StatusCode.ERROR, "result not published"))
            await _settle(delivery.raw.nak(delay=delay), "nak")
            return "naked"
        self.calls_answered += 1
        # Confirmed before the slot is freed: otherwise the next pull could reach the server before
        # this ack does, and the runner would hold one call more than its concurrency for a moment.
        await _settle(delivery.raw.ack_sync(timeout=self.nats_settings.request_timeout_s), "ack")
        return "acked"

    async def _answer(self, request: ToolCallRequest, delivery: Delivery) -> ToolCallResult:
        """Run the call (or explain why it was not run); every failure is an `is_error` result."""
        assert self._executor is not None
        s = self.settings
        call = ToolCall(id=request.tool_call_id, name=request.tool, arguments=request.arguments)
        started = time.monotonic()
        remaining = math.inf
        if request.deadline is not None:
            remaining = (request.deadline - datetime.now(UTC)).total_seconds()
        if delivery.num_delivered > s.tool_runner_max_deliver:
            log.warning(
                "call %s of tool %s delivered %d times; answering with an error instead of running it",
                request.call_id,
                request.tool,
                delivery.num_delivered,
            )
            result = error_result(
                call,
                f"tool {request.tool} was not run: its call was delivered {delivery.num_delivered} times "
                "and never answered (the runners that took it stopped or stalled)",
            )
        elif remaining <= 0:
            assert request.deadline is not None
            result = error_result(
                call,
                f"tool {request.tool} was not run: the call's deadline "
                f"({request.deadline.isoformat()}) had passed",
            )
        else:
            limit = min(request.timeout_s, s.tool_runner_timeout_s, remaining)
            invocation = ToolInvocation(request.case_key, request.step, request.call_id)
            result = await self._executor.execute(call, timeout_s=limit, invocation=invocation)
        return ToolCallResult(
            call_id=request.call_id,
            case_key=request.case_key,
            step=request.step,
            result=result,
            runner=self.runner_id,
            duration_s=time.monotonic() - started,
        )

    async def _publish(self, result: ToolCallResult) -> None:
        """Publish the result (retried while NATS is away, within the publish timeout)."""
        assert self._js is not None
        result = self._fit(result)
        subject = subjects.tool_result(result.case_key)
        give_up = time.monotonic() + self.settings.tool_runner_publish_timeout_s
        attempt = 0
        while True:
            try:
                ack = await publish(
                    self._js,
                    subject,
                    result,
                    msg_id=result.call_id,
                    stream=subjects.STREAM_TOOL_RESULTS,
                    tracer=self._tracer,
                )
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                attempt += 1
                delay = _BACKOFF.delay(attempt)
                if time.monotonic() + delay > give_up:
                    raise
                log.warning(
                    "publishing the result of call %s failed (attempt %d), retrying in %.2f s: %r",
                    result.call_id,
                    attempt,
                    delay,
                    exc,
                )
                await asyncio.sleep(delay)
                continue
            if ack.duplicate:
                log.info("the result of call %s was published already (a repeated delivery)", result.call_id)
            return

    def _fit(self, result: ToolCallResult) -> ToolCallResult:
        """The result cut further when JSON escaping made it too large for the server."""
        assert self.nc is not None
        budget = max(1024, self.nc.max_payload - _HEADROOM // 4)
        content = result.result.content
        limit = len(content.encode())
        while len(encode(result)) > budget and limit > 0:
            limit //= 2
            result = result.model_copy(
                update={"result": result.result.model_copy(update={"content": truncate(content, limit)})}
            )
        return result

    async def _dead_letter(
        self,
        delivery: Delivery,
        reason: DeadLetterReason,
        error: WireError,
        span: Span,
        *,
        case_key: str | None = None,
    ) -> str:
        assert self._dead_letters is not None
        span.set_attribute("tianshu.bus.dead_letter_reason", reason.value)
        span.set_status(Status(StatusCode.ERROR, f"dead-lettered: {reason.value}"))
        try:
            await self._dead_letters.send(delivery, reason, error, case_key=case_key)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # never drop what could not be stored: it comes again later
            delay = _BACKOFF.delay(delivery.num_delivered)
            log.error(
                "could not dead-letter %s (%s), retry in %.2f s: %r", delivery.subject, reason, delay, exc
            )
            await _settle(delivery.raw.nak(delay=delay), "nak")
            return "naked"
        await _settle(delivery.raw.term(), "terminate")
        return "dead_lettered"


class ToolThreads(ThreadPoolExecutor):
    """The loop's default executor, where sync tools run; counts the calls not yet returned.

    A sync tool past its timeout cannot be stopped: its thread runs on. `busy` tells the entry point
    that exiting normally would wait for it (the interpreter joins executor threads at exit).
    """

    def __init__(self, max_workers: int) -> None:
        super().__init__(max_workers=max_workers, thread_name_prefix="tianshu-tool")
        self._lock = threading.Lock()
        self._busy = 0

    def submit(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> Future[T]:
        future = super().submit(fn, *args, **kwargs)
        with self._lock:
            self._busy += 1
        future.add_done_callback(self._done)
        return future

    def _done(self, _future: Future[Any]) -> None:
        with self._lock:
            self._busy -= 1

    @property
    def busy(self) -> int:
        with self._lock:
            return self._busy


def _write_ready(path: Path) -> None:
    path.write_text(f"{os.getpid()}\n")


def _clear_ready(path: Path) -> None:
    path.unlink(missing_ok=True)


def _invalid(exc: ValidationError, reason: DeadLetterReason) -> WireError:
    problems = [
        f"{'.'.join(str(p) for p in err['loc']) or '(message)'}: {err['msg']}"
        for err in exc.errors(include_url=False, include_input=False)[:10]
    ]
    what = "not valid JSON" if reason is DeadLetterReason.UNDECODABLE else "not a valid tool call"
    message = f"{what}: {'; '.join(problems)}"[:2000]
    return WireError(type="ValidationError", message=message, code=reason.value)


async def _settle(settle: Awaitable[object], verb: str) -> None:
    try:
        await settle
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # the ack wait brings it back; its repeated result is a duplicate
        log.warning("could not %s a tool call: %r", verb, exc)


async def _release(msg: Msg) -> None:
    """Give a call back at once (nak without delay) so another runner can take it."""
    with contextlib.suppress(Exception):
        await msg.nak()
