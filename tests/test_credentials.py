"""Passwords for SCRAM-SHA-256 (DSN, explicit, environment) through PostgreSQL and both
PgBouncers, the provider protocol's retry-once path, and the errors for a wrong password."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from asyncpool import (
    AuthenticationError,
    CredentialProvider,
    CredentialsError,
    CredentialsUnavailableError,
    IamAuth,
    Pool,
    PoolConfigError,
    PoolObserver,
    SecretsManagerAuth,
    StaticPassword,
    Target,
)
from asyncpool.observer import ConnectAttempt
from asyncpool.testing import PostgresServer
from tests.conftest import Pooler
from tests.provider_support import QuietProvider


@dataclass
class AttemptLog(PoolObserver):
    """Every connection attempt the pool reports."""

    attempts: list[ConnectAttempt] = field(default_factory=list)

    def connect_attempted(self, attempt: ConnectAttempt) -> None:
        self.attempts.append(attempt)


def _pool(dsn: str, observer: PoolObserver | None = None, **options: Any) -> Pool:
    options = {"min_size": 1, "max_size": 2, "telemetry": False, **options}
    return Pool(dsn, observers=[observer] if observer else None, **options)


def _without_password(dsn: str, password: str) -> str:
    return dsn.replace(f":{password}@", "@")


async def test_password_in_the_dsn_logs_in_through_postgres_and_pgbouncer(
    postgres: PostgresServer, pooler: Pooler
) -> None:
    for dsn in (postgres.dsn(), pooler.dsn()):
        async with _pool(dsn) as pool:
            assert await pool.fetchval("SELECT current_user") == "app"


async def test_static_password_provider_with_a_dsn_without_password(
    postgres: PostgresServer, pooler: Pooler
) -> None:
    password = postgres.app.password
    for dsn in (postgres.dsn(), pooler.dsn()):
        bare = _without_password(dsn, password)
        assert password not in bare
        async with _pool(bare, credentials=StaticPassword(password)) as pool:
            assert await pool.fetchval("SELECT current_user") == "app"


async def test_password_from_the_environment(
    postgres: PostgresServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    bare = _without_password(postgres.dsn(), postgres.app.password)
    monkeypatch.setenv("PGPASSWORD", postgres.app.password)
    async with _pool(bare) as pool:
        assert await pool.fetchval("SELECT 1") == 1
    monkeypatch.delenv("PGPASSWORD")
    monkeypatch.setenv("ORDERS_DB_PASSWORD", postgres.app.password)
    async with _pool(bare, credentials=StaticPassword.from_env("ORDERS_DB_PASSWORD")) as pool:
        assert await pool.fetchval("SELECT 1") == 1


def test_password_from_an_unset_variable_says_which(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ORDERS_DB_PASSWORD", raising=False)
    with pytest.raises(CredentialsError, match="ORDERS_DB_PASSWORD is not set"):
        StaticPassword.from_env("ORDERS_DB_PASSWORD")


async def test_wrong_password_fails_once_with_advice_and_without_the_password(
    postgres: PostgresServer, pooler: Pooler, caplog: pytest.LogCaptureFixture
) -> None:
    wrong = "definitely-not-the-password"
    caplog.set_level(logging.DEBUG, logger="asyncpool")
    for dsn in (postgres.dsn(), pooler.dsn()):
        log = AttemptLog()
        pool = _pool(_without_password(dsn, postgres.app.password), log,
                     credentials=StaticPassword(wrong))
        with pytest.raises(AuthenticationError) as info:
            await pool.open()
        message = str(info.value)
        assert "authentication failed for user 'app'" in message
        assert "fix it in the DSN or settings" in message
        assert "auth_file" in message
        assert wrong not in message
        # A fixed password cannot get better: no second login.
        assert len(log.attempts) == 1
    assert wrong not in caplog.text


async def test_a_login_refused_with_no_password_given_says_none_was_given(
    postgres: PostgresServer, pooler: Pooler, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The quick start's DSN has no password: refused, it said "check the password or
    credentials provider" of a password nobody gave. With a password file line for the login,
    the generic advice stays (that password may be the wrong one)."""
    monkeypatch.delenv("PGPASSWORD", raising=False)
    monkeypatch.delenv("PGSERVICE", raising=False)
    passfile = tmp_path / "pgpass"
    passfile.write_text("")
    passfile.chmod(0o600)
    monkeypatch.setenv("PGPASSFILE", str(passfile))
    for dsn in (postgres.dsn(), pooler.dsn()):
        pool = _pool(_without_password(dsn, postgres.app.password))
        with pytest.raises(AuthenticationError) as info:
            await pool.open()
        assert ("no password was given for user 'app' (none in the DSN, password=, PGPASSWORD, "
                f"the password file {passfile} or credentials=) and the server asks for one"
                in str(info.value)), info.value
    port = pooler.dsn().rsplit(":", 1)[1].split("/")[0]
    passfile.write_text(f"127.0.0.1:{port}:*:app:not-the-password\n")  # pragma: allowlist secret
    pool = _pool(_without_password(pooler.dsn(), postgres.app.password))
    with pytest.raises(AuthenticationError) as info:
        await pool.open()
    assert "no password was given" not in str(info.value)
    assert "check the password or credentials provider" in str(info.value)


