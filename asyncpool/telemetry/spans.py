"""Spans for what the pool does on its own: opening connections and reclaiming leaks.

Query spans are opentelemetry-instrumentation-asyncpg's job; asyncpool makes none, so the two
together give one trace without duplicates.
"""

from __future__ import annotations

from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode, Tracer
from opentelemetry.util.types import Attributes

from asyncpool.connect.dsn import Target
from asyncpool.errors import ConnectionLeakedError
from asyncpool.observer import ConnectAttempt, LeakReport
from asyncpool.telemetry import semconv as sc
from asyncpool.telemetry.metrics import qualified_name

_ERROR = Status(StatusCode.ERROR)


class PoolSpans:
    """Makes one pool's spans. Times come from the pool's records, so spans are made afterwards."""

    def __init__(self, tracer: Tracer, pool_name: str, credentials_provider: str | None) -> None:
        self._tracer = tracer
        self._pool_name = pool_name
        self._credentials: dict[str, str] = (
            {sc.CREDENTIALS_PROVIDER: credentials_provider} if credentials_provider else {}
        )
        self._target: Target | None = None
        self._target_attributes: Attributes = {}
        self._connect_attributes: Attributes = {}

    def connect(self, attempt: ConnectAttempt) -> None:
        """A CLIENT span over one connection attempt, with the credential fetch as a child."""
        self._attributes_of(attempt.target)
        attributes = self._connect_attributes
        span = self._tracer.start_span(
            f"{sc.CONNECT_SPAN} {attempt.target.database}",
            kind=SpanKind.CLIENT,
            attributes=attributes,
            start_time=attempt.started_ns,
        )
        if attempt.credentials_started_ns is not None:
            failed = attempt.credentials_error
            child = self._tracer.start_span(
                sc.CREDENTIALS_SPAN,
                context=trace.set_span_in_context(span),
                kind=SpanKind.INTERNAL,
                attributes=self._credentials if failed is None else {
                    **self._credentials, sc.ERROR_TYPE: qualified_name(failed)},
                start_time=attempt.credentials_started_ns,
            )
            if failed is not None:
                # No description: the provider's message may hold a credential (a URL with
                # a token), so only its class is kept (the caller's error says the rest).
                child.set_status(_ERROR)
            child.end(end_time=attempt.credentials_ended_ns or attempt.ended_ns)
        if attempt.abandoned:
            # Its caller was cancelled (a client that went away): the login was stopped, it did
            # not fail. Status stays UNSET so error rates and alerts do not count it.
            span.set_attribute(sc.CONNECT_ABANDONED, True)
        elif attempt.error is not None:
            span.set_attribute(sc.ERROR_TYPE, error_type(attempt))
            sqlstate = getattr(attempt.error, "sqlstate", None)
            if isinstance(sqlstate, str):
                span.set_attribute(sc.DB_RESPONSE_STATUS_CODE, sqlstate)
            # No description: a server's message is not ours to copy into a trace backend.
            span.set_status(_ERROR)
        span.end(end_time=attempt.ended_ns)

    def leak(self, report: LeakReport, now_ns: int) -> None:
        """Mark a leak on the span that was current where the connection was acquired.

        The pool handles a leak in the holder's context, so that span is the current one. If it
        has ended or is not recorded, a span over the holding time carries the event instead.
        """
        event: Attributes = {
            sc.POOL_NAME: self._pool_name,
            sc.LEAK_ACTION: report.action,
            sc.LEAK_HELD_SECONDS: round(report.held_seconds, 6),
            sc.LEAK_TASK: report.task_name or "",
            sc.CODE_STACKTRACE: report.acquire_site,
        }
        current = trace.get_current_span()
        if current.is_recording():
            current.add_event(sc.LEAK_EVENT, event, timestamp=now_ns)
            return
        span = self._tracer.start_span(
            sc.LEAK_SPAN,
            kind=SpanKind.INTERNAL,
            attributes=self._attributes_of(report.target),
            start_time=now_ns - int(report.held_seconds * 1e9),
        )
        span.add_event(sc.LEAK_EVENT, event, timestamp=now_ns)
        if report.action == "reclaim":
            # The holder gets ConnectionLeakedError; under "log" it carries on, and a dropped
            # connection has no holder left.
            span.set_attribute(sc.ERROR_TYPE, qualified_name(ConnectionLeakedError))
            span.set_status(_ERROR)
        span.end(end_time=now_ns)

    def _attributes_of(self, target: Target) -> Attributes:
        if target != self._target:
            self._target = target
            self._target_attributes = {
                sc.DB_SYSTEM_NAME: sc.POSTGRESQL,
                sc.DB_NAMESPACE: target.database,
                sc.SERVER_ADDRESS: target.host,
                sc.SERVER_PORT: target.port,
                sc.POOL_NAME: self._pool_name,
            }
            # The conventions define no connection span; as a database client span it names
            # its one operation (conditionally required), as its name does.
            self._connect_attributes = {**self._target_attributes,
                                        sc.DB_OPERATION_NAME: sc.CONNECT_SPAN}
        return self._target_attributes


def error_type(attempt: ConnectAttempt) -> str:
    """`error.type` of a failed attempt: the class of the error its caller is given."""
    if attempt.caller_error is not None:
        return qualified_name(attempt.caller_error)
    return qualified_name(type(attempt.error)) if attempt.error is not None else ""
