"""`ModelServer`: routes requests, picks each one's step, records it, and writes its outcome."""

from __future__ import annotations

import asyncio
import itertools
import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from ._anthropic import AnthropicWire
from ._behaviour import Failure, Hangup, Prompt, Reply, Wire, decide
from ._http import HttpServer, Request, Responder
from ._openai import OpenAIWire
from ._script import STEP_NAMES, Counters, ScriptError, script_for
from ._stats import RequestRecord, Stats, key_fingerprint

SCRIPT_HEADER = "x-scripted-behaviour"
"""The request header whose script wins over the model name's."""

_WIRES: dict[str, Wire] = {"/v1/chat/completions": OpenAIWire(), "/v1/messages": AnthropicWire()}
_OTHER_ROUTES = frozenset({"/_stats", "/_reset", "/v1/models"})


def _models() -> dict[str, Any]:
    """A model list both SDKs can read: one entry per step name."""
    data = [
        {
            "id": name,
            "object": "model",
            "type": "model",
            "created": 0,
            "created_at": "1970-01-01T00:00:00Z",
            "display_name": name,
            "owned_by": "tianshu",
        }
        for name in sorted(STEP_NAMES)
    ]
    return {
        "object": "list",
        "data": data,
        "has_more": False,
        "first_id": data[0]["id"],
        "last_id": data[-1]["id"],
    }


class ModelServer:
    """A scripted stand-in for the OpenAI and Anthropic APIs, over real HTTP on loopback.

    Use it as `async with ModelServer() as server:`, or from sync code as
    `with ModelServer.in_thread() as server:`; point an SDK at `openai_base_url` or
    `anthropic_base_url`. What each request gets is chosen by its script (see the package doc).
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, context_tokens: int | None = None) -> None:
        self.host = host
        self.context_tokens = context_tokens
        """The context budget: a prompt of more tokens gets the vendor's prompt-too-long error."""
        self.stats = Stats()
        self._counters = Counters()
        self._ids = itertools.count(1)
        self._http = HttpServer(self._handle, host, port)

    async def start(self) -> None:
        """Start listening."""
        await self._http.start()

    async def stop(self) -> None:
        """Stop listening and close every connection."""
        await self._http.stop()

    async def __aenter__(self) -> ModelServer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    @classmethod
    @contextmanager
    def in_thread(
        cls, host: str = "127.0.0.1", port: int = 0, *, context_tokens: int | None = None
    ) -> Iterator[ModelServer]:
        """A started server running on its own event loop in a background thread, for sync code."""
        server = cls(host, port, context_tokens=context_tokens)
        runner = _ThreadRunner(server)
        runner.start()
        try:
            yield server
        finally:
            runner.stop()

    @property
    def port(self) -> int:
        """The port it listens on (once started)."""
        return self._http.port

    @property
    def url(self) -> str:
        """`http://HOST:PORT`."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def openai_base_url(self) -> str:
        """The OpenAI SDK's `base_url`: `url + "/v1"`."""
        return f"{self.url}/v1"

    @property
    def anthropic_base_url(self) -> str:
        """The Anthropic SDK's `base_url` (the SDK adds `/v1/messages`)."""
        return self.url

    def reset(self) -> None:
        """Forget the stats and start every script over."""
        self.stats.reset()
        self._counters.clear()

    async def _handle(self, request: Request, responder: Responder) -> None:
        wire = _WIRES.get(request.path)
        if wire is not None and request.method == "POST":
            await self._model_request(wire, request, responder)
        elif request.path == "/_stats" and request.method == "GET":
            await responder.send_json(200, self.stats.to_json())
        elif request.path == "/_reset" and request.method == "POST":
            self.reset()
            await responder.send_json(200, {"reset": True})
        elif request.path == "/v1/models" and request.method == "GET":
            await responder.send_json(200, _models())
        elif wire is not None or request.path in _OTHER_ROUTES:
            await responder.send_json(405, {"error": {"message": f"{request.method} not allowed"}})
        else:
            await responder.send_json(404, {"error": {"message": f"no route {request.path}"}})

    async def _model_request(self, wire: Wire, request: Request, responder: Responder) -> None:
        started = time.monotonic()
        record = RequestRecord(path=request.path, api=wire.api)

        key = wire.api_key(request.headers)

        def done() -> None:
            record.seconds = time.monotonic() - started
            if key:
                record.redact(key)
            self.stats.closed(record)

        self.stats.opened()
        responder.on_finish = done
        exchange = _Exchange(wire, responder, record, f"scripted_{next(self._ids)}")
        record.api_key_sha256 = key_fingerprint(key) if key else None
        try:
            body = json.loads(request.body)
            if not isinstance(body, dict):
                raise ValueError("not an object")
        except ValueError as exc:
            await exchange.fail(Failure(400, message=f"the body is not a JSON object: {exc}"))
            return
        record.body = body
        prompt = wire.prompt(body)
        record.model, record.stream, record.cache_control = prompt.model, prompt.stream, prompt.cache_control
        if key is None:
            await exchange.fail(Failure(401))
            return
        try:
            script = script_for(prompt.model, request.headers.get(SCRIPT_HEADER))
        except ScriptError as exc:
            await exchange.fail(Failure(400, message=f"scripted model server: {exc}"))
            return
        record.script = script.source
        step = script.step(self._counters.next(wire.api, script.source))
        record.step = str(step)
        if step.delay:
            await asyncio.sleep(step.delay)
        outcome = decide(step, prompt, key, self.context_tokens)
        if isinstance(outcome, Failure):
            await exchange.fail(outcome)
        elif isinstance(outcome, Hangup):
            responder.hang_up()
        else:
            await exchange.reply(prompt, outcome, step.gap)


