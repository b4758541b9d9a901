"""B4: what a provider adds to a model call, against the bare SDK call to the same server.

The project's scripted model server runs as its own process (`python -m tianshu_core.model_server`);
one process makes N sequential text completions with the bare `openai` SDK and N through
`OpenAiProvider` (one SDK client each, retries off in both), alternating, so the machine's drift
falls on both alike. Prints

    tianshu b4_provider_overhead_p50_ms=... b4_provider_bare_p50_ms=...

where the overhead is the provider's p50 minus the bare call's p50 (the target: at most 10% of
the bare p50; a provider adds no I/O). Environment: B4_N (default 400), B4_WARMUP (40).
"""

from __future__ import annotations

import asyncio
import os
import re
import statistics
import subprocess
import sys
import time

import openai

from tianshu_contracts.llm import LlmMessage, LlmRequest
from tianshu_core.llm import OpenAiProvider

N = int(os.environ.get("B4_N", "400"))
WARMUP = int(os.environ.get("B4_WARMUP", "40"))
KEY = "sk-bench"


def start_server() -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "tianshu_core.model_server", "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert proc.stdout is not None
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        found = re.search(r"listening on (http://\S+)", line)
        if found:
            return proc, found.group(1)
        if not line and proc.poll() is not None:
            break
    proc.kill()
    raise SystemExit("b4: the model server did not start")


async def measure(url: str) -> tuple[list[float], list[float]]:
    bare = openai.AsyncOpenAI(api_key=KEY, base_url=f"{url}/v1", max_retries=0)
    provider = OpenAiProvider(api_keys=[KEY], base_url=f"{url}/v1", name="bench")
    request = LlmRequest(model="text", messages=[LlmMessage.user("say something short")])
    messages: list[openai.types.chat.ChatCompletionMessageParam] = [
        {"role": "user", "content": "say something short"}
    ]
    bare_ms: list[float] = []
    provider_ms: list[float] = []
    try:
        for i in range(WARMUP + N):
            started = time.perf_counter()
            await bare.chat.completions.create(model="text", messages=messages)
            bare_s = time.perf_counter() - started
            started = time.perf_counter()
            await provider.complete(request)
            provider_s = time.perf_counter() - started
            if i >= WARMUP:
                bare_ms.append(bare_s * 1000)
                provider_ms.append(provider_s * 1000)
    finally:
        await bare.close()
        await provider.aclose()
    return bare_ms, provider_ms


def main() -> None:
    proc, url = start_server()
    try:
        bare_ms, provider_ms = asyncio.run(measure(url))
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    bare_p50 = statistics.median(bare_ms)
    provider_p50 = statistics.median(provider_ms)
    print(f"# b4: {N} sequential text completions each way, alternating", file=sys.stderr)
    print(
        f"tianshu b4_provider_overhead_p50_ms={provider_p50 - bare_p50:.3f} "
        f"b4_provider_bare_p50_ms={bare_p50:.3f}"
    )


if __name__ == "__main__":
    main()
