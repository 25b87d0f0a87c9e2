"""Put the Lambda invocation (request id, cold start) on asyncpool's OpenTelemetry spans.

Needs the OpenTelemetry SDK, which the application installs::

    provider = TracerProvider()
    provider.add_span_processor(InvocationSpanProcessor())
    provider.add_span_processor(BatchSpanProcessor(exporter))

Attributes are the FaaS semantic-convention names, ``faas.invocation_id`` and ``faas.coldstart``.
"""

from __future__ import annotations

from opentelemetry.context import Context

from asyncpool.errors import missing_dependency
from asyncpool.integrations.invocation import current_invocation

try:
    from opentelemetry.sdk.trace import Span, SpanProcessor
except ModuleNotFoundError as exc:  # asyncpool depends on the API only; the application has the SDK
    raise missing_dependency(exc, __name__, "opentelemetry-sdk") from exc

INVOCATION_ID = "faas.invocation_id"
COLDSTART = "faas.coldstart"


class InvocationSpanProcessor(SpanProcessor):
    """Stamps spans started while an invocation is served, from tracers named in `scopes`.

    `scopes` are instrumentation-scope (tracer) name prefixes; the default covers asyncpool's own
    tracers. Add ``"opentelemetry.instrumentation.asyncpg"`` to stamp query spans too.
    """

    def __init__(self, scopes: tuple[str, ...] = ("asyncpool",)) -> None:
        self.scopes = scopes

    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        invocation = current_invocation()
        if invocation is None:
            return
        scope = span.instrumentation_scope
        if scope is None or not _named_in(scope.name, self.scopes):
            return
        span.set_attribute(INVOCATION_ID, invocation.request_id)
        span.set_attribute(COLDSTART, invocation.cold_start)


def _named_in(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)
