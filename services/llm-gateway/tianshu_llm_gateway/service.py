"""The LLM gateway: takes model calls from the shared consumer through the bus's `Worker`, sends
them upstream along their route's fallback chain, publishes their results.

How many calls a gateway holds: the worker asks the server for calls only while one of its
`concurrency` slots is free and frees a slot once the call's acknowledgement is confirmed, so a
gateway never holds more unacknowledged calls than it can send, and the others stay on the server
for whichever gateway frees a slot first. While a call is upstream it is reported in progress
(heartbeats), so a slow model does not make the server deliver it again.

One call: a call that is not valid, not strict JSON or too large is dead-lettered on its first
delivery by the worker (a `call_id` that is not a plain token among them). A call whose `record`
holds a NUL character (its result could not be stored) is dead-lettered `unstorable` without
being sent upstream. A call past its
`deadline` (nobody waits for it any more) is dead-lettered `expired` without being sent
upstream. A call of a route this gateway does not have is answered
at once with a `fatal` error result (the workflow sees `LlmError`) and dead-lettered
`unknown_route`. Otherwise the route's `ResilientLlmProvider` answers it (retries and fallback
inside); a streamed call's events go out as `LlmStreamChunk`s as they come. The `LlmCallResult`
(the response, or the error with its class; every attempt; the cost at the route's prices) is
published with `Nats-Msg-Id` = `<call_id>:<attempt>`, and only then is the call acknowledged.
While NATS is away the result is kept and published again after a backoff: the call is not sent
upstream again for it. A gateway that dies mid-call acknowledges nothing: the call comes back to
another gateway after the ack wait (which sends it upstream again, unless the dead one's result
is already the last one of the case's results subject).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NamedTuple, NoReturn

from nats.aio.client import Client
from nats.js import JetStreamContext
from opentelemetry import trace

from tianshu_contracts import (
    LLM_CALL_REQUEST_ADAPTER,
    DeadLetterReason,
    LlmCallRequest,
    LlmCallResult,
    LlmStreamChunk,
    subjects,
)
from tianshu_contracts.llm import (
    Done,
    LlmAttempt,
    LlmErrorClass,
    LlmRequest,
    LlmResponse,
    LlmStreamEvent,
    StreamError,
    TextDelta,
    ToolCall,
    ToolUse,
    Usage,
)
from tianshu_core import telemetry
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
    publish_core,
    published_last,
    pull_subscription,
    wire_error,
)
from tianshu_core.llm import LlmError, LlmInvocation
from tianshu_core.logs import current_case
from tianshu_core.transient import is_transient

from .config import GatewayConfig
from .routes import Route, attempts
from .settings import LlmGatewaySettings
from .streams import calls_consumer, gateway_streams

log = logging.getLogger(__name__)

# Room under the server's max_payload for the result's headers.
_HEADROOM = 4 * 1024
# The vendors' SDKs log request bodies (the prompt) at debug level.
_SDK_LOGGERS = ("openai", "anthropic")


class LlmGateway:
    """One gateway. `await start()`, then `await serve()` until SIGTERM (or `stop()`/`shutdown()`)."""

    def __init__(
        self, settings: LlmGatewaySettings, config: GatewayConfig, nats: NatsSettings | None = None
    ) -> None:
        self.settings = settings
        self.config = config
        self.nats_settings = nats or NatsSettings()
        self.gateway_id = f"{settings.llm_gateway_name}-{os.getpid()}"[-200:]
        self.nc: Client | None = None
        self.routes: dict[str, Route] = {}
        self.calls_answered = 0
        self._js: JetStreamContext | None = None
        self._worker: Worker[LlmCallRequest] | None = None
        self._backoff = Backoff(
            initial_s=settings.llm_gateway_retry_initial_s, max_s=settings.llm_gateway_retry_max_s
        )
        # Results had but not yet published (NATS away): a retry publishes them, never asks again.
        self._unpublished: dict[tuple[str, int], _Encoded] = {}

    # -- life cycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Make the routes, connect, ensure the streams and the shared consumer, start pulling;
        then signal readiness. A failure closes what was opened."""
        try:
            await self._start()
        except BaseException:
            await self.close()
            raise

    async def _start(self) -> None:
        s = self.settings
        if not s.llm_gateway_record_prompts:
            _quiet_sdk_logs()
        self.routes = self.config.build()
        self.nc = nc = await connect(self.nats_settings, name=f"tianshu-llm-gateway-{s.llm_gateway_name}")
        self._js = js = nc.jetstream(timeout=self.nats_settings.request_timeout_s)
        await ensure_streams(js, gateway_streams())
        spec = calls_consumer(ack_wait_s=s.llm_gateway_ack_wait_s)
        info = await ensure_consumer(js, spec)
        heartbeat = self._heartbeat(info.config.ack_wait or spec.ack_wait_s)
        options = WorkerOptions(
            concurrency=s.llm_gateway_concurrency,
            fetch_timeout_s=s.llm_gateway_fetch_timeout_s,
            max_payload_bytes=min(nc.max_payload, s.llm_gateway_max_request_bytes or nc.max_payload),
            max_deliver=s.llm_gateway_max_deliver,
            backoff=self._backoff,
            heartbeat_s=heartbeat,
            confirm_acks=True,
        )
        subscription = await pull_subscription(js, spec)
        self._worker = Worker(
            nc,
            subscription,
            LLM_CALL_REQUEST_ADAPTER,
            self._handle,
            options=options,
            key=None,
            exhausted=self._exhausted,
            name="llm-calls",
        )
        self._worker.start()
        _mark_ready(s.llm_gateway_ready_file, ready=True)
        log.info(
            "llm gateway %s ready: routes %s, concurrency %d, heartbeat every %.2f s",
            self.gateway_id,
            ", ".join(f"{r.name} ({' > '.join(e.model for e in r.chain)})" for r in self.routes.values()),
            s.llm_gateway_concurrency,
            heartbeat,
        )

    async def serve(self) -> bool:
        """Serve until SIGTERM or SIGINT, then shut down within the configured time; True when clean."""
        assert self.nc is not None
        timeout_s = self.settings.llm_gateway_shutdown_timeout_s
        shutdown = GracefulShutdown(self.nc, [self], timeout_s=timeout_s)
        shutdown.install()
        await shutdown.wait()
        try:
            return await shutdown.run()
        finally:
            await self.close()

    def stop(self) -> None:
        """Take no more calls (the pull in flight still ends, and what it brings is given back)."""
        if self._worker is not None:
            self._worker.stop()

    async def shutdown(self, timeout_s: float) -> bool:
        """Stop, let calls in flight finish within `timeout_s`, give the rest back; True when all
        finished (within the longer of `timeout_s` and the fetch timeout, as the worker's)."""
        if self._worker is None:
            return True
        if self._worker.held:
            log.info("waiting for %d model calls in flight", self._worker.held)
        return await self._worker.shutdown(timeout_s)

    async def close(self) -> None:
        """Stop the worker, close the connection and the providers' clients, remove the ready file."""
        if self._worker is not None and not self._worker.stopping:
            await self._worker.shutdown(0.0)
        if self.nc is not None and not self.nc.is_closed:
            with contextlib.suppress(Exception):
                await self.nc.close()
        providers = {id(p.provider): p.provider for route in self.routes.values() for p in route.providers}
        for provider in providers.values():
            with contextlib.suppress(Exception):
                await provider.aclose()
        _mark_ready(self.settings.llm_gateway_ready_file, ready=False)
        log.info("llm gateway %s stopped; it answered %d calls", self.gateway_id, self.calls_answered)

    def _heartbeat(self, ack_wait_s: float) -> float:
        """The configured interval, unless the consumer's ack wait (set by another gateway?) is shorter."""
        beat = self.settings.llm_gateway_heartbeat_s
        if beat is not None and beat >= ack_wait_s:
            log.warning("heartbeat %.2f s is not under the consumer's ack wait %.2f s", beat, ack_wait_s)
        return beat if beat is not None and beat < ack_wait_s else ack_wait_s / 3

    # -- one call -----------------------------------------------------------------------------

    async def _handle(self, request: LlmCallRequest, delivery: Delivery) -> None:
        """Answer one call (upstream once per delivery at most) and publish its result."""
        current_case.set(request.case_key)  # in its log lines (the worker runs each call in a task)
        span = trace.get_current_span()
        span.set_attribute("tianshu.case_key", request.case_key)
        span.set_attribute("tianshu.llm.call_id", request.call_id)
        span.set_attribute("tianshu.llm.route", request.request.model)
        key = (request.call_id, request.attempt)
        kept = self._unpublished.get(key)
        if kept is not None:
            await self._publish_kept(key, kept)
            return
        _refuse_unstorable(request)
        self._refuse_expired(request)
        route = self.routes.get(request.request.model)
        if route is None:
            await self._answer_unknown(request)
        if delivery.num_delivered > 1 and await self._answered_already(request):
            return
        chat = await self._answer(request, route)
        try:
            kept = self._fit(chat.result)
            self._unpublished[key] = kept
            await self._publish_kept(key, kept)
        finally:
            # The result is out (or kept for the next try) before the chat span's attributes, its
            # end and the call's log line, which the workflow does not wait for; the ack (after
            # this handler) still waits for all of it.
            self._close_chat(chat)

    async def _publish_kept(self, key: tuple[str, int], kept: _Encoded) -> None:
        """Publish a result had from upstream; kept while NATS is away (a retry publishes it)."""
        try:
            await self._publish(kept.result, kept.data)
        except Exception as exc:
            if not is_transient(exc):  # the call comes again (or is dead-lettered): forget it here
                self._unpublished.pop(key, None)
            raise
        self._unpublished.pop(key, None)
        self.calls_answered += 1

    async def _exhausted(self, request: LlmCallRequest, delivery: Delivery) -> None:
        """A call delivered more often than the budget (its gateways died or stalled every time):
        answered with an `unavailable` error, never sent upstream again."""
        log.warning(
            "call %s delivered %d times; answering with an error instead of sending it upstream",
            request.call_id,
            delivery.num_delivered,
        )
        message = (
            f"the model call was delivered {delivery.num_delivered} times and never answered "
            "(the gateways that took it stopped or stalled)"
        )
        await self._publish(self._result(request, LlmError(message, error_class=LlmErrorClass.UNAVAILABLE)))

    def _refuse_expired(self, request: LlmCallRequest) -> None:
        if request.deadline is None or request.deadline > datetime.now(UTC):
            return
        raise RejectMessage.because(
            DeadLetterReason.EXPIRED,
            f"the model call was not sent upstream: its deadline ({request.deadline.isoformat()}) had "
            "passed, so nobody waits for its answer",
            case_key=request.case_key,
        )

    async def _answer_unknown(self, request: LlmCallRequest) -> NoReturn:
        """A route this gateway lacks: tell the workflow at once, and dead-letter the call."""
        route = request.request.model
        message = f"unknown route {route!r}; this gateway has: {', '.join(sorted(self.routes)) or 'none'}"
        await self._publish(self._result(request, LlmError(message, error_class=LlmErrorClass.FATAL)))
        raise RejectMessage(wire_error(message, code="unknown_route"), case_key=request.case_key)

    async def _answered_already(self, request: LlmCallRequest) -> bool:
        """Whether a gateway that took this call before published its result (and died before the
        ack): then it is the last result of the case's subject, and the call is not sent again."""
        assert self._js is not None
        subject = subjects.llm_result(request.case_key)
        msg_id = _msg_id(request.call_id, request.attempt)
        if not await published_last(self._js, subjects.STREAM_LLM_RESULTS, subject, msg_id):
            return False
        log.info("call %s was answered already (a repeated delivery)", request.call_id)
        return True

    async def _answer(self, request: LlmCallRequest, route: Route) -> _Chat:
        """The call sent upstream along the route, inside a `chat <route>` span; every failure an
        error result. The span is left open, its end time taken: `_close_chat` gives it its
        attributes and ends it once the result is published."""
        invocation = LlmInvocation(request.case_key, request.record, request.call_id, request.attempt)
        started = time.monotonic()
        reply: LlmResponse | LlmError
        first_token_s: float | None = None
        attributes = {"gen_ai.operation.name": "chat", "gen_ai.request.model": route.name}
        span = telemetry.tracer.start_span(f"chat {route.name}", attributes=attributes)
        try:
            with trace.use_span(span), attempts() as tried:
                try:
                    if request.stream:
                        reply, first_token_s = await self._stream(request, route, invocation, started)
                    else:
                        reply = await route.llm.complete(request.request, invocation=invocation)
                except LlmError as err:
                    reply = err
                except Exception as exc:  # a bug: answer with it rather than ask upstream again and again
                    log.exception("call %s: the route %s failed unexpectedly", request.call_id, route.name)
                    reply = LlmError(
                        f"the gateway failed: {type(exc).__name__}", error_class=LlmErrorClass.FATAL
                    )
                duration_s = time.monotonic() - started
                result = self._result(
                    request, reply, tried, route=route, duration_s=duration_s, first_token_s=first_token_s
                )
        except BaseException:
            span.end()
            raise
        return _Chat(span, time.time_ns(), request, result)

    def _close_chat(self, chat: _Chat) -> None:
        """The chat span's attributes and its end (at the time the answer was had), then the log line."""
        try:
            self._annotate(chat.span, chat.request, chat.result, at=chat.ended_ns)
        finally:
            chat.span.end(end_time=chat.ended_ns)
        self._log(chat.result)

    async def _stream(
        self, request: LlmCallRequest, route: Route, invocation: LlmInvocation, started: float
    ) -> tuple[LlmResponse | LlmError, float | None]:
        """Stream the reply: each event published as it comes, the reply assembled from them.

        A stream that fails after its first delta (`StreamError`, `incomplete`) for a reason worth
        another try is asked again as a new attempt: its chunks carry the next attempt number, so
        a follower drops the partial text of the one that failed. At most the route's
        `max_attempts` streams are asked for."""
        assert self._js is not None
        first_token_s: float | None = None
        policy = getattr(route.llm, "policy", None)
        tries = int(getattr(policy, "max_attempts", 1))
        for k in range(tries):
            attempt = request.model_copy(update={"attempt": request.attempt + k})
            assert self.nc is not None
            chunks = _Chunks(self.nc, attempt, self.settings.llm_gateway_coalesce_ms / 1000)
            text: list[str] = []
            calls: list[ToolCall] = []
            end: Done | StreamError | None = None
            # Read to its end: the resilient provider settles the attempt after the terminal event.
            events = route.llm.stream(request.request, invocation=invocation)
            try:
                async for event in events:
                    if isinstance(event, TextDelta | ToolUse) and first_token_s is None:
                        first_token_s = time.monotonic() - started
                    await chunks.send(event)
                    if isinstance(event, TextDelta):
                        text.append(event.text)
                    elif isinstance(event, ToolUse):
                        calls.append(event.call)
                    elif isinstance(event, Done | StreamError):
                        end = event
            finally:
                await chunks.close()
                close = getattr(events, "aclose", None)
                if close is not None:
                    await close()
            if isinstance(end, StreamError):
                again = end.incomplete and end.error_class in _STREAM_AGAIN and k + 1 < tries
                if again:
                    log.warning(
                        "call %s: the stream failed after its first delta (%s); asking again as attempt %d",
                        request.call_id,
                        end.error_class.value,
                        attempt.attempt + 1,
                    )
                    continue
                return LlmError.from_stream_error(end), first_token_s
            if end is None:
                raise LlmError(
                    "the stream ended without a terminal event", error_class=LlmErrorClass.TRANSIENT
                )
            reply = LlmResponse(content="".join(text), tool_calls=calls, finish_reason=end.finish_reason)
            return reply, first_token_s
        raise AssertionError("unreachable")  # pragma: no cover

    def _result(
        self,
        request: LlmCallRequest,
        reply: LlmResponse | LlmError,
        tried: Sequence[LlmAttempt] = (),
        *,
        route: Route | None = None,
        duration_s: float = 0.0,
        first_token_s: float | None = None,
    ) -> LlmCallResult:
        """The result of a call: the reply (named after the attempt that gave it) or the error,
        every attempt, and what they cost at the route's prices."""
        outcome: dict[str, Any]
        if isinstance(reply, LlmError):
            outcome = {"error": reply.wire(), "error_class": reply.error_class}
        else:
            answered = next((a for a in reversed(tried) if a.error_class is None), None)
            usage = sum((a.usage for a in tried), Usage()) if tried else reply.usage
            who = {"provider": answered.provider, "model": answered.model} if answered else {}
            outcome = {"response": reply.model_copy(update={"usage": usage, "attempts": list(tried), **who})}
        return LlmCallResult(
            call_id=request.call_id,
            case_key=request.case_key,
            record=request.record,
            attempt=request.attempt,
            route=request.request.model,
            attempts=list(tried),
            gateway=self.gateway_id,
            duration_s=duration_s,
            first_token_s=first_token_s,
            cost_usd=route.cost(tried) if route is not None else None,
            **outcome,
        )

    def _fit(self, result: LlmCallResult) -> _Encoded:
        """The result and its body (encoded once: what is measured is what is published), or an
        error saying it is too large for NATS (a reply can be long)."""
        assert self.nc is not None
        data = encode(result)
        size = len(data)
        if size <= self.nc.max_payload - _HEADROOM:
            return _Encoded(result, data)
        limit = self.nc.max_payload
        message = f"the reply is {size} bytes, over what NATS carries ({limit} bytes, max_payload)"
        error = LlmError(message, error_class=LlmErrorClass.REQUEST_TOO_LARGE)
        update = {"response": None, "error": error.wire(), "error_class": error.error_class}
        refusal = result.model_copy(update=update)
        return _Encoded(refusal, encode(refusal))

    def _annotate(
        self, span: trace.Span, request: LlmCallRequest, result: LlmCallResult, *, at: int | None = None
    ) -> None:
        """The chat span's attributes: who answered, tokens, timings; one event per failed attempt
        (dated `at`, ns since the epoch, when given)."""
        span.set_attribute("tianshu.case_key", request.case_key)
        span.set_attribute("tianshu.llm.call_id", request.call_id)
        span.set_attribute("tianshu.llm.attempts", len(result.attempts))
        for attempt in result.attempts:
            if attempt.error_class is not None:
                event: dict[str, str | int] = {
                    "gen_ai.provider.name": attempt.provider,
                    "gen_ai.request.model": attempt.model,
                    "error.type": attempt.error_class.value,
                }
                if attempt.status is not None:
                    event["http.response.status_code"] = attempt.status
                span.add_event("attempt", event, timestamp=at)
        if result.first_token_s is not None:
            span.set_attribute("gen_ai.response.time_to_first_chunk", result.first_token_s)
        if result.cost_usd is not None:
            span.set_attribute("tianshu.llm.cost_usd", result.cost_usd)
        response = result.response
        if response is None:
            assert result.error is not None and result.error_class is not None
            span.set_attribute("error.type", result.error_class.value)
            span.set_status(trace.Status(trace.StatusCode.ERROR, result.error.message[:300]))
            return
        if response.provider:
            span.set_attribute("gen_ai.provider.name", response.provider)
        if response.model:
            span.set_attribute("gen_ai.response.model", response.model)
        span.set_attribute("gen_ai.usage.input_tokens", response.usage.prompt_tokens)
        span.set_attribute("gen_ai.usage.output_tokens", response.usage.completion_tokens)
        if response.finish_reason:
            span.set_attribute("gen_ai.response.finish_reasons", [response.finish_reason])
        if self.settings.llm_gateway_record_prompts:
            span.set_attribute("gen_ai.input.messages", _prompt_json(request.request))
            span.set_attribute("gen_ai.output.messages", response.message().model_dump_json())

    def _log(self, result: LlmCallResult) -> None:
        response = result.response
        if response is None:
            assert result.error is not None
            log.warning(
                "call %s (route %s) failed after %d attempts in %.2f s: %s",
                result.call_id,
                result.route,
                len(result.attempts),
                result.duration_s,
                result.error.message,
            )
            return
        log.info(
            "call %s (route %s) answered by %s %s in %.2f s (%d attempts, %d+%d tokens)",
            result.call_id,
            result.route,
            response.provider,
            response.model,
            result.duration_s,
            len(result.attempts),
            response.usage.prompt_tokens,
            response.usage.completion_tokens,
        )
        if self.settings.llm_gateway_record_prompts:
            log.debug("call %s replied: %s", result.call_id, response.message().model_dump_json())

    async def _publish(self, result: LlmCallResult, data: bytes | None = None) -> None:
        """Publish the result (`data`: its body, when encoded already); a NATS failure propagates
        (transient: the worker tries again later)."""
        assert self._js is not None
        ack = await publish(
            self._js,
            subjects.llm_result(result.case_key),
            result if data is None else data,
            msg_id=_msg_id(result.call_id, result.attempt),
            stream=subjects.STREAM_LLM_RESULTS,
        )
        if ack.duplicate:
            log.info("the result of call %s was published already (a repeated delivery)", result.call_id)


