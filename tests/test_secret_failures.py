"""No piece of a credential in any output, for every kind of failed login (#23).

Each credential kind (a password in the DSN, `StaticPassword`, a provider that rotates its
secret, `IamAuth` signing with a secret AWS session token) is sent to each kind of failure: a
wrong password at PostgreSQL (SCRAM over verified TLS and in clear), at PgBouncer (auth_file and
auth_query), an unreachable port, a server without TLS under verify-full, a certificate for
another name, a certificate from another CA, and a server that never answers. The error (all of
it: `tests.secret_support.exposed`), every log record at DEBUG (asyncpg's and botocore's
included), the OpenTelemetry spans and metric points and the reprs of the pool, its config, stats
and provider are searched for any 8-character piece of the secret (and of each IAM token's
signature and session token).
"""

from __future__ import annotations

import asyncio
import gc
import io
import json
import logging
import secrets
import socket
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, quote, urlsplit

import pytest

from asyncpool import AuthenticationError, ConnectError, Pool, PoolConfig, PoolError, StaticPassword
from asyncpool.credentials.secrets_manager import SecretsManagerAuth
from asyncpool.testing import PgBouncerServer, PostgresServer
from asyncpool.testing.aws_endpoint import LocalAwsEndpoint, aws_environment
from asyncpool.testing.pki import TestPki
from tests.aws_support import set_environment
from tests.provider_support import QuietProvider
from tests.secret_support import RecordingIamAuth, exposed, leaks, logging_to
from tests.telemetry_support import Sdk
from tests.test_secrets_manager import auth_query_pgbouncer  # noqa: F401 (a fixture)

REGION = "us-east-1"
_ALPHABET = "QZXJKVWqzxjkvw"  # letters no message of ours is made of


def _secret(tail: str = "") -> str:
    rng = secrets.SystemRandom()
    return "".join(rng.choice(_ALPHABET) for _ in range(12)) + tail


class RotatingProvider(QuietProvider):
    """A provider with a new secret at each read; a refused login makes it read again."""

    def __init__(self) -> None:
        self.made: list[str] = []

    async def password(self, target: object) -> str:
        self.made.append(_secret(" @:/é"))
        return self.made[-1]

    async def refresh(self, target: object) -> bool:
        return True

    def __repr__(self) -> str:
        return "RotatingProvider()"


def _token_secrets(token: str) -> list[str]:
    """The parts of an IAM token that are secret: its signature and its session token."""
    query = dict(parse_qsl(urlsplit("https://" + token).query))
    return [query.get("X-Amz-Signature", ""), query.get("X-Amz-Security-Token", "")]


@dataclass
class Credential:
    """How one kind of credential is given, and what of it must not be printed."""

    kind: str
    secret: str = field(default_factory=lambda: _secret(" @:/é?#%"))
    provider: Any = None
    aws_url: str | None = None  # the AWS stand-in's, where SecretsManagerAuth reads the secret

    def dsn_and_options(self, dsn: str) -> tuple[str, dict[str, Any]]:
        if self.kind == "dsn password":
            return dsn.replace("://app@", f"://app:{quote(self.secret, safe='')}@", 1), {}
        if self.kind == "dsn ?password=":
            joiner = "&" if "?" in dsn else "?"
            return f"{dsn}{joiner}password={quote(self.secret, safe='')}", {}
        if self.kind == "StaticPassword":
            self.provider = StaticPassword(self.secret)
        elif self.kind == "rotating provider":
            self.provider = RotatingProvider()
        elif self.kind == "IamAuth":
            self.provider = RecordingIamAuth(REGION)
        elif self.kind == "SecretsManagerAuth":
            import botocore.session

            name = f"failures/{secrets.token_hex(8)}"
            logging.disable()  # the test's own call to store it: botocore logs the request
            try:
                client = botocore.session.get_session().create_client(
                    "secretsmanager", region_name=REGION, endpoint_url=self.aws_url)
                client.create_secret(Name=name, SecretString=json.dumps(
                    {"username": "app", "password": self.secret}))
                client.close()
            finally:
                logging.disable(logging.NOTSET)
            self.provider = SecretsManagerAuth(name, region=REGION, endpoint_url=self.aws_url)
        return dsn, {"credentials": self.provider}

    def all_secrets(self) -> list[str]:
        found = [self.secret]
        if isinstance(self.provider, RotatingProvider):
            found += self.provider.made
        if isinstance(self.provider, RecordingIamAuth):
            found += [s for t in self.provider.tokens for s in _token_secrets(t)]
        return found