@dataclass
class Rotating:
    """A user-written provider: hands out passwords in turn, moving on when asked to refresh."""

    passwords: list[str] = field(repr=False)
    requires_tls: bool = False
    calls: int = 0
    refreshes: int = 0

    async def password(self, target: Target) -> str:
        self.calls += 1
        return self.passwords[0]

    async def refresh(self, target: Target) -> bool:
        self.refreshes += 1
        if len(self.passwords) == 1:
            return False
        self.passwords.pop(0)
        return True

    async def warm(self, target: Target) -> None:
        return None

    async def close(self) -> None:
        return None


async def test_refused_login_refreshes_the_provider_and_retries_once(
    postgres: PostgresServer, pooler: Pooler
) -> None:
    for dsn in (postgres.dsn(), pooler.dsn()):
        provider = Rotating(["stale-password", postgres.app.password])
        log = AttemptLog()
        bare = _without_password(dsn, postgres.app.password)
        async with _pool(bare, log, credentials=provider, max_size=3) as pool:
            held = [await pool.acquire() for _ in range(3)]
            for conn in held:
                await pool.release(conn)
        assert provider.refreshes == 1
        assert provider.calls == 4  # one refused, then one per connection
        assert [a.error is None for a in log.attempts] == [False, True, True, True]


async def test_provider_that_cannot_produce_a_password_stops_the_pool_with_its_error(
    postgres: PostgresServer,
) -> None:
    class Broken(Rotating):
        async def password(self, target: Target) -> str:
            raise CredentialsError(f"no password for {target.user}: the vault is sealed")

    bare = _without_password(postgres.dsn(), postgres.app.password)
    with pytest.raises(CredentialsError, match="no password for app: the vault is sealed"):
        await _pool(bare, credentials=Broken([])).open()


async def test_a_providers_own_exception_is_named_by_its_class_only(
    postgres: PostgresServer, caplog: pytest.LogCaptureFixture,
) -> None:
    """What an HTTP client raises names the URL, token and all: its text went into the
    ConnectError and the WARNING log, where the pool cannot scrub a secret it never knew."""
    token = "hvs.QzXjKvWqZjXqVkWz"  # pragma: allowlist secret

    class VaultPassword(Rotating):
        async def password(self, target: Target) -> str:
            raise RuntimeError(f"403 Forbidden for url: https://vault/v1/creds/app?token={token}")

    bare = _without_password(postgres.dsn(), postgres.app.password)
    caplog.set_level(logging.DEBUG)
    pool = _pool(bare, credentials=VaultPassword([]), min_size=0, acquire_timeout=3)
    async with pool:
        with pytest.raises(CredentialsError) as info:
            async with pool.acquire():
                pass
    message = str(info.value)
    assert "VaultPassword.password() raised RuntimeError" in message
    assert "its message is not shown: it may hold a credential" in message
    assert info.value.__cause__ is None
    assert info.value.__context__ is None
    assert token[:8] not in message
    assert not [r for r in caplog.records
                if token[:8] in r.getMessage() or (r.exc_info and token[:8] in str(r.exc_info[1]))]


