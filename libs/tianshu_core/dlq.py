"""The dead-letter queue: read the `TIANSHU_DLQ` stream, and send its letters back where they came from.

A letter's id is its sequence number in `TIANSHU_DLQ`. Reading uses a short-lived ephemeral pull
consumer (no acks, filtered by origin) and the `STREAM.MSG.GET` API, both of which nats-server 2.9
has. Replaying publishes a letter's original payload with its original headers on its original
subject, then deletes the letter, so replaying everything twice sends nothing the second time.
"""

from __future__ import annotations

import contextlib
import enum
import json
import re
import textwrap
import unicodedata
import uuid
from collections.abc import AsyncGenerator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import nats.errors
from nats.aio.client import Client
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, PubAck, StreamInfo
from nats.js.errors import APIError, NoStreamResponseError, NotFoundError
from pydantic import ValidationError

from tianshu_contracts import (
    DEAD_LETTER_ADAPTER,
    TOOL_CALL_REQUEST_ADAPTER,
    DeadLetter,
    ToolCallRequest,
    subjects,
)

from .errors import TianshuError

DLQ_PREFIX = f"{subjects.PREFIX}.dlq."
"""What every dead letter's subject starts with; the rest is its origin."""

_ROOT = f"{subjects.PREFIX}."
_FETCH_BATCH = 256
# Ephemeral consumers of a listing that dies half-way are removed by the server after this long.
_INACTIVE_THRESHOLD_S = 60.0
# `--since` filters on the letter's own time; the server-side start time leaves room for clock skew.
_SINCE_SLACK = timedelta(hours=1)
# Conditions on the stream's state when the message was first published: a replay cannot meet them.
_DROPPED_HEADER_PREFIX = "nats-expected-last-"
_DURATION = re.compile(r"(?:\d+(?:\.\d+)?[smhdw])+")
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)([smhdw])")
_UNIT_S = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 7 * 86400.0}


class DeadLetterQueueError(TianshuError):
    """The DLQ cannot be read here: the server has no `TIANSHU_DLQ` stream."""

    code = "dead_letter_queue"


def origin_pattern(origin: str) -> str:
    """`origin` as a subject pattern without `tianshu.v1.` (which may be given or not).

    `events.>` and `tools.calls.search` stay as they are; `tianshu.v1.events.>` becomes `events.>`.
    ValueError when it is not a NATS subject or subject pattern.
    """
    text = origin.strip()
    for prefix in (DLQ_PREFIX, _ROOT):
        if text.startswith(prefix):
            text = text[len(prefix) :]
            break
    tokens = text.split(".")
    bad = (
        not text
        or any(not t or any(c.isspace() for c in t) for t in tokens)
        or any(len(t) > 1 and ("*" in t or ">" in t) for t in tokens)
        or ">" in tokens[:-1]
    )
    if bad:
        raise ValueError(f"{origin!r} is not a subject or subject pattern (events.>, tools.calls.search)")
    return text


def origin_matches(pattern: str, origin: str) -> bool:
    """NATS matching, where a pattern without a final `>` also takes the subjects below it."""
    return subjects.matches(pattern, origin) or (
        not pattern.endswith(">") and subjects.matches(f"{pattern}.>", origin)
    )


def _filter_subject(pattern: str | None) -> str:
    # One filter subject (2.9 has no multiple filters), as narrow as the pattern allows;
    # `origin_matches` then keeps exactly what the pattern means.
    if pattern is None:
        return subjects.DEAD_LETTERS
    tokens = pattern.split(".")
    if tokens[-1] == ">":
        return DLQ_PREFIX + pattern
    return DLQ_PREFIX + ".".join([*tokens[:-1], ">"])


def parse_since(text: str, now: datetime) -> datetime:
    """An ISO-8601 time (UTC when it names no zone) or a duration back from `now` (`90s`, `10m`, `1h30m`)."""
    value = text.strip()
    if _DURATION.fullmatch(value):
        seconds = sum(float(n) * _UNIT_S[unit] for n, unit in _DURATION_PART.findall(value))
        return now - timedelta(seconds=seconds)
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        raise ValueError(
            f"{text!r} is neither an ISO-8601 time (2024-05-01T12:00:00Z) nor a duration (10m, 2h, 1d)"
        ) from None
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)


