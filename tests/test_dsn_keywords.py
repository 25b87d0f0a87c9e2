"""DSN query keys asyncpg does not read: asyncpg sends each to the server as a run-time setting.

libpq's own keywords (``connect_timeout``, ``keepalives``...) failed every login with the server's
bare "unrecognized configuration parameter" (PgBouncer: "unsupported startup parameter"); a
misspelt one (``?sslmod=``) was reported as "TLS failed". Now ``connect_timeout`` is the pool's,
the others are a PoolConfigError, and an unknown setting's login failure names it and its source.
Against PostgreSQL and both PgBouncers.
"""

from __future__ import annotations

import time
from typing import Any

import asyncpg
import pytest

import asyncpool
from asyncpool import Pool, PoolConfig, PoolConfigError
from asyncpool.connect.dsn import ASYNCPG_DOES_ALREADY, LIBPQ_ONLY, POOL_READ_KEYS, parse_dsn
from asyncpool.connect.service import LIBPQ_ONLY_KEYS
from asyncpool.integrations.aws_lambda import lambda_config
from asyncpool.testing import PostgresServer
from tests.conftest import Pooler

REFUSED = sorted(key for key, advice in LIBPQ_ONLY.items() if advice)


def _password(dsn: str) -> str:
    password = parse_dsn(dsn).password
    assert password
    return password


# -- libpq keywords: read by the pool, or refused before any login -------------------------------


async def test_asyncpg_fails_the_login_on_each_libpq_only_keyword(postgres: PostgresServer) -> None:
    """What the table is for: asyncpg alone sends every one of them to the server. (Not
    ``replication``, which the server reads at login: asyncpg would ask for a replication
    connection, which the pool has no use for.)"""
    for key in sorted(LIBPQ_ONLY.keys() - {"replication"}):
        with pytest.raises(asyncpg.UndefinedObjectError, match=f'parameter "{key}"'):
            await asyncpg.connect(f"{postgres.dsn()}?{key}=1")


def test_the_pool_reads_the_keywords_the_service_file_reader_does() -> None:
    """One table: the libpq-only keys read from a service's section are among those in a DSN."""
    assert set(LIBPQ_ONLY_KEYS) <= POOL_READ_KEYS


def _asking_more(key: str) -> str:
    """A value of `key` that asks for something asyncpg does not do."""
    return next(v for v in ("1", "0", "require", "2")
                if v not in ASYNCPG_DOES_ALREADY.get(key, ()))


@pytest.mark.parametrize("key", REFUSED)
def test_a_libpq_only_keyword_is_refused_when_the_pool_is_made(key: str) -> None:
    value = _asking_more(key)
    dsn = f"postgresql://app:s3cret-pw@db.example.com/app?{key}={value}"  # pragma: allowlist secret
    with pytest.raises(PoolConfigError) as caught:
        Pool(dsn, telemetry=False)
    message = str(caught.value)
    assert f"the DSN's ?{key}= is a libpq setting that asyncpg does not read" in message
    advice = LIBPQ_ONLY[key]
    assert advice
    assert advice in message  # what to do instead
    assert "s3cret" not in message


async def test_values_asking_for_what_asyncpg_does_are_taken(
        postgres: PostgresServer, pooler: Pooler) -> None:
    """libpq's defaults, which DSNs copied from libpq's tools carry (``gssencmode=prefer``,
    ``sslsni=1``...), ask for what asyncpg does anyway: the pool takes them and asyncpg does not
    get them (it would send them to the server as settings, and the login would fail)."""
    query = "&".join(f"{key}={sorted(values)[0]}" for key, values in ASYNCPG_DOES_ALREADY.items()
                     if key != "replication")
    for dsn in (postgres.dsn(), pooler.dsn()):
        async with Pool(f"{dsn}{'&' if '?' in dsn else '?'}{query}&replication=false",
                        max_size=1, telemetry=False) as pool:
            assert await pool.fetchval("SELECT 1") == 1


async def test_keepalives_are_refused_before_a_login_to_either_server(
        postgres: PostgresServer, pooler: Pooler) -> None:
    for dsn in (postgres.dsn(keepalives="1"), pooler.dsn(keepalives_idle="30")):
        with pytest.raises(PoolConfigError, match=r"\?keepalives(_idle)?= is a libpq setting"):
            Pool(dsn, min_size=0, telemetry=False)


async def test_the_dsns_connect_timeout_is_the_pools(postgres: PostgresServer,
                                                     pooler: Pooler) -> None:
    for dsn in (postgres.dsn(connect_timeout="7"), pooler.dsn(connect_timeout="7")):
        async with Pool(dsn, min_size=0, max_size=1, telemetry=False) as pool:
            assert pool.config.connect_timeout == 7
            assert await pool.fetchval("SELECT 1") == 1
        # The option, given too, wins (as asyncpg's and psycopg's keywords win over the DSN).
        async with Pool(dsn, min_size=0, max_size=1, connect_timeout=3, telemetry=False) as pool:
            assert pool.config.connect_timeout == 3
            assert await pool.fetchval("SELECT 1") == 1


