"""The one TLS setting: every spelling read, conflicts refused with both named, and what it lets
credentials do. No server needed."""

from __future__ import annotations

import os
import re
import ssl
import sys
from pathlib import Path
from typing import Any
from unittest import mock

import pytest

from asyncpool import PoolConfigError
from asyncpool.config import PoolConfig
from asyncpool.connect.connector import Connector
from asyncpool.connect.tls import (
    SAFE_AUTH_METHODS,
    TlsSetting,
    all_local,
    allowed_auth_methods,
    check_credentials,
    dialled_hosts,
    parse_require_auth,
    resolve_tls,
)
from asyncpool.observer import PoolObserver
from asyncpool.testing.pki import TestPki

DSN = "postgresql://app@db.example.com:5432/app"


def _resolve(dsn: str = DSN, env: dict[str, str] | None = None, **options: Any) -> TlsSetting:
    return resolve_tls(PoolConfig(dsn=dsn, **options), environ=env or {})


def _context(*, verify: bool, hostname: bool) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = hostname
    ctx.verify_mode = ssl.CERT_REQUIRED if verify else ssl.CERT_NONE
    return ctx


@pytest.mark.parametrize(
    ("dsn_query", "options", "env", "mode", "source"),
    [
        ("", {}, {}, "prefer", "asyncpg's default: nothing set"),
        ("?sslmode=verify-full", {}, {}, "verify-full", "the DSN's sslmode"),
        ("", {"ssl": "require"}, {}, "require", "the ssl option"),
        ("", {"connect_kwargs": {"ssl": True}}, {}, "verify-full", "connect_kwargs['ssl']"),
        ("", {"connect_kwargs": {"ssl": "verify-ca"}}, {}, "verify-ca", "connect_kwargs['ssl']"),
        ("", {}, {"PGSSLMODE": "verify-full"}, "verify-full", "PGSSLMODE"),
        # The environment is a default: the pool's own setting wins, as in libpq.
        ("?sslmode=require", {}, {"PGSSLMODE": "verify-full"}, "require", "the DSN's sslmode"),
        ("?sslrootcert=system", {}, {}, "verify-full", "the DSN's sslrootcert given without a mode"),
        ("?sslmode=verify-full", {"ssl": "verify-full"}, {}, "verify-full", "the ssl option"),
    ],
)
def test_every_spelling_is_read(dsn_query: str, options: dict[str, Any], env: dict[str, str],
                                mode: str, source: str) -> None:
    setting = _resolve(DSN + dsn_query, env, **options)
    assert (setting.mode, setting.source) == (mode, source)
    assert setting.verified is (mode == "verify-full")


@pytest.mark.parametrize(
    ("dsn_query", "options", "names"),
    [
        # Repeated keys: the DSN guard refuses them (any key).
        ("?sslmode=verify-full&sslmode=disable", {}, ["query key 'sslmode' is given twice"]),
        ("?sslmode=verify-full&sslmode=verify-full", {}, ["query key 'sslmode' is given twice"]),
        ("?sslmode=verify-full", {"connect_kwargs": {"ssl": False}},
         ["connect_kwargs['ssl']=False", "the DSN's sslmode='verify-full'"]),
        ("?sslmode=disable", {"ssl": "verify-full"},
         ["the ssl option='verify-full'", "the DSN's sslmode='disable'"]),
        ("", {"ssl": "verify-full", "connect_kwargs": {"ssl": "prefer"}},
         ["the ssl option='verify-full'", "connect_kwargs['ssl']='prefer'"]),
        ("?sslmode=verify-full", {"ssl": "CERT_NONE"},
         ["<SSLContext, acts as 'require'>", "the DSN's sslmode='verify-full'"]),
        ("?sslrootcert=/a.pem&sslrootcert=/b.pem", {}, ["query key 'sslrootcert' is given twice"]),
        ("?ssl=true", {}, ["not a libpq setting", "sslmode=verify-full"]),
        ("?sslrootcert=system&sslmode=require", {}, ["needs ssl mode 'verify-full'"]),
    ],
)
def test_conflicts_are_errors_naming_both(dsn_query: str, options: dict[str, Any],
                                          names: list[str]) -> None:
    if options.get("ssl") == "CERT_NONE":
        options["ssl"] = _context(verify=False, hostname=False)
    with pytest.raises(PoolConfigError) as info:
        _resolve(DSN + dsn_query, **options)
    for name in names:
        assert name in str(info.value)


def test_two_root_certificates_that_differ_are_an_error(tmp_path: Path) -> None:
    a, b = tmp_path / "a.pem", tmp_path / "b.pem"
    a.write_text("x")
    b.write_text("x")
    with pytest.raises(PoolConfigError, match="root certificate is given twice"):
        _resolve(f"{DSN}?sslrootcert={b}", ssl_root_cert=str(a))
    assert _resolve(f"{DSN}?sslrootcert={a}", ssl_root_cert=str(a)).root_cert == str(a)


