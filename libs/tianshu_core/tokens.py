"""Names that travel as single NATS subject tokens: resource types, resource ids, case keys.

A resource id made only of ASCII letters, digits, `_` and `-` is used as it is. Any other id is
encoded as `~` followed by the unpadded URL-safe base64 of its UTF-8 bytes. The `~` never
appears in a plain id, so the scheme is reversible: `decode_token(encode_token(x)) == x`.
Resource types and case keys must already be plain tokens.
"""

from __future__ import annotations

import re
import secrets
import time
import uuid

from tianshu_contracts import tokens as _wire
from tianshu_contracts.tokens import ENCODED_PREFIX, MAX_TOKEN_LENGTH, encode_token, is_plain_token

from .errors import InvalidTokenError

# The scheme itself is the contracts' (what crosses the wire); the engine raises its own error.
__all__ = [
    "ENCODED_PREFIX",
    "MAX_TOKEN_LENGTH",
    "child_case_key",
    "decode_token",
    "encode_token",
    "is_plain_token",
    "new_case_key",
    "require_plain",
]

_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")


def decode_token(token: str) -> str:
    """Invert `encode_token`."""
    try:
        return _wire.decode_token(token)
    except ValueError as exc:
        raise InvalidTokenError(str(exc)) from exc


def require_plain(value: str, what: str) -> str:
    """Check that a name the engine puts in subjects verbatim is a plain token."""
    try:
        return _wire.require_plain(value, what)
    except ValueError as exc:
        raise InvalidTokenError(str(exc)) from exc


def new_case_key(prefix: str | None = None) -> str:
    """A fresh, unique case key that is a plain token: 32 hex digits, the first 12 the time in
    milliseconds and the rest random. Keys made one after another sort together, so a new case's
    rows go to the right end of the indexes keyed by case (`tianshu_cases`, `tianshu_journal`),
    pages that stay in memory however large the tables grow, not to a random page of them."""
    key = f"{time.time_ns() // 1_000_000:012x}{secrets.token_hex(10)}"
    return f"{prefix}-{key}" if prefix and is_plain_token(prefix) and len(prefix) < 100 else key


def child_case_key(parent_key: str, name: str) -> str:
    """The deterministic key of a child spawned under `name`: the same on every replay."""
    suffix = _UNSAFE.sub("-", name)[:64]
    if suffix != name:
        # Keep it readable, and keep names that differ only in unsafe characters apart.
        suffix = f"{suffix}-{uuid.uuid5(uuid.NAMESPACE_URL, name).hex[:8]}"
    key = f"{parent_key}-{suffix}"
    if len(key) > MAX_TOKEN_LENGTH:
        key = uuid.uuid5(uuid.NAMESPACE_URL, key).hex
    return key