CREDENTIALS = ["dsn password", "dsn ?password=", "StaticPassword", "rotating provider", "IamAuth",
               "SecretsManagerAuth"]


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.texts: list[tuple[str, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        text = logging.Formatter("%(name)s %(message)s").format(record)  # exc_info's text too
        self.texts.append((f"log {record.name}", text + repr(vars(record))))
        if record.exc_info and record.exc_info[1] is not None:  # what a tracker records of it
            self.texts += [(f"log {record.name}: {where}", text)
                           for where, text in exposed(record.exc_info[1])]


@dataclass
class Watch:
    """Every log record at DEBUG from the root logger on, and the AWS secret in the
    environment (what IamAuth signs with): the outputs and the secrets a test searches."""

    records: _Records
    aws_secret: str
    aws_url: str

    def credential(self, kind: str, secret: str | None = None) -> Credential:
        made = Credential(kind, aws_url=self.aws_url)
        if secret is not None:
            made.secret = secret
        return made

    def leaks(self, texts: list[tuple[str, str]], credential: Credential) -> list[str]:
        gc.collect()  # asyncio logs an exception nobody retrieved when its future is collected
        return leaks([*texts, *self.records.texts], [*credential.all_secrets(), self.aws_secret])


@pytest.fixture(scope="module")
def local_aws() -> Iterator[LocalAwsEndpoint]:
    with LocalAwsEndpoint() as endpoint:
        yield endpoint


@pytest.fixture
def watch(monkeypatch: pytest.MonkeyPatch, local_aws: LocalAwsEndpoint) -> Iterator[Watch]:
    set_environment(monkeypatch, aws_environment(region=REGION))
    token = _secret("/+=")
    monkeypatch.setenv("AWS_SESSION_TOKEN", token)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", _secret())
    for name in ("PGPASSWORD", "PGSSLMODE", "PGSERVICE"):
        monkeypatch.delenv(name, raising=False)
    handler = _Records()
    with logging_to(handler):
        yield Watch(handler, token, local_aws.url)


def _telemetry(sdk: Sdk) -> list[tuple[str, str]]:
    texts = []
    for span in sdk.spans():
        texts.append((f"span {span.name}", repr(span.to_json())))
    data = sdk.reader.get_metrics_data()
    for resource in data.resource_metrics if data else ():
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                texts.append((f"metric {metric.name}", repr(metric.to_json())))
    return texts


async def _fail(credential: Credential, dsn: str, watch: Watch,
                **options: Any) -> tuple[BaseException, list[str]]:
    """Log in with `credential` to `dsn` (expected to fail); the error and any leaks found."""
    dsn, more = credential.dsn_and_options(dsn)
    sdk = Sdk()
    texts: list[tuple[str, str]] = []
    try:
        config = PoolConfig(dsn=dsn, name="failures", min_size=1, acquire_timeout=4,
                            connect_timeout=2, telemetry=False, **options, **more)
        pool = Pool(config=config, observers=[sdk.observer(config)])
        try:
            await pool.open()
        except PoolError as exc:
            error: BaseException = exc
        else:
            raise AssertionError("the login succeeded")
        finally:
            texts += [("pool repr", repr(pool)), ("config repr", repr(config)),
                      ("config str", str(config)), ("stats", repr(pool.stats())),
                      ("provider repr", repr(config.credentials))]
            await pool.close()
            if config.credentials is not None:
                await config.credentials.close()
        texts += exposed(error) + _telemetry(sdk)
    finally:
        sdk.shutdown()
    return error, watch.leaks(texts, credential)


def _closed_port() -> int:
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        return int(unused.getsockname()[1])


def _verify_full(pki: TestPki, ca: Path | None = None) -> str:
    return f"sslmode=verify-full&sslrootcert={quote(str(ca or pki.ca_cert))}"


@pytest.mark.parametrize("kind", CREDENTIALS)
@pytest.mark.parametrize("failure", [
    "wrong password, verified TLS", "wrong password, in clear", "unreachable",
    "no TLS under verify-full", "certificate for another name", "certificate of another CA",
    "no answer"])
async def test_a_failed_login_prints_no_piece_of_the_credential(
    kind: str, failure: str, *, tls_postgres: PostgresServer, postgres: PostgresServer,
    pki: TestPki, silent_server: int, watch: Watch,
) -> None:
    verified = _verify_full(pki)
    dsn, options, expected = {
        "wrong password, verified TLS": (
            f"postgresql://app@localhost:{tls_postgres.port}/app?{verified}", {},
            "password authentication failed"),
        "wrong password, in clear": (
            f"postgresql://app@127.0.0.1:{postgres.port}/app?sslmode=disable",
            {"allow_unprotected_credentials": True}, "password authentication failed"),
        "unreachable": (f"postgresql://app@localhost:{_closed_port()}/app?{verified}", {},
                        "connection refused"),
        "no TLS under verify-full": (
            f"postgresql://app@localhost:{postgres.port}/app?{verified}", {},
            "the server does not accept TLS"),
        "certificate for another name": (
            f"postgresql://app@127.0.0.1:{tls_postgres.port}/app?{verified}", {},
            "certificate is not valid for '127.0.0.1'"),
        "certificate of another CA": (
            f"postgresql://app@localhost:{tls_postgres.port}/app?{_verify_full(pki, pki.other_ca_cert)}", {},
            "unable to get local issuer certificate"),
        "no answer": (f"postgresql://app@localhost:{silent_server}/app?{verified}", {},
                      "no answer within connect_timeout"),
    }[failure]
    credential = watch.credential(kind)
    error, found = await _fail(credential, dsn, watch, **options)
    assert type(error) is (AuthenticationError if failure.startswith("wrong") else ConnectError)
    if kind == "IamAuth" and failure.startswith("wrong"):
        assert len(credential.all_secrets()) > 2  # the tokens' secret parts were looked for
    assert expected in str(error)
    assert found == []
    if kind.startswith("dsn") and not options:  # what `asyncpool doctor` prints of it
        assert watch.leaks(await _doctor(credential.dsn_and_options(dsn)[0]), credential) == []


async def _doctor(dsn: str) -> list[tuple[str, str]]:
    """`asyncpool doctor DSN`'s text and --json output."""
    from asyncpool.cli.doctor import doctor

    outputs = []
    for as_json in (False, True):
        out = io.StringIO()
        await doctor(dsn, None, 1.0, as_json, out)
        outputs.append((f"doctor json={as_json}", out.getvalue()))
    assert all(text for _, text in outputs)
    return outputs


async def _refused_by(bouncer: PgBouncerServer, kind: str, watch: Watch) -> None:
    dsn = f"postgresql://app@127.0.0.1:{bouncer.port}/app?sslmode=disable"
    error, found = await _fail(watch.credential(kind), dsn, watch,
                               allow_unprotected_credentials=True)
    assert type(error) is AuthenticationError, error
    assert found == []


@pytest.mark.parametrize("kind", CREDENTIALS)
async def test_a_login_pgbouncer_refuses_prints_no_piece_of_the_credential(
    kind: str, pooler: PgBouncerServer, watch: Watch,
) -> None:
    await _refused_by(pooler, kind, watch)


@pytest.mark.parametrize("kind", CREDENTIALS)
async def test_a_login_auth_query_refuses_prints_no_piece_of_the_credential(
    kind: str, auth_query_pgbouncer: PgBouncerServer,  # noqa: F811 (the fixture imported)
    watch: Watch,
) -> None:
    await _refused_by(auth_query_pgbouncer, kind, watch)


@pytest.mark.parametrize("kind", CREDENTIALS)
@pytest.mark.parametrize("how", ["asyncio.timeout", "wait_for", "cancel"])
async def test_a_login_the_caller_gives_up_prints_no_piece_of_the_credential(
    kind: str, how: str, silent_server: int, pki: TestPki, watch: Watch,
) -> None:
    credential = watch.credential(kind)
    dsn, more = credential.dsn_and_options(
        f"postgresql://app@localhost:{silent_server}/app?{_verify_full(pki)}")
    pool = Pool(dsn, min_size=0, acquire_timeout=5, connect_timeout=4, telemetry=False, **more)
    await pool.open()
    caught: BaseException | None = None
    try:
        if how == "asyncio.timeout":
            async with asyncio.timeout(0.5):
                await pool.fetchval("SELECT 1")
        elif how == "wait_for":
            await asyncio.wait_for(pool.fetchval("SELECT 1"), 0.5)
        else:
            task = asyncio.ensure_future(pool.fetchval("SELECT 1"))
            await asyncio.sleep(0.5)
            task.cancel()
            await task
    except BaseException as exc:  # what the caller sees, whatever it is
        caught = exc
    finally:
        await pool.close()
    assert caught is not None
    found = watch.leaks(exposed(caught), credential)
    assert found == []


@pytest.mark.parametrize("form", [
    "userinfo, options after", "?password= before options", "?password= after options",
    "postgres:// scheme",
])
async def test_a_dsn_with_options_prints_no_piece_of_its_password(
    form: str, tls_postgres: PostgresServer, pki: TestPki, watch: Watch,
) -> None:
    secret = _secret(" @:/?#&=é%")
    encoded = quote(secret, safe="")
    options = quote("-c statement_timeout=5000 -c application_name=x", safe="")
    base = f"localhost:{tls_postgres.port}/app"
    tls = _verify_full(pki)
    dsn = {
        "userinfo, options after": f"postgresql://app:{encoded}@{base}?options={options}&{tls}",
        "?password= before options":
            f"postgresql://app@{base}?password={encoded}&options={options}&{tls}",
        "?password= after options":
            f"postgresql://app@{base}?options={options}&password={encoded}&{tls}",
        "postgres:// scheme": f"postgres://app:{encoded}@{base}?options={options}&{tls}",
    }[form]
    credential = watch.credential("given", secret)
    error, found = await _fail(credential, dsn, watch)
    assert isinstance(error, AuthenticationError), error
    assert found == []


@pytest.mark.parametrize("kind", ["dsn password", "IamAuth", "rotating provider"])
@pytest.mark.parametrize("step", ["first invocation", "second invocation"])
async def test_a_lambda_handler_whose_login_fails_prints_no_piece_of_the_credential(
    kind: str, step: str, *, env: Any, tls_postgres: PostgresServer, pki: TestPki,
    watch: Watch,
) -> None:
    """What the Lambda runtime reports of a failed invocation (the error the handler raised, its
    chain and frames) and every log record of the integration."""
    from aws_lambda_powertools import Logger

    from asyncpool.integrations.powertools import current_connection, pooled_connection

    credential = watch.credential(kind)
    dsn, more = credential.dsn_and_options(
        f"postgresql://app@localhost:{tls_postgres.port}/app?{_verify_full(pki)}")
    pool = env.pool(dsn, connect_timeout=3, **more)
    stream = io.StringIO()
    powertools = Logger(service="secrets", level="DEBUG", stream=stream)

    @powertools.inject_lambda_context(log_event=True)
    @pooled_connection(pool, runner=env.runner)
    async def handler(event: dict[str, Any], context: Any) -> int:
        value: int = await current_connection().fetchval("SELECT 1")
        return value

    if step == "second invocation":
        with pytest.raises(PoolError):
            await env.invoke(handler, {"n": 1})
        watch.records.texts.clear()
    with pytest.raises(PoolError) as info:
        await env.invoke(handler, {"n": 2})
    texts = exposed(info.value)
    texts.append(("powertools logs", stream.getvalue()))
    assert watch.leaks(texts, credential) == []


@pytest.fixture(scope="module", params=["1.18", "current"],
                ids=["pgbouncer-1.18", "pgbouncer-current"])
def tls_pgbouncer(request: pytest.FixtureRequest, postgres: PostgresServer,
                  pki: TestPki) -> Iterator[PgBouncerServer]:
    """Each PgBouncer (the distribution's, the current one) taking client connections over TLS
    only, with the certificate `pki` issued for "localhost"."""
    from asyncpool.testing.binaries import current_pgbouncer, system_pgbouncer

    binary = system_pgbouncer() if request.param == "1.18" else current_pgbouncer()
    server = PgBouncerServer(binary, postgres, {
        "client_tls_sslmode": "require", "client_tls_cert_file": str(pki.server_cert),
        "client_tls_key_file": str(pki.server_key)})
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.mark.parametrize("kind", CREDENTIALS)
@pytest.mark.parametrize("tls", ["verify-full", "certificate for another name",
                                 "certificate of another CA", "in clear"])
async def test_pgbouncer_client_tls_failures_print_no_piece_of_the_credential(
    kind: str, tls: str, tls_pgbouncer: PgBouncerServer, pki: TestPki, watch: Watch,
) -> None:
    """PgBouncer's own TLS (client_tls_*): a refused password, a certificate that does not
    verify, and a plain connection it refuses (opted in to sending credentials in clear)."""
    port = tls_pgbouncer.port
    dsn, options, error_class, expected = {
        "verify-full": (f"postgresql://app@localhost:{port}/app?{_verify_full(pki)}", {},
                        AuthenticationError, "authentication failed for user 'app'"),
        "certificate for another name": (
            f"postgresql://app@127.0.0.1:{port}/app?{_verify_full(pki)}", {}, ConnectError,
            "certificate is not valid for '127.0.0.1'"),
        "certificate of another CA": (
            f"postgresql://app@localhost:{port}/app?{_verify_full(pki, pki.other_ca_cert)}", {},
            ConnectError, "unable to get local issuer certificate"),
        "in clear": (f"postgresql://app@localhost:{port}/app?sslmode=disable",
                     {"allow_unprotected_credentials": True}, ConnectError, "SSL required"),
    }[tls]
    error, found = await _fail(watch.credential(kind), dsn, watch, **options)
    assert type(error) is error_class, error
    assert expected in str(error)
    assert found == []


_PLANTED = '''
class Holder:
    def __init__(self, secret):
        self.secret = secret

def fail(secret, how):
    holder = Holder(secret)  # its default repr shows nothing of it
    if how == "local":
        kept = [{"dsn": "postgresql://app:" + secret + "@db/app"}]
        raise RuntimeError("login failed")
    if how == "cause":
        try:
            fail(secret, "local")
        except RuntimeError as exc:
            raise ValueError("translated") from exc
    if how == "held":
        try:
            fail(secret, "local")
        except RuntimeError as exc:
            earlier = exc
        del secret
        raise ValueError("translated, nothing chained")
    if how == "attribute":
        error = ValueError("nothing in the message")
        error.detail = {"password": secret[3:12]}
        del secret
        raise error
    if how == "group":
        errors = []
        try:
            fail(secret, "local")
        except RuntimeError as exc:
            errors.append(exc)
        del secret
        raise ExceptionGroup("logins", errors)
    if how == "encoded":
        from urllib.parse import quote
        shown = quote(secret, safe="")[2:11]
        del secret
        raise ValueError(shown)
    del secret
    raise ValueError("clean: " + type(holder).__name__)
'''


@pytest.mark.parametrize("how", ["local", "cause", "held", "attribute", "group", "encoded",
                                 "clean"])
def test_the_search_finds_a_piece_wherever_an_error_keeps_it(how: str, tmp_path: Path) -> None:
    """`exposed` reaches every place a tracker prints (frames of code outside the tests,
    chains, exceptions held as locals, attributes, groups) and `leaks` finds an 8-character
    piece there, written as it is or percent-encoded."""
    secret = "QZXJ@KVWqz/xjkvw"  # pragma: allowlist secret
    space: dict[str, Any] = {}
    exec(compile(_PLANTED, str(tmp_path / "library.py"), "exec"), space)  # noqa: S102
    with pytest.raises(Exception) as info:  # noqa: PT011 - any error the library raises
        space["fail"](secret, how)
    found = leaks(exposed(info.value), [secret])
    assert bool(found) == (how != "clean"), found
    assert all(secret[4:12] not in f for f in found)  # the report masks what it found


@pytest.mark.parametrize("given", ["PGPASSWORD", "StaticPassword", "a provider"])
@pytest.mark.parametrize("asked", ["scram-sha-256", "password"])
async def test_a_password_the_driver_cannot_encode_is_not_quoted(
    given: str, asked: str, postgres: PostgresServer, watch: Watch,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A lone surrogate (what os.environ makes of a PGPASSWORD byte that is not UTF-8) makes
    asyncpg's encoding fail inside its authentication code, and its message names the character
    and its position in the password: neither is shown, by the pool or by doctor."""
    from asyncpool.cli.doctor import doctor
    from asyncpool.testing.mitm import FakeServer

    secret = _secret() + "\udcff" + _secret()
    options: dict[str, Any] = {}
    if given == "PGPASSWORD":
        monkeypatch.setenv("PGPASSWORD", secret)  # (os.environ writes it as the byte 0xff)
    elif given == "StaticPassword":
        options["credentials"] = StaticPassword(secret)
    else:
        provider = RotatingProvider()
        provider.password = lambda target: asyncio.sleep(0, secret)  # type: ignore[method-assign]
        options["credentials"] = provider
    async with FakeServer(tls="refuse", auth="password") as fake:
        port, require_auth = postgres.port, None
        if asked == "password":
            port, require_auth = fake.port, "password"  # (a local server may have it in clear)
        dsn = f"postgresql://app@127.0.0.1:{port}/app?sslmode=disable"
        pool = Pool(dsn, min_size=1, connect_timeout=3, telemetry=False,
                    require_auth=require_auth, **options)
        with pytest.raises(ConnectError, match="cannot be encoded as UTF-8") as info:
            await pool.open()
        await pool.close()
        assert info.value.transient is False
        texts = exposed(info.value)
        if given == "PGPASSWORD":
            out = io.StringIO()
            await doctor(dsn + ("&require_auth=password" if require_auth else ""), None, 3.0,
                         False, out)
            texts.append(("doctor", out.getvalue()))
        assert fake.received == []
    shown = [t for _, t in texts + watch.records.texts]
    assert not [t for t in shown if "udcff" in t or "\udcff" in t or "position 12" in t]
    assert watch.leaks(texts, watch.credential("given", secret)) == []
