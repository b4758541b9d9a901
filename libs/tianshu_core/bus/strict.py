"""Checks on a message body before it is decoded: strict JSON, and text the stores can keep.

Both look for a few bytes first, so the common message costs one scan of its body in C; only a
body that holds the tell-tale bytes is parsed to be sure.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from ..serde import NUL_ESCAPE, nul_path

# Python's json (and pydantic's parser) read these; RFC 8259 does not allow them.
_CONSTANTS = (b"NaN", b"Infinity")
# A number that may lie beyond a 64-bit float (1e400 reads as infinity, then is written as null)
# has an exponent of three digits or more, or at least 210 digits before its point (with fewer it
# is below 10**209, and an exponent of two digits at most takes it below 10**308, under the
# largest float, about 1.8e308; a negative exponent only makes it smaller). Both are looked for in
# the body's shape: its digits and points made '0', 'E' made 'e', '[' and ',' made ':' (what comes
# before a value), and the signs and JSON's whitespace dropped, so `"x": [ -1.5E+400` is
# `:::00e000`. C scans: a few microseconds for a 2 kB body, where the regex `[eE]\+?\d{3}|\d{300}`
# on the body took tens. A number with an exponent counts only where a value starts, so the hex
# of an id ("..3e141f..") does not make the body be parsed. A body either finds is parsed to be sure.
_SHAPE = bytes.maketrans(b"123456789.E[,", b"0000000000e::")
_SHAPE_DROPS = b" \t\n\r+-"
_BIG_EXPONENT = re.compile(rb":0+e000")
_TOP_BIG_EXPONENT = re.compile(rb"(?:\xef\xbb\xbf)?0+e000")  # the whole body a number (json reads a BOM)
_LONG_DIGITS = b"0" * 200


class _NotStrictError(ValueError):
    pass


def _refuse(constant: str) -> Any:
    raise _NotStrictError(constant)


def non_strict_constant(data: bytes) -> str | None:
    """`NaN`, `Infinity` or `-Infinity` when the body uses one as a value, else None.

    None also for a body that is not JSON at all: decoding it reports that with its own reason.
    """
    if not any(c in data for c in _CONSTANTS):
        return None
    try:
        json.loads(data, parse_constant=_refuse)
    except _NotStrictError as exc:
        return str(exc)
    except ValueError:
        return None
    return None


def _finite(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise _NotStrictError(text)
    return value


def out_of_range_number(data: bytes) -> str | None:
    """A number in the body too large for a 64-bit float (it would be read as infinity), else None."""
    shape = data.translate(_SHAPE, _SHAPE_DROPS)
    if (
        _LONG_DIGITS not in shape
        and _BIG_EXPONENT.search(shape) is None
        and _TOP_BIG_EXPONENT.match(shape) is None
    ):
        return None
    try:
        json.loads(data, parse_float=_finite)
    except _NotStrictError as exc:
        return str(exc)[:40]
    except ValueError:
        return None
    return None


def holds_nul(data: bytes) -> bool:
    """True when a string in the JSON body (a key or a value) holds a NUL character, which
    Postgres' text and jsonb refuse (`\\u0000`)."""
    # JSON writes a NUL character as \u0000 (a raw NUL byte is not valid JSON at all).
    if NUL_ESCAPE not in data:
        return False
    try:
        value = json.loads(data)
    except ValueError:
        return False  # not JSON: its own reason
    return nul_path(value) is not None
