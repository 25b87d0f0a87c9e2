"""Trace ids on asyncpool's log records, so a leak or a failed login can be found in its trace."""

from __future__ import annotations

import logging

from opentelemetry import trace

# The record attributes opentelemetry-instrumentation-logging sets, so one log format serves both.
TRACE_ID = "otelTraceID"
SPAN_ID = "otelSpanID"
TRACE_SAMPLED = "otelTraceSampled"


class TraceContextFilter(logging.Filter):
    """Adds the current span's ids to each record ("0" when no span is active)."""

    def filter(self, record: logging.LogRecord) -> bool:
        context = trace.get_current_span().get_span_context()
        if context.is_valid:
            setattr(record, TRACE_ID, format(context.trace_id, "032x"))
            setattr(record, SPAN_ID, format(context.span_id, "016x"))
            setattr(record, TRACE_SAMPLED, context.trace_flags.sampled)
        else:
            setattr(record, TRACE_ID, "0")
            setattr(record, SPAN_ID, "0")
            setattr(record, TRACE_SAMPLED, False)
        return True


_FILTER = TraceContextFilter()


def add_trace_ids_to_logs() -> None:
    """Put the filter on every `asyncpool` logger that exists (idempotent).

    A filter on a logger sees only that logger's own records, not its children's, so it goes on
    each one; modules that log (pool, leaks, credentials providers) are imported by the time a
    pool opens.
    """
    manager = logging.Logger.manager
    names = [
        name for name in list(manager.loggerDict)
        if name == "asyncpool" or name.startswith("asyncpool.")
    ]
    for name in {"asyncpool.pool", "asyncpool.leaks", *names}:
        logging.getLogger(name).addFilter(_FILTER)
