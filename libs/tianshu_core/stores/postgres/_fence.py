"""Fenced writes: one statement that writes only while its writer still holds the case's lease.

Such a statement starts with the CTE `fence`: the lease token of the writer's case, read with the
case row locked FOR SHARE, as a journal append locks it (see `_committer`). A lease steal (an
UPDATE of that row) therefore either commits first, and the statement sees the new token and
writes nothing, or waits until the write has committed. Every write of the statement is
conditioned on `held(...)`, and the statement returns the token it found, so that the store tells
a refusal from a write without another round trip. A NULL token is an admin's write: not fenced,
and no row is locked.
"""

from __future__ import annotations

from ...errors import LeaseLostError


def fence_cte(case_key: str, token: str) -> str:
    """The `fence` CTE: `case_key` and `token` are the statement's placeholders for them."""
    return (
        "fence AS MATERIALIZED (SELECT lease_token FROM tianshu_cases "
        f"WHERE case_key = {case_key} AND {token}::int8 IS NOT NULL FOR SHARE)"
    )


def held(token: str) -> str:
    """The condition of a fenced write: no token given, or the case's token is still this one."""
    return f"({token}::int8 IS NULL OR EXISTS (SELECT 1 FROM fence WHERE lease_token = {token}::int8))"


def check_fence(case_key: str, token: int | None, found: int | None) -> None:
    """Raise LeaseLostError when a fenced statement found another token (or no case) than `token`."""
    if token is not None and found != token:
        raise LeaseLostError(case_key, token)