@dataclass(frozen=True, slots=True)
class StoredLetter:
    """One message of the DLQ stream: its id, and the dead letter it holds (None when unreadable)."""

    id: int
    dlq_subject: str
    stored_at: datetime | None
    letter: DeadLetter | None
    problem: str | None = None

    @property
    def origin(self) -> str:
        """The original subject without `tianshu.v1.` (`foreign.<subject>` for one outside it)."""
        return self.dlq_subject.removeprefix(DLQ_PREFIX)

    @property
    def time(self) -> datetime | None:
        """When it was dead-lettered (when it was stored, for an unreadable one)."""
        return self.letter.dead_lettered_at if self.letter is not None else self.stored_at

    def to_json(self) -> dict[str, Any]:
        """The letter's fields and its `id`; `problem` and the DLQ subject for an unreadable one."""
        if self.letter is None:
            stored = self.stored_at.isoformat() if self.stored_at is not None else None
            return {
                "id": self.id,
                "dlq_subject": self.dlq_subject,
                "stored_at": stored,
                "problem": self.problem,
            }
        return {"id": self.id, **self.letter.model_dump(mode="json")}

    @classmethod
    def parse(cls, seq: int, subject: str, data: bytes | None, stored_at: datetime | None) -> StoredLetter:
        """A DLQ message as a letter; an unreadable one keeps why in `problem`."""
        try:
            letter = DEAD_LETTER_ADAPTER.validate_json(data or b"")
        except ValidationError as exc:
            first = exc.errors(include_url=False, include_input=False)[0]
            where = ".".join(map(str, first["loc"]))
            problem = f"not a dead letter: {where + ': ' if where else ''}{first['msg']}"
            return cls(seq, subject, stored_at, None, problem)
        return cls(seq, subject, stored_at, letter)


class Outcome(enum.StrEnum):
    """What replaying one letter did."""

    REPLAYED = "replayed"
    """Published and acknowledged; the letter was deleted from the DLQ."""
    DUPLICATE = "duplicate"
    """The stream dropped it: its `Nats-Msg-Id` is still in the duplicate window. The letter stays."""
    REFUSED = "refused"
    """Not sent: truncated, an expired tool call (without `force`), or not a dead letter."""
    NOT_FOUND = "not_found"
    """No letter with that id."""
    FAILED = "failed"
    """The server did not take it (no stream captures its subject, too large, no ack in time)."""


@dataclass(frozen=True, slots=True)
class ReplayResult:
    """The outcome of replaying one letter; `subject` is where it was (or would have been) sent."""

    id: int
    subject: str | None
    outcome: Outcome
    detail: str | None = None

    @property
    def ok(self) -> bool:
        """Replayed, or a duplicate (nothing lost: the letter stays for a later replay)."""
        return self.outcome in (Outcome.REPLAYED, Outcome.DUPLICATE)

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "subject": self.subject, "outcome": self.outcome.value, "detail": self.detail}


def expired_call(letter: DeadLetter, now: datetime) -> ToolCallRequest | None:
    """The letter's tool call when it is one whose `deadline` has passed at `now`, else None."""
    if not subjects.matches(subjects.TOOL_CALLS, letter.subject):
        return None
    try:
        call = TOOL_CALL_REQUEST_ADAPTER.validate_json(letter.raw_payload())
    except ValidationError:
        return None
    return call if call.deadline is not None and call.deadline <= now else None


def replay_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """The original headers (`Nats-Msg-Id` and trace context included), less `Nats-Expected-Last-*`,
    which were conditions on the stream's state at the first publication."""
    return {k: v for k, v in headers.items() if not k.lower().startswith(_DROPPED_HEADER_PREFIX)}


def _seconds(value: float) -> str:
    if value >= 3600 and value % 3600 == 0:
        return f"{value / 3600:g}h"
    if value >= 60 and value % 60 == 0:
        return f"{value / 60:g}m"
    return f"{value:g}s"


