"""What happens to a message that cannot be handled: a refusal the sender can watch, a dead letter kept."""

from __future__ import annotations

import base64
import enum
from typing import Literal

from pydantic import AwareDatetime, Field, TypeAdapter

from ._base import CaseKey, Message
from .errors import WireError


class DeadLetterReason(enum.StrEnum):
    """Why a message was taken out of circulation."""

    UNDECODABLE = "undecodable"
    """Not JSON (or not UTF-8)."""
    SCHEMA_INVALID = "schema_invalid"
    """JSON, but not a valid message for its subject: wrong types, unknown kind, unknown fields."""
    TOO_LARGE = "too_large"
    """Larger than the consumer's size limit."""
    MAX_DELIVERIES = "max_deliveries"
    """Its handler failed (or the consumer died) on every allowed delivery."""
    REFUSED = "refused"
    """Well formed, but its handler refused it for good (unknown workflow, invalid input, ...)."""
    NOT_STRICT_JSON = "not_strict_json"
    """JSON with `NaN`, `Infinity` or `-Infinity`, which strict JSON (RFC 8259) does not allow."""
    UNSTORABLE = "unstorable"
    """Valid, but holding a value the stores cannot keep (a NUL character in text, a 65-bit integer)."""
    UNKNOWN_CASE = "unknown_case"
    """Addressed to a case that does not exist."""
    KEY_MISMATCH = "key_mismatch"
    """Its body names another case (or tool) than its subject does."""
    EXPIRED = "expired"
    """A call received after its deadline: whoever made it has been told it failed, so it is not run."""


class Refusal(Message):
    """A message was refused; published on `tianshu.v1.errors.<origin>` for its sender to see.

    The sender matches it to what it sent by `msg_id` (its `Nats-Msg-Id`) or `case_key`.
    """

    kind: Literal["refusal"] = "refusal"
    subject: str
    msg_id: str | None = None
    stream: str | None = None
    stream_seq: int | None = None
    case_key: CaseKey | None = None
    reason: DeadLetterReason
    error: WireError
    refused_at: AwareDatetime


class DeadLetter(Message):
    """A message that could not be handled, kept in the `TIANSHU_DLQ` stream with the reason.

    `payload` is the original body: as text when it is UTF-8, else base64. A body too large to fit
    in a dead letter is cut (`truncated`); `payload_size` is always the original size, and
    `stream`/`stream_seq` locate the original while its stream keeps it.
    """

    kind: Literal["dead_letter"] = "dead_letter"
    subject: str
    stream: str | None = None
    stream_seq: int | None = None
    consumer: str | None = None
    delivery_count: int = Field(ge=0)
    msg_id: str | None = None
    headers: dict[str, str] = Field(default_factory=dict)
    payload: str
    payload_encoding: Literal["utf-8", "base64"]
    payload_size: int = Field(ge=0)
    truncated: bool = False
    reason: DeadLetterReason
    error: WireError
    dead_lettered_at: AwareDatetime

    def raw_payload(self) -> bytes:
        """The original body (or its kept prefix, when `truncated`)."""
        if self.payload_encoding == "base64":
            return base64.b64decode(self.payload)
        return self.payload.encode()

    @staticmethod
    def encode_payload(raw: bytes) -> tuple[str, Literal["utf-8", "base64"]]:
        """`(payload, payload_encoding)` for a raw body."""
        try:
            return raw.decode(), "utf-8"
        except UnicodeDecodeError:
            return base64.b64encode(raw).decode(), "base64"


REFUSAL_ADAPTER: TypeAdapter[Refusal] = TypeAdapter(Refusal)
DEAD_LETTER_ADAPTER: TypeAdapter[DeadLetter] = TypeAdapter(DeadLetter)
