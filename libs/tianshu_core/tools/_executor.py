"""Running tool calls: the `ToolExecutor` seam, and the in-process executor over a registry.

The loop hands an executor one `ToolCall` at a time and records the `ToolResult` it returns.
`LocalToolExecutor` runs the tool in this process; the tool-runner service uses the same class
on its side of NATS, and a NATS-backed executor on the workflow's side publishes the call as a
`ToolCallRequest` instead. Every failure a model can cause or should hear about (unknown tool,
invalid arguments, an exception, a timeout) is returned as a result with `is_error=True`, never
raised.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from tianshu_contracts.llm import ToolCall, ToolResult, ToolSpec

from .. import serde
from ..errors import TianshuError
from ._tool import Tool, ToolSafety, check_arguments, spec_of

if TYPE_CHECKING:
    from ._registry import ToolRegistry

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 60.0
DEFAULT_MAX_RESULT_BYTES = 64 * 1024


@dataclass(frozen=True, slots=True)
class ToolInvocation:
    """Where a call comes from: what an executor that sends calls elsewhere needs.

    `step` is the journal name the result is recorded under (unique within the case) and `call_id`
    a digest of (case key, step): unique across cases and the same on every replay, so it serves as
    the message id that makes a re-sent call a duplicate, and as the key its result is stored by.
    """

    case_key: str
    step: str
    call_id: str

    @classmethod
    def of(cls, case_key: str, step: str) -> ToolInvocation:
        """The invocation of the call whose result `case_key` records under `step`."""
        digest = hashlib.sha256(f"{case_key}\x00{step}".encode()).hexdigest()[:32]
        return cls(case_key, step, digest)


class ToolCallPending(TianshuError):  # noqa: N818 - a signal to wait, not a failure
    """Raised by an executor whose call was sent but not answered within its hot window.

    The loop then parks the case as an ordinary wait on resource `TOOL_RESULT_RESOURCE` with the
    invocation's `call_id` as its id, for at most `wait_s` seconds; whoever receives the result
    publishes it there as an event (a `ToolCallResult`), which wakes the case, and the replay
    records it without calling the executor again. Past `wait_s` the model gets an error result.
    """

    code = "tool_call_pending"

    def __init__(self, wait_s: float) -> None:
        super().__init__(f"tool call sent; its result is awaited for up to {wait_s:g} s")
        self.wait_s = wait_s


@runtime_checkable
class ToolExecutor(Protocol):
    """Runs one tool call and returns its result; errors are results with `is_error`, not raised.

    `timeout_s` bounds the call (None: the executor's default). `invocation` says which case and
    journal record the call belongs to; an in-process executor may ignore it. An executor may raise
    `ToolCallPending` to have the case wait for the result as a row.
    """

    async def execute(
        self, call: ToolCall, *, timeout_s: float | None = None, invocation: ToolInvocation | None = None
    ) -> ToolResult: ...


def error_result(call: ToolCall, message: str) -> ToolResult:
    """A result that tells the model its call failed, and why."""
    return ToolResult(call_id=call.id, content=message, is_error=True)


def nul_message(tool: str) -> str:
    """What the model is told when a tool's result holds a NUL character."""
    return (
        f"tool {tool} returned text holding a NUL character (\\u0000), which cannot be stored or "
        "given to the model; its result was dropped (binary output must be encoded, e.g. base64)"
    )


def truncate(text: str, limit: int, *, total: int | None = None) -> str:
    """`text` cut to at most `limit` UTF-8 bytes, marker included: `\\n[truncated: N of M bytes]`.

    N is the number of bytes kept, M the original size: `total` when `text` is itself the kept
    part of a longer original (a result cut again), else the size of `text`. The cut never splits
    a character.
    """
    raw = text.encode()
    size = len(raw) if total is None else total
    if len(raw) <= limit and size == len(raw):
        return text
    room = max(0, limit - len(f"\n[truncated: {size} of {size} bytes]"))
    kept = raw[:room].decode(errors="ignore")
    return f"{kept}\n[truncated: {len(kept.encode())} of {size} bytes]"


_MARKER = re.compile(r"\n\[truncated: (\d+) of (\d+) bytes\]\Z")


def truncated_parts(text: str) -> tuple[str, int]:
    """(the part kept, the original size) of a text `truncate` cut; (text, its size) otherwise."""
    found = _MARKER.search(text)
    if found is not None:
        kept = text[: found.start()]
        if len(kept.encode()) == int(found.group(1)):
            return kept, int(found.group(2))
    return text, len(text.encode())


def parse_arguments(text: str) -> tuple[dict[str, Any] | None, str | None]:
    """The model's argument text as an object, or the reason it is not one."""
    try:
        value = serde.loads(text or "{}")
    except ValueError as exc:
        return None, f"not valid JSON ({exc})"
    if not isinstance(value, dict):
        return None, f"expected a JSON object, got {type(value).__name__}"
    return value, None


def _timeout(*limits: float | None) -> float | None:
    present = [t for t in limits if t is not None]
    return min(present) if present else None


class LocalToolExecutor:
    """Runs calls in this process against a `ToolRegistry`.

    A call runs for at most the smaller of the tool's own `timeout_s` and the call's (default
    `default_timeout_s`); a result longer than `max_result_bytes` is cut with a marker.
    """

    def __init__(
        self,
        registry: ToolRegistry,
        *,
        default_timeout_s: float | None = DEFAULT_TIMEOUT_S,
        max_result_bytes: int = DEFAULT_MAX_RESULT_BYTES,
    ) -> None:
        if max_result_bytes < 1:
            raise ValueError("max_result_bytes must be at least 1")
        self.registry = registry
        self.default_timeout_s = default_timeout_s
        self.max_result_bytes = max_result_bytes

    async def execute(
        self,
        call: ToolCall,
        *,
        timeout_s: float | None = None,
        invocation: ToolInvocation | None = None,  # noqa: ARG002 - in-process: nothing to route
    ) -> ToolResult:
        """Validate and run `call`; every failure is an error result.

        A result holding a NUL character becomes an error result: Postgres cannot store it, and
        the model learns at once that the tool's output was not text it can be given."""
        result = await self._execute(call, timeout_s)
        if "\x00" in result.content:
            log.info("tool %s: call %s returned a NUL character; answering with an error", call.name, call.id)
            return error_result(call, nul_message(call.name))
        content = truncate(result.content, self.max_result_bytes)
        return result if content is result.content else result.model_copy(update={"content": content})

    async def _execute(self, call: ToolCall, timeout_s: float | None) -> ToolResult:
        t = self.registry.get(call.name)
        if t is None:
            return error_result(call, f"unknown tool: {call.name}")
        arguments, problem = parse_arguments(call.arguments)
        if arguments is not None:
            problem = check_arguments(t, arguments)
        if problem is not None or arguments is None:
            log.info("tool %s: call %s has invalid arguments: %s", call.name, call.id, problem)
            return error_result(call, f"invalid arguments for tool {call.name}: {problem}")
        limit = _timeout(
            getattr(t, "timeout_s", None), self.default_timeout_s if timeout_s is None else timeout_s
        )
        started = time.monotonic()
        try:
            async with asyncio.timeout(limit) as scope:
                text = await t.execute(arguments)
            if not isinstance(text, str):  # a tool that broke its contract; the model still gets text
                text = serde.dumps(text)
        except TimeoutError as exc:
            if scope.expired():
                log.warning("tool %s: call %s timed out after %s s", call.name, call.id, limit)
                return error_result(call, f"tool {call.name} timed out after {limit:g} s")
            return self._failed(call, exc)
        except Exception as exc:
            return self._failed(call, exc)
        log.debug("tool %s: call %s answered in %.3f s", call.name, call.id, time.monotonic() - started)
        return ToolResult(call_id=call.id, content=text)

    @staticmethod
    def _failed(call: ToolCall, exc: Exception) -> ToolResult:
        log.warning("tool %s: call %s failed", call.name, call.id, exc_info=exc)
        return error_result(call, f"tool {call.name} failed: {type(exc).__name__}: {exc}")


@dataclass(frozen=True, slots=True)
class Toolset:
    """What the tool loop needs: the specs the model is shown, each tool's safety, an executor.

    `ToolRegistry.toolset()` makes one that runs the tools in-process; pass another executor (one
    that sends calls to the tool runners, say) to run the same tools elsewhere.
    """

    executor: ToolExecutor
    specs: tuple[ToolSpec, ...]
    safety: Mapping[str, ToolSafety] = field(default_factory=dict)

    @classmethod
    def of(cls, executor: ToolExecutor, tools: Iterable[Tool]) -> Toolset:
        """A toolset offering `tools` (their specs and safety), executed by `executor`."""
        listed = list(tools)
        return cls(executor, tuple(spec_of(t) for t in listed), {t.name: t.safety for t in listed})

    def knows(self, name: str) -> bool:
        """True when the model was offered a tool of that name."""
        return any(s.name == name for s in self.specs)

    def safety_of(self, name: str) -> ToolSafety:
        """A tool's safety; unknown tools count as exclusive (they run alone)."""
        return self.safety.get(name, ToolSafety.EXCLUSIVE)