class DeadLetters:
    """The dead letters in `TIANSHU_DLQ`: list, get, replay. `timeout_s` bounds each server request."""

    def __init__(self, nc: Client, *, timeout_s: float = 5.0, stream: str = subjects.STREAM_DLQ) -> None:
        self._js = nc.jetstream(timeout=timeout_s)
        self._timeout_s = timeout_s
        self._stream = stream

    async def _stream_info(self) -> StreamInfo:
        try:
            return await self._js.stream_info(self._stream)
        except NotFoundError:
            raise DeadLetterQueueError(
                f"there is no {self._stream} stream on this NATS server: no Tianshu service has run "
                "against it yet (is TIANSHU_NATS_URL the right server?)"
            ) from None

    async def letters(
        self, *, origin: str | None = None, since: datetime | None = None
    ) -> AsyncGenerator[StoredLetter, None]:
        """The letters stored when the listing starts, oldest first; `origin` as in `origin_pattern`.

        Close it (`contextlib.aclosing`) when leaving early: it removes its consumer as it ends.
        """
        pattern = origin_pattern(origin) if origin is not None else None
        info = await self._stream_info()
        last_seq = info.state.last_seq
        if info.state.messages == 0:
            return
        name = f"tianshu-dlq-{uuid.uuid4().hex}"
        config = ConsumerConfig(
            name=name,
            filter_subject=_filter_subject(pattern),
            ack_policy=AckPolicy.NONE,
            deliver_policy=DeliverPolicy.ALL if since is None else DeliverPolicy.BY_START_TIME,
            opt_start_time=None if since is None else since - _SINCE_SLACK,
            inactive_threshold=_INACTIVE_THRESHOLD_S,
            mem_storage=True,
        )
        pending = (await self._js.add_consumer(self._stream, config)).num_pending or 0
        try:
            sub = await self._js.pull_subscribe_bind(consumer=name, stream=self._stream)
            try:
                while pending > 0:
                    try:
                        batch = await sub.fetch(min(pending, _FETCH_BATCH), timeout=self._timeout_s)
                    except nats.errors.TimeoutError:  # fewer than counted: some were deleted meanwhile
                        return
                    for msg in batch:
                        meta = msg.metadata
                        if meta.sequence.stream > last_seq:  # stored after we began: a replay's own
                            return
                        pending = meta.num_pending
                        stored = StoredLetter.parse(
                            meta.sequence.stream, msg.subject, msg.data, meta.timestamp
                        )
                        if pattern is not None and not origin_matches(pattern, stored.origin):
                            continue
                        when = stored.time
                        if since is not None and when is not None and when < since:
                            continue
                        yield stored
            finally:
                with contextlib.suppress(Exception):
                    await sub.unsubscribe()
        finally:
            with contextlib.suppress(Exception):  # else the server drops it after a minute
                await self._js.delete_consumer(self._stream, name)

    async def list_letters(
        self, *, origin: str | None = None, since: datetime | None = None
    ) -> list[StoredLetter]:
        """`letters()` as a list."""
        async with contextlib.aclosing(self.letters(origin=origin, since=since)) as letters:
            return [letter async for letter in letters]

    async def get(self, letter_id: int) -> StoredLetter | None:
        """The letter with this id, or None when there is none."""
        await self._stream_info()
        if letter_id < 1:
            return None
        try:
            raw = await self._js.get_msg(self._stream, letter_id)
        except NotFoundError:
            return None
        return StoredLetter.parse(letter_id, raw.subject or "", raw.data, raw.time)

    async def replay_each(
        self,
        letter_ids: Sequence[int] | None = None,
        *,
        origin: str | None = None,
        force: bool = False,
        now: datetime | None = None,
    ) -> AsyncGenerator[ReplayResult, None]:
        """Replay these letters, or (`letter_ids` None) every letter from `origin` (default: all),
        one by one, in order, yielding each outcome as it comes (see `replay_letter`)."""
        if letter_ids is None:
            async with contextlib.aclosing(self.letters(origin=origin)) as letters:
                async for stored in letters:
                    yield await self.replay_letter(stored, force=force, now=now)
            return
        for letter_id in dict.fromkeys(letter_ids):
            found = await self.get(letter_id)
            if found is None:
                yield ReplayResult(letter_id, None, Outcome.NOT_FOUND, f"no dead letter with id {letter_id}")
            else:
                yield await self.replay_letter(found, force=force, now=now)

    async def replay(
        self,
        letter_ids: Sequence[int] | None = None,
        *,
        origin: str | None = None,
        force: bool = False,
        now: datetime | None = None,
    ) -> list[ReplayResult]:
        """`replay_each()` as a list."""
        each = self.replay_each(letter_ids, origin=origin, force=force, now=now)
        async with contextlib.aclosing(each):
            return [result async for result in each]

    async def replay_letter(
        self, stored: StoredLetter, *, force: bool = False, now: datetime | None = None
    ) -> ReplayResult:
        """Publish the letter's payload and headers on its original subject, then delete the letter.

        Refused: a truncated payload (it cannot be sent as it was), and a tool call whose deadline
        has passed, unless `force`: then it goes with `deadline` null, its headers unchanged, and
        the tool runs although its case may already have been told the call failed. A duplicate
        (the `Nats-Msg-Id` is still in the stream's duplicate window) is not sent; the letter stays.
        """
        letter = stored.letter
        if letter is None:
            return ReplayResult(stored.id, None, Outcome.REFUSED, stored.problem)
        subject = letter.subject
        if letter.truncated:
            kept = len(letter.raw_payload())
            return ReplayResult(
                stored.id,
                subject,
                Outcome.REFUSED,
                f"truncated payload: the letter kept {kept} of its {letter.payload_size} bytes, "
                "so it cannot be sent as it was",
            )
        data = letter.raw_payload()
        forced = ""
        call = expired_call(letter, now or datetime.now(UTC))
        if call is not None:
            assert call.deadline is not None
            if not force:
                return ReplayResult(
                    stored.id,
                    subject,
                    Outcome.REFUSED,
                    f"expired tool call: its deadline {call.deadline.isoformat()} has passed, so its case "
                    "may already have been told it failed (--force sends it anyway)",
                )
            data = call.model_copy(update={"deadline": None}).model_dump_json().encode()
            forced = f" (forced: deadline {call.deadline.isoformat()} cleared)"
        try:
            ack = await self._js.publish(
                subject, data, timeout=self._timeout_s, headers=replay_headers(letter.headers) or None
            )
        except NoStreamResponseError:
            return ReplayResult(stored.id, subject, Outcome.FAILED, f"no stream captures {subject}")
        except APIError as exc:
            return ReplayResult(stored.id, subject, Outcome.FAILED, exc.description or str(exc))
        except nats.errors.TimeoutError:
            return ReplayResult(
                stored.id,
                subject,
                Outcome.FAILED,
                f"no acknowledgement within {self._timeout_s:g} s: it may have been stored; the letter stays",
            )
        if ack.duplicate:
            return ReplayResult(
                stored.id, subject, Outcome.DUPLICATE, await self._duplicate_detail(letter, ack)
            )
        detail = f"{ack.stream} seq {ack.seq}{forced}"
        try:
            await self._js.delete_msg(self._stream, stored.id)
        except NotFoundError:
            pass  # deleted meanwhile (another replay)
        except nats.errors.Error as exc:
            detail += f"; the letter could not be deleted from the DLQ ({exc}): a replay resends it"
        return ReplayResult(stored.id, subject, Outcome.REPLAYED, detail)

    async def _duplicate_detail(self, letter: DeadLetter, ack: PubAck) -> str:
        window = ""
        with contextlib.suppress(Exception):
            info = await self._js.stream_info(ack.stream)
            if info.config.duplicate_window:
                window = f" ({_seconds(info.config.duplicate_window)})"
        msg_id = letter.headers.get(subjects.HEADER_MSG_ID, letter.msg_id)
        return (
            f"not sent: {ack.stream} already has Nats-Msg-Id {msg_id!r} within its duplicate "
            f"window{window}; the letter stays, replay it once the window has passed"
        )