async def test_the_dsns_connect_timeout_limits_the_login(silent_server: int) -> None:
    pool = Pool(f"postgresql://app@127.0.0.1:{silent_server}/app?connect_timeout=2",
                min_size=1, telemetry=False)
    started = time.monotonic()
    with pytest.raises(asyncpool.ConnectError, match=r"no answer within connect_timeout=2s"):
        await pool.open()
    assert 1.5 < time.monotonic() - started < 5
    await pool.close()


def test_connect_timeout_is_read_as_libpq_reads_it() -> None:
    dsn = "postgresql://app@db.example.com/app"
    assert PoolConfig(dsn=f"{dsn}?connect_timeout=1").connect_timeout == 2  # libpq's minimum
    for bad, says in (("0", "means no time limit"), ("-3", "means no time limit"),
                      ("2.5", "write whole seconds")):
        with pytest.raises(PoolConfigError, match=f"connect_timeout='{bad}'.*{says}"):
            PoolConfig(dsn=f"{dsn}?connect_timeout={bad}")
    # Not given: the DSN's stands in for the default, and goes when the DSN no longer has it.
    config = PoolConfig(dsn=f"{dsn}?connect_timeout=20")
    assert config.connect_timeout == 20
    assert config.replace(dsn=dsn).connect_timeout == 10
    assert config.replace(dsn=f"{dsn}?connect_timeout=30").connect_timeout == 30
    assert config.replace(connect_timeout=4).connect_timeout == 4
    assert PoolConfig(dsn=f"{dsn}?connect_timeout=20", connect_timeout=4).connect_timeout == 4
    # lambda_config's short default is a default too.
    assert lambda_config(dsn=dsn, environ={}).connect_timeout == 5
    assert lambda_config(dsn=f"{dsn}?connect_timeout=20", environ={}).connect_timeout == 20
    assert lambda_config(dsn=f"{dsn}?connect_timeout=20", environ={},
                         connect_timeout=4).connect_timeout == 4
    assert lambda_config(dsn=f"{dsn}?connect_timeout=20",
                         environ={"ASYNCPOOL_CONNECT_TIMEOUT": "4"}).connect_timeout == 4
    assert "connect_timeout" not in parse_dsn(f"{dsn}?connect_timeout=20").for_asyncpg()


# -- keys nobody knows: still sent as settings, their refusal named ------------------------------


async def test_a_setting_in_the_dsn_still_reaches_the_server(postgres: PostgresServer) -> None:
    async with Pool(postgres.dsn(search_path="pg_catalog"), min_size=0, max_size=1,
                    telemetry=False) as pool:
        assert await pool.fetchval("SHOW search_path") == "pg_catalog"


async def _login_error(dsn: str, **options: Any) -> asyncpool.ConnectError:
    pool = Pool(dsn, min_size=1, max_size=1, telemetry=False, **options)
    with pytest.raises(asyncpool.ConnectError) as caught:
        await pool.open()
    await pool.close()
    return caught.value


@pytest.mark.parametrize("target", ["direct", "pgbouncer"])
def test_a_misspelt_keyword_is_refused_before_any_login(postgres: PostgresServer,
                                                        legacy: Pooler, target: str) -> None:
    """A key that is no connection keyword is a run-time setting, planned as server_settings=
    is: behind PgBouncer only set in each pool.transaction(), so ``?sslmod=`` would silently not
    ask for the TLS mode it meant. Refused when the pool is made (it failed the login, direct)."""
    dsn = (postgres if target == "direct" else legacy).dsn(sslmod="disable")
    with pytest.raises(PoolConfigError) as caught:
        Pool(dsn, telemetry=False)
    message = str(caught.value)
    assert "the DSN's ?sslmod= is no connection keyword" in message
    assert "did you mean ?sslmode=?" in message
    assert "TLS" not in message
    assert _password(dsn) not in message
    # PostgreSQL's settings that are as close to a keyword are settings.
    Pool(postgres.dsn(tcp_keepalives_idle="60"), telemetry=False)


async def test_an_unknown_setting_in_the_dsn_is_named_with_its_source(
        postgres: PostgresServer) -> None:
    dsn = postgres.dsn(serch_path="public")
    error = await _login_error(dsn)
    message = str(error)
    assert "the server does not know run-time setting 'serch_path'" in message
    assert "It came from the DSN's ?serch_path=" in message
    assert "TLS" not in message
    assert _password(dsn) not in message
    assert error.sqlstate == "42704"
    assert error.transient is False


async def test_an_unknown_server_setting_is_named_with_its_source(postgres: PostgresServer) -> None:
    message = str(await _login_error(postgres.dsn(), server_settings={"serch_path": "public"}))
    assert "run-time setting 'serch_path'" in message
    assert "It came from server_settings." in message
    message = str(await _login_error(postgres.dsn(), server_settings={"sslmode": "disable"}))
    assert "'sslmode' is a connection keyword, not a server setting" in message
    assert "TLS failed" not in message


