"""Tracing: one trace per case, links to what woke it, SQL spans, and the services' OTLP export.

A case's runs are spans in the trace that started it (its `trace_parent`), wherever and whenever
they run; each links to the span that triggered it (an event's, a timer's, a start's). The
services send their spans over OTLP when OpenTelemetry's environment says so.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import nats
import pytest
from opentelemetry import trace

from tests._otlp import OtlpCollector, Span, by_name, descendants, one, traceparent
from tests._services import ROOT, SchedulerProcess, eventually, new_key
from tianshu_contracts import subjects
from tianshu_core import ExecutionState, connect_postgres
from tianshu_core.telemetry import configure_tracing, trace_id_of

# -- library mode ----------------------------------------------------------------------------------


@pytest.mark.postgres
def test_every_run_of_a_case_is_in_the_trace_that_started_it(pg_migrated_url: str) -> None:
    key = new_key("traced")
    out = subprocess.run(
        [sys.executable, "-m", "tests.tracing_worker", pg_migrated_url, key],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    spans: list[Span] = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    start, publish = one(spans, "client start"), one(spans, "client publish")
    runs = [s for s in by_name(spans, "tianshu.run_case") if s["attributes"]["tianshu.case_key"] == key]
    assert len(runs) == 3  # waits for the event; wakes and waits for its child; finishes
    # Every run: a child of the span that started the case, in its trace...
    assert {(r["trace_id"], r["parent_id"]) for r in runs} == {(start["trace_id"], start["span_id"])}
    # ...and linked to what ran it: the publish that woke it took it and ran it in its own span.
    woken = [r for r in runs if [publish["trace_id"], publish["span_id"]] in r["links"]]
    assert len(woken) == 1
    # Steps are spans of their run, and the SQL of a run is traced under it.
    step_a = one(spans, "tianshu.step", **{"tianshu.step": "a"})
    assert step_a["parent_id"] in {r["span_id"] for r in runs}
    sql = [s for r in runs for s in descendants(spans, r) if s["attributes"].get("db.system") == "postgresql"]
    assert sql, "no SQL span under the case's runs"
    # The child case joins the trace too, under the run that spawned it.
    child_runs = [
        s for s in by_name(spans, "tianshu.run_case") if s["attributes"]["tianshu.workflow"] == "traced_child"
    ]
    assert child_runs and {c["trace_id"] for c in child_runs} == {start["trace_id"]}
    assert {c["parent_id"] for c in child_runs} <= {r["span_id"] for r in runs}
    assert one(spans, "tianshu.step", **{"tianshu.step": "c"})["trace_id"] == start["trace_id"]


@pytest.mark.postgres
async def test_a_case_started_without_tracing_has_no_trace_parent(pg_migrated_url: str) -> None:
    """Tracing off (no provider): nothing is recorded, and the hot path stays span-free."""
    assert not trace.get_current_span().get_span_context().is_valid
    stores = await connect_postgres(pg_migrated_url, max_size=2)
    try:
        from tianshu_core import Engine, WorkflowRegistry

        engine = Engine(stores, WorkflowRegistry())
        case = await engine.start_case("anything", case_key=new_key("untraced"))
        stored = await stores.cases.get_by_key(case.case_key)
        assert stored is not None and stored.trace_parent is None
    finally:
        await stores.close()


def test_configure_tracing_is_off_unless_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("OTEL_TRACES_EXPORTER", "OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    configure_tracing("tianshu-test")()
    assert isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("OTEL_SDK_DISABLED", "true")
    configure_tracing("tianshu-test")()
    assert isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider)
    monkeypatch.delenv("OTEL_SDK_DISABLED")
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "jaeger-thrift")
    with pytest.raises(ValueError, match="otlp, console and none"):
        configure_tracing("tianshu-test")
    assert isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider)


# -- the scheduler service, exporting over OTLP ----------------------------------------------------


@pytest.fixture
def collector() -> Iterator[OtlpCollector]:
    c = OtlpCollector()
    yield c
    c.close()


@pytest.mark.e2e
@pytest.mark.nats
@pytest.mark.postgres
async def test_the_scheduler_exports_one_trace_per_case_over_otlp(
    tmp_path: Path, pg_migrated_url: str, nats_url: str, collector: OtlpCollector
) -> None:
    key = new_key("otlp")
    start_header, start_trace, start_span = traceparent()
    event_header, event_trace, event_span = traceparent()
    scheduler = SchedulerProcess(
        tmp_path,
        pg_migrated_url,
        nats_url,
        OTEL_EXPORTER_OTLP_ENDPOINT=collector.url,
        OTEL_BSP_SCHEDULE_DELAY="100",
    ).start()
    nc = await nats.connect(nats_url)
    stores = await connect_postgres(pg_migrated_url, max_size=1)
    try:
        body = {"kind": "start_case", "workflow_code": "e2e_wait", "case_key": key}
        await nc.jetstream().publish(
            subjects.CASES_START,
            json.dumps(body).encode(),
            headers={subjects.HEADER_MSG_ID: f"start-{key}", "traceparent": start_header},
        )

        async def in_state(state: ExecutionState) -> bool:
            case = await stores.cases.get_by_key(key)
            return case is not None and case.execution_state is state

        await eventually(lambda: in_state(ExecutionState.WAITING), what="the case waits")
        await nc.jetstream().publish(
            subjects.event("order", key), b'{"paid": 1}', headers={"traceparent": event_header}
        )
        await eventually(lambda: in_state(ExecutionState.FINISHED), what="the case finishes")
        # A client reading the case learns its trace: the one to look up in Jaeger.
        reply = await nc.request(
            subjects.RPC_CASES_GET, json.dumps({"kind": "get_case", "case_key": key}).encode(), timeout=10
        )
        assert json.loads(reply.data)["case"]["trace_id"] == start_trace
    finally:
        await nc.close()
        await stores.close()
        assert scheduler.terminate() == 0  # SIGTERM flushes the spans still buffered
    spans = [s for s in collector.spans if s["service"] == "tianshu-scheduler"]
    assert spans, "the scheduler exported nothing"
    started = one(spans, "process tianshu.v1.cases.start")
    assert (started["trace_id"], started["parent_id"]) == (start_trace, start_span)  # our publish's trace
    runs = [s for s in by_name(spans, "tianshu.run_case") if s["attributes"]["tianshu.case_key"] == key]
    assert len(runs) == 2  # until the wait, then after the event
    assert {(r["trace_id"], r["parent_id"]) for r in runs} == {(start_trace, started["span_id"])}
    woke = one(spans, "process tianshu.v1.events.{resource_type}.{resource_id}")
    assert (woke["trace_id"], woke["parent_id"]) == (event_trace, event_span)
    assert [[woke["trace_id"], woke["span_id"]]] in [r["links"] for r in runs]  # the run the event woke
    for step in ("before", "after"):
        assert one(spans, "tianshu.step", **{"tianshu.step": step})["trace_id"] == start_trace
    sql = [s for r in runs for s in descendants(spans, r) if s["attributes"].get("db.system") == "postgresql"]
    assert sql, "no SQL span under the case's runs"
    assert uuid.UUID(int=int(start_trace, 16))  # a real 128-bit id, as Jaeger shows it


def test_trace_id_of_a_traceparent() -> None:
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    assert trace_id_of(f"00-{trace_id}-00f067aa0ba902b7-01") == trace_id
    assert trace_id_of(None) is None
    assert trace_id_of("garbage") is None
