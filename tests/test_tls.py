"""TLS end to end against a PostgreSQL that only accepts TLS, with a test CA: the modes up to
verify-full, and the errors for the wrong CA, the wrong host name and a server without TLS."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from asyncpool import ConnectError, Pool, PoolConfigError
from asyncpool.testing import PostgresServer
from asyncpool.testing.pki import TestPki


def _dsn(server: PostgresServer, host: str = "localhost", **params: str) -> str:
    return server.app.dsn(host, server.port, server.database, **params)


async def _open(dsn: str, **options: Any) -> Pool:
    return await Pool(dsn, min_size=1, max_size=2, connect_timeout=5, telemetry=False,
                      **options).open()


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
