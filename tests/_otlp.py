"""Spans as tests read them, and an OTLP/HTTP receiver the services export to.

`OtlpCollector` stands in for Jaeger's OTLP port (4318): the services send it real OTLP requests
(protobuf over HTTP, from OpenTelemetry's own exporter), and it keeps the spans in memory.
"""

from __future__ import annotations

import gzip
import secrets
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

Span = dict[str, Any]


def by_name(spans: list[Span], name: str) -> list[Span]:
    return [s for s in spans if s["name"] == name]


def one(spans: list[Span], name: str, **attributes: Any) -> Span:
    found = [
        s for s in by_name(spans, name) if all(s["attributes"].get(k) == v for k, v in attributes.items())
    ]
    assert len(found) == 1, (
        f"{len(found)} spans {name} {attributes} among {sorted({s['name'] for s in spans})}"
    )
    return found[0]


def descendants(spans: list[Span], root: Span) -> list[Span]:
    children = [s for s in spans if s["parent_id"] == root["span_id"] and s["trace_id"] == root["trace_id"]]
    return children + [d for c in children for d in descendants(spans, c)]


def traceparent() -> tuple[str, str, str]:
    """A new W3C traceparent of our own (a publisher's span): (header, trace id, span id)."""
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    return f"00-{trace_id}-{span_id}-01", trace_id, span_id


class OtlpCollector:
    """An OTLP/HTTP trace receiver on loopback: what Jaeger's port 4318 does, kept in memory."""

    def __init__(self) -> None:
        self.spans: list[Span] = []
        collector = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                request = ExportTraceServiceRequest()
                request.ParseFromString(body)
                collector.take(request)
                reply = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *_args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def take(self, request: ExportTraceServiceRequest) -> None:
        for resource_spans in request.resource_spans:
            resource = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
            for scope_spans in resource_spans.scope_spans:
                for s in scope_spans.spans:
                    attributes: dict[str, Any] = {}
                    for a in s.attributes:
                        kind = a.value.WhichOneof("value")
                        attributes[a.key] = getattr(a.value, kind) if kind else None
                    self.spans.append(
                        {
                            "service": resource.get("service.name"),
                            "name": s.name,
                            "trace_id": s.trace_id.hex(),
                            "span_id": s.span_id.hex(),
                            "parent_id": s.parent_span_id.hex() or None,
                            "links": [[link.trace_id.hex(), link.span_id.hex()] for link in s.links],
                            "attributes": attributes,
                        }
                    )

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
