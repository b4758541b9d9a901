"""The engine's errors: one root, stable codes, serialisable to the wire."""

from __future__ import annotations

import traceback
from typing import ClassVar

from pydantic import BaseModel, ConfigDict


class ErrorInfo(BaseModel):
    """A failure as data: what a failed case stores and what crosses the wire."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: str
    message: str
    code: str | None = None
    retryable: bool = False
    traceback: str | None = None

    @classmethod
    def from_exception(cls, exc: BaseException) -> ErrorInfo:
        code = exc.code if isinstance(exc, TianshuError) else None
        retryable = exc.retryable if isinstance(exc, TianshuError) else False
        tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        return cls(
            type=type(exc).__name__,
            message=_storable(str(exc)),
            code=code,
            retryable=retryable,
            traceback=_storable(tb),
        )


def _storable(text: str) -> str:
    """`text` with what no store can keep (a NUL character, a lone surrogate) written as escapes:
    an error is stored on its case, and one quoting a bad value must not be refused in turn."""
    if "\x00" in text:
        text = text.replace("\x00", "\\x00")
    if not text.isascii():
        text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text


class TianshuError(Exception):
    """Root of every error the engine raises on purpose."""

    code: ClassVar[str] = "tianshu_error"
    retryable: ClassVar[bool] = False

    def to_info(self) -> ErrorInfo:
        return ErrorInfo.from_exception(self)


class UnknownWorkflowError(TianshuError):
    """No workflow is registered under the case's workflow code."""

    code = "unknown_workflow"

    def __init__(self, workflow_code: str, known: list[str] | None = None) -> None:
        hint = f"; registered: {', '.join(sorted(known))}" if known else ""
        super().__init__(f"unknown workflow code {workflow_code!r}{hint}")
        self.workflow_code = workflow_code


class DuplicateWorkflowError(TianshuError):
    """Two workflows were registered under one code."""

    code = "duplicate_workflow"


class DuplicateStepError(TianshuError):
    """One step name was used twice in one run without being cleared in between."""

    code = "duplicate_step"

    def __init__(self, case_key: str, name: str) -> None:
        super().__init__(
            f"step {name!r} was already used in this run of case {case_key!r}; "
            "step names must be unique within a run (clear the step first to run it again)"
        )
        self.case_key = case_key
        self.name = name


class UnstorableValueError(TianshuError):
    """A value no store can keep: not JSON, or JSON that Postgres refuses (a NUL character in a
    string or key, NaN or an infinity, an integer beyond 64 bits, a lone surrogate). Raised where
    the value was made (a step's result, a state variable, an outcome, a child's input, an event),
    naming it and the reason."""

    code = "unstorable_value"

    def __init__(self, what: str, reason: str) -> None:
        super().__init__(f"{what} cannot be stored: {reason}")
        self.what = what
        self.reason = reason


class StepResultTooLargeError(TianshuError):
    """A step's result (or another stored value) is larger than the configured limit."""

    code = "step_result_too_large"

    def __init__(self, what: str, size: int, limit: int) -> None:
        super().__init__(
            f"{what} is {size} bytes of JSON, over the limit of {limit} bytes; "
            "store large data elsewhere and keep a reference"
        )
        self.what = what
        self.size = size
        self.limit = limit


class CorruptCheckpointError(TianshuError):
    """A stored checkpoint cannot be decoded into what the workflow expects."""

    code = "corrupt_checkpoint"

    def __init__(self, case_key: str, name: str, reason: str) -> None:
        super().__init__(f"stored checkpoint {name!r} of case {case_key!r} is corrupt: {reason}")
        self.case_key = case_key
        self.name = name


class LeaseLostError(TianshuError):
    """This process no longer holds the case's lease: its writes are refused (fencing)."""

    code = "lease_lost"

    def __init__(self, case_key: str, token: int) -> None:
        super().__init__(f"lease on case {case_key!r} with token {token} is no longer held; write refused")
        self.case_key = case_key
        self.token = token


class CaseInterruptedError(LeaseLostError):
    """The case was paused or cancelled while it ran: its run stops at this step boundary."""

    code = "case_interrupted"

    def __init__(self, case_key: str, token: int, lifecycle: str) -> None:
        TianshuError.__init__(self, f"case {case_key!r} is {lifecycle}: its run stops at this step boundary")
        self.case_key = case_key
        self.token = token
        self.lifecycle = lifecycle


class CaseNotFoundError(TianshuError):
    """No case has the given key."""

    code = "case_not_found"

    def __init__(self, case_key: str) -> None:
        super().__init__(f"no case with key {case_key!r}")
        self.case_key = case_key


class CaseExistsError(TianshuError):
    """A case with that key exists already, with another workflow code."""

    code = "case_exists"


class InvalidTokenError(TianshuError):
    """A name that must be a single NATS subject token is not one."""

    code = "invalid_token"


class InvalidCursorError(TianshuError):
    """A page cursor that no listing returned (cut, edited, or from another program)."""

    code = "invalid_cursor"


class PayloadTooLargeError(TianshuError):
    """An event payload is larger than the configured limit."""

    code = "payload_too_large"


class NonDeterminismError(TianshuError):
    """A replay took a different path than the run that wrote the history: the code asks, under a
    recorded name, for something other than what the journal holds there (the code changed under
    a case in flight). Its case fails; the record is never decoded as what it is not."""

    code = "non_determinism"

    def __init__(self, case_key: str, name: str, recorded: str, asked: str) -> None:
        super().__init__(
            f"case {case_key!r} recorded {name!r} as {recorded}, but the workflow now asks for {asked} "
            "under that name: its code changed in a way that cases in flight cannot follow"
        )
        self.case_key = case_key
        self.name = name
        self.recorded = recorded
        self.asked = asked


class StoreUnavailableError(TianshuError):
    """The store failed with a transient error and retries ran out."""

    code = "store_unavailable"
    retryable = True


class FatalStepError(TianshuError):
    """Raise (or subclass) in a step to stop `step_with_retry` at once."""

    code = "fatal_step_error"


class MigrationError(TianshuError):
    """A database migration failed or the schema is newer than this code."""

    code = "migration_error"
