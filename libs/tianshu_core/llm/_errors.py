"""`LlmError`: a failed model call as a workflow sees it, with its class and never a secret."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Any

from tianshu_contracts import WireError
from tianshu_contracts.llm import LlmAttempt, LlmErrorClass, StreamError, Usage

from ..errors import TianshuError

# Key shapes vendors use (OpenAI `sk-...`/`sk-proj-...`, Anthropic `sk-ant-...`, bearer tokens):
# an error body that echoes a key we did not know of is still cut.
_KEY_SHAPES = re.compile(r"\b(?:sk|rk|pk)-[A-Za-z0-9_\-]{6,}|\b[Bb]earer\s+[A-Za-z0-9._\-]{8,}")
REDACTED = "[REDACTED]"


def redact(text: str, secrets: Iterable[str] = ()) -> str:
    """`text` with every given secret, and anything shaped like an API key, replaced by [REDACTED]."""
    for secret in secrets:
        if secret and len(secret) >= 4:
            text = text.replace(secret, REDACTED)
    return _KEY_SHAPES.sub(REDACTED, text)


class LlmError(TianshuError):
    """A model call failed: `error_class` says why (an `LlmErrorClass`), `provider` and `status` where.

    `retry_after_s` is the wait the provider asked for, `attempts` every attempt of the call
    (their usage is what the call cost). The message never holds an API key: upstream error
    bodies are redacted before they reach it.
    """

    code = "llm_error"

    def __init__(
        self,
        message: str,
        *,
        error_class: LlmErrorClass,
        provider: str | None = None,
        status: int | None = None,
        retry_after_s: float | None = None,
        usage: Usage | None = None,
        attempts: Sequence[LlmAttempt] = (),
    ) -> None:
        where = f"{provider}: " if provider else ""
        super().__init__(f"{where}{message}")
        self.message = message
        """The text without the provider's name in front."""
        self.error_class = LlmErrorClass(error_class)
        self.provider = provider
        self.status = status
        self.retry_after_s = retry_after_s
        self.usage = usage or Usage()
        self.attempts = list(attempts)

    def but(self, **changes: Any) -> LlmError:
        """A copy with `changes` (any of `__init__`'s arguments): another class, provider, message..."""
        fields: dict[str, Any] = {
            "message": self.message,
            "error_class": self.error_class,
            "provider": self.provider,
            "status": self.status,
            "retry_after_s": self.retry_after_s,
            "usage": self.usage,
            "attempts": self.attempts,
        }
        fields.update(changes)
        return LlmError(fields.pop("message"), **fields)

    def wire(self) -> WireError:
        """The error as it crosses the wire: its class is the code."""
        return WireError(type="LlmError", message=str(self), code=self.error_class.value)

    def stream_error(self, *, incomplete: bool) -> StreamError:
        """The `StreamError` that ends a stream failing with this error."""
        return StreamError(
            error=self.wire(),
            error_class=self.error_class,
            incomplete=incomplete,
            retry_after_s=self.retry_after_s,
        )

    @classmethod
    def from_stream_error(cls, event: StreamError) -> LlmError:
        """The error a `StreamError` reports."""
        return cls(event.error.message, error_class=event.error_class, retry_after_s=event.retry_after_s)
