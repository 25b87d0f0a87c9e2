"""The one TLS setting a pool's connections use, and what it allows credentials to do.

Every spelling is read here and nowhere else: the `ssl` option (``ASYNCPOOL_SSL``),
``connect_kwargs["ssl"]``, the DSN's ``sslmode`` and ``sslrootcert``, the `ssl_root_cert` option
(``ASYNCPOOL_SSL_ROOT_CERT``), an `ssl.SSLContext`, and libpq's ``PGSSLMODE``/``PGSSLROOTCERT``.
The pool's own settings (option, keyword argument, DSN) must agree when more than one is given:
two that differ are a `PoolConfigError` naming both, never "the last one wins". The environment
variables are defaults, used only when the pool's settings say nothing (as in libpq).

Modes follow libpq's ``sslmode``: ``disable``, ``allow``/``prefer`` (TLS if offered,
unverified), ``require`` (TLS; the chain is checked only against a root certificate given or
libpq's ``~/.postgresql/root.crt``, as libpq does), ``verify-ca`` (the chain must lead to the
root certificate: the one named, else ``~/.postgresql/root.crt``, else the system CAs where
libpq would fail) and ``verify-full`` (also the certificate must name the host dialled). A root
certificate given without a mode means ``verify-full``; ``sslrootcert=system`` means the system
CAs and needs ``verify-full``.

libpq's other handshake keywords (``sslcrl``, ``sslcrldir``, ``ssl_min_protocol_version``,
``ssl_max_protocol_version``: DSN, service, ``PGSSL*``) are read here too and applied to the
context the pool builds (asyncpg reads none of them beside a context), and so is libpq's default
revocation list, ``~/.postgresql/root.crl``. A revocation list that would not be checked (a mode
that checks no chain, an ``ssl.SSLContext``) is refused, never skipped. ``sslnegotiation``
(``PGSSLNEGOTIATION``, asyncpg's ``direct_tls``) is checked and left to asyncpg;
``channel_binding=require`` and ``hostaddr``, which asyncpg cannot honour, are refused.

The resolved setting is what asyncpg is given (always explicitly, so asyncpg reads no mode of its
own), and what the credential rules check (`check_credentials`, `allowed_auth_methods`): a
credential goes only to a server whose certificate and name were verified, except a password
(never a token) to this machine, which is then only used for SCRAM.
"""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import os
import ssl
import stat
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast

from asyncpool.connect.addresses import login_addresses, login_hosts
from asyncpool.connect.passfile import has_password_for, passfile_path
from asyncpool.errors import ConfigFail, PoolConfigError, config_fail

if TYPE_CHECKING:
    from asyncpool.config import PoolConfig
    from asyncpool.connect.dsn import ParsedDsn, Target
    from asyncpool.connect.service import Service

MODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")
_RANK = {mode: rank for rank, mode in enumerate(MODES)}
#: `sslrootcert=system`: the system's CAs (libpq 16), which only make sense with verify-full.
SYSTEM = "system"
#: What asyncpool sends credentials unprotected under, and its environment variable.
OPT_OUT = "allow_unprotected_credentials"
#: Authentication methods, as libpq's ``require_auth`` names them.
AUTH_METHODS = ("password", "md5", "scram-sha-256", "gss", "sspi", "none")
#: Methods that send nothing a listener could log in with or read a password from.
SAFE_AUTH_METHODS = frozenset({"scram-sha-256", "gss", "sspi", "none"})
#: Methods that use no password at all.
NO_PASSWORD_METHODS = frozenset({"gss", "sspi", "none"})

CredentialKind = Literal["token", "password"]


