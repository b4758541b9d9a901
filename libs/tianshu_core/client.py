"""`TianshuClient`: start cases, publish events, read cases and await their outcome over NATS.

It talks to the scheduler service only through the subjects of `tianshu_contracts.subjects`:
requests on `tianshu.v1.rpc.…`, JetStream publishes for what must not be lost (fire-and-forget
starts, events, commands), core subscriptions for the `updated` and `finished` notifications, and
an ephemeral consumer of TIANSHU_LLM_STREAM to follow a case's model calls as they stream.

    async with TianshuClient.connect("nats://127.0.0.1:4222") as client:
        done = await client.run("approval", {"title": "Budget"}, timeout=60)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Generator, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal, TypeVar, overload

import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.api import DeliverPolicy
from pydantic import BaseModel, JsonValue, TypeAdapter, ValidationError

from tianshu_contracts import (
    CASE_FINISHED_ADAPTER,
    CASE_UPDATED_ADAPTER,
    GET_CASE_REPLY_ADAPTER,
    LIST_CASES_REPLY_ADAPTER,
    LLM_STREAM_CHUNK_ADAPTER,
    START_CASE_REPLY_ADAPTER,
    CancelCase,
    CaseFinished,
    CaseFound,
    CasesPage,
    CaseSummary,
    CaseUpdated,
    ExecutionState,
    GetCase,
    LifecycleState,
    ListCases,
    LlmStreamChunk,
    PauseCase,
    RequestRefused,
    ResumeCase,
    StartCase,
    StartCaseAccepted,
    WireError,
    subjects,
)

from . import serde
from .bus import NatsSettings, connect, publish, redact, request
from .errors import TianshuError
from .llm import LLM_RESULT_RESOURCE
from .tokens import require_plain
from .tools import TOOL_RESULT_RESOURCE

log = logging.getLogger(__name__)

T = TypeVar("T")

# While awaiting a case, read it again this often: a `finished` notification is core NATS and is
# lost if it is published while this client is reconnecting.
_RECHECK_S = 5.0
# A follower that has seen its case end still takes the stream events stored before the end; it
# gives up on that after this long without one arriving.
_DRAIN_QUIET_S = 2.0
# How long the server keeps a follower's consumer after the follower vanished without removing it.
_FOLLOW_INACTIVE_S = 30.0


class RequestRefusedError(TianshuError):
    """The scheduler answered a request with a refusal (unknown workflow, invalid input, ...).

    `error` is the refusal as it came over the wire; `error.code` says why (`unknown_workflow`...).
    """

    code = "request_refused"

    def __init__(self, subject: str, error: WireError) -> None:
        super().__init__(f"the scheduler refused the request on {subject}: {error.message}")
        self.subject = subject
        self.error = error

    @property
    def refusal_code(self) -> str | None:
        """The refusal's own code: `unknown_workflow`, `case_exists`, `schema_invalid`..."""
        return self.error.code


class SchedulerUnavailableError(TianshuError):
    """No scheduler answered a request, or no stream took a publish (none was ever started)."""

    code = "scheduler_unavailable"
    retryable = True


class CaseWaitTimeoutError(TianshuError, TimeoutError):
    """A case did not finish within the time a client was willing to wait (it goes on running)."""

    code = "case_wait_timeout"
    retryable = True

    def __init__(self, case_key: str, timeout: float, last_seen: CaseSummary | None) -> None:
        state = (
            f"it is {last_seen.execution_state} ({last_seen.lifecycle_state})"
            if last_seen is not None
            else "no such case existed when the wait began"
        )
        super().__init__(f"case {case_key!r} did not finish within {timeout:g} s; {state}")
        self.case_key = case_key
        self.timeout = timeout
        self.last_seen = last_seen


@dataclass(frozen=True, slots=True)
class PublishReceipt:
    """JetStream stored the message (`duplicate`: it had one with this `msg_id` already)."""

    subject: str
    stream: str
    seq: int
    msg_id: str | None
    duplicate: bool


