"""What a load run does: how many simulated function instances, through which driver, how long."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal, get_args

from asyncpool.config import PreparedStatements
from asyncpool.connect.dsn import redact_dsn

Driver = Literal["asyncpool", "asyncpg", "asyncpg-capped", "asyncpg-pool", "psycopg-pool"]
DRIVERS: tuple[Driver, ...] = get_args(Driver)
#: off: pools built with telemetry=False; api: telemetry=True with no SDK installed (the
#: OpenTelemetry API's no-op providers); sdk: telemetry=True with the SDK installed and exporting;
#: sdk-aggregated: the same, its exporter wrapped with export_checkout_times() so pools aggregate
#: wait_time and use_time themselves.
Telemetry = Literal["off", "api", "sdk", "sdk-aggregated"]
TELEMETRY_MODES: tuple[Telemetry, ...] = get_args(Telemetry)
PREPARED_MODES: tuple[PreparedStatements, ...] = get_args(PreparedStatements)

DEFAULT_QUERY = "SELECT $1::int + 1"
_PLACEHOLDER = re.compile(r"\$(\d+)")


class LoadSpecError(ValueError):
    """A load option has a value the engine cannot run."""


@dataclass(frozen=True)
class LoadSpec:
    """One run of the load engine.

    `clients` simulated function instances are spread over `processes` OS processes (as Lambda
    execution environments are separate processes). Each instance owns one small pool (or one
    connection, for the ``asyncpg`` driver) and runs `query` back to back for `duration` seconds.
    Every ``$n`` placeholder in `query` gets an integer argument.

    `leaks` instances each start one background task that acquires a connection and never
    returns it; asyncpool reclaims it after `leak_timeout` (asyncpool driver only).
    """

    dsn: str = field(repr=False)
    clients: int = 500
    processes: int = 2
    duration: float = 10.0
    query: str = DEFAULT_QUERY
    driver: Driver = "asyncpool"
    prepared_statements: PreparedStatements = "off"
    pool_size: int = 2
    telemetry: Telemetry = "off"
    leaks: int = 0
    leak_timeout: float = 30.0
    #: How long one acquire (connect included) may take; a refused instance retries within it.
    acquire_timeout: float = 5.0
    #: Logins in flight at once per process while instances warm up.
    connect_concurrency: int = 32

    def __post_init__(self) -> None:
        self._check_numbers()
        self._check_choices()

    def _check_numbers(self) -> None:
        if self.clients < 1:
            raise LoadSpecError(f"clients={self.clients}: must be at least 1")
        if not 1 <= self.processes <= self.clients:
            raise LoadSpecError(f"processes={self.processes}: must be between 1 and clients")
        if self.duration <= 0:
            raise LoadSpecError(f"duration={self.duration}: must be > 0 seconds")
        if self.pool_size < 1:
            raise LoadSpecError(f"pool_size={self.pool_size}: must be at least 1")
        if not 0 <= self.leaks <= self.clients:
            raise LoadSpecError(f"leaks={self.leaks}: must be between 0 and clients")
        if self.leak_timeout <= 0 or self.acquire_timeout <= 0:
            raise LoadSpecError("leak_timeout and acquire_timeout must be > 0 seconds")
        if self.connect_concurrency < 1:
            raise LoadSpecError(f"connect_concurrency={self.connect_concurrency}: at least 1")

    def _check_choices(self) -> None:
        if self.driver not in DRIVERS:
            raise LoadSpecError(f"driver={self.driver!r}: choose one of {', '.join(DRIVERS)}")
        if self.prepared_statements not in PREPARED_MODES:
            raise LoadSpecError(
                f"prepared_statements={self.prepared_statements!r}: choose one of "
                + ", ".join(PREPARED_MODES)
            )
        if self.prepared_statements == "unnamed" and self.driver != "asyncpool":
            raise LoadSpecError("prepared_statements='unnamed' is an asyncpool mode")
        if self.telemetry not in TELEMETRY_MODES:
            raise LoadSpecError(
                f"telemetry={self.telemetry!r}: choose one of " + ", ".join(TELEMETRY_MODES)
            )
        if self.telemetry != "off" and self.driver != "asyncpool":
            raise LoadSpecError("telemetry applies to the asyncpool driver only")
        if self.leaks and self.driver != "asyncpool":
            raise LoadSpecError("leak injection needs the asyncpool driver (others cannot reclaim)")

    @property
    def exports_telemetry(self) -> bool:
        """Whether the workers install the OpenTelemetry SDK (telemetry sdk or sdk-aggregated)."""
        return self.telemetry in ("sdk", "sdk-aggregated")

    def __repr__(self) -> str:
        return (
            f"LoadSpec(dsn={redact_dsn(self.dsn)!r}, clients={self.clients}, "
            f"processes={self.processes}, duration={self.duration}, driver={self.driver!r}, "
            f"prepared_statements={self.prepared_statements!r}, telemetry={self.telemetry!r})"
        )

    @property
    def warmup_budget(self) -> float:
        """How long warm-up may take: logins cost a few ms of CPU each, refused ones retry
        within `acquire_timeout`."""
        return 60.0 + self.clients * 0.05 + self.acquire_timeout

    @property
    def parameters(self) -> int:
        """How many ``$n`` arguments `query` takes."""
        return max((int(n) for n in _PLACEHOLDER.findall(self.query)), default=0)

    def share(self, process: int) -> range:
        """The instance numbers process `process` runs (spread as evenly as possible)."""
        base, extra = divmod(self.clients, self.processes)
        start = process * base + min(process, extra)
        return range(start, start + base + (1 if process < extra else 0))


def psycopg_query(query: str) -> str:
    """`query` with ``$n`` placeholders written as psycopg's ``%s`` (each used once, in order)."""
    numbers = [int(n) for n in _PLACEHOLDER.findall(query)]
    if numbers != list(range(1, len(numbers) + 1)):
        raise LoadSpecError("for psycopg, use each $n placeholder once and in order ($1, $2, ...)")
    return _PLACEHOLDER.sub("%s", query.replace("%", "%%"))


def pgbench_script(query: str) -> str:
    """A pgbench script running `query`, each ``$n`` fed a random integer (``:pn``)."""
    numbers = sorted({int(n) for n in _PLACEHOLDER.findall(query)})
    sets = [f"\\set p{n} random(1, 1000000)" for n in numbers]
    body = _PLACEHOLDER.sub(lambda m: f":p{m.group(1)}", query.strip().rstrip(";"))
    return "\n".join([*sets, body + ";"]) + "\n"
