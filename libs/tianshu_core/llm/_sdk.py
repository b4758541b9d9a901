"""What the vendor providers share: API keys tried in turn, a concurrency limit, error classes,
redaction, streams that always end in `Done` or `StreamError`, and a span per call."""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import logging
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, Generic, Self, TypedDict, TypeVar

import httpx2
from opentelemetry import trace

from tianshu_contracts.llm import (
    Done,
    LlmErrorClass,
    LlmRequest,
    LlmResponse,
    LlmStreamEvent,
    StreamError,
    TextDelta,
    ToolUse,
)

from .. import telemetry
from ._errors import LlmError, redact
from ._provider import LlmInvocation

log = logging.getLogger(__name__)

Client = TypeVar("Client")

DEFAULT_TIMEOUT_S = 120.0

# How a status reads when the body says nothing more precise.
_STATUS_CLASSES: Mapping[int, LlmErrorClass] = {
    401: LlmErrorClass.CREDENTIALS,
    403: LlmErrorClass.CREDENTIALS,
    408: LlmErrorClass.TRANSIENT,
    429: LlmErrorClass.OVERLOADED,
    500: LlmErrorClass.TRANSIENT,
    502: LlmErrorClass.TRANSIENT,
    503: LlmErrorClass.OVERLOADED,
    504: LlmErrorClass.TRANSIENT,
    529: LlmErrorClass.OVERLOADED,
}
_QUOTA_WORDS = ("insufficient_quota", "quota", "credit balance", "billing")
_TOO_LONG_WORDS = (
    "context_length_exceeded",
    "prompt is too long",
    "maximum context length",
    "context window",
    "too many tokens",
)


def status_class(status: int | None, text: str) -> LlmErrorClass:
    """The class of an upstream failure from its status and its error body's text (lower-cased)."""
    if status == 429 and any(word in text for word in _QUOTA_WORDS):
        return LlmErrorClass.QUOTA_EXHAUSTED
    if status in (400, 413, 422) and any(word in text for word in _TOO_LONG_WORDS):
        return LlmErrorClass.PROMPT_TOO_LONG
    if status == 400 and "credit balance" in text:
        return LlmErrorClass.QUOTA_EXHAUSTED
    if status is None:
        # An error inside a 200 stream: its type says what it is.
        if "overloaded" in text or "rate_limit" in text:
            return LlmErrorClass.OVERLOADED
        if "invalid_request" in text:
            return LlmErrorClass.FATAL
        return LlmErrorClass.TRANSIENT
    return _STATUS_CLASSES.get(status, LlmErrorClass.FATAL if status < 500 else LlmErrorClass.TRANSIENT)


def retry_after(headers: Mapping[str, str] | None) -> float | None:
    """The wait a response asked for: `retry-after-ms`, else `Retry-After` (seconds or a date)."""
    if not headers:
        return None
    lowered = {k.lower(): v for k, v in headers.items()}
    ms = lowered.get("retry-after-ms")
    if ms:
        with contextlib.suppress(ValueError):
            return max(0.0, float(ms) / 1000)
    value = lowered.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    with contextlib.suppress(TypeError, ValueError):
        when = email.utils.parsedate_to_datetime(value)
        return max(0.0, (when - datetime.now(UTC)).total_seconds())
    return None


def transport_error(exc: BaseException) -> LlmError:
    """A request that got no whole reply, `transient`: "timed out", or "connection failed" named
    after its innermost cause (the SDKs' aiohttp transport reports a connection the server
    dropped as a timeout; its cause says what happened)."""
    root = exc
    for _ in range(10):
        cause = root.__cause__ or root.__context__
        if cause is None or cause is root:
            break
        root = cause
    if isinstance(root, TimeoutError | httpx2.TimeoutException):
        return LlmError("timed out", error_class=LlmErrorClass.TRANSIENT)
    detail = f"{type(root).__name__}: {root}" if root is not exc else str(exc)
    return LlmError(f"connection failed: {detail}", error_class=LlmErrorClass.TRANSIENT)


class SdkOptions(TypedDict, total=False):
    """What an `SdkProvider` takes besides its name and keys (their meaning is told there)."""

    base_url: str | None
    model: str | None
    max_concurrency: int | None
    limit: asyncio.Semaphore | None
    timeout_s: float
    context_window: int | None


