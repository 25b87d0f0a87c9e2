"""The names asyncpool publishes: OpenTelemetry semantic conventions, plus its own `asyncpool.*`.

Kept in one place so the instruments, the spans, the tests and the dashboard agree on every name.
The `db.client.connection.*` metrics follow the database semantic conventions (Development status).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

InstrumentKind = Literal["counter", "histogram", "updowncounter"]


@dataclass(frozen=True)
class MetricSpec:
    name: str
    kind: InstrumentKind
    unit: str
    description: str
    #: False for an instrument read at collection time (observable): from `stats()`, or from the
    #: totals the observer keeps.
    recorded: bool = True


# -- attributes ------------------------------------------------------------------------------------
POOL_NAME = "db.client.connection.pool.name"
STATE = "db.client.connection.state"
STATE_IDLE = "idle"
STATE_USED = "used"
DB_SYSTEM_NAME = "db.system.name"
DB_NAMESPACE = "db.namespace"
DB_RESPONSE_STATUS_CODE = "db.response.status_code"
DB_OPERATION_NAME = "db.operation.name"
SERVER_ADDRESS = "server.address"
SERVER_PORT = "server.port"
ERROR_TYPE = "error.type"
CODE_STACKTRACE = "code.stacktrace"
POSTGRESQL = "postgresql"

CREDENTIALS_PROVIDER = "asyncpool.credentials.provider"
# "reclaim" or "log", as `leak_action`; "dropped": given back by the garbage collector.
LEAK_ACTION = "asyncpool.leak.action"
LEAK_HELD_SECONDS = "asyncpool.leak.held_seconds"
LEAK_TASK = "asyncpool.leak.task"
# On a connect span whose caller was cancelled mid-login (no error: status UNSET).
CONNECT_ABANDONED = "asyncpool.connect.abandoned"
CACHE_RESULT = "asyncpool.statement_cache.result"  # "hit" or "miss"

# -- spans -----------------------------------------------------------------------------------------
# Named "connect <db.namespace>", after "{db.operation.name} {target}"; its db.operation.name.
CONNECT_SPAN = "connect"
CREDENTIALS_SPAN = "asyncpool.credentials"
LEAK_SPAN = "asyncpool.leak"
# Parent of the query span of a statement the pool sends on its own: "asyncpool.pool_statement
# validate" (the checkout check, SELECT 1) or "... reset" (finishing a cancelled query, ROLLBACK).
POOL_STATEMENT_SPAN = "asyncpool.pool_statement"
POOL_STATEMENT_PURPOSE = "asyncpool.pool_statement.purpose"
LEAK_EVENT = "asyncpool.connection.leaked"

# -- metrics ---------------------------------------------------------------------------------------
CONNECTION_COUNT = MetricSpec(
    "db.client.connection.count", "updowncounter", "{connection}",
    "The number of connections that are currently in state described by the `state` attribute.",
    recorded=False,
)
CONNECTION_MAX = MetricSpec(
    "db.client.connection.max", "updowncounter", "{connection}",
    "The maximum number of open connections allowed.", recorded=False,
)
CONNECTION_IDLE_MAX = MetricSpec(
    "db.client.connection.idle.max", "updowncounter", "{connection}",
    "The maximum number of idle open connections allowed.", recorded=False,
)
CONNECTION_IDLE_MIN = MetricSpec(
    "db.client.connection.idle.min", "updowncounter", "{connection}",
    "The minimum number of idle open connections allowed.", recorded=False,
)
PENDING_REQUESTS = MetricSpec(
    "db.client.connection.pending_requests", "updowncounter", "{request}",
    "The number of current pending requests for an open connection.", recorded=False,
)
TIMEOUTS = MetricSpec(
    "db.client.connection.timeouts", "counter", "{timeout}",
    "The number of connection timeouts that have occurred trying to obtain a connection from the "
    "pool.", recorded=False,
)
CREATE_TIME = MetricSpec(
    "db.client.connection.create_time", "histogram", "s",
    "The time it took to create a new connection.",
)
WAIT_TIME = MetricSpec(
    "db.client.connection.wait_time", "histogram", "s",
    "The time it took to obtain an open connection from the pool.",
)
USE_TIME = MetricSpec(
    "db.client.connection.use_time", "histogram", "s",
    "The time between borrowing a connection and returning it to the pool.",
)
LEAKS = MetricSpec(
    "asyncpool.connection.leaks", "counter", "{connection}",
    "Connections held past leak_timeout (attribute asyncpool.leak.action: reclaim or log), or "
    "dropped by their holder unreturned (dropped).",
    recorded=False,
)
VALIDATION_FAILURES = MetricSpec(
    "asyncpool.connection.validation_failures", "counter", "{connection}",
    "Idle connections that failed their checkout check and were replaced.", recorded=False,
)
CREATE_ERRORS = MetricSpec(
    "asyncpool.connection.create_errors", "counter", "{error}",
    "Connection attempts that failed (attribute error.type: the class of the error the caller "
    "is given, e.g. asyncpool.errors.AuthenticationError).",
    recorded=False,
)

# "unnamed" only (prepared_statements="unnamed"): read from stats() at collection.
CACHE_LOOKUPS = MetricSpec(
    "asyncpool.statement_cache.lookups", "counter", "{execution}",
    "Executions that looked their statement up in the description cache (attribute "
    "asyncpool.statement_cache.result: hit, one round trip; miss, described first).",
    recorded=False,
)
CACHE_STALE = MetricSpec(
    "asyncpool.statement_cache.stale", "counter", "{statement}",
    "Cached descriptions the server's reply contradicted (a schema change): the call was "
    "decoded with the reply's description or described afresh.",
    recorded=False,
)
CACHE_EVICTIONS = MetricSpec(
    "asyncpool.statement_cache.evictions", "counter", "{statement}",
    "Descriptions dropped to stay within statement_cache_size.",
    recorded=False,
)

ALL_METRICS: tuple[MetricSpec, ...] = (
    CONNECTION_COUNT, CONNECTION_MAX, CONNECTION_IDLE_MAX, CONNECTION_IDLE_MIN, PENDING_REQUESTS,
    TIMEOUTS, CREATE_TIME, WAIT_TIME, USE_TIME, LEAKS, VALIDATION_FAILURES, CREATE_ERRORS,
    CACHE_LOOKUPS, CACHE_STALE, CACHE_EVICTIONS,
)

# Seconds: 2**(k/4), from 61 µs (2**-14) to 64 s (2**6), 81 boundaries. A checkout from the idle
# list takes microseconds, a checkout check or a login milliseconds, a hold up to leak_timeout
# (30 s): one geometric scale covers them all, each bucket 19% wider than the one below. A
# percentile that Prometheus' histogram_quantile() interpolates inside a bucket is therefore off by
# at most the bucket's width (19%), a few percent for spread-out durations, and under 10% for the
# median of a single repeated duration (a fixed sleep). Coarse decade buckets put round-number
# durations just above a bound (0.5 s) in a bucket twice as wide: a p50 50% off. The boundaries
# are also those of an OpenTelemetry exponential histogram of scale 2.
TIME_BUCKETS: tuple[float, ...] = tuple(2.0 ** (k / 4) for k in range(-56, 25))


# -- which version of the conventions --------------------------------------------------------------
SEMCONV_ENV = "ASYNCPOOL_OTEL_SEMCONV"


@dataclass(frozen=True, eq=False)
class Conventions:
    """The names, attribute keys and time unit of one version of the database conventions."""

    version: str
    schema_url: str
    names: dict[str, str]
    attribute_keys: dict[str, str]
    time_unit: str  # "s", or "ms" before 1.26

    @property
    def time_scale(self) -> float:
        return 1000.0 if self.time_unit == "ms" else 1.0

    def spec(self, spec: MetricSpec) -> MetricSpec:
        """`spec` as this version names it."""
        unit = self.time_unit if spec.kind == "histogram" else spec.unit
        return MetricSpec(self.names.get(spec.name, spec.name), spec.kind, unit, spec.description,
                          spec.recorded)

    def attributes(self, attributes: dict[str, str]) -> dict[str, str]:
        return {self.attribute_keys.get(k, k): v for k, v in attributes.items()}

    @property
    def buckets(self) -> tuple[float, ...]:
        return tuple(b * self.time_scale for b in TIME_BUCKETS)


CURRENT = Conventions("1.44", "https://opentelemetry.io/schemas/1.44.0", {}, {}, "s")
# The `db.client.connections.*` names that semantic conventions 1.24 and earlier gave, which older
# instrumentations and dashboards still use (renamed in 1.26, times from ms to s).
LEGACY = Conventions(
    "1.24",
    "https://opentelemetry.io/schemas/1.24.0",
    {
        CONNECTION_COUNT.name: "db.client.connections.usage",
        CONNECTION_MAX.name: "db.client.connections.max",
        CONNECTION_IDLE_MAX.name: "db.client.connections.idle.max",
        CONNECTION_IDLE_MIN.name: "db.client.connections.idle.min",
        PENDING_REQUESTS.name: "db.client.connections.pending_requests",
        TIMEOUTS.name: "db.client.connections.timeouts",
        CREATE_TIME.name: "db.client.connections.create_time",
        WAIT_TIME.name: "db.client.connections.wait_time",
        USE_TIME.name: "db.client.connections.use_time",
    },
    {POOL_NAME: "pool.name", STATE: "state"},
    "ms",
)
CONVENTIONS = {c.version: c for c in (CURRENT, LEGACY)}


def conventions(version: str | None = None) -> Conventions:
    """The conventions `version` names ("1.44", the default, or "1.24"); None reads
    ``ASYNCPOOL_OTEL_SEMCONV``."""
    import os

    if version is None:
        version = os.environ.get(SEMCONV_ENV, "").strip() or CURRENT.version
    found = CONVENTIONS.get(version)
    if found is None:
        from asyncpool.errors import PoolConfigError

        raise PoolConfigError(
            f"semantic conventions {version!r} (from semconv= or {SEMCONV_ENV}) are not known: "
            f"use one of {', '.join(sorted(CONVENTIONS))}"
        )
    return found
