"""No part of any secret in any output (#23), whatever characters it holds and wherever it was given.

Secrets are generated with every printable ASCII punctuation character, a space, a newline, the
fullwidth at sign and solidus, non-ASCII letters, percent sequences (valid and not) and the
shapes `openssl rand -base64` makes. Each is given through every input a pool reads: DSN user
info and ``?password=`` (percent-encoded as documented, and as written by hand, unencoded),
``PGPASSWORD``, ``.pgpass``, ``connect_kwargs``, `StaticPassword`, Secrets Manager (moto behind a
local endpoint: the documented JSON, a bare string where JSON is expected, JSON for another user,
and a missing secret read with the secret as AWS session token) and `IamAuth` (the AWS session
credentials are the secret, so the IAM token botocore's local signer makes carries it). Every
login is refused by a real PostgreSQL over verified TLS (the role's password is another), or never
starts because the DSN or the secret is refused.

Then every output channel is read: the error's str and repr, everything chained to it, the
formatted traceback and the locals of every frame in it (what Sentry records), every log record at
DEBUG (botocore's included), the reprs of the pool, its config, its stats and the credentials
provider, every OpenTelemetry span (name, attributes, events, status) and metric data point
(attributes), and for DSN inputs `asyncpool doctor`'s text and --json output and `asyncpool
bench`'s. A channel leaks if it holds the secret or any 4-character piece of it, as written,
percent-encoded, JSON- or repr-escaped.

Run with ``-s`` to see the count of secrets x inputs x channels checked.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import random
import re
import socket
import string
import subprocess
import sys
import traceback
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, quote, urlsplit

import pytest

from asyncpool import (
    ConnectError,
    CredentialsError,
    Pool,
    PoolConfig,
    PoolConfigError,
    PoolError,
    StaticPassword,
)
from asyncpool.credentials import aws_client, iam
from asyncpool.credentials.secrets_manager import SecretsManagerAuth
from asyncpool.load.logins import GuardedLogin
from asyncpool.testing import PostgresServer
from asyncpool.testing.aws_endpoint import LocalAwsEndpoint, aws_environment
from asyncpool.testing.invariants import chain
from asyncpool.testing.pki import TestPki
from tests.provider_support import QuietProvider
from tests.secret_support import RecordingIamAuth, logging_to
from tests.telemetry_support import Sdk

REGION = "us-east-1"
PIECE = 4
_TESTS_DIR = str(Path(__file__).parent)
# Letters that no message, address or identifier of ours is made of, so a 4-character piece of
# a secret found in an output is the secret's and not a coincidence.
_ALPHABET = "QZXJKVWqzxjkvw"


def _make_secrets() -> list[str]:
    rng = random.Random(23)

    def word(n: int) -> str:
        return "".join(rng.choice(_ALPHABET) for _ in range(n))

    made = [f"{word(5)}{c}{word(5)}" for c in string.punctuation]
    made += [
        f"{word(5)} {word(5)}",
        f"{word(5)}\n{word(5)}",
        f"{word(4)}\uff20{word(4)}\uff0f{word(4)}",  # fullwidth @ and /
        f"{word(4)}\u00e9{word(4)}\U0001f511{word(4)}\u00df",  # é, a key emoji, ß
        f"{word(4)}%41{word(4)}%zz{word(3)}%2F",  # percent sequences, valid and not
        f"42/{word(9)}",  # digits then / : once parsed as host:port
        f"/{word(10)}",
        f"{word(4)}+{word(4)}/{word(4)}==",  # openssl rand -base64
        f"{word(3)}@{word(3)}:{word(3)}?{word(3)}#{word(3)}&{word(3)}={word(3)}",
        f"{word(4)}'{word(4)}\"{word(4)}\\{word(4)}",
    ]
    return made


SECRETS = _make_secrets()


def pieces(secret: str) -> set[str]:
    """Every 4-character piece of `secret` as any output could write it."""
    forms = {
        secret,
        quote(secret, safe=""),
        quote(secret),
        json.dumps(secret)[1:-1],
        json.dumps(secret, ensure_ascii=False)[1:-1],
        repr(secret)[1:-1],
        secret.encode("unicode_escape").decode("ascii"),
    }
    return {f[i : i + PIECE] for f in forms for i in range(len(f) - PIECE + 1)}


_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")
# Random identifiers the AWS stand-ins and botocore log (moto's 52-character request ids, SDK
# invocation ids, idempotency tokens): the values only, after their names.
_RANDOM_ID = re.compile(
    r"""((?:request-?id|invocation-id|request-?token)["']?\s*[:=]\s*["']?)[A-Za-z0-9+/=_-]{16,}""",
    re.IGNORECASE)


# Random UUIDs (a secret's name made with uuid4().hex, the version ids the AWS stand-ins give),
# dashed or not: their hex digits spell the escaped forms' hex pieces by chance ("00e9" of
# "\\u00e9"). No piece of a secret hides in one: the secrets' own letters are not hex digits.
_UUID = re.compile(r"\b[0-9a-fA-F]{8}(?:-?[0-9a-fA-F]{4}){3}-?[0-9a-fA-F]{12}\b")
# Clock readings in nanoseconds and other long numbers (a frame's ``cred_times``
# [1796413839328614412, 1796413839329400018] held "0001", a piece of "\U0001f511"): no escape
# writes ten digits in a row, so no piece of a secret hides in one.
_LONG_NUMBER = re.compile(r"\d{10,}")
# asyncio's task names (a frame's local holding a task: "<Task finished name='Task-2541' ...>"):
# their counter spelt "2541", a piece of "%41" escaped as "%2541", once the suite had made that
# many tasks. No piece of a secret hides in one: the secrets' own letters are not digits.
_TASK_NAME = re.compile(r"\bTask-\d+")


@dataclass
class Tally:
    """What was checked, for the summary line, and what leaked."""

    secrets: set[str] = field(default_factory=set)
    inputs: set[str] = field(default_factory=set)
    channels: set[str] = field(default_factory=set)
    checks: int = 0  # (secret, input, channel) triples
    pieces: int = 0  # pieces looked for, summed over the checks
    leaks: list[str] = field(default_factory=list)

    def check(self, secret: str, source: str, channel: str, texts: list[str],
              extra: tuple[str, ...] = ()) -> None:
        wanted = pieces(secret)
        # Default reprs name an object's address ("<... object at 0x7fce...0e90>"): its hex
        # digits can spell a piece of a secret's escaped form by chance ("00e9" of "\\u00e9").
        # So can the random request ids of the AWS stand-ins ("...bZWkK..." held "ZWkK").
        texts = [_TASK_NAME.sub("Task-<n>", _LONG_NUMBER.sub("<number>", _UUID.sub(
                     "<uuid>", _RANDOM_ID.sub(r"\1<random id>", _ADDRESS.sub(" at 0x<address>", t)))))
                 for t in texts]
        text = "\n".join(texts)
        self.secrets.add(secret)
        self.inputs.add(source)
        self.channels.add(channel)
        self.checks += 1
        self.pieces += len(wanted) + len(extra)
        found = sorted(p for p in wanted if p in text)
        found += [f"<{len(e)}-char credential>" for e in extra if e and e in text]
        if found:
            where = next(t for t in texts if any(p in t for p in wanted) or
                         any(e and e in t for e in extra))
            self.leaks.append(f"{source} / {channel} / secret {secret!r}: pieces {found[:5]} "
                              f"in {where[:300]!r}")


TALLY = Tally()


# -- capturing ---------------------------------------------------------------------------------


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.texts: list[str] = []
        self.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        if record.name.startswith(("moto", "werkzeug", "responses")):
            return  # the test's stand-in for AWS, not the library
        self.texts.append(self.format(record))


@pytest.fixture
def records() -> Iterator[_Records]:
    handler = _Records()
    with logging_to(handler):
        yield handler


def error_texts(exc: BaseException) -> dict[str, list[str]]:
    """The error channels: itself, what is chained to it, its traceback, its frames' locals."""
    chained = [e for e in chain(exc) if e is not exc]
    frames: list[str] = []
    for e in chain(exc):
        tb = e.__traceback__
        while tb is not None:
            frame = tb.tb_frame
            if not frame.f_code.co_filename.startswith(_TESTS_DIR):  # the test holds the secret
                for name, value in frame.f_locals.items():
                    try:
                        frames.append(f"{frame.f_code.co_qualname}.{name}={value!r}")
                    except Exception as repr_error:
                        frames.append(f"{name}: repr failed ({type(repr_error).__name__})")
            tb = tb.tb_next
    return {
        "error str": [str(exc)],
        "error repr": [repr(exc)],
        "cause and context": [t for e in chained for t in (str(e), repr(e))],
        "traceback text": ["".join(traceback.format_exception(exc))],
        "frame locals": frames,
    }


def telemetry_texts(sdk: Sdk) -> dict[str, list[str]]:
    spans = []
    for span in sdk.spans():
        spans.append(span.name)
        spans.append(repr(dict(span.attributes or {})))
        spans.append(repr(span.status.description))
        spans += [f"{ev.name} {dict(ev.attributes or {})!r}" for ev in span.events]
    points = []
    data = sdk.reader.get_metrics_data()
    for resource in data.resource_metrics if data else ():
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                points.append(f"{metric.name} {metric.description}")
                points += [repr(dict(p.attributes or {})) for p in metric.data.data_points]
    return {"spans": spans, "metrics": points}


# -- inputs ----------------------------------------------------------------------------------


@dataclass
class Setup:
    """How one input gives the secret: pool options, environment, and the DSN doctor gets."""

    dsn: str
    options: dict[str, Any] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    extra: tuple[str, ...] = ()  # other credentials to look for (the IAM tokens made)
    cli: bool = True  # doctor and bench take this input (a DSN or the environment)


@dataclass
class Servers:
    postgres: PostgresServer
    pki: TestPki
    aws: LocalAwsEndpoint
    tmp: Path

    def base(self, userinfo: str = "app", query: str = "") -> str:
        tls = f"sslmode=verify-full&sslrootcert={quote(str(self.pki.ca_cert))}"
        query = f"{query}&{tls}" if query else tls
        return f"postgresql://{userinfo}@localhost:{self.postgres.port}/app?{query}"

    def without_harness_paths(self, text: str) -> str:
        """`text` with the harness's random temporary paths blanked out.

        Their random names can hold a piece of a secret by chance (a CA directory ending in
        `2`, quoted as `...2%2Fca.crt`, holds a piece of `42/...`); they are ours, not leaks.
        """
        for path in sorted({str(self.pki.ca_cert.parent), str(self.tmp)}, key=len, reverse=True):
            for form in (quote(path, safe=""), quote(path), path):
                text = text.replace(form, "<harness path>")
        return text


_AWS_NAMES: dict[tuple[str, str], str] = {}
# What the Secrets Manager secret holds: the documented JSON, the bare secret where JSON is
# expected (the decoder's error and frames hold it), JSON for another user (refused after reading).
_AWS_VALUES: dict[str, Callable[[str], str]] = {
    "json": lambda secret: json.dumps({"username": "app", "password": secret}),
    "not json": lambda secret: secret,
    "other user": lambda secret: json.dumps({"username": "someone_else", "password": secret}),
}


async def _secret_in_aws(servers: Servers, secret: str, kind: str) -> str:
    """The name of a Secrets Manager secret made from `secret` (each kind made at once)."""
    if (kind, secret) not in _AWS_NAMES:
        from aiobotocore.session import AioSession

        async with AioSession().create_client(
            "secretsmanager", region_name=REGION, endpoint_url=servers.aws.url
        ) as client:
            for value in SECRETS:
                name = f"channels/{uuid.uuid4().hex}"
                await client.create_secret(Name=name, SecretString=_AWS_VALUES[kind](value))
                _AWS_NAMES[kind, value] = name
    return _AWS_NAMES[kind, secret]


def _pgpass_line(secret: str, servers: Servers) -> str:
    escaped = secret.replace("\\", "\\\\").replace(":", "\\:")
    return f"localhost:{servers.postgres.port}:app:app:{escaped}\n"


async def setup_for(  # noqa: PLR0911, PLR0912 - one branch per input reads best
    source: str, secret: str, servers: Servers
) -> Setup | None:
    """How `source` gives `secret`; None when it cannot hold it (a newline in .pgpass)."""
    encoded = quote(secret, safe="")
    if source == "dsn user info":
        return Setup(servers.base(f"app:{encoded}"))
    if source == "dsn user info, unencoded":
        return Setup(servers.base(f"app:{secret}"))
    if source == "dsn ?password=":
        return Setup(servers.base(query=f"password={encoded}"))
    if source == "dsn ?password=, unencoded":
        return Setup(servers.base(query=f"password={secret}"))
    if source == "PGPASSWORD":
        if "\n" in secret:
            return None  # an environment variable can hold it, but no shell sets it so: kept
        return Setup(servers.base(), env={"PGPASSWORD": secret})
    if source == ".pgpass":
        if "\n" in secret:
            return None  # a .pgpass line cannot hold a newline
        path = servers.tmp / f"pgpass-{SECRETS.index(secret)}"
        path.write_text(_pgpass_line(secret, servers))
        path.chmod(0o600)
        return Setup(servers.base(), env={"PGPASSFILE": str(path)})
    if source == "StaticPassword":
        return Setup(servers.base(), {"credentials": StaticPassword(secret)}, cli=False)
    if source == "connect_kwargs":
        return Setup(servers.base(), {"connect_kwargs": {"password": secret}}, cli=False)
    if source.startswith("Secrets Manager"):
        kind = {"Secrets Manager": "json", "Secrets Manager, not JSON": "not json",
                "Secrets Manager, another user's": "other user"}.get(source)
        env = {}
        if kind is None:  # the secret does not exist; the AWS session token is the secret
            name, env = "channels/missing", {"AWS_SESSION_TOKEN": secret}
        else:
            name = await _secret_in_aws(servers, secret, kind)
        auth = SecretsManagerAuth(name, region=REGION, endpoint_url=servers.aws.url)
        return Setup(servers.base(), {"credentials": auth}, env, cli=False)
    if source == "IamAuth":
        env = {"AWS_SESSION_TOKEN": secret, "AWS_SECRET_ACCESS_KEY": secret}
        return Setup(servers.base(), {"credentials": RecordingIamAuth(REGION)}, env, cli=False)
    raise AssertionError(source)


INPUTS = [
    "dsn user info", "dsn user info, unencoded", "dsn ?password=", "dsn ?password=, unencoded",
    "PGPASSWORD", ".pgpass", "connect_kwargs", "StaticPassword", "Secrets Manager",
    "Secrets Manager, not JSON", "Secrets Manager, another user's",
    "Secrets Manager, AWS session token", "IamAuth",
]


@pytest.fixture(scope="module")
def local_aws() -> Iterator[LocalAwsEndpoint]:
    with LocalAwsEndpoint() as endpoint:
        yield endpoint


@pytest.fixture
async def servers(tls_postgres: PostgresServer, pki: TestPki, local_aws: LocalAwsEndpoint,
                  tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Servers:
    for name, value in aws_environment(region=REGION).items():
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    for name in ("PGPASSWORD", "PGPASSFILE", "PGSSLMODE", "PGHOST", "PGUSER", "PGSERVICE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("PGPASSFILE", str(tmp_path / "no-pgpass"))
    return Servers(tls_postgres, pki, local_aws, tmp_path)


# -- one input, every secret, every channel ----------------------------------------------------


async def _pool_channels(setup: Setup) -> tuple[dict[str, list[str]], tuple[str, ...]]:
    sdk = Sdk()
    outputs: dict[str, list[str]] = {}
    try:
        try:
            config = PoolConfig(dsn=setup.dsn, name="channels", min_size=1, acquire_timeout=5,
                                connect_timeout=3, telemetry=False, **setup.options)
        except PoolConfigError as exc:
            # A DSN that cannot be read (a password written unencoded) is refused here, as the
            # config is made: its error is the output.
            outputs.update(error_texts(exc))
            return outputs, ()
        pool = Pool(config=config, observers=[sdk.observer(config)])
        try:
            await pool.open()
        except PoolError as exc:
            outputs.update(error_texts(exc))
        else:
            raise AssertionError("a login with the wrong password succeeded")
        finally:
            credentials = config.credentials
            outputs["reprs"] = [repr(pool), repr(config), str(config), repr(pool.stats()),
                                repr(credentials)]
            await pool.close()
            if credentials is not None:
                await credentials.close()
        outputs.update(telemetry_texts(sdk))
    finally:
        sdk.shutdown()
    tokens = getattr(setup.options.get("credentials"), "tokens", [])
    extra = tuple(tokens) + tuple(
        dict(parse_qsl(urlsplit("https://" + t).query)).get("X-Amz-Signature", "") for t in tokens
    )
    return outputs, extra


async def _doctor_channels(setup: Setup) -> dict[str, list[str]]:
    from asyncpool.cli.doctor import doctor

    outputs: dict[str, list[str]] = {}
    for as_json, channel in ((False, "doctor text"), (True, "doctor --json")):
        out = io.StringIO()
        await doctor(setup.dsn, None, 3.0, as_json, out)
        outputs[channel] = [out.getvalue()]
    return outputs


def _bench_channel(setup: Setup, secret: str) -> list[str]:
    """`asyncpool bench` in a process of its own (it runs its load in worker processes)."""
    env = {**os.environ, **setup.env}
    result = subprocess.run(
        [sys.executable, "-m", "asyncpool.cli", "bench", "--dsn", setup.dsn, "--clients", "1",
         "--processes", "1", "--duration", "0.2", "--acquire-timeout", "2", "--json"],
        check=False, capture_output=True, text=True, timeout=120, env=env,
    )
    return [result.stdout, result.stderr]


async def _check_input(source: str, servers: Servers, records: _Records,
                       monkeypatch: pytest.MonkeyPatch, bench_for: Callable[[str], bool]) -> None:
    for secret in SECRETS:
        setup = await setup_for(source, secret, servers)
        if setup is None:
            continue
        with monkeypatch.context() as env:
            for name, value in setup.env.items():
                env.setenv(name, value)
            records.texts.clear()
            outputs, extra = await _pool_channels(setup)
            if setup.cli:
                outputs.update(await _doctor_channels(setup))
                if bench_for(secret):
                    outputs["bench"] = await asyncio.to_thread(_bench_channel, setup, secret)
            outputs["logs at DEBUG"] = list(records.texts)
        for channel, texts in outputs.items():
            TALLY.check(secret, source, channel,
                        [servers.without_harness_paths(text) for text in texts], extra)
    leaks = [leak for leak in TALLY.leaks if leak.startswith(f"{source} /")]
    assert not leaks, f"{len(leaks)} leak(s):\n" + "\n".join(leaks[:10])


def _bench_every_secret() -> bool:
    return os.environ.get("ASYNCPOOL_TEST_BENCH_EVERY_SECRET", "") not in ("", "0")


@pytest.mark.parametrize("source", INPUTS)
async def test_no_piece_of_a_secret_in_any_output(source: str, servers: Servers,
                                                  records: _Records,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    # bench starts worker processes (seconds each): every secret through the inputs it reads
    # with ASYNCPOOL_TEST_BENCH_EVERY_SECRET=1, else the three with the most reserved characters.
    chosen = {SECRETS[-5], SECRETS[-2], SECRETS[-1]}

    def bench_for(secret: str) -> bool:
        return _bench_every_secret() or secret in chosen

    # botocore's parsed service models, shared by the AWS clients of this input's secrets, as
    # one IamAuth shares them among its own clients: the first secret's client parses them
    # (and logs that at DEBUG), the others skip ~0.2 s of JSON each. Credentials, signing,
    # requests and errors are each secret's own, as before.
    models = aws_client.ServiceModels()
    for module in (aws_client, iam):
        monkeypatch.setattr(module, "ServiceModels", lambda: models)
    await _check_input(source, servers, records, monkeypatch, bench_for)


async def _answer_scram_with_a_strange_nonce(reader: asyncio.StreamReader,
                                             writer: asyncio.StreamWriter) -> None:
    """A server that refuses TLS, asks for SCRAM-SHA-256 and answers the client's first message
    with a nonce that is not the client's: asyncpg fails inside its authentication code."""
    try:
        while True:
            size = int.from_bytes(await reader.readexactly(4), "big")
            body = await reader.readexactly(size - 4)
            if int.from_bytes(body[:4], "big") in (80877103, 80877104):  # SSL / GSS request
                writer.write(b"N")
                continue
            break  # the startup message
        mechanisms = b"SCRAM-SHA-256\0\0"
        writer.write(b"R" + (8 + len(mechanisms)).to_bytes(4, "big") + (10).to_bytes(4, "big")
                     + mechanisms)
        await reader.readexactly(1)
        size = int.from_bytes(await reader.readexactly(4), "big")
        await reader.readexactly(size - 4)
        reply = b"r=not-the-clients-nonce,s=QUJD,i=4096"
        writer.write(b"R" + (8 + len(reply)).to_bytes(4, "big") + (11).to_bytes(4, "big") + reply)
        await writer.drain()
        await reader.read(1)  # until the client goes
    except (OSError, asyncio.IncompleteReadError):
        pass
    finally:
        writer.close()


@pytest.mark.parametrize("how", ["open", "query", "bench contender"])
async def test_a_driver_error_of_any_class_carries_no_secret(how: str) -> None:
    """asyncpg turns whatever fails inside its authentication code into InternalClientError
    (here, a SCRAM reply it cannot use); its frames hold the connection parameters, password
    included. The pool raises a ConnectError that keeps none of it, as for the usual errors,
    and so do `asyncpool bench`'s raw asyncpg contenders (`GuardedLogin.connect_asyncpg`)."""
    secret = SECRETS[-1]
    server = await asyncio.start_server(_answer_scram_with_a_strange_nonce, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    dsn = f"postgresql://app:{quote(secret, safe='')}@127.0.0.1:{port}/app"
    try:
        if how == "bench contender":
            with pytest.raises(PoolError) as info:
                await GuardedLogin(dsn).connect_asyncpg(timeout=3, statement_cache_size=0)
        else:
            pool = Pool(dsn, min_size=1 if how == "open" else 0, acquire_timeout=5,
                        connect_timeout=3, telemetry=False)
            with pytest.raises(PoolError) as info:
                await pool.open()
                await pool.fetchval("SELECT 1")
            await pool.close()
    finally:
        server.close()
    error = info.value
    assert isinstance(error, ConnectError), error
    assert type(error) is ConnectError, error
    assert error.driver_error_class == "asyncpg.exceptions._base.InternalClientError"
    assert not error.transient  # trying again would fail the same way
    assert "invalid nonce" in str(info.value)
    tally = Tally()
    for channel, texts in error_texts(info.value).items():
        tally.check(secret, "a malformed SCRAM reply", channel, texts)
    assert tally.leaks == []


async def test_a_failed_login_carries_no_sslpassword_in_its_frames() -> None:
    """asyncpg reads ``sslpassword`` (the client key's passphrase) from the DSN only, so the DSN
    the connector hands it holds that secret: no frame that a failed login's error comes up
    through keeps it as a local (the connector's did)."""
    secret = SECRETS[-1]
    with socket.socket() as unused:  # a port nothing listens on
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    pool = Pool(f"postgresql://app@127.0.0.1:{port}/app?sslpassword={quote(secret, safe='')}",
                min_size=1, acquire_timeout=2, connect_timeout=1, telemetry=False)
    with pytest.raises(ConnectError) as info:
        await pool.open()
    await pool.close()
    texts = error_texts(info.value)
    assert texts["frame locals"]  # asyncpool's frames are there, and were looked at
    tally = Tally()
    for channel, found in texts.items():
        tally.check(secret, "a failed login with sslpassword", channel, found)
    assert tally.leaks == []


async def test_a_providers_error_keeps_its_frames_and_cause_but_not_asyncpgs() -> None:
    """A credentials provider's own error goes up as it is, but from the provider's frames on:
    asyncpg's frames, which called it, hold the DSN (``sslpassword`` with it) as locals."""
    secret = SECRETS[-1]

    class Failing(QuietProvider):
        async def password(self, target: object) -> str:
            try:
                raise OSError("no route to the secrets service")
            except OSError as exc:
                raise CredentialsError("could not fetch the password") from exc

    pool = Pool(f"postgresql://app@127.0.0.1:5432/app?sslpassword={quote(secret, safe='')}"
                "&sslmode=disable", credentials=Failing(), min_size=0, acquire_timeout=3,
                telemetry=False)
    await pool.open()
    with pytest.raises(CredentialsError, match="could not fetch") as info:
        await pool.fetchval("SELECT 1")
    await pool.close()
    assert isinstance(info.value.__cause__, OSError)  # the provider's own chain is kept
    names = []
    tb = info.value.__traceback__
    while tb is not None:
        names.append(tb.tb_frame.f_code.co_name)
        tb = tb.tb_next
    assert names[-1] == "password"  # the provider's frame, where it failed
    tally = Tally()
    for channel, found in error_texts(info.value).items():
        tally.check(secret, "a credentials provider's error", channel, found)
    assert tally.leaks == []


async def test_a_bug_in_the_callers_code_keeps_its_frame_and_no_secret() -> None:
    """An error that is not a configuration error, raised while the pool reads its options (a
    bug in a credentials provider's own code), keeps the frames of that code (the bug is
    there) and none of asyncpool's, which hold the DSN and its password."""
    secret = SECRETS[-1]

    class Buggy(QuietProvider):
        @property
        def requires_tls(self) -> bool:  # type: ignore[override]
            return bool(self.settings["tls"])  # type: ignore[attr-defined]  # the bug

    pool = Pool(f"postgresql://app:{quote(secret, safe='')}@127.0.0.1/app",  # type: ignore[call-overload]
                credentials=Buggy(), min_size=0, telemetry=False)
    with pytest.raises(AttributeError, match="settings") as info:
        await pool.open()
    await pool.close()
    frames = []
    tb = info.value.__traceback__
    while tb is not None:
        frames.append((tb.tb_frame.f_code.co_name, tb.tb_frame.f_code.co_filename))
        tb = tb.tb_next
    # The provider's frame right under the check's: asyncpool's frames between them are gone.
    assert frames[-1] == ("requires_tls", __file__)
    assert frames[-2][0] == "checked"
    assert frames[-2][1].endswith(f"{os.sep}asyncpool{os.sep}errors.py")
    tally = Tally()
    for channel, found in error_texts(info.value).items():
        tally.check(secret, "a bug in a provider", channel, found)
    assert tally.leaks == []


def _config_errors(secret: str, tmp: Path) -> dict[str, Callable[[], Any]]:
    """Calls that refuse their configuration, each given `secret` as a password (and the
    environment holding it, as Lambda's holds AWS session tokens)."""
    from asyncpool import create_pool
    from asyncpool.integrations.aws_lambda import lambda_config

    encoded = quote(secret, safe="")
    local = f"postgresql://app:{encoded}@localhost/app"
    remote = f"postgresql://app:{encoded}@db.example.com/app"
    env = {"ASYNCPOOL_DSN": local, "PGPASSWORD": secret, "AWS_SESSION_TOKEN": secret}

    async def opened(pool: Pool) -> None:
        await pool.open()

    return {
        "open(), a misspelt connect_kwargs key": lambda: asyncio.run(opened(Pool(
            local, connect_kwargs={"pasword": secret}, min_size=0, telemetry=False))),
        "PoolConfig(), a bad ssl": lambda: PoolConfig(
            dsn=local, connect_kwargs={"password": secret}, ssl="bogus"),  # type: ignore[arg-type]
        "PoolConfig.from_env(), a bad variable": lambda: PoolConfig.from_env(
            {**env, "ASYNCPOOL_MIN_SIZE": "abc"}),
        "PoolConfig.from_env(), a bad value": lambda: PoolConfig.from_env(
            {**env, "ASYNCPOOL_MAX_SIZE": "0"}),
        "lambda_config()": lambda: lambda_config(environ={**env, "ASYNCPOOL_MIN_SIZE": "-1"}),
        "PoolConfig.replace()": lambda: PoolConfig(dsn=local).replace(min_size=-1),
        "create_pool(), min_size > max_size": lambda: create_pool(
            local, password=secret, min_size=5, max_size=2),
        "open(), a password for another machine": lambda: asyncio.run(opened(Pool(
            remote, min_size=0, telemetry=False))),
        "open(), a client key that is not there": lambda: asyncio.run(opened(Pool(
            f"{local}?sslmode=verify-full&sslrootcert={quote(str(tmp / 'ca.pem'))}"
            f"&sslcert={quote(str(tmp / 'no.crt'))}&sslkey={quote(str(tmp / 'no.key'))}"
            f"&sslpassword={encoded}", min_size=0, telemetry=False))),
        "set_connect_args(), a password for another machine": lambda: Pool(
            local, min_size=0, telemetry=False).set_connect_args(remote, password=secret),
        # Type mistakes the checks once let through as Python's own errors, with every frame.
        "Pool(), require_auth as a list": lambda: Pool(  # type: ignore[call-overload]
            local, require_auth=["scram-sha-256"]),
        "Pool(), ssl_root_cert as a list": lambda: Pool(  # type: ignore[call-overload]
            local, ssl_root_cert=["ca.pem"]),
        "lambda_config(), require_auth as a list": lambda: lambda_config(
            environ=env, require_auth=["scram-sha-256"]),  # type: ignore[arg-type]
        "lambda_config(), function_timeout=0": lambda: lambda_config(function_timeout=0, environ=env),
        # A PoolConfigError naming the closest option; the frames are left out all the same.
        "PoolConfig(), a misspelt keyword": lambda: PoolConfig(
            dsn=local, max_szie=5),  # type: ignore[call-arg]
        "PoolConfig.from_env(), a misspelt keyword": lambda: PoolConfig.from_env(
            env, max_szie=5),  # type: ignore[call-arg]
        "lambda_config(), a misspelt keyword": lambda: lambda_config(
            environ=env, dsn=local, max_szie=5),  # type: ignore[call-arg]
        "PoolConfig.replace(), a misspelt keyword": lambda: PoolConfig(
            dsn=local).replace(max_szie=5),  # type: ignore[call-arg]
    }


@pytest.mark.parametrize("call", list(_config_errors("x", Path())), ids=str)
def test_a_refused_configuration_carries_no_secret(call: str, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A `PoolConfigError` from any call that takes the DSN, a password or the environment
    keeps none of them: not in its message, nothing chained to it, and no frame of asyncpool's
    in its traceback holds them (the frames it came through are left out: see
    `config_errors_without_frames`); the traceback's locals can be formatted
    (``capture_locals``, as error trackers do)."""
    secret = SECRETS[-1]
    monkeypatch.setenv("PGPASSWORD", secret)
    monkeypatch.setenv("AWS_SESSION_TOKEN", secret)
    (tmp_path / "ca.pem").write_text("")
    with pytest.raises(Exception) as info:  # noqa: PT011 (its type is checked next)
        _config_errors(secret, tmp_path)[call]()
    assert isinstance(info.value, PoolConfigError), info.value
    if "misspelt keyword" in call:
        assert "did you mean max_size=?" in str(info.value)
    error = info.value
    texts = error_texts(error)
    tb = error.__traceback__
    while tb is not None and tb.tb_frame.f_code.co_filename.startswith(_TESTS_DIR):
        tb = tb.tb_next  # the test's own frames hold the secret
    assert tb is not None
    texts["locals, formatted"] = ["".join(traceback.TracebackException(
        type(error), error, tb, capture_locals=True).format())]
    tally = Tally()
    for channel, found in texts.items():
        tally.check(secret, call, channel, [t.replace(str(tmp_path), "<tmp>") for t in found])
    assert tally.leaks == []


def test_the_check_finds_a_piece_and_not_a_chance_match_in_what_it_masks() -> None:
    """The masks (addresses, UUIDs, request ids, long numbers) hide chance matches only: a piece
    of a secret, raw or escaped, is still found next to them."""
    hidden = "jXkK\u00e9qkKx\U0001f511vvQw"
    chance = ["cred_times=[1796413839329400018]", "<Lease object at 0x7f0001f5110e90>"]
    tally = Tally()
    tally.check(hidden, "planted", "chance", chance)
    assert tally.leaks == []
    planted = ("token=...qkKx...",
               "t=1796413839329400018 \\U0001f511", "jXkK%C3%A9")
    for leaked in planted:
        tally = Tally()
        tally.check(hidden, "planted", "text", [*chance, leaked])
        assert len(tally.leaks) == 1, leaked


def test_summary_of_what_was_checked() -> None:
    """Runs after the tests above: the numbers the issue cites."""
    if not TALLY.checks:
        pytest.skip("run with the channel tests above")
    line = (
        f"secret channels: {len(TALLY.secrets)} secrets x {len(TALLY.inputs)} inputs x "
        f"{len(TALLY.channels)} channels = {TALLY.checks} (secret, input, channel) checks, "
        f"{TALLY.pieces} pieces looked for; channels: {', '.join(sorted(TALLY.channels))}"
    )
    print("\n" + line)
    assert not TALLY.leaks, line
    assert len(TALLY.secrets) == len(SECRETS), line
