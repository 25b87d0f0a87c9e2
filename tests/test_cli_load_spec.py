"""LoadSpec: how instances are spread over processes, placeholders, and the leak spread."""

from __future__ import annotations

import pytest

from asyncpool.load.result import error_name
from asyncpool.load.spec import LoadSpec, LoadSpecError, pgbench_script, psycopg_query
from asyncpool.load.worker import leaking

DSN = "postgresql://app:s3cret-pw@127.0.0.1:6432/app"


@pytest.mark.parametrize(("clients", "processes"), [(500, 2), (7, 3), (2000, 4), (5, 5)])
def test_every_instance_runs_in_exactly_one_process(clients: int, processes: int) -> None:
    spec = LoadSpec(dsn=DSN, clients=clients, processes=processes)
    shares = [spec.share(n) for n in range(processes)]
    numbers = [i for share in shares for i in share]
    assert numbers == list(range(clients))
    assert max(map(len, shares)) - min(map(len, shares)) <= 1


@pytest.mark.parametrize(("clients", "leaks"), [(500, 3), (10, 10), (7, 2), (80, 0)])
def test_exactly_the_asked_number_of_instances_leak(clients: int, leaks: int) -> None:
    spec = LoadSpec(dsn=DSN, clients=clients, processes=1, leaks=leaks)
    assert sum(leaking(spec, n) for n in range(clients)) == leaks


def test_placeholders_are_counted_and_translated() -> None:
    spec = LoadSpec(dsn=DSN, query="SELECT $1::int + $2::int, '50%'")
    assert spec.parameters == 2
    assert psycopg_query(spec.query) == "SELECT %s::int + %s::int, '50%%'"
    assert pgbench_script("SELECT $1::int + 1;") == (
        "\\set p1 random(1, 1000000)\nSELECT :p1::int + 1;\n"
    )
    with pytest.raises(LoadSpecError, match="in order"):
        psycopg_query("SELECT $2::int, $1::int")


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"clients": 0}, "clients"),
        ({"processes": 3, "clients": 2}, "processes"),
        ({"duration": 0}, "duration"),
        ({"driver": "psycopg-pool", "prepared_statements": "unnamed"}, "asyncpool mode"),
        ({"driver": "asyncpg", "telemetry": "sdk"}, "telemetry"),
        ({"driver": "asyncpg", "leaks": 1}, "leak"),
        ({"leaks": 600}, "leaks"),
    ],
)
def test_impossible_specs_are_refused(changes: dict[str, object], message: str) -> None:
    with pytest.raises(LoadSpecError, match=message):
        LoadSpec(dsn=DSN, **changes)  # type: ignore[arg-type]


def test_the_repr_never_shows_the_password() -> None:
    assert "s3cret-pw" not in repr(LoadSpec(dsn=DSN))


def test_connect_errors_are_named_with_their_driver_cause() -> None:
    """asyncpool keeps no driver exception on its ConnectError, only its class name."""
    import asyncpg

    from asyncpool.connect.dsn import parse_target
    from asyncpool.connect.failures import translate

    target = parse_target("postgresql://app@127.0.0.1:5432/app")
    refused = translate(asyncpg.TooManyConnectionsError("sorry, too many clients already"),
                        target, "load", 5.0)
    assert refused.__cause__ is None
    assert refused.__suppress_context__
    assert error_name(refused) == "PoolerExhaustedError(TooManyConnectionsError)"
    assert error_name(ZeroDivisionError()) == "ZeroDivisionError"


async def test_a_pool_s_refused_login_is_named_with_its_cause() -> None:
    """As the load engine counts a real pool's failure (nobody listens on the port)."""
    from asyncpool.errors import ConnectError
    from asyncpool.pool import Pool
    from asyncpool.testing.ports import free_port

    # (The pool retries a refused login for about 0.6 s before its waiter gets the error; a
    # loaded CI machine took past an acquire_timeout of 1 s: PoolTimeoutError.)
    pool = Pool(f"postgresql://app@127.0.0.1:{free_port()}/app", min_size=0, max_size=1,
                acquire_timeout=15.0, connect_timeout=5.0)
    await pool.open()
    try:
        with pytest.raises(ConnectError) as info:
            async with pool.acquire():
                pass
    finally:
        await pool.close()
    assert error_name(info.value) == "ConnectError(ConnectionRefusedError)"


def test_a_run_is_clean_only_without_any_kind_of_error() -> None:
    from asyncpool.load.result import run_problems

    clean = {"clients": 2, "clients_never_served": 0, "error_count": 0, "errors": {},
             "connect_errors": 0, "warmup_errors": {}}
    assert run_problems(clean) == []
    nobody = {**clean, "clients_never_served": 2, "connect_errors": 28,
              "warmup_errors": {"ConnectError(ConnectionRefusedError)": 2}}
    assert run_problems(nobody) == [
        "2 of 2 instances never served", "28 failed logins",
        "2 failed warm-ups (ConnectError(ConnectionRefusedError) 2)",
    ]
    assert run_problems(nobody, warmup=False) == ["2 of 2 instances never served",
                                                  "28 failed logins"]
    failing = {**clean, "error_count": 1200, "errors": {"DivisionByZeroError": 1200}}
    assert run_problems(failing) == ["1,200 failed queries (DivisionByZeroError 1,200)"]
