"""Subject tokens, the contracts' own copy of `tianshu_core.tokens` (contracts import nothing of the core).

A resource id made only of ASCII letters, digits, `_` and `-` (at most 200 characters) stands in a
subject as it is. Any other id is encoded as `~` followed by the unpadded URL-safe base64 of its
UTF-8 bytes, so `decode_token(encode_token(x)) == x`. A test checks that both copies agree.
"""

from __future__ import annotations

import base64
import re

MAX_TOKEN_LENGTH = 200
PLAIN_TOKEN_PATTERN = r"^[A-Za-z0-9_-]+$"
ENCODED_PREFIX = "~"
_PLAIN = re.compile(r"[A-Za-z0-9_-]+\Z")


def is_plain_token(value: str) -> bool:
    """True when `value` can stand in a subject as it is."""
    return bool(_PLAIN.match(value)) and len(value) <= MAX_TOKEN_LENGTH


def encode_token(value: str) -> str:
    """Encode any string as one subject token (identity for plain tokens)."""
    if is_plain_token(value):
        return value
    return ENCODED_PREFIX + base64.urlsafe_b64encode(value.encode()).rstrip(b"=").decode()


def decode_token(token: str) -> str:
    """Invert `encode_token`; ValueError for a token that neither is plain nor decodes."""
    if not token.startswith(ENCODED_PREFIX):
        if not is_plain_token(token):
            raise ValueError(f"{token!r} is neither a plain nor an encoded token")
        return token
    raw = token[len(ENCODED_PREFIX) :]
    try:
        # validate=True: refuse characters outside the alphabet instead of skipping them.
        return base64.b64decode(raw + "=" * (-len(raw) % 4), altchars=b"-_", validate=True).decode()
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"{token!r} is not a valid encoded token") from exc


def require_plain(value: str, what: str) -> str:
    """Check that a name put in subjects verbatim (case key, resource type) is a plain token."""
    if not is_plain_token(value):
        raise ValueError(
            f"{what} {value!r} must be 1-{MAX_TOKEN_LENGTH} characters of A-Z, a-z, 0-9, '_' or '-'"
        )
    return value
