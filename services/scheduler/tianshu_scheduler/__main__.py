"""`tianshu-scheduler` / `python -m tianshu_scheduler`: run one scheduler replica."""

from __future__ import annotations

import asyncio
import os
import sys

from tianshu_core import TianshuError
from tianshu_core.bus import NatsSettings
from tianshu_core.logs import configure_logging
from tianshu_core.telemetry import configure_tracing

from .loader import load_workflows
from .service import Scheduler
from .settings import SchedulerSettings


async def _main() -> int:
    settings = SchedulerSettings()
    registry = load_workflows(settings.workflow_modules)
    scheduler = Scheduler(settings, registry, NatsSettings())
    try:
        await scheduler.start()
    except BaseException:
        await scheduler.close()
        raise
    print(f"tianshu-scheduler ready (pid {os.getpid()})", flush=True)
    clean = await scheduler.serve()
    return 0 if clean else 3


def main() -> int:
    """Entry point of the `tianshu-scheduler` console script."""
    configure_logging()
    stop_tracing = configure_tracing("tianshu-scheduler")
    try:
        return asyncio.run(_main())
    except TianshuError as exc:
        print(f"tianshu-scheduler: {exc}", file=sys.stderr)
        return 2
    finally:
        stop_tracing()


if __name__ == "__main__":
    sys.exit(main())
