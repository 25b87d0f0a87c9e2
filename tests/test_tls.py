"""TLS end to end against a PostgreSQL that only accepts TLS, with a test CA: the modes up to
verify-full, and the errors for the wrong CA, the wrong host name and a server without TLS."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import pytest

from asyncpool import ConnectError, Pool, PoolConfigError
from asyncpool.testing import PostgresServer
from asyncpool.testing.binaries import postgres_bindir, postgres_version
from asyncpool.testing.pgbouncer import PgBouncerServer
from asyncpool.testing.pki import TestPki
from tests.cancelled_logins import cancel_logins, loop_messages


def _dsn(server: PostgresServer, host: str = "localhost", **params: str) -> str:
    return server.app.dsn(host, server.port, server.database, **params)


async def _open(dsn: str, **options: Any) -> Pool:
    options.setdefault("connect_timeout", 5)
    return await Pool(dsn, min_size=1, max_size=2, telemetry=False, **options).open()


async def _tls_facts(pool: Pool) -> tuple[bool, str]:
    row = await pool.fetchrow("SELECT ssl, version FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
    assert row is not None
    return bool(row["ssl"]), str(row["version"])


async def test_verify_full_with_the_right_ca_and_host_name(
    tls_postgres: PostgresServer, pki: TestPki
) -> None:
    async with await _open(
        _dsn(tls_postgres), ssl="verify-full", ssl_root_cert=str(pki.ca_cert)
    ) as pool:
        encrypted, version = await _tls_facts(pool)
    assert encrypted
    assert version.startswith("TLSv1.")


async def test_verify_full_with_the_wrong_ca_fails_and_says_which_option(
    tls_postgres: PostgresServer, pki: TestPki
) -> None:
    with pytest.raises(ConnectError) as info:
        await _open(_dsn(tls_postgres), ssl="verify-full", ssl_root_cert=str(pki.other_ca_cert))
    message = str(info.value)
    assert "TLS certificate did not verify" in message
    assert "ssl_root_cert" in message
    assert "RDS Proxy: the Amazon root CAs" in message
    assert info.value.transient is False  # the pool does not retry it until acquire_timeout
    assert tls_postgres.app.password not in message


async def test_verify_full_with_the_wrong_host_name_fails_and_names_the_host(
    tls_postgres: PostgresServer, pki: TestPki
) -> None:
    with pytest.raises(ConnectError) as info:
        await _open(
            _dsn(tls_postgres, host="127.0.0.1"), ssl="verify-full", ssl_root_cert=str(pki.ca_cert)
        )
    message = str(info.value)
    assert "mismatch" in message
    assert "the certificate is not for '127.0.0.1'" in message
    assert info.value.transient is False


async def test_verify_ca_checks_the_chain_but_not_the_host_name(
    tls_postgres: PostgresServer, pki: TestPki
) -> None:
    async with await _open(
        _dsn(tls_postgres, host="127.0.0.1"), ssl="verify-ca", ssl_root_cert=str(pki.ca_cert)
    ) as pool:
        assert (await _tls_facts(pool))[0]
    with pytest.raises(ConnectError, match="did not verify"):
        await _open(
            _dsn(tls_postgres, host="127.0.0.1"), ssl="verify-ca",
            ssl_root_cert=str(pki.other_ca_cert),
        )


async def test_require_encrypts_without_verifying_unless_given_a_root_cert(
    tls_postgres: PostgresServer, pki: TestPki
) -> None:
    async with await _open(_dsn(tls_postgres), ssl="require") as pool:
        assert (await _tls_facts(pool))[0]
    # As libpq does: with a root certificate at hand, require checks the chain.
    with pytest.raises(ConnectError, match="did not verify"):
        await _open(_dsn(tls_postgres), ssl="require", ssl_root_cert=str(pki.other_ca_cert))


async def test_ssl_root_cert_alone_means_verify_full(
    tls_postgres: PostgresServer, pki: TestPki
) -> None:
    async with await _open(_dsn(tls_postgres), ssl_root_cert=str(pki.ca_cert)) as pool:
        assert (await _tls_facts(pool))[0]
    with pytest.raises(ConnectError, match=r"the certificate is not for '127\.0\.0\.1'"):
        await _open(_dsn(tls_postgres, host="127.0.0.1"), ssl_root_cert=str(pki.ca_cert))


async def test_sslmode_in_the_dsn_uses_the_ssl_root_cert_option(
    tls_postgres: PostgresServer, pki: TestPki
) -> None:
    async with await _open(
        _dsn(tls_postgres, sslmode="verify-full"), ssl_root_cert=str(pki.ca_cert)
    ) as pool:
        assert (await _tls_facts(pool))[0]
    with pytest.raises(ConnectError, match="did not verify"):
        await _open(_dsn(tls_postgres, sslmode="verify-full"), ssl_root_cert=str(pki.other_ca_cert))


async def test_plain_connection_refused_by_pg_hba_says_tls_is_required(
    tls_postgres: PostgresServer,
) -> None:
    with pytest.raises(ConnectError) as info:
        await _open(_dsn(tls_postgres), ssl="disable")
    message = str(info.value)
    assert "pg_hba.conf" in message
    assert "it requires TLS" in message
    assert info.value.transient is False
    assert tls_postgres.app.password not in message


async def test_server_without_tls_fails_clearly_under_verify_full(
    postgres: PostgresServer, pki: TestPki
) -> None:
    with pytest.raises(ConnectError) as info:
        await _open(postgres.dsn(), ssl="verify-full", ssl_root_cert=str(pki.ca_cert))
    assert "does not accept TLS" in str(info.value)
    assert postgres.app.password not in str(info.value)


def test_root_cert_that_is_not_pem_is_a_config_error(tmp_path: Path) -> None:
    from asyncpool.config import PoolConfig
    from asyncpool.connect.tls import resolve_tls

    bogus = tmp_path / "bundle.pem"
    bogus.write_text("not a certificate\n")
    config = PoolConfig(dsn="postgresql://u@db.example/app", ssl="verify-full",
                        ssl_root_cert=str(bogus))
    with pytest.raises(PoolConfigError, match="could not be loaded as a PEM CA bundle"):
        resolve_tls(config).driver_argument()


@pytest.mark.parametrize("mode", ["unnamed", "on", "off"])
async def test_unverified_tls_logs_in_with_scram_in_every_statement_mode(
    tls_postgres: PostgresServer, mode: str
) -> None:
    """`require` does not verify the server, so the login goes through the auth guard (SCRAM
    only), over the TLS path, with and without the one-round-trip interceptor; after the login
    the guard is out of the way."""
    async with await _open(_dsn(tls_postgres), ssl="require", prepared_statements=mode) as pool:
        assert (await _tls_facts(pool))[0]
        assert await pool.fetchval("SELECT $1::int + 1", 41) == 42
        assert await pool.fetchval("SELECT $1::int + 1", 1) == 2


# -- what else libpq reads for the handshake: revocation lists, TLS versions -----------------


async def test_a_crl_is_applied_in_every_verifying_mode(
    tls_postgres: PostgresServer, pki: TestPki
) -> None:
    """The pool builds the context for these modes, so asyncpg reads no sslcrl of its own."""
    for mode in ("require", "verify-ca", "verify-full"):
        verifying = {"sslmode": mode, "sslrootcert": str(pki.ca_cert)}
        async with await _open(_dsn(tls_postgres, sslcrl=str(pki.empty_crl), **verifying)) as pool:
            assert (await _tls_facts(pool))[0]
        with pytest.raises(ConnectError, match=r"certificate revoked.*sslcrl / sslcrldir"):
            await _open(_dsn(tls_postgres, sslcrl=str(pki.revoked_crl), **verifying))


def _crl_directory(directory: Path, crl: Path) -> None:
    """`directory` holding `crl` under the hashed name OpenSSL looks it up by."""
    (directory / "ca.crl").write_bytes(crl.read_bytes())
    subprocess.run(["openssl", "rehash", str(directory)], check=True, capture_output=True)


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl rehash")
async def test_a_crl_directory_is_applied(
    tls_postgres: PostgresServer, pki: TestPki, tmp_path: Path
) -> None:
    """``sslcrldir`` (libpq 14): asyncpg does not know it, and sent it to the server as a
    setting; libpq reads the directory as ``openssl rehash`` prepares it."""
    _crl_directory(tmp_path, pki.revoked_crl)
    with pytest.raises(ConnectError, match="certificate revoked"):
        await _open(_dsn(tls_postgres, sslmode="verify-full", sslrootcert=str(pki.ca_cert),
                         sslcrldir=str(tmp_path)))


@pytest.mark.parametrize("mode", ["prefer", "require", "verify-full"])
@pytest.mark.parametrize("where", ["dsn", "env"])
async def test_tls_versions_bound_the_handshake(
    tls_postgres: PostgresServer, pki: TestPki, mode: str, where: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """ssl_max_protocol_version=TLSv1.2 under verify-full negotiated TLSv1.3."""
    root = {} if mode == "prefer" else {"sslrootcert": str(pki.ca_cert)}
    for key, variable, version in (
        ("ssl_max_protocol_version", "PGSSLMAXPROTOCOLVERSION", "TLSv1.2"),
        ("ssl_min_protocol_version", "PGSSLMINPROTOCOLVERSION", "TLSv1.3"),
    ):
        given = {key: version} if where == "dsn" else {}
        with monkeypatch.context() as env:
            if where == "env":
                env.setenv(variable, version)
            async with await _open(_dsn(tls_postgres, sslmode=mode, **root, **given)) as pool:
                assert await _tls_facts(pool) == (True, version)


async def test_channel_binding_disable_or_prefer_is_not_sent_to_the_server(
    tls_postgres: PostgresServer, pki: TestPki
) -> None:
    """asyncpg sent it as a run-time parameter: "unrecognized configuration parameter"."""
    for value in ("disable", "prefer"):
        async with await _open(_dsn(tls_postgres, sslmode="verify-full",
                                    sslrootcert=str(pki.ca_cert), channel_binding=value)) as pool:
            assert (await _tls_facts(pool))[0]


def _encrypted_client_cert(tmp_path: Path, passphrase: bytes) -> tuple[Path, Path]:
    """A self-signed client certificate, and its key encrypted with `passphrase`."""
    from cryptography.hazmat.primitives import serialization

    from asyncpool.testing.self_signed import self_signed

    key, cert = self_signed("app")
    cert_path, key_path = tmp_path / "client.crt", tmp_path / "client.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(passphrase)))
    key_path.chmod(0o600)
    return cert_path, key_path


@pytest.mark.parametrize("mode", ["prefer", "require", "verify-ca", "verify-full"])
async def test_a_wrong_client_key_passphrase_is_a_config_error_in_every_mode(
    tls_postgres: PostgresServer, pki: TestPki, tmp_path: Path, mode: str
) -> None:
    """Under require asyncpg loaded the key itself: "ConnectError: TLS failed ([SSL] PEM lib)"."""
    wrong = "Wr0ngPassphraseQz"  # pragma: allowlist secret
    cert, key = _encrypted_client_cert(tmp_path, b"the-right-one")
    with pytest.raises(PoolConfigError) as info:
        await _open(_dsn(tls_postgres, sslmode=mode, sslrootcert=str(pki.ca_cert),
                         sslcert=str(cert), sslkey=str(key), sslpassword=wrong))
    message = str(info.value)
    assert f"the client certificate {str(cert)!r}" in message
    assert "passphrase" in message
    assert wrong[:4] not in message
    assert info.value.__cause__ is None


# -- libpq's default revocation list, ~/.postgresql/root.crl ----------------------------------


def _home_with(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, **files: Path) -> Path:
    """A HOME of the test's own whose ~/.postgresql holds `files` (name: the file to copy)."""
    directory = tmp_path / "home" / ".postgresql"
    directory.mkdir(parents=True)
    for name, source in files.items():
        (directory / name.replace("_", ".")).write_bytes(source.read_bytes())
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    return directory


