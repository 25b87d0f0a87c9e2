"""`asyncpool demo` at reduced scale: through the harness PgBouncer with zero errors and fewer
server connections than instances, then straight at PostgreSQL where logins are refused."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from asyncpool.testing import PgBouncerServer, PostgresServer


def _demo(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "asyncpool.cli", "demo", *args],
                          check=False, capture_output=True, text=True, timeout=timeout)


def test_pooled_then_direct_on_given_servers(legacy: PgBouncerServer,
                                             postgres: PostgresServer) -> None:
    # More instances than PostgreSQL has slots for a non-superuser (max_connections minus 3
    # reserved), and far more than PgBouncer's server pool.
    clients = postgres.max_connections + 20
    result = _demo("--dsn", legacy.dsn(), "--admin-dsn", legacy.admin_dsn,
                   "--direct-dsn", postgres.dsn(), "--clients", str(clients), "--processes", "2",
                   "--duration", "1.5", "--leaks", "2", "--leak-timeout", "0.5",
                   "--acquire-timeout", "1", "--json")
    assert result.returncode == 0, result.stderr[-3000:]
    pooled, direct = json.loads(result.stdout)["runs"]

    assert pooled["target"] == "PgBouncer"
    assert pooled["queries"] > 0
    assert pooled["error_count"] == 0, pooled["errors"]
    assert pooled["clients_never_served"] == 0
    assert 1 <= pooled["server_connections_max"] <= legacy.pool_size
    assert pooled["leaks_injected"] == pooled["leaks_reclaimed"] == 2
    assert pooled["processes"] == 2

    assert direct["target"] == "PostgreSQL, direct"
    assert direct["queries"] > 0
    slots = postgres.max_connections - 3
    assert direct["clients_never_served"] >= clients - slots
    assert direct["connect_errors"] > 0
    assert direct["error_count"] > 0
    assert any(name.startswith(("PoolerExhaustedError", "PoolTimeoutError"))
               for name in direct["errors"])

    # The narration went to stderr, with no secret in either stream.
    assert "The same load, straight at PostgreSQL" in result.stderr
    for secret in (postgres.app.password, postgres.pgb_admin.password):
        assert secret not in result.stdout + result.stderr


def test_the_readme_command_starts_its_own_servers() -> None:
    result = _demo("--clients", "30", "--processes", "2", "--duration", "1", "--leaks", "1",
                   "--leak-timeout", "0.5")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    assert "Starting a throwaway PostgreSQL" in out
    table = out[out.index("function instances"):out.index("instances shared")]
    # Label, then the PgBouncer column, then the direct column; cells are 2+ spaces apart.
    rows = {cells[0]: cells[1:] for cells in
            (re.split(r"\s{2,}", line.strip()) for line in table.splitlines() if line.strip())}
    assert rows["function instances"] == ["30 in 2 processes", "30 in 2 processes"]
    assert rows["errors"][0] == "0"
    assert rows["instances never served"][0] == "0 of 30"
    assert rows["leaks reclaimed"][0] == "1 of 1"
    assert int(rows["queries/s"][0].replace(",", "")) > 0
    assert "instances shared" in out
    assert "with no errors" in out


def test_a_pooled_phase_nobody_got_through_is_not_summed_up_as_fine() -> None:
    from asyncpool.testing.ports import free_port

    result = _demo("--dsn", f"postgresql://postgres@127.0.0.1:{free_port()}/test", "--no-direct",
                   "--clients", "2", "--processes", "1", "--duration", "0.5", "--leaks", "0",
                   "--acquire-timeout", "1")
    assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    assert re.search(r"instances never served\s+2 of 2\n", out)
    summary = out.strip().splitlines()[-1]
    assert summary.startswith("PgBouncer, 2 instances: 2 of 2 instances never served; "), summary
    logins = re.search(r"failed logins \(refused, timed out\)\s+(\d+)\n", out)
    assert logins is not None
    assert f"; {logins[1]} failed logins; 0 queries/s." in summary
    assert "no errors" not in out


def test_without_psycopg_pgbouncers_server_connections_are_still_counted(
        legacy: PgBouncerServer, tmp_path: Path) -> None:
    """`pip install asyncpool-pg` installs no psycopg, and the demo read PgBouncer's SHOW POOLS
    with psycopg only: its table said "server connections used: not sampled" and nothing of
    clients queued, the two figures the demo is for, with no word why. The rows are read on
    asyncpg's transport then, as `asyncpool doctor` reads the console."""
    hidden = tmp_path / "psycopg"
    hidden.mkdir()
    (hidden / "__init__.py").write_text("raise ImportError('psycopg is not installed here')\n")
    env = {**os.environ,
           "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    check = subprocess.run([sys.executable, "-c", "import psycopg"], env=env, check=False,
                           capture_output=True, text=True)
    assert "psycopg is not installed here" in check.stderr  # the demo below runs without it
    assert legacy.admin_dsn is not None
    result = subprocess.run(
        [sys.executable, "-m", "asyncpool.cli", "demo", "--dsn", legacy.dsn(), "--admin-dsn",
         legacy.admin_dsn, "--no-direct", "--clients", "30", "--processes", "1", "--duration",
         "1", "--leaks", "0", "--json"],
        env=env, check=False, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    (pooled,) = json.loads(result.stdout)["runs"]
    assert pooled["error_count"] == 0, pooled["errors"]
    assert 1 <= pooled["server_connections_max"] <= legacy.pool_size, pooled
    assert pooled["clients_waiting_max"] is not None, pooled