def _asyncpg_addresses(dsn: str | None, host: Any = None, port: Any = None) -> list[tuple[str, int]]:
    """The addresses asyncpg dials, in order, as (host or socket directory, port)."""
    from asyncpg import connect_utils

    addrs, _ = connect_utils._parse_connect_dsn_and_args(  # type: ignore[attr-defined]  # (private)
        dsn=dsn, host=host, port=port, user="u", password=None, passfile=None, database="d",
        ssl=None, service=None, servicefile=None, direct_tls=None, server_settings=None,
        target_session_attrs=None, krbsrvname=None, gsslib=None)
    pairs = []
    for addr in addrs:
        if isinstance(addr, str):  # a socket file: DIR/.s.PGSQL.PORT
            directory, _, name = addr.rpartition("/.s.PGSQL.")
            pairs.append((directory, int(name)))
        else:
            pairs.append((addr[0], addr[1]))
    return pairs


@pytest.mark.parametrize(
    ("dsn", "host", "port", "pgport"),
    [("postgresql://u@h1:5433,h2/d", None, None, None),
     ("postgresql://u@h1,h2/d?port=7", None, None, None),
     ("postgresql://u@/d?host=/tmp,127.0.0.1&port=5999,1", None, None, None),
     ("postgresql://u@h1,h2:6432/d", None, None, "6000"),
     (None, ["h1", "h2"], [5433, 5434], None),
     (None, ["h1", "/run/postgresql"], 6432, None),
     (None, ["h1", "h2"], None, "7000,7001")],
)
def test_the_addresses_named_in_errors_are_the_ones_asyncpg_dials(
        monkeypatch: pytest.MonkeyPatch, dsn: str | None, host: Any, port: Any,
        pgport: str | None) -> None:
    """With several hosts a failed login names each host and port tried (`dialled`): in
    asyncpg's order and with asyncpg's pairing of ports to hosts, for the DSN asyncpg is given."""
    from asyncpool.connect.dsn import dialled

    if pgport is None:
        monkeypatch.delenv("PGPORT", raising=False)
    else:
        monkeypatch.setenv("PGPORT", pgport)
    parsed = parse_dsn(dsn) if dsn else None
    expected = _asyncpg_addresses(parsed.for_asyncpg() if parsed else None, host, port)
    assert list(dialled(parsed, host=host, port=port)) == expected


@pytest.mark.parametrize(
    ("host", "pghost"),
    [(["h1", " h2"], None),
     ("/run/sockets,a", None),
     (None, "h1:5433,h2"),
     (None, "[::1]:5433,/tmp, h3"),
     (None, "h1")],
)
def test_the_hosts_the_credential_rules_check_are_the_ones_asyncpg_dials(
        monkeypatch: pytest.MonkeyPatch, host: Any, pghost: str | None) -> None:
    """The TLS and credential rules apply to each host asyncpg dials: a host= string is one
    (a socket directory with a comma was split in two), PGHOST's ports are no part of a host
    name, and nothing is stripped (asyncpg dials " h2")."""
    from asyncpool.connect.tls import dialled_hosts

    monkeypatch.delenv("PGPORT", raising=False)
    monkeypatch.delenv("PGSERVICE", raising=False)
    environ = {"PGHOST": pghost} if pghost is not None else {}
    if pghost is None:
        monkeypatch.delenv("PGHOST", raising=False)
    else:
        monkeypatch.setenv("PGHOST", pghost)
    config = PoolConfig(connect_kwargs={"host": host} if host is not None else {})
    expected = [h for h, _ in _asyncpg_addresses(None, host)]
    assert dialled_hosts(config, environ) == expected


def test_a_host_string_with_a_comma_is_refused_with_the_list_to_pass() -> None:
    """asyncpg dials a host= string as one host name, comma and all (a DSN's or PGHOST's hosts
    are a list): such a name never resolves, and the rules checked two hosts it never dials."""
    with pytest.raises(PoolConfigError, match=r"host='h1, h2': asyncpg takes a host= string as "
                       r"one host name, not a list; pass host=\['h1', 'h2'\]"):
        Pool(host="h1, h2")
    assert PoolConfig(connect_kwargs={"host": ["h1", "h2"]}).connect_kwargs["host"] == ["h1", "h2"]


async def test_a_socket_directory_with_a_comma_is_one_local_host(
        postgres: PostgresServer, tmp_path: Any) -> None:
    """host= a socket directory whose name holds a comma: asyncpg dials that directory, and the
    pool checked two hosts instead, one of them "remote", so a password was refused there as
    sent in clear to a remote host; now the login to the real server goes through."""
    assert postgres.workdir is not None
    directory = tmp_path / "sockets,one"
    directory.symlink_to(postgres.workdir)
    async with Pool(host=str(directory), port=postgres.port, user=postgres.app.name,
                    password=postgres.app.password, database=postgres.database, min_size=0,
                    telemetry=False) as pool:
        assert await pool.fetchval("SELECT 1") == 1