def _no_token_anywhere(error: BaseException, token: str, caplog: pytest.LogCaptureFixture) -> None:
    """Neither `error` (message, chain) nor its frames' locals nor any log record holds `token`."""
    assert error.__cause__ is None
    assert error.__context__ is None
    assert token[:8] not in str(error)
    tb = error.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename != __file__:  # the test's own frame holds the token
            assert token[:8] not in repr(tb.tb_frame.f_locals), tb.tb_frame.f_code.co_qualname
        tb = tb.tb_next
    assert not [r for r in caplog.records
                if token[:8] in r.getMessage() or (r.exc_info and token[:8] in str(r.exc_info[1]))]


async def test_a_providers_exception_in_refresh_is_named_by_its_class_only(
    postgres: PostgresServer, caplog: pytest.LogCaptureFixture,
) -> None:
    """refresh() reads the store again after a refused login: its HTTP client's error (URL,
    token and all) reached the caller of acquire() as it was, a RuntimeError, not a PoolError."""
    token = "hvs.QzXjKvWqZjXqVkWz"  # pragma: allowlist secret

    class VaultPassword(Rotating):
        async def refresh(self, target: Target) -> bool:
            self.refreshes += 1
            url = f"https://vault/v1/creds/app?token={token}"
            raise RuntimeError(f"403 Forbidden for url: {url}")

    bare = _without_password(postgres.dsn(), postgres.app.password)
    caplog.set_level(logging.DEBUG)
    provider = VaultPassword(["refused-password"])
    log = AttemptLog()
    pool = _pool(bare, log, credentials=provider, min_size=0, acquire_timeout=3)
    async with pool:
        with pytest.raises(CredentialsError) as info:
            async with pool.acquire():
                pass
    assert provider.refreshes == 1
    assert [type(a.error).__name__ for a in log.attempts] == ["AuthenticationError"]
    message = str(info.value)
    assert "VaultPassword.refresh() raised RuntimeError" in message
    assert "its message is not shown: it may hold a credential" in message
    _no_token_anywhere(info.value, token, caplog)


async def test_a_providers_exception_in_warm_is_named_by_its_class_only(
    postgres: PostgresServer, caplog: pytest.LogCaptureFixture,
) -> None:
    token = "hvs.QzXjKvWqZjXqVkWz"  # pragma: allowlist secret

    class VaultPassword(Rotating):
        async def warm(self, target: Target) -> None:
            raise ConnectionResetError(f"vault at https://vault/?token={token} went away")

    bare = _without_password(postgres.dsn(), postgres.app.password)
    caplog.set_level(logging.DEBUG)
    with pytest.raises(CredentialsUnavailableError) as info:
        await _pool(bare, credentials=VaultPassword([postgres.app.password])).open()
    assert "VaultPassword.warm() raised ConnectionResetError" in str(info.value)
    _no_token_anywhere(info.value, token, caplog)


@pytest.mark.parametrize("how", ["close", "terminate", "snapshot"])
async def test_a_providers_exception_in_close_is_logged_by_its_class_only(
    postgres: PostgresServer, caplog: pytest.LogCaptureFixture, how: str,
) -> None:
    """close() runs at pool.close(), terminate() and before a SnapStart snapshot: its error was
    logged with its message and traceback (logger.exception), a token in a URL included."""
    token = "hvs.QzXjKvWqZjXqVkWz"  # pragma: allowlist secret

    class VaultPassword(Rotating):
        async def close(self) -> None:
            raise RuntimeError(f"revoke failed for https://vault/v1/auth?token={token}")

    bare = _without_password(postgres.dsn(), postgres.app.password)
    caplog.set_level(logging.DEBUG)
    pool = _pool(bare, credentials=VaultPassword([postgres.app.password]), min_size=1)
    await pool.open()
    assert await pool.fetchval("SELECT 1") == 1
    if how == "close":
        await pool.close()
    elif how == "terminate":
        pool.terminate()
        for _ in range(50):  # its close runs in a task of the pool's
            if any("close() raised" in r.getMessage() for r in caplog.records):
                break
            await asyncio.sleep(0.01)
    else:
        from asyncpool.integrations.aws_lambda import _prepare_snapshot

        await _prepare_snapshot(pool)
        await pool.close()
    failed = [r for r in caplog.records if "VaultPassword.close() raised RuntimeError" in r.getMessage()]
    # (Closed again by pool.close() after a snapshot, as a restored environment may not run.)
    assert len(failed) == (2 if how == "snapshot" else 1), [r.getMessage() for r in caplog.records]
    assert all(r.exc_info is None for r in failed)
    if how == "snapshot":
        assert "before a snapshot" in failed[0].getMessage()
    assert not [r for r in caplog.records
                if token[:8] in r.getMessage() or (r.exc_info and token[:8] in str(r.exc_info[1]))]


