"""One delivered JetStream message, as a handler sees it."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from nats.aio.msg import Msg

from tianshu_contracts.subjects import HEADER_MSG_ID


@dataclass(frozen=True, slots=True)
class Delivery:
    """Where a message came from and how often it was delivered; `raw` is the nats-py message."""

    subject: str
    headers: Mapping[str, str]
    msg_id: str | None
    stream: str | None
    stream_seq: int | None
    consumer: str | None
    num_delivered: int
    raw: Msg

    @classmethod
    def of(cls, msg: Msg) -> Delivery:
        headers = dict(msg.headers or {})
        try:
            meta = msg.metadata
        except Exception:  # not a JetStream message (a test, a core subscription)
            return cls(msg.subject, headers, headers.get(HEADER_MSG_ID), None, None, None, 1, msg)
        return cls(
            subject=msg.subject,
            headers=headers,
            msg_id=headers.get(HEADER_MSG_ID),
            stream=meta.stream,
            stream_seq=meta.sequence.stream,
            consumer=meta.consumer,
            num_delivered=meta.num_delivered,
            raw=msg,
        )

    @property
    def size(self) -> int:
        return len(self.raw.data)

    async def in_progress(self) -> None:
        """Tell the server the handler is still working, so the message is not redelivered yet."""
        await self.raw.in_progress()