@dataclass(frozen=True)
class TlsSetting:
    """The effective TLS setting of a pool's connections, and where it was decided."""

    mode: str
    #: Which setting decided it ("the ssl option", "ASYNCPOOL_SSL", "the DSN's sslmode",
    #: "PGSSLMODE"...).
    source: str
    #: The context the user gave, if any (used as it is).
    context: ssl.SSLContext | None = field(default=None, repr=False)
    #: CA bundle path (or ``"system"``), and which setting gave it.
    root_cert: str | None = None
    root_cert_source: str | None = None
    #: Client certificate and key (DSN ``sslcert``/``sslkey``, service, ``PGSSLCERT``/
    #: ``PGSSLKEY``, else libpq's ``~/.postgresql/postgresql.crt``/``.key``), and where the
    #: certificate came from.
    client_cert: str | None = None
    client_key: str | None = field(default=None, repr=False)
    client_cert_source: str | None = None
    client_key_password: str | None = field(default=None, repr=False)
    #: Revocation lists (``sslcrl`` file, ``sslcrldir`` directory, else libpq's default
    #: ``~/.postgresql/root.crl``), checked for the whole chain wherever the chain is verified,
    #: as libpq and asyncpg do; and which setting gave them.
    crl_file: str | None = None
    crl_dir: str | None = None
    crl_source: str | None = None
    #: The TLS versions allowed (``ssl_min_protocol_version``/``..._max_...``, libpq's names).
    min_version: str = "TLSv1.2"
    max_version: str | None = None
    #: TLS from the first byte (``sslnegotiation=direct``, asyncpg's ``direct_tls``: PostgreSQL
    #: 17), and which setting asked for it. asyncpg reads it itself; known here for the errors.
    direct: bool = False
    direct_source: str | None = None

    @property
    def verifies_chain(self) -> bool:
        if self.context is not None:
            return self.context.verify_mode == ssl.CERT_REQUIRED
        if self.mode == "require":
            return self.root_cert is not None
        return _RANK[self.mode] >= _RANK["verify-ca"]

    @property
    def verifies_name(self) -> bool:
        if self.context is not None:
            return self.verifies_chain and self.context.check_hostname
        return self.mode == "verify-full"

    @property
    def verified(self) -> bool:
        """True when a connection can only be made to a server whose certificate chains to a
        trusted CA and names the host dialled (what a credential needs)."""
        return self.verifies_chain and self.verifies_name

    @property
    def optional(self) -> bool:
        """True when a server that refuses TLS is dialled without it (``allow``, ``prefer``)."""
        return self.context is None and self.mode in ("allow", "prefer")

    def describe(self) -> str:
        if self.context is not None:
            checks = (
                "checks the certificate and the host name" if self.verified
                else "checks the certificate but not the host name" if self.verifies_chain
                else "checks no certificate (CERT_NONE)"
            )
            return f"an ssl.SSLContext that {checks} ({self.source})"
        return f"ssl mode {self.mode!r} ({self.source})"

    def driver_argument(self) -> ssl.SSLContext | str | bool:
        """What asyncpg's ``ssl=`` is given: always something, so it reads no mode itself."""
        if self.context is not None:
            return self.context
        if self.mode == "disable":
            return False
        if self.mode in ("allow", "prefer") or (self.mode == "require" and not self.root_cert):
            # asyncpg builds the context (from the same DSN, service and variables this setting
            # was read from); the client certificate is loaded here first only for a clear
            # error (asyncpg's is OpenSSL's "PEM lib").
            if self.client_cert:
                self._load_client_cert(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT))
            return self.mode
        return self._context()

    def _context(self) -> ssl.SSLContext:
        cafile = None if self.root_cert == SYSTEM else self.root_cert
        try:
            ctx = ssl.create_default_context(cafile=cafile)
        except (OSError, ssl.SSLError) as exc:
            raise PoolConfigError(
                f"the root certificate {self.root_cert!r} ({self.root_cert_source}) could not be "
                f"loaded as a PEM CA bundle ({type(exc).__name__}: "
                f"{getattr(exc, 'strerror', None) or exc}): give a readable PEM file of the CA "
                "certificates the server's chain leads to"
            ) from None
        ctx.check_hostname = self.mode == "verify-full"
        ctx.verify_mode = ssl.CERT_REQUIRED
        if ssl.HAS_ALPN:
            # As asyncpg does on the contexts it builds: PostgreSQL 17 refuses direct TLS
            # (sslnegotiation=direct) without this ALPN protocol; other servers ignore it.
            ctx.set_alpn_protocols(ALPN_PROTOCOLS)
        ctx.minimum_version = TLS_VERSIONS[self.min_version]
        if self.max_version:
            ctx.maximum_version = TLS_VERSIONS[self.max_version]
        if self.crl_file or self.crl_dir:
            self._load_crl(ctx)
        if self.client_cert:
            self._load_client_cert(ctx)
        return ctx

    def _load_crl(self, ctx: ssl.SSLContext) -> None:
        try:
            ctx.load_verify_locations(cafile=self.crl_file, capath=self.crl_dir)
        except (OSError, ssl.SSLError) as exc:
            raise PoolConfigError(
                f"the certificate revocation list {self.crl_file or self.crl_dir!r} "
                f"({self.crl_source}) could not be loaded ({type(exc).__name__}: "
                f"{getattr(exc, 'strerror', None) or exc}): give a PEM file of CRLs"
            ) from None
        # As libpq (X509_V_FLAG_CRL_CHECK_ALL) and asyncpg: every certificate of the chain.
        ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_CHAIN

    def _load_client_cert(self, ctx: ssl.SSLContext) -> None:
        assert self.client_cert is not None
        password = self.client_key_password
        try:
            # Always a callback (as asyncpg): without one, OpenSSL asks on the terminal.
            ctx.load_cert_chain(self.client_cert, self.client_key or None,
                                password=lambda: password or "")
        except (OSError, ssl.SSLError) as exc:
            source = self.client_cert_source or "sslcert/PGSSLCERT"
            raise PoolConfigError(
                f"the client certificate {self.client_cert!r} ({source}) or its key "
                f"{self.client_key or self.client_cert!r} (sslkey/PGSSLKEY, else "
                f"{DEFAULT_CLIENT_KEY}; decrypted with sslpassword if encrypted) could not be "
                f"loaded ({type(exc).__name__}): check both files and the key's passphrase"
            ) from None


def verifying_context(cafile: str | None, *, check_hostname: bool) -> ssl.SSLContext:
    """A client context that requires a certificate chaining to `cafile` (or the system CAs)."""
    mode = "verify-full" if check_hostname else "verify-ca"
    return TlsSetting(mode, "verifying_context", root_cert=cafile,
                      root_cert_source="ssl_root_cert")._context()


# -- resolving ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Spelling:
    source: str
    mode: str
    context: ssl.SSLContext | None = None
    shown: str = ""

    def describe(self) -> str:
        return f"{self.source}={self.shown or repr(self.mode)}"


#: `resolve_tls`'s `service` when its caller has not read the connection service.
READ_IT = object()