@dataclass
class _Exchange:
    """One model request being answered: where to write, what to record, in which shape."""

    wire: Wire
    responder: Responder
    record: RequestRecord
    request_id: str

    @property
    def headers(self) -> list[tuple[str, str]]:
        return [(self.wire.request_id_header, f"req_{self.request_id}")]

    async def fail(self, failure: Failure) -> None:
        """An HTTP error with the vendor's error body."""
        self.record.status = failure.status
        body = self.wire.error(failure)
        await self.responder.send_json(failure.status, body, headers=[*self.headers, *failure.headers()])

    async def reply(self, prompt: Prompt, reply: Reply, gap: float) -> None:
        """A 200: the whole answer, or its stream with `gap` seconds between events."""
        record, usage = self.record, reply.usage
        record.status = 200
        record.input_tokens, record.output_tokens = usage.total_input, usage.output
        record.cache_read_tokens, record.cache_write_tokens = usage.cache_read, usage.cache_write
        if not prompt.stream:
            body = self.wire.completion(reply, prompt, self.request_id)
            await self.responder.send_json(200, body, headers=self.headers)
            return
        await self.responder.start_stream(200, headers=self.headers)
        frames = list(self.wire.stream(reply, prompt, self.request_id))
        for i, frame in enumerate(frames):
            if i and gap:
                await asyncio.sleep(gap)
            if i == len(frames) - 1 and reply.ending != "cut":
                # A client stops reading at the last event (`[DONE]`, `message_stop`) without
                # waiting for the chunked body's end: count the request before it can see it.
                self.responder.finish()
            await self.responder.write(frame)
        if reply.ending == "cut":
            self.responder.hang_up()
        else:
            await self.responder.end()


class _ThreadRunner:
    """Runs a server on its own event loop in a daemon thread, from `start` to `stop`."""

    def __init__(self, server: ModelServer) -> None:
        self._server = server
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._thread = threading.Thread(
            target=lambda: asyncio.run(self._main()), name="model-server", daemon=True
        )

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        try:
            await self._server.start()
        except Exception as exc:
            self._error = exc
            return
        finally:
            self._ready.set()
        try:
            await self._stopping.wait()
        finally:
            await self._server.stop()

    def start(self) -> None:
        """Start the thread and wait until the server listens (or raise why it could not)."""
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            self._thread.join()
            raise self._error

    def stop(self) -> None:
        """Stop the server and wait for the thread to end."""
        if self._loop is not None and self._stopping is not None:
            self._loop.call_soon_threadsafe(self._stopping.set)
        self._thread.join()
