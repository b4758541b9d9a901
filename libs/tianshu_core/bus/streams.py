"""Streams and durable pull consumers, created or updated idempotently at start-up.

Only configuration that NATS 2.9 understands is used (no subject transforms, compression,
metadata, multiple filter subjects, per-message TTLs or consumer actions), so the same code runs
against the Debian-packaged server and current ones. Consumers are created through the
`CONSUMER.DURABLE.CREATE` API, which both 2.9 and newer servers treat as create-or-update.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    ConsumerInfo,
    DeliverPolicy,
    DiscardPolicy,
    RetentionPolicy,
    StorageType,
    StreamConfig,
    StreamInfo,
)
from nats.js.errors import APIError, NotFoundError

from tianshu_contracts import subjects

from .errors import StreamConfigError

log = logging.getLogger(__name__)

DAY_S = 24 * 3600.0


@dataclass(frozen=True, slots=True)
class StreamSpec:
    """What a stream must look like. Unset limits mean "none"."""

    name: str
    subjects: tuple[str, ...]
    retention: Literal["limits", "workqueue", "interest"] = "limits"
    storage: Literal["file", "memory"] = "file"
    replicas: int = 1
    max_age_s: float = 0.0
    max_bytes: int = -1
    max_msgs: int = -1
    max_msg_size: int = -1
    duplicate_window_s: float = 120.0
    description: str | None = None

    @property
    def duplicate_window(self) -> float:
        """The duplicate window the server gets: never longer than the stream's max age, which
        NATS refuses (a short event retention would otherwise stop the scheduler at start)."""
        if self.max_age_s > 0:
            return min(self.duplicate_window_s, self.max_age_s)
        return self.duplicate_window_s

    def config(self) -> StreamConfig:
        return StreamConfig(
            name=self.name,
            description=self.description,
            subjects=list(self.subjects),
            retention=RetentionPolicy(self.retention),
            storage=StorageType(self.storage),
            num_replicas=self.replicas,
            max_age=self.max_age_s,
            max_bytes=self.max_bytes,
            max_msgs=self.max_msgs,
            max_msg_size=self.max_msg_size,
            duplicate_window=self.duplicate_window,
            discard=DiscardPolicy.OLD,
        )

    def differences(self, current: StreamConfig) -> list[str]:
        """The settings in which `current` differs from this spec."""
        wanted = {
            "subjects": sorted(self.subjects),
            "retention": self.retention,
            "storage": self.storage,
            "num_replicas": self.replicas,
            "max_age": self.max_age_s,
            "max_bytes": self.max_bytes,
            "max_msgs": self.max_msgs,
            "max_msg_size": self.max_msg_size,
            "duplicate_window": self.duplicate_window,
            "description": self.description,
        }
        have = {
            "subjects": sorted(current.subjects or []),
            "retention": _value(current.retention),
            "storage": _value(current.storage),
            "num_replicas": current.num_replicas or 1,
            "max_age": current.max_age or 0.0,
            "max_bytes": current.max_bytes if current.max_bytes is not None else -1,
            "max_msgs": current.max_msgs if current.max_msgs is not None else -1,
            "max_msg_size": current.max_msg_size if current.max_msg_size is not None else -1,
            "duplicate_window": current.duplicate_window or 0.0,
            "description": current.description or None,
        }
        return _diff(wanted, have)


@dataclass(frozen=True, slots=True)
class ConsumerSpec:
    """A durable pull consumer with explicit acks.

    `max_deliver` is the server's limit; keep it unlimited (-1) and let the `Worker` enforce
    its own, so a message whose last delivery died with its process is dead-lettered rather than
    dropped silently by the server.
    """

    stream: str
    durable: str
    filter_subject: str | None = None
    ack_wait_s: float = 30.0
    max_deliver: int = -1
    max_ack_pending: int = 1000
    max_waiting: int = 512
    deliver_policy: Literal["all", "new"] = "all"
    description: str | None = None

    def config(self) -> ConsumerConfig:
        return ConsumerConfig(
            durable_name=self.durable,
            description=self.description,
            deliver_policy=DeliverPolicy(self.deliver_policy),
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=self.ack_wait_s,
            max_deliver=self.max_deliver,
            filter_subject=self.filter_subject,
            max_ack_pending=self.max_ack_pending,
            max_waiting=self.max_waiting,
        )

    def differences(self, current: ConsumerConfig) -> list[str]:
        """The settings in which `current` differs from this spec."""
        wanted = {
            "filter_subject": self.filter_subject or None,
            "ack_wait": self.ack_wait_s,
            "max_deliver": self.max_deliver,
            "max_ack_pending": self.max_ack_pending,
            "max_waiting": self.max_waiting,
            "deliver_policy": self.deliver_policy,
            "ack_policy": "explicit",
            "description": self.description,
        }
        have = {
            "filter_subject": current.filter_subject or None,
            "ack_wait": current.ack_wait or 0.0,
            "max_deliver": current.max_deliver if current.max_deliver is not None else -1,
            "max_ack_pending": current.max_ack_pending,
            "max_waiting": current.max_waiting,
            "deliver_policy": _value(current.deliver_policy),
            "ack_policy": _value(current.ack_policy),
            "description": current.description or None,
        }
        return _diff(wanted, have)


def _value(enum_or_str: Any) -> Any:
    return getattr(enum_or_str, "value", enum_or_str)


def _diff(wanted: dict[str, Any], have: dict[str, Any]) -> list[str]:
    out = []
    for key, want in wanted.items():
        got = have[key]
        same = math.isclose(want, got, abs_tol=1e-6) if isinstance(want, float) else want == got
        if not same:
            out.append(f"{key}: {got!r} -> {want!r}")
    return out


@dataclass(frozen=True, slots=True)
class TianshuStreams:
    """The streams of a Tianshu deployment, with their retention limits."""

    replicas: int = 1
    events_max_age_s: float = 7 * DAY_S
    cases_max_age_s: float = 7 * DAY_S
    calls_max_age_s: float = DAY_S
    """How long tool and model calls stay in their streams, answered or not: past any call's
    deadline, and past the duplicate window, so that a call sent again is recognised as the same
    one even after a NATS restart (a work queue forgets the ids of the messages it removed)."""
    dlq_max_age_s: float = 30 * DAY_S
    llm_stream_max_age_s: float = 600.0
    duplicate_window_s: float = 120.0
    extra: tuple[StreamSpec, ...] = field(default_factory=tuple)

    def specs(self) -> list[StreamSpec]:
        common: dict[str, Any] = {"replicas": self.replicas, "duplicate_window_s": self.duplicate_window_s}
        return [
            StreamSpec(
                name=subjects.STREAM_CASES,
                subjects=subjects.STREAM_SUBJECTS[subjects.STREAM_CASES],
                retention="workqueue",
                max_age_s=self.cases_max_age_s,
                description="Case starts and commands: work for the schedulers, removed once handled.",
                **common,
            ),
            StreamSpec(
                name=subjects.STREAM_EVENTS,
                subjects=subjects.STREAM_SUBJECTS[subjects.STREAM_EVENTS],
                max_age_s=self.events_max_age_s,
                description="Outside events; Postgres keeps what the cases consume.",
                **common,
            ),
            StreamSpec(
                name=subjects.STREAM_TOOLS,
                subjects=subjects.STREAM_SUBJECTS[subjects.STREAM_TOOLS],
                max_age_s=self.calls_max_age_s,
                description="Tool calls: work for the tool runners, through their one shared consumer.",
                **common,
            ),
            StreamSpec(
                name=subjects.STREAM_TOOL_RESULTS,
                subjects=subjects.STREAM_SUBJECTS[subjects.STREAM_TOOL_RESULTS],
                max_age_s=self.cases_max_age_s,
                description="Tool results, by case, for the schedulers; Nats-Msg-Id is the call id.",
                **common,
            ),
            StreamSpec(
                name=subjects.STREAM_LLM,
                subjects=subjects.STREAM_SUBJECTS[subjects.STREAM_LLM],
                max_age_s=self.calls_max_age_s,
                description="Model calls: work for the LLM gateways, through their one shared consumer.",
                **common,
            ),
            StreamSpec(
                name=subjects.STREAM_LLM_RESULTS,
                subjects=subjects.STREAM_SUBJECTS[subjects.STREAM_LLM_RESULTS],
                max_age_s=self.cases_max_age_s,
                description="Model call results, by case, for the schedulers.",
                **common,
            ),
            StreamSpec(
                name=subjects.STREAM_LLM_STREAM,
                subjects=subjects.STREAM_SUBJECTS[subjects.STREAM_LLM_STREAM],
                storage="memory",
                max_age_s=self.llm_stream_max_age_s,
                description="Streamed model calls' events, for followers; kept minutes, in memory.",
                replicas=self.replicas,
                duplicate_window_s=min(self.duplicate_window_s, self.llm_stream_max_age_s),
            ),
            StreamSpec(
                name=subjects.STREAM_DLQ,
                subjects=subjects.STREAM_SUBJECTS[subjects.STREAM_DLQ],
                max_age_s=self.dlq_max_age_s,
                description="Messages that could not be handled, with the reason.",
                **common,
            ),
            *self.extra,
        ]


def scheduler_consumers(*, ack_wait_s: float = 30.0, max_ack_pending: int = 1000) -> list[ConsumerSpec]:
    """The scheduler's durable consumers, shared by all its replicas."""
    common: dict[str, Any] = {"ack_wait_s": ack_wait_s, "max_ack_pending": max_ack_pending}
    return [
        ConsumerSpec(subjects.STREAM_CASES, subjects.CONSUMER_START, subjects.CASES_START, **common),
        ConsumerSpec(subjects.STREAM_CASES, subjects.CONSUMER_COMMANDS, subjects.CASE_COMMANDS, **common),
        ConsumerSpec(subjects.STREAM_EVENTS, subjects.CONSUMER_EVENTS, subjects.EVENTS, **common),
        ConsumerSpec(
            subjects.STREAM_TOOL_RESULTS, subjects.CONSUMER_TOOL_RESULTS, subjects.TOOL_RESULTS, **common
        ),
        ConsumerSpec(
            subjects.STREAM_LLM_RESULTS, subjects.CONSUMER_LLM_RESULTS, subjects.LLM_RESULTS, **common
        ),
    ]


