"""`asyncpool bench` against the harness PgBouncers: the JSON it prints follows the documented
schema (docs/cli.md), every driver and mode gets queries through, errors are counted and fail
the exit code, and --chart writes a PNG."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from asyncpool.testing import PgBouncerServer, PostgresServer

# The schema documented in docs/cli.md, "asyncpool bench --json".
NUMBER = (int, float)
TOP_LEVEL = {
    "schema": str, "asyncpool_version": str, "created": str, "machine": dict, "target": dict,
    "query": str, "runs": list, "failures": list, "skipped": list, "ok": bool,
}
MACHINE = {"cpus": int, "python": str, "platform": str, "load_average": list}
TARGET = {"label": str, "kind": str, "started_locally": bool,
          "server_connections_limit": (int, type(None))}
RUN = {
    "target": str, "driver": str, "prepared_statements": str, "telemetry": str, "clients": int,
    "processes": int, "pool_size": int, "duration_s": NUMBER, "queries": int,
    "queries_per_s": NUMBER, "latency_ms": dict, "errors": dict, "error_count": int,
    "warmup_errors": dict, "connect_errors": int, "clients_never_served": int,
    "leaks_injected": int, "leaks_reclaimed": int, "client_cpu_us_per_query": (NUMBER, type(None)),
    "server_connections_max": (int, type(None)), "server_connections_limit": (int, type(None)),
    "clients_waiting_max": (int, type(None)),
}
LATENCY_KEYS = {"p50", "p95", "p99", "mean", "max"}


def _bench(*args: str, timeout: float = 120,
           env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "asyncpool.cli", "bench", *args],
                          check=False, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **env} if env else None)


def _target(pooler: PgBouncerServer) -> list[str]:
    return ["--dsn", pooler.dsn(), "--admin-dsn", pooler.admin_dsn]


def _check_shape(value: dict[str, Any], shape: dict[str, Any], where: str) -> None:
    assert set(value) == set(shape), f"{where}: keys {sorted(set(value) ^ set(shape))}"
    for key, kind in shape.items():
        assert isinstance(value[key], kind), f"{where}.{key}={value[key]!r}"
        assert not (kind in (int, NUMBER) and isinstance(value[key], bool)), f"{where}.{key}"


def _check_document(doc: dict[str, Any]) -> None:
    _check_shape(doc, TOP_LEVEL, "document")
    assert doc["schema"] == "asyncpool-bench/1"
    _check_shape(doc["machine"], MACHINE, "machine")
    _check_shape(doc["target"], TARGET, "target")
    for n, run in enumerate(doc["runs"]):
        _check_shape(run, RUN, f"runs[{n}]")
        assert set(run["latency_ms"]) == LATENCY_KEYS


def _clean_pooled_run(run: dict[str, Any], pool_size: int) -> None:
    """What every run through a healthy PgBouncer must show."""
    assert run["queries"] > 0
    assert run["error_count"] == 0, run["errors"]
    assert run["errors"] == {}
    assert run["clients_never_served"] == 0
    lat = run["latency_ms"]
    if run["driver"] != "pgbench":
        # (pgbench reports its own tps, which leaves out its connection set-up time.)
        assert run["queries_per_s"] == pytest.approx(run["queries"] / run["duration_s"], abs=0.1)
        assert run["client_cpu_us_per_query"] > 0
        assert 0 < lat["p50"] <= lat["p95"] <= lat["p99"] <= lat["max"]
        # Sampled from SHOW POOLS while the run went on: more clients than server connections.
        assert 1 <= run["server_connections_max"] <= pool_size
        assert run["server_connections_max"] < run["clients"]
    else:
        assert lat["mean"] > 0


def test_sweep_with_raw_asyncpg_and_pgbench_as_json_and_chart(current: PgBouncerServer,
                                                              tmp_path: Path) -> None:
    chart = tmp_path / "bench.png"
    # The harness's PgBouncer has a password and no TLS: the pool's rules want libpq's
    # require_auth there, which Debian bookworm's pgbench (libpq 15) does not know
    # (tests/test_bench_logins.py); this loopback server is trusted by name instead.
    result = _bench(*_target(current), "--clients", "16,32", "--processes", "2", "--duration", "1",
                    "--driver", "asyncpool,asyncpg", "--prepared-statements", "on",
                    "--pgbench", "--json", "--chart", str(chart),
                    env={"ASYNCPOOL_ALLOW_UNPROTECTED_CREDENTIALS": "true"})
    assert result.returncode == 0, result.stderr[-3000:]
    doc = json.loads(result.stdout)
    _check_document(doc)
    assert doc["ok"] is True
    assert doc["failures"] == []
    runs = doc["runs"]
    assert [(r["driver"], r["clients"]) for r in runs] == [
        ("asyncpool", 16), ("asyncpg", 16), ("asyncpool", 32), ("asyncpg", 32),
        ("pgbench", 16), ("pgbench", 32),
    ]
    for run in runs:
        assert run["prepared_statements"] == "on"
        _clean_pooled_run(run, current.pool_size)
    assert {r["processes"] for r in runs if r["driver"] != "pgbench"} == {2}
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert current.postgres.app.password not in result.stdout + result.stderr


def test_every_driver_and_mode_gets_through_pgbouncer_1_18(legacy: PgBouncerServer) -> None:
    if importlib.util.find_spec("asyncpool.unnamed") is None:
        pytest.skip("this build has no 'unnamed' mode")
    result = _bench(*_target(legacy), "--clients", "16", "--processes", "1", "--duration", "1",
                    "--driver", "asyncpool,asyncpg-capped,asyncpg-pool,psycopg-pool",
                    "--prepared-statements", "off,unnamed", "--telemetry", "off,sdk,sdk-aggregated",
                    "--json")
    assert result.returncode == 0, result.stderr[-3000:]
    doc = json.loads(result.stdout)
    _check_document(doc)
    # What asyncpool alone has is said to be left out, not dropped in silence.
    others = ("asyncpg-capped", "asyncpg-pool", "psycopg-pool")
    assert doc["skipped"] == [
        *({"run": f"{d} prepared_statements=unnamed", "reason": "'unnamed' is an asyncpool mode"}
          for d in others),
        *({"run": f"{d} telemetry=sdk,sdk-aggregated",
           "reason": f"telemetry is an asyncpool option; {d} runs without it"} for d in others),
    ]
    assert ("skipped: psycopg-pool prepared_statements=unnamed ('unnamed' is an asyncpool mode)"
            in result.stderr)
    cases = [(r["driver"], r["prepared_statements"], r["telemetry"]) for r in doc["runs"]]
    assert cases == [
        ("asyncpool", "off", "off"), ("asyncpool", "off", "sdk"),
        ("asyncpool", "off", "sdk-aggregated"),
        ("asyncpool", "unnamed", "off"), ("asyncpool", "unnamed", "sdk"),
        ("asyncpool", "unnamed", "sdk-aggregated"),
        ("asyncpg-capped", "off", "off"), ("asyncpg-pool", "off", "off"),
        ("psycopg-pool", "off", "off"),
    ]
    for run in doc["runs"]:
        _clean_pooled_run(run, legacy.pool_size)


def test_failing_queries_are_counted_by_type_and_fail_the_exit_code(
    legacy: PgBouncerServer,
) -> None:
    result = _bench(*_target(legacy), "--clients", "3", "--processes", "1", "--duration", "0.5",
                    "--query", "SELECT 1 / ($1::int - $1::int)", "--json")
    assert result.returncode == 1
    doc = json.loads(result.stdout)
    _check_document(doc)
    (run,) = doc["runs"]
    assert doc["ok"] is False
    assert run["queries"] == 0
    assert set(run["errors"]) == {"DivisionByZeroError"}
    assert run["error_count"] == run["errors"]["DivisionByZeroError"] > 0
    # The warm-up query failed too, so no instance was ever served.
    assert run["warmup_errors"] == {"DivisionByZeroError": 3}
    assert run["clients_never_served"] == 3


def test_the_text_table_compares_runs_at_the_same_size(postgres: PostgresServer) -> None:
    result = _bench("--dsn", postgres.dsn(), "--clients", "4", "--processes", "1",
                    "--duration", "0.5", "--driver", "asyncpool,asyncpg")
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    header = next(line for line in lines if line.startswith("run "))
    assert "queries/s" in header
    assert "vs first" in header
    rows = [line for line in lines if line.startswith(("asyncpool ", "asyncpg "))]
    assert len(rows) == 2
    assert "1.00x" in rows[0]
    # Counted from pg_stat_activity beyond what was open before: 4 instances, 4 backends.
    assert rows[0].split()[-1] in {"1", "2", "3", "4"}


def test_a_matrix_with_nothing_to_run_is_refused_before_servers_start() -> None:
    result = _bench("--driver", "asyncpg,asyncpg-pool", "--prepared-statements", "unnamed",
                    "--clients", "2", "--duration", "1", "--json", timeout=30)
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stdout == ""
    assert "Starting a throwaway" not in result.stderr
    assert "nothing to run: asyncpg prepared_statements=unnamed ('unnamed' is an asyncpool mode)" in (
        result.stderr)
    assert "--driver asyncpool" in result.stderr


_REFUSED_OR_TIMED_OUT = {"ConnectError(ConnectionRefusedError)", "PoolTimeoutError"}


def test_a_run_whose_instances_never_got_through_fails() -> None:
    """Nobody listens on the port: each acquire outlasts the window, so no query fails inside
    it, but no instance was ever served and every login failed."""
    from asyncpool.testing.ports import free_port

    target = ["--dsn", f"postgresql://postgres@127.0.0.1:{free_port()}/test", "--clients", "2",
              "--processes", "1", "--duration", "0.5", "--acquire-timeout", "1"]
    result = _bench(*target, "--json")
    assert result.returncode == 1, result.stderr[-3000:]
    doc = json.loads(result.stdout)
    _check_document(doc)
    assert doc["ok"] is False
    (run,) = doc["runs"]
    assert run["queries"] == 0
    assert run["clients_never_served"] == 2
    assert run["connect_errors"] > 0
    # Which error ends an acquire depends on where its second fell: in a login (refused) or
    # in the backoff between two (the acquire timeout), as a loaded machine shifts it.
    assert sum(run["warmup_errors"].values()) == 2, run["warmup_errors"]
    assert set(run["warmup_errors"]) <= _REFUSED_OR_TIMED_OUT, run["warmup_errors"]

    result = _bench(*target)
    assert result.returncode == 1, result.stderr[-3000:]
    assert "errors: asyncpool off x2: 2 of 2 instances never served; " in result.stdout
    counted = re.search(r"failed logins; 2 failed warm-ups \((.*)\)\n", result.stdout)
    assert counted is not None, result.stdout
    kinds = dict(part.rsplit(" ", 1) for part in counted[1].split(", "))
    assert set(kinds) <= _REFUSED_OR_TIMED_OUT, kinds
    assert sum(map(int, kinds.values())) == 2, kinds