@pytest.mark.parametrize("where", ["options", "dsn"])
async def test_the_default_root_crl_is_read_where_the_pool_builds_the_context(
    tls_postgres: PostgresServer, pki: TestPki, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    where: str,
) -> None:
    """As libpq does without sslcrl/sslcrldir. The pool built its own context for verify-full
    (and for the RDS bundle given as ssl_root_cert), and read no root.crl: the revoked
    certificate was accepted."""
    home = _home_with(tmp_path, monkeypatch, root_crl=pki.revoked_crl)
    given: dict[str, Any] = (
        {"ssl": "verify-full", "ssl_root_cert": str(pki.ca_cert)} if where == "options" else {})
    params = {} if where == "options" else {"sslmode": "verify-full",
                                            "sslrootcert": str(pki.ca_cert)}
    with pytest.raises(ConnectError) as info:
        await _open(_dsn(tls_postgres, **params), **given)
    message = str(info.value)
    assert "certificate revoked" in message
    assert "~/.postgresql/root.crl" in message
    assert info.value.transient is False
    assert tls_postgres.app.password not in message
    # The same list without the server's certificate: accepted.
    (home / "root.crl").write_bytes(pki.empty_crl.read_bytes())
    async with await _open(_dsn(tls_postgres, **params), **given) as pool:
        assert (await _tls_facts(pool))[0]
    # A list given explicitly replaces the default one, as in libpq.
    (home / "root.crl").write_bytes(pki.revoked_crl.read_bytes())
    async with await _open(_dsn(tls_postgres, sslcrl=str(pki.empty_crl), **params),
                           **given) as pool:
        assert (await _tls_facts(pool))[0]