def resolve_tls(config: PoolConfig, query: Sequence[tuple[str, str]] | None = None,
                environ: Mapping[str, str] | None = None, *,
                service: Service | object | None = READ_IT) -> TlsSetting:
    """The TLS setting `config`'s connections use (`PoolConfigError` on conflicting settings).

    query: the DSN's query fields in order, repeats included (default: read from `config.dsn`).
    service: the connection service the logins use (`service_of`), if the caller has read it.
    """
    env = os.environ if environ is None else environ
    pairs = list(dsn_query(config.dsn) if query is None else query)
    fail = config_fail(config.name)

    if any(key == "ssl" for key, _ in pairs):
        fail("the DSN has ssl=..., which is not a libpq setting (asyncpg would send it to the "
             "server as a run-time parameter): write sslmode=verify-full (or another sslmode)")
    spellings: list[_Spelling] = []
    if config.ssl is not None:
        spellings.append(_ssl_option(config, fail))
    if "ssl" in config.connect_kwargs and config.connect_kwargs["ssl"] is not None:
        spellings.append(_spelling("connect_kwargs['ssl']", config.connect_kwargs["ssl"], fail))
    spellings += [_spelling("the DSN's sslmode", v, fail) for v in _values(pairs, "sslmode", fail)]
    # A connection service's TLS keys count where the DSN has none of its own, as in libpq (the
    # pool always gives asyncpg its ssl=, so asyncpg would not read them).
    section = (service_of(config, dict(pairs), env) if service is READ_IT
               else cast("Service | None", service))
    served = {k: v for k, v in (section.tls if section else {}).items()
              if not any(key == k for key, _ in pairs)}
    # Any TLS setting given to the pool wins over the service's, as the DSN's does in libpq.
    by_service = f"of service {section.name!r}" if section else ""
    if "sslmode" in served and not spellings:
        spellings.append(_spelling(f"the sslmode {by_service}", served["sslmode"], fail))
    for other in spellings[1:]:
        first = spellings[0]
        if other.mode != first.mode or (
            first.context is not None and other.context is not None
            and other.context is not first.context
        ):
            fail(f"the TLS setting is given twice and the two disagree: {first.describe()} and "
                 f"{other.describe()}; give it once (the pool does not pick one)")
    context = next((s.context for s in spellings if s.context is not None), None)

    root_source, root = _root_cert(config, pairs, fail)
    if root is None and context is None and "sslrootcert" in served:
        root_source, root = f"the sslrootcert {by_service}", served["sslrootcert"]
    if context is not None and root is not None:
        fail(f"{root_source}={root!r} is not used with an ssl.SSLContext: load the CA into the "
             "context (context.load_verify_locations(cafile=...)) and leave it out")

    mode, source = _mode(spellings, env, root_source if root is not None else None, fail)
    if root is None and context is None and env.get("PGSSLROOTCERT"):
        root_source, root = "PGSSLROOTCERT", env["PGSSLROOTCERT"]
    if root is None and context is None and mode in ("require", "verify-ca", "verify-full"):
        # libpq's default, which asyncpg reads too: the pool builds the context from it, so that
        # a file that cannot be loaded is refused here and an unknown CA's error names it.
        # Where it is absent libpq fails in verify-*: the pool takes the system CAs there.
        root_source, root = _default_root(env, fail)
    if root == SYSTEM and context is None and mode != "verify-full":
        fail(f"{root_source}=system (the system CAs) needs ssl mode 'verify-full', not {mode!r} "
             f"({source}), as in libpq")
    if mode in ("disable", "allow", "prefer"):
        root = root_source = None  # not used: nothing is verified in these modes

    given = _Given(pairs, section, env, fail)
    cert, key, cert_source = _client_cert(given, mode, context)
    # Only a key that will be loaded (with a certificate, into a context of the pool's or
    # asyncpg's), as libpq checks only the key it loads.
    _refuse_readable_key(key if cert and mode != "disable" and context is None else None, fail)
    _refuse_libpq_only(given)
    handshake = _handshake(given, context)
    min_version, max_version = _versions(handshake, fail)
    crl_file, crl_dir, crl_source = _revocation_lists(
        handshake, _Verification(mode, source, root, context), env, fail)
    direct_source = _direct_tls(config, given, mode, source, fail)
    return TlsSetting(
        mode=mode, source=source, context=context, root_cert=root, root_cert_source=root_source,
        client_cert=cert, client_key=key, client_cert_source=cert_source,
        client_key_password=_single(pairs, "sslpassword", fail) or served.get("sslpassword"),
        crl_file=crl_file, crl_dir=crl_dir, crl_source=crl_source, min_version=min_version,
        max_version=max_version, direct=direct_source is not None, direct_source=direct_source,
    )


#: libpq's settings of the handshake beside the mode, and the variables that give their default.
HANDSHAKE_KEYS = {
    "sslcrl": "PGSSLCRL",
    "sslcrldir": "PGSSLCRLDIR",
    "ssl_min_protocol_version": "PGSSLMINPROTOCOLVERSION",
    "ssl_max_protocol_version": "PGSSLMAXPROTOCOLVERSION",
}
#: The ALPN protocol PostgreSQL 17 requires for direct TLS (as asyncpg sets it).
ALPN_PROTOCOLS = ["postgresql"]
#: libpq's default revocation list, read when no ``sslcrl``/``sslcrldir`` is given.
DEFAULT_CRL = "~/.postgresql/root.crl"
#: libpq's default root certificate, read when no ``sslrootcert`` is given.
DEFAULT_ROOT = "~/.postgresql/root.crt"
#: libpq's default client certificate and key, read when no ``sslcert``/``sslkey`` is given.
DEFAULT_CLIENT_CERT = "~/.postgresql/postgresql.crt"
DEFAULT_CLIENT_KEY = "~/.postgresql/postgresql.key"
#: The versions libpq names, spelt as libpq documents them (asyncpg reads no other spelling).
TLS_VERSIONS = {
    "TLSv1": ssl.TLSVersion.TLSv1,
    "TLSv1.1": ssl.TLSVersion.TLSv1_1,
    "TLSv1.2": ssl.TLSVersion.TLSv1_2,
    "TLSv1.3": ssl.TLSVersion.TLSv1_3,
}


@dataclass(frozen=True)
class _Given:
    """Where libpq reads a keyword: the DSN, else the connection service, else its variable (an
    empty value is none)."""

    pairs: Sequence[tuple[str, str]]
    section: Service | None
    env: Mapping[str, str]
    fail: ConfigFail

    def get(self, key: str, variable: str, *, env_too: bool = True) -> tuple[str, str] | None:
        """(value, where it was given), or None."""
        if value := _single(self.pairs, key, self.fail):
            return value, f"the DSN's {key}"
        section = self.section
        if section is not None and (value := {**section.tls, **section.libpq_only}.get(key, "")):
            return value, f"the {key} of service {section.name!r}"
        if env_too and (value := self.env.get(variable, "")):
            return value, variable
        return None


