"""A minimal HTTP/1.1 server on `asyncio.start_server`: keep-alive, and chunked bodies for SSE.

Enough for httpx (which both vendor SDKs use): requests with a Content-Length or chunked body,
`Expect: 100-continue`, answers with a Content-Length, and streams with
`Transfer-Encoding: chunked`, so that a stream closed before its last chunk reads as cut short.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from http import HTTPStatus
from urllib.parse import urlsplit

log = logging.getLogger("tianshu_core.local.model_server")

MAX_BODY_BYTES = 64 * 1024 * 1024
MAX_HEAD_BYTES = 1024 * 1024
HeaderList = Iterable[tuple[str, str]]
_REASONS = {s.value: s.phrase for s in HTTPStatus} | {529: "Overloaded"}


class BadRequestError(Exception):
    """A request that is not HTTP/1.1 as this server reads it; answered with `status`, then closed."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Request:
    """One request: header names are lower-cased, the body is read in full."""

    method: str
    path: str
    query: str
    headers: dict[str, str]
    body: bytes
    keep_alive: bool


def bearer_token(headers: Mapping[str, str]) -> str | None:
    """The token of an `Authorization: Bearer TOKEN` header, if there is one."""
    scheme, _, token = headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer":
        return None
    return token.strip() or None


def sse_frame(data: object, event: str | None = None) -> bytes:
    """One server-sent event: `event: NAME` if given, and `data: JSON` (or the string as is)."""
    text = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {text}\n\n".encode()


class Responder:
    """Writes the answer to one request: a whole body, or a chunked stream, or nothing at all.

    `on_finish` runs once, just before the answer's last byte is written (or the connection is
    dropped), so whoever keeps count is up to date before the client can see the end.
    """

    def __init__(self, writer: asyncio.StreamWriter, keep_alive: bool) -> None:
        self._writer = writer
        self.keep_alive = keep_alive
        self.on_finish: Callable[[], None] | None = None
        self.started = False
        self.streaming = False
        self.closed = False
        self._finished = False

    def finish(self) -> None:
        """Run `on_finish`, once."""
        if not self._finished:
            self._finished = True
            if self.on_finish is not None:
                self.on_finish()

    def _head(self, status: int, headers: HeaderList) -> bytes:
        if self.started:
            raise RuntimeError("the answer has already begun")
        self.started = True
        reason = _REASONS.get(status) or "Unknown"
        lines = [f"HTTP/1.1 {status} {reason}", "server: tianshu-model-server"]
        lines += [f"{name}: {value}" for name, value in headers]
        lines.append(f"connection: {'keep-alive' if self.keep_alive else 'close'}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    async def send(
        self, status: int, body: bytes, *, content_type: str = "application/json", headers: HeaderList = ()
    ) -> None:
        """A whole answer with a Content-Length."""
        head = self._head(
            status, [("content-type", content_type), ("content-length", str(len(body))), *headers]
        )
        self.finish()
        self._writer.write(head + body)
        await self._writer.drain()

    async def send_json(self, status: int, payload: object, *, headers: HeaderList = ()) -> None:
        """A whole JSON answer."""
        await self.send(status, json.dumps(payload).encode(), headers=headers)

    async def start_stream(
        self,
        status: int,
        *,
        content_type: str = "text/event-stream; charset=utf-8",
        headers: HeaderList = (),
    ) -> None:
        """The head of a chunked answer; `write` sends its chunks and `end` its last one."""
        head = self._head(
            status,
            [
                ("content-type", content_type),
                ("cache-control", "no-cache"),
                ("transfer-encoding", "chunked"),
                *headers,
            ],
        )
        self.streaming = True
        self._writer.write(head)
        await self._writer.drain()

    async def write(self, data: bytes) -> None:
        """One chunk of a stream."""
        if data:
            self._writer.write(b"%x\r\n%b\r\n" % (len(data), data))
            await self._writer.drain()

    async def end(self) -> None:
        """The stream's last chunk: it ended cleanly."""
        self.finish()
        self._writer.write(b"0\r\n\r\n")
        await self._writer.drain()

    def hang_up(self) -> None:
        """Close the connection at once, however much of the answer was sent."""
        self.finish()
        self.closed = True
        self._writer.close()