class SdkProvider(ABC, Generic[Client]):
    """A provider on a vendor's official async SDK, with the SDK's own retries off.

    `name` names it in errors and spans; `model`, when given, is the upstream model asked for
    (else the request's); `api_keys` are tried in turn (a refused key moves to the next at once;
    all refused is one `LlmError` of class `credentials`); `max_concurrency` bounds the calls in
    flight in this process, or `limit`, a semaphore shared with other providers (the models of
    one vendor account, say), bounds them together; `context_window` (tokens) lets a fallback
    chain skip this provider for a request that cannot fit.
    """

    kind = "sdk"

    def __init__(
        self,
        *,
        name: str,
        api_keys: Sequence[str],
        base_url: str | None = None,
        model: str | None = None,
        max_concurrency: int | None = None,
        limit: asyncio.Semaphore | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        context_window: int | None = None,
    ) -> None:
        keys = [k for k in api_keys if k]
        if not keys:
            raise ValueError(f"provider {name!r}: at least one API key is needed")
        if max_concurrency is not None and max_concurrency < 1:
            raise ValueError(f"provider {name!r}: max_concurrency must be at least 1")
        if max_concurrency is not None and limit is not None:
            raise ValueError(f"provider {name!r}: give max_concurrency or a shared limit, not both")
        self.name = name
        self.base_url = base_url
        self.model = model
        self.timeout_s = timeout_s
        self.context_window = context_window
        self.max_concurrency = max_concurrency
        self._keys = keys
        self._clients = [self._client(key) for key in keys]
        self._current = 0  # the key that answered last
        self.limit = limit or (asyncio.Semaphore(max_concurrency) if max_concurrency else None)
        """What bounds this provider's calls in flight (None: nothing); give it to another
        provider as its `limit` to share it."""

    def __repr__(self) -> str:  # never the keys
        return (
            f"{type(self).__name__}(name={self.name!r}, base_url={self.base_url!r}, keys={len(self._keys)})"
        )

    async def aclose(self) -> None:
        """Close the SDK clients (their HTTP connection pools)."""
        for client in self._clients:
            await client.close()  # type: ignore[attr-defined]

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    @abstractmethod
    def _client(self, api_key: str) -> Client:
        """The SDK client for one key (retries off)."""

    @abstractmethod
    async def _complete(self, client: Client, request: LlmRequest, model: str) -> LlmResponse:
        """One call with one key; SDK exceptions propagate."""

    @abstractmethod
    def _stream(self, client: Client, request: LlmRequest, model: str) -> AsyncIterator[LlmStreamEvent]:
        """One streamed call with one key: deltas, tool uses, usage, then `Done`; SDK exceptions
        (and `LlmError`) propagate."""

    @abstractmethod
    def _classify(self, exc: Exception) -> LlmError:
        """The `LlmError` of an SDK exception (its text not yet redacted)."""

    # -- the public calls ---------------------------------------------------------------------

    def upstream_model(self, request: LlmRequest) -> str:
        """The model this provider asks for a request."""
        return self.model or request.model

    def error(self, exc: BaseException) -> LlmError:
        """`exc` as this provider's `LlmError`, with every key redacted from its text."""
        if isinstance(exc, LlmError):
            err = exc
        elif isinstance(exc, httpx2.TransportError):
            # A connection lost mid-stream: some SDK versions do not wrap it in their own error.
            err = transport_error(exc)
        elif isinstance(exc, Exception):
            err = self._classify(exc)
        else:
            err = LlmError(repr(exc), error_class=LlmErrorClass.FATAL)
        return err.but(message=redact(err.message, self._keys), provider=self.name)

    async def complete(self, request: LlmRequest, *, invocation: LlmInvocation | None = None) -> LlmResponse:
        """The model's reply; an `LlmError` (classified, redacted) when the call fails."""
        model = self.upstream_model(request)
        with _span(self, "complete", model, invocation) as span:
            async with self._slot():
                refused = 0
                while True:
                    index = self._current
                    try:
                        response = await self._complete(self._clients[index], request, model)
                    except asyncio.CancelledError:
                        raise
                    except Exception as exc:
                        err = self.error(exc)
                        if err.error_class is LlmErrorClass.CREDENTIALS and refused + 1 < len(self._keys):
                            refused += 1
                            self._next_key(index, span)
                            continue
                        if err.error_class is LlmErrorClass.CREDENTIALS:
                            err = self._all_refused(err)
                        _record_error(span, err)
                        raise err from None
                    response = response.model_copy(update={"provider": self.name, "model": model})
                    _record_usage(span, response)
                    return response

    async def stream(
        self, request: LlmRequest, *, invocation: LlmInvocation | None = None
    ) -> AsyncIterator[LlmStreamEvent]:
        """The reply as events, always ending with `Done` or `StreamError`; a failure after the
        first delta is a `StreamError` with `incomplete=True`."""
        model = self.upstream_model(request)
        with _span(self, "stream", model, invocation, current=False) as span:
            async with self._slot():
                refused = 0
                while True:
                    index = self._current
                    delivered = False
                    finished = False
                    try:
                        async for event in self._stream(self._clients[index], request, model):
                            if isinstance(event, TextDelta | ToolUse):
                                delivered = True
                            finished = isinstance(event, Done)
                            yield event
                            if finished:
                                return
                        raise LlmError(
                            "the stream ended without a finish reason", error_class=LlmErrorClass.TRANSIENT
                        )
                    except asyncio.CancelledError:
                        raise
                    except GeneratorExit:
                        raise
                    except Exception as exc:
                        err = self.error(exc)
                        if not delivered and err.error_class is LlmErrorClass.CREDENTIALS:
                            if refused + 1 < len(self._keys):
                                refused += 1
                                self._next_key(index, span)
                                continue
                            err = self._all_refused(err)
                        _record_error(span, err)
                        yield err.stream_error(incomplete=delivered)
                        return

    # -- helpers ------------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _slot(self) -> AsyncIterator[None]:
        if self.limit is None:
            yield
            return
        async with self.limit:
            yield

    def _next_key(self, refused: int, span: trace.Span) -> None:
        if self._current == refused:
            self._current = (refused + 1) % len(self._keys)
        log.warning(
            "provider %s: API key %d of %d refused; trying the next", self.name, refused + 1, len(self._keys)
        )
        # Which key, by position: never the key itself.
        span.add_event(
            "api key refused", {"tianshu.llm.key_index": refused + 1, "tianshu.llm.keys": len(self._keys)}
        )

    def _all_refused(self, last: LlmError) -> LlmError:
        n = len(self._keys)
        what = "its API key was refused" if n == 1 else f"all {n} of its API keys were refused"
        return LlmError(
            f"{what} ({last.status or 'no status'}): {last.message}",
            error_class=LlmErrorClass.CREDENTIALS,
            provider=self.name,
            status=last.status,
        )