async def ensure_stream(js: JetStreamContext, spec: StreamSpec) -> StreamInfo:
    """Create the stream, or update it when it differs from `spec`; a no-op when it matches."""
    try:
        info = await js.stream_info(spec.name)
    except NotFoundError:
        try:
            info = await js.add_stream(spec.config())
        except APIError as exc:
            raise StreamConfigError(f"cannot create stream {spec.name}: {exc.description or exc}") from exc
        log.info("created stream %s (%s)", spec.name, ", ".join(spec.subjects))
        return info
    current = _value(info.config.retention)
    if spec.retention != current and "workqueue" in (spec.retention, current):
        # NATS cannot change a stream's retention to or from workqueue: keep it, update the rest.
        log.warning(
            "stream %s keeps its %s retention (wanted: %s; NATS cannot change it in place). Delete "
            "it when it holds no work, and the next start creates it anew.",
            spec.name,
            current,
            spec.retention,
        )
        spec = replace(spec, retention=current)
    changes = spec.differences(info.config)
    if not changes:
        return info
    try:
        info = await js.update_stream(spec.config())
    except APIError as exc:
        raise StreamConfigError(
            f"stream {spec.name} exists with other settings ({'; '.join(changes)}) and the server "
            f"refused to update it: {exc.description or exc}. Change it by hand (nats stream edit) or "
            "delete it if its messages may go."
        ) from exc
    log.info("updated stream %s: %s", spec.name, "; ".join(changes))
    return info