def test_a_root_certificate_with_a_context_is_an_error(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("x")
    with pytest.raises(PoolConfigError, match="load the CA into the context"):
        _resolve(ssl=_context(verify=True, hostname=True), ssl_root_cert=str(ca))


def test_pgsslrootcert_is_used_when_nothing_else_names_one() -> None:
    setting = _resolve(f"{DSN}?sslmode=verify-full", {"PGSSLROOTCERT": "/etc/ca.pem"})
    assert (setting.root_cert, setting.root_cert_source) == ("/etc/ca.pem", "PGSSLROOTCERT")


def test_asyncpool_ssl_from_the_environment_must_agree_with_the_dsn(pki: TestPki) -> None:
    with pytest.raises(PoolConfigError, match="ASYNCPOOL_SSL=' Require' and the DSN's"):
        resolve_tls(PoolConfig.from_env({"ASYNCPOOL_SSL": " Require",
                                         "ASYNCPOOL_DSN": f"{DSN}?sslmode=verify-full"}), environ={})
    with pytest.raises(PoolConfigError, match=re.escape(
            f"ASYNCPOOL_SSL_ROOT_CERT={str(pki.ca_cert)!r} and the DSN's sslrootcert=")):
        resolve_tls(PoolConfig.from_env({"ASYNCPOOL_SSL_ROOT_CERT": str(pki.ca_cert),
                                         "ASYNCPOOL_DSN": f"{DSN}?sslrootcert=/etc/b.pem"}),
                    environ={})


@pytest.mark.parametrize(
    ("verify", "hostname", "verified", "says"),
    [
        (True, True, True, "checks the certificate and the host name"),
        (True, False, False, "checks the certificate but not the host name"),
        (False, False, False, "checks no certificate (CERT_NONE)"),
    ],
)
def test_a_context_is_judged_by_what_it_checks(verify: bool, hostname: bool, verified: bool,
                                               says: str) -> None:
    setting = _resolve(ssl=_context(verify=verify, hostname=hostname))
    assert setting.verified is verified
    assert says in setting.describe()


def test_asyncpg_is_always_given_the_setting() -> None:
    assert _resolve().driver_argument() == "prefer"
    assert _resolve(ssl="disable").driver_argument() is False
    ctx = _resolve(f"{DSN}?sslmode=verify-full").driver_argument()
    assert isinstance(ctx, ssl.SSLContext)
    assert ctx.check_hostname
    assert ctx.verify_mode == ssl.CERT_REQUIRED


@pytest.mark.parametrize(
    ("dsn", "kwargs", "env", "local"),
    [
        ("postgresql://a@localhost/db", {}, {}, True),
        ("postgresql://a@127.0.0.1:5432,[::1]:6432/db", {}, {}, True),
        ("postgresql://a@/db?host=/var/run/postgresql", {}, {}, True),
        ("postgresql://a@/db", {}, {}, True),
        ("postgresql://a@/db", {}, {"PGHOST": "db.example.com"}, False),
        ("postgresql://a@127.0.0.1,db.example.com/db", {}, {}, False),
        ("postgresql://a@localhost/db", {"host": "10.0.0.5"}, {}, False),
        ("postgresql://a@localhost.example.com/db", {}, {}, False),
    ],
)
def test_which_hosts_are_this_machine(dsn: str, kwargs: dict[str, Any], env: dict[str, str],
                                      local: bool) -> None:
    config = PoolConfig(dsn=dsn, connect_kwargs=kwargs)
    assert all_local(dialled_hosts(config, environ=env)) is local


_SERVICES = """
[remote]
host=db.example.com
port=5432
dbname=app

[remote-with-password]
host=db.example.com,127.0.0.1
password=in-the-file

[local]
host=localhost
"""


@pytest.mark.parametrize(
    ("dsn", "kwargs", "env", "hosts"),
    [
        ("postgresql://a@/db?service=remote", {}, {}, ["db.example.com"]),
        ("postgresql://a@/db", {"service": "remote"}, {}, ["db.example.com"]),
        ("postgresql://a@/db?service=local", {"service": "remote"}, {}, ["db.example.com"]),
        ("postgresql://a@/db?service=remote-with-password", {}, {},
         ["db.example.com", "127.0.0.1"]),
        ("postgresql://a@/db?service=local", {}, {"PGHOST": "db.example.com"}, ["localhost"]),
        # What the DSN or connect_kwargs name comes first, as in asyncpg.
        ("postgresql://a@127.0.0.1/db?service=remote", {}, {}, ["127.0.0.1"]),
        ("postgresql://a@/db?service=remote", {"host": "localhost"}, {}, ["localhost"]),
        # PGSERVICE, as libpq reads it (asyncpg does not), with or without a DSN.
        ("postgresql://a@/db", {}, {"PGSERVICE": "remote"}, ["db.example.com"]),
        (None, {}, {"PGSERVICE": "remote"}, ["db.example.com"]),
        (None, {"service": "remote"}, {}, ["db.example.com"]),
        ("postgresql://a@/db?service=local", {}, {"PGSERVICE": "remote"}, ["localhost"]),
    ],
)
def test_the_hosts_a_service_file_names_are_dialled_hosts(
        tmp_path: Path, dsn: str | None, kwargs: dict[str, Any], env: dict[str, str],
        hosts: list[str]) -> None:
    """A DSN's ``service`` (or connect_kwargs') reads its hosts from ``pg_service.conf`` in
    asyncpg: the credential rules must see them there too."""
    path = tmp_path / "pg_service.conf"
    path.write_text(_SERVICES)
    config = PoolConfig(dsn=dsn, connect_kwargs={"servicefile": str(path), **kwargs})
    assert dialled_hosts(config, environ=env) == hosts
    via_env = PoolConfig(dsn=dsn, connect_kwargs=kwargs)
    if "servicefile" not in kwargs:
        assert dialled_hosts(via_env, environ={**env, "PGSERVICEFILE": str(path)}) == hosts


@pytest.mark.parametrize(
    ("dsn", "kwargs", "env", "found"),
    [
        ("postgresql://a@/db?service=missing", {}, {}, True),
        ("postgresql://a@/db?service=remote", {"servicefile": "/nonexistent"}, {}, False),
        (None, {}, {"PGSERVICE": "nosuch"}, True),
    ],
)
def test_a_service_that_is_not_defined_is_refused(
        tmp_path: Path, dsn: str | None, kwargs: dict[str, Any], env: dict[str, str],
        found: bool) -> None:
    """libpq refuses a service it cannot find; asyncpg dialled its defaults (the local socket,
    as the operating system's user) and its error named that target."""
    path = tmp_path / "pg_service.conf"
    path.write_text(_SERVICES)
    config = PoolConfig(dsn=dsn, connect_kwargs={"servicefile": str(path), **kwargs})
    file = str(path) if "servicefile" not in kwargs else kwargs["servicefile"]
    expected = f"is not defined in the service file {file!r}" + ("" if found else " (no such file)")
    with pytest.raises(PoolConfigError, match=re.escape(expected)), mock.patch.dict(os.environ, env):
        Connector(config, PoolObserver())


def test_a_service_gives_the_target_and_its_tls_settings(tmp_path: Path) -> None:
    """What the service sets fills in what the DSN leaves out (the target an IAM token is
    signed for and errors name; the TLS setting the pool gives asyncpg, which then reads no
    sslmode of its own); the DSN's own keys win."""
    path = tmp_path / "pg_service.conf"
    path.write_text("[tls]\nhost=db.example.com\nport=6543\ndbname=orders\nuser=svc\n"
                    "sslmode=verify-full\nsslrootcert=system\n"
                    "[plain]\nhost=localhost\nsslmode=require\n")
    env = {"PGSERVICEFILE": str(path), "PGSERVICE": "tls"}
    with mock.patch.dict(os.environ, env):
        connector = Connector(PoolConfig(min_size=0), PoolObserver())
        assert str(connector.target) == "svc@db.example.com:6543/orders"
        assert (connector.tls.mode, connector.tls.source) == (
            "verify-full", "the sslmode of service 'tls'")
        assert connector.tls.root_cert == "system"
        ours = Connector(PoolConfig(dsn="postgresql://me@/mine"), PoolObserver())
        assert str(ours.target) == "me@db.example.com:6543/mine"
        assert ours.tls.mode == "verify-full"
        # A TLS setting given to the pool wins, as the DSN's does in libpq.
        assert Connector(PoolConfig(ssl=ssl.create_default_context()),
                         PoolObserver()).tls.mode == "verify-full"
        env["PGSERVICE"] = "plain"
        with mock.patch.dict(os.environ, env):
            assert Connector(PoolConfig(ssl="disable"), PoolObserver()).tls.mode == "disable"
            assert Connector(PoolConfig(), PoolObserver()).tls.mode == "require"


def test_a_password_to_a_service_files_remote_host_needs_verified_tls(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A password given any way (or held by the service's section itself) for a host that only
    the service file names is refused without verified TLS, before anything is dialled."""
    path = tmp_path / "pg_service.conf"
    path.write_text(_SERVICES)
    monkeypatch.setenv("PGSERVICEFILE", str(path))
    monkeypatch.delenv("PGPASSWORD", raising=False)
    for dsn, kwargs in [
        ("postgresql://app:secret@/app?service=remote", {}),  # pragma: allowlist secret
        ("postgresql://app@/app", {"service": "remote", "password": "secret"}),  # pragma: allowlist secret
        ("postgresql://app@/app?service=remote-with-password", {}),
    ]:
        with pytest.raises(PoolConfigError, match="a password is only sent to another machine"):
            Connector(PoolConfig(dsn=dsn, connect_kwargs=kwargs), PoolObserver())
    # Verified, or to this machine: allowed.
    Connector(PoolConfig(dsn="postgresql://app:secret@/app?service=local"),  # pragma: allowlist secret
              PoolObserver())
    Connector(PoolConfig(dsn="postgresql://app@/app?service=remote-with-password",
                         allow_unprotected_credentials=True), PoolObserver())


def test_a_lone_percent_in_a_service_file_is_refused_without_quoting_the_value(
        tmp_path: Path) -> None:
    """asyncpg reads pg_service.conf with configparser's interpolation: a password with a lone
    '%' made every login raise configparser's error, which quotes the value from the '%' on (and
    the frames held it). Refused when the connector is built, naming the key, not the value."""
    value = "Qz8v%wkTrailingPart"  # pragma: allowlist secret
    path = tmp_path / "pg_service.conf"
    path.write_text(f"[orders]\nhost=127.0.0.1\npassword={value}\n")
    config = PoolConfig(dsn="postgresql://app@/app?service=orders",
                        connect_kwargs={"servicefile": str(path)})
    with pytest.raises(PoolConfigError, match=r"service \[orders\]: the value of 'password' "
                                              r"holds a '%'.*write each literal '%' as '%%'") as caught:
        Connector(config, PoolObserver())
    # Its text, its chain and the locals of the frames it came through (this test's left out).
    shown = [str(caught.value), repr(caught.value.__cause__), repr(caught.value.__context__)]
    test_code = sys._getframe().f_code
    tb = caught.value.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code is not test_code:
            shown.append(repr(tb.tb_frame.f_locals))
        tb = tb.tb_next
    assert len(shown) > 3
    assert not any(value[i:i + 4] in text for text in shown for i in range(len(value) - 3))
    path.write_text(f"[orders]\nhost=127.0.0.1\npassword={value.replace('%', '%%')}\n")
    Connector(config, PoolObserver())


def test_a_service_file_asyncpg_cannot_parse_is_refused_by_line_number_only(tmp_path: Path) -> None:
    """asyncpg's reader fails at every login with configparser's ParsingError, which quotes
    the line (``password hunter2`` without its ``=``)."""
    value = "Hv3kLqTrailing"  # pragma: allowlist secret
    path = tmp_path / "pg_service.conf"
    path.write_text(f"[orders]\nhost=127.0.0.1\npassword {value}\n")
    config = PoolConfig(dsn="postgresql://app@/app?service=orders",
                        connect_kwargs={"servicefile": str(path)})
    with pytest.raises(PoolConfigError, match="ParsingError at line 3") as caught:
        Connector(config, PoolObserver())
    assert value[:4] not in str(caught.value)
    assert caught.value.__cause__ is None
    assert caught.value.__context__ is None


def test_a_service_file_is_read_as_asyncpg_reads_it(tmp_path: Path) -> None:
    """Only the keys asyncpg reads are checked for a '%' (a lone one elsewhere, as asyncpg, is
    left alone), and `%(name)s` substitutions are made as asyncpg makes them: the host below is
    this machine, so a password may go to it without TLS."""
    path = tmp_path / "pg_service.conf"
    path.write_text("[DEFAULT]\ncomment=100%\n[orders]\napplication_name=50% off\n"
                    "local=127.0.0.1\nhost=%(local)s\npassword=pw\n")
    config = PoolConfig(dsn="postgresql://app@/app?service=orders",
                        connect_kwargs={"servicefile": str(path)})
    assert dialled_hosts(config) == ["127.0.0.1"]
    Connector(config, PoolObserver())


def test_credential_rules() -> None:
    remote = PoolConfig(dsn=DSN)
    setting = resolve_tls(remote, environ={})
    with pytest.raises(PoolConfigError, match="a password is only sent to another machine"):
        check_credentials(remote, setting, "password", ["db.example.com"])
    with pytest.raises(PoolConfigError, match="an IAM token"):
        check_credentials(remote, setting, "token", ["localhost"])  # none for tokens
    check_credentials(remote, setting, "password", ["localhost", "/run/postgresql"])
    opted_out = PoolConfig(dsn=DSN, allow_unprotected_credentials=True)
    check_credentials(opted_out, setting, "token", ["db.example.com"])
    verified = resolve_tls(PoolConfig(dsn=f"{DSN}?sslmode=verify-full"), environ={})
    check_credentials(remote, verified, "token", ["db.example.com"])


def test_allowed_auth_methods() -> None:
    plain = PoolConfig(dsn=DSN)
    assert allowed_auth_methods(plain, resolve_tls(plain, environ={})) == SAFE_AUTH_METHODS
    full = PoolConfig(dsn=f"{DSN}?sslmode=verify-full")
    assert "password" in allowed_auth_methods(full, resolve_tls(full, environ={}))
    opted_out = PoolConfig(dsn=DSN, allow_unprotected_credentials=True)
    assert "md5" in allowed_auth_methods(opted_out, resolve_tls(opted_out, environ={}))
    strict = PoolConfig(dsn=f"{DSN}?sslmode=verify-full", require_auth="scram-sha-256")
    assert allowed_auth_methods(strict, resolve_tls(strict, environ={})) == {"scram-sha-256"}


def test_require_auth_syntax() -> None:
    assert parse_require_auth("!password,!md5") == SAFE_AUTH_METHODS
    assert parse_require_auth("password, scram-sha-256") == {"password", "scram-sha-256"}
    for bad in ("", "scram", "password,!md5"):
        with pytest.raises(PoolConfigError, match="require_auth="):
            parse_require_auth(bad)
    with pytest.raises(PoolConfigError, match="require_auth="):
        PoolConfig(require_auth="cleartext")
    assert PoolConfig.from_env({"ASYNCPOOL_REQUIRE_AUTH": "scram-sha-256"}).require_auth == "scram-sha-256"
    opt_out = PoolConfig.from_env({"ASYNCPOOL_ALLOW_UNPROTECTED_CREDENTIALS": "true"})
    assert opt_out.allow_unprotected_credentials


def test_repeated_tls_fields_given_directly_are_refused_with_both_values() -> None:
    """resolve_tls checks repeats itself too (for a query read by another parser)."""
    config = PoolConfig(dsn=DSN)
    with pytest.raises(PoolConfigError, match=r"sslmode 2 times \('verify-full' and 'disable'\)"):
        resolve_tls(config, [("sslmode", "verify-full"), ("sslmode", "disable")], environ={})


def test_an_asyncpg_that_reads_no_services_is_not_given_one(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """asyncpg < 0.31 has no ``service=`` argument (every login failed with a TypeError once a
    service was named): PGSERVICE beside a DSN is ignored there, as that asyncpg ignores it; a
    service the pool must read is refused, saying what to do."""
    from asyncpool.connect import service

    path = tmp_path / "pg_service.conf"
    path.write_text(_SERVICES)
    monkeypatch.setattr(service, "driver_reads_services", lambda: False)
    with mock.patch.dict(os.environ, {"PGSERVICEFILE": str(path), "PGSERVICE": "remote"}):
        connector = Connector(PoolConfig(dsn="postgresql://a@127.0.0.1/db"), PoolObserver())
        assert "service" not in connector._kwargs
        assert str(connector.target) == "a@127.0.0.1:5432/db"
        for config in (PoolConfig(min_size=0), PoolConfig(dsn="postgresql://a@/db?service=remote")):
            with pytest.raises(PoolConfigError, match=r"asyncpg >= 0\.31 does"):
                Connector(config, PoolObserver())


def test_a_service_file_that_cannot_be_read_says_so(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """configparser skips a file it cannot open, which read as "not defined"."""
    path = tmp_path / "pg_service.conf"
    path.write_text(_SERVICES)
    monkeypatch.setattr(os, "access", lambda p, mode: Path(p) != path)
    config = PoolConfig(dsn="postgresql://a@/db?service=remote",
                        connect_kwargs={"servicefile": str(path)})
    with pytest.raises(PoolConfigError, match=r"cannot be read \(permission denied\)"):
        Connector(config, PoolObserver())


# -- libpq's other TLS keywords, and the ones asyncpg cannot honour --------------------------


def test_the_context_the_pool_builds_has_the_crl_and_the_versions(
        tmp_path: Path, pki: TestPki) -> None:
    ctx = _resolve(f"{DSN}?sslmode=verify-full&sslcrl={pki.empty_crl}"
                   "&ssl_min_protocol_version=TLSv1.3").driver_argument()
    assert isinstance(ctx, ssl.SSLContext)
    assert ctx.verify_flags & ssl.VERIFY_CRL_CHECK_CHAIN
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_3
    ctx = _resolve(f"{DSN}?sslmode=verify-ca", {"PGSSLMAXPROTOCOLVERSION": "TLSv1.2"}
                   ).driver_argument()
    assert isinstance(ctx, ssl.SSLContext)
    assert (ctx.minimum_version, ctx.maximum_version) == (ssl.TLSVersion.TLSv1_2,
                                                          ssl.TLSVersion.TLSv1_2)
    assert not ctx.verify_flags & ssl.VERIFY_CRL_CHECK_CHAIN
    empty = tmp_path / "empty.crl"
    empty.write_text("")
    with pytest.raises(PoolConfigError, match=r"revocation list '.*empty\.crl' \(the DSN's "
                                              r"sslcrl\) could not be loaded.*NO_CERTIFICATE_OR_"
                                              "CRL_FOUND"):
        _resolve(f"{DSN}?sslmode=verify-full&sslcrl={empty}").driver_argument()


@pytest.mark.parametrize(
    ("dsn_query", "env", "says"),
    [
        ("?ssl_min_protocol_version=tlsv1.3", {},
         "the DSN's ssl_min_protocol_version='tlsv1.3': write one of TLSv1, TLSv1.1"),
        ("", {"PGSSLMAXPROTOCOLVERSION": "TLSv1_2"}, "PGSSLMAXPROTOCOLVERSION='TLSv1_2'"),
        ("?ssl_max_protocol_version=TLSv1.1", {},
         "ssl_max_protocol_version='TLSv1.1' is below libpq's default "
         "ssl_min_protocol_version='TLSv1.2'"),
        ("?ssl_min_protocol_version=TLSv1.3&ssl_max_protocol_version=TLSv1.2", {},
         "no TLS version is left"),
        ("?sslmode=verify-full&sslcrl=%2Fnonexistent.crl", {},
         "the DSN's sslcrl='/nonexistent.crl': no such file"),
        ("?sslmode=require", {"PGSSLCRLDIR": "/nonexistent"}, "PGSSLCRLDIR='/nonexistent': no such"),
        ("?channel_binding=require", {}, "the DSN's channel_binding='require' cannot be enforced"),
        ("", {"PGCHANNELBINDING": "require"}, "PGCHANNELBINDING='require' cannot be enforced"),
        ("?channel_binding=yes", {}, "choose one of disable, prefer, require"),
        ("?hostaddr=10.0.0.9", {}, "the DSN's hostaddr is given: asyncpg ignores hostaddr"),
        ("", {"PGHOSTADDR": "10.0.0.9"}, "PGHOSTADDR is given"),
    ],
)
def test_bad_or_unsupported_libpq_settings_are_refused(dsn_query: str, env: dict[str, str],
                                                       says: str) -> None:
    with pytest.raises(PoolConfigError) as info:
        _resolve(DSN + dsn_query, env)
    assert says in str(info.value)


#: Revocation lists libpq and asyncpg skip silently: a revocation check asked for and never made.
_CRLS_NOT_CHECKED = [
    ("?sslmode=prefer&sslcrl={crl}", {},
     "the DSN's sslcrl='{crl}': ssl mode 'prefer' (the DSN's sslmode) checks no certificate"),
    ("", {"PGSSLCRL": "{crl}"},
     "PGSSLCRL='{crl}': ssl mode 'prefer' (asyncpg's default: nothing set) checks no"),
    ("?sslmode=require", {"PGSSLCRLDIR": "{dir}"},
     "PGSSLCRLDIR='{dir}': sslmode=require checks the certificate chain only against a root "
     "certificate, and none is given"),
    ("?sslmode=require&sslcrl={crl}", {"HOME": "{dir}"},
     "sslmode=require checks the certificate chain only against a root certificate, and "
     "none is given"),
]
#: A list file given as a directory or the converse, which said "no such file" of a directory
#: that exists: the other keyword is named.
_CRLS_OF_THE_OTHER_KIND = [
    ("?sslmode=verify-full&sslcrl={dir}", {},
     "the DSN's sslcrl='{dir}' is a directory; sslcrl names one file of revocation lists: "
     "give a directory as sslcrldir="),
    ("?sslmode=verify-full", {"PGSSLCRL": "{dir}"},
     "PGSSLCRL='{dir}' is a directory; sslcrl names one file of revocation lists: give a "
     "directory as PGSSLCRLDIR"),
    ("?sslmode=verify-full&sslcrldir={crl}", {},
     "the DSN's sslcrldir='{crl}' is a file; sslcrldir names a directory of revocation "
     "lists: give a file as sslcrl="),
    ("?sslmode=verify-full", {"PGSSLCRLDIR": "{crl}"},
     "PGSSLCRLDIR='{crl}' is a file; sslcrldir names a directory of revocation lists: give "
     "a file as PGSSLCRL"),
]


@pytest.mark.parametrize(("dsn_query", "env", "says"),
                         _CRLS_NOT_CHECKED + _CRLS_OF_THE_OTHER_KIND)
def test_a_crl_that_would_not_be_checked_or_is_of_the_wrong_kind_is_refused(
        tmp_path: Path, pki: TestPki, dsn_query: str, env: dict[str, str], says: str) -> None:
    def filled(text: str) -> str:
        return text.format(crl=pki.revoked_crl, dir=tmp_path)

    with pytest.raises(PoolConfigError) as info:
        _resolve(DSN + filled(dsn_query), {k: filled(v) for k, v in env.items()})
    assert filled(says) in str(info.value)


def test_a_context_with_a_dsn_crl_or_version_is_an_error(tmp_path: Path) -> None:
    """asyncpg reads no TLS keyword of the DSN beside an ssl.SSLContext."""
    crl = tmp_path / "root.crl"
    crl.write_text("")
    context = _context(verify=True, hostname=True)
    for query in (f"?sslcrl={crl}", "?ssl_max_protocol_version=TLSv1.2"):
        with pytest.raises(PoolConfigError, match=r"is not used with an ssl\.SSLContext"):
            _resolve(DSN + query, ssl=context)
    # A revocation list's variable is a check asked for, which a context would not make.
    for variable in ("PGSSLCRL", "PGSSLCRLDIR"):
        with pytest.raises(PoolConfigError, match=f"{variable} is set, but the TLS setting is an "
                                                  r"ssl\.SSLContext, used as it is"):
            _resolve(ssl=context, env={variable: str(tmp_path)})
    # The other variables are only defaults: ignored beside a context, as PGSSLROOTCERT is.
    assert _resolve(ssl=context, env={"PGSSLMAXPROTOCOLVERSION": "TLSv1.2"}).max_version is None


def test_a_service_gives_the_handshake_settings_and_its_libpq_only_ones_are_refused(
        tmp_path: Path) -> None:
    crl = tmp_path / "root.crl"
    crl.write_text("")
    path = tmp_path / "pg_service.conf"
    path.write_text(f"[tls]\nhost=db.example.com\nsslmode=verify-full\nsslcrl={crl}\n"
                    f"sslcrldir={tmp_path}\nssl_min_protocol_version=TLSv1.3\n"
                    "channel_binding=prefer\n"
                    "[binding]\nhost=db.example.com\nchannel_binding=require\n"
                    "[addr]\nhost=db.example.com\nhostaddr=10.0.0.9\n")
    env = {"PGSERVICEFILE": str(path)}
    with mock.patch.dict(os.environ, env):
        setting = resolve_tls(PoolConfig(dsn="postgresql://a@/db?service=tls"), environ=env)
        assert (setting.crl_file, setting.crl_dir, setting.min_version) == (
            str(crl), str(tmp_path), "TLSv1.3")
        # The DSN's own key wins, as in libpq.
        assert resolve_tls(PoolConfig(
            dsn="postgresql://a@/db?service=tls&ssl_min_protocol_version=TLSv1.2"),
            environ=env).min_version == "TLSv1.2"
        with pytest.raises(PoolConfigError, match="the channel_binding of service 'binding'"):
            resolve_tls(PoolConfig(dsn="postgresql://a@/db?service=binding"), environ=env)
        with pytest.raises(PoolConfigError, match="the hostaddr of service 'addr' is given"):
            resolve_tls(PoolConfig(dsn="postgresql://a@/db?service=addr"), environ=env)


def test_asyncpg_is_not_given_what_the_pool_reads_itself(tmp_path: Path) -> None:
    """asyncpg sends a keyword it does not know to the server as a setting, which fails the
    login ("unrecognized configuration parameter")."""
    from asyncpool.connect.dsn import parse_dsn

    parsed = parse_dsn(f"{DSN}?sslmode=verify-full&channel_binding=prefer&sslcrldir={tmp_path}"
                       "&require_auth=scram-sha-256&ssl_min_protocol_version=TLSv1.3")
    assert parsed.for_asyncpg() == (
        "postgresql://app@db.example.com:5432/app?sslmode=verify-full"
        "&ssl_min_protocol_version=TLSv1.3")
    assert "channel_binding=prefer" in parsed.for_driver()  # libpq reads them itself


def test_hostaddr_is_refused_by_the_pool_and_by_the_libpq_logins_beside_it() -> None:
    """The pool judged ``localhost`` local (a password without TLS) while the bench's libpq
    contenders dialled the hostaddr."""
    from asyncpool.load.logins import GuardedLogin

    dsn = "postgresql://app:pw@localhost:5432/app?hostaddr=10.9.9.9"  # pragma: allowlist secret
    for make in (lambda: Connector(PoolConfig(dsn=dsn), PoolObserver()),
                 lambda: GuardedLogin(dsn).psycopg_args()):
        with pytest.raises(PoolConfigError, match="the DSN's hostaddr is given"):
            make()


# -- libpq's default revocation list and direct TLS ------------------------------------------


def test_the_default_root_crl_is_read_only_where_libpq_reads_it(
        tmp_path: Path, pki: TestPki) -> None:
    """~/.postgresql/root.crl, without sslcrl/sslcrldir: checked beside a root certificate file
    (as libpq), not with the system CAs (libpq 16 reads no list then), not where no chain is
    checked, not beside an ssl.SSLContext (used as it is)."""
    home = tmp_path / ".postgresql"
    home.mkdir()
    (home / "root.crl").write_bytes(pki.empty_crl.read_bytes())
    env = {"HOME": str(tmp_path)}
    for options in ({"ssl": "verify-full", "ssl_root_cert": str(pki.ca_cert)},
                    {"ssl": "verify-ca", "ssl_root_cert": str(pki.ca_cert)},
                    {"ssl": "require", "ssl_root_cert": str(pki.ca_cert)}):
        setting = _resolve(env=env, **options)
        assert (setting.crl_file, setting.crl_source) == (
            str(home / "root.crl"), "~/.postgresql/root.crl, libpq's default revocation list")
        ctx = setting.driver_argument()
        assert isinstance(ctx, ssl.SSLContext)
        assert ctx.verify_flags & ssl.VERIFY_CRL_CHECK_CHAIN
    given = _resolve(f"{DSN}?sslmode=verify-full&sslcrl={pki.revoked_crl}", env,
                     ssl_root_cert=str(pki.ca_cert))
    assert (given.crl_file, given.crl_source) == (str(pki.revoked_crl), "the DSN's sslcrl")
    assert _resolve(f"{DSN}?sslrootcert=system", env).crl_file is None
    assert _resolve(env=env).crl_file is None  # prefer
    assert _resolve(f"{DSN}?sslmode=require", env).crl_file is None  # asyncpg reads it itself
    assert _resolve(env=env, ssl=_context(verify=True, hostname=True)).crl_file is None
    with pytest.raises(PoolConfigError, match=r"~/\.postgresql/root\.crl exists.*no root "
                                              "certificate is named"):
        _resolve(f"{DSN}?sslmode=verify-full", env)
    # One that cannot be loaded is not skipped (libpq would, silently).
    (home / "root.crl").write_text("not a CRL\n")
    with pytest.raises(PoolConfigError, match=r"\(~/\.postgresql/root\.crl, libpq's default "
                                              r"revocation list\) could not be loaded"):
        _resolve(env=env, ssl="verify-full", ssl_root_cert=str(pki.ca_cert)).driver_argument()


@pytest.mark.parametrize(
    ("dsn_query", "options", "env", "says"),
    [
        ("?sslmode=verify-full&sslnegotiation=tls", {}, {},
         "the DSN's sslnegotiation='tls': choose one of postgres, direct"),
        ("?sslnegotiation=direct", {}, {}, "the DSN's sslnegotiation asks for direct TLS, which "
         "needs TLS on every connection, but the ssl mode is 'prefer'"),
        ("", {"ssl": "allow"}, {"PGSSLNEGOTIATION": "direct"},
         "PGSSLNEGOTIATION asks for direct TLS"),
        ("?sslmode=disable", {"connect_kwargs": {"direct_tls": True}}, {},
         "connect_kwargs['direct_tls'] asks for direct TLS"),
        ("?sslmode=require&sslnegotiation=postgres", {"connect_kwargs": {"direct_tls": True}},
         {}, "direct TLS is given twice and the two disagree"),
    ],
)
def test_direct_tls_that_asyncpg_would_refuse_at_each_connect_is_refused_once(
        dsn_query: str, options: dict[str, Any], env: dict[str, str], says: str) -> None:
    with pytest.raises(PoolConfigError) as info:
        _resolve(DSN + dsn_query, env, **options)
    assert says in str(info.value)


def test_direct_tls_is_read_where_asyncpg_reads_it(tmp_path: Path) -> None:
    path = tmp_path / "pg_service.conf"
    path.write_text("[direct]\nhost=db.example.com\nsslmode=require\nsslnegotiation=direct\n")
    env = {"PGSERVICEFILE": str(path)}
    with mock.patch.dict(os.environ, env):
        setting = resolve_tls(PoolConfig(dsn="postgresql://a@/db?service=direct"), environ=env)
    assert (setting.direct, setting.direct_source) == (
        True, "the sslnegotiation of service 'direct'")
    assert _resolve(f"{DSN}?sslmode=require", {"PGSSLNEGOTIATION": "direct"}).direct
    assert not _resolve(f"{DSN}?sslmode=require&sslnegotiation=postgres").direct
    assert not _resolve(f"{DSN}?sslmode=require", connect_kwargs={"direct_tls": False}).direct


# -- libpq's default root and client certificates, ~/.postgresql/ ------------------------------


def _home(tmp_path: Path, **files: bytes) -> dict[str, str]:
    """An environment whose HOME's .postgresql holds `files` (root_crt: root.crt...)."""
    directory = tmp_path / ".postgresql"
    directory.mkdir(exist_ok=True)
    for name, content in files.items():
        path = directory / name.replace("_", ".")
        path.write_bytes(content)
        path.chmod(0o600)  # (a key others may read is refused, as by libpq)
    return {"HOME": str(tmp_path)}


def test_the_default_root_cert_is_verified_against_where_the_pool_builds_the_context(
        tmp_path: Path, pki: TestPki) -> None:
    """verify-ca/verify-full without a root certificate named took the system CAs, where libpq
    takes ~/.postgresql/root.crt: a private CA there was never trusted."""
    env = _home(tmp_path, root_crt=pki.ca_cert.read_bytes())
    home_root = str(tmp_path / ".postgresql" / "root.crt")
    # require too: it checks the chain against that file (as libpq and asyncpg do), in a
    # context the pool builds (asyncpg's raised "[Errno 21] Is a directory" at every connect
    # for a root.crt that could not be loaded, naming no file).
    for query in ("?sslmode=verify-full", "?sslmode=verify-ca", "?sslmode=require"):
        setting = _resolve(DSN + query, env)
        assert (setting.root_cert, setting.root_cert_source) == (
            home_root, "~/.postgresql/root.crt, libpq's default root certificate")
        assert isinstance(setting.driver_argument(), ssl.SSLContext)
    # A root certificate named anywhere wins, as in libpq; sslrootcert=system takes none.
    assert _resolve(f"{DSN}?sslmode=verify-full",
                    {**env, "PGSSLROOTCERT": str(pki.ca_cert)}).root_cert == str(pki.ca_cert)
    assert _resolve(f"{DSN}?sslmode=verify-full", env,
                    ssl_root_cert=str(pki.other_ca_cert)).root_cert == str(pki.other_ca_cert)
    assert _resolve(f"{DSN}?sslrootcert=system", env).root_cert == "system"
    require = _resolve(f"{DSN}?sslmode=require", env).driver_argument()
    assert isinstance(require, ssl.SSLContext)
    assert (require.verify_mode, require.check_hostname) == (ssl.CERT_REQUIRED, False)
    # So a revocation list directory is checked there too (asyncpg's context read none).
    crls = _resolve(f"{DSN}?sslmode=require", {**env, "PGSSLCRLDIR": str(tmp_path)})
    assert crls.crl_dir == str(tmp_path)
    assert isinstance(ctx := crls.driver_argument(), ssl.SSLContext)
    assert ctx.verify_flags & ssl.VERIFY_CRL_CHECK_CHAIN
    # prefer (the default) checks no chain: not read.
    assert _resolve(env=env).root_cert is None
    assert _resolve(env=env, ssl=_context(verify=True, hostname=True)).root_cert is None
    # Absent: the system CAs, as before (where libpq would fail).
    assert _resolve(f"{DSN}?sslmode=verify-full", {"HOME": str(tmp_path / "none")}
                    ).root_cert is None
    # Beside it, the default revocation list is checked, as libpq does.
    _home(tmp_path, root_crl=pki.empty_crl.read_bytes())
    assert _resolve(f"{DSN}?sslmode=verify-full", env).crl_file == str(
        tmp_path / ".postgresql" / "root.crl")


def test_the_default_client_certificate_is_presented_where_both_files_exist(
        tmp_path: Path, pki: TestPki) -> None:
    """The context the pool built for verify-ca/verify-full presented no client certificate
    unless sslcert was given; libpq and asyncpg present ~/.postgresql/postgresql.crt."""
    cert, key = pki.server_cert.read_bytes(), pki.server_key.read_bytes()
    env = _home(tmp_path, postgresql_crt=cert, postgresql_key=key)
    directory = tmp_path / ".postgresql"
    for query in ("?sslmode=verify-full", "?sslmode=require", ""):
        setting = _resolve(DSN + query, env)
        assert (setting.client_cert, setting.client_key, setting.client_cert_source) == (
            str(directory / "postgresql.crt"), str(directory / "postgresql.key"),
            "~/.postgresql/postgresql.crt, libpq's default client certificate")
    ctx = _resolve(f"{DSN}?sslmode=verify-full", env).driver_argument()
    assert isinstance(ctx, ssl.SSLContext)
    # Named ones win; the default key goes with a named certificate, as in libpq and asyncpg.
    named = _resolve(f"{DSN}?sslmode=verify-full&sslcert=%2Fa.crt", env)
    assert (named.client_cert, named.client_key) == ("/a.crt", str(directory / "postgresql.key"))
    assert _resolve(f"{DSN}?sslmode=verify-full", {**env, "PGSSLKEY": "/b.key"}
                    ).client_key == "/b.key"
    # No TLS, or a context used as it is: not read.
    assert _resolve(f"{DSN}?sslmode=disable", env).client_cert is None
    assert _resolve(env=env, ssl=_context(verify=True, hostname=True)).client_cert is None
    # A certificate without its key: refused, as libpq refuses it.
    (directory / "postgresql.key").unlink()
    with pytest.raises(PoolConfigError, match=r"~/\.postgresql/postgresql\.crt exists .*but its "
                                              r"key ~/\.postgresql/postgresql\.key does not"):
        _resolve(f"{DSN}?sslmode=verify-full", env)
    assert _resolve(f"{DSN}?sslmode=verify-full", {**env, "PGSSLKEY": "/b.key"}
                    ).client_cert == str(directory / "postgresql.crt")


@pytest.mark.parametrize("mode", [0o644, 0o604, 0o660])
def test_a_private_key_others_may_read_is_refused(tmp_path: Path, mode: int) -> None:
    """libpq refuses a client key with group or world access (0640 at most for root's);
    asyncpg loaded it as it was."""
    key = tmp_path / "client.key"
    key.write_bytes(b"not read")
    key.chmod(mode)
    dsn = f"postgresql://app@db.example.com/db?sslmode=verify-full&sslcert=/a.crt&sslkey={key}"
    with pytest.raises(PoolConfigError, match=r"has group or world access .*chmod 600"):
        resolve_tls(PoolConfig(dsn=dsn), environ={})
    key.chmod(0o600)
    assert resolve_tls(PoolConfig(dsn=dsn), environ={}).client_key == str(key)
    # With TLS off nothing is loaded, so nothing is refused.
    key.chmod(mode)
    off = dsn.replace("verify-full", "disable")
    assert resolve_tls(PoolConfig(dsn=off), environ={}).mode == "disable"


@pytest.mark.parametrize("mode", [0o700, 0o400])
def test_a_private_key_only_its_owner_may_use_is_taken_as_libpq_takes_it(
        tmp_path: Path, mode: int) -> None:
    """libpq refuses group and world bits only (u=rwx passes): 0700 was refused as "can be
    read by other users", where libpq and asyncpg loaded it."""
    key = tmp_path / "client.key"
    key.write_bytes(b"not read")
    key.chmod(mode)
    dsn = f"postgresql://app@db.example.com/db?sslmode=verify-full&sslcert=/a.crt&sslkey={key}"
    assert resolve_tls(PoolConfig(dsn=dsn), environ={}).client_key == str(key)


def test_client_certificate_settings_beside_a_context(tmp_path: Path) -> None:
    """A context is used as it is (asyncpg reads no sslcert beside it): a DSN's sslcert was
    dropped without a word, and a PGSSLKEY others may read, which nothing loads, was refused."""
    context = _context(verify=True, hostname=True)
    for query in ("?sslcert=/a.crt", "?sslkey=/a.key", "?sslpassword=Zq8-passphrase"):
        with pytest.raises(PoolConfigError, match=r"is not used with an ssl\.SSLContext .*"
                                                  r"load_cert_chain") as info:
            _resolve(DSN + query, ssl=context)
        assert "Zq8" not in str(info.value)
    key = tmp_path / "client.key"
    key.write_bytes(b"not read")
    key.chmod(0o644)
    # The variables are only defaults, ignored beside a context, as PGSSLROOTCERT is.
    setting = _resolve(ssl=context, env={"PGSSLCERT": "/a.crt", "PGSSLKEY": str(key)})
    assert (setting.client_cert, setting.client_key) == (None, None)
    # Nor is a key refused that goes with no certificate (libpq checks the key it loads).
    assert _resolve(f"{DSN}?sslmode=require", {"PGSSLKEY": str(key)}).client_key is None


def test_a_root_cert_of_libpq_that_cannot_be_loaded_is_refused_in_require(
        tmp_path: Path, pki: TestPki) -> None:
    """require reads ~/.postgresql/root.crt (libpq and asyncpg): a directory, an empty file or
    one that is not PEM failed every connect with asyncpg's "[Errno 21] Is a directory" or
    "TLS failed (... no certificate or crl found)", naming no file."""
    env = _home(tmp_path, root_crt=b"not a certificate\n")
    for content in (b"not a certificate\n", b""):
        (tmp_path / ".postgresql" / "root.crt").write_bytes(content)
        with pytest.raises(PoolConfigError, match=r"the root certificate '.*/\.postgresql/root\."
                                                  r"crt' \(~/\.postgresql/root\.crt, libpq's "
                                                  r"default root certificate\) could not be "
                                                  r"loaded as a PEM CA bundle"):
            _resolve(f"{DSN}?sslmode=require", env).driver_argument()
    (tmp_path / ".postgresql" / "root.crt").unlink()
    (tmp_path / ".postgresql" / "root.crt").mkdir()
    with pytest.raises(PoolConfigError, match="IsADirectoryError"):
        _resolve(f"{DSN}?sslmode=require", env).driver_argument()


@pytest.mark.parametrize("how", ["unsearchable", "symlink loop"])
def test_a_postgresql_directory_that_cannot_be_looked_into_is_refused_naming_it(
        tmp_path: Path, how: str) -> None:
    """~/.postgresql this user may not search: Path.exists() raised PermissionError out of the
    pool's constructor (and `asyncpool bench`/`doctor`); one that loops took the system CAs
    without a word, where libpq fails. (Root may search anything: the first case needs
    another user.)"""
    directory = tmp_path / ".postgresql"
    if how == "unsearchable":
        if os.geteuid() == 0:
            pytest.skip("root may look into any directory (checked by hand as another user)")
        directory.mkdir()
        directory.chmod(0)
        reason = "Permission denied"
    else:
        directory.symlink_to(directory)
        reason = "Too many levels of symbolic links"
    try:
        for mode in ("verify-full", "require", "prefer"):
            with pytest.raises(PoolConfigError) as info:
                _resolve(f"{DSN}?sslmode={mode}", {"HOME": str(tmp_path)})
            message = str(info.value)
            assert f"~/.postgresql/root.crt ({directory}/root.crt)" in message or (
                mode == "prefer" and f"~/.postgresql/postgresql.key ({directory}/" in message)
            assert f"could not be looked at ({reason})" in message
            assert f"give this user access to {directory}" in message
    finally:
        if how == "unsearchable":
            directory.chmod(0o700)


@pytest.mark.parametrize("mode", ["disable", "allow", "prefer", "require", "verify-ca",
                                  "verify-full", None])
def test_sslrootcert_system_takes_the_modes_libpq_takes(mode: str | None) -> None:
    """libpq 16+ (psycopg's, here) refuses ``sslrootcert=system`` beside any mode but
    verify-full ("weak sslmode"), and reads it alone as verify-full: the pool does the same."""
    import psycopg

    if psycopg.pq.version() < 160000:
        pytest.skip("psycopg's libpq is older than 16: it does not read sslrootcert=system")
    query = "sslrootcert=system" + (f"&sslmode={mode}" if mode else "")
    try:
        # Port 1 on this machine: libpq checks the settings before it dials, then is refused.
        psycopg.connect(f"host=127.0.0.1 port=1 dbname=app user=app connect_timeout=2 "
                        f"{query.replace('&', ' ')}").close()
    except psycopg.OperationalError as exc:
        libpq_refused = "weak sslmode" in str(exc)
    else:  # pragma: no cover - nothing listens on port 1
        pytest.fail("a login to port 1 succeeded")
    if libpq_refused:
        with pytest.raises(PoolConfigError, match="needs ssl mode 'verify-full'"):
            _resolve(f"{DSN}?{query}")
    else:
        assert _resolve(f"{DSN}?{query}").mode == "verify-full"
    assert libpq_refused == (mode not in ("verify-full", None))
