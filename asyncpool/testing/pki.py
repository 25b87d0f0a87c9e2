"""A throwaway certificate authority and server certificate, for TLS tests against PostgreSQL."""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from asyncpool.testing.process import chown_tree, make_workdir, remove_tree
from asyncpool.testing.self_signed import BACKDATE, VALIDITY, alt_names, self_signed


@dataclass(frozen=True)
class TestPki:
    """Files of one test PKI: `ca_cert` signed `server_cert`; `other_ca_cert` signed nothing.
    `revoked_crl` is the CA's revocation list naming the server certificate; `empty_crl` the
    CA's list naming none."""

    __test__ = False  # not a pytest test class

    directory: Path
    ca_cert: Path
    server_cert: Path
    server_key: Path
    other_ca_cert: Path
    revoked_crl: Path
    empty_crl: Path

    def postgres_settings(self) -> dict[str, str]:
        """postgresql.conf lines that turn TLS on with this certificate."""
        return {
            "ssl": "on",
            "ssl_cert_file": f"'{self.server_cert}'",
            "ssl_key_file": f"'{self.server_key}'",
        }

    def remove(self) -> None:
        remove_tree(self.directory)


def make_test_pki(dns_names: tuple[str, ...] = ("localhost",),
                  ip_addresses: tuple[str, ...] = ("127.0.0.1",)) -> TestPki:
    """A CA, a server certificate for `dns_names`/`ip_addresses` signed by it, and an unrelated CA.

    Files live in a private directory the server's OS user owns (PostgreSQL refuses a key file
    others can read).
    """
    directory = make_workdir("tls")
    ca_key, ca_cert = self_signed("asyncpool test CA", authority=True)
    _, other_cert = self_signed("asyncpool unrelated CA", authority=True)
    server_key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, dns_names[0])]))
        .issuer_name(ca_cert.subject)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + VALIDITY)
        .add_extension(alt_names(dns_names, ip_addresses), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    pki = TestPki(
        directory=directory,
        ca_cert=directory / "ca.crt",
        server_cert=directory / "server.crt",
        server_key=directory / "server.key",
        other_ca_cert=directory / "other-ca.crt",
        revoked_crl=directory / "revoked.crl",
        empty_crl=directory / "empty.crl",
    )
    pki.revoked_crl.write_bytes(_crl(ca_key, ca_cert, revoked=server_cert.serial_number))
    pki.empty_crl.write_bytes(_crl(ca_key, ca_cert, revoked=None))
    pki.ca_cert.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    pki.other_ca_cert.write_bytes(other_cert.public_bytes(serialization.Encoding.PEM))
    pki.server_cert.write_bytes(server_cert.public_bytes(serialization.Encoding.PEM))
    pki.server_key.write_bytes(
        server_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    pki.server_key.chmod(0o600)
    chown_tree(directory)
    return pki


def _crl(ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate,
         revoked: int | None) -> bytes:
    """A PEM revocation list signed by the CA, naming the certificate with serial `revoked`."""
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca_cert.subject)
        .last_update(now - BACKDATE)
        .next_update(now + VALIDITY)
    )
    if revoked is not None:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(revoked)
            .revocation_date(now - BACKDATE).build())
    return builder.sign(ca_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)