def _handshake(given: _Given, context: ssl.SSLContext | None) -> dict[str, tuple[str, str]]:
    """`HANDSHAKE_KEYS` given (key: value, where); beside an ssl.SSLContext the variables are
    ignored (only defaults, as PGSSLROOTCERT is), except a revocation list's, and any other is
    refused."""
    found = {key: value for key, variable in HANDSHAKE_KEYS.items()
             if (value := given.get(key, variable, env_too=context is None)) is not None}
    if context is not None and found:
        where = next(iter(found.values()))[1]
        given.fail(
            f"{where} is not used with an ssl.SSLContext (asyncpg reads none of the DSN's TLS "
            "settings then): set it on the context (load_verify_locations(cafile=crl) with "
            "verify_flags |= ssl.VERIFY_CRL_CHECK_CHAIN, minimum_version, maximum_version) and "
            "leave it out")
    if context is not None:
        # A revocation check asked for is never skipped: the context is used as it is.
        for variable in (HANDSHAKE_KEYS["sslcrl"], HANDSHAKE_KEYS["sslcrldir"]):
            if given.env.get(variable):
                given.fail(
                    f"{variable} is set, but the TLS setting is an ssl.SSLContext, used as it "
                    "is: no revocation list would be checked. Load it into the context "
                    "(load_verify_locations(cafile=crl) with verify_flags |= "
                    f"ssl.VERIFY_CRL_CHECK_CHAIN) and unset {variable}")
    return found


def _default_root(env: Mapping[str, str], fail: ConfigFail) -> tuple[str | None, str | None]:
    """(where, path) of ``~/.postgresql/root.crt`` if it exists, as libpq reads it for
    require/verify-ca/verify-full without ``sslrootcert``; else (None, None): the system CAs
    (require: no chain checked)."""
    path = _home_file("root.crt", env, fail)
    if path is None:
        return None, None
    return f"{DEFAULT_ROOT}, libpq's default root certificate", str(path)


def _client_cert(given: _Given, mode: str,
                 context: ssl.SSLContext | None) -> tuple[str | None, str | None, str | None]:
    """(certificate, key, where the certificate came from), as libpq and asyncpg read them:
    ``sslcert``/``sslkey`` (DSN, service, ``PGSSLCERT``/``PGSSLKEY``), else
    ``~/.postgresql/postgresql.crt``/``.key`` where they exist. A default certificate without
    its key is refused, as libpq refuses it. Beside a context, or with TLS off, no default is
    read."""
    if context is not None:
        # Used as it is: asyncpg reads no sslcert beside it. The variables are only defaults,
        # as PGSSLROOTCERT is; one the pool is given would be dropped without a word.
        for name in ("sslcert", "sslkey", "sslpassword"):
            if (named := given.get(name, "", env_too=False)) is not None:
                given.fail(f"{named[1]} is not used with an ssl.SSLContext (asyncpg reads none "
                           "of the DSN's TLS settings then): load the certificate into the "
                           "context (context.load_cert_chain(certfile, keyfile, password)) "
                           "and leave it out")
        return None, None, None
    named_key = given.get("sslkey", "PGSSLKEY")
    key = named_key[0] if named_key else None
    if mode == "disable":
        named = given.get("sslcert", "PGSSLCERT")
        return (named[0], key, named[1]) if named else (None, key, None)
    if key is None and (home_key := _home_file("postgresql.key", given.env, given.fail)):
        key = str(home_key)
    if (cert := given.get("sslcert", "PGSSLCERT")) is not None:
        return cert[0], key, cert[1]
    home_cert = _home_file("postgresql.crt", given.env, given.fail)
    if home_cert is None:
        return None, None, None
    if key is None:
        given.fail(f"{DEFAULT_CLIENT_CERT} exists ({home_cert}), which libpq and asyncpg present "
                   f"as the client certificate, but its key {DEFAULT_CLIENT_KEY} does not (libpq "
                   "refuses the connection): put the key there, give sslkey= (or PGSSLKEY), or "
                   "move the certificate away")
    return str(home_cert), key, f"{DEFAULT_CLIENT_CERT}, libpq's default client certificate"


def _refuse_readable_key(key: str | None, fail: ConfigFail) -> None:
    """Refuse a private key file with group or world access, as libpq refuses it (asyncpg
    loads it as it is), with libpq's rule: no group or other bit for a file of a user's
    (0600 or 0700 pass), none but g=r for root's (0640)."""
    if key is None or os.name == "nt":
        return  # (libpq checks no permissions there either)
    try:
        info = os.stat(key)  # (followed through a symbolic link, as libpq's stat())
    except OSError:
        return  # (missing or unreadable: loading it says so)
    if not stat.S_ISREG(info.st_mode):
        return
    refused = (stat.S_IWGRP | stat.S_IXGRP | stat.S_IRWXO if info.st_uid == 0
               else stat.S_IRWXG | stat.S_IRWXO)
    if info.st_mode & refused:
        fail(f"the private key file {key!r} has group or world access (permissions "
             f"{stat.S_IMODE(info.st_mode):04o}), which libpq refuses (it allows 0600, or 0640 "
             f"for a file root owns): make it readable by its owner only (chmod 600 {key})")


def _versions(handshake: Mapping[str, tuple[str, str]], fail: ConfigFail) -> tuple[str, str | None]:
    """The lowest and highest TLS versions allowed (libpq's default lowest: TLSv1.2)."""
    for key in ("ssl_min_protocol_version", "ssl_max_protocol_version"):
        if key in handshake and handshake[key][0] not in TLS_VERSIONS:
            value, where = handshake[key]
            fail(f"{where}={value!r}: write one of {', '.join(TLS_VERSIONS)}, spelt so (as "
                 "libpq documents them; asyncpg reads no other spelling)")
    low, low_where = handshake.get("ssl_min_protocol_version",
                                   ("TLSv1.2", "libpq's default ssl_min_protocol_version"))
    high, high_where = handshake.get("ssl_max_protocol_version", (None, ""))
    if high is not None and TLS_VERSIONS[high] < TLS_VERSIONS[low]:
        fail(f"{high_where}={high!r} is below {low_where}={low!r}: no TLS version is left; "
             "raise the maximum (or lower the minimum)")
    return low, high


@dataclass(frozen=True)
class _Verification:
    """What checks the server's chain, for `_revocation_lists`."""

    mode: str
    source: str
    root: str | None
    context: ssl.SSLContext | None


