"""OpenTelemetry for asyncpool: semantic-convention pool metrics, connection spans, log correlation.

Imported only when a pool with ``telemetry=True`` opens (or when you import it), so
``import asyncpool`` does not load OpenTelemetry. See docs/telemetry.md.
"""

from __future__ import annotations

from asyncpool.telemetry.logs import TraceContextFilter
from asyncpool.telemetry.observer import TelemetryObserver

__all__ = ["TelemetryObserver", "TraceContextFilter"]