class _Encoded(NamedTuple):
    """A result and its body as published."""

    result: LlmCallResult
    data: bytes


@dataclass(frozen=True, slots=True)
class _Chat:
    """A call answered by upstream: its `chat` span (open; `ended_ns` is its end) and its result."""

    span: trace.Span
    ended_ns: int
    request: LlmCallRequest
    result: LlmCallResult


class _Chunks:
    """A streamed call's events, published in order as `LlmStreamChunk`s (`seq` from 1).

    The first text delta goes out at once; later ones are held at most `coalesce_s` and sent
    together. Tool uses, usage and the terminal event go out whole, after the text before them.
    The chunks are for people following the call: one that cannot be published is logged and the
    rest of the call's are dropped (the result still comes).
    """

    def __init__(self, nc: Client, request: LlmCallRequest, coalesce_s: float) -> None:
        self._nc = nc
        self._subject = subjects.llm_stream(request.case_key, request.call_id)
        self._request = request
        self._coalesce_s = coalesce_s
        self._seq = 0
        self._held: list[str] = []
        self._text_sent = False
        self._lock = asyncio.Lock()
        self._timer: asyncio.Task[None] | None = None
        self._broken = False

    async def send(self, event: LlmStreamEvent) -> None:
        if isinstance(event, TextDelta) and self._text_sent and self._coalesce_s > 0:
            self._held.append(event.text)
            if self._timer is None:
                self._timer = asyncio.create_task(self._flush_later())
            return
        async with self._lock:
            await self._flush()
            await self._publish(event)
            self._text_sent = self._text_sent or isinstance(event, TextDelta)

    async def close(self) -> None:
        """Send what is held (the stream ended or failed), and stop the timer."""
        async with self._lock:
            await self._flush()
        if self._timer is not None:
            self._timer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._timer

    async def _flush_later(self) -> None:
        await asyncio.sleep(self._coalesce_s)
        async with self._lock:
            self._timer = None
            await self._flush()

    async def _flush(self) -> None:
        if self._held:
            text, self._held = "".join(self._held), []
            await self._publish(TextDelta(text=text))

    async def _publish(self, event: LlmStreamEvent) -> None:
        if self._broken:
            return
        self._seq += 1
        chunk = LlmStreamChunk(
            call_id=self._request.call_id,
            case_key=self._request.case_key,
            attempt=self._request.attempt,
            seq=self._seq,
            event=event,
        )
        try:
            # Core NATS: the stream stores it all the same, in publish order, and the reply (and
            # its result) does not wait a round trip per chunk for acknowledgements a follower
            # does not need.
            await publish_core(self._nc, self._subject, chunk)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._broken = True
            log.warning("call %s: its stream events are not published any more: %r", chunk.call_id, exc)