class TianshuClient:
    """A client of the scheduler service over NATS. Open it with `connect`; close it when done.

    Requests (`start_case`, `get_case`) need a running scheduler; JetStream publishes (events,
    commands, `start_case(wait_reply=False)`) need only the streams a scheduler created once, and
    wait there for one.
    """

    def __init__(self, nc: Client, *, request_timeout_s: float = 5.0, owns_connection: bool = False) -> None:
        """Wrap a connected nats-py client (closed by `close()` only when `owns_connection`)."""
        self.nc = nc
        self.request_timeout_s = request_timeout_s
        self._js = nc.jetstream(timeout=request_timeout_s)
        self._owns = owns_connection

    @classmethod
    def connect(cls, server: NatsSettings | str | Client | None = None) -> _Connecting:
        """Connect (awaitable, or an async context manager that closes the client at its end).

        `server` is `NatsSettings`, a URL (the other settings still come from `TIANSHU_NATS_*`), an
        already connected nats-py client (left open by `close()`), or None for the environment.
        """
        return _Connecting(cls, server)

    async def close(self) -> None:
        """Close the connection if this client opened it."""
        if self._owns and not self.nc.is_closed:
            await self.nc.close()

    async def __aenter__(self) -> TianshuClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    # -- starting cases -----------------------------------------------------------------------

    @overload
    async def start_case(
        self,
        workflow_code: str,
        input: JsonValue = None,
        *,
        case_key: str | None = None,
        session_id: str | None = None,
        wait_reply: Literal[True] = True,
        msg_id: str | None = None,
    ) -> StartCaseAccepted: ...

    @overload
    async def start_case(
        self,
        workflow_code: str,
        input: JsonValue = None,
        *,
        case_key: str | None = None,
        session_id: str | None = None,
        wait_reply: Literal[False],
        msg_id: str | None = None,
    ) -> PublishReceipt: ...

    async def start_case(
        self,
        workflow_code: str,
        input: JsonValue = None,
        *,
        case_key: str | None = None,
        session_id: str | None = None,
        wait_reply: bool = True,
        msg_id: str | None = None,
    ) -> StartCaseAccepted | PublishReceipt:
        """Create a case of `workflow_code` and have it run; idempotent on `case_key`.

        By default a request: the scheduler's answer comes back (`created` is False for a repeat),
        a refusal raises `RequestRefusedError`. With `wait_reply=False` the start is published to
        the `TIANSHU_CASES` stream with `Nats-Msg-Id` = `msg_id` (generated when not given) and
        this returns once the stream stored it; a refusal then goes to the dead-letter stream.
        Without a case key, the scheduler derives one from `msg_id`, so a retry starts nothing twice.
        """
        if case_key is not None:
            require_plain(case_key, "case key")
        message = StartCase(
            workflow_code=workflow_code, case_key=case_key, session_id=session_id, input=input
        )
        if wait_reply:
            headers = {subjects.HEADER_MSG_ID: msg_id} if msg_id is not None else None
            reply = await self._ask(subjects.RPC_CASES_START, message, START_CASE_REPLY_ADAPTER, headers)
            if isinstance(reply, RequestRefused):
                raise RequestRefusedError(subjects.RPC_CASES_START, reply.error)
            return reply
        return await self._publish(
            subjects.CASES_START, message, msg_id or uuid.uuid4().hex, subjects.STREAM_CASES
        )

    async def run(
        self,
        workflow_code: str,
        input: JsonValue = None,
        *,
        timeout: float | None = None,  # noqa: ASYNC109 - see wait_for_case
        case_key: str | None = None,
        session_id: str | None = None,
    ) -> CaseFinished:
        """Start a case and wait for its outcome (`start_case`, then `wait_for_case`)."""
        accepted = await self.start_case(workflow_code, input, case_key=case_key, session_id=session_id)
        return await self.wait_for_case(accepted.case_key, timeout=timeout)

    # -- events and commands ------------------------------------------------------------------

    async def publish_event(
        self, resource_type: str, resource_id: str, payload: Any = None, *, event_id: str | None = None
    ) -> PublishReceipt:
        """Publish an event on `tianshu.v1.events.<resource_type>.<resource_id>` (JetStream).

        `payload` is any JSON-serialisable value (pydantic models and datetimes too). `event_id`
        becomes `Nats-Msg-Id`: a repeat wakes nobody twice, within the engine's event retention.
        """
        subject = subjects.event(require_plain(resource_type, "resource type"), resource_id)
        body = serde.dumps(payload).encode()
        return await self._publish(subject, body, event_id, subjects.STREAM_EVENTS)

    async def cancel(self, case_key: str, *, reason: str | None = None) -> PublishReceipt:
        """Ask for a case to stop for good at its next step boundary (a waiting case stops at once)."""
        return await self._command(CancelCase(case_key=self._key(case_key), reason=reason))

    async def pause(self, case_key: str, *, reason: str | None = None) -> PublishReceipt:
        """Hold a case: it runs no further until resumed (events still reach it)."""
        return await self._command(PauseCase(case_key=self._key(case_key), reason=reason))

    async def resume(self, case_key: str, *, reason: str | None = None) -> PublishReceipt:
        """Let a paused case run again."""
        return await self._command(ResumeCase(case_key=self._key(case_key), reason=reason))

    # -- reading cases ------------------------------------------------------------------------

    async def get_case(self, case_key: str) -> CaseSummary | None:
        """The case as the scheduler reads it from Postgres, or None when no case has this key."""
        reply = await self._ask(
            subjects.RPC_CASES_GET, GetCase(case_key=self._key(case_key)), GET_CASE_REPLY_ADAPTER
        )
        if isinstance(reply, RequestRefused):
            raise RequestRefusedError(subjects.RPC_CASES_GET, reply.error)
        return reply.case if isinstance(reply, CaseFound) else None

    async def list_cases(
        self,
        *,
        session_id: str | None = None,
        workflow_code: str | None = None,
        execution_state: ExecutionState | None = None,
        lifecycle_state: LifecycleState | None = None,
        parent_key: str | None = None,
        limit: int = 50,
        cursor: str | None = None,
    ) -> CasesPage:
        """A page of the matching cases, oldest first, as a scheduler reads them from Postgres.

        Pass the page's `next_cursor` as `cursor` for the next one (None on the last page); each
        page costs the same however deep. The summaries leave out input, output and usage
        (`get_case` has them). RequestRefusedError (code `invalid_cursor`) for a cursor that no
        listing returned."""
        request = ListCases(
            session_id=session_id,
            workflow_code=workflow_code,
            execution_state=execution_state,
            lifecycle_state=lifecycle_state,
            parent_key=parent_key,
            limit=limit,
            cursor=cursor,
        )
        reply = await self._ask(subjects.RPC_CASES_LIST, request, LIST_CASES_REPLY_ADAPTER)
        if isinstance(reply, RequestRefused):
            raise RequestRefusedError(subjects.RPC_CASES_LIST, reply.error)
        return reply

    async def wait_for_case(
        self,
        case_key: str,
        *,
        timeout: float | None = None,  # noqa: ASYNC109 - its error carries the case's last state
    ) -> CaseFinished:
        """Wait until the case finished, failed or was cancelled; its outcome.

        Subscribes to the case's `finished` notification first, then reads the case, so a case
        that ended before the call returns at once and one that ends meanwhile is not missed.
        A case that does not exist yet (a fire-and-forget start in flight) is waited for too.
        `timeout` (seconds; None waits without limit) raises `CaseWaitTimeoutError`.
        """
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        sub = await self.nc.subscribe(subjects.case_finished(self._key(case_key)))
        try:
            seen = await self.get_case(case_key)
            while seen is None or not _is_over(seen):
                left = _RECHECK_S if deadline is None else min(_RECHECK_S, deadline - loop.time())
                if left <= 0:
                    assert timeout is not None
                    raise CaseWaitTimeoutError(case_key, timeout, seen)
                try:
                    msg = await sub.next_msg(timeout=left)
                except nats.errors.TimeoutError:
                    seen = await self._recheck(case_key, seen)
                    continue
                return CASE_FINISHED_ADAPTER.validate_json(msg.data)
            return _finished_from(seen)
        finally:
            with contextlib.suppress(nats.errors.Error):  # closed or draining: nothing to undo
                await sub.unsubscribe()

    # -- following a case ---------------------------------------------------------------------

    async def follow(
        self, case_key: str, *, until_done: bool = True
    ) -> AsyncGenerator[LlmStreamChunk | CaseUpdated, None]:
        """The case's streamed model call events and state changes, as they come.

        Subscribes to `tianshu.v1.cases.<case_key>.updated` (core NATS) and, through an ephemeral
        ordered consumer, to the case's subjects in TIANSHU_LLM_STREAM from the oldest event the
        stream still holds (it keeps minutes): a follower that joins during a call gets that
        call from its first delta. Each call's chunks come in order; a chunk of attempt N + 1
        after an incomplete `StreamError` means the partial text of attempt N is void.

        With `until_done` it ends once the case has finished, failed or been stopped, or waits on
        something other than a model or tool call (an event, a child, a timer), after the
        stream events stored before that, with that `CaseUpdated` last; a case that had already
        ended when the follow began (read from a scheduler, if one answers) ends it too.
        Without `until_done` it ends only when the caller stops iterating (close it, e.g. with
        `contextlib.aclosing`, to unsubscribe at once). Raises
        `SchedulerUnavailableError` when the server has no TIANSHU_LLM_STREAM stream.
        """
        key = self._key(case_key)
        queue: asyncio.Queue[tuple[LlmStreamChunk, Msg] | CaseUpdated] = asyncio.Queue()

        async def on_update(msg: Msg) -> None:
            try:
                queue.put_nowait(CASE_UPDATED_ADAPTER.validate_json(msg.data))
            except ValidationError:
                log.debug("ignoring an unreadable case update on %s", msg.subject)

        async def on_chunk(msg: Msg) -> None:
            try:
                queue.put_nowait((LLM_STREAM_CHUNK_ADAPTER.validate_json(msg.data), msg))
            except ValidationError:
                log.debug("ignoring an unreadable stream event on %s", msg.subject)

        updates = await self.nc.subscribe(subjects.case_updated(key), cb=on_update)
        checks: set[asyncio.Task[None]] = set()
        try:
            try:
                chunks = await self._js.subscribe(
                    subjects.llm_streams_of(key),
                    stream=subjects.STREAM_LLM_STREAM,
                    cb=on_chunk,
                    ordered_consumer=True,
                    deliver_policy=DeliverPolicy.ALL,
                    inactive_threshold=_FOLLOW_INACTIVE_S,
                )
            except nats.js.errors.NotFoundError as exc:
                raise SchedulerUnavailableError(
                    f"there is no {subjects.STREAM_LLM_STREAM} stream on {self._where()} (a "
                    "tianshu-scheduler creates it when it starts)"
                ) from exc

            def check() -> None:
                if not checks:
                    task = asyncio.create_task(self._put_if_over(key, queue))
                    checks.add(task)
                    task.add_done_callback(checks.discard)

            try:
                follower = _Follower(chunks, queue)
                if until_done:
                    check()  # it may have ended already
                while True:
                    item = await follower.next(recheck=until_done)
                    if item is None:  # quiet for a while: an update may have been lost, read it
                        check()
                        continue
                    if until_done and isinstance(item, CaseUpdated) and (_is_over(item) or _idle(item)):
                        async for chunk in follower.drain():
                            yield chunk
                        yield item
                        return
                    yield item
            finally:
                await self._remove(chunks)
        finally:
            for task in checks:
                task.cancel()
            with contextlib.suppress(nats.errors.Error):
                await updates.unsubscribe()

    async def _remove(self, sub: nats.js.JetStreamContext.PushSubscription) -> None:
        """Unsubscribe and delete the consumer (else the server keeps it `_FOLLOW_INACTIVE_S`)."""
        with contextlib.suppress(nats.errors.Error):
            await sub.unsubscribe()
        if not self.nc.is_connected:  # closed or reconnecting: leave it to the server
            return
        with contextlib.suppress(nats.errors.Error, nats.js.errors.Error):
            info = await sub.consumer_info()
            await self._js.delete_consumer(info.stream_name, info.name)

    async def _put_if_over(self, case_key: str, queue: asyncio.Queue[Any]) -> None:
        """Queue the case's state as a `CaseUpdated` if it has ended (no scheduler: nothing)."""
        try:
            case = await self.get_case(case_key)
        except (SchedulerUnavailableError, RequestRefusedError, nats.errors.Error) as exc:
            log.debug("reading case %s while following it: %s", case_key, exc)
            return
        if case is not None and _is_over(case):
            queue.put_nowait(
                CaseUpdated(
                    case_key=case.case_key,
                    session_id=case.session_id,
                    workflow_code=case.workflow_code,
                    execution_state=case.execution_state,
                    lifecycle_state=case.lifecycle_state,
                    updated_at=case.updated_at,
                )
            )

    # -- plumbing -----------------------------------------------------------------------------

    @staticmethod
    def _key(case_key: str) -> str:
        return require_plain(case_key, "case key")

    async def _recheck(self, case_key: str, seen: CaseSummary | None) -> CaseSummary | None:
        try:
            return await self.get_case(case_key) or seen
        except SchedulerUnavailableError as exc:  # a scheduler restarting: keep waiting
            log.debug("re-reading case %s: %s", case_key, exc)
            return seen

    async def _command(self, command: CancelCase | PauseCase | ResumeCase) -> PublishReceipt:
        subject = subjects.case_command(command.case_key)
        return await self._publish(subject, command, None, subjects.STREAM_CASES)

    def _where(self) -> str:
        url = self.nc.connected_url
        return redact(url.geturl()) if url is not None else "NATS"

    async def _ask(
        self,
        subject: str,
        message: BaseModel,
        reply: TypeAdapter[T],
        headers: Mapping[str, str] | None = None,
    ) -> T:
        try:
            return await request(
                self.nc, subject, message, reply, timeout_s=self.request_timeout_s, headers=headers
            )
        except nats.errors.NoRespondersError as exc:
            raise SchedulerUnavailableError(
                f"no scheduler serves {subject} on {self._where()}: is tianshu-scheduler running?"
            ) from exc
        except nats.errors.TimeoutError as exc:
            raise SchedulerUnavailableError(
                f"no scheduler answered on {subject} within {self.request_timeout_s:g} s "
                f"({self._where()}): is tianshu-scheduler running and keeping up?"
            ) from exc

    async def _publish(
        self, subject: str, payload: BaseModel | bytes, msg_id: str | None, stream: str
    ) -> PublishReceipt:
        try:
            ack = await publish(self._js, subject, payload, msg_id=msg_id, stream=stream)
        except nats.js.errors.NoStreamResponseError as exc:
            raise SchedulerUnavailableError(
                f"no JetStream stream takes {subject} on {self._where()}: the {stream} stream is "
                "missing (a tianshu-scheduler creates it when it starts)"
            ) from exc
        except nats.errors.TimeoutError as exc:
            raise SchedulerUnavailableError(
                f"JetStream did not acknowledge the publish on {subject} within "
                f"{self.request_timeout_s:g} s ({self._where()})"
            ) from exc
        return PublishReceipt(subject, ack.stream, ack.seq, msg_id, bool(ack.duplicate))


