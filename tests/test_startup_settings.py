"""server_settings behind a pooler (#20): the ones PgBouncer passes on go at login, the others
are set in each pool.transaction() (SET LOCAL), one that cannot hold is a PoolConfigError.
Through PgBouncer 1.18 and current (which refuse "unsupported startup parameter" jit) and direct.
"""

from __future__ import annotations

from urllib.parse import quote, urlencode

import asyncpg
import pytest

from asyncpool import Pool, PoolConfigError
from asyncpool.connect.startup import plan
from asyncpool.testing import PgBouncerServer, PostgresServer
from tests.conftest import Pooler

SETTINGS = {"application_name": "fleet-app", "jit": "off", "statement_timeout": "4321ms",
            "search_path": "app, public"}


async def _seen(pool: Pool) -> dict[str, str]:
    async with pool.transaction() as conn:
        row = await conn.fetchrow(
            "SELECT current_setting('application_name') AS application_name, "
            "current_setting('jit') AS jit, current_setting('statement_timeout') "
            "AS statement_timeout, current_setting('search_path') AS search_path")
    assert row is not None
    return dict(row)


async def test_settings_hold_in_transactions_through_pgbouncer(pooler: Pooler) -> None:
    async with Pool(pooler.dsn(), name="startup", min_size=0, max_size=2,
                    server_settings=SETTINGS, telemetry=False) as pool:
        for _ in range(3):  # several transactions, whatever server connection runs them
            assert await _seen(pool) == SETTINGS
        # Outside a transaction only the login-safe ones hold (the role's settings otherwise).
        assert await pool.fetchval("SELECT current_setting('application_name')") == "fleet-app"


async def test_settings_are_sent_at_login_direct(postgres: PostgresServer) -> None:
    async with Pool(postgres.dsn(), name="startup-direct", min_size=0, max_size=1,
                    server_settings=SETTINGS, telemetry=False) as pool:
        assert await _seen(pool) == SETTINGS
        assert await pool.fetchval("SHOW jit") == "off"  # a session setting here
        assert pool._slots.transaction_sql is None


async def test_a_login_only_setting_through_pgbouncer_is_a_config_error(pooler: Pooler) -> None:
    """`options` (dropped by PgBouncer's ignore_startup_parameters) cannot hold behind it."""
    async with Pool(pooler.dsn(), name="startup-options", min_size=0, max_size=1,
                    server_settings={"options": "-c work_mem=64MB"}, telemetry=False) as pool:
        with pytest.raises(PoolConfigError, match="options cannot hold through"):
            await pool.fetchval("SELECT 1")


async def test_a_login_only_setting_direct_is_kept(postgres: PostgresServer) -> None:
    async with Pool(postgres.dsn(), name="startup-options-direct", min_size=0, max_size=1,
                    server_settings={"options": "-c work_mem=64MB"}, telemetry=False) as pool:
        assert await pool.fetchval("SHOW work_mem") == "64MB"


async def test_rds_proxy_plan_and_errors() -> None:
    planned = plan(SETTINGS, pooled=True, pool="p", pooler="RDS Proxy")
    assert planned.at_login == {"application_name": "fleet-app"}
    assert planned.transaction_sql == (
        """SET LOCAL "jit" = 'off'; SET LOCAL "statement_timeout" = '4321ms'; """
        'SET LOCAL "search_path" = "app", "public"')
    with pytest.raises(PoolConfigError, match="RDS Proxy"):
        plan({"options": "-c jit=off"}, pooled=True, pool="p", pooler="RDS Proxy")
    with pytest.raises(PoolConfigError, match="not a setting name"):
        plan({"jit; DROP": "x"}, pooled=False, pool="p")
    assert plan({"x.y": "it's"}, pooled=True, pool="p").transaction_sql == (
        """SET LOCAL "x"."y" = 'it''s'""")
    # Where SET LOCAL would read the value otherwise: set_config, after the SET LOCALs.
    assert plan({"search_path": "", "jit": "off", "x.y": "a\\b"}, pooled=True,
                pool="p").transaction_sql == (
        """SET LOCAL "jit" = 'off'; SELECT set_config('search_path', '', true), """
        """set_config('x.y', 'a\\b', true)""")
    pool = Pool("postgresql://app@db.proxy-abc123.eu-west-1.rds.amazonaws.com/app", min_size=0,
                server_settings={"options": "-c jit=off"}, telemetry=False)
    with pytest.raises(PoolConfigError, match="RDS Proxy"):
        await pool.open()
    await pool.close()


