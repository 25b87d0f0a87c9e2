"""IamAuth: tokens really signed (checked with an independent SigV4 implementation), one per new
connection, retried once when refused, refused without TLS, and clear errors for bad AWS setup."""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import hmac
import logging
import secrets
from collections.abc import Iterator
from typing import Any
from urllib.parse import parse_qsl, quote, urlsplit

import asyncpg
import pytest

from asyncpool import (
    AuthenticationError,
    ConnectError,
    CredentialsError,
    IamAuth,
    Pool,
    PoolConfigError,
    Target,
)
from asyncpool.config import SslMode
from asyncpool.credentials import iam as iam_module
from asyncpool.testing import PostgresServer
from asyncpool.testing.aws_endpoint import (
    ACCESS_KEY_ID,
    SECRET_ACCESS_KEY,
    SESSION_TOKEN,
    aws_environment,
)
from asyncpool.testing.pki import TestPki
from asyncpool.testing.sync import run_sync
from tests.aws_support import set_environment

PROXY_HOST = "orders.proxy-c0ffee123456.us-east-1.rds.amazonaws.com"


class SigningCounter:
    """An aiobotocore session that counts client creations and SigV4 signings (its own events)."""

    def __init__(self) -> None:
        from aiobotocore.session import AioSession

        self.session = AioSession()
        self.clients = 0
        self.signings = 0
        self.session.register("creating-client-class.rds", self._client_created)
        self.session.register("before-sign.rds.connect", self._signed)

    def _client_created(self, **_: Any) -> None:
        self.clients += 1

    def _signed(self, **_: Any) -> None:
        self.signings += 1


def sigv4_signature_matches(token: str, secret_key: str) -> bool:
    """Recompute a presigned URL's SigV4 signature from its parts (AWS's published algorithm)."""
    url = urlsplit("https://" + token)
    params = parse_qsl(url.query, keep_blank_values=True)
    fields = dict(params)
    signed = sorted((k, v) for k, v in params if k != "X-Amz-Signature")
    query = "&".join(f"{quote(k, safe='-_.~')}={quote(v, safe='-_.~')}" for k, v in signed)
    canonical = "\n".join(
        ["GET", url.path, query, f"host:{url.netloc}", "", "host", hashlib.sha256(b"").hexdigest()]
    )
    scope = fields["X-Amz-Credential"].split("/", 1)[1]
    to_sign = "\n".join(
        [
            fields["X-Amz-Algorithm"],
            fields["X-Amz-Date"],
            scope,
            hashlib.sha256(canonical.encode()).hexdigest(),
        ]
    )
    key = ("AWS4" + secret_key).encode()
    for part in scope.split("/"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    expected = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, fields["X-Amz-Signature"])


# -- the token itself --------------------------------------------------------------------------


@pytest.mark.parametrize(("arguments", "match"), [
    ({"token_port": "5432"}, r"token_port='5432': must be a port number from 1 to 65535"),
    ({"token_port": 0}, r"token_port=0: must be a port number"),
    ({"token_port": True}, r"token_port=True: must be a port number"),
    ({"token_host": ""}, r"token_host='': must be a non-empty string"),
    ({"region": 5}, r"region=5: must be a non-empty string"),
])
def test_arguments_signed_into_every_token_are_checked_when_it_is_made(
        arguments: dict[str, Any], match: str) -> None:
    """Taken as they were and signed into each token, every login was refused as a wrong
    password (RDS checks the token against its own endpoint), or failed inside botocore."""
    with pytest.raises(CredentialsError, match=match):
        IamAuth(**arguments)