@pytest.mark.parametrize("blip", [TimeoutError, ConnectionResetError])
async def test_a_provider_that_cannot_reach_its_store_for_a_moment_is_retried(
    postgres: PostgresServer, blip: type[Exception],
) -> None:
    """A network error or timeout of the provider's (its secret store unreachable for a moment)
    is retried within the acquire's time, as a connection error is; its message stays hidden."""

    class Flaky(Rotating):
        async def password(self, target: Target) -> str:
            self.calls += 1
            if self.calls == 1:
                raise blip("store at https://vault/?token=hvs.secret unreachable")  # pragma: allowlist secret
            return self.passwords[0]

    bare = _without_password(postgres.dsn(), postgres.app.password)
    provider = Flaky([postgres.app.password])
    async with _pool(bare, credentials=provider, min_size=0, acquire_timeout=5) as pool:
        assert await pool.fetchval("SELECT 1") == 1
    assert provider.calls == 2
    assert issubclass(CredentialsUnavailableError, CredentialsError)


def test_every_shipped_provider_satisfies_the_protocol() -> None:
    providers: list[CredentialProvider] = [
        StaticPassword("x"),
        IamAuth(region="us-east-1"),
        SecretsManagerAuth("db/orders", region="us-east-1"),
        Rotating(["x"]),
    ]
    assert all(isinstance(p, CredentialProvider) for p in providers)
    assert [p.requires_tls for p in providers] == [False, True, False, False]


def test_reprs_show_no_password(postgres: PostgresServer) -> None:
    secret = postgres.app.password
    pool = Pool(postgres.dsn(), credentials=StaticPassword(secret),
                connect_kwargs={"password": secret})
    for text in (repr(pool), repr(pool.config), str(pool.config), repr(StaticPassword(secret))):
        assert secret not in text
    assert "credentials=StaticPassword" in repr(pool.config)


async def test_a_provider_missing_a_method_or_with_a_plain_one_says_what_to_write(
        postgres: PostgresServer) -> None:
    """Without `warm` the pool failed at open() with a bare AttributeError: refused when the
    pool is made. A `def password` returning a string failed every login with "str can't be
    used in 'await' expression": a CredentialsError naming the method (not its value). A plain
    method returning a coroutine (a delegating wrapper) works, as asyncpg's callables do."""

    class NoWarm(QuietProvider):
        warm = None  # type: ignore[assignment]

    class NoFlag(QuietProvider):
        requires_tls = "no"  # type: ignore[assignment]

    dsn = "postgresql://app@127.0.0.1/app"
    for provider, match in ((NoWarm(), r"credentials=NoWarm: it has no warm\(\) method"),
                            (NoFlag(), "requires_tls must be True"),
                            ("hunter2", r"not a string: StaticPassword\('...'\)")):
        with pytest.raises(PoolConfigError, match=match):
            Pool(dsn, credentials=provider)  # type: ignore[call-overload]

    secret = postgres.app.password

    class PlainPassword(QuietProvider):
        def password(self, target: object) -> str:  # type: ignore[override]
            return secret

    class Delegating(QuietProvider):
        def password(self, target: Target) -> Any:  # type: ignore[override]
            return StaticPassword(secret).password(target)

    dsn = _without_password(postgres.dsn(), secret)
    async with Pool(dsn, min_size=0, credentials=Delegating(), telemetry=False) as pool:
        assert await pool.fetchval("SELECT 1") == 1
    async with Pool(dsn, min_size=0, credentials=PlainPassword(),  # type: ignore[call-overload]
                    acquire_timeout=3, telemetry=False) as pool:
        with pytest.raises(CredentialsError, match=r"PlainPassword.password\(\) returned a str, "
                           r"not something to await") as info:
            await pool.fetchval("SELECT 1")
        assert secret[:4] not in str(info.value)