# A stream cut after its first delta is asked again (as a new attempt) for these classes.
_STREAM_AGAIN = frozenset({LlmErrorClass.TRANSIENT, LlmErrorClass.OVERLOADED})


def _refuse_unstorable(request: LlmCallRequest) -> None:
    """A call whose result could not be recorded: its `record` (which the result carries back,
    and a scheduler stores) holds a NUL character, which Postgres refuses. No scheduler sends
    one; it is dead-lettered `unstorable` without being sent upstream. (A `call_id` is a plain
    token: the schema refuses a NUL there.)"""
    if "\x00" in request.record:
        raise RejectMessage.because(
            DeadLetterReason.UNSTORABLE,
            "the model call was not sent upstream: its record holds a NUL character (\\u0000), "
            "so no scheduler could record its result",
            case_key=request.case_key,
        )


def _quiet_sdk_logs() -> None:
    """Keep the SDKs' debug logs, which hold prompts, out of the log (unless prompts are recorded)."""
    for name in _SDK_LOGGERS:
        logger = logging.getLogger(name)
        if logger.getEffectiveLevel() < logging.INFO:
            logger.setLevel(logging.INFO)


def _mark_ready(path: str | None, *, ready: bool) -> None:
    """Write the ready file (the pid), or remove it."""
    if path and ready:
        Path(path).write_text(f"{os.getpid()}\n")
    elif path:
        Path(path).unlink(missing_ok=True)


def _msg_id(call_id: str, attempt: int) -> str:
    return f"{call_id}:{attempt}"


def _prompt_json(request: LlmRequest) -> str:
    messages = [m.model_dump(mode="json") for m in request.messages]
    if request.system_prompt:
        messages.insert(0, {"role": "system", "content": request.system_prompt})
    return json.dumps(messages)
