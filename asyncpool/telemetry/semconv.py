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
    #: False for an instrument read from `stats()` at collection time (observable).
    recorded: bool = True


# -- attributes ------------------------------------------------------------------------------------
POOL_NAME = "db.client.connection.pool.name"
STATE = "db.client.connection.state"
STATE_IDLE = "idle"
STATE_USED = "used"
DB_SYSTEM_NAME = "db.system.name"
DB_NAMESPACE = "db.namespace"
DB_RESPONSE_STATUS_CODE = "db.response.status_code"
SERVER_ADDRESS = "server.address"
SERVER_PORT = "server.port"
ERROR_TYPE = "error.type"
CODE_STACKTRACE = "code.stacktrace"
POSTGRESQL = "postgresql"

CREDENTIALS_PROVIDER = "asyncpool.credentials.provider"
LEAK_ACTION = "asyncpool.leak.action"  # "reclaim" or "log", as `leak_action`
LEAK_HELD_SECONDS = "asyncpool.leak.held_seconds"
LEAK_TASK = "asyncpool.leak.task"
CACHE_RESULT = "asyncpool.statement_cache.result"  # "hit" or "miss"

# -- spans -----------------------------------------------------------------------------------------
CONNECT_SPAN = "connect"  # named "connect <db.namespace>", after "{operation} {target}"
CREDENTIALS_SPAN = "asyncpool.credentials"
LEAK_SPAN = "asyncpool.leak"
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
    "pool.",
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
    "Connections held past leak_timeout (attribute asyncpool.leak.action: reclaim or log).",
)
VALIDATION_FAILURES = MetricSpec(
    "asyncpool.connection.validation_failures", "counter", "{connection}",
    "Idle connections that failed their checkout check and were replaced.",
)
CREATE_ERRORS = MetricSpec(
    "asyncpool.connection.create_errors", "counter", "{error}",
    "Connection attempts that failed (attribute error.type: the driver's exception class).",
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

# Seconds. A checkout from the idle list takes microseconds, a login milliseconds, a queue behind a
# saturated pool up to acquire_timeout: the SDK's default buckets (0, 5, 10 ... 10000) suit none.
TIME_BUCKETS: tuple[float, ...] = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)
