"""Self-signed test certificates: a throwaway CA, or a server certificate that vouches for itself."""

from __future__ import annotations

import datetime
import ipaddress

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

#: How long a test certificate stays valid; tests only need it for the run.
VALIDITY = datetime.timedelta(days=2)
#: Start of validity, back-dated so a clock a little behind still accepts the certificate.
BACKDATE = datetime.timedelta(minutes=5)


def alt_names(dns_names: tuple[str, ...], ip_addresses: tuple[str, ...]) -> x509.SubjectAlternativeName:
    """The subjectAltName extension for `dns_names` and `ip_addresses`."""
    names: list[x509.GeneralName] = [x509.DNSName(n) for n in dns_names]
    names += [x509.IPAddress(ipaddress.ip_address(a)) for a in ip_addresses]
    return x509.SubjectAlternativeName(names)


def self_signed(
    common_name: str, *, authority: bool = False,
    dns_names: tuple[str, ...] = (), ip_addresses: tuple[str, ...] = (),
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A new key and a certificate for `common_name` that it signs itself.

    `authority`: a CA that may sign leaf certificates (basicConstraints CA, keyCertSign) rather
    than a server certificate; `dns_names`/`ip_addresses` go in subjectAltName (none: no
    extension).
    """
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + VALIDITY)
    )
    if dns_names or ip_addresses:
        builder = builder.add_extension(alt_names(dns_names, ip_addresses), critical=False)
    if authority:
        builder = (
            builder
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True, key_cert_sign=True, crl_sign=True,
                    content_commitment=False, key_encipherment=False, data_encipherment=False,
                    key_agreement=False, encipher_only=False, decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
            )
        )
    return key, builder.sign(key, hashes.SHA256())
