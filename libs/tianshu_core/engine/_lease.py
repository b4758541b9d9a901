"""A run's hold on its case: the lease, renewed while the run lasts."""

from __future__ import annotations

import asyncio
import logging
import time

from ..errors import LeaseLostError
from ..models import Lease
from ..stores.protocols import Stores

log = logging.getLogger(__package__)  # one logger for the engine: `tianshu_core.engine`


class LeaseKeeper:
    """Keeps a run's lease: renews it every ttl/3 while the run lasts (which costs nothing for
    short runs), and stops the run at its next durable call once the lease is lost (`hold`).

    The stores refuse every write of a stale holder anyway; this saves the run from executing
    step bodies whose results could never be stored, after a stall (a long pause of the process,
    a SIGSTOP, a suspended VM) in which another process took the case.
    """

    def __init__(self, stores: Stores, lease: Lease, ttl: float) -> None:
        self._stores, self._lease, self._ttl = stores, lease, ttl
        self._task: asyncio.Task[None] | None = None
        # Until then (this process's clock) the lease is surely still ours, without asking: the
        # store's term runs `ttl` from a renewal it received after we sent it. A third of it is
        # left as a margin, for clock rates and for a taken lease that waited to be run.
        self._term = ttl * 2 / 3
        self._sure_until = time.monotonic() + self._term
        self.lost: LeaseLostError | None = None
        self._handle: asyncio.TimerHandle | None = None

    async def hold(self) -> None:
        """Return while the run holds its lease; raise LeaseLostError (the same one from then on)
        once it does not. Free within the lease's term; past it (the heartbeat could not run: the
        process stalled), the lease is renewed first, which finds out whether it is still ours."""
        if self.lost is not None:
            raise self.lost
        if time.monotonic() >= self._sure_until:
            await self._renew()

    def lose(self, exc: LeaseLostError) -> LeaseLostError:
        """The lease is lost (a store refused a write of the run, say): every later `hold`
        raises `exc`, or the loss found first. Returns the error that stands."""
        if self.lost is None:
            self.lost = exc
        return self.lost

    async def _renew(self) -> None:
        sent = time.monotonic()
        if await self._stores.leases.renew(self._lease, self._ttl):
            self._sure_until = max(self._sure_until, sent + self._term)
            return
        raise self.lose(LeaseLostError(self._lease.case_key, self._lease.token))

    def start(self) -> None:
        """Renew the lease every ttl/3 from now on, until `stop`."""
        self._handle = asyncio.get_running_loop().call_later(self._ttl / 3, self._begin)

    def _begin(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._beat())

    async def _beat(self) -> None:
        while True:
            try:
                await self._renew()
            except LeaseLostError:
                log.warning("case %s: lease lost while running", self._lease.case_key)
                return
            except Exception:
                log.exception("case %s: lease renewal failed", self._lease.case_key)
            await asyncio.sleep(self._ttl / 3)

    def stop(self) -> None:
        """Stop renewing (the run has ended); `hold` still answers."""
        if self._handle is not None:
            self._handle.cancel()
        if self._task is not None:
            self._task.cancel()
