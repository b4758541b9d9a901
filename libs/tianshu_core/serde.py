"""JSON encoding of step results, state and payloads (orjson, pydantic models included), and the
one check that a value can be stored.

The check is the same whatever the store: the in-memory store refuses what Postgres would, and
the error names the value (`the result of step 'fetch'`) and what is wrong with it, where the
workflow made it, instead of a store refusing the write later, when nothing can be done about it.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from collections.abc import Iterable, Iterator
from typing import Any

import orjson
from pydantic import BaseModel

from .errors import StepResultTooLargeError, UnstorableValueError

# orjson writes NaN and the infinities as `null` (silently changing the value): a value whose
# JSON holds no `null` holds none of them, so only such a value is walked to be sure.
_NULL = b"null"
# JSON writes a NUL character as \u0000; a string holding the six characters `\u0000` is written
# `\\u0000`, which contains it too, so a hit is confirmed by walking the decoded value.
NUL_ESCAPE = b"\\u0000"
# Integers Postgres' jsonb and orjson both keep exactly: i64 and u64.
_INT_MIN, _INT_MAX = -(2**63), 2**64 - 1
# orjson refuses deeper nesting; the walks stop there too (a cycle would never end them).
_MAX_DEPTH = 255


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


def encode(what: str, value: Any) -> bytes:
    """JSON of `value`, or UnstorableValueError naming `what` when no store could keep it: not
    JSON (a type JSON has no form for, a key that is not a string), or JSON that Postgres refuses
    or that would not read back as written (a NUL character in a string or key, NaN or an
    infinity, an integer beyond 64 bits, a lone surrogate)."""
    try:
        data = orjson.dumps(value, default=_default)
    except TypeError as exc:  # orjson.JSONEncodeError included
        raise UnstorableValueError(what, _problem_in(value) or str(exc)) from exc
    if _NULL in data and _non_finite(value):
        raise UnstorableValueError(what, _problem_in(value) or "NaN or an infinity, which JSON cannot carry")
    if NUL_ESCAPE in data and (path := nul_path(orjson.loads(data))) is not None:
        raise UnstorableValueError(what, f"a NUL character (\\u0000), which Postgres refuses, {path}")
    return data


def encode_result(what: str, value: Any, limit: int) -> str:
    """`encode`, as text, refused with StepResultTooLargeError when over `limit` bytes."""
    data = encode(what, value)
    if len(data) > limit:
        raise StepResultTooLargeError(what, len(data), limit)
    return data.decode()


def require_text(what: str, text: str) -> str:
    """`text` (a name the stores keep as text), or UnstorableValueError when it holds a NUL
    character or a lone surrogate, which Postgres' text refuses."""
    if "\x00" in text:
        raise UnstorableValueError(what, "it holds a NUL character (\\u0000), which Postgres refuses")
    if not text.isascii() and not _utf8(text):
        raise UnstorableValueError(what, "it holds a lone surrogate, which is not Unicode text")
    return text


def nul_path(value: Any) -> str | None:
    """Where a string or key of decoded JSON holds a NUL character (`at $.a[2]`, `in a key at
    $.a`), or None when none does."""
    for item, at in _walk(value):
        if isinstance(item, str):
            if "\x00" in item:
                return f"at {_path(at)}"
        elif isinstance(item, dict) and any("\x00" in key for key in item):
            return f"in a key at {_path(at)}"
    return None


def _problem_in(value: Any) -> str | None:
    """What in `value` JSON cannot carry, or Postgres keep, or that would not read back as
    written, and where; None when nothing of that kind is found (a NUL is `nul_path`'s, an
    unknown type orjson's to name)."""
    for item, at in _walk(value):
        if isinstance(item, float):
            if not math.isfinite(item):
                return f"{item} at {_path(at)}, which JSON has no number for"
        elif isinstance(item, int) and not isinstance(item, bool):
            if not _INT_MIN <= item <= _INT_MAX:
                return f"an integer beyond 64 bits at {_path(at)}"
        elif isinstance(item, str):
            if not item.isascii() and not _utf8(item):
                return f"a lone surrogate in a string at {_path(at)}"
        elif isinstance(item, dict):
            for key in item:
                if not isinstance(key, str):
                    return f"a key of type {type(key).__name__} at {_path(at)} (JSON keys are strings)"
                if not key.isascii() and not _utf8(key):
                    return f"a lone surrogate in a key at {_path(at)}"
    return None


# Types that never hold a float: a walk skips them without a call.
_PLAIN = frozenset({str, int, bool, type(None)})


def _non_finite(value: Any) -> bool:
    """Whether `value` (one orjson encoded: no cycle, bounded depth) holds NaN or an infinity.

    The fast check on every value whose JSON has a `null`: plain JSON types in a tight loop,
    anything else by the general walk. `_problem_in` then says where.
    """
    kind = type(value)
    if kind is float:
        return not math.isfinite(value)
    inner: Iterable[Any]
    if kind is dict:
        inner = value.values()
    elif kind is list or kind is tuple:
        inner = value
    elif kind in _PLAIN:
        return False
    elif isinstance(value, BaseModel):
        inner = (value.model_dump(mode="json"),)
    else:
        return _problem_in(value) is not None
    for item in inner:  # noqa: SIM110 - a loop: any() over a generator took half as long again
        if type(item) not in _PLAIN and _non_finite(item):
            return True
    return False


# Where an item sits: None for the top, else (where its container sits, its key or index). Built
# as the walk goes (a tuple per item), rendered as text only for the item that is reported.
_At = tuple[Any, str | int] | None


def _walk(value: Any) -> Iterator[tuple[Any, _At]]:
    """Every item of `value` with where it sits, as orjson encodes it: containers, pydantic
    models (as they dump), dataclasses (their fields) and enums (their values). A container met
    twice (shared, or a cycle, which orjson refuses) is walked once."""
    stack: list[tuple[Any, _At, int]] = [(value, None, 0)]
    seen: set[int] = set()
    while stack:
        item, at, depth = stack.pop()
        yield item, at
        if depth >= _MAX_DEPTH or isinstance(item, str | int | float) or item is None:
            continue
        if id(item) in seen:
            continue
        seen.add(id(item))
        depth += 1
        if isinstance(item, dict):
            stack.extend((inner, (at, str(key)), depth) for key, inner in item.items())
        elif isinstance(item, list | tuple | set | frozenset):
            stack.extend((inner, (at, i), depth) for i, inner in enumerate(item))
        elif isinstance(item, BaseModel):
            stack.append((item.model_dump(mode="json"), at, depth))
        elif dataclasses.is_dataclass(item) and not isinstance(item, type):
            stack.extend((getattr(item, f.name), (at, f.name), depth) for f in dataclasses.fields(item))
        elif isinstance(item, enum.Enum):
            stack.append((item.value, at, depth))


def _path(at: _At) -> str:
    """`$.key[2].name`: the path of an item, from the top."""
    parts: list[str] = []
    while at is not None:
        at, key = at
        parts.append(f"[{key}]" if isinstance(key, int) else f".{key}")
    return "$" + "".join(reversed(parts))


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
