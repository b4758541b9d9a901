"""Names that travel as single NATS subject tokens: resource types, resource ids, case keys.

A resource id made only of ASCII letters, digits, `_` and `-` is used as it is. Any other id is
encoded as `~` followed by the unpadded URL-safe base64 of its UTF-8 bytes. The `~` never
appears in a plain id, so the scheme is reversible: `decode_token(encode_token(x)) == x`.
Resource types and case keys must already be plain tokens.
"""

from __future__ import annotations

import base64
import re
import uuid

from .errors import InvalidTokenError

_SAFE = re.compile(r"[A-Za-z0-9_-]+\Z")
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")
ENCODED_PREFIX = "~"
MAX_TOKEN_LENGTH = 200


def is_plain_token(value: str) -> bool:
    """True when `value` can stand in a subject as it is."""
    return bool(_SAFE.match(value)) and len(value) <= MAX_TOKEN_LENGTH


def encode_token(value: str) -> str:
    """Encode any string as one subject token (identity for plain tokens)."""
    if is_plain_token(value):
        return value
    raw = base64.urlsafe_b64encode(value.encode()).rstrip(b"=").decode()
    return ENCODED_PREFIX + raw


def decode_token(token: str) -> str:
    """Invert `encode_token`."""
    if not token.startswith(ENCODED_PREFIX):
        if not is_plain_token(token):
            raise InvalidTokenError(f"{token!r} is neither a plain nor an encoded token")
        return token
    raw = token[len(ENCODED_PREFIX) :]
    try:
        # validate=True: refuse characters outside the alphabet instead of skipping them.
        return base64.b64decode(raw + "=" * (-len(raw) % 4), altchars=b"-_", validate=True).decode()
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidTokenError(f"{token!r} is not a valid encoded token") from exc


def require_plain(value: str, what: str) -> str:
    """Check that a name the engine puts in subjects verbatim is a plain token."""
    if not is_plain_token(value):
        raise InvalidTokenError(
            f"{what} {value!r} must be 1-{MAX_TOKEN_LENGTH} characters of A-Z, a-z, 0-9, '_' or '-'"
        )
    return value


def new_case_key(prefix: str | None = None) -> str:
    """A fresh, unique case key that is a plain token."""
    key = uuid.uuid4().hex
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