async def test_require_with_the_default_root_cert_checks_the_default_root_crl(
    tls_postgres: PostgresServer, pki: TestPki, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """require without a root certificate named: asyncpg builds the context from
    ~/.postgresql/root.crt and root.crl, as libpq does (a guard that this stays so)."""
    home = _home_with(tmp_path, monkeypatch, root_crt=pki.ca_cert, root_crl=pki.revoked_crl)
    with pytest.raises(ConnectError, match="certificate revoked"):
        await _open(_dsn(tls_postgres, sslmode="require"))
    with pytest.raises(ConnectError, match="certificate revoked"):
        await _open(_dsn(tls_postgres, sslmode="require", sslcrl=str(pki.revoked_crl)))
    (home / "root.crl").write_bytes(pki.empty_crl.read_bytes())
    async with await _open(_dsn(tls_postgres, sslmode="require")) as pool:
        assert (await _tls_facts(pool))[0]


async def test_a_default_root_crl_the_system_cas_would_skip_is_refused(
    tls_postgres: PostgresServer, pki: TestPki, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """verify-full without a root certificate verifies against the system CAs, where libpq
    would take ~/.postgresql/root.crt with its root.crl: the list is not skipped silently."""
    _home_with(tmp_path, monkeypatch, root_crl=pki.revoked_crl)
    with pytest.raises(PoolConfigError) as info:
        await _open(_dsn(tls_postgres, sslmode="verify-full"))
    assert "~/.postgresql/root.crl exists" in str(info.value)
    assert "sslrootcert" in str(info.value)


# -- libpq's default root and client certificates, ~/.postgresql/root.crt, postgresql.crt ----


async def test_verify_full_without_a_root_cert_named_verifies_against_the_default_one(
    tls_postgres: PostgresServer, pki: TestPki, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """As libpq does. The pool verified against the system CAs and ignored
    ~/.postgresql/root.crt: a server of a private CA kept there did not verify."""
    home = _home_with(tmp_path, monkeypatch, root_crt=pki.ca_cert)
    async with await _open(_dsn(tls_postgres, sslmode="verify-full")) as pool:
        assert (await _tls_facts(pool))[0]
    with pytest.raises(ConnectError, match=r"the certificate is not for '127\.0\.0\.1'"):
        await _open(_dsn(tls_postgres, host="127.0.0.1", sslmode="verify-full"))
    # Another CA there: refused, and the error says which file the chain was checked against.
    (home / "root.crt").write_bytes(pki.other_ca_cert.read_bytes())
    with pytest.raises(ConnectError) as info:
        await _open(_dsn(tls_postgres, sslmode="verify-ca"))
    assert "did not verify" in str(info.value)
    assert "checked against ~/.postgresql/root.crt, libpq's default root certificate" in str(
        info.value)
    # Without the file: the system CAs, which do not hold the test CA.
    (home / "root.crt").unlink()
    with pytest.raises(ConnectError, match="did not verify"):
        await _open(_dsn(tls_postgres, sslmode="verify-full"))


async def test_an_unknown_ca_names_the_default_root_cert_in_require_and_outside_pools(
    tls_postgres: PostgresServer, pki: TestPki, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """require checks the chain against ~/.postgresql/root.crt too (libpq and asyncpg): the
    error did not name the file there (asyncpg built the context), nor did those of the logins
    `asyncpool bench` and `asyncpool doctor` make with asyncpg, in any mode."""
    from asyncpool.config import PoolConfig
    from asyncpool.connect.authguard import Login
    from asyncpool.connect.dsn import parse_dsn
    from asyncpool.load.logins import GuardedLogin

    _home_with(tmp_path, monkeypatch, root_crt=pki.other_ca_cert)
    checked = "it was checked against ~/.postgresql/root.crt, libpq's default root certificate"
    with pytest.raises(ConnectError) as info:
        await _open(_dsn(tls_postgres, sslmode="require"))
    assert checked in str(info.value)
    for mode in ("require", "verify-full"):
        dsn = _dsn(tls_postgres, sslmode=mode)
        with pytest.raises(ConnectError) as info:
            await GuardedLogin(dsn).connect_asyncpg(timeout=5)
        assert checked in str(info.value)
        with pytest.raises(ConnectError) as info:
            await Login(PoolConfig.from_env(dsn=None), parse_dsn(dsn)).connect(5, "doctor")
        assert checked in str(info.value)
        assert tls_postgres.app.password not in str(info.value)


async def test_libpq_logins_verify_against_the_system_cas_where_the_pool_does(
    tls_postgres: PostgresServer, pki: TestPki, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """verify-full with no root certificate anywhere: the pool verifies against the system CAs
    (an RDS Proxy's public certificate), and so must the libpq logins made under its rules
    (`asyncpool doctor`'s console reads, `asyncpool bench`'s psycopg contenders and samplers):
    libpq looked for ~/.postgresql/root.crt and failed ("root certificate file ... does not
    exist") where the pool connected. OpenSSL's SSL_CERT_FILE stands in for the system store."""
    import psycopg

    from asyncpool.load.logins import GuardedLogin

    _home_with(tmp_path, monkeypatch)  # (an empty ~/.postgresql)
    monkeypatch.setenv("SSL_CERT_FILE", str(pki.ca_cert))
    dsn = _dsn(tls_postgres, sslmode="verify-full")
    async with await _open(dsn) as pool:
        assert (await _tls_facts(pool))[0]
    conninfo, kwargs = GuardedLogin(dsn).psycopg_args()
    assert kwargs["sslrootcert"] == "system"
    conn = await psycopg.AsyncConnection.connect(conninfo, connect_timeout=5, **kwargs)
    async with conn:
        cursor = await conn.execute("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
        assert await cursor.fetchone() == (True,)
    # verify-ca has no libpq spelling for the system CAs: libpq keeps its own default there.
    _, ca_kwargs = GuardedLogin(_dsn(tls_postgres, sslmode="verify-ca")).psycopg_args()
    assert "sslrootcert" not in ca_kwargs


def _client_pki(directory: Path, user: str) -> tuple[Path, Path, Path]:
    """A client CA (its certificate at ca.crt) and a certificate for `user` it signed, with its
    key: (ca.crt, user.crt, user.key)."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    from asyncpool.testing.self_signed import BACKDATE, VALIDITY, self_signed

    ca_key, ca_cert = self_signed("asyncpool client CA", authority=True)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, user)]))
        .issuer_name(ca_cert.subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE).not_valid_after(now + VALIDITY)
        .sign(ca_key, hashes.SHA256())
    )
    paths = directory / "ca.crt", directory / f"{user}.crt", directory / f"{user}.key"
    paths[0].write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    paths[2].chmod(0o600)
    return paths


@pytest.fixture(scope="module")
def client_cert_postgres(pki: TestPki) -> Iterator[tuple[PostgresServer, Path, Path]]:
    """A PostgreSQL that logs `app` in by its client certificate only (``cert``), and that
    certificate and key."""
    from asyncpool.testing.process import chown_tree, make_workdir, remove_tree

    directory = make_workdir("tls-client")
    ca, cert, key = _client_pki(directory, "app")
    chown_tree(directory)
    server = PostgresServer(
        max_connections=10,
        settings={**pki.postgres_settings(), "ssl_ca_file": f"'{ca}'"},
        hba_lines=["hostssl all app 127.0.0.1/32 cert", "hostnossl all all 127.0.0.1/32 reject"],
    )
    server.start()
    yield server, cert, key
    server.stop()
    remove_tree(directory)


@pytest.mark.parametrize("mode", ["require", "verify-full"])
async def test_the_default_client_certificate_is_presented(
    client_cert_postgres: tuple[PostgresServer, Path, Path], pki: TestPki, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch, mode: str,
) -> None:
    """libpq and asyncpg present ~/.postgresql/postgresql.crt (with postgresql.key); the
    context the pool built for verify-full presented none: "connection requires a valid client
    certificate". require: asyncpg's context (a guard that it stays so)."""
    server, cert, key = client_cert_postgres
    home = _home_with(tmp_path, monkeypatch, postgresql_crt=cert, postgresql_key=key)
    (home / "postgresql.key").chmod(0o600)
    dsn = server.app.dsn("localhost", server.port, server.database, sslmode=mode,
                         sslrootcert=str(pki.ca_cert))
    async with await _open(dsn) as pool:
        row = await pool.fetchrow(
            "SELECT ssl, client_dn FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
        assert row is not None
        assert (row["ssl"], row["client_dn"]) == (True, "/CN=app")
    # Without the certificate: none presented. It was "the password given for user 'app' was
    # refused" (an AuthenticationError, and a fresh credential tried).
    (home / "postgresql.crt").unlink()
    with pytest.raises(ConnectError) as info:
        await _open(dsn)
    assert type(info.value) is ConnectError
    assert "refused the login for its client certificate" in str(info.value)
    assert "~/.postgresql/postgresql.crt" in str(info.value)
    assert "password" not in str(info.value)
    assert info.value.transient is False


# -- direct TLS (sslnegotiation=direct, PostgreSQL 17) ----------------------------------------


def _server_major() -> int:
    """The test servers' PostgreSQL major version (15; 17 with ASYNCPOOL_PG_BINDIR set to
    scripts/get-postgres-17.sh's folder)."""
    return postgres_version(postgres_bindir())[0]


def _needs_postgresql_17() -> None:
    if _server_major() < 17:
        pytest.skip("needs PostgreSQL 17 (direct TLS): ASYNCPOOL_PG_BINDIR=$(bash "
                    "scripts/get-postgres-17.sh), as scripts/test.sh's PostgreSQL 17 run does")


async def test_direct_tls_to_a_server_without_it_fails_once_and_says_so(
    tls_postgres: PostgresServer, pki: TestPki
) -> None:
    """PostgreSQL 15 hangs up on a TLS hello: the pool said "ConnectionResetError: " and
    retried it as a network fault until acquire_timeout."""
    if _server_major() >= 17:
        pytest.skip("PostgreSQL 17 takes direct TLS (test_direct_tls_to_postgresql_17_...)")
    for direct in ({"sslnegotiation": "direct"}, {}):
        options: dict[str, Any] = {} if direct else {"connect_kwargs": {"direct_tls": True}}
        with pytest.raises(ConnectError) as info:
            await _open(_dsn(tls_postgres, sslmode="verify-full", sslrootcert=str(pki.ca_cert),
                             **direct), **options)
        message = str(info.value)
        assert "direct TLS handshake" in message
        assert "PostgreSQL accepts direct TLS from version 17" in message
        assert info.value.transient is False
        assert tls_postgres.app.password not in message


@pytest.mark.parametrize("spelling", ["sslnegotiation", "direct_tls"])
@pytest.mark.parametrize("mode", ["require", "verify-full"])
async def test_direct_tls_to_postgresql_17_logs_in_and_cancels_statements(
    tls_postgres: PostgresServer, pki: TestPki, mode: str, spelling: str
) -> None:
    """A real PostgreSQL 17 (the fronts below act as one): TLS from the first byte with the
    context asyncpg builds (require) or the pool's (verify-full), and a statement's timeout
    cancels it on the server over direct TLS, the connection going on."""
    import uuid

    _needs_postgresql_17()
    root = {"sslrootcert": str(pki.ca_cert)} if mode == "verify-full" else {}
    direct = {"sslnegotiation": "direct"} if spelling == "sslnegotiation" else {}
    options: dict[str, Any] = {} if direct else {"connect_kwargs": {"direct_tls": True}}
    token = f"pg17-direct-{uuid.uuid4().hex[:10]}"
    try:
        async with await _open(_dsn(tls_postgres, sslmode=mode, **root, **direct),
                               **options) as pool:
            assert (await _tls_facts(pool))[0]
            async with pool.acquire() as conn:
                with pytest.raises(TimeoutError):
                    await conn.fetch(f"SELECT pg_sleep(30) /* {token} */", timeout=0.3)
                assert await _ended(tls_postgres, token), "the cancelled statement ran on"
                assert await conn.fetchval("SELECT 1") == 1
            assert pool.stats().closed_total == 0
    finally:
        await tls_postgres.end_statements(token)


async def test_direct_tls_with_a_context_offering_no_alpn_names_it_on_postgresql_17(
    tls_postgres: PostgresServer, pki: TestPki
) -> None:
    """PostgreSQL 17 ends a direct TLS connection whose hello offers no ALPN protocol
    'postgresql' right after the handshake, with nothing said to the client: with an
    ssl.SSLContext of the user's (the pool's and asyncpg's offer it) the pool reported
    "ConnectionDoesNotExistError: connection was closed in the middle of operation" and
    retried it as the network's, every login alike."""
    import ssl

    _needs_postgresql_17()
    context = ssl.create_default_context(cafile=str(pki.ca_cert))
    with pytest.raises(ConnectError) as info:
        await _open(_dsn(tls_postgres, sslnegotiation="direct"), ssl=context)
    message = str(info.value)
    assert "ALPN protocol 'postgresql'" in message
    assert "context.set_alpn_protocols(['postgresql'])" in message
    assert info.value.transient is False
    assert tls_postgres.app.password not in message
    context.set_alpn_protocols(["postgresql"])  # what the message says to do
    async with await _open(_dsn(tls_postgres, sslnegotiation="direct"), ssl=context) as pool:
        assert (await _tls_facts(pool))[0]


@pytest.mark.parametrize(("own_context", "worked", "alpn"),
                         [(True, False, True), (False, False, False), (True, True, False)])
def test_a_close_after_the_direct_tls_handshake_names_alpn_only_for_a_context_of_the_users(
    own_context: bool, worked: bool, alpn: bool
) -> None:
    """The translation the PostgreSQL 17 test above checks end to end, on any server: only an
    ssl.SSLContext of the user's can lack the ALPN protocol, and only before a direct TLS login
    has worked (after one, a close is the network's, retried)."""
    import asyncpg

    from asyncpool.connect.dsn import parse_dsn
    from asyncpool.connect.failures import translate

    exc = asyncpg.ConnectionDoesNotExistError("connection was closed in the middle of operation")
    error = translate(exc, parse_dsn("postgresql://app@db/app").target(), "p", 5.0,
                      direct_tls="the DSN's sslnegotiation", direct_tls_worked=worked,
                      own_context=own_context)
    assert ("context.set_alpn_protocols(['postgresql'])" in str(error)) is alpn
    assert error.transient is not alpn


async def test_direct_tls_without_tls_on_every_connection_is_refused_before_dialling(
    tls_postgres: PostgresServer,
) -> None:
    with pytest.raises(PoolConfigError, match="the DSN's sslnegotiation asks for direct TLS, "
                                              "which needs TLS on every connection"):
        await _open(_dsn(tls_postgres, sslnegotiation="direct"))


class _DirectTlsFront:
    """PostgreSQL 17's direct TLS in front of a real PostgreSQL: TLS from the first byte with the
    test certificate, a client that offers no ALPN protocol 'postgresql' hung up on (as
    PostgreSQL 17 does), then the plain protocol relayed to the server. `hang_ups`: how many of
    the next connections it closes on reading the TLS hello, without answering (as PostgreSQL
    15 does to every one; here a passing network fault). `resets`: how many it answers with
    the first record of its TLS answer (the ServerHello) and then resets, as a network can.

    It serves from an asyncio loop on a thread of its own, whatever loop the test runs on: on
    uvloop (``ASYNCPOOL_TEST_LOOP=uvloop``) the stream has already read the client's TLS hello
    when `_serve` asks for TLS, so the handshake waited for a hello that never came again."""

    def __init__(self, pki: TestPki, backend_port: int) -> None:
        import ssl

        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(pki.server_cert, pki.server_key)
        self.context.set_alpn_protocols(["postgresql"])
        self.context.sni_callback = self._sni
        self.backend_port = backend_port
        self.alpn: list[str | None] = []
        #: The server name (SNI) each TLS hello asked for.
        self.names: list[str | None] = []
        self.hang_ups = 0
        self.hung_up = 0
        self.resets = 0
        #: A TLS alert record to answer every hello with (a server refusing the handshake).
        self.alert: bytes | None = None
        self._tasks: set[Any] = set()

    def _sni(self, _tls: Any, name: str | None, _context: Any) -> None:
        self.names.append(name)

    def start(self) -> int:
        """Start serving on its own loop and thread; its port."""
        import asyncio
        import threading

        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True,
                                        name="direct-tls-front")
        self._thread.start()
        try:
            return asyncio.run_coroutine_threadsafe(self._listen(), self._loop).result(10)
        except BaseException:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self._loop.close()
            raise

    async def _listen(self) -> int:
        import asyncio

        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def _serve(self, reader: Any, writer: Any) -> None:
        import asyncio
        import ssl

        if self.hang_ups:
            self.hang_ups -= 1
            self.hung_up += 1
            await reader.read(65536)  # the TLS hello, read, so the close is a FIN
            writer.close()
            return
        if self.resets:
            self.resets -= 1
            await self._answer_and_reset(reader, writer)
            return
        if self.alert is not None:
            # (asyncio's server side closes without sending OpenSSL's alert: sent by hand.)
            await reader.read(65536)
            writer.write(self.alert)
            await writer.drain()
            writer.close()
            return
        try:
            await writer.start_tls(self.context)
        except (ssl.SSLError, ConnectionError):
            writer.close()
            return
        alpn = writer.get_extra_info("ssl_object").selected_alpn_protocol()
        self.alpn.append(alpn)
        if alpn != "postgresql":
            writer.close()
            return
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.backend_port)

        async def pipe(source: Any, sink: Any) -> None:
            try:
                while data := await source.read(65536):
                    sink.write(data)
                    await sink.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                sink.close()

        for task in (asyncio.create_task(pipe(reader, up_writer)),
                     asyncio.create_task(pipe(up_reader, writer))):
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _answer_and_reset(self, reader: Any, writer: Any) -> None:
        """Answer the TLS hello with its first record (it takes direct TLS), then reset the
        connection (RST) before the rest, so the handshake is cut in the middle."""
        import contextlib
        import socket
        import ssl
        import struct

        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        tls = self.context.wrap_bio(incoming, outgoing, server_side=True)
        incoming.write(await reader.read(65536))
        # It then waits for the client's next flight, which never gets an answer.
        with contextlib.suppress(ssl.SSLWantReadError):
            tls.do_handshake()
        answer = outgoing.read()
        writer.write(answer[:5 + int.from_bytes(answer[3:5], "big")])  # the record's header+body
        await writer.drain()
        writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                                   struct.pack("ii", 1, 0))
        writer.transport.abort()

    def close(self) -> None:
        """Stop serving, end the relayed connections, and stop its loop and thread."""
        import asyncio

        asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    async def _stop(self) -> None:
        import asyncio

        self.server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


@pytest.mark.parametrize("mode", ["require", "verify-full"])
async def test_direct_tls_offers_the_alpn_protocol_postgresql_needs(
    postgres: PostgresServer, pki: TestPki, mode: str
) -> None:
    """The context the pool builds for verify-full had no ALPN protocol, so PostgreSQL 17 would
    hang up on every direct TLS login (asyncpg's own contexts have it)."""
    front = _DirectTlsFront(pki, postgres.port)
    port = front.start()
    # require without a root certificate: asyncpg's context; verify-full: the pool's.
    root = {"sslrootcert": str(pki.ca_cert)} if mode == "verify-full" else {}
    try:
        async with await _open(
            postgres.app.dsn("localhost", port, postgres.database, sslmode=mode,
                             sslnegotiation="direct", **root)
        ) as pool:
            assert await pool.fetchval("SELECT 1") == 1
        assert front.alpn
        assert set(front.alpn) == {"postgresql"}
    finally:
        front.close()
async def test_asyncpool_ssl_true_verifies_the_certificate_and_the_host_name(
    tls_postgres: PostgresServer, pki: TestPki, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``ASYNCPOOL_SSL=true`` is ``ssl=True``: verify-full, as in code."""
    monkeypatch.setenv("ASYNCPOOL_SSL", "true")
    monkeypatch.setenv("ASYNCPOOL_SSL_ROOT_CERT", str(pki.ca_cert))
    async with await _open(_dsn(tls_postgres)) as pool:
        assert (await _tls_facts(pool))[0]
    with pytest.raises(ConnectError, match=r"the certificate is not for '127\.0\.0\.1'"):
        await _open(_dsn(tls_postgres, host="127.0.0.1"))
    monkeypatch.setenv("ASYNCPOOL_SSL_ROOT_CERT", str(pki.other_ca_cert))
    with pytest.raises(ConnectError, match="TLS certificate did not verify"):
        await _open(_dsn(tls_postgres))


async def test_a_hang_up_in_the_direct_tls_handshake_is_retried_once_direct_tls_worked(
    postgres: PostgresServer, pki: TestPki
) -> None:
    """Every hang-up in a direct TLS handshake was "needs PostgreSQL 17", never retried: a
    passing network fault against PostgreSQL 17 failed the caller. Before any direct TLS login
    has worked it still is (PostgreSQL 15 above does that to every attempt); after, it is
    retried."""
    front = _DirectTlsFront(pki, postgres.port)
    port = front.start()
    dsn = postgres.app.dsn("localhost", port, postgres.database, sslmode="require",
                           sslnegotiation="direct")
    try:
        async with await _open(dsn) as pool, pool.acquire() as held:
            front.hang_ups = 1
            async with pool.acquire() as conn:  # a new login: hung up on, then retried
                assert await conn.fetchval("SELECT 1") == 1
            assert await held.fetchval("SELECT 2") == 2
            assert front.hung_up == 1
            assert pool.stats().connect_errors_total == 1
        front.hang_ups = 1  # a new pool's first login
        with pytest.raises(ConnectError) as info:
            await _open(dsn)
        assert "no direct TLS login to this server has worked yet in this pool" in str(info.value)
        assert "PostgreSQL accepts direct TLS from version 17" in str(info.value)
        assert info.value.transient is False
    finally:
        front.close()


async def test_a_reset_in_a_first_direct_tls_handshake_is_not_blamed_on_an_old_server(
    postgres: PostgresServer, pki: TestPki
) -> None:
    """A server that takes direct TLS (PostgreSQL 17) answers the hello, then the network
    resets the connection, on a new pool's very first login: the pool said the server hung up
    "without answering the TLS hello", as PostgreSQL before 17 does, which it cannot know."""
    front = _DirectTlsFront(pki, postgres.port)
    front.resets = 1
    port = front.start()
    dsn = postgres.app.dsn("localhost", port, postgres.database, sslmode="verify-full",
                           sslrootcert=str(pki.ca_cert), sslnegotiation="direct")
    try:
        with pytest.raises(ConnectError) as info:
            await _open(dsn)
        message = str(info.value)
        assert front.resets == 0
        assert "was closed or reset during the direct TLS handshake" in message
        assert "without answering" not in message
        # Both causes, and what to do for each.
        assert "the server does not take direct TLS" in message
        assert "PostgreSQL accepts direct TLS from version 17" in message
        assert "Or the network lost the connection" in message
        assert "try again" in message
        async with await _open(dsn) as pool:  # the same server, the network fine again
            assert await pool.fetchval("SELECT 1") == 1
    finally:
        front.close()


async def test_a_tls_alert_in_the_direct_tls_handshake_is_not_taken_for_an_old_server(
    postgres: PostgresServer, pki: TestPki
) -> None:
    """A server that answers the hello with TLS takes direct TLS: its refusal (here a fatal
    protocol_version alert, as OpenSSL sends when no TLS version is common) was reported as
    "PostgreSQL accepts direct TLS from version 17"."""
    front = _DirectTlsFront(pki, postgres.port)
    front.alert = bytes([0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 70])  # fatal protocol_version
    port = front.start()
    try:
        with pytest.raises(ConnectError) as info:
            await _open(postgres.app.dsn("localhost", port, postgres.database,
                                         sslmode="verify-full", sslrootcert=str(pki.ca_cert),
                                         sslnegotiation="direct"))
        assert "TLS failed" in str(info.value)
        assert "ALERT_PROTOCOL_VERSION" in str(info.value)
        assert "version 17" not in str(info.value)
    finally:
        front.close()


@contextlib.contextmanager
def _front_on_a_thread(pki: TestPki, backend_port: int) -> Iterator[int]:
    """A `_DirectTlsFront` (which answers while the caller's loop is blocked: it serves from a
    loop of its own thread); its port."""
    front = _DirectTlsFront(pki, backend_port)
    try:
        yield front.start()
    finally:
        front.close()


async def test_terminate_with_cancel_within_over_direct_tls(
    postgres: PostgresServer, pki: TestPki
) -> None:
    """The request goes as the connection did, TLS from the first byte: it sent an SSLRequest
    first, which a server or front that takes direct TLS only (as here) hangs up on, and the
    statement ran on."""
    from tests.test_pool_api import _cancelled_before_terminate_returns

    with _front_on_a_thread(pki, postgres.port) as port:
        pool = await _open(postgres.app.dsn("localhost", port, postgres.database,
                                            sslmode="verify-full", sslnegotiation="direct",
                                            sslrootcert=str(pki.ca_cert)))
        await _cancelled_before_terminate_returns(
            pool, postgres.dsn(postgres.superuser, "postgres"), "SELECT pg_sleep(30) -- direct")


def _direct_dsn(postgres: PostgresServer, port: int, pki: TestPki, mode: str) -> str:
    """A DSN through a `_DirectTlsFront` on `port`: ``require`` (asyncpg's own context) or
    ``verify-full`` (the pool's, with the test CA)."""
    root = {"sslrootcert": str(pki.ca_cert)} if mode == "verify-full" else {}
    return postgres.app.dsn("localhost", port, postgres.database, sslmode=mode,
                            sslnegotiation="direct", **root)


async def _ended(postgres: PostgresServer, token: str, within: float = 3.0) -> bool:
    """Whether the statements marked `token` have ended on the server within `within` seconds
    (a cancel that arrives ends a pg_sleep(30) in milliseconds)."""
    import asyncio

    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while await postgres.running_statements(token):
        if loop.time() > deadline:
            return False
        await asyncio.sleep(0.05)
    return True


@pytest.mark.parametrize("mode", ["require", "verify-full"])
@pytest.mark.parametrize("how", ["timeout", "task cancelled"])
async def test_a_statement_asyncpg_cancels_over_direct_tls_ends_on_the_server(
    postgres: PostgresServer, pki: TestPki, mode: str, how: str
) -> None:
    """asyncpg's own cancel request (a statement's `timeout=`, the caller's task cancelled
    during a query) sent an SSLRequest first, as for a connection made with one: a server or
    front that takes direct TLS only (as here) hung up on it, asyncpg closed the connection,
    and the statement ran on, on the server, for its 30 s. It goes as the connection did now:
    TLS from the first byte, for the host dialled (SNI; verify-full: its certificate)."""
    import asyncio
    import uuid

    token = f"direct-cancel-{uuid.uuid4().hex[:10]}"
    sql = f"SELECT pg_sleep(30) /* {token} */"
    front = _DirectTlsFront(pki, postgres.port)
    port = front.start()
    try:
        async with Pool(_direct_dsn(postgres, port, pki, mode), min_size=0, max_size=1,
                        connect_timeout=5, telemetry=False) as pool:
            async with pool.acquire() as conn:
                before = len(front.names)
                if how == "timeout":
                    with pytest.raises(TimeoutError):
                        await conn.fetch(sql, timeout=0.3)
                else:
                    task = asyncio.create_task(conn.fetch(sql))
                    async with asyncio.timeout(5):
                        while not await postgres.running_statements(token):
                            await asyncio.sleep(0.05)
                    task.cancel()
                    with pytest.raises(asyncio.CancelledError):
                        await task
                assert await _ended(postgres, token), "the cancelled statement ran on"
                assert await conn.fetchval("SELECT 1") == 1  # the same connection goes on
            assert pool.stats().closed_total == 0
            assert front.names[before:] == ["localhost"]  # one request, direct TLS, with SNI
            assert front.alpn[-1] == "postgresql"
    finally:
        await postgres.end_statements(token)
        front.close()


async def test_a_direct_tls_cancel_request_verifies_the_server_as_the_connection_did(
    postgres: PostgresServer, pki: TestPki, tmp_path: Path
) -> None:
    """The request is verified with the connection's own context (verify-full: the CA, the host
    name): once the front shows a certificate the CA did not sign, it gets no request (the
    handshake fails), and the connection, whose state is then unknown, is closed."""
    import uuid

    from cryptography.hazmat.primitives import serialization

    from asyncpool.testing.self_signed import self_signed

    key, cert = self_signed("localhost", dns_names=("localhost",), ip_addresses=("127.0.0.1",))
    (tmp_path / "impostor.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "impostor.key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    token = f"direct-impostor-{uuid.uuid4().hex[:10]}"
    front = _DirectTlsFront(pki, postgres.port)
    port = front.start()
    try:
        async with Pool(_direct_dsn(postgres, port, pki, "verify-full"), min_size=0, max_size=1,
                        connect_timeout=5, telemetry=False) as pool:
            async with pool.acquire() as conn:
                front.context.load_cert_chain(tmp_path / "impostor.crt", tmp_path / "impostor.key")
                before = len(front.names)
                with pytest.raises(TimeoutError):
                    await conn.fetch(f"SELECT pg_sleep(30) /* {token} */", timeout=0.3)
            assert front.names[before:] == ["localhost"]  # a handshake was started...
            assert len(front.alpn) == 1  # ...and never finished: only the login's was
            assert not await _ended(postgres, token, within=0.5)  # no request reached it
            assert pool.stats().closed_total == 1
    finally:
        await postgres.end_statements(token)
        front.close()


async def test_the_pools_own_cancel_request_goes_direct_tls(
    postgres: PostgresServer, pki: TestPki
) -> None:
    """The request the pool sends itself (leak reclaim, a connection returned busy, closing the
    pool with statements running: `driver.request_cancel`) negotiated TLS with an SSLRequest:
    a front that takes direct TLS only hung up on it and the statement ran on."""
    import asyncio
    import uuid

    import asyncpg

    from asyncpool.connect import driver

    token = f"direct-request-{uuid.uuid4().hex[:10]}"
    front = _DirectTlsFront(pki, postgres.port)
    port = front.start()
    conn = await asyncpg.connect(_direct_dsn(postgres, port, pki, "require"),
                                 connection_class=driver.cancel_aware_class(None, cancels=True))
    try:
        task = asyncio.create_task(conn.fetch(f"SELECT pg_sleep(30) /* {token} */"))
        async with asyncio.timeout(5):
            while not await postgres.running_statements(token):
                await asyncio.sleep(0.05)
        before = len(front.names)
        request = driver.request_cancel(conn)
        assert request is not None
        await asyncio.wait_for(request, 5)
        with pytest.raises(asyncpg.QueryCanceledError):
            await asyncio.wait_for(task, 3)
        assert await _ended(postgres, token, within=0)
        assert front.names[before:] == ["localhost"]
    finally:
        conn.terminate()
        await postgres.end_statements(token)
        front.close()


async def test_a_leaked_connections_statement_is_cancelled_over_direct_tls(
    postgres: PostgresServer, pki: TestPki
) -> None:
    """Leak reclaim cancels the holder and the statement it runs: through a front that takes
    direct TLS only, every request was hung up on and the statement ran on."""
    import asyncio
    import uuid

    from asyncpool import ConnectionLeakedError

    token = f"direct-leak-{uuid.uuid4().hex[:10]}"
    front = _DirectTlsFront(pki, postgres.port)
    port = front.start()
    try:
        async with Pool(_direct_dsn(postgres, port, pki, "verify-full"), min_size=0, max_size=1,
                        leak_timeout=0.3, connect_timeout=5, telemetry=False) as pool:

            async def holder() -> None:
                async with pool.acquire() as conn:
                    await conn.fetch(f"SELECT pg_sleep(30) /* {token} */")

            with pytest.raises(ConnectionLeakedError):
                await asyncio.wait_for(holder(), 5)
            assert await _ended(postgres, token), "the leaked connection's statement ran on"
            assert await pool.fetchval("SELECT 1") == 1
    finally:
        await postgres.end_statements(token)
        front.close()


async def test_direct_tls_to_pgbouncer_says_it_does_not_take_it(
    legacy: PgBouncerServer, current: PgBouncerServer
) -> None:
    """PgBouncer 1.18 answers the TLS hello with an error message in the plain protocol, 1.24
    waits for the rest of what it reads as a startup packet: both were told apart from an old
    server by nothing (a TLS error, or a timeout that only blamed the network)."""
    with pytest.raises(ConnectError) as info:
        await _open(legacy.dsn(sslmode="require", sslnegotiation="direct"))
    assert "answered the TLS hello" in str(info.value)
    assert "with something that is not TLS" in str(info.value)
    assert info.value.transient is False
    with pytest.raises(ConnectError) as info:
        await _open(current.dsn(sslmode="require", sslnegotiation="direct"), connect_timeout=1)
    assert "no answer within connect_timeout=1s" in str(info.value)
    assert "direct TLS is asked for by the DSN's sslnegotiation" in str(info.value)


@pytest.mark.parametrize("mode", ["unnamed", "off", "on"])
async def test_logins_cancelled_as_they_connect_under_verify_full_leave_no_unretrieved_error(
        tls_postgres: PostgresServer, pki: TestPki, mode: Literal["unnamed", "off", "on"]) -> None:
    """Logins to a verified server, with every authentication method allowed, cancelled at
    random moments of their first milliseconds (seeded), asyncio's debug mode on: asyncpg's TLS
    negotiation keeps an error when the login is cancelled as its TCP connection comes up
    (asyncpg#1211), and asyncio logged "Future exception was never retrieved" for a few in 300
    in the ``off`` and ``on`` modes, where no other view of the pool's stood between asyncpg
    and the socket to mark it seen."""
    async with loop_messages(debug=True) as seen, Pool(
            _dsn(tls_postgres), min_size=0, max_size=1, telemetry=False, prepared_statements=mode,
            ssl="verify-full", ssl_root_cert=str(pki.ca_cert), connect_timeout=5) as pool:
        assert pool.stats().size == 0
        await cancel_logins(pool, 300)
        assert await pool.fetchval("SELECT 1") == 1
    assert [m for m in seen if "never retrieved" in m] == []
