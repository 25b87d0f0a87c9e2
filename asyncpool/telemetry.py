"""OpenTelemetry metrics and spans for a pool (placeholder until the telemetry work lands)."""

from __future__ import annotations

from asyncpool.config import PoolConfig
from asyncpool.observer import PoolObserver


class TelemetryObserver(PoolObserver):
    """Publishes the pool's metrics and spans through the OpenTelemetry API."""

    def __init__(self, config: PoolConfig) -> None:
        self.config = config
