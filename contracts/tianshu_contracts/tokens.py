"""Subject tokens, the contracts' own copy of `tianshu_core.tokens` (contracts import nothing of the core).

A resource id made only of ASCII letters, digits, `_` and `-` (at most 200 characters) stands in a
subject as it is. Any other id (a longer one too) is encoded as `~` followed by the unpadded
URL-safe base64 of its UTF-8 bytes, so `decode_token(encode_token(x)) == x`. A test checks that both
copies agree. A subject written by hand with an id that is neither is refused, and the error says
which rule the id broke and how to encode it.
"""

from __future__ import annotations

import base64
import re

MAX_TOKEN_LENGTH = 200
PLAIN_TOKEN_PATTERN = r"^[A-Za-z0-9_-]+$"
ENCODED_PREFIX = "~"
_PLAIN = re.compile(r"[A-Za-z0-9_-]+\Z")
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")
_PLAIN_RULE = f"1-{MAX_TOKEN_LENGTH} characters of A-Z, a-z, 0-9, '_' or '-'"
_HOW_TO_ENCODE = (
    f"encode any other id as {ENCODED_PREFIX!r} followed by the unpadded URL-safe base64 of its UTF-8 "
    "bytes (encode_token() of tianshu_core or tianshu_contracts.tokens; the client and the CLI do it)"
)
# Long enough to recognise a token in an error, short enough that a 10 kB one does not fill the log.
_SHOWN_CHARS = 40


def is_plain_token(value: str) -> bool:
    """True when `value` can stand in a subject as it is."""
    return bool(_PLAIN.match(value)) and len(value) <= MAX_TOKEN_LENGTH


def encode_token(value: str) -> str:
    """Encode any string as one subject token (identity for plain tokens)."""
    if is_plain_token(value):
        return value
    return ENCODED_PREFIX + base64.urlsafe_b64encode(value.encode()).rstrip(b"=").decode()


def decode_token(token: str) -> str:
    """Invert `encode_token`; ValueError, naming the broken rule, for a token that neither is plain
    nor decodes."""
    if not token.startswith(ENCODED_PREFIX):
        problem = plain_token_problem(token)
        if problem is not None:
            raise ValueError(
                f"{_shown(token)} is neither a plain nor an encoded token: {problem}. A plain token is "
                f"{_PLAIN_RULE}; {_HOW_TO_ENCODE}"
            )
        return token
    raw = token[len(ENCODED_PREFIX) :]
    try:
        # validate=True: refuse characters outside the alphabet instead of skipping them.
        return base64.b64decode(raw + "=" * (-len(raw) % 4), altchars=b"-_", validate=True).decode()
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(
            f"{_shown(token)} is not a valid encoded token ({exc}); after {ENCODED_PREFIX!r}, "
            "an encoded token is the unpadded URL-safe base64 of UTF-8 bytes"
        ) from exc


def require_plain(value: str, what: str) -> str:
    """Check that a name put in subjects verbatim (case key, resource type) is a plain token."""
    problem = plain_token_problem(value)
    if problem is not None:
        raise ValueError(f"{what} {_shown(value)} must be {_PLAIN_RULE}: {problem}")
    return value


def plain_token_problem(value: str) -> str | None:
    """Which rule of a plain token `value` breaks, or None when it is one."""
    if not value:
        return "it is empty"
    if len(value) > MAX_TOKEN_LENGTH:
        return f"it has {len(value)} characters, over the limit of {MAX_TOKEN_LENGTH}"
    unsafe = _UNSAFE.search(value)
    if unsafe is not None:
        return f"{unsafe.group()!r} (at index {unsafe.start()}) is not allowed"
    return None


def _shown(value: str) -> str:
    return repr(value) if len(value) <= _SHOWN_CHARS else f"{value[:_SHOWN_CHARS]!r}..."
