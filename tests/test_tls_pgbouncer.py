"""PgBouncer's own TLS (``client_tls_sslmode``), 1.18 and the current one: a verified login, and
the connect errors for a certificate of another CA, for another name, expired, and a pool that
does not ask for TLS. Each says what to fix and holds no piece of the password."""

from __future__ import annotations

import datetime
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from asyncpool import ConnectError, Pool
from asyncpool.testing import PgBouncerServer, PostgresServer
from asyncpool.testing.binaries import current_pgbouncer, system_pgbouncer
from asyncpool.testing.pki import TestPki
from tests.secret_support import exposed, leaks


@dataclass(frozen=True)
class ExpiredCert:
    """A CA, and a certificate for "localhost" it signed that expired yesterday, with its key."""

    ca: Path
    cert: Path
    key: Path


@pytest.fixture(scope="module")
def expired() -> Iterator[ExpiredCert]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    from asyncpool.testing.process import chown_tree, make_workdir, remove_tree
    from asyncpool.testing.self_signed import alt_names, self_signed

    directory = make_workdir("tls-expired")
    ca_key, ca_cert = self_signed("asyncpool expired-test CA", authority=True)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_cert.subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=10))
        .not_valid_after(now - datetime.timedelta(days=1))
        .add_extension(alt_names(("localhost",), ()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    made = ExpiredCert(directory / "ca.crt", directory / "server.crt", directory / "server.key")
    made.ca.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    made.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    made.key.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    made.key.chmod(0o600)
    chown_tree(directory)
    yield made
    remove_tree(directory)


@dataclass(frozen=True)
class TlsPoolers:
    """One PgBouncer binary run twice with client_tls_sslmode=require: with `pki`'s certificate
    (for "localhost") and with the expired one."""

    valid: PgBouncerServer
    expired: PgBouncerServer


@pytest.fixture(scope="module", params=["1.18", "current"], ids=["pgbouncer-1.18",
                                                                 "pgbouncer-current"])
def poolers(request: pytest.FixtureRequest, postgres: PostgresServer, pki: TestPki,
            expired: ExpiredCert) -> Iterator[TlsPoolers]:
    binary = system_pgbouncer() if request.param == "1.18" else current_pgbouncer()
    started: list[PgBouncerServer] = []
    try:
        for cert, key in ((pki.server_cert, pki.server_key), (expired.cert, expired.key)):
            server = PgBouncerServer(binary, postgres, {
                "client_tls_sslmode": "require", "client_tls_cert_file": str(cert),
                "client_tls_key_file": str(key)})
            server.start()
            started.append(server)
        yield TlsPoolers(*started)
    finally:
        for server in started:
            server.stop()


def _dsn(postgres: PostgresServer, port: int, host: str = "localhost", **params: str) -> str:
    return postgres.app.dsn(host, port, "app", **params)


async def test_verify_full_logs_in(poolers: TlsPoolers, postgres: PostgresServer,
                                   pki: TestPki) -> None:
    dsn = _dsn(postgres, poolers.valid.port, sslmode="verify-full", sslrootcert=str(pki.ca_cert))
    async with Pool(dsn, min_size=1, max_size=1, connect_timeout=5, telemetry=False) as pool:
        assert await pool.fetchval("SELECT 1") == 1


@pytest.mark.parametrize("case", ["another CA", "another name", "expired", "sslmode=disable"])
async def test_each_failure_says_what_to_fix_and_shows_no_password(
    case: str, poolers: TlsPoolers, postgres: PostgresServer, pki: TestPki,
    expired: ExpiredCert,
) -> None:
    port = poolers.valid.port
    options: dict[str, Any] = {}
    dsn, wanted = {
        "another CA": (
            _dsn(postgres, port, sslmode="verify-full", sslrootcert=str(pki.other_ca_cert)),
            ["unable to get local issuer certificate", "check ssl_root_cert",
             "checked against the DSN's sslrootcert"]),
        "another name": (
            _dsn(postgres, port, host="127.0.0.1", sslmode="verify-full",
                 sslrootcert=str(pki.ca_cert)),
            ["the certificate is not for '127.0.0.1'", "dial the name it was issued for"]),
        "expired": (
            _dsn(postgres, poolers.expired.port, sslmode="verify-full",
                 sslrootcert=str(expired.ca)),
            ["certificate has expired", "outside its validity period",
             "PgBouncer's client_tls_cert_file", "check this machine's clock"]),
        "sslmode=disable": (
            _dsn(postgres, port, sslmode="disable"),
            ["the pooler takes only TLS connections (SSL required)", "set sslmode=verify-full"]),
    }[case]
    if case == "sslmode=disable":
        options["allow_unprotected_credentials"] = True
    with pytest.raises(ConnectError) as info:
        await Pool(dsn, min_size=1, max_size=1, connect_timeout=3, acquire_timeout=4,
                   telemetry=False, **options).open()
    message = str(info.value)
    for text in wanted:
        assert text in message
    # The advice for another CA would send a user with an expired certificate the wrong way.
    assert ("check ssl_root_cert" in message) == (case == "another CA")
    assert info.value.transient is False  # the same on every attempt: not retried
    assert leaks(exposed(info.value), [postgres.app.password]) == []