Handler = Callable[[Request, Responder], Awaitable[None]]


async def _read_body(reader: asyncio.StreamReader, headers: dict[str, str]) -> bytes:
    if "chunked" in headers.get("transfer-encoding", "").lower():
        body = bytearray()
        while True:
            size = int((await reader.readline()).split(b";")[0].strip() or b"x", 16)
            if size == 0:
                while (await reader.readline()).strip():  # trailers
                    pass
                return bytes(body)
            if len(body) + size > MAX_BODY_BYTES:
                raise BadRequestError("body too large", 413)
            body += await reader.readexactly(size)
            await reader.readexactly(2)
    length = int(headers.get("content-length", "0"))
    if length < 0 or length > MAX_BODY_BYTES:
        raise BadRequestError("body too large", 413)
    return await reader.readexactly(length)


async def read_request(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> Request | None:
    """The next request on a connection; None when the client closed it between requests."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as exc:
        if exc.partial.strip():
            raise BadRequestError("the request head was cut short") from None
        return None
    except asyncio.LimitOverrunError:
        raise BadRequestError("request head too large", 431) from None
    try:
        request_line, *header_lines = head.decode("latin-1").split("\r\n")
        method, target, version = request_line.split(" ")
        headers: dict[str, str] = {}
        for line in filter(None, header_lines):
            name, sep, value = line.partition(":")
            if not sep:
                raise ValueError(line)
            headers[name.strip().lower()] = value.strip()
        if headers.get("expect", "").lower() == "100-continue":
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        body = await _read_body(reader, headers)
    except ValueError:
        raise BadRequestError("malformed request") from None
    connection = headers.get("connection", "").lower()
    keep_alive = connection == "keep-alive" if version == "HTTP/1.0" else connection != "close"
    url = urlsplit(target)
    return Request(method.upper(), url.path, url.query, headers, body, keep_alive)


class HttpServer:
    """Serves `handler` on host:port (0 picks a free port) until `stop`."""

    def __init__(self, handler: Handler, host: str, port: int) -> None:
        self._handler = handler
        self._host = host
        self._port = port
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()

    @property
    def port(self) -> int:
        """The port it listens on."""
        if self._server is None:
            raise RuntimeError("the server is not started")
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self) -> None:
        """Listen."""
        if self._server is not None:
            raise RuntimeError("the server is already started")
        self._server = await asyncio.start_server(self._serve, self._host, self._port, limit=MAX_HEAD_BYTES)

    async def stop(self) -> None:
        """Stop listening and close every connection, open streams included."""
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        for task in list(self._connections):
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)
        await server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        try:
            await self._requests(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            # The client went away, or `stop` cancelled the connection (which must not end
            # cancelled: asyncio's stream callback would log it).
            pass
        finally:
            self._connections.discard(task)
            writer.close()
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await writer.wait_closed()

    async def _requests(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                request = await read_request(reader, writer)
            except BadRequestError as exc:
                responder = Responder(writer, keep_alive=False)
                await responder.send_json(exc.status, {"error": {"message": str(exc), "type": "bad_request"}})
                return
            if request is None:
                return
            responder = Responder(writer, request.keep_alive)
            try:
                await self._handler(request, responder)
            except (ConnectionError, asyncio.IncompleteReadError):
                raise
            except Exception:
                log.exception("model server: %s %s failed", request.method, request.path)
                if responder.started:
                    responder.hang_up()
                else:
                    await responder.send_json(
                        500, {"error": {"message": "internal error", "type": "server_error"}}
                    )
            finally:
                responder.finish()
            if responder.closed or not responder.keep_alive:
                return
