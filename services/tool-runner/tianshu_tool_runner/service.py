"""The tool runner: takes calls from the shared consumer through the bus's `Worker`, runs them,
publishes their results.

How many calls a runner holds: the worker asks the server for calls only while one of its
`concurrency` slots is free, one at a time, and frees a slot once the call's acknowledgement is
confirmed. So a runner never holds more unacknowledged calls than it can run, and the calls it
cannot run yet stay on the server, for whichever runner frees a slot first.

One call: a call that is not valid, not strict JSON, sent on another tool's subject, or past its
deadline (the case has already told the model it failed) is dead-lettered on its first delivery
and never run. A call of a tool this runner does not have is dead-lettered too, and answered with
an error result so the model learns at once. Otherwise it runs with the in-process
`LocalToolExecutor` (arguments validated against the tool's schema, a timeout, every failure an
`is_error` result for the model, a NUL character an error result, long results cut with a
marker) while the worker reports it in progress; its `ToolCallResult` is published with
`Nats-Msg-Id` = call id (a redelivered call's repeated result is a duplicate the results stream
drops), and only then is the call acknowledged. While NATS is away the result is kept and
published again after a backoff, never run twice by this runner. A runner that dies mid-call
acknowledges nothing: the call comes back to another runner after the ack wait.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

from nats.aio.client import Client
from nats.js import JetStreamContext
from opentelemetry import trace
from opentelemetry.trace import Tracer

from tianshu_contracts import (
    TOOL_CALL_REQUEST_ADAPTER,
    DeadLetterReason,
    ToolCall,
    ToolCallRequest,
    ToolCallResult,
    subjects,
)
from tianshu_core.bus import (
    Backoff,
    Delivery,
    GracefulShutdown,
    NatsSettings,
    RejectMessage,
    Worker,
    WorkerOptions,
    connect,
    encode,
    ensure_consumer,
    ensure_streams,
    publish,
    published_last,
    pull_subscription,
    wire_error,
)
from tianshu_core.bus.tracing import default_tracer
from tianshu_core.tools import (
    LocalToolExecutor,
    ToolInvocation,
    ToolRegistry,
    error_result,
    truncate,
    truncated_parts,
)

from .settings import ToolRunnerSettings
from .streams import calls_consumer, runner_streams

log = logging.getLogger(__name__)

P = ParamSpec("P")
T = TypeVar("T")

# Room under the server's max_payload (and the schedulers' event limit) for the result's
# envelope, its headers and the difference between two JSON encoders.
_HEADROOM = 16 * 1024


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
        self._worker: Worker[ToolCallRequest] | None = None
        self._backoff = Backoff(
            initial_s=settings.tool_runner_retry_initial_s, max_s=settings.tool_runner_retry_max_s
        )
        # Results run but not yet published (NATS away): a retry publishes them, never reruns the call.
        self._unpublished: dict[str, ToolCallResult] = {}

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
        heartbeat = self._heartbeat_interval(info.config.ack_wait or spec.ack_wait_s)
        self._sub = await pull_subscription(js, spec)
        self._executor = LocalToolExecutor(
            self.registry,
            default_timeout_s=s.tool_runner_timeout_s,
            max_result_bytes=self._result_limit(nc.max_payload),
        )
        self._worker = Worker(
            nc,
            self._sub,
            TOOL_CALL_REQUEST_ADAPTER,
            self._handle,
            options=WorkerOptions(
                concurrency=s.tool_runner_concurrency,
                # One call per pull: a pull for several could hold more than the free slots.
                batch=1,
                fetch_timeout_s=s.tool_runner_fetch_timeout_s,
                # Calls come from model replies the schedulers stored under the same limit.
                max_payload_bytes=min(nc.max_payload, s.max_event_payload_bytes),
                max_deliver=s.tool_runner_max_deliver,
                backoff=self._backoff,
                heartbeat_s=heartbeat,
                confirm_acks=True,
            ),
            key=None,
            exhausted=self._exhausted,
            name="tool-calls",
            tracer=self._tracer,
        )
        self._worker.start()
        if s.tool_runner_ready_file:
            _write_ready(Path(s.tool_runner_ready_file))
        log.info(
            "tool runner %s ready: %d tools (%s), concurrency %d, heartbeat every %.2f s",
            self.runner_id,
            len(self.registry),
            ", ".join(self.registry.names),
            s.tool_runner_concurrency,
            heartbeat,
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
        if self._worker is not None:
            self._worker.stop()

    async def shutdown(self, timeout_s: float) -> bool:
        """Stop, let running calls finish within `timeout_s`, give the rest back; True when all finished.

        A shutdown takes at most the longer of `timeout_s` and the fetch timeout: the last pull
        ends before the calls still held are given back (one released while that pull is open
        on the server could be handed straight back to it).
        """
        clean = True
        if self._worker is not None:
            held = self._worker.held
            if held:
                log.info("waiting for %d running calls", held)
            clean = await self._worker.shutdown(timeout_s)
        return clean

    async def close(self) -> None:
        """Stop the worker, close the connection, remove the ready file."""
        if self._worker is not None and not self._worker.stopping:
            await self._worker.shutdown(0.0)
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

    def _result_budget(self, max_payload: int) -> int:
        """The most bytes a published result may take: under the server's max_payload and under
        the schedulers' event limit, which the result must fit once wrapped as an event."""
        return max(4096, min(max_payload, self.settings.max_event_payload_bytes) - _HEADROOM // 4)

    def _result_limit(self, max_payload: int) -> int:
        wanted = self.settings.tool_runner_max_result_bytes
        room = max(1024, min(max_payload, self.settings.max_event_payload_bytes) - _HEADROOM)
        if wanted > room:
            log.warning(
                "TIANSHU_TOOL_RUNNER_MAX_RESULT_BYTES=%d does not fit under the NATS max_payload (%d) "
                "and TIANSHU_MAX_EVENT_PAYLOAD_BYTES (%d) once wrapped; results are cut to %d bytes",
                wanted,
                max_payload,
                self.settings.max_event_payload_bytes,
                room,
            )
        return min(wanted, room)

    # -- one call -----------------------------------------------------------------------------

    async def _handle(self, request: ToolCallRequest, delivery: Delivery) -> None:
        """Run one call (once) and publish its result; refuse what must not run."""
        span = trace.get_current_span()
        span.set_attribute("tianshu.case_key", request.case_key)
        span.set_attribute("tianshu.tool", request.tool)
        span.set_attribute("tianshu.tool.call_id", request.call_id)
        if delivery.subject != subjects.tool_call(request.tool):
            raise RejectMessage.because(
                DeadLetterReason.KEY_MISMATCH,
                f"a call of tool {request.tool!r} sent on {delivery.subject!r}",
                case_key=request.case_key,
            )
        result = self._unpublished.get(request.call_id)
        if result is None:
            self._refuse_expired(request)
            if request.tool not in self.registry:
                await self._answer_unknown(request)
            if delivery.num_delivered > 1 and await self._answered_already(request):
                return
            result = await self._answer(request)
            self._unpublished[request.call_id] = result
        if result.result.is_error:
            span.set_attribute("tianshu.tool.is_error", True)
        await self._publish(result)
        self._unpublished.pop(request.call_id, None)
        self.calls_answered += 1

    async def _answered_already(self, request: ToolCallRequest) -> bool:
        """Whether a runner that took this call before published its result and died before the
        ack (found by `make chaos`): then it is the last result on the case's subject, and the
        call is not run again. (A result of a call run beside it may have come after; then the
        call runs again, as before, and its repeated result is dropped as a duplicate.)"""
        assert self._js is not None
        subject = subjects.tool_result(request.case_key)
        if not await published_last(self._js, subjects.STREAM_TOOL_RESULTS, subject, request.call_id):
            return False
        log.info("call %s was answered already (a repeated delivery); not running it again", request.call_id)
        return True

    async def _exhausted(self, request: ToolCallRequest, delivery: Delivery) -> None:
        """A call delivered more often than the budget (its runners died or stalled every time):
        answered with an error the model sees, never run again."""
        log.warning(
            "call %s of tool %s delivered %d times; answering with an error instead of running it",
            request.call_id,
            request.tool,
            delivery.num_delivered,
        )
        call = ToolCall(id=request.tool_call_id, name=request.tool, arguments=request.arguments)
        await self._publish(
            self._wrap(
                request,
                error_result(
                    call,
                    f"tool {request.tool} was not run: its call was delivered {delivery.num_delivered} "
                    "times and never answered (the runners that took it stopped or stalled)",
                ),
                0.0,
            )
        )

    def _refuse_expired(self, request: ToolCallRequest) -> None:
        if request.deadline is None or request.deadline > datetime.now(UTC):
            return
        raise RejectMessage.because(
            DeadLetterReason.EXPIRED,
            f"tool {request.tool} was not run: the call's deadline ({request.deadline.isoformat()}) "
            "had passed, so its case has told the model it failed",
            case_key=request.case_key,
        )

    async def _answer_unknown(self, request: ToolCallRequest) -> None:
        """A tool this runner lacks: tell the model at once, and dead-letter the call for the operator."""
        call = ToolCall(id=request.tool_call_id, name=request.tool, arguments=request.arguments)
        message = (
            f"unknown tool {request.tool!r}; this runner has: {', '.join(self.registry.names) or 'none'}"
        )
        await self._publish(self._wrap(request, error_result(call, f"unknown tool: {request.tool}"), 0.0))
        raise RejectMessage(wire_error(message, code="unknown_tool"), case_key=request.case_key)

    async def _answer(self, request: ToolCallRequest) -> ToolCallResult:
        """Run the call within its time limits; every failure is an `is_error` result."""
        assert self._executor is not None
        call = ToolCall(id=request.tool_call_id, name=request.tool, arguments=request.arguments)
        started = time.monotonic()
        remaining = math.inf
        if request.deadline is not None:
            remaining = (request.deadline - datetime.now(UTC)).total_seconds()
        limit = min(request.timeout_s, self.settings.tool_runner_timeout_s, remaining)
        invocation = ToolInvocation(request.case_key, request.step, request.call_id)
        result = await self._executor.execute(call, timeout_s=limit, invocation=invocation)
        return self._wrap(request, result, time.monotonic() - started)

    def _wrap(self, request: ToolCallRequest, result: Any, duration_s: float) -> ToolCallResult:
        return ToolCallResult(
            call_id=request.call_id,
            case_key=request.case_key,
            step=request.step,
            result=result,
            runner=self.runner_id,
            duration_s=duration_s,
        )

    async def _publish(self, result: ToolCallResult) -> None:
        """Publish the result; a NATS failure propagates (transient: the worker tries again later)."""
        assert self._js is not None
        result = self._fit(result)
        ack = await publish(
            self._js,
            subjects.tool_result(result.case_key),
            result,
            msg_id=result.call_id,
            stream=subjects.STREAM_TOOL_RESULTS,
            tracer=self._tracer,
        )
        if ack.duplicate:
            log.info("the result of call %s was published already (a repeated delivery)", result.call_id)

    def _fit(self, result: ToolCallResult) -> ToolCallResult:
        """The result cut further when JSON escaping made it too large for the server or the
        schedulers' event limit."""
        assert self.nc is not None
        budget = self._result_budget(self.nc.max_payload)
        # A result the executor cut already is cut again from its kept part, and its marker still
        # names the tool's whole output (not the size of the first cut).
        content, total = truncated_parts(result.result.content)
        limit = len(content.encode())
        while len(encode(result)) > budget and limit > 0:
            limit //= 2
            cut = truncate(content, limit, total=total)
            result = result.model_copy(update={"result": result.result.model_copy(update={"content": cut})})
        return result


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