class _Connecting:
    """What `TianshuClient.connect` returns: await it, or use it as an async context manager."""

    def __init__(self, cls: type[TianshuClient], server: NatsSettings | str | Client | None) -> None:
        self._cls = cls
        self._server = server
        self._client: TianshuClient | None = None

    async def _open(self) -> TianshuClient:
        if isinstance(self._server, Client):
            return self._cls(self._server)
        settings = NatsSettings(url=self._server) if isinstance(self._server, str) else self._server
        settings = settings or NatsSettings()
        nc = await connect(settings, name=settings.name or "tianshu-client")
        return self._cls(nc, request_timeout_s=settings.request_timeout_s, owns_connection=True)

    def __await__(self) -> Generator[Any, None, TianshuClient]:
        return self._open().__await__()

    async def __aenter__(self) -> TianshuClient:
        self._client = await self._open()
        return self._client

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._client is not None:
            await self._client.close()


class _Follower:
    """The queue `follow` reads, and where its stream consumer stands."""

    def __init__(
        self,
        chunks: nats.js.JetStreamContext.PushSubscription,
        queue: asyncio.Queue[tuple[LlmStreamChunk, Msg] | CaseUpdated],
    ) -> None:
        self._chunks = chunks
        self._queue = queue
        # The consumer (ordered consumers are re-created after a gap) and its delivery sequence
        # of the last chunk taken from the queue.
        self._consumer: str | None = None
        self._delivered = 0

    def _take(self, item: tuple[LlmStreamChunk, Msg] | CaseUpdated) -> LlmStreamChunk | CaseUpdated:
        if isinstance(item, CaseUpdated):
            return item
        chunk, msg = item
        with contextlib.suppress(ValueError, IndexError):  # no JetStream metadata: nothing to track
            meta = msg.metadata
            self._consumer, self._delivered = meta.consumer, meta.sequence.consumer
        return chunk

    async def next(self, *, recheck: bool) -> LlmStreamChunk | CaseUpdated | None:
        """The next item; None after `_RECHECK_S` without one, when `recheck`."""
        if not recheck:
            return self._take(await self._queue.get())
        try:
            return self._take(await asyncio.wait_for(self._queue.get(), _RECHECK_S))
        except TimeoutError:
            return None

    async def drain(self) -> AsyncIterator[LlmStreamChunk]:
        """The chunks the consumer has yet to hand over of those stored by now (updates that
        come meanwhile are dropped: the case has ended)."""
        while not await self._caught_up():
            try:
                item = await asyncio.wait_for(self._queue.get(), _DRAIN_QUIET_S)
            except TimeoutError:
                log.debug("gave up waiting for the last stream events of the followed case")
                return
            taken = self._take(item)
            if isinstance(taken, LlmStreamChunk):
                yield taken
        while not self._queue.empty():
            taken = self._take(self._queue.get_nowait())
            if isinstance(taken, LlmStreamChunk):
                yield taken

    async def _caught_up(self) -> bool:
        """The consumer has nothing left to deliver and delivered nothing this has not taken."""
        if not self._queue.empty():
            return False
        try:
            info = await self._chunks.consumer_info()
        except (nats.errors.Error, nats.js.errors.Error) as exc:  # e.g. being re-created
            log.debug("reading the follower's consumer: %s", exc)
            return False
        taken = self._delivered if info.name == self._consumer else 0
        delivered = info.delivered.consumer_seq if info.delivered is not None else None
        return not info.num_pending and (delivered or 0) <= taken


def _is_over(case: CaseSummary | CaseUpdated) -> bool:
    return case.execution_state in ("finished", "failed") or case.lifecycle_state == "stop"


# What a case waits for while a model or a tool answers it: a follower goes on through those waits.
_CALLS = frozenset({LLM_RESULT_RESOURCE, TOOL_RESULT_RESOURCE})


def _idle(update: CaseUpdated) -> bool:
    """The case waits on something other than a model or tool call (an outside event, a child, a
    timer): nothing more will stream until that comes."""
    return update.execution_state == "waiting" and not (
        update.waiting_on and set(update.waiting_on) <= _CALLS
    )


def _finished_from(case: CaseSummary) -> CaseFinished:
    """The `CaseFinished` the scheduler published (or would have) for a case read after it ended."""
    return CaseFinished(
        case_key=case.case_key,
        session_id=case.session_id,
        workflow_code=case.workflow_code,
        execution_state=case.execution_state,
        lifecycle_state=case.lifecycle_state,
        finished_type=case.finished_type,
        description=case.finished_description,
        output=case.output,
        error=case.error,
        finished_at=case.updated_at,
    )
