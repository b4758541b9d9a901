"""Results that runs in this process await by call id: the fast path of remote calls.

Every scheduler subscribes on core NATS to the results subject (cheap to ignore what is not
awaited here) and hands a result to the run that sent its call. The same result comes a moment
later through the durable consumer, which records it; `resolve` then says whether a run here
awaited the call, so that the consumer needs no lookup to know that the case exists.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from typing import Generic, Protocol, TypeVar

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from pydantic import TypeAdapter, ValidationError

from .strict import holds_nul, non_strict_constant

_ANSWERED_KEPT = 10_000
# A result whose call no run here awaits is ignored before it is decoded: a few microseconds, not
# the tens that decoding and checking it take. A valid result's own "call_id" is a plain token
# (A-Z, a-z, 0-9, '_', '-') written as it is, unless a `\u` escape spells it or its key.
_KEY = b'"call_id"'
_VALUE = re.compile(rb'\s*:\s*"([A-Za-z0-9_-]+)"')


class Result(Protocol):
    @property
    def call_id(self) -> str: ...

    @property
    def case_key(self) -> str: ...


R = TypeVar("R", bound=Result)


class AwaitedResults(Generic[R]):
    """The futures of the calls this process awaits, fed by a core subscription to `pattern`.

    Only a result the durable consumer would accept resolves a future: strict JSON, nothing
    Postgres cannot store, valid for `adapter`, on the subject `subject_of(case_key)` names.
    """

    def __init__(
        self, nc: Client, pattern: str, adapter: TypeAdapter[R], subject_of: Callable[[str], str]
    ) -> None:
        self._nc = nc
        self._pattern = pattern
        self._adapter = adapter
        self._subject_of = subject_of
        self._waiting: dict[str, asyncio.Future[R]] = {}
        # Calls answered on the fast path, and their cases.
        self._answered: OrderedDict[str, str] = OrderedDict()
        self._sub: Subscription | None = None

    async def start(self) -> None:
        self._sub = await self._nc.subscribe(self._pattern, cb=self._on_result)

    async def stop(self) -> None:
        if self._sub is not None:
            sub, self._sub = self._sub, None
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    @contextlib.asynccontextmanager
    async def awaiting(self, call_id: str) -> AsyncIterator[asyncio.Future[R]]:
        """The future of `call_id`'s result while the block runs (made before the call is sent,
        so that an answer faster than the publish's acknowledgement is not missed)."""
        future = self._waiting.get(call_id)
        if future is None or future.done():
            future = asyncio.get_running_loop().create_future()
            self._waiting[call_id] = future
        try:
            yield future
        finally:
            if self._waiting.get(call_id) is future:
                del self._waiting[call_id]

    def resolve(self, result: R) -> bool:
        """Hand a result to the run awaiting it here, if any. True when a run here awaits or
        awaited that call (so its case exists)."""
        future = self._waiting.get(result.call_id)
        if future is None:
            return self._answered.get(result.call_id) == result.case_key
        if not future.done():
            future.set_result(result)
            self._answered[result.call_id] = result.case_key
            if len(self._answered) > _ANSWERED_KEPT:
                self._answered.popitem(last=False)
        return True

    async def _on_result(self, msg: Msg) -> None:
        # Anything the durable consumer would refuse never reaches a run: it dead-letters it, and
        # the case learns of the call's failure by its deadline, never from a bad message.
        data = msg.data
        if not self._awaited_here(data):
            return  # `resolve` would find no run waiting for it, and do nothing
        if non_strict_constant(data) is not None or holds_nul(data):
            return
        try:
            result = self._adapter.validate_json(data)
            if self._subject_of(result.case_key) != msg.subject:
                return
        except (ValidationError, ValueError):
            return
        self.resolve(result)

    def _awaited_here(self, data: bytes) -> bool:
        """False when the body cannot be the result of a call awaited here, told before it is
        decoded: none of its "call_id" keys (its own, and any nested one) names an awaited call,
        and no `\\u` escape could spell that key or an id otherwise."""
        waiting = self._waiting
        if not waiting:
            return False
        at = data.find(_KEY)
        while at >= 0:
            at += len(_KEY)
            value = _VALUE.match(data, at)
            if value is not None and value[1].decode() in waiting:
                return True
            at = data.find(_KEY, at)
        return b"\\u" in data