def _revocation_lists(handshake: Mapping[str, tuple[str, str]], checks: _Verification,
                      env: Mapping[str, str],
                      fail: ConfigFail) -> tuple[str | None, str | None, str | None]:
    """The CRL file and directory, and where they came from, as libpq reads them: ``sslcrl``
    and ``sslcrldir``, else ``~/.postgresql/root.crl`` if it exists.

    libpq skips silently a list that is missing or that its mode would not check; the pool
    refuses both (a list given is a check asked for): a file or directory that does not exist, a
    mode that checks no chain, ``require`` without a root certificate for it to check against.
    """
    crl_file, file_where = handshake.get("sslcrl", (None, ""))
    crl_dir, dir_where = handshake.get("sslcrldir", (None, ""))
    _check_crl_paths(crl_file, file_where, crl_dir, dir_where, fail)
    mode, root = checks.mode, checks.root
    if crl_file is not None or crl_dir is not None:
        where = file_where if crl_file is not None else dir_where
        shown = f"{where}={crl_file if crl_file is not None else crl_dir!r}"
        if _RANK[mode] < _RANK["require"]:
            fail(f"{shown}: ssl mode {mode!r} ({checks.source}) checks no certificate, so the "
                 "revocation list would not be read (libpq and asyncpg skip it silently): set "
                 "sslmode=verify-full with sslrootcert to have it checked, or leave it out")
        if mode == "require" and root is None and checks.context is None:
            # (~/.postgresql/root.crt, where it exists, is the root here already.)
            fail(f"{shown}: sslmode=require checks the certificate chain only against a "
                 "root certificate, and none is given (sslrootcert, ssl_root_cert, "
                 "PGSSLROOTCERT, ~/.postgresql/root.crt), so the revocation list would "
                 "revoke nothing: give the root certificate (or sslmode=verify-full)")
        return crl_file, crl_dir, " / ".join(w for w in (file_where, dir_where) if w)
    if checks.context is not None or _RANK[mode] < _RANK["require"]:
        return None, None, None  # a context is used as it is; these modes check no chain
    default = _home_file("root.crl", env, fail)
    if default is None:
        return None, None, None
    if root is None and mode != "require":
        fail(f"{DEFAULT_CRL} exists, which libpq checks beside {DEFAULT_ROOT}, but no root "
             f"certificate is named and {DEFAULT_ROOT} does not exist, so the pool would verify "
             "against the system CAs without checking it: name the CA (sslrootcert= or "
             f"ssl_root_cert) or put it in {DEFAULT_ROOT} to have the list checked, give it "
             "explicitly (sslcrl=), or write sslrootcert=system to check none (as libpq reads "
             "no revocation list with the system CAs)")
    if root is None or root == SYSTEM:
        # require without a root certificate checks no chain; with the system CAs libpq reads
        # no revocation list.
        return None, None, None
    return str(default), None, f"{DEFAULT_CRL}, libpq's default revocation list"


def _check_crl_paths(crl_file: str | None, file_where: str, crl_dir: str | None,
                     dir_where: str, fail: ConfigFail) -> None:
    """Refuse a revocation list file or directory that is not there, or is the other kind."""
    if crl_file is not None and os.path.isdir(crl_file):
        fail(f"{file_where}={crl_file!r} is a directory; sslcrl names one file of revocation "
             f"lists: give a directory as {_crl_spelling(file_where, 'sslcrldir')} (its lists "
             "under the hashed names `openssl rehash` gives them)")
    if crl_file is not None and not os.path.isfile(crl_file):
        fail(f"{file_where}={crl_file!r}: no such file (a certificate revocation list that "
             "cannot be read would revoke nothing): fix the path")
    if crl_dir is not None and os.path.exists(crl_dir) and not os.path.isdir(crl_dir):
        fail(f"{dir_where}={crl_dir!r} is a file; sslcrldir names a directory of revocation "
             f"lists: give a file as {_crl_spelling(dir_where, 'sslcrl')}")
    if crl_dir is not None and not os.path.isdir(crl_dir):
        fail(f"{dir_where}={crl_dir!r}: no such directory (a certificate revocation list that "
             "cannot be read would revoke nothing): fix the path")


def _crl_spelling(where: str, key: str) -> str:
    """How to give `key` (``sslcrl`` or ``sslcrldir``) where the other one was given: its
    variable for a variable, else the keyword (in the DSN or the service, as that one was)."""
    variable = HANDSHAKE_KEYS[key]
    other = "sslcrldir" if key == "sslcrl" else "sslcrl"
    return variable if where == HANDSHAKE_KEYS[other] else f"{key}="


def _home_file(name: str, env: Mapping[str, str], fail: ConfigFail) -> Path | None:
    """``~/.postgresql/<name>`` as asyncpg finds it (``HOME``, else the user's home) if it
    exists, else None. One that cannot be looked at (``~/.postgresql`` this user may not
    search) is refused: asyncpg would raise at every connect, libpq refuses it or falls back to
    the system's defaults it does not have."""
    if env.get("HOME"):
        path = Path(env["HOME"]) / ".postgresql" / name
    elif env is not os.environ:
        return None  # a mapping of its own without HOME: no home directory
    else:
        try:
            path = Path.home() / ".postgresql" / name
        except (RuntimeError, KeyError):
            return None
    try:
        path.stat()
    except (FileNotFoundError, NotADirectoryError):
        return None  # (as libpq: ENOENT and ENOTDIR are "absent")
    except OSError as exc:
        fail(f"~/.postgresql/{name} ({path}) could not be looked at ({exc.strerror}), and "
             f"libpq and asyncpg read it when it exists: give this user access to {path.parent} "
             "(and read access to its files), or name the file to use instead (sslrootcert, "
             "sslcert and sslkey, sslcrl)")
    return path


#: libpq's ``sslnegotiation`` values (17); asyncpg reads the same (and ``direct_tls=``).
SSL_NEGOTIATION = ("postgres", "direct")