@contextlib.contextmanager
def _span(
    provider: SdkProvider[Any],
    operation: str,
    model: str,
    invocation: LlmInvocation | None,
    *,
    current: bool = True,
) -> Iterator[trace.Span]:
    """A span over one call. A stream's is not made current: its generator yields into the
    caller's code, where a context it attached could not be detached cleanly."""
    attributes: dict[str, str | int] = {
        "gen_ai.system": provider.kind,
        "gen_ai.operation.name": "chat",
        "gen_ai.request.model": model,
        "tianshu.llm.provider": provider.name,
        "tianshu.llm.operation": operation,
    }
    if invocation is not None:
        attributes["tianshu.case_key"] = invocation.case_key
        attributes["tianshu.llm.call_id"] = invocation.call_id
    started = time.monotonic()
    span = telemetry.tracer.start_span(f"tianshu.llm.{provider.kind}", attributes=attributes)
    try:
        if current:
            with trace.use_span(
                span, end_on_exit=False, record_exception=False, set_status_on_exception=False
            ):
                yield span
        else:
            yield span
    finally:
        span.set_attribute("tianshu.llm.duration_ms", int((time.monotonic() - started) * 1000))
        span.end()


def _record_error(span: trace.Span, err: LlmError) -> None:
    span.set_attribute("tianshu.llm.error_class", err.error_class.value)
    if err.status is not None:
        span.set_attribute("http.response.status_code", err.status)
    span.set_status(trace.Status(trace.StatusCode.ERROR, str(err)[:300]))


def _record_usage(span: trace.Span, response: LlmResponse) -> None:
    span.set_attribute("gen_ai.usage.input_tokens", response.usage.prompt_tokens)
    span.set_attribute("gen_ai.usage.output_tokens", response.usage.completion_tokens)
    if response.finish_reason:
        span.set_attribute("gen_ai.response.finish_reasons", [response.finish_reason])


def stream_error_text(event: StreamError) -> str:
    """A stream error's message (for logs)."""
    return event.error.message
