"""Issue #23's table, against a fake server on 127.0.0.1 that plays a man in the middle: it refuses
TLS or offers a certificate that does not verify, then asks for a cleartext password (or an MD5
hash) and records what it is sent. In every row nothing secret reaches it unless the pool was told
so by name (`allow_unprotected_credentials`, `require_auth`), and then it does."""

from __future__ import annotations

import json
import ssl
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

from asyncpool import (
    AuthenticationError,
    AuthMethodRefusedError,
    ConnectError,
    IamAuth,
    Pool,
    PoolConfig,
    PoolConfigError,
    SecretsManagerAuth,
    StaticPassword,
)
from asyncpool.testing.aws_endpoint import LocalAwsEndpoint
from asyncpool.testing.mitm import FakeServer
from asyncpool.testing.pki import TestPki

SECRET = "pw/with:every@special?#&%char s+é"  # pragma: allowlist secret
ESCAPED = "pw%2Fwith%3Aevery%40special%3F%23%26%25char%20s%2B%C3%A9"


@pytest.fixture(params=["refuse", "self-signed"], ids=["tls-refused", "self-signed-cert"])
async def fake(request: pytest.FixtureRequest) -> AsyncIterator[FakeServer]:
    async with FakeServer(tls=request.param) as server:
        yield server


def _pool(dsn: str, **options: Any) -> Pool:
    options.setdefault("telemetry", False)
    return Pool(dsn, min_size=1, max_size=1, connect_timeout=5, acquire_timeout=5, **options)


def _iam(**options: Any) -> IamAuth:
    return IamAuth(region="us-east-1", **options)


def _tokens(fake: FakeServer) -> list[str]:
    return [r for r in fake.received if "X-Amz-Signature" in r]


# -- row 1: default ssl mode, a password in the DSN or StaticPassword ---------------------------


@pytest.mark.parametrize("spelling", ["dsn", "static", "connect_kwargs"])
@pytest.mark.parametrize("auth", ["password", "md5"])
@pytest.mark.parametrize("tls", ["refuse", "self-signed"])
@pytest.mark.parametrize("statements", ["unnamed", "off"])
async def test_default_ssl_with_a_password_sends_nothing(spelling: str, auth: str, tls: str,
                                                         statements: str) -> None:
    """Default ssl mode (prefer): over the self-signed TLS, and over the plain connection asyncpg
    falls back to when TLS is refused; with and without the one-round-trip interceptor."""
    async with FakeServer(tls=tls, auth=auth) as fake:  # type: ignore[arg-type]
        dsn = f"postgresql://app@127.0.0.1:{fake.port}/app"
        options: dict[str, Any] = {}
        if spelling == "dsn":
            dsn = f"postgresql://app:{ESCAPED}@127.0.0.1:{fake.port}/app"
        elif spelling == "static":
            options["credentials"] = StaticPassword(SECRET)
        else:
            options["connect_kwargs"] = {"password": SECRET}
        with pytest.raises(AuthMethodRefusedError) as info:
            await _pool(dsn, prepared_statements=statements, **options).open()
    assert fake.logins  # it was dialled (a local server: the password may be used for SCRAM)
    assert fake.received == []
    message = str(info.value)
    assert f"require_auth='{auth},scram-sha-256'" in message
    assert "ssl='verify-full'" in message
    assert SECRET not in message
    assert info.value.method == auth
    assert info.value.transient is False


async def test_password_over_plain_tcp_to_a_refusing_server_sends_nothing(
    fake: FakeServer,
) -> None:
    with pytest.raises(AuthMethodRefusedError, match="cleartext password"):
        await _pool(f"postgresql://app:{ESCAPED}@localhost:{fake.port}/app",
                    ssl="disable").open()
    assert fake.received == []


@pytest.mark.parametrize("spelling", ["dsn", "static"])
def test_a_password_to_another_machine_needs_verified_tls(spelling: str) -> None:
    dsn = "postgresql://app@db.internal.example:5432/app"
    options: dict[str, Any] = {}
    if spelling == "dsn":
        dsn = f"postgresql://app:{ESCAPED}@db.internal.example:5432/app"
    else:
        options["credentials"] = StaticPassword(SECRET)
    with pytest.raises(PoolConfigError, match="a password is only sent to another machine") as info:
        from asyncpool.connect.connector import Connector
        from asyncpool.observer import PoolObserver

        Connector(_pool(dsn, **options).config, PoolObserver())
    assert "allow_unprotected_credentials=True" in str(info.value)
    assert SECRET not in str(info.value)


