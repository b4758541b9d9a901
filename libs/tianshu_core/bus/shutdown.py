"""Graceful shutdown on SIGTERM: stop taking work, finish what is in flight in bounded time, drain."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import Sequence
from typing import Protocol

from nats.aio.client import Client

log = logging.getLogger(__name__)


class Stoppable(Protocol):
    """A consumer or responder: stops taking work, then finishes within a time limit."""

    def stop(self) -> None: ...

    async def shutdown(self, timeout_s: float) -> bool: ...


class GracefulShutdown:
    """Waits for SIGTERM or SIGINT, then shuts the workers and the connection down within `timeout_s`.

    shutdown = GracefulShutdown(nc, [consumer, responder], timeout_s=20)
    shutdown.install()
    await shutdown.wait()      # until a signal (or `trigger()`)
    await shutdown.run()       # stop, finish or release in-flight work, drain NATS
    """

    def __init__(self, nc: Client, workers: Sequence[Stoppable], *, timeout_s: float = 20.0) -> None:
        self._nc = nc
        self._workers = list(workers)
        self.timeout_s = timeout_s
        self._requested = asyncio.Event()
        self._installed: list[signal.Signals] = []

    def install(self, signals: Sequence[signal.Signals] = (signal.SIGTERM, signal.SIGINT)) -> None:
        """Route `signals` to `trigger()` (on the running loop)."""
        loop = asyncio.get_running_loop()
        for sig in signals:
            loop.add_signal_handler(sig, self.trigger)
            self._installed.append(sig)

    def uninstall(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in self._installed:
            loop.remove_signal_handler(sig)
        self._installed.clear()

    def trigger(self) -> None:
        """Ask for shutdown (what the signal handler does)."""
        if not self._requested.is_set():
            log.info("shutdown requested")
        self._requested.set()

    @property
    def requested(self) -> bool:
        return self._requested.is_set()

    async def wait(self) -> None:
        await self._requested.wait()

    async def run(self) -> bool:
        """Stop every worker at once, let them finish within the time left, then drain the connection.

        True when everything finished in time; False when some work was cut short (its messages were
        released for redelivery) or the drain had to be abandoned.
        """
        deadline = time.monotonic() + self.timeout_s
        for worker in self._workers:
            worker.stop()
        results = await asyncio.gather(
            *(w.shutdown(max(0.0, deadline - time.monotonic())) for w in self._workers)
        )
        clean = all(results)
        if self._nc.is_closed:
            return clean
        try:
            await asyncio.wait_for(self._nc.drain(), timeout=max(0.1, deadline - time.monotonic()))
        except Exception as exc:  # TimeoutError included
            log.warning("NATS drain did not finish (%r); closing", exc)
            with contextlib.suppress(Exception):
                await self._nc.close()
            return False
        return clean
