"""`python -m tianshu_core.local.model_server [--host H] [--port P] [--context-tokens M]`.

Serves until Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys

from ._server import ModelServer


async def _serve(host: str, port: int, context_tokens: int | None) -> None:
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stopping.set)
    async with ModelServer(host, port, context_tokens=context_tokens) as server:
        print(f"model server listening on {server.url}", flush=True)
        await stopping.wait()


def main(argv: list[str] | None = None) -> int:
    """Serve the scripted model server until SIGINT or SIGTERM."""
    parser = argparse.ArgumentParser(
        prog="python -m tianshu_core.local.model_server",
        description="A scripted stand-in for the OpenAI and Anthropic APIs (see the package doc).",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=0, help="port to listen on; 0 picks a free one")
    parser.add_argument("--context-tokens", type=int, default=None, help="context budget in tokens")
    args = parser.parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(args.host, args.port, args.context_tokens))
    return 0


if __name__ == "__main__":
    sys.exit(main())
