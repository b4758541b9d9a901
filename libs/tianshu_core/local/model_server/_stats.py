"""What the server saw: one record per model request, token totals, and how many were open at once."""

from __future__ import annotations

import dataclasses
import hashlib
import threading
from dataclasses import dataclass, field
from typing import Any


def key_fingerprint(key: str) -> str:
    """What the stats keep of an API key: the first 16 hex digits of its SHA-256, never the key."""
    return hashlib.sha256(key.encode()).hexdigest()[:16]


REDACTED = "[redacted]"
"""What stands in a record where the request's API key stood."""


@dataclass
class RequestRecord:
    """One request to `/v1/chat/completions` or `/v1/messages`, filled in as it is answered.

    `input_tokens` counts every prompt token, cached ones included (`cache_read_tokens` and
    `cache_write_tokens` say how many of them were); `status` is 0 when the connection was closed
    without an answer. `body` is the request's JSON as the client sent it.
    """

    path: str
    api: str
    model: str = ""
    stream: bool = False
    api_key_sha256: str | None = None
    script: str = ""
    step: str = ""
    status: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0
    cache_control: bool = False
    body: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        """The record as plain JSON values."""
        return dataclasses.asdict(self)

    def redact(self, secret: str) -> None:
        """Replace `secret` wherever the request carried it (a `deny=` list in the model name...)."""
        self.model, self.script, self.step = (
            _redact(v, secret) for v in (self.model, self.script, self.step)
        )
        self.body = _redact(self.body, secret)


def _redact(value: Any, secret: str) -> Any:
    if isinstance(value, str):
        return value.replace(secret, REDACTED)
    if isinstance(value, dict):
        return {_redact(k, secret): _redact(v, secret) for k, v in value.items()}
    if isinstance(value, list):
        return [_redact(v, secret) for v in value]
    return value


class Stats:
    """The requests the server answered, in the order they ended, and their concurrency.

    `concurrent` is how many model requests are open now (a stream stays open until its last
    byte), `max_concurrent` the most there were at once. Safe to read from another thread.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._requests: list[RequestRecord] = []
        self.concurrent = 0
        self.max_concurrent = 0

    @property
    def requests(self) -> list[RequestRecord]:
        """A copy of the records so far."""
        with self._lock:
            return list(self._requests)

    @property
    def count(self) -> int:
        """How many requests ended."""
        return len(self._requests)

    @property
    def input_tokens(self) -> int:
        """Input tokens of all requests, cached ones included."""
        return sum(r.input_tokens for r in self.requests)

    @property
    def output_tokens(self) -> int:
        """Output tokens of all requests."""
        return sum(r.output_tokens for r in self.requests)

    def opened(self) -> None:
        """A request began."""
        with self._lock:
            self.concurrent += 1
            self.max_concurrent = max(self.max_concurrent, self.concurrent)

    def closed(self, record: RequestRecord) -> None:
        """A request ended (before its last byte is written, so a client never sees it open)."""
        with self._lock:
            self.concurrent -= 1
            self._requests.append(record)

    def reset(self) -> None:
        """Forget the records; the peak starts again from the requests open now."""
        with self._lock:
            self._requests.clear()
            self.max_concurrent = self.concurrent

    def to_json(self) -> dict[str, Any]:
        """What `GET /_stats` answers."""
        records = self.requests
        return {
            "count": len(records),
            "concurrent": self.concurrent,
            "max_concurrent": self.max_concurrent,
            "input_tokens": sum(r.input_tokens for r in records),
            "output_tokens": sum(r.output_tokens for r in records),
            "requests": [r.to_json() for r in records],
        }