async def test_a_transaction_may_still_begin_with_set_transaction(pooler: Pooler) -> None:
    """The settings are set with SET LOCAL, which takes no snapshot: ``SET TRANSACTION
    ISOLATION LEVEL`` (which must come before any query) still works as a transaction's first
    statement (a SELECT set_config made it fail), and the settings hold."""
    async with Pool(pooler.dsn(), name="startup-set-tx", min_size=0, max_size=1,
                    server_settings=SETTINGS, telemetry=False) as pool, pool.transaction() as conn:
        await conn.execute("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE")
        assert await conn.fetchval("SHOW transaction_isolation") == "serializable"
        assert await conn.fetchval("SHOW search_path") == "app, public"
        assert await conn.fetchval("SHOW statement_timeout") == "4321ms"


# -- the same settings given in the DSN's query (asyncpg sends every key it does not read as one)


def _with(dsn: str, settings: dict[str, str]) -> str:
    return f"{dsn}?{urlencode(settings, quote_via=quote)}"


async def test_dsn_settings_hold_in_transactions_through_pgbouncer(pooler: Pooler) -> None:
    """``?search_path=...&jit=off`` behaves as ``server_settings=`` does: PgBouncer refused them
    at login ("unsupported startup parameter", with advice to use server_settings=)."""
    async with Pool(_with(pooler.dsn(), SETTINGS), name="startup", min_size=0, max_size=2,
                    telemetry=False) as pool:
        for _ in range(3):
            assert await _seen(pool) == SETTINGS
        assert await pool.fetchval("SELECT current_setting('application_name')") == "fleet-app"
        assert pool._slots.transaction_sql == plan(SETTINGS, pooled=True,
                                                   pool="p").transaction_sql


async def test_dsn_settings_are_sent_at_login_direct(postgres: PostgresServer) -> None:
    async with Pool(_with(postgres.dsn(), SETTINGS), name="startup-direct", min_size=0, max_size=1,
                    telemetry=False) as pool:
        assert await _seen(pool) == SETTINGS
        assert await pool.fetchval("SHOW jit") == "off"
        assert pool._slots.transaction_sql is None


async def test_dsn_and_option_settings_are_one_plan(pooler: Pooler) -> None:
    """Some in the DSN, some in server_settings=, one given in both with the same value."""
    dsn_part = {"search_path": "app, public", "jit": "off"}
    option_part = {"JIT": "off", "statement_timeout": "4321ms", "application_name": "fleet-app"}
    async with Pool(_with(pooler.dsn(), dsn_part), name="startup-both", min_size=0, max_size=1,
                    server_settings=option_part, telemetry=False) as pool:
        assert await _seen(pool) == SETTINGS


def test_a_setting_given_twice_with_two_values_is_a_config_error(postgres: PostgresServer) -> None:
    """Given in the DSN and in server_settings= with different values, the pool does not pick
    one (as for ssl and command_timeout); the names are matched as PostgreSQL matches them."""
    with pytest.raises(PoolConfigError, match=(
            r"pool 'twice': the setting 'Search_Path' is given twice and the two disagree: the "
            r"DSN's \?search_path='s1' and server_settings\['Search_Path'\]='s2'; give it once")):
        Pool(postgres.dsn(search_path="s1"), name="twice",
             server_settings={"Search_Path": "s2"})


async def test_a_login_only_dsn_setting_through_pgbouncer_is_a_config_error(
        pooler: Pooler) -> None:
    """``?options=`` is dropped by PgBouncer (ignore_startup_parameters): it never held, and
    nothing said so."""
    async with Pool(pooler.dsn(options="-c work_mem=64MB"), name="startup-options",
                    min_size=0, max_size=1, telemetry=False) as pool:
        with pytest.raises(PoolConfigError,
                           match=r"the DSN's \?options= cannot hold through"):
            await pool.fetchval("SELECT 1")


async def test_a_login_only_dsn_setting_direct_is_kept(postgres: PostgresServer) -> None:
    async with Pool(postgres.dsn(options="-c work_mem=64MB"), name="startup-options-direct",
                    min_size=0, max_size=1, telemetry=False) as pool:
        assert await pool.fetchval("SHOW work_mem") == "64MB"


