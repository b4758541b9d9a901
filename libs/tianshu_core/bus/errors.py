"""The bus's errors and the handler's way to refuse a message for good."""

from __future__ import annotations

from tianshu_contracts import DeadLetterReason, WireError

from ..errors import ErrorInfo, TianshuError


class NatsStartupError(TianshuError):
    """NATS could not be used at start-up: refused credentials, failed TLS, or unreachable in time."""

    code = "nats_startup_failed"


class StreamConfigError(TianshuError):
    """A stream or consumer exists with a configuration that cannot be updated to the wanted one."""

    code = "stream_config_conflict"


class RejectMessage(TianshuError):  # noqa: N818 (an instruction to the consumer, not a failure of ours)
    """Raised by a handler to refuse a message for good: it is dead-lettered, announced, terminated.

    A transient failure a handler raises (Postgres or NATS out of reach) makes the worker try
    again later without spending the message's deliveries; anything else spends one delivery.
    `code` is the stable code the sender sees (`unknown_workflow`...).
    """

    code = "message_rejected"

    def __init__(
        self,
        error: BaseException | WireError | str,
        *,
        reason: DeadLetterReason = DeadLetterReason.REFUSED,
        case_key: str | None = None,
        code: str | None = None,
    ) -> None:
        if isinstance(error, WireError):
            self.error = error if code is None else error.model_copy(update={"code": code})
        else:
            self.error = wire_error(error, code=code)
        super().__init__(self.error.message)
        self.reason = reason
        self.case_key = case_key

    @classmethod
    def because(cls, reason: DeadLetterReason, message: str, *, case_key: str | None = None) -> RejectMessage:
        """A refusal whose error code is the reason itself (`unknown_case`, `key_mismatch`, ...)."""
        return cls(wire_error(message, code=reason.value), reason=reason, case_key=case_key)


def wire_error(error: BaseException | str, *, code: str | None = None) -> WireError:
    """An error as it may cross the wire: type, message, code, retryable; never the traceback."""
    if isinstance(error, str):
        return WireError(type="Refused", message=error, code=code)
    info = ErrorInfo.from_exception(error)
    return WireError(type=info.type, message=info.message, code=code or info.code, retryable=info.retryable)