async def test_token_is_a_sigv4_presigned_connect_url_for_the_dialled_endpoint(aws: None) -> None:
    auth = IamAuth()
    try:
        token = await auth.password(Target(PROXY_HOST, 5432, "orders_app", "orders"))
    finally:
        await auth.close()
    url = urlsplit("https://" + token)
    fields = dict(parse_qsl(url.query))
    assert url.netloc == f"{PROXY_HOST}:5432"
    assert fields["Action"] == "connect"
    assert fields["DBUser"] == "orders_app"
    assert fields["X-Amz-Algorithm"] == "AWS4-HMAC-SHA256"
    assert fields["X-Amz-Expires"] == "900"
    assert fields["X-Amz-SignedHeaders"] == "host"
    assert fields["X-Amz-Security-Token"] == SESSION_TOKEN
    key_id, day, region, service, terminator = fields["X-Amz-Credential"].split("/")
    # The region came from the host name: IamAuth() was given none and AWS_REGION is unset.
    assert (key_id, region, service, terminator) == (
        ACCESS_KEY_ID, "us-east-1", "rds-db", "aws4_request"
    )
    signed_at = datetime.datetime.strptime(fields["X-Amz-Date"], "%Y%m%dT%H%M%SZ").replace(
        tzinfo=datetime.UTC
    )
    assert day == signed_at.strftime("%Y%m%d")
    assert abs(datetime.datetime.now(datetime.UTC) - signed_at) < datetime.timedelta(minutes=5)
    assert sigv4_signature_matches(token, SECRET_ACCESS_KEY)
    assert not sigv4_signature_matches(token, SECRET_ACCESS_KEY + "x")


@pytest.mark.parametrize("host", [
    "pg-prod-1.c0ffee123456.us-east-1.rds.amazonaws.com",
    "my-proxy-2.proxy-c0ffee123456.us-east-1.rds.amazonaws.com",
    "db-orders-1.cluster-ro-c0ffee123456.us-east-1.rds.amazonaws.com",
])
async def test_an_endpoint_named_like_a_region_is_signed_for_its_real_region(
        aws: None, host: str) -> None:
    """The region is the label before ``rds``: an instance, cluster or proxy named like one
    (``pg-prod-1``) was taken for it, the token was signed for region 'pg-prod-1' (rejected by
    AWS), and region='us-east-1' was refused as contradicting the host."""
    for auth in (IamAuth(), IamAuth(region="us-east-1")):
        try:
            token = await auth.password(Target(host, 5432, "orders_app", "orders"))
        finally:
            await auth.close()
        credential = dict(parse_qsl(urlsplit("https://" + token).query))["X-Amz-Credential"]
        assert credential.split("/")[2] == "us-east-1"
        assert sigv4_signature_matches(token, SECRET_ACCESS_KEY)


async def test_token_host_signs_for_the_real_endpoint_when_tunnelling(aws: None) -> None:
    auth = IamAuth(token_host=PROXY_HOST, token_port=5432)
    try:
        token = await auth.password(Target("127.0.0.1", 15432, "orders_app", "orders"))
    finally:
        await auth.close()
    assert token.startswith(f"{PROXY_HOST}:5432/?Action=connect&DBUser=orders_app&")
    assert sigv4_signature_matches(token, SECRET_ACCESS_KEY)


async def test_signing_client_is_created_once_and_each_call_signs_anew(aws: None) -> None:
    counter = SigningCounter()
    auth = IamAuth(session=counter.session)
    target = Target(PROXY_HOST, 5432, "orders_app", "orders")
    try:
        await auth.warm(target)
        tokens = await asyncio.gather(*(auth.password(target) for _ in range(5)))
    finally:
        await auth.close()
    assert counter.clients == 1
    assert counter.signings == 6
    assert all(sigv4_signature_matches(t, SECRET_ACCESS_KEY) for t in tokens)


class ClientSpy:
    """An aiobotocore session that counts the clients opened and closed through it."""

    def __init__(self) -> None:
        from aiobotocore.session import AioSession

        self.session = AioSession()
        self.opened = 0
        self.closed = 0
        # Set: each creation waits for it (credentials read from the network, ECS or IMDS).
        self.gate: asyncio.Event | None = None
        self.creating = asyncio.Event()
        create = self.session.create_client
        spy = self

        class Counted:
            def __init__(self, inner: Any) -> None:
                self._inner = inner

            async def __aenter__(self) -> Any:
                spy.creating.set()
                if spy.gate is not None:
                    await spy.gate.wait()
                client = await self._inner.__aenter__()
                spy.opened += 1
                return client

            async def __aexit__(self, *exc: Any) -> Any:
                spy.closed += 1
                return await self._inner.__aexit__(*exc)

        self.session.create_client = lambda *a, **k: Counted(create(*a, **k))