# -- how the CLI shows them ------------------------------------------------------------------------


def clean(text: str, *, one_line: bool = False) -> str:
    """`text` safe for a terminal: control and format characters escaped (newlines too if `one_line`)."""
    return "".join(
        ch
        if (ch in "\n\t" and not one_line)
        or not (unicodedata.category(ch).startswith("C") or unicodedata.category(ch) in ("Zl", "Zp"))
        else repr(ch)[1:-1]
        for ch in text
    )


def _shorten(text: str, width: int) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"


def _when(moment: datetime | None) -> str:
    if moment is None:
        return "-"
    return moment.astimezone(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def summary_line(stored: StoredLetter) -> str:
    """One line, tab-separated: id, time, reason, deliveries, original subject, shortened error."""
    letter = stored.letter
    if letter is None:
        fields = [str(stored.id), _when(stored.time), "?", "-", stored.dlq_subject, stored.problem or ""]
    else:
        error = f"{letter.error.code or letter.error.type}: {letter.error.message}"
        count = letter.delivery_count
        fields = [
            str(stored.id),
            _when(letter.dead_lettered_at),
            letter.reason.value,
            f"{count} deliver{'y' if count == 1 else 'ies'}",
            letter.subject,
            _shorten(error, 100),
        ]
    return "\t".join(clean(field, one_line=True) for field in fields)


def _payload_text(letter: DeadLetter) -> str:
    if letter.payload_encoding == "base64":
        return "\n".join(textwrap.wrap(letter.payload, 76)) or "(empty)"
    try:
        return json.dumps(json.loads(letter.payload), indent=2, ensure_ascii=False)
    except ValueError:
        return letter.payload or "(empty)"


def describe(stored: StoredLetter, *, now: datetime | None = None) -> str:
    """The whole letter, payload included, for a person to read."""
    letter = stored.letter
    if letter is None:
        return clean(
            f"dead letter {stored.id}: {stored.problem}\n  subject         {stored.dlq_subject}\n"
            f"  stored          {_when(stored.stored_at)}"
        )
    error = letter.error
    rows = [
        ("dead-lettered", letter.dead_lettered_at.isoformat()),
        ("reason", letter.reason.value),
        ("subject", letter.subject),
    ]
    if letter.stream is not None:
        where = f"{letter.stream} seq {letter.stream_seq}" if letter.stream_seq is not None else letter.stream
        rows.append(("from", where + (f", consumer {letter.consumer}" if letter.consumer else "")))
    rows.append(("deliveries", str(letter.delivery_count)))
    if letter.msg_id is not None:
        rows.append(("msg id", letter.msg_id))
    code = f" [{error.code}]" if error.code else ""
    rows.append(("error", f"{error.type}{code}{' (retryable)' if error.retryable else ''}: {error.message}"))
    if expired_call(letter, now or datetime.now(UTC)) is not None:
        rows.append(("note", "an expired tool call: replay refuses it unless --force"))
    lines = [f"dead letter {stored.id}"]
    lines += [f"  {name:<15} {clean(value, one_line=True)}" for name, value in rows]
    if error.traceback:
        lines += ["  traceback", textwrap.indent(clean(error.traceback), "    ")]
    lines.append("  headers" + ("" if letter.headers else "         (none)"))
    lines += [f"    {clean(k, one_line=True)}: {clean(v, one_line=True)}" for k, v in letter.headers.items()]
    size = f"{letter.payload_size} bytes, {letter.payload_encoding}"
    if letter.truncated:
        size += f", truncated: the letter keeps {len(letter.raw_payload())} bytes of it"
    lines += [f"  payload         {size}", textwrap.indent(clean(_payload_text(letter)), "    ")]
    return "\n".join(lines)


def result_line(result: ReplayResult) -> str:
    """One line, tab-separated: id, outcome, subject, detail."""
    fields = [str(result.id), result.outcome.value, result.subject or "-", result.detail or ""]
    return "\t".join(clean(field, one_line=True) for field in fields)
