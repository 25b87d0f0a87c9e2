"""A login to several hosts that fails on each: the error names every host with its own failure,
and advises on the one to fix (a TLS certificate that did not verify, over a refused port).

asyncpg tries the hosts in turn, goes on after a network or TLS error (an OSError) and raises only
the last host's error: with a bad certificate on one host and a closed port on another, the
certificate problem was named only when its host came last, and a host that connected but was
not the kind ``target_session_attrs`` asked for was blamed for an earlier host's error.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Iterator
from typing import Any, Literal
from urllib.parse import quote

import pytest

from asyncpool import AuthenticationError, AuthMethodRefusedError, ConnectError, Pool
from asyncpool.config import PoolConfig
from asyncpool.connect.authguard import Login
from asyncpool.connect.dsn import parse_dsn
from asyncpool.connect.hosts import HostsLoop, bare
from asyncpool.load.logins import GuardedLogin
from asyncpool.testing import PostgresServer
from asyncpool.testing.pki import TestPki
from asyncpool.testing.ports import free_port
from tests.secret_support import exposed, leaks
from tests.standby_support import ColdStandby


@pytest.fixture
def closed_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def cold_standby() -> Iterator[ColdStandby]:
    server = ColdStandby(max_connections=10)
    server.start()
    yield server
    server.stop()


def _dsn(server: PostgresServer, hosts: list[str], **params: str) -> str:
    one = server.app.dsn("H", 1, server.database, **params)
    return one.replace("H:1", ",".join(hosts))


async def _fail(dsn: str, **options: Any) -> ConnectError:
    options.setdefault("connect_timeout", 5)
    pool = Pool(dsn, min_size=1, max_size=1, telemetry=False, **options)
    with pytest.raises(ConnectError) as info:
        await pool.open()
    await pool.close()
    return info.value


@pytest.mark.parametrize("bad_first", [True, False], ids=["bad-cert-first", "bad-cert-last"])
async def test_each_host_is_named_with_its_own_error_and_the_certificate_is_advised_on(
        tls_postgres: PostgresServer, pki: TestPki, closed_port: int, bad_first: bool) -> None:
    # The certificate is for "localhost": dialled as 127.0.0.1 it does not verify.
    bad = f"127.0.0.1:{tls_postgres.port}"
    refused = f"127.0.0.1:{closed_port}"
    hosts = [bad, refused] if bad_first else [refused, bad]
    error = await _fail(_dsn(tls_postgres, hosts, sslmode="verify-full",
                             sslrootcert=str(pki.ca_cert)))
    message = str(error)
    assert f"{bad}: the server's TLS certificate did not verify" in message
    assert f"{refused}: connection refused" in message
    # The advice is the certificate's, whichever host came last.
    assert "the certificate is not for '127.0.0.1'" in message
    assert "is port" not in message
    # The refused port may come up: retried, as a refused port alone is.
    assert error.transient is True
    assert leaks(exposed(error), [tls_postgres.app.password]) == []


@pytest.mark.parametrize("bad_first", [True, False], ids=["bad-cert-first", "bad-cert-last"])
async def test_a_host_passed_over_for_target_session_attrs_is_not_blamed_for_anothers_error(
        tls_postgres: PostgresServer, pki: TestPki, bad_first: bool) -> None:
    # "localhost" verifies and logs in, but is a primary: standby= passes it over, and asyncpg
    # raises the other host's certificate error whichever came last.
    bad = f"127.0.0.1:{tls_postgres.port}"
    good = f"localhost:{tls_postgres.port}"
    hosts = [bad, good] if bad_first else [good, bad]
    error = await _fail(_dsn(tls_postgres, hosts, sslmode="verify-full",
                             sslrootcert=str(pki.ca_cert), target_session_attrs="standby"))
    message = str(error)
    assert f"at {bad}: the server's TLS certificate did not verify" in message
    assert "the certificate is not for '127.0.0.1'" in message
    assert "not for 'localhost'" not in message
    assert f"{good}: logged in, and was passed over for target_session_attrs" in message
    assert error.transient is False
    assert leaks(exposed(error), [tls_postgres.app.password]) == []


@pytest.mark.parametrize("attrs", ["read-write", "standby"])
@pytest.mark.parametrize("cold_first", [True, False], ids=["cold-first", "cold-last"])
async def test_a_server_not_taking_logins_yet_is_named_not_the_host_passed_over(
        cold_standby: ColdStandby, postgres: PostgresServer, attrs: str, cold_first: bool) -> None:
    # asyncpg goes on after a 57P03 as after a network error, and raises it once the other
    # host is passed over (a primary for "standby"; one read-only by default for "read-write"):
    # it was put on the host passed over when that one came last.
    cold = f"127.0.0.1:{cold_standby.port}"
    passed_over = f"127.0.0.1:{postgres.port}"
    hosts = [cold, passed_over] if cold_first else [passed_over, cold]
    settings = {"default_transaction_read_only": "on"} if attrs == "read-write" else None
    error = await _fail(_dsn(postgres, hosts, sslmode="disable", target_session_attrs=attrs),
                        server_settings=settings)
    message = str(error)
    assert f"at {cold}: the server is starting up or shutting down" in message
    assert f"at {passed_over}" not in message
    assert f"{cold}: the server cannot take logins now (57P03:" in message
    assert f"{passed_over}: logged in, and was passed over for target_session_attrs" in message
    assert error.sqlstate == "57P03"
    assert error.transient is True
    assert leaks(exposed(error), [postgres.app.password]) == []


async def test_logins_outside_a_pool_name_a_server_not_taking_logins_yet_too(
        cold_standby: ColdStandby, postgres: PostgresServer) -> None:
    cold = f"127.0.0.1:{cold_standby.port}"
    passed_over = f"127.0.0.1:{postgres.port}"
    dsn = _dsn(postgres, [cold, passed_over], sslmode="disable", target_session_attrs="standby")
    login = Login(PoolConfig.from_env(name="doctor", dsn=None), parse_dsn(dsn))
    with pytest.raises(ConnectError) as info:
        await login.connect(5, "doctor")
    with pytest.raises(ConnectError) as bench:
        await GuardedLogin(dsn).connect_asyncpg(timeout=5)
    for error in (info.value, bench.value):
        assert f"at {cold}: the server is starting up" in str(error)
        assert f"{passed_over}: logged in, and was passed over" in str(error)


@pytest.mark.parametrize("refused_first", [True, False], ids=["closed-first", "closed-last"])
async def test_a_refused_login_names_its_host_and_the_hosts_not_tried(
        tls_postgres: PostgresServer, pki: TestPki, closed_port: int, refused_first: bool) -> None:
    wrong = "Wr0ng-passw0rd-for-the-test"  # pragma: allowlist secret
    good = f"localhost:{tls_postgres.port}"
    closed = f"127.0.0.1:{closed_port}"
    hosts = [closed, good] if refused_first else [good, closed]
    dsn = _dsn(tls_postgres, hosts, sslmode="verify-full", sslrootcert=str(pki.ca_cert))
    dsn = dsn.replace(quote(tls_postgres.app.password, safe=""), wrong)
    error = await _fail(dsn)
    message = str(error)
    assert isinstance(error, AuthenticationError)
    assert f"at {good}: authentication failed for user 'app'" in message
    if refused_first:
        assert f"{closed}: connection refused, {good}: the login was refused" in message
    else:
        # asyncpg stops at a server's refusal: the next host is not dialled.
        assert f"{good}: the login was refused, {closed}: not tried" in message
    assert leaks(exposed(error), [tls_postgres.app.password, wrong]) == []


@pytest.mark.parametrize("mode", ["unnamed", "off"])
async def test_a_login_after_a_refused_host_works_in_every_statement_mode(
        tls_postgres: PostgresServer, pki: TestPki, closed_port: int,
        mode: Literal["unnamed", "off"]) -> None:
    hosts = [f"127.0.0.1:{closed_port}", f"localhost:{tls_postgres.port}"]
    dsn = _dsn(tls_postgres, hosts, sslmode="verify-full", sslrootcert=str(pki.ca_cert))
    async with Pool(dsn, min_size=1, max_size=1, telemetry=False, connect_timeout=5,
                    prepared_statements=mode) as pool:
        assert await pool.fetchval("SELECT $1::int + 1", 1) == 2


async def test_a_method_the_guard_refuses_is_named_at_the_host_that_asked(
        tls_postgres: PostgresServer, pki: TestPki, closed_port: int) -> None:
    good = f"localhost:{tls_postgres.port}"
    hosts = [f"127.0.0.1:{closed_port}", good]
    dsn = _dsn(tls_postgres, hosts, sslmode="verify-full", sslrootcert=str(pki.ca_cert))
    error = await _fail(dsn, require_auth="md5")
    assert isinstance(error, AuthMethodRefusedError)
    assert f"could not connect to app@{good}/app: the server asked for SCRAM-SHA-256" in str(error)
    assert leaks(exposed(error), [tls_postgres.app.password]) == []


async def test_logins_outside_a_pool_name_each_host_too(
        tls_postgres: PostgresServer, pki: TestPki, closed_port: int) -> None:
    # `asyncpool doctor` and the bench's contenders log in through `Login` / `GuardedLogin`.
    bad = f"127.0.0.1:{tls_postgres.port}"
    refused = f"127.0.0.1:{closed_port}"
    dsn = _dsn(tls_postgres, [bad, refused], sslmode="verify-full", sslrootcert=str(pki.ca_cert))
    login = Login(PoolConfig.from_env(name="doctor", dsn=None), parse_dsn(dsn))
    with pytest.raises(ConnectError) as info:
        await login.connect(5, "doctor")
    with pytest.raises(ConnectError) as bench:
        await GuardedLogin(dsn).connect_asyncpg(timeout=5)
    for error in (info.value, bench.value):
        assert f"at {bad}: the server's TLS certificate did not verify" in str(error)
        assert f"{refused}: connection refused" in str(error)
        assert leaks(exposed(error), [tls_postgres.app.password]) == []


async def test_a_host_that_never_answers_is_named_after_a_refused_one(
        tls_postgres: PostgresServer, closed_port: int) -> None:
    # The time limit ends the tries at the host being dialled: asyncpg raises only "timeout".
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # until the client gives up
        writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    quiet = f"127.0.0.1:{server.sockets[0].getsockname()[1]}"
    refused = f"127.0.0.1:{closed_port}"
    try:
        error = await _fail(_dsn(tls_postgres, [refused, quiet], sslmode="disable"),
                            connect_timeout=0.5)
    finally:
        server.close()
    assert f"at {quiet}: no answer within connect_timeout=0.5s" in str(error)
    assert f"(each host: {refused}: connection refused, {quiet}: no answer in time)" in str(error)
    assert error.transient is True


async def test_a_connection_made_after_a_failed_host_notes_nothing_more(
        tls_postgres: PostgresServer, pki: TestPki, closed_port: int) -> None:
    # asyncpg's cancel requests connect through the loop the connection was made with.
    hosts = [f"127.0.0.1:{closed_port}", f"localhost:{tls_postgres.port}"]
    dsn = _dsn(tls_postgres, hosts, sslmode="verify-full", sslrootcert=str(pki.ca_cert))
    async with Pool(dsn, min_size=1, max_size=1, telemetry=False, connect_timeout=5,
                    prepared_statements="off") as pool, pool.acquire() as conn:
        raw: Any = conn
        loop = raw._loop
        while not isinstance(loop, HostsLoop):
            loop = loop.real
        assert loop.log.tries == []
        with pytest.raises(TimeoutError):
            await conn.fetchval("SELECT pg_sleep(10)", timeout=0.2)
        await asyncio.wait_for(asyncio.gather(*raw._cancellations), 5)
        assert await conn.fetchval("SELECT 1") == 1
        assert loop.log.tries == []


def test_a_hosts_error_is_kept_without_its_frames() -> None:
    def fail(password: str) -> None:
        raise ssl.SSLCertVerificationError(1, "certificate verify failed")

    try:
        try:
            fail("Sup3r-s3cret")  # pragma: allowlist secret
        except ssl.SSLError as inner:
            raise OSError("outer") from inner
    except OSError as exc:
        caught = exc.__cause__
    assert isinstance(caught, ssl.SSLCertVerificationError)
    caught.verify_message = "Hostname mismatch"
    kept = bare(caught)
    assert type(kept) is ssl.SSLCertVerificationError
    assert (kept.args, kept.verify_message) == (caught.args, "Hostname mismatch")
    assert caught.__traceback__ is not None
    assert kept.__traceback__ is None
    assert kept.__cause__ is None
    assert kept.__context__ is None