@pytest.mark.parametrize("bad", [None, 5, b"secret", ""])
def test_a_static_password_that_is_no_password_is_refused_when_it_is_made(bad: Any) -> None:
    """An int or bytes failed each login inside asyncpg ("Expected str, got int"); None or ""
    sent no password, reported as a refused one. Named by its type only."""
    with pytest.raises(CredentialsError, match="StaticPassword: the password must be a "
                                               "non-empty string, not ") as info:
        StaticPassword(bad)
    assert "secret" not in str(info.value)


@pytest.mark.parametrize("returned", [b"bytes-password", None])
async def test_a_provider_returning_no_string_says_so_by_its_type(
        postgres: PostgresServer, returned: Any) -> None:
    """bytes failed inside asyncpg's SCRAM ("unexpected error while performing
    authentication: Expected str, got bytes", naming no provider), None as a refused password:
    a CredentialsError naming the provider's method and the type, never the value."""
    class Wrong(QuietProvider):
        async def password(self, target: object) -> str:
            return returned  # type: ignore[no-any-return]

    dsn = _without_password(postgres.dsn(), postgres.app.password)
    async with Pool(dsn, min_size=0, credentials=Wrong(), acquire_timeout=3,
                    telemetry=False) as pool:
        with pytest.raises(CredentialsError, match=r"Wrong.password\(\) returned "
                           rf"{type(returned).__name__}, not the password as a str") as info:
            await pool.fetchval("SELECT 1")
        assert "bytes-password" not in str(info.value)


class ClosingPassword(StaticPassword):
    """A fixed password that counts its close() calls."""

    closed = 0

    async def close(self) -> None:
        self.closed += 1


async def test_set_connect_args_replaces_the_provider_for_the_logins_that_follow(
    postgres: PostgresServer, aws: None,
) -> None:
    """``set_connect_args(credentials=...)``: the logins after the call use the new provider,
    the connection held meanwhile goes on. A password given while a provider is in use (which
    would be dropped unseen) and a token provider without verified TLS are refused, changing
    nothing and showing no password."""
    import secrets

    import asyncpg

    from asyncpool.testing.postgres import Role

    role = Role(f"provider_{secrets.token_hex(4)}", secrets.token_urlsafe(18))
    rotated = secrets.token_urlsafe(18)
    dsn = f"postgresql://{role.name}@127.0.0.1:{postgres.port}/app?sslmode=disable"
    admin = await asyncpg.connect(postgres.admin_dsn)
    try:
        await admin.execute(f"CREATE ROLE {role.name} LOGIN PASSWORD '{role.password}'")
        replaced = ClosingPassword(role.password)
        async with Pool(dsn, credentials=replaced, min_size=1, max_size=2,
                        telemetry=False) as pool:
            held = await pool.acquire()
            await admin.execute(f"ALTER ROLE {role.name} PASSWORD '{rotated}'")
            first = pool.config
            with pytest.raises(PoolConfigError, match="pass credentials=None with it") as info:
                pool.set_connect_args(dsn, password=rotated)
            assert rotated not in str(info.value)
            with pytest.raises(PoolConfigError, match="pass credentials=None with it"):
                pool.set_connect_args(dsn.replace("@", f":{rotated}@"))
            with pytest.raises(PoolConfigError, match="IAM token"):
                pool.set_connect_args(dsn, credentials=IamAuth("us-east-1"))
            assert pool.config is first  # nothing changed

            pool.set_connect_args(dsn, credentials=StaticPassword(rotated))
            assert not replaced.closed  # (closed by a task of the pool's)
            await pool.expire_connections()
            async with pool.acquire() as conn:  # the old password no longer logs in
                assert conn.raw is not held.raw
                assert await conn.fetchval("SELECT current_user") == role.name
            assert await held.fetchval("SELECT 1") == 1  # the one held meanwhile goes on
            await pool.release(held)
            # None: the password given logs in again.
            pool.set_connect_args(dsn, credentials=None, password=rotated)
            await pool.expire_connections()
            assert await pool.fetchval("SELECT current_user") == role.name
            assert pool.stats().connect_errors_total == 0
            assert replaced.closed == 1  # no login used it any more: closed, not kept
        assert replaced.closed == 1  # not again with the pool
    finally:
        await admin.execute(f"DROP ROLE IF EXISTS {role.name}")
        await admin.close()