async def ensure_streams(js: JetStreamContext, specs: Iterable[StreamSpec]) -> list[StreamInfo]:
    """`ensure_stream` for each spec, in order."""
    return [await ensure_stream(js, spec) for spec in specs]


async def ensure_consumer(js: JetStreamContext, spec: ConsumerSpec) -> ConsumerInfo:
    """Create the durable consumer, or update it when it differs from `spec`; a no-op when it matches."""
    try:
        info: ConsumerInfo = await js.consumer_info(spec.stream, spec.durable)
    except NotFoundError:
        changes: list[str] = []
    else:
        changes = spec.differences(info.config)
        if not changes:
            return info
    try:
        info = await js.add_consumer(spec.stream, spec.config())
    except APIError as exc:
        what = f"update it ({'; '.join(changes)})" if changes else "create it"
        raise StreamConfigError(
            f"consumer {spec.durable} on stream {spec.stream}: the server refused to {what}: "
            f"{exc.description or exc}"
        ) from exc
    if changes:
        log.info("updated consumer %s on %s: %s", spec.durable, spec.stream, "; ".join(changes))
    else:
        log.info("created consumer %s on %s (%s)", spec.durable, spec.stream, spec.filter_subject or "all")
    return info


async def ensure_consumers(js: JetStreamContext, specs: Sequence[ConsumerSpec]) -> list[ConsumerInfo]:
    """`ensure_consumer` for each spec, in order."""
    return [await ensure_consumer(js, spec) for spec in specs]


async def pull_subscription(js: JetStreamContext, spec: ConsumerSpec) -> JetStreamContext.PullSubscription:
    """Bind to the (already ensured) durable consumer of `spec`."""
    return await js.pull_subscribe_bind(durable=spec.durable, stream=spec.stream)
