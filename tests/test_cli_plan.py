"""`asyncpool plan` (#20): the connection budget of a Lambda fleet."""

from __future__ import annotations

import io
import json

from asyncpool.cli.main import build_parser
from asyncpool.cli.plan import Budget, check, run
from asyncpool.testing import PgBouncerServer


def test_500_instances_through_one_pgbouncer_fit() -> None:
    v = check(Budget(500, max_client_conn=1000, default_pool_size=50, max_connections=100))
    assert v.fits is True
    assert (v.clients, v.server_connections) == (500, 50)


def test_too_many_clients_for_max_client_conn_says_what_to_raise() -> None:
    v = check(Budget(1000, workers=2, max_client_conn=1000, default_pool_size=20,
                     max_connections=100, processes=2))
    assert v.fits is False
    assert v.clients == 2000
    assert any("raise max_client_conn to 1250 per process" in c for c in v.changes)


def test_a_fleet_whose_server_pools_exceed_max_connections() -> None:
    """default_pool_size is per process: 4 tasks x 50 = 200 > 100 - 3 - 5."""
    v = check(Budget(200, max_client_conn=1000, default_pool_size=50, max_connections=100,
                     processes=4))
    assert v.fits is False
    assert v.server_connections == 200
    assert any("default_pool_size (or max_db_connections) to 23 per process" in c
               for c in v.changes)


def test_direct_and_rds_proxy() -> None:
    assert check(Budget(300, pooler="none", max_connections=100)).fits is False
    assert check(Budget(50, pooler="none", max_connections=100)).fits is True
    proxy = check(Budget(1000, pooler="rds-proxy", max_connections=100,
                         max_connections_percent=50))
    assert (proxy.fits, proxy.server_connections) == (True, 50)
    greedy = check(Budget(1000, pooler="rds-proxy", max_connections=100,
                          max_connections_percent=100))
    assert greedy.fits is False
    assert any("max_connections_percent to 92" in c for c in greedy.changes)


def test_unknown_limits_are_not_a_pass() -> None:
    v = check(Budget(10))
    assert v.fits is None


async def test_limits_are_read_from_pgbouncer_and_the_server(current: PgBouncerServer) -> None:
    """max_connections through the pooler DSN, PgBouncer's limits from its console."""
    from asyncpool.cli.plan import read_limits

    b = Budget(100, max_size=2)
    await read_limits(b, current.dsn(), current.admin_dsn, 5.0)
    assert b.max_client_conn == int(current.settings["max_client_conn"])
    assert b.default_pool_size == current.pool_size
    assert b.max_connections == 60  # tests/conftest.py TEST_MAX_CONNECTIONS
    v = check(b)
    assert v.fits is True
    assert v.server_connections == current.pool_size


def test_the_command_prints_json_and_exit_codes() -> None:
    args = build_parser().parse_args(["plan", "--instances", "600", "--max-client-conn", "500",
                                      "--default-pool-size", "40", "--max-connections", "100",
                                      "--json"])
    out = io.StringIO()
    assert run(args, out) == 1
    document = json.loads(out.getvalue())
    assert document["fits"] is False
    assert document["clients"] == 600