@pytest.mark.parametrize("where", ["direct", "pgbouncer"])
async def test_an_empty_dsn_setting_is_dropped_as_asyncpg_drops_it(
        where: str, postgres: PostgresServer, legacy: PgBouncerServer) -> None:
    """asyncpg reads the query without its empty values: ``?search_path=`` (a template's empty
    variable) left the server's search_path. Planned as a setting, it emptied it (directly at
    login, behind PgBouncer in each transaction): no table was found any more."""
    base = postgres.dsn() if where == "direct" else legacy.dsn()
    async with Pool(f"{base}?search_path=&application_name=", name="startup-empty",
                    min_size=0, max_size=1, telemetry=False) as pool, pool.transaction() as held:
        assert await held.fetchval("SHOW search_path") == '"$user", public'
    raw = await asyncpg.connect(f"{postgres.dsn()}?search_path=")
    try:
        assert await raw.fetchval("SHOW search_path") == '"$user", public'  # asyncpg's reading
    finally:
        await raw.close()


# -- asyncpg.connect's spelling: connect_kwargs={"server_settings": ...}


async def test_connect_kwargs_settings_are_planned_as_the_option(pooler: Pooler) -> None:
    """They were given to asyncpg as they were: sent at login, and dropped without a word once
    PgBouncer refused one (the retry left them out), never set in a transaction."""
    async with Pool(pooler.dsn(), name="startup-kwargs", min_size=0, max_size=1,
                    connect_kwargs={"server_settings": SETTINGS}, telemetry=False) as pool:
        for _ in range(2):
            assert await _seen(pool) == SETTINGS


async def test_connect_kwargs_settings_beside_dsn_settings_all_hold(
        postgres: PostgresServer) -> None:
    """A DSN setting made the pool give asyncpg its own server_settings, which replaced
    connect_kwargs' (asyncpg merges the two, and the pool did before #20)."""
    async with Pool(_with(postgres.dsn(), {"jit": "off"}), name="startup-kwargs-dsn",
                    min_size=0, max_size=1, telemetry=False,
                    connect_kwargs={"server_settings": {"search_path": "app, public"}}) as pool:
        assert await pool.fetchval("SHOW search_path") == "app, public"
        assert await pool.fetchval("SHOW jit") == "off"


def test_connect_kwargs_settings_that_disagree_with_the_option_are_a_config_error() -> None:
    with pytest.raises(PoolConfigError, match=(
            r"pool 'twice': the setting 'jit' is given twice and the two disagree: "
            r"connect_kwargs\['server_settings'\]\['jit'\]='off' and "
            r"server_settings\['JIT'\]='on'; give it once")):
        Pool("postgresql://app@127.0.0.1/app", name="twice", server_settings={"JIT": "on"},
             connect_kwargs={"server_settings": {"jit": "off"}})
    with pytest.raises(PoolConfigError, match=(
            r"connect_kwargs\['server_settings'\]: 'jit': 5: names and values must be strings")):
        Pool("postgresql://app@127.0.0.1/app", connect_kwargs={"server_settings": {"jit": 5}})


@pytest.mark.parametrize("where", ["dsn", "option"])
async def test_a_setting_the_server_does_not_know_behind_pgbouncer_is_named(
    pooler: Pooler, where: str
) -> None:
    """Directly the login refuses it, naming the setting and its source (a ConnectError); behind
    a pooler it is set in each pool.transaction(), where asyncpg's bare UndefinedObjectError
    ("unrecognized configuration parameter") said nothing of where it came from."""
    settings = {"search_path": "public", "serach_path": "app"}
    dsn = _with(pooler.dsn(), settings) if where == "dsn" else pooler.dsn()
    async with Pool(dsn, name="startup", min_size=0, max_size=1, telemetry=False,
                    server_settings=None if where == "dsn" else settings) as pool:
        for _ in range(2):  # every transaction, on the same connection
            with pytest.raises(PoolConfigError) as info:
                async with pool.transaction():
                    pass
            message = str(info.value)
            assert "'serach_path'" in message
            assert ("DSN's ?serach_path=" if where == "dsn" else "server_settings") in message
            assert "pool.transaction()" in message
            assert isinstance(info.value.__cause__, asyncpg.UndefinedObjectError)
        # Nothing else is lost: outside a transaction the pool serves, on the same connection.
        assert await pool.fetchval("SELECT 1") == 1
        assert pool.stats().closed_total == 0
