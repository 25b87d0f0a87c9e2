"""What a load run measured: per process, then added up."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from asyncpool.errors import ConnectError
from asyncpool.load.histogram import LatencyHistogram
from asyncpool.load.spec import LoadSpec

PERCENTILES = (("p50", 0.50), ("p95", 0.95), ("p99", 0.99))


def error_name(exc: BaseException) -> str:
    """How an error is counted: its type, plus the driver's cause for connect failures
    (``PoolerExhaustedError(TooManyConnectionsError)``)."""
    name = type(exc).__name__
    # asyncpool keeps no driver exception on a ConnectError (its frames hold the password),
    # only the name of its class.
    driver_class = exc.driver_error_class if isinstance(exc, ConnectError) else None
    if driver_class:
        return f"{name}({driver_class.rsplit('.', 1)[-1]})"
    return name


def run_problems(run: Mapping[str, Any], *, warmup: bool = True) -> list[str]:
    """What went wrong in one bench ``runs`` entry (`LoadResult.to_json`), in words; empty when
    nothing did. Failed logins and warm-ups count: a run nobody got through may finish its
    window with no failed query at all (each acquire outlasting the window). `warmup=False`
    leaves the warm-up errors out (the demo's table has no row for them)."""
    found = []
    if run["clients_never_served"]:
        found.append(f"{run['clients_never_served']:,} of {run['clients']:,} instances never "
                     "served")
    for count, what, names in (
        (run["error_count"], "failed queries", run["errors"]),
        (run["connect_errors"], "failed logins", {}),
        (sum(run["warmup_errors"].values()) if warmup else 0, "failed warm-ups",
         run["warmup_errors"]),
    ):
        if count:
            detail = ", ".join(f"{name} {n:,}" for name, n in names.items())
            found.append(f"{count:,} {what}" + (f" ({detail})" if detail else ""))
    return found


@dataclass
class Tally:
    """One process's counts during the measured window (the hot loop updates it)."""

    histogram: LatencyHistogram = field(default_factory=LatencyHistogram)
    queries: int = 0
    errors: Counter[str] = field(default_factory=Counter)

    def error(self, exc: BaseException) -> None:
        self.errors[error_name(exc)] += 1

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())


@dataclass
class WorkerReport:
    """What one worker process sends back when its instances are done."""

    process: int
    clients: int
    tally: Tally
    warmup_errors: Counter[str]
    served: int  #: instances that completed at least one query (warm-up included)
    connect_errors: int
    leaks_injected: int
    leaks_reclaimed: int
    cpu_seconds: float  #: this process's CPU time (user + system) during the window


@dataclass(frozen=True)
class ServerUse:
    """The most the server side held while the load ran (sampled a few times a second)."""

    server_connections_max: int
    clients_waiting_max: int | None  #: PgBouncer's cl_waiting; None when not a PgBouncer
    samples: int
    source: str  #: "pgbouncer SHOW POOLS" or "pg_stat_activity"


@dataclass(frozen=True)
class LoadResult:
    """One run: `spec` against `target`, with everything added up over the processes."""

    target: str
    spec: LoadSpec
    latency: LatencyHistogram
    queries: int
    errors: dict[str, int]
    warmup_errors: dict[str, int]
    connect_errors: int
    clients_never_served: int
    leaks_injected: int
    leaks_reclaimed: int
    client_cpu_seconds: float
    server: ServerUse | None
    server_limit: int | None

    @classmethod
    def combine(cls, target: str, spec: LoadSpec, reports: list[WorkerReport],
                server: ServerUse | None, server_limit: int | None) -> LoadResult:
        errors: Counter[str] = Counter()
        warmup: Counter[str] = Counter()
        for report in reports:
            errors.update(report.tally.errors)
            warmup.update(report.warmup_errors)
        return cls(
            target=target,
            spec=spec,
            latency=LatencyHistogram.merged(r.tally.histogram for r in reports),
            queries=sum(r.tally.queries for r in reports),
            errors=dict(errors.most_common()),
            warmup_errors=dict(warmup.most_common()),
            connect_errors=sum(r.connect_errors for r in reports),
            clients_never_served=sum(r.clients - r.served for r in reports),
            leaks_injected=sum(r.leaks_injected for r in reports),
            leaks_reclaimed=sum(r.leaks_reclaimed for r in reports),
            client_cpu_seconds=sum(r.cpu_seconds for r in reports),
            server=server,
            server_limit=server_limit,
        )

    @property
    def queries_per_second(self) -> float:
        return self.queries / self.spec.duration

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())

    def problems(self, *, warmup: bool = True) -> list[str]:
        """What went wrong in this run, in words (`run_problems`); empty when nothing did."""
        return run_problems(self.to_json(), warmup=warmup)

    @property
    def client_cpu_per_query(self) -> float | None:
        """Seconds of client CPU per completed query, over all worker processes.

        Less sensitive to a busy machine than queries/s: it is what the client side spends,
        whoever else is running.
        """
        return self.client_cpu_seconds / self.queries if self.queries else None

    def to_json(self) -> dict[str, Any]:
        """One entry of the bench JSON ``runs`` list (see docs/cli.md)."""
        spec = self.spec
        hist = self.latency
        latency: dict[str, float | None] = {
            name: round(hist.percentile(q) * 1000, 3) if hist.count else None
            for name, q in PERCENTILES
        }
        latency["mean"] = round(hist.mean * 1000, 3) if hist.count else None
        latency["max"] = round(hist.max_us / 1000, 3) if hist.count else None
        return {
            "target": self.target,
            "driver": spec.driver,
            "prepared_statements": spec.prepared_statements,
            "telemetry": spec.telemetry,
            "clients": spec.clients,
            "processes": spec.processes,
            "pool_size": spec.pool_size,
            "duration_s": spec.duration,
            "queries": self.queries,
            "queries_per_s": round(self.queries_per_second, 1),
            "latency_ms": latency,
            "errors": self.errors,
            "error_count": self.error_count,
            "warmup_errors": self.warmup_errors,
            "connect_errors": self.connect_errors,
            "clients_never_served": self.clients_never_served,
            "leaks_injected": self.leaks_injected,
            "leaks_reclaimed": self.leaks_reclaimed,
            "client_cpu_us_per_query": (
                round(self.client_cpu_per_query * 1e6, 1) if self.client_cpu_per_query else None
            ),
            "server_connections_max": self.server.server_connections_max if self.server else None,
            "server_connections_limit": self.server_limit,
            "clients_waiting_max": self.server.clients_waiting_max if self.server else None,
        }
