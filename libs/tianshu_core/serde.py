"""JSON encoding of step results, state and payloads (orjson, pydantic models included)."""

from __future__ import annotations

from typing import Any

import orjson
from pydantic import BaseModel

from .errors import StepResultNotSerializableError, StepResultTooLargeError


def _default(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, set | frozenset):
        return sorted(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def dumps(value: Any) -> str:
    """Encode to JSON text; pydantic models, dataclasses, datetimes and UUIDs included."""
    return orjson.dumps(value, default=_default).decode()


def loads(text: str | bytes) -> Any:
    """Decode JSON text."""
    return orjson.loads(text)


def encode_result(name: str, value: Any, limit: int) -> str:
    """Encode a step result, with the errors a workflow author needs when it cannot be stored."""
    try:
        text = dumps(value)
    except (TypeError, orjson.JSONEncodeError) as exc:
        raise StepResultNotSerializableError(name, value, exc) from exc
    if len(text) > limit:
        raise StepResultTooLargeError(name, len(text.encode()), limit)
    return text
