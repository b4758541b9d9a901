"""Write the JSON Schema of every message and the AsyncAPI 3.0 document into `contracts/schemas/`.

    python -m tianshu_contracts.generate            # rewrite the files
    python -m tianshu_contracts.generate --check    # exit 1 when the files drift from the models

The files are checked into the repository; `tests/test_contracts.py` fails when they drift.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from . import subjects
from .catalog import CHANNELS, MESSAGES

JSON_SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"
ASYNCAPI_FILE = "asyncapi.json"
DEFAULT_OUT = Path(__file__).resolve().parent.parent / "schemas"

_HEADERS_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        subjects.HEADER_MSG_ID: {
            "type": "string",
            "description": "A deterministic message id: JetStream drops a repeat within the stream's "
            "duplicate window, and handlers are idempotent on it.",
        },
        "traceparent": {"type": "string", "description": "W3C trace context of the sender's span."},
        "tracestate": {"type": "string"},
    },
}


def schema_file(model: type[BaseModel]) -> str:
    """The file name of a model's schema."""
    return f"{model.__name__}.json"


def message_schema(model: type[BaseModel]) -> dict[str, Any]:
    """A model's JSON Schema (validation mode), self-contained: nested models in `$defs`."""
    return {"$schema": JSON_SCHEMA_DIALECT, **model.model_json_schema()}


def asyncapi() -> dict[str, Any]:
    """The AsyncAPI 3.0 document: channels are subjects, messages reference the schema files."""
    channels: dict[str, Any] = {}
    operations: dict[str, Any] = {}
    messages: dict[str, Any] = {
        model.__name__: {
            "name": model.__name__,
            "title": model.__name__,
            "summary": (model.__doc__ or "").strip().splitlines()[0],
            "contentType": "application/json",
            "headers": {"$ref": "#/components/schemas/Headers"},
            "payload": {"$ref": f"./{schema_file(model)}"},
        }
        for model in MESSAGES
    }
    messages["OutsideEvent"] = {
        "name": "OutsideEvent",
        "title": "OutsideEvent",
        "summary": "An outside event: the publisher's own JSON.",
        "contentType": "application/json",
        "headers": {"$ref": "#/components/schemas/Headers"},
        "payload": {"description": "Any JSON value."},
    }
    for channel in CHANNELS:
        names = [m.__name__ for m in channel.messages] or ["OutsideEvent"]
        entry: dict[str, Any] = {
            "address": channel.address,
            "description": channel.description,
            "messages": {name: {"$ref": f"#/components/messages/{name}"} for name in names},
        }
        if channel.parameters:
            entry["parameters"] = {k: {"description": v} for k, v in channel.parameters.items()}
        if channel.stream is not None:
            entry["x-tianshu-stream"] = channel.stream
        channels[channel.id] = entry
        if channel.address is None:
            continue  # a reply channel: described by the request's operation
        operation: dict[str, Any] = {
            "action": channel.action,
            "channel": {"$ref": f"#/channels/{channel.id}"},
            "messages": [{"$ref": f"#/channels/{channel.id}/messages/{name}"} for name in names],
        }
        if channel.reply is not None:
            reply = next(c for c in CHANNELS if c.id == channel.reply)
            operation["reply"] = {
                "channel": {"$ref": f"#/channels/{reply.id}"},
                "messages": [
                    {"$ref": f"#/channels/{reply.id}/messages/{m.__name__}"} for m in reply.messages
                ],
            }
        operations[f"{channel.action}{channel.id[0].upper()}{channel.id[1:]}"] = operation
    return {
        "asyncapi": "3.0.0",
        "info": {
            "title": "Tianshu",
            "version": subjects.VERSION,
            "description": "The messages Tianshu's services exchange over NATS JetStream. Streams: "
            + ", ".join(f"{name} ({', '.join(subs)})" for name, subs in subjects.STREAM_SUBJECTS.items())
            + ".",
        },
        "defaultContentType": "application/json",
        "servers": {"local": {"host": "127.0.0.1:4222", "protocol": "nats", "description": "Local NATS."}},
        "channels": channels,
        "operations": operations,
        "components": {"messages": messages, "schemas": {"Headers": _HEADERS_SCHEMA}},
    }


def render(document: dict[str, Any]) -> str:
    """Stable JSON text: the same models always give the same bytes."""
    return json.dumps(document, indent=2, ensure_ascii=False) + "\n"


def expected_files() -> dict[str, str]:
    """Every generated file's name and text."""
    files = {schema_file(model): render(message_schema(model)) for model in MESSAGES}
    files[ASYNCAPI_FILE] = render(asyncapi())
    return files


def drift(out: Path = DEFAULT_OUT) -> list[str]:
    """What differs between `out` and the models: missing, stale or extra files."""
    expected = expected_files()
    problems = []
    for name, text in expected.items():
        path = out / name
        if not path.exists():
            problems.append(f"missing {path}")
        elif path.read_text() != text:
            problems.append(f"stale {path}")
    problems.extend(f"extra {p}" for p in sorted(out.glob("*.json")) if p.name not in expected)
    return problems


def write(out: Path = DEFAULT_OUT) -> list[Path]:
    """Write every file (and remove schema files no model makes any more); returns what changed."""
    out.mkdir(parents=True, exist_ok=True)
    expected = expected_files()
    changed = []
    for name, text in expected.items():
        path = out / name
        if not path.exists() or path.read_text() != text:
            path.write_text(text)
            changed.append(path)
    for path in sorted(out.glob("*.json")):
        if path.name not in expected:
            path.unlink()
            changed.append(path)
    return changed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tianshu_contracts.generate", description=__doc__)
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help="where the files go (default: %(default)s)"
    )
    parser.add_argument("--check", action="store_true", help="only report drift; exit 1 when there is any")
    args = parser.parse_args(argv)
    if args.check:
        problems = drift(args.out)
        for problem in problems:
            print(problem, file=sys.stderr)
        return 1 if problems else 0
    for path in write(args.out):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
