"""Dead letters: keep a message that cannot be handled, with the reason, and tell its sender."""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import UTC, datetime

from nats.aio.client import Client
from opentelemetry.trace import Tracer

from tianshu_contracts import DeadLetter, DeadLetterReason, Refusal, WireError, subjects
from tianshu_contracts.tokens import is_plain_token

from .delivery import Delivery
from .publish import publish, publish_core

log = logging.getLogger(__name__)

# Room kept for the dead letter's own headers and envelope under the server's max_payload.
_ENVELOPE_BYTES = 16 * 1024


class DeadLetterSink:
    """Stores dead letters in the DLQ stream and announces refusals on the errors subjects.

    `subject_for` and `refusal_subject_for` map the original subject to where its dead letter
    and its refusal go (by default `tianshu.v1.dlq.<origin>` and `tianshu.v1.errors.<origin>`).
    """

    def __init__(
        self,
        nc: Client,
        *,
        subject_for: Callable[[str], str] = subjects.dead_letter,
        refusal_subject_for: Callable[[str], str] | None = subjects.refusal,
        tracer: Tracer | None = None,
    ) -> None:
        self._nc = nc
        self._js = nc.jetstream()
        self._subject_for = subject_for
        self._refusal_subject_for = refusal_subject_for
        self._tracer = tracer

    def build(self, delivery: Delivery, reason: DeadLetterReason, error: WireError) -> DeadLetter:
        """The dead letter for `delivery`, its payload cut to fit under the server's max_payload."""
        raw = delivery.raw.data
        budget = max(1024, self._nc.max_payload - _ENVELOPE_BYTES)
        keep = min(len(raw), budget)
        while True:
            payload, encoding = DeadLetter.encode_payload(raw[:keep])
            letter = DeadLetter(
                subject=delivery.subject,
                stream=delivery.stream,
                stream_seq=delivery.stream_seq,
                consumer=delivery.consumer,
                delivery_count=delivery.num_delivered,
                msg_id=delivery.msg_id,
                headers=dict(delivery.headers),
                payload=payload,
                payload_encoding=encoding,
                payload_size=len(raw),
                truncated=keep < len(raw),
                reason=reason,
                error=error,
                dead_lettered_at=datetime.now(UTC),
            )
            if keep == 0 or len(letter.model_dump_json().encode()) <= budget:
                return letter
            keep //= 2

    async def send(
        self, delivery: Delivery, reason: DeadLetterReason, error: WireError, *, case_key: str | None = None
    ) -> None:
        """Store the dead letter (raises when the DLQ stream does not take it), then announce it."""
        letter = self.build(delivery, reason, error)
        msg_id = (
            f"dlq:{delivery.stream}:{delivery.consumer}:{delivery.stream_seq}"
            if delivery.stream_seq is not None
            else None
        )
        await publish(
            self._js,
            self._subject_for(delivery.subject),
            letter,
            msg_id=msg_id,
            headers={subjects.HEADER_DEAD_LETTER_REASON: reason.value},
            tracer=self._tracer,
        )
        log.warning(
            "dead-lettered %s seq %s (delivery %d): %s: %s",
            delivery.subject,
            delivery.stream_seq,
            delivery.num_delivered,
            reason.value,
            error.message[:500],
        )
        if self._refusal_subject_for is None:
            return
        refusal = Refusal(
            subject=delivery.subject,
            msg_id=delivery.msg_id,
            stream=delivery.stream,
            stream_seq=delivery.stream_seq,
            case_key=case_key if case_key is not None and is_plain_token(case_key) else None,
            reason=reason,
            error=error,
            refused_at=letter.dead_lettered_at,
        )
        try:
            await publish_core(
                self._nc, self._refusal_subject_for(delivery.subject), refusal, tracer=self._tracer
            )
        except Exception as exc:  # the dead letter is stored; the announcement is best effort
            log.debug("could not announce the refusal of %s: %r", delivery.subject, exc)