def _direct_tls(config: PoolConfig, given: _Given, mode: str, source: str,
                fail: ConfigFail) -> str | None:
    """Where direct TLS is asked for (``sslnegotiation=direct``: DSN, service,
    ``PGSSLNEGOTIATION``; asyncpg's ``direct_tls``), or None. asyncpg does it itself; what it
    would refuse at each connect, or read differently, is refused here, once."""
    negotiation = given.get("sslnegotiation", "PGSSLNEGOTIATION")
    if negotiation is not None and negotiation[0] not in SSL_NEGOTIATION:
        fail(f"{negotiation[1]}={negotiation[0]!r}: choose one of {', '.join(SSL_NEGOTIATION)}")
    flag = config.connect_kwargs.get("direct_tls")
    if flag is not None and negotiation is not None and bool(flag) != (negotiation[0] == "direct"):
        fail(f"direct TLS is given twice and the two disagree: connect_kwargs['direct_tls']="
             f"{flag!r} and {negotiation[1]}={negotiation[0]!r}; give it once")
    if flag is not None:
        where = "connect_kwargs['direct_tls']" if flag else None
    else:
        where = negotiation[1] if negotiation is not None and negotiation[0] == "direct" else None
    if where is not None and _RANK[mode] < _RANK["require"]:
        fail(f"{where} asks for direct TLS, which needs TLS on every connection, but the ssl "
             f"mode is {mode!r} ({source}): set sslmode=verify-full (or require)")
    return where


#: libpq's ``channel_binding`` values; asyncpg does no channel binding (no SCRAM-SHA-256-PLUS).
CHANNEL_BINDING = ("disable", "prefer", "require")


def _refuse_libpq_only(given: _Given) -> None:
    """Refuse what libpq would do and asyncpg cannot: the pool and the libpq tools beside it
    (bench, doctor) would act differently on one DSN."""
    fail = given.fail
    binding = given.get("channel_binding", "PGCHANNELBINDING")
    if binding is not None:
        value, where = binding
        if value not in CHANNEL_BINDING:
            fail(f"{where}={value!r}: choose one of {', '.join(CHANNEL_BINDING)}")
        if value == "require":
            fail(f"{where}='require' cannot be enforced: asyncpg cannot do channel binding (it "
                 "has no SCRAM-SHA-256-PLUS). To keep the password from a server that is not "
                 "the one meant, use require_auth=scram-sha-256 with sslmode=verify-full (and "
                 "its root certificate), and leave channel_binding out (or 'prefer'/'disable')")
    hostaddr = given.get("hostaddr", "PGHOSTADDR")
    if hostaddr is not None:
        fail(f"{hostaddr[1]} is given: asyncpg ignores hostaddr and dials the host name, while "
             "libpq (and the tools that use it) dial the address: write the address as the host "
             "(with sslmode=verify-ca, or a certificate that names the address, for verified "
             "TLS) and leave hostaddr out")


def _mode(spellings: Sequence[_Spelling], env: Mapping[str, str], root_source: str | None,
          fail: ConfigFail) -> tuple[str, str]:
    if spellings:
        return spellings[0].mode, spellings[0].source
    if env.get("PGSSLMODE"):
        return _spelling("PGSSLMODE", env["PGSSLMODE"], fail).mode, "PGSSLMODE"
    if root_source is not None:
        return "verify-full", f"{root_source} given without a mode"
    return "prefer", "asyncpg's default: nothing set"


def _root_cert(config: PoolConfig, pairs: Sequence[tuple[str, str]],
               fail: ConfigFail) -> tuple[str | None, str | None]:
    given = config.ssl_root_cert
    variable = config._variable_of("ssl_root_cert")
    where = "the ssl_root_cert option" if variable is None else variable.partition("=")[0]
    roots = [(where, os.fspath(given))] if given else []
    roots += [("the DSN's sslrootcert", v) for v in _values(pairs, "sslrootcert", fail)]
    if len({path for _, path in roots}) > 1:
        (a_src, a), (b_src, b) = roots[0], next(r for r in roots if r[1] != roots[0][1])
        fail(f"the root certificate is given twice and the two disagree: {a_src}={a!r} and "
             f"{b_src}={b!r}; give it once")
    return roots[0] if roots else (None, None)


def dsn_query(dsn: str | None) -> list[tuple[str, str]]:
    """A DSN's query fields, as the one DSN parser reads them (a repeated key is an error there)."""
    from asyncpool.connect.dsn import parse_dsn

    return list(parse_dsn(dsn).params.items()) if dsn else []


def _spelling(source: str, value: Any, fail: ConfigFail) -> _Spelling:
    if isinstance(value, ssl.SSLContext):
        probe = TlsSetting("require", source, context=value)
        mode = "verify-full" if probe.verified else "verify-ca" if probe.verifies_chain else "require"
        return _Spelling(source, mode, value, shown=f"<SSLContext, acts as {mode!r}>")
    if isinstance(value, bool):
        return _Spelling(source, "verify-full" if value else "disable", shown=repr(value))
    if isinstance(value, str) and value.strip().lower() in _RANK:
        return _Spelling(source, value.strip().lower(), shown=repr(value))
    fail(f"{source}={value!r}: choose one of {', '.join(MODES)} or pass an ssl.SSLContext")


def _ssl_option(config: PoolConfig, fail: ConfigFail) -> _Spelling:
    """The ssl option, named as the variable it was read from if it was: ``ASYNCPOOL_SSL='ON'``
    (a switch shown with its meaning), not "the ssl option=True" the user never wrote."""
    set_by = config._variable_of("ssl")
    if set_by is None:
        return _spelling("the ssl option", config.ssl, fail)
    variable, _, text = set_by.partition("=")
    found = _spelling(variable, config.ssl, fail)
    meaning = f" (ssl={config.ssl!r}: {found.mode!r})" if isinstance(config.ssl, bool) else ""
    return dataclasses.replace(found, shown=text + meaning)


def _values(pairs: Iterable[tuple[str, str]], key: str, fail: ConfigFail) -> list[str]:
    values = [v for k, v in pairs if k == key]
    if len(values) > 1:
        shown = " and ".join(repr(v) for v in values)
        fail(f"the DSN gives {key} {len(values)} times ({shown}); give it once (readers "
             "differ on which one counts, and the pool does not pick one)")
    return values


def _single(pairs: Iterable[tuple[str, str]], key: str, fail: ConfigFail) -> str | None:
    values = [v for k, v in pairs if k == key]
    if len(values) > 1:
        fail(f"the DSN gives {key} {len(values)} times; give it once")
    return values[0] if values else None


# -- what credentials may do -------------------------------------------------------------------


