"""Failures as data: the error every refusal, reply and notification carries."""

from __future__ import annotations

from pydantic import Field

from ._base import WireModel


class WireError(WireModel):
    """A serialisable error: the shape of `tianshu_core.ErrorInfo`, defined here for the wire.

    `type` is the exception's class name, `code` a stable machine-readable code, `retryable` says
    whether sending the same message again may succeed.
    """

    type: str = Field(max_length=200)
    message: str
    code: str | None = Field(default=None, max_length=200)
    retryable: bool = False
    traceback: str | None = Field(default=None, description="Absent unless the sender chose to share it.")
