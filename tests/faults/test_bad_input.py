"""Bad input: each mistake gives a clear asyncpool error naming what to fix, and no secret.

Every error is checked together with everything chained to it (cause and context) and every
log record written while it happened: the password must appear in none of them.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import asyncpg
import pytest

import asyncpool
from asyncpool import (
    AuthenticationError,
    ConnectError,
    Pool,
    PoolConfig,
    PoolConfigError,
    PoolError,
    PoolTimeoutError,
)
from asyncpool.pool.housekeeping import housekeep
from asyncpool.testing import PgBouncerServer, PostgresServer
from asyncpool.testing.invariants import chain
from asyncpool.testing.ports import free_port
from asyncpool.testing.sync import run_sync

# Passwords that break naive redaction: URL delimiters, quotes, spaces, a lone '@'.
SECRETS = ["Sup3r-s3cret", "p@ss@word", "sl/ash:colon", "hash#q?mark", "quo'te d"]


@pytest.fixture
def logs(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    with caplog.at_level(logging.DEBUG):
        yield caplog


def assert_secret_free(exc: BaseException, secrets: list[str], logs: pytest.LogCaptureFixture
                       ) -> None:
    texts = [t for e in chain(exc) for t in (str(e), repr(e), *map(str, e.args))]
    texts += [r.getMessage() for r in logs.records]
    texts += [str(r.exc_info[1]) for r in logs.records if r.exc_info and r.exc_info[1]]
    for secret in secrets:
        leaks = [t for t in texts if secret in t]
        assert not leaks, f"{secret!r} printed in: {leaks[:3]}"


_PACKAGE = os.path.dirname(asyncpool.__file__) + os.sep


def assert_frames_secret_free(exc: BaseException, secret: str) -> None:
    """No frame of asyncpool's in `exc`'s traceback (or its chain's) holds `secret` in a
    local (the caller's own frames hold what it passed)."""
    for error in chain(exc):
        tb = error.__traceback__
        while tb is not None:
            own = tb.tb_frame.f_code.co_filename.startswith(_PACKAGE)
            held = [name for name, value in tb.tb_frame.f_locals.items()
                    if own and secret in repr(value)]
            assert not held, f"{tb.tb_frame.f_code.co_name} holds the secret in {held}"
            tb = tb.tb_next


async def _open_fails(dsn: str, **options: Any) -> PoolError:
    pool = Pool(dsn, name="bad", acquire_timeout=2, connect_timeout=1, telemetry=False, **options)
    with pytest.raises(PoolError) as info:
        await pool.open()
    assert pool.stats().size == 0
    return info.value


# -- the DSN ---------------------------------------------------------------------------------


@pytest.mark.parametrize("secret", SECRETS)
@pytest.mark.parametrize(
    ("template", "fix"),
    [
        ("mysql://app:{pw}@127.0.0.1:5432/app", "postgresql://"),
        ("postgresql://app:{pw}@127.0.0.1:port/app", "port"),
        # libpq's key=value strings are read (tests/test_dsn_conninfo.py); one libpq would
        # refuse too is refused, saying what is wrong with it and nothing of the password.
        ("host=127.0.0.1 user=app password='{pw} dbname=app", "key=value string as libpq reads it"),
        ("postgresql://app:{pw}@127.0.0.1:99999/app", "port"),
    ],
    ids=["wrong-scheme", "port-not-a-number", "key-value-string-unclosed-quote",
         "port-out-of-range"],
)
def test_malformed_dsn(template: str, fix: str, secret: str,
                       logs: pytest.LogCaptureFixture) -> None:
    dsn = template.format(pw=secret)
    # Refused as the pool is made, not at its open() (on Lambda, the first invocation).
    with pytest.raises(PoolConfigError) as info:
        Pool(dsn, name="bad", acquire_timeout=2, connect_timeout=1, telemetry=False)
    error = info.value
    assert_frames_secret_free(error, secret)
    # A password with a reserved character is refused for that first (#23): percent-encode it.
    assert fix in str(error) or "percent-encode" in str(error)
    assert_secret_free(error, [secret], logs)


@pytest.mark.parametrize("secret", SECRETS)
def test_config_repr_hides_the_password(secret: str) -> None:
    config = PoolConfig(dsn=f"postgresql://app:{_quoted(secret)}@127.0.0.1:5432/app")
    for text in (repr(config), str(config), repr(Pool(config=config))):
        assert secret not in text
        assert _quoted(secret) not in text
    assert "postgresql://app:***@127.0.0.1:5432/app" in repr(config)
    # Written unencoded, the DSN may not parse: then it is refused as the config is made,
    # and nothing of it is shown (#23), not in the message nor in the traceback's frames.
    raw = _made(f"postgresql://app:{secret}@127.0.0.1:5432/app")
    if isinstance(raw, PoolConfigError):
        assert secret not in str(raw)
        assert_frames_secret_free(raw, secret)
    else:
        assert secret not in repr(raw)


def _made(dsn: str) -> PoolConfig | PoolConfigError:
    try:
        return PoolConfig(dsn=dsn)
    except PoolConfigError as exc:
        return exc


# -- where the DSN points --------------------------------------------------------------------


async def test_unknown_host(logs: pytest.LogCaptureFixture) -> None:
    dsn = "postgresql://app:Sup3r-s3cret@no-such-host.invalid:5432/app"  # pragma: allowlist secret
    # verify-full: a password goes nowhere else (a PoolConfigError would come first otherwise).
    error = await _open_fails(dsn, ssl="verify-full")
    assert type(error) is ConnectError
    assert "no-such-host.invalid" in str(error)
    assert "unknown host" in str(error)
    assert error.transient is False
    assert_secret_free(error, ["Sup3r-s3cret"], logs)


async def test_wrong_port(logs: pytest.LogCaptureFixture) -> None:
    port = free_port()
    error = await _open_fails(f"postgresql://app:Sup3r-s3cret@127.0.0.1:{port}/app")
    assert type(error) is ConnectError
    assert "connection refused" in str(error)
    assert f"port {port}" in str(error)
    assert_secret_free(error, ["Sup3r-s3cret"], logs)


async def test_a_unix_socket_that_is_not_there(tmp_path: Path,
                                              logs: pytest.LogCaptureFixture) -> None:
    # A socket directory or port of another installation (/tmp against Debian's
    # /var/run/postgresql): asyncpg says only "No such file or directory".
    dsn = f"postgresql://app:Sup3r-s3cret@/app?host={tmp_path}&port=5999"  # pragma: allowlist secret
    error = await _open_fails(dsn)
    assert type(error) is ConnectError
    assert f"no socket at {tmp_path}/.s.PGSQL.5999" in str(error)
    assert "is the server running on this machine" in str(error)
    assert_secret_free(error, ["Sup3r-s3cret"], logs)


async def test_several_hosts_name_each_and_advise_on_the_one_that_failed_last(
        tmp_path: Path, logs: pytest.LogCaptureFixture) -> None:
    # asyncpg tries the hosts in turn and raises the last one's network error: each host is
    # named with its own, and the advice (both network failures) is about the last (the port of
    # the first was named, and a TCP refusal read as the socket's).
    port = free_port()
    dsn = (f"postgresql://app:Sup3r-s3cret@/app?host={tmp_path},127.0.0.1"  # pragma: allowlist secret
           f"&port=5999,{port}")
    error = await _open_fails(dsn)
    assert type(error) is ConnectError
    assert f"app@{tmp_path}:5999,127.0.0.1:{port}/app, its hosts tried in turn" in str(error)
    advice, each = str(error).split(" (each host: ")
    assert f"at 127.0.0.1:{port}: connection refused" in advice
    assert f"is port {port} right?" in advice
    assert "socket" not in advice
    assert each == f"{tmp_path}:5999: no socket, 127.0.0.1:{port}: connection refused)"
    assert_secret_free(error, ["Sup3r-s3cret"], logs)


async def test_several_hosts_and_a_refused_login_do_not_blame_the_last_host(
        postgres: PostgresServer, logs: pytest.LogCaptureFixture) -> None:
    # A server's answer ends the tries at the host that gave it: here the first.
    host, port = postgres.dsn().rsplit("@", 1)[1].split("/")[0].rsplit(":", 1)
    closed = free_port()
    dsn = f"postgresql://app:Wr0ng-pass@{host}:{port},127.0.0.1:{closed}/app"  # pragma: allowlist secret
    error = await _open_fails(dsn)
    assert type(error) is AuthenticationError
    assert f"its hosts tried in turn, at {host}:{port}: authentication failed" in str(error)
    assert f"(each host: {host}:{port}: the login was refused, 127.0.0.1:{closed}: not tried)" in str(error)
    assert_secret_free(error, ["Wr0ng-pass", postgres.app.password], logs)


@asynccontextmanager
async def _listener(answer: bytes) -> AsyncIterator[int]:
    """A port where something other than PostgreSQL listens: it reads, writes `answer` (an HTTP
    or Redis error; nothing: it closes at once, as a port forward with no server behind it)."""
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(8)
        writer.write(answer)
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await server.wait_closed()


@pytest.mark.parametrize("answer", [b"HTTP/1.1 400 Bad Request\r\n\r\n", b"-ERR unknown\r\n"])
async def test_a_port_that_is_not_postgres_is_not_called_a_server_without_tls(
    answer: bytes, logs: pytest.LogCaptureFixture,
) -> None:
    # Under the default ssl mode (prefer) PostgreSQL and PgBouncer without TLS are dialled
    # without it: "turn ssl on at the server" would send the reader the wrong way.
    async with _listener(answer) as port:
        error = await _open_fails(f"postgresql://app:Sup3r-s3cret@127.0.0.1:{port}/app")
        required = await _open_fails(f"postgresql://app:Sup3r-s3cret@127.0.0.1:{port}/app",
                                     ssl="require")
    assert type(error) is ConnectError
    assert "what answered is not PostgreSQL or a pooler" in str(error)
    assert "turn ssl on" not in str(error)
    assert "check the host and port" in str(error)
    assert error.transient is False
    # Where TLS is required, the answer cannot be told from a server without TLS: both named.
    assert "does not accept TLS" in str(required)
    assert "check the host and port" in str(required)
    for each in (error, required):
        assert_secret_free(each, ["Sup3r-s3cret"], logs)


async def test_a_port_that_closes_at_once(logs: pytest.LogCaptureFixture) -> None:
    async with _listener(b"") as port:
        error = await _open_fails(f"postgresql://app:Sup3r-s3cret@127.0.0.1:{port}/app")
    assert type(error) is ConnectError
    assert "closed before anything answered" in str(error)
    assert "check the host and port" in str(error)
    assert_secret_free(error, ["Sup3r-s3cret"], logs)


@pytest.fixture(params=["postgres", "pgbouncer-1.18", "pgbouncer-current"])
def server(request: pytest.FixtureRequest, postgres: PostgresServer, legacy: PgBouncerServer,
           current: PgBouncerServer) -> PostgresServer | PgBouncerServer:
    """PostgreSQL itself and each PgBouncer: each words its refusals differently."""
    servers: dict[str, PostgresServer | PgBouncerServer] = {
        "postgres": postgres, "pgbouncer-1.18": legacy, "pgbouncer-current": current,
    }
    return servers[request.param]


@pytest.mark.parametrize("secret", SECRETS)
async def test_wrong_password(server: PostgresServer | PgBouncerServer, postgres: PostgresServer,
                              secret: str, logs: pytest.LogCaptureFixture) -> None:
    right = server.dsn()
    wrong = right.replace(postgres.app.password, _quoted(secret))
    error = await _open_fails(wrong)
    assert isinstance(error, AuthenticationError)
    assert "authentication failed for user 'app'" in str(error)
    assert error.transient is False
    # The server's words are in the message; its error's class and SQLSTATE are attributes, the
    # error itself is not chained: asyncpg's frames hold the password (#23).
    assert error.__cause__ is None
    assert error.__context__ is None
    assert error.sqlstate in ("28P01", "08P01")
    assert error.driver_error_class is not None
    assert error.driver_error_class.startswith("asyncpg.exceptions.")
    assert_secret_free(error, [secret, postgres.app.password], logs)


@pytest.fixture(scope="module")
def trusting(postgres: PostgresServer) -> Iterator[PostgresServer]:
    """A PostgreSQL that lets two role names in without a password, as trust, peer and cert
    rules do: one it has no role for, one whose role may not log in. Only past such a rule does
    PostgreSQL say why (28000); password rules answer both as a wrong password (28P01)."""
    server = PostgresServer(max_connections=10, hba_lines=[
        "host all nosuchuser 127.0.0.1/32 trust", "host all shy 127.0.0.1/32 trust"])
    server.start()
    try:
        async def create_shy_role() -> None:
            conn = await asyncpg.connect(server.admin_dsn)
            try:
                await conn.execute("CREATE ROLE shy NOLOGIN")
            finally:
                await conn.close()

        run_sync(create_shy_role())
        yield server
    finally:
        server.stop()


@pytest.mark.parametrize("with_password", [False, True], ids=["no-password", "password"])
async def test_a_role_the_server_does_not_have_is_not_blamed_on_the_password(
    trusting: PostgresServer, with_password: bool, logs: pytest.LogCaptureFixture,
) -> None:
    secret = SECRETS[1]
    userinfo = f"nosuchuser:{_quoted(secret)}" if with_password else "nosuchuser"
    error = await _open_fails(f"postgresql://{userinfo}@127.0.0.1:{trusting.port}/app")
    assert isinstance(error, AuthenticationError)
    assert error.sqlstate == "28000"
    message = str(error)
    assert 'role "nosuchuser" does not exist' in message  # the server's words
    assert "the server has no role 'nosuchuser'" in message
    assert "user name" in message
    assert "password" not in message
    assert_secret_free(error, [secret, _quoted(secret)], logs)


async def test_a_role_that_may_not_log_in_is_named(trusting: PostgresServer,
                                                   logs: pytest.LogCaptureFixture) -> None:
    error = await _open_fails(f"postgresql://shy@127.0.0.1:{trusting.port}/app")
    assert isinstance(error, AuthenticationError)
    assert error.sqlstate == "28000"
    message = str(error)
    assert "role 'shy' exists but may not log in" in message
    assert "ALTER ROLE" in message
    assert "password" not in message


async def test_an_unknown_user_behind_a_password_rule_is_suggested(
    server: PostgresServer | PgBouncerServer, postgres: PostgresServer,
    logs: pytest.LogCaptureFixture,
) -> None:
    """PostgreSQL and PgBouncer refuse an unknown user as they refuse a wrong password: the
    advice says it may be either."""
    dsn = server.dsn().replace("postgresql://app:", "postgresql://nosuchuser:", 1)
    error = await _open_fails(dsn)
    assert isinstance(error, AuthenticationError)
    message = str(error)
    assert "the password given for user 'nosuchuser' was refused" in message
    assert "or the server has no such user" in message
    assert_secret_free(error, [postgres.app.password], logs)


async def test_wrong_database(server: PostgresServer | PgBouncerServer, postgres: PostgresServer,
                              logs: pytest.LogCaptureFixture) -> None:
    error = await _open_fails(server.dsn(database="no_such_db"))
    assert isinstance(error, ConnectError)
    assert "no_such_db" in str(error)
    assert "does not exist" in str(error)
    assert error.transient is False
    assert_secret_free(error, [postgres.app.password], logs)


async def test_a_failed_login_is_logged_with_the_pool_named_once(
    postgres: PostgresServer, logs: pytest.LogCaptureFixture,
) -> None:
    """The connect errors start with "pool 'bad' could not connect": the lines that log them
    (the last try, a retry, housekeeping's refill) do not name the pool a second time."""
    no_database = postgres.dsn(database="no_such_db")
    refused = f"postgresql://app@127.0.0.1:{free_port()}/app"
    for dsn in (no_database, refused):
        async with Pool(dsn, name="bad", min_size=0, acquire_timeout=1, connect_timeout=1,
                        telemetry=False) as pool:
            # (On a loaded machine the refused logins' retries can still be under way when the
            # acquire's second runs out: PoolTimeoutError, with the connect error as its last.)
            with pytest.raises((ConnectError, PoolTimeoutError)):
                await pool.fetchval("SELECT 1")
    pool = Pool(no_database, name="bad", min_size=1, telemetry=False)
    await pool.open(wait=False)
    try:
        await housekeep(pool._slots)
    finally:
        await pool.close()
    lines = [r.getMessage() for r in logs.records if "could not connect" in r.getMessage()]
    assert any("retrying in" in line for line in lines), lines
    assert any("could not keep min_size connections" in line for line in lines), lines
    assert len(lines) >= 4, lines
    for line in lines:
        assert line.startswith("pool 'bad'"), line
        assert line.count("pool 'bad'") == 1, line


@pytest.mark.parametrize("mode", ["require", "verify-full"])
async def test_tls_required_but_the_server_has_none(
    server: PostgresServer | PgBouncerServer, postgres: PostgresServer, mode: str,
    logs: pytest.LogCaptureFixture,
) -> None:
    error = await _open_fails(server.dsn(), ssl=mode)
    assert type(error) is ConnectError
    assert "does not accept TLS" in str(error)
    assert error.transient is False
    assert_secret_free(error, [postgres.app.password], logs)


def _quoted(secret: str) -> str:
    from urllib.parse import quote

    return quote(secret, safe="")


# -- option values ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"min_size": -1}, "min_size"),
        ({"max_size": 0}, "max_size"),
        ({"min_size": 5, "max_size": 2}, "min_size=5 is larger than max_size=2"),
        ({"max_size": "10"}, "max_size"),
        ({"max_size": 2.5}, "max_size"),
        ({"acquire_timeout": -1}, "acquire_timeout"),
        ({"acquire_timeout": float("nan")}, "acquire_timeout"),
        ({"acquire_timeout": "5"}, "acquire_timeout"),
        ({"connect_timeout": 0}, "connect_timeout"),
        ({"max_lifetime": -30}, "max_lifetime"),
        ({"max_idle": 0}, "max_idle"),
        ({"max_lifetime": 1e-9}, "max_lifetime"),
        ({"max_idle": 0.05}, "max_idle"),
        ({"leak_timeout": -1}, "leak_timeout"),
        ({"validate_after": -1}, "validate_after"),
        ({"validate_after": "1"}, "validate_after"),
        ({"validate_after": float("nan")}, "validate_after"),
        ({"lifetime_jitter": 1.5}, "lifetime_jitter"),
        ({"lifetime_jitter": "0.1"}, "lifetime_jitter"),
        ({"statement_cache_size": -1}, "statement_cache_size"),
        ({"prepared_statements": "maybe"}, "prepared_statements"),
        ({"leak_action": "explode"}, "leak_action"),
        ({"ssl": "required"}, "ssl"),
        ({"ssl_root_cert": "/no/such/ca.pem"}, "ssl_root_cert"),
    ],
    ids=lambda v: "-".join(f"{k}={v[k]}" for k in v) if isinstance(v, dict) else None,
)
def test_invalid_option_values(options: dict[str, Any], named: str) -> None:
    dsn = "postgresql://app:Sup3r-s3cret@127.0.0.1:5432/app"
    with pytest.raises(PoolConfigError) as info:
        Pool(dsn, name="bad", **options)
    message = str(info.value)
    assert named in message
    assert "'bad'" in message
    assert "Sup3r-s3cret" not in message


def test_invalid_environment_value_names_the_variable() -> None:
    with pytest.raises(PoolConfigError, match="ASYNCPOOL_MAX_SIZE='lots': write a whole number"):
        PoolConfig.from_env({"ASYNCPOOL_MAX_SIZE": "lots"})


def test_misspelt_option_is_named() -> None:
    with pytest.raises(PoolConfigError, match=r"max_sise=: not an option of Pool\(\); did you mean max_size"):
        Pool("postgresql://app@127.0.0.1/app", max_sise=5)  # type: ignore[call-overload]


def test_the_error_types_are_exported() -> None:
    # Callers catch these by name; the classes the suite asserts on are the public ones.
    assert asyncpool.PoolConfigError is PoolConfigError
    assert issubclass(AuthenticationError, ConnectError)