def unprotected_allowed(config: PoolConfig) -> bool:
    return bool(config.allow_unprotected_credentials or config.allow_iam_without_tls)


def check_credentials(config: PoolConfig, setting: TlsSetting, kind: CredentialKind,
                      hosts: Sequence[str], source: str = "") -> None:
    """Refuse, before anything is dialled, a pool that would hand its credential to a server
    whose certificate and name are not verified.

    A token (sent as it is) needs verified TLS. A password may also go to this machine (every
    host a loopback address, ``localhost`` or a Unix socket) without it, where it is only used
    for SCRAM (see `allowed_auth_methods`). `allow_unprotected_credentials` turns this off.
    """
    if setting.verified or unprotected_allowed(config):
        return
    if kind == "password" and all_local(hosts):
        return
    what = (
        "an IAM token (or another credential sent as it is) is only sent" if kind == "token"
        else f"a password{source} is only sent to another machine"
    )
    raise PoolConfigError(
        f"pool {config.name!r}: {what} over TLS that verifies the server's certificate and name, "
        f"but the setting is {setting.describe()}, so whoever answers on the port could read or "
        "collect it; set ssl='verify-full' with ssl_root_cert (RDS: the RDS CA bundle; RDS "
        "Proxy: the Amazon root CAs), or, only where the network is trusted, "
        f"{OPT_OUT}=True (ASYNCPOOL_{OPT_OUT.upper()}=true) to send it unprotected"
    )


def require_auth_setting(config: PoolConfig, dsn_params: Mapping[str, str]) -> str | None:
    """``require_auth`` from the option (``ASYNCPOOL_REQUIRE_AUTH``) or the DSN; both: must agree."""
    dsn_value = dsn_params.get("require_auth")
    if (config.require_auth is not None and dsn_value is not None
            and parse_require_auth(dsn_value) != parse_require_auth(config.require_auth)):
        raise PoolConfigError(
            f"pool {config.name!r}: require_auth is given twice and the two disagree: the "
            f"require_auth option={config.require_auth!r} and the DSN's "
            f"require_auth={dsn_value!r}; give it once"
        )
    return config.require_auth if config.require_auth is not None else dsn_value


def allowed_auth_methods(config: PoolConfig, setting: TlsSetting,
                         require_auth: str | None = None, *,
                         withheld: bool = False) -> frozenset[str]:
    """The authentication methods a server may ask for (libpq's ``require_auth``).

    Default: any over verified TLS (or with `allow_unprotected_credentials`); otherwise only
    those that send no password (SCRAM-SHA-256, GSS, SSPI, none): a request for a cleartext or
    MD5 password on such a connection is refused before anything is sent. `withheld`: the
    only password may not be used at all (`withheld_password`): none of the password methods.
    """
    require_auth = config.require_auth if require_auth is None else require_auth
    if withheld:
        return allowed_auth_methods(config, setting, require_auth) & NO_PASSWORD_METHODS
    if require_auth is not None:
        return parse_require_auth(require_auth)
    if setting.verified or unprotected_allowed(config):
        return frozenset(AUTH_METHODS)
    return SAFE_AUTH_METHODS


def check_dsn_spellings(params: Mapping[str, str], fail: ConfigFail) -> None:
    """The DSN's own TLS and authentication keywords, spelt as libpq takes them, refused as the
    pool is made (as they are when it opens, with the same words) rather than at its `open()`
    (on Lambda, the first invocation). Only what the DSN alone says: how they combine with the
    options, the environment and a service file is the connector's, at open()."""
    if "sslmode" in params:
        _spelling("the DSN's sslmode", params["sslmode"], fail)
    binding = params.get("channel_binding")
    if binding is not None and binding not in CHANNEL_BINDING:
        fail(f"the DSN's channel_binding={binding!r}: choose one of {', '.join(CHANNEL_BINDING)}")
    negotiation = params.get("sslnegotiation")
    if negotiation is not None and negotiation not in SSL_NEGOTIATION:
        fail(f"the DSN's sslnegotiation={negotiation!r}: choose one of "
             f"{', '.join(SSL_NEGOTIATION)}")
    for key in ("ssl_min_protocol_version", "ssl_max_protocol_version"):
        if key in params and params[key] not in TLS_VERSIONS:
            fail(f"the DSN's {key}={params[key]!r}: write one of {', '.join(TLS_VERSIONS)}, "
                 "spelt so (as libpq documents them; asyncpg reads no other spelling)")
    if "require_auth" in params:
        try:
            parse_require_auth(params["require_auth"])
        except PoolConfigError as exc:
            fail(f"the DSN's {exc}")


def parse_require_auth(text: str) -> frozenset[str]:
    """libpq's ``require_auth`` list: ``scram-sha-256,none``, or all negated: ``!password,!md5``."""
    if not isinstance(text, str):
        raise PoolConfigError(
            f"require_auth={text!r}: write one string, a comma-separated list as libpq takes it "
            "(e.g. 'scram-sha-256' or 'scram-sha-256,none'), not a "
            f"{type(text).__name__}")
    names = [n.strip().lower() for n in text.split(",") if n.strip()]
    negated = [n.startswith("!") for n in names]
    bare = [n.lstrip("!") for n in names]
    unknown = [n for n in bare if n not in AUTH_METHODS]
    if not names or unknown or (any(negated) and not all(negated)):
        raise PoolConfigError(
            f"require_auth={text!r}: write a comma-separated list of {', '.join(AUTH_METHODS)} "
            "(every item negated with ! to allow all others)"
        )
    if all(negated):
        return frozenset(AUTH_METHODS) - set(bare)
    return frozenset(bare)


def dialled_hosts(config: PoolConfig, environ: Mapping[str, str] | None = None) -> list[str]:
    """Every host a pool of `config` may dial ("" is asyncpg's default: a local socket, then
    localhost), in asyncpg's order: ``host`` in `connect_kwargs`, the DSN's hosts, those of the
    service file section the DSN names (`asyncpool.connect.service`), ``PGHOST``: the hosts
    `checked_hosts` applies the credential rules to, for a look without the check."""
    env = os.environ if environ is None else environ
    dsn_hosts: list[str] | None = None
    dsn_params: Mapping[str, str] = {}
    if config.dsn:
        from asyncpool.connect.dsn import parse_dsn

        parsed = parse_dsn(config.dsn)
        dsn_hosts, dsn_params = [h for h, _ in parsed.hosts], parsed.params
    service = service_of(config, dsn_params, env)
    return _hosts(config, dsn_hosts, service, env)


