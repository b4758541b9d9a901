"""Logging for the services: every record carries the case it was written for and its trace id."""

from __future__ import annotations

import logging
import os
from contextvars import ContextVar

from opentelemetry import trace

current_case: ContextVar[str | None] = ContextVar("tianshu_current_case", default=None)
"""The case whose run is in progress in this task (set by the engine around each run)."""

FORMAT = "%(asctime)s %(levelname)s %(name)s [case=%(case_key)s trace=%(trace_id)s]: %(message)s"


class ContextFilter(logging.Filter):
    """Adds `case_key` and `trace_id` to every record ("-" outside a run or a trace)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.case_key = current_case.get() or "-"
        context = trace.get_current_span().get_span_context()
        record.trace_id = format(context.trace_id, "032x") if context.is_valid else "-"
        return True


def configure_logging(level: str | None = None) -> None:
    """Log to stderr at `level` (default `TIANSHU_LOG_LEVEL`, else INFO), with case and trace ids."""
    logging.basicConfig(level=(level or os.environ.get("TIANSHU_LOG_LEVEL", "INFO")).upper(), format=FORMAT)
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, ContextFilter) for f in handler.filters):
            handler.addFilter(ContextFilter())
