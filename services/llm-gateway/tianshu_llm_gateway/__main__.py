"""`tianshu-llm-gateway` / `python -m tianshu_llm_gateway`: run one LLM gateway, or check its
providers file (`--check-config [PATH]`)."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Callable, Sequence

from pydantic import ValidationError

from tianshu_core import TianshuError
from tianshu_core.bus import NatsSettings
from tianshu_core.logs import configure_logging
from tianshu_core.telemetry import configure_tracing

from .config import GatewayConfig, GatewayConfigError, load_config
from .service import LlmGateway
from .settings import LlmGatewaySettings

PROG = "tianshu-llm-gateway"


def _config(settings: LlmGatewaySettings, path: str | None = None) -> GatewayConfig:
    path = path or settings.llm_gateway_config
    if not path:
        raise GatewayConfigError(
            "TIANSHU_LLM_GATEWAY_CONFIG is not set: name the providers file (or give --check-config PATH)"
        )
    return load_config(path)


async def _main() -> int:
    settings = LlmGatewaySettings()
    gateway = LlmGateway(settings, _config(settings), NatsSettings())
    await gateway.start()  # closes what it opened when it fails
    print(f"{PROG} ready (pid {os.getpid()})", flush=True)
    return 0 if await gateway.serve() else 3


def _check(path: str | None, *, as_json: bool) -> int:
    """Print the routes the providers file makes, secrets masked; then resolve every key."""
    config = load_config(path) if path else _config(LlmGatewaySettings())
    print(config.dump(as_json=as_json), flush=True)
    config.resolve_keys()
    return 0


def _problem(exc: TianshuError | ValidationError) -> str:
    """What is wrong, on one line; for the settings, naming the variables."""
    if isinstance(exc, TianshuError):
        return str(exc)
    prefix = "TIANSHU_NATS_" if exc.title == NatsSettings.__name__ else "TIANSHU_"
    problems = []
    for err in exc.errors(include_url=False, include_input=False, include_context=False):
        where = ".".join(str(p) for p in err["loc"])
        message = err["msg"].removeprefix("Value error, ")
        problems.append(f"{prefix}{where.upper()}: {message}" if where else message)
    return "invalid settings: " + "; ".join(problems)


def _no_tracing() -> None:
    """`--check-config` traces nothing."""


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `tianshu-llm-gateway` console script."""
    parser = argparse.ArgumentParser(
        prog=PROG, description="Answer the model calls workflows send over NATS (see its README)."
    )
    parser.add_argument(
        "--check-config",
        nargs="?",
        const="",
        metavar="PATH",
        help="print the routes of the providers file (default: TIANSHU_LLM_GATEWAY_CONFIG) with every "
        "secret masked, check that every key is there, and exit (0: usable, 2: not)",
    )
    parser.add_argument("--json", action="store_true", help="with --check-config: print JSON")
    args = parser.parse_args(argv)
    configure_logging()
    checking = args.check_config is not None
    stop_tracing: Callable[[], None] = _no_tracing if checking else configure_tracing(PROG)
    try:
        if checking:
            return _check(args.check_config or None, as_json=args.json)
        return asyncio.run(_main())
    except (TianshuError, ValidationError) as exc:  # a bad file or setting: one line, no traceback
        print(f"{PROG}: {_problem(exc)}", file=sys.stderr)
        return 2
    finally:
        stop_tracing()


if __name__ == "__main__":
    sys.exit(main())