def checked_hosts(config: PoolConfig, setting: TlsSetting, kind: CredentialKind | None,
                  dsn_hosts: Sequence[str] | None, service: Service | None) -> list[str]:
    """`dialled_hosts`, after `check_credentials` for them: for a credential of `kind` given to
    the pool (None: none), or for the password the connection `service` holds (asyncpg reads
    it itself). `dsn_hosts` None: no DSN is given to the driver. (The password file's:
    `withheld_password`.)"""
    hosts = _hosts(config, dsn_hosts, service, os.environ)
    if kind is None and service is not None and service.has_password:
        kind = "password"
    if kind is not None:
        check_credentials(config, setting, kind, hosts)
    return hosts


def withheld_password(config: PoolConfig, setting: TlsSetting, kind: CredentialKind | None,
                      hosts: Sequence[str], service: Service | None, *,
                      passfile: PassfileLogin) -> str | None:
    """The password asyncpg would read from the password file for another machine, when it is
    the login's only credential and the credential rules do not let it be sent (the TLS does
    not verify the server, and no opt-out), described for messages; else None.

    Such a login is not refused: asyncpg reads the file before it dials and sends the password
    only if the server asks for one, so the guard lets through only a login that asks for none
    (trust, GSS, SSPI: `allowed_auth_methods`' `withheld`) and refuses a password request
    before anything is sent. (asyncpg calls a callable password before it dials, not when the
    server asks: it cannot hold the password back itself.)"""
    if (kind is not None or (service is not None and service.has_password) or setting.verified
            or unprotected_allowed(config)):
        return None
    env = os.environ
    # asyncpg's order: the option, the DSN's, the service's.
    path = passfile_path(config.connect_kwargs.get("passfile") or passfile.passfile
                         or (service.passfile if service is not None else None), env)
    remote = [h for h in hosts if not _local(h)]
    if remote and has_password_for(path, remote, passfile.ports, passfile.target.database,
                                   passfile.target.user):
        return f"the password asyncpg reads for {remote[0]} from {path}"
    return None


def missing_password_hint(config: PoolConfig, hosts: Sequence[str], service: Service | None,
                          passfile: PassfileLogin) -> str:
    """What to do about a refused login that had no password but what the password file or the
    service may hold; "" when either holds one for it (that one may be the wrong one). asyncpg
    answers a password request with an empty password then, and the server's words are only
    "password authentication failed". For the caller that knows no other source was given."""
    if service is not None and service.has_password:
        return ""
    path = passfile_path(config.connect_kwargs.get("passfile") or passfile.passfile
                         or (service.passfile if service is not None else None), os.environ)
    user = passfile.target.user
    if has_password_for(path, hosts, passfile.ports, passfile.target.database, user):
        return ""
    where = f", the password file {path}" if path is not None else ""
    return (f"no password was given for user {user!r} (none in the DSN, password=, "
            f"PGPASSWORD{where} or credentials=) and the server asks for one: give it in one of "
            "them (postgresql://user:password@host/database), "  # pragma: allowlist secret
            "or check the user name")


@dataclass(frozen=True)
class PassfileLogin:
    """What asyncpg matches a password file's lines against: the login's first `target`, every
    port it may dial, and the DSN's ``?passfile=`` (None: the option, ``PGPASSFILE``, or
    ``~/.pgpass``)."""

    target: Target
    ports: frozenset[int]
    passfile: str | None = None


def passfile_login(dsn: ParsedDsn | None, target: Target, *, host: Any = None, port: Any = None,
                   service: Service | None = None) -> PassfileLogin:
    """The `PassfileLogin` of a login to `dsn` (its first `target`); `host`, `port`: the
    options. Its ports: every one a login may dial (`login_addresses`)."""
    ports = {target.port}
    with contextlib.suppress(ValueError):  # (then the target's: asyncpg fails such a login)
        ports.update(p for _, p in login_addresses(
            host=host, port=port, dsn_hosts=dsn.hosts if dsn else None, service=service,
            env=os.environ))
    return PassfileLogin(target, frozenset(ports), dsn.params.get("passfile") if dsn else None)


def _hosts(config: PoolConfig, dsn_hosts: Sequence[str] | None, service: Service | None,
           env: Mapping[str, str]) -> list[str]:
    # As asyncpg reads each: a host= string is one host (a comma in it is no list: the config
    # refuses one, but for a socket directory), PGHOST a list of host[:port].
    try:
        return [h for h, _ in login_hosts(
            host=config.connect_kwargs.get("host"),
            dsn_hosts=[(h, None) for h in dsn_hosts] if dsn_hosts else None,
            service=service, env=env)]
    except ValueError as exc:
        raise PoolConfigError(
            f"pool {config.name!r}: PGHOST={env.get('PGHOST')!r} cannot be read as asyncpg "
            f"reads it ({exc}), and it would fail every login: write host[:port],... "
            "([address]:port for IPv6)") from None


def service_of(config: PoolConfig, dsn_params: Mapping[str, str],
               env: Mapping[str, str] | None = None) -> Service | None:
    """The connection service section the logins use (`asyncpool.connect.service`), if any:
    its file is read here, so read it once and pass it on (`resolve_tls`, `checked_hosts`)."""
    from asyncpool.connect.service import named_service

    return named_service(dsn_params, config.connect_kwargs, os.environ if env is None else env,
                         has_dsn=bool(config.dsn))


def all_local(hosts: Iterable[str]) -> bool:
    """True when every host is this machine: a Unix socket, ``localhost`` or a loopback address."""
    return all(_local(h) for h in hosts)


def _local(host: str) -> bool:
    host = host.strip()
    if host in ("", "localhost") or host.startswith("/") or host.startswith("@"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
