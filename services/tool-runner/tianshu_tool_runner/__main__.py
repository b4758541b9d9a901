"""`tianshu-tool-runner` / `python -m tianshu_tool_runner`: run one tool runner."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from collections.abc import Callable

from pydantic import ValidationError

from tianshu_core import TianshuError
from tianshu_core.bus import NatsSettings
from tianshu_core.logs import configure_logging
from tianshu_core.telemetry import configure_tracing

from .loader import load_tools
from .service import ToolRunner
from .settings import ToolRunnerSettings

log = logging.getLogger(__name__)


async def _main(stop_tracing: Callable[[], None]) -> int:
    settings = ToolRunnerSettings()
    registry = load_tools(settings.tool_modules)
    runner = ToolRunner(settings, registry, NatsSettings())
    try:
        await runner.start()
    except BaseException:
        await runner.close()
        raise
    print(f"tianshu-tool-runner ready (pid {os.getpid()})", flush=True)
    clean = await runner.serve()
    code = 0 if clean else 3
    if runner.threads.busy:
        # A sync tool past its timeout cannot be stopped, and a normal exit would wait for its thread
        # (asyncio.run and the interpreter both join the executor's threads): leave without waiting.
        log.warning("%d sync tool calls still running in threads; exiting without them", runner.threads.busy)
        stop_tracing()
        logging.shutdown()
        sys.stdout.flush()
        os._exit(code)
    return code


def main() -> int:
    """Entry point of the `tianshu-tool-runner` console script."""
    configure_logging()
    stop_tracing = configure_tracing("tianshu-tool-runner")
    try:
        return asyncio.run(_main(stop_tracing))
    except TianshuError as exc:
        print(f"tianshu-tool-runner: {exc}", file=sys.stderr)
        return 2
    except ValidationError as exc:  # the settings: say which variable is wrong, without a traceback
        print(f"tianshu-tool-runner: invalid settings: {exc}", file=sys.stderr)
        return 2
    finally:
        stop_tracing()


if __name__ == "__main__":
    sys.exit(main())