@pytest.mark.parametrize("line", [
    "db.internal.example:5432:app:app:{}", "*:*:*:*:{}", "db.internal.example:*:*:app:{}",
    "other.example:5432:app:app:x\ndb.internal.example:5432:app:app:{}",
])
@pytest.mark.parametrize("passfile", ["PGPASSFILE", "dsn", "connect_kwargs", "service"])
def test_a_pgpass_password_to_another_machine_needs_verified_tls(
    line: str, passfile: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """asyncpg reads a password from ~/.pgpass (or PGPASSFILE, or ``passfile``) itself when the
    pool gives it none: that password falls under the same rule as the DSN's, for the pool and
    for doctor's and bench's logins (`Login`). It is held back, not refused before dialling:
    only a server that asks for no password is let in (tests/test_pgpass_withheld.py)."""
    from asyncpool.connect.authguard import Login
    from asyncpool.connect.connector import Connector
    from asyncpool.connect.dsn import parse_dsn
    from asyncpool.observer import PoolObserver

    path = tmp_path / "pgpass"
    path.write_text(line.format(SECRET.replace("\\", "\\\\").replace(":", "\\:")) + "\n")
    path.chmod(0o600)
    dsn = "postgresql://app@db.internal.example:5432/app"
    options: dict[str, Any] = {}
    monkeypatch.delenv("PGPASSWORD", raising=False)
    if passfile == "PGPASSFILE":
        monkeypatch.setenv("PGPASSFILE", str(path))
    elif passfile == "dsn":
        dsn += f"?passfile={quote(str(path), safe='')}"
    elif passfile == "service":
        (tmp_path / "services").write_text(f"[s]\npassfile={path}\n")
        monkeypatch.setenv("PGSERVICEFILE", str(tmp_path / "services"))
        dsn += "?service=s"
    else:
        options["connect_kwargs"] = {"passfile": str(path)}
    connector = Connector(_pool(dsn, **options).config, PoolObserver())
    assert connector.withheld == f"the password asyncpg reads for db.internal.example from {path}"
    assert connector.auth_methods == {"none", "gss", "sspi"}
    if not options:  # (doctor and bench take no connect_kwargs)
        login = Login(PoolConfig(), parse_dsn(dsn))
        assert login.withheld == connector.withheld
        assert login.allowed == connector.auth_methods


@pytest.mark.parametrize("why", ["another host", "another user", "another port", "verify-full",
                                 "group-readable", "opted out"])
def test_a_pgpass_without_a_password_for_the_login_lets_the_pool_open(
    why: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, pki: TestPki,
) -> None:
    from asyncpool.connect.connector import Connector
    from asyncpool.observer import PoolObserver

    line = {"another host": "db.other.example:5432:app:app:x",
            "another user": "db.internal.example:5432:app:admin:x",
            "another port": "db.internal.example:5433:app:app:x"}.get(why, "*:*:*:*:x")
    path = tmp_path / "pgpass"
    path.write_text(line + "\n")
    path.chmod(0o640 if why == "group-readable" else 0o600)  # asyncpg ignores a readable file
    monkeypatch.setenv("PGPASSFILE", str(path))
    monkeypatch.delenv("PGPASSWORD", raising=False)
    options: dict[str, Any] = {}
    if why == "verify-full":
        options.update(ssl="verify-full", ssl_root_cert=str(pki.ca_cert))
    if why == "opted out":
        options["allow_unprotected_credentials"] = True
    connector = Connector(
        _pool("postgresql://app@db.internal.example:5432/app", **options).config, PoolObserver())
    assert connector.withheld is None


@pytest.mark.parametrize("where", ["option", "dsn"])
async def test_the_documented_opt_in_sends_the_password(fake: FakeServer, where: str) -> None:
    """require_auth names the method: then the fake server gets the password (as chosen)."""
    dsn = f"postgresql://app:{ESCAPED}@127.0.0.1:{fake.port}/app"
    options: dict[str, Any] = {}
    if where == "dsn":
        dsn += "?require_auth=password,scram-sha-256"
    else:
        options["require_auth"] = "password,scram-sha-256"
    with pytest.raises(AuthenticationError):
        await _pool(dsn, **options).open()
    assert fake.received == [SECRET]


def test_require_auth_given_twice_must_agree() -> None:
    from asyncpool.connect.connector import Connector
    from asyncpool.observer import PoolObserver

    config = _pool("postgresql://app@localhost/app?require_auth=password",
                   require_auth="scram-sha-256").config
    with pytest.raises(PoolConfigError, match="require_auth is given twice"):
        Connector(config, PoolObserver())


# -- rows 2-7: IamAuth -------------------------------------------------------------------------


IAM_REFUSED: list[tuple[str, str, dict[str, Any], str]] = [
    ("default", "", {}, "ssl mode 'prefer'"),
    ("ssl=require", "", {"ssl": "require"}, "ssl mode 'require' (the ssl option)"),
    ("?sslmode=require", "?sslmode=require", {}, "ssl mode 'require' (the DSN's sslmode)"),
    ("ssl=False", "", {"ssl": "disable"}, "ssl mode 'disable'"),
    ("kwargs ssl=False", "", {"connect_kwargs": {"ssl": False}}, "ssl mode 'disable'"),
    ("sslmode twice", "?sslmode=verify-full&sslmode=disable", {},
     "query key 'sslmode' is given twice"),
    ("DSN verify-full, kwargs ssl=False", "?sslmode=verify-full",
     {"connect_kwargs": {"ssl": False}},
     "connect_kwargs['ssl']=False and the DSN's sslmode='verify-full'"),
]


@pytest.mark.parametrize(("dsn_query", "options", "says"),
                         [row[1:] for row in IAM_REFUSED], ids=[row[0] for row in IAM_REFUSED])
async def test_iam_without_verified_tls_is_refused_before_dialling(
    aws: None, fake: FakeServer, dsn_query: str, options: dict[str, Any], says: str
) -> None:
    # A DSN refused on its own (a key given twice) is refused as the pool is made, the
    # others when it opens: before anything is sent either way.
    with pytest.raises(PoolConfigError) as info:
        pool = _pool(f"postgresql://iam_user@localhost:{fake.port}/app{dsn_query}",
                     credentials=_iam(), **options)
        await pool.open()
    assert says in str(info.value)
    assert fake.logins == []
    assert fake.received == []


async def test_iam_with_an_sslcontext_that_checks_nothing_is_refused(
    aws: None, fake: FakeServer
) -> None:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    pool = _pool(f"postgresql://iam_user@localhost:{fake.port}/app", credentials=_iam(),
                 ssl=context)
    with pytest.raises(PoolConfigError, match=r"an ssl\.SSLContext that checks no certificate"):
        await pool.open()
    assert fake.received == []


async def test_iam_with_an_sslcontext_that_skips_the_host_name_is_refused(aws: None) -> None:
    context = ssl.create_default_context()
    context.check_hostname = False
    pool = _pool("postgresql://iam_user@localhost:5/app", credentials=_iam(), ssl=context)
    with pytest.raises(PoolConfigError, match="checks the certificate but not the host name"):
        await pool.open()


async def test_iam_with_verify_full_gives_nothing_to_an_impostor(
    aws: None, fake: FakeServer, pki: TestPki
) -> None:
    pool = _pool(f"postgresql://iam_user@localhost:{fake.port}/app", credentials=_iam(),
                 ssl="verify-full", ssl_root_cert=str(pki.ca_cert))
    with pytest.raises(ConnectError) as info:
        await pool.open()
    expected = "does not accept TLS" if fake.tls == "refuse" else "did not verify"
    assert expected in str(info.value)
    assert fake.received == []


# -- the documented unprotected setting --------------------------------------------------------


@pytest.mark.parametrize("ssl_mode", ["disable", "prefer", "require"])
async def test_allow_unprotected_credentials_sends_the_token_once(
    aws: None, fake: FakeServer, ssl_mode: str
) -> None:
    if ssl_mode == "require" and fake.tls == "refuse":
        pytest.skip("require against a server without TLS never logs in")
    pool = _pool(f"postgresql://iam_user@localhost:{fake.port}/app", credentials=_iam(),
                 ssl=ssl_mode, allow_unprotected_credentials=True)
    with pytest.raises(AuthenticationError):
        await pool.open()
    # Chosen by name, so the token went; but a refused one is not followed by a second to a
    # server nobody verified.
    assert len(_tokens(fake)) == 1
    assert len(fake.received) == 1


async def test_deprecated_allow_iam_without_tls_still_opts_out(aws: None) -> None:
    async with FakeServer(tls="refuse") as fake:
        with pytest.warns(DeprecationWarning, match="allow_unprotected_credentials"):
            pool = _pool(f"postgresql://iam_user@localhost:{fake.port}/app",
                         credentials=_iam(), ssl="disable", allow_iam_without_tls=True)
        with pytest.raises(AuthenticationError):
            await pool.open()
    assert len(_tokens(fake)) == 1


# -- a verified server -------------------------------------------------------------------------


@pytest.fixture
async def verified_fake(pki: TestPki) -> AsyncIterator[FakeServer]:
    """The fake server with a certificate the test CA signed for "localhost": it verifies."""
    async with FakeServer(tls="certificate", certfile=pki.server_cert,
                          keyfile=pki.server_key) as server:
        yield server


async def test_a_refused_token_is_retried_once_to_the_same_verified_server(
    aws: None, verified_fake: FakeServer, pki: TestPki
) -> None:
    pool = _pool(f"postgresql://iam_user@localhost:{verified_fake.port}/app",
                 credentials=_iam(), ssl="verify-full", ssl_root_cert=str(pki.ca_cert))
    with pytest.raises(AuthenticationError, match="rejected twice"):
        await pool.open()
    tokens = _tokens(verified_fake)
    assert len(tokens) == 2
    assert tokens[0] != tokens[1] or len(set(tokens)) == 1  # signed per attempt
    assert all(login.tls for login in verified_fake.logins)


async def test_over_verified_tls_a_cleartext_request_is_answered(
    verified_fake: FakeServer, pki: TestPki
) -> None:
    with pytest.raises(AuthenticationError):
        await _pool(f"postgresql://app:{ESCAPED}@localhost:{verified_fake.port}/app",
                    ssl="verify-full", ssl_root_cert=str(pki.ca_cert)).open()
    assert verified_fake.received == [SECRET]


async def test_require_auth_refuses_cleartext_even_over_verified_tls(
    verified_fake: FakeServer, pki: TestPki
) -> None:
    with pytest.raises(AuthMethodRefusedError) as info:
        await _pool(f"postgresql://app:{ESCAPED}@localhost:{verified_fake.port}/app",
                    ssl="verify-full", ssl_root_cert=str(pki.ca_cert),
                    require_auth="scram-sha-256").open()
    assert "require_auth='scram-sha-256' does not allow" in str(info.value)
    assert verified_fake.received == []


@pytest.mark.parametrize("where", ["dsn", "service", "env", "home"])
async def test_a_crl_that_revokes_the_certificate_gets_no_password(
    verified_fake: FakeServer, pki: TestPki, where: str, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The pool gave asyncpg a context of its own for verify-full, and asyncpg then reads no
    sslcrl: a password went to a server whose certificate the CRL revoked."""
    query = f"sslmode=verify-full&sslrootcert={quote(str(pki.ca_cert), safe='')}"
    if where == "dsn":
        query += f"&sslcrl={quote(str(pki.revoked_crl), safe='')}"
    elif where == "service":
        path = tmp_path / "pg_service.conf"
        path.write_text(f"[fake]\nsslcrl={pki.revoked_crl}\n")
        query += "&service=fake"
        monkeypatch.setenv("PGSERVICEFILE", str(path))
    elif where == "env":
        monkeypatch.setenv("PGSSLCRL", str(pki.revoked_crl))
    else:  # libpq's default list, ~/.postgresql/root.crl, which the pool did not read
        (tmp_path / ".postgresql").mkdir()
        (tmp_path / ".postgresql" / "root.crl").write_bytes(pki.revoked_crl.read_bytes())
        monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(ConnectError, match="certificate revoked"):
        await _pool(f"postgresql://app:{ESCAPED}@localhost:{verified_fake.port}/app?{query}").open()
    assert verified_fake.received == []


async def test_channel_binding_require_is_refused_before_dialling(
    verified_fake: FakeServer, pki: TestPki
) -> None:
    """asyncpg has no SCRAM-SHA-256-PLUS: the pool answered the fake's cleartext request."""
    with pytest.raises(PoolConfigError, match="asyncpg cannot do channel binding") as info:
        await _pool(f"postgresql://app:{ESCAPED}@localhost:{verified_fake.port}/app"
                    "?channel_binding=require", ssl="verify-full",
                    ssl_root_cert=str(pki.ca_cert)).open()
    assert "require_auth=scram-sha-256" in str(info.value)
    assert verified_fake.logins == []


async def test_no_second_token_when_the_dsn_lists_several_hosts(
    aws: None, verified_fake: FakeServer, pki: TestPki
) -> None:
    """A token is signed for one host: beside several, refused before any is signed (asyncpg
    would send the first host's to the others). With token_host= (one endpoint they all stand
    for), which host refused the first token is not known: the retry would go elsewhere."""
    port = verified_fake.port
    dsn = f"postgresql://iam_user@localhost:{port},localhost:{port}/app"
    pool = _pool(dsn, credentials=_iam(), ssl="verify-full", ssl_root_cert=str(pki.ca_cert))
    with pytest.raises(PoolConfigError, match="signs its token for one host"):
        await pool.open()
    assert _tokens(verified_fake) == []
    pool = _pool(dsn, credentials=_iam(token_host="localhost"), ssl="verify-full",
                 ssl_root_cert=str(pki.ca_cert))
    with pytest.raises(AuthenticationError):
        await pool.open()
    assert len(_tokens(verified_fake)) == 1


# -- asyncpool doctor logs in by the same rules -------------------------------------------------


async def test_doctor_gives_an_impostor_nothing(fake: FakeServer) -> None:
    import io
    import json

    from asyncpool.cli.doctor import doctor

    out = io.StringIO()
    code = await doctor(f"postgresql://app:{ESCAPED}@127.0.0.1:{fake.port}/app", None, 5.0, True,
                        out)
    assert code == 2
    assert fake.received == []
    report = json.loads(out.getvalue())
    assert "cleartext password" in report["facts"]["connect_error"]
    assert SECRET not in out.getvalue()


async def test_doctor_refuses_a_password_to_another_machine_without_verified_tls() -> None:
    import io

    from asyncpool.cli.doctor import doctor

    out = io.StringIO()
    code = await doctor(f"postgresql://app:{ESCAPED}@db.internal.example:5432/app", None, 5.0,
                        False, out)
    assert code == 2
    assert "a password is only sent to another machine" in out.getvalue()
    assert SECRET not in out.getvalue()


# -- a password from Secrets Manager: the rules of any password ---------------------------------


@pytest.fixture(scope="module")
def local_aws() -> Iterator[LocalAwsEndpoint]:
    with LocalAwsEndpoint() as endpoint:
        yield endpoint


async def _secret_auth(local_aws: LocalAwsEndpoint) -> SecretsManagerAuth:
    from aiobotocore.session import AioSession

    name = f"mitm/{uuid.uuid4().hex}"
    async with AioSession().create_client("secretsmanager", region_name="us-east-1",
                                          endpoint_url=local_aws.url) as client:
        await client.create_secret(Name=name, SecretString=json.dumps(
            {"username": "app", "password": SECRET, "host": "db.internal.example"}))
    return SecretsManagerAuth(name, region="us-east-1", endpoint_url=local_aws.url)


@pytest.mark.parametrize("mode", ["prefer", "require", "disable", "verify-ca"])
async def test_a_secrets_manager_password_to_another_machine_needs_verified_tls(
    aws: None, local_aws: LocalAwsEndpoint, mode: str
) -> None:
    """Refused at open(), before the secret is read (its `host` field changes nothing: the pool
    dials the DSN's host)."""
    auth = await _secret_auth(local_aws)
    reads = local_aws.count("GetSecretValue")
    pool = _pool(f"postgresql://app@db.internal.example:5432/app?sslmode={mode}",
                 credentials=auth)
    with pytest.raises(PoolConfigError, match="a password is only sent to another machine"):
        await pool.open()
    assert local_aws.count("GetSecretValue") == reads
    await auth.close()


@pytest.mark.parametrize("mode", ["prefer", "require", "disable"])
@pytest.mark.parametrize("asks", ["password", "md5"])
async def test_a_secrets_manager_password_to_an_unverified_local_server_is_not_sent(
    aws: None, local_aws: LocalAwsEndpoint, mode: str, asks: str
) -> None:
    """To this machine without verified TLS the secret's password serves SCRAM only: a server
    asking for it in clear (or MD5) gets nothing (with `prefer`, asyncpg's fallback to plain TCP
    neither)."""
    async with FakeServer(tls="self-signed", auth=asks) as fake:  # type: ignore[arg-type]
        auth = await _secret_auth(local_aws)
        pool = _pool(f"postgresql://app@127.0.0.1:{fake.port}/app?sslmode={mode}",
                     credentials=auth)
        with pytest.raises(AuthMethodRefusedError):
            await pool.open()
        await auth.close()
    assert fake.logins
    assert fake.received == []
