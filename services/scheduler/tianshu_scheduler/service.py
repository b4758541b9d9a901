"""The scheduler: the engine's heart driven by NATS messages instead of a tick.

It creates cases (`StartCase`), wakes waiting ones (events), obeys commands, fires due timers,
takes over cases whose holder died (expired leases), and tells the world when a case changes.
This module wires it up: the Postgres stores and the engine, the service-mode driver that runs
cases (`tianshu_core.driver`), the NATS connection, streams and consumers, and the workers that
hand each message to its handler (`handlers.py`).
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

from nats.aio.client import Client

from tianshu_contracts import (
    CASE_COMMAND_ADAPTER,
    EVENT_PAYLOAD_ADAPTER,
    GET_CASE_ADAPTER,
    LIST_CASES_ADAPTER,
    START_CASE_ADAPTER,
    subjects,
)
from tianshu_contracts.gateway import LLM_CALL_RESULT_ADAPTER
from tianshu_contracts.tools import TOOL_CALL_RESULT_ADAPTER
from tianshu_core import Case, Engine, Stores, WorkflowRegistry, connect_postgres
from tianshu_core.bus import (
    Backoff,
    GracefulShutdown,
    NatsSettings,
    Responder,
    TianshuStreams,
    Worker,
    WorkerOptions,
    connect,
    ensure_consumers,
    ensure_streams,
    pull_subscription,
    scheduler_consumers,
)
from tianshu_core.bus.llm import NatsLlmClient
from tianshu_core.bus.shutdown import Stoppable
from tianshu_core.bus.tools import NatsToolExecutor
from tianshu_core.driver import ServiceDriver

from .handlers import SchedulerHandlers
from .settings import SchedulerSettings
from .wire import publish_case_changed

log = logging.getLogger(__name__)


class Scheduler:
    """One scheduler replica. `await start()`, then `await serve()` until SIGTERM."""

    def __init__(
        self, settings: SchedulerSettings, registry: WorkflowRegistry, nats: NatsSettings | None = None
    ) -> None:
        self.settings = settings
        self.registry = registry
        self.nats_settings = nats or NatsSettings()
        self.stores: Stores | None = None
        self.engine: Engine | None = None
        self.nc: Client | None = None
        # Runs the cases: what the handlers start or wake, and what its sweep finds.
        self.driver: ServiceDriver | None = None
        self._workers: list[Stoppable] = []
        self.tools: NatsToolExecutor
        self.llm: NatsLlmClient

    # -- life cycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Connect, set up streams and consumers, and start serving; then signal readiness."""
        s = self.settings
        self.stores = await connect_postgres(
            s.database_url, min_size=s.pool_min_size, max_size=s.pool_max_size, migrate=s.migrate_on_start
        )
        config = replace(s.engine_config(), owner=f"{s.scheduler_name}-{os.getpid()}")
        self.engine = engine = Engine(self.stores, self.registry, config=config)
        engine.add_listener(self._on_case_changed)
        self.driver = driver = ServiceDriver(
            engine,
            max_runs=s.scheduler_max_runs,
            sweep_interval_s=s.scheduler_sweep_interval_s,
            retention_interval_s=s.scheduler_retention_interval_s,
        )
        self.nc = nc = await connect(self.nats_settings, name=f"tianshu-scheduler-{s.scheduler_name}")
        js = nc.jetstream(timeout=self.nats_settings.request_timeout_s)
        await ensure_streams(js, TianshuStreams(events_max_age_s=s.event_retention_s).specs())
        specs = {c.durable: c for c in scheduler_consumers(ack_wait_s=s.scheduler_ack_wait_s)}
        await ensure_consumers(js, list(specs.values()))
        if s.max_event_payload_bytes > nc.max_payload:
            log.warning(
                "TIANSHU_MAX_EVENT_PAYLOAD_BYTES=%d is over the NATS server's max_payload (%d): "
                "larger events cannot reach the scheduler",
                s.max_event_payload_bytes,
                nc.max_payload,
            )
        options = WorkerOptions(
            max_payload_bytes=s.max_event_payload_bytes,
            max_deliver=s.scheduler_max_deliver,
            backoff=Backoff(initial_s=s.scheduler_retry_initial_s, max_s=s.scheduler_retry_max_s),
            heartbeat_s=s.scheduler_ack_wait_s / 3,
            # Everything the scheduler consumes is stored in Postgres, whose text refuses NUL.
            refuse_nul=True,
        )
        # Few starts at once, so that replicas share a burst of starts instead of one taking all.
        start_options = replace(options, concurrency=8, batch=8)
        subs = {
            durable: await pull_subscription(js, specs[durable])
            for durable in (
                subjects.CONSUMER_START,
                subjects.CONSUMER_COMMANDS,
                subjects.CONSUMER_EVENTS,
                subjects.CONSUMER_TOOL_RESULTS,
                subjects.CONSUMER_LLM_RESULTS,
            )
        }
        # ctx.tool_step's registries run on the tool runners, over NATS.
        self.tools = NatsToolExecutor(
            nc, js, hot_window_s=s.scheduler_tool_hot_window_s, grace_s=s.scheduler_tool_grace_s
        )
        await self.tools.start()
        engine.tool_executor = self.tools
        # ctx.llm: model calls go to the LLM gateways, over NATS.
        self.llm = NatsLlmClient(
            nc,
            js,
            hot_window_s=s.scheduler_llm_hot_window_s,
            timeout_s=s.scheduler_llm_timeout_s,
            grace_s=s.scheduler_llm_grace_s,
            max_attempts=s.scheduler_llm_max_attempts,
            stream=s.scheduler_llm_stream,
        )
        await self.llm.start()
        engine.llm = self.llm
        handlers = SchedulerHandlers(driver, self.registry, self.tools, self.llm, self._on_case_changed)
        self.llm.record = handlers.answered
        workers: list[Worker[Any]] = [
            Worker(
                nc,
                subs[subjects.CONSUMER_START],
                START_CASE_ADAPTER,
                handlers.start,
                options=start_options,
                name="start",
            ),
            Worker(
                nc,
                subs[subjects.CONSUMER_COMMANDS],
                CASE_COMMAND_ADAPTER,
                handlers.command,
                options=options,
                name="commands",
            ),
            Worker(
                nc,
                subs[subjects.CONSUMER_EVENTS],
                EVENT_PAYLOAD_ADAPTER,
                handlers.event,
                options=options,
                name="events",
            ),
            Worker(
                nc,
                subs[subjects.CONSUMER_TOOL_RESULTS],
                TOOL_CALL_RESULT_ADAPTER,
                handlers.tool_result,
                options=options,
                name="tool-results",
            ),
            Worker(
                nc,
                subs[subjects.CONSUMER_LLM_RESULTS],
                LLM_CALL_RESULT_ADAPTER,
                handlers.llm_result,
                # A result carries a whole model reply: NATS' limit, not the event limit, bounds it.
                options=replace(options, max_payload_bytes=max(s.max_event_payload_bytes, nc.max_payload)),
                name="llm-results",
            ),
        ]
        responders: list[Responder[Any]] = [
            Responder(
                nc,
                subjects.RPC_CASES_START,
                START_CASE_ADAPTER,
                handlers.rpc_start,
                max_payload_bytes=s.max_event_payload_bytes,
            ),
            Responder(nc, subjects.RPC_CASES_GET, GET_CASE_ADAPTER, handlers.rpc_get),
            Responder(nc, subjects.RPC_CASES_LIST, LIST_CASES_ADAPTER, handlers.rpc_list),
        ]
        for responder in responders:
            await responder.start()
        # Readiness means requests are answered: make sure the server has our subscriptions
        # before the ready file appears (a request sent just after could find no responders).
        await nc.flush()
        for worker in workers:
            worker.start()
        self._workers = [
            *workers,
            *responders,
        ]
        driver.start()
        if s.scheduler_ready_file:
            _write_ready(Path(s.scheduler_ready_file))
        log.info(
            "scheduler %s ready: %d workflows (%s)",
            s.scheduler_name,
            len(self.registry.codes),
            ", ".join(self.registry.codes),
        )

    async def serve(self) -> bool:
        """Serve until SIGTERM or SIGINT, then shut down within the configured time."""
        assert self.nc is not None and self.driver is not None
        # The driver stops like any worker: its runs finish in time, or are cancelled and released.
        shutdown = GracefulShutdown(
            self.nc, [*self._workers, self.driver], timeout_s=self.settings.scheduler_shutdown_timeout_s
        )
        shutdown.install()
        await shutdown.wait()
        clean = await shutdown.run()
        await self.close()
        return clean

    async def close(self) -> None:
        if self.driver is not None:  # leases being handed back reach the database first
            await self.driver.close()
        for client in (getattr(self, "llm", None), getattr(self, "tools", None)):
            if client is not None:
                await client.stop()
        if self.nc is not None and not self.nc.is_closed:
            with contextlib.suppress(Exception):
                await self.nc.close()
        if self.stores is not None:
            await self.stores.close()
        if self.settings.scheduler_ready_file:
            _clear_ready(Path(self.settings.scheduler_ready_file))

    async def _on_case_changed(self, case: Case) -> None:
        nc = self.nc
        if nc is None or nc.is_closed:
            return
        await publish_case_changed(nc, case)


def _write_ready(path: Path) -> None:
    path.write_text(f"{os.getpid()}\n")


def _clear_ready(path: Path) -> None:
    path.unlink(missing_ok=True)