async def test_refresh_signs_the_retry_with_aws_credentials_read_again(
    aws: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The access keys in the environment were rotated while the pool ran: the client keeps
    signing with the old ones (it reads them once), so a refused login's retry must come from a
    new client, which reads the chain again."""
    auth = IamAuth()
    target = Target(PROXY_HOST, 5432, "orders_app", "orders")
    rotated_id, rotated_secret = "AKIAROTATED0EXAMPLE", secrets.token_hex(20)
    try:
        await auth.warm(target)
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", rotated_id)
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", rotated_secret)
        monkeypatch.delenv("AWS_SESSION_TOKEN")
        before = await auth.password(target)
        assert await auth.refresh(target) is True
        after = await auth.password(target)
    finally:
        await auth.close()

    def key_id(token: str) -> str:
        return dict(parse_qsl(urlsplit("https://" + token).query))["X-Amz-Credential"].split("/")[0]

    assert key_id(before) == ACCESS_KEY_ID  # kept between logins: a client per provider
    assert key_id(after) == rotated_id
    assert sigv4_signature_matches(after, rotated_secret)


async def test_logins_refused_together_replace_the_client_once_and_it_is_closed(
    aws: None, clock: FakeClock
) -> None:
    spy = ClientSpy()
    auth = IamAuth(session=spy.session)
    target = Target(PROXY_HOST, 5432, "orders_app", "orders")
    all_signed = asyncio.Barrier(5)

    async def refused_login() -> str:
        await auth.password(target)
        await all_signed.wait()  # every one was refused with a token of the first client
        assert await auth.refresh(target) is True
        return await auth.password(target)

    try:
        retries = await asyncio.gather(*(refused_login() for _ in range(5)))
        assert (spy.opened, spy.closed) == (2, 1)
        assert all(sigv4_signature_matches(t, SECRET_ACCESS_KEY) for t in retries)
        clock.now += iam_module.REPLACE_INTERVAL
        await auth.refresh(target)  # a new refusal a while after the retries: that client goes
        assert (spy.opened, spy.closed) == (2, 2)
        await auth.password(target)
    finally:
        await auth.close()
    assert (spy.opened, spy.closed) == (3, 3)


class FakeClock:
    """Stands in for the `time` module IamAuth reads its clock from."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(iam_module, "time", fake, raising=False)
    return fake


def _key_id(token: str) -> str:
    return dict(parse_qsl(urlsplit("https://" + token).query))["X-Amz-Credential"].split("/")[0]


async def _refused_twice_with(auth: IamAuth, target: Target, key_id: str) -> None:
    """Two refusals in a row, each followed by the retry's token: signed with `key_id` both
    times (the second refusal keeps the client the first made)."""
    for _ in range(2):
        await auth.password(target)
        await auth.refresh(target)
        assert _key_id(await auth.password(target)) == key_id


async def test_refusals_in_a_row_replace_the_client_once_a_minute(
    aws: None, clock: FakeClock
) -> None:
    """A role refused for good: each wave of logins replaced the client (50-250 ms of the event
    loop each, the service model parsed again), though the new one read the same keys."""
    spy = ClientSpy()
    auth = IamAuth(session=spy.session)
    target = Target(PROXY_HOST, 5432, "orders_app", "orders")
    try:
        for wave in range(6):
            await auth.password(target)
            await auth.refresh(target)
            await auth.password(target)
            clock.now += iam_module.REPLACE_INTERVAL / 6 - 0.5
            assert (spy.opened, spy.closed) == (2, 1), wave
        clock.now += 3.5  # a minute since the replacement: credentials may have changed elsewhere
        await auth.password(target)
        await auth.refresh(target)
        assert (spy.opened, spy.closed) == (2, 2)
    finally:
        await auth.close()


async def test_keys_rotated_during_refusals_in_a_row_are_read_at_the_next_one(
    aws: None, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    auth = IamAuth()
    target = Target(PROXY_HOST, 5432, "orders_app", "orders")
    rotated_id, rotated_secret = "AKIAROTATED0EXAMPLE", secrets.token_hex(20)
    try:
        await _refused_twice_with(auth, target, ACCESS_KEY_ID)
        clock.now += 1
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", rotated_id)
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", rotated_secret)
        monkeypatch.delenv("AWS_SESSION_TOKEN")
        assert _key_id(await auth.password(target)) == ACCESS_KEY_ID
        await auth.refresh(target)
        after = await auth.password(target)
    finally:
        await auth.close()
    assert _key_id(after) == rotated_id
    assert sigv4_signature_matches(after, rotated_secret)


def _legacy_credentials(kind: str, key_id: str, secret: str) -> str:
    """A credentials file botocore's default chain reads last: the EC2 tools' (at
    AWS_CREDENTIAL_FILE) or boto 2's (at BOTO_CONFIG)."""
    if kind == "AWS_CREDENTIAL_FILE":
        return f"AWSAccessKeyId={key_id}\nAWSSecretKey={secret}\n"
    return f"[Credentials]\naws_access_key_id = {key_id}\naws_secret_access_key = {secret}\n"


@pytest.mark.parametrize("kind", ["AWS_CREDENTIAL_FILE", "BOTO_CONFIG"])
async def test_keys_rotated_in_a_legacy_credentials_file_are_read_at_the_next_refusal(
    aws: None, clock: FakeClock, monkeypatch: pytest.MonkeyPatch, tmp_path: Any, kind: str
) -> None:
    """The credentials fingerprint left out the two files botocore's chain still reads (the EC2
    tools' and boto 2's): keys rotated there were not read again for a minute of refusals."""
    import os

    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name)
    path = tmp_path / "credentials"
    first_id, rotated_id = "AKIALEGACY00EXAMPLE0", "AKIAROTATED0EXAMPLE0"  # pragma: allowlist secret
    path.write_text(_legacy_credentials(kind, first_id, secrets.token_hex(20)))
    monkeypatch.setenv(kind, str(path))
    auth = IamAuth()
    target = Target(PROXY_HOST, 5432, "orders_app", "orders")
    rotated_secret = secrets.token_hex(20)
    try:
        await _refused_twice_with(auth, target, first_id)
        clock.now += 1
        path.write_text(_legacy_credentials(kind, rotated_id, rotated_secret))
        written = path.stat().st_mtime_ns + 1_000_000_000  # (a second later, whatever the fs)
        os.utime(path, ns=(written, written))
        await auth.refresh(target)
        after = await auth.password(target)
    finally:
        await auth.close()
    assert _key_id(after) == rotated_id
    assert sigv4_signature_matches(after, rotated_secret)


async def test_a_client_closed_while_it_is_being_created_is_closed_too(aws: None) -> None:
    """close() (or a refresh()) while a login's client is still being created: the creation
    finished after it, inside an object nobody would close again."""
    spy = ClientSpy()
    spy.gate = asyncio.Event()
    auth = IamAuth(session=spy.session)
    target = Target(PROXY_HOST, 5432, "orders_app", "orders")
    signing = asyncio.create_task(auth.password(target))
    await asyncio.wait_for(spy.creating.wait(), 5)
    closing = asyncio.create_task(auth.close())
    await asyncio.sleep(0.05)
    spy.gate.set()
    await asyncio.wait_for(asyncio.gather(signing, closing), 10)
    assert (spy.opened, spy.closed) == (1, 1)


# -- bad AWS set-up ----------------------------------------------------------------------------


async def test_region_contradicting_the_host_name_is_refused(aws: None) -> None:
    auth = IamAuth(region="eu-west-1")
    with pytest.raises(CredentialsError) as info:
        await auth.password(Target(PROXY_HOST, 5432, "orders_app", "orders"))
    message = str(info.value)
    assert "eu-west-1" in message
    assert "us-east-1" in message
    assert "region='us-east-1'" in message


async def test_region_from_aws_region_as_lambda_sets_it(
    aws: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_REGION", "eu-central-1")  # botocore alone reads AWS_DEFAULT_REGION
    auth = IamAuth()
    try:
        token = await auth.password(Target("db.internal.example", 5432, "orders_app", "orders"))
    finally:
        await auth.close()
    assert "%2Feu-central-1%2Frds-db%2F" in token
    assert sigv4_signature_matches(token, SECRET_ACCESS_KEY)


async def test_no_region_anywhere_says_how_to_give_one(aws: None) -> None:
    auth = IamAuth()
    with pytest.raises(CredentialsError, match=r"pass IamAuth\(region='...'\) or set AWS_REGION"):
        await auth.password(Target("db.internal.example", 5432, "orders_app", "orders"))
    await auth.close()


async def test_malformed_region_name_is_named(aws: None) -> None:
    auth = IamAuth(region="us_east_1")
    with pytest.raises(CredentialsError, match=r"'us_east_1' is not a valid AWS region name"):
        await auth.password(Target("db.internal.example", 5432, "orders_app", "orders"))
    await auth.close()


async def test_no_aws_credentials_says_where_they_come_from(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    set_environment(monkeypatch, aws_environment(credentials=False))
    auth = IamAuth()
    with pytest.raises(CredentialsError) as info:
        await auth.warm(Target(PROXY_HOST, 5432, "orders_app", "orders"))
    await auth.close()
    message = str(info.value)
    assert "no AWS credentials found" in message
    assert "execution role" in message
    assert "AWS_ACCESS_KEY_ID" in message


async def test_debug_logging_everywhere_never_shows_a_token(
    aws: None, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)  # botocore logs every signing's parts at DEBUG
    auth = IamAuth()
    try:
        token = await auth.password(Target(PROXY_HOST, 5432, "orders_app", "orders"))
    finally:
        await auth.close()
    signature = dict(parse_qsl(urlsplit("https://" + token).query))["X-Amz-Signature"]
    assert "botocore.auth" in {r.name for r in caplog.records}  # the records exist, redacted
    assert signature not in caplog.text
    assert "DBUser=orders_app" not in caplog.text


def test_repr_shows_no_credentials(aws: None) -> None:
    auth = IamAuth(region="us-east-1")
    assert repr(auth) == "IamAuth(region='us-east-1')"


# -- TLS is required ---------------------------------------------------------------------------


@pytest.mark.parametrize("mode", [None, "disable", "prefer"])
async def test_pool_refuses_iam_without_tls_before_dialling(aws: None, mode: SslMode | None) -> None:
    counter = SigningCounter()
    pool = Pool(
        f"postgresql://orders_app@{PROXY_HOST}:5432/orders",
        credentials=IamAuth(session=counter.session),
        ssl=mode,
        telemetry=False,
    )
    with pytest.raises(PoolConfigError, match="ssl='verify-full'") as info:
        await pool.open()
    assert f"ssl mode {mode or 'prefer'!r}" in str(info.value)
    assert "allow_unprotected_credentials=True" in str(info.value)
    assert counter.signings == 0


async def test_a_token_for_one_host_is_refused_beside_several_hosts(aws: None) -> None:
    """asyncpg asks for the password once per host it tries, without saying which: a token
    signed for the first host went to the second, which refused it (and the error named the
    first, dead one). Refused when the pool opens; token_host= says what to sign for."""
    counter = SigningCounter()
    dsn = (f"postgresql://orders_app@{PROXY_HOST}:5432,other.{PROXY_HOST}:5432/orders"
           "?sslmode=verify-full")
    pool = Pool(dsn, credentials=IamAuth(session=counter.session), telemetry=False)
    with pytest.raises(PoolConfigError, match=r"IamAuth signs its token for one host, and the "
                       r"DSN names 2 .* or token_host="):
        await pool.open()
    assert counter.signings == 0
    from asyncpool.config import PoolConfig
    from asyncpool.connect.connector import Connector
    from asyncpool.observer import PoolObserver

    Connector(PoolConfig(dsn=dsn, credentials=IamAuth(token_host=PROXY_HOST)), PoolObserver())
    # A bearer token not signed for a host (no token_host attribute) goes to every host.
    from tests.provider_support import QuietProvider

    class Bearer(QuietProvider):
        requires_tls = True

    Connector(PoolConfig(dsn=dsn, credentials=Bearer()), PoolObserver())


@pytest.mark.parametrize("dsn_mode", ["require", "verify-ca"])
async def test_tls_that_verifies_less_than_the_name_does_not_satisfy_iam(
    aws: None, dsn_mode: str
) -> None:
    counter = SigningCounter()
    pool = Pool(f"postgresql://orders_app@{PROXY_HOST}:5432/orders?sslmode={dsn_mode}",
                credentials=IamAuth(session=counter.session), telemetry=False)
    with pytest.raises(PoolConfigError, match=f"ssl mode '{dsn_mode}' \\(the DSN's sslmode\\)"):
        await pool.open()
    assert counter.signings == 0


def test_verify_full_from_the_dsn_satisfies_iam() -> None:
    from asyncpool.config import PoolConfig
    from asyncpool.connect.tls import check_credentials, resolve_tls

    config = PoolConfig(dsn=f"postgresql://u@{PROXY_HOST}/db?sslmode=verify-full")
    setting = resolve_tls(config)
    assert setting.verified
    assert setting.source == "the DSN's sslmode"
    check_credentials(config, setting, "token", [PROXY_HOST])  # raises if the DSN were ignored


# -- through a real PostgreSQL with TLS --------------------------------------------------------
# PostgreSQL cannot check an IAM token (RDS does, with its rds_iam PAM module). Role `iam_user`
# is let in by pg_hba `trust` over TLS only, standing in for that check; the token's validity is
# proved above. What runs for real here: the pool, TLS verify-full, the token per connection, and
# the refusal path against role `iam_denied`, whose password no token matches.


@pytest.fixture(scope="module")
def iam_postgres(pki: TestPki) -> Iterator[PostgresServer]:
    server = PostgresServer(
        max_connections=20,
        settings=pki.postgres_settings(),
        hba_lines=[
            "hostnossl all all 127.0.0.1/32 reject",
            "hostssl app iam_user 127.0.0.1/32 trust",
        ],
    )
    server.start()
    try:
        run_sync(_create_roles(server.admin_dsn))
        yield server
    finally:
        server.stop()


async def _create_roles(admin_dsn: str) -> None:
    conn = await asyncpg.connect(admin_dsn)
    try:
        await conn.execute("CREATE ROLE iam_user LOGIN")
        await conn.execute(f"CREATE ROLE iam_denied LOGIN PASSWORD '{secrets.token_hex(16)}'")
    finally:
        await conn.close()


def _iam_pool(server: PostgresServer, pki: TestPki, user: str, auth: IamAuth, **options: Any) -> Pool:
    return Pool(
        f"postgresql://{user}@localhost:{server.port}/app",
        credentials=auth,
        ssl="verify-full",
        ssl_root_cert=str(pki.ca_cert),
        telemetry=False,
        **options,
    )


async def test_every_new_connection_logs_in_with_a_freshly_signed_token(
    aws: None, iam_postgres: PostgresServer, pki: TestPki
) -> None:
    counter = SigningCounter()
    auth = IamAuth(region="us-east-1", session=counter.session)
    async with _iam_pool(iam_postgres, pki, "iam_user", auth, min_size=1, max_size=4) as pool:
        assert counter.signings == 2  # warm() at open, then the min_size connection
        held = [await pool.acquire() for _ in range(4)]
        rows = [
            await conn.fetchrow(
                "SELECT current_user AS who, ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()"
            )
            for conn in held
        ]
        for conn in held:
            await pool.release(conn)
        # Reusing idle connections signs nothing.
        for _ in range(3):
            assert await pool.fetchval("SELECT 1") == 1
        created = pool.stats().created_total
    assert created == 4
    assert counter.signings == 1 + created
    assert counter.clients == 1
    assert all(row is not None and row["who"] == "iam_user" and row["ssl"] for row in rows)


async def test_refused_token_is_signed_again_once_then_fails_with_iam_advice(
    aws: None, iam_postgres: PostgresServer, pki: TestPki, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    counter = SigningCounter()
    auth = IamAuth(region="us-east-1", session=counter.session)
    pool = _iam_pool(iam_postgres, pki, "iam_denied", auth, min_size=1)
    with pytest.raises(AuthenticationError) as info:
        await pool.open()
    assert counter.signings == 3  # warm, first login, the one retry
    assert counter.clients == 2  # the retry signed with a new client
    message = str(info.value)
    assert "iam_denied" in message
    assert "rds-db:connect" in message
    assert "GRANT rds_iam TO iam_denied" in message
    for leaked in (SESSION_TOKEN, SECRET_ACCESS_KEY, "X-Amz-Signature"):
        assert leaked not in message
        assert leaked not in caplog.text
        assert leaked not in repr(pool)


async def test_allow_unprotected_credentials_lets_a_local_test_dial_in_clear(
    aws: None, iam_postgres: PostgresServer
) -> None:
    counter = SigningCounter()
    pool = Pool(
        f"postgresql://iam_user@localhost:{iam_postgres.port}/app",
        credentials=IamAuth(region="us-east-1", session=counter.session),
        ssl="disable",
        allow_unprotected_credentials=True,
        telemetry=False,
    )
    # The pool dials (and this server's pg_hba then refuses plain TCP): no config refusal.
    with pytest.raises(ConnectError, match=r"pg_hba\.conf.*it requires TLS"):
        await pool.open()
    assert counter.signings == 2


async def test_waves_of_logins_refused_for_good_make_one_client_and_parse_no_model_again(
    aws: None, iam_postgres: PostgresServer, pki: TestPki, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The role is refused every token (no rds-db:connect): each wave of logins made a new
    session and client, parsing botocore's JSON models again, 50-250 ms of the event loop taken
    from every other request of the process each time."""
    from aiobotocore.session import AioSession
    from botocore.loaders import JSONFileLoader

    created: list[str] = []
    parsed: list[str] = []
    create, load_file = AioSession.create_client, JSONFileLoader.load_file

    def counted_client(self: AioSession, service: str, *args: Any, **kwargs: Any) -> Any:
        created.append(service)
        return create(self, service, *args, **kwargs)

    def counted_file(self: JSONFileLoader, path: str, *args: Any, **kwargs: Any) -> Any:
        parsed.append(path)
        return load_file(self, path, *args, **kwargs)

    monkeypatch.setattr(AioSession, "create_client", counted_client)
    monkeypatch.setattr(JSONFileLoader, "load_file", counted_file)
    pool = _iam_pool(iam_postgres, pki, "iam_denied", IamAuth(region="us-east-1"), min_size=0,
                     max_size=3)
    await pool.open()  # warm(): the first client
    assert created == ["rds"]
    assert parsed
    parsed.clear()
    try:
        for _ in range(4):
            results = await asyncio.gather(*(pool.fetchval("SELECT 1") for _ in range(3)),
                                           return_exceptions=True)
            assert all(isinstance(r, AuthenticationError) for r in results), results
    finally:
        await pool.close()
    assert created == ["rds", "rds"]  # the first refusal's: it may come from rotated keys
    assert parsed == []


class ContainerCredentials:
    """A local stand-in for the container credentials endpoint of ECS and Lambda
    (``AWS_CONTAINER_CREDENTIALS_FULL_URI``): it serves `key_id`, changed by the test, valid for
    six hours (botocore refreshes only 10-15 minutes before that)."""

    def __init__(self) -> None:
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.key_id = "container-key-1"
        self.secret = secrets.token_hex(20)
        served = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                expires = datetime.datetime.now(datetime.UTC) + datetime.timedelta(hours=6)
                body = (f'{{"AccessKeyId": "{served.key_id}", "SecretAccessKey": '
                        f'"{served.secret}", "Token": "{secrets.token_hex(20)}", '
                        f'"Expiration": "{expires:%Y-%m-%dT%H:%M:%SZ}"}}').encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.uri = f"http://127.0.0.1:{self.server.server_port}/credentials"

    def rotate(self, key_id: str) -> None:
        self.key_id, self.secret = key_id, secrets.token_hex(20)

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)


@pytest.fixture
def container(monkeypatch: pytest.MonkeyPatch) -> Iterator[ContainerCredentials]:
    set_environment(monkeypatch, aws_environment(credentials=False, region="us-east-1"))
    served = ContainerCredentials()
    monkeypatch.setenv("AWS_CONTAINER_CREDENTIALS_FULL_URI", served.uri)
    yield served
    served.stop()


async def test_container_credentials_changed_unseen_are_read_within_a_minute_of_refusals(
    container: ContainerCredentials, clock: FakeClock,
) -> None:
    """Keys rotated at the container endpoint (which the environment's fingerprint cannot see):
    botocore keeps signing with the old ones (they are valid for hours); the first refusal reads
    the new ones, and a change within a minute of that replacement is read at the first refusal
    a minute after it, as docs/credentials-and-tls.md says."""
    auth = IamAuth()
    target = Target(PROXY_HOST, 5432, "orders_app", "orders")
    try:
        await auth.warm(target)
        container.rotate("container-key-2")
        assert _key_id(await auth.password(target)) == "container-key-1"
        await auth.refresh(target)
        assert _key_id(await auth.password(target)) == "container-key-2"
        container.rotate("container-key-3")
        clock.now += iam_module.REPLACE_INTERVAL - 0.1
        await auth.refresh(target)
        assert _key_id(await auth.password(target)) == "container-key-2"
        clock.now += 0.1
        await auth.refresh(target)
        after = await auth.password(target)
    finally:
        await auth.close()
    assert _key_id(after) == "container-key-3"
    assert sigv4_signature_matches(after, container.secret)
