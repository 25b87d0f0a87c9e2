"""SecretsManagerAuth against a local Secrets Manager (moto, over real HTTP): the TTL cache, one
read shared by concurrent logins, re-reading on a rejected login, and errors that say what to fix
without showing the secret."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import re
import secrets
from collections.abc import AsyncIterator, Iterator
from typing import Any

import asyncpg
import pytest

from asyncpool import (
    AuthenticationError,
    CredentialsError,
    Pool,
    PoolClosedError,
    PoolObserver,
    SecretsManagerAuth,
    StaticPassword,
    Target,
)
from asyncpool.observer import ConnectAttempt
from asyncpool.testing import PgBouncerServer, PostgresServer
from asyncpool.testing.aws_endpoint import SESSION_TOKEN, LocalAwsEndpoint, aws_environment
from asyncpool.testing.binaries import current_pgbouncer, system_pgbouncer
from asyncpool.testing.ports import free_port
from asyncpool.testing.process import chown_tree
from asyncpool.testing.scram import scram_secret
from asyncpool.testing.sync import run_sync

REGION = "us-east-1"
TARGET = Target("db.example", 5432, "orders_app", "orders")


@pytest.fixture(scope="module")
def local_aws() -> Iterator[LocalAwsEndpoint]:
    with LocalAwsEndpoint() as endpoint:
        yield endpoint


class SecretStore:
    """Creates and rotates secrets in the local Secrets Manager, as a rotation Lambda would."""

    def __init__(self, client: Any) -> None:
        self.client = client

    async def create(self, value: dict[str, Any] | str, region_tag: str = "") -> str:
        name = f"test/{region_tag}{secrets.token_hex(6)}"
        text = value if isinstance(value, str) else json.dumps(value)
        await self.client.create_secret(Name=name, SecretString=text)
        return name

    async def put(self, name: str, value: dict[str, Any]) -> None:
        await self.client.put_secret_value(SecretId=name, SecretString=json.dumps(value))


@pytest.fixture
async def store(aws: None, local_aws: LocalAwsEndpoint) -> AsyncIterator[SecretStore]:
    from aiobotocore.session import AioSession

    async with AioSession().create_client(
        "secretsmanager", region_name=REGION, endpoint_url=local_aws.url
    ) as client:
        yield SecretStore(client)


def _auth(local_aws: LocalAwsEndpoint, secret_id: str, **options: Any) -> SecretsManagerAuth:
    options.setdefault("region", REGION)
    return SecretsManagerAuth(secret_id, endpoint_url=local_aws.url, **options)


@contextlib.contextmanager
def answering_late(endpoint: LocalAwsEndpoint, seconds: float) -> Iterator[None]:
    """The local AWS endpoint answers each request `seconds` late (a slow or hanging one)."""
    endpoint.delay = seconds
    try:
        yield
    finally:
        endpoint.delay = 0.0


def _credentials(password: str, user: str = TARGET.user) -> dict[str, Any]:
    return {"username": user, "password": password, "engine": "postgres", "port": 5432}


# -- caching -----------------------------------------------------------------------------------


async def test_secret_is_read_once_then_served_from_cache(
    store: SecretStore, local_aws: LocalAwsEndpoint
) -> None:
    password = secrets.token_urlsafe(16)
    name = await store.create(_credentials(password))
    auth = _auth(local_aws, name, ttl=3600)
    before = local_aws.count("GetSecretValue")
    try:
        first = await asyncio.gather(*(auth.password(TARGET) for _ in range(10)))
        again = [await auth.password(TARGET) for _ in range(5)]
    finally:
        await auth.close()
    assert set(first) == set(again) == {password}
    assert local_aws.count("GetSecretValue") - before == 1


async def test_secret_is_read_again_after_the_ttl(
    store: SecretStore, local_aws: LocalAwsEndpoint
) -> None:
    name = await store.create(_credentials("first-password"))
    auth = _auth(local_aws, name, ttl=0.2)
    try:
        assert await auth.password(TARGET) == "first-password"
        await store.put(name, _credentials("second-password"))
        assert await auth.password(TARGET) == "first-password"  # still cached
        await asyncio.sleep(0.3)
        assert await auth.password(TARGET) == "second-password"
    finally:
        await auth.close()


async def test_expired_cache_and_unreachable_secret_keeps_the_copy_and_warns(
    store: SecretStore, local_aws: LocalAwsEndpoint, caplog: pytest.LogCaptureFixture
) -> None:
    name = await store.create(_credentials("kept-password"))
    auth = _auth(local_aws, name, ttl=0.2)
    try:
        assert await auth.password(TARGET) == "kept-password"
        await store.client.delete_secret(SecretId=name, ForceDeleteWithoutRecovery=True)
        await asyncio.sleep(0.3)
        with caplog.at_level(logging.WARNING, logger="asyncpool.credentials"):
            assert await auth.password(TARGET) == "kept-password"
        assert f"reading secret {name!r} failed, using the copy" in caplog.text
        assert "kept-password" not in caplog.text
        # A rejected login, though, needs a fresh read: now the failure surfaces.
        with pytest.raises(CredentialsError, match="no such secret"):
            await auth.refresh(TARGET)
    finally:
        await auth.close()


async def test_a_read_that_hangs_after_the_ttl_keeps_the_copy_in_use(
    store: SecretStore, local_aws: LocalAwsEndpoint, caplog: pytest.LogCaptureFixture
) -> None:
    """Secrets Manager answering nothing (botocore gives up only after its own timeouts, longer
    than a short acquire_timeout): every login's read was cancelled by its time limit before
    it could fail over to the copy, so no new connection could be opened at all. One read goes
    on in the background; logins wait for it at most STALE_WAIT, then use the copy."""
    from asyncpool.credentials.secrets_manager import STALE_WAIT

    name = await store.create(_credentials("kept-password"))
    auth = _auth(local_aws, name, ttl=0.2)
    try:
        assert await auth.password(TARGET) == "kept-password"
        await asyncio.sleep(0.3)
        before = local_aws.count("GetSecretValue")
        loop = asyncio.get_running_loop()
        started = loop.time()
        with (answering_late(local_aws, STALE_WAIT + 3),
              caplog.at_level(logging.WARNING, logger="asyncpool.credentials")):
            burst = await asyncio.gather(*(auth.password(TARGET) for _ in range(5)))
            assert burst == ["kept-password"] * 5
            assert loop.time() - started < STALE_WAIT + 0.5
            started = loop.time()
            assert await auth.password(TARGET) == "kept-password"
            assert loop.time() - started < 0.1  # the read is known to be slow: no wait
        assert caplog.text.count("takes longer than") == 1
        assert "kept-password" not in caplog.text
        assert local_aws.count("GetSecretValue") - before == 1
    finally:
        await auth.close()


async def test_a_close_during_a_shared_read_does_not_fail_the_others_waiting(
    store: SecretStore, local_aws: LocalAwsEndpoint
) -> None:
    """A provider shared by two pools, one closed while the other's login waits for the read:
    the read was cancelled (and the other login got CancelledError from a task nobody
    cancelled); the waiting login now reads again with a new client."""
    name = await store.create(_credentials("shared-password"))
    auth = _auth(local_aws, name)
    try:
        with answering_late(local_aws, 1.0):
            waiting = asyncio.ensure_future(auth.password(TARGET))
            await asyncio.sleep(0.3)
            await auth.close()  # the other pool closing
        assert await asyncio.wait_for(waiting, 5) == "shared-password"
        assert asyncio.current_task().cancelling() == 0  # type: ignore[union-attr]
    finally:
        await auth.close()


@pytest.mark.parametrize("how", ["close", "terminate"])
async def test_a_replaced_provider_closed_with_the_pool_under_a_login_gives_its_caller_a_clear_error(
    store: SecretStore, local_aws: LocalAwsEndpoint, postgres: PostgresServer,
    caplog: pytest.LogCaptureFixture, how: str
) -> None:
    """A provider replaced (`set_connect_args`) while a login still waits for its read, then the
    pool closed (or terminated): the pool closes the replaced provider, AWS client included,
    under the read. The login's caller gets PoolClosedError, and nothing else surfaces: no
    aiobotocore error of the closed client, logged or left unretrieved in a task. The read
    logged its closed client's error as the service's ("reading secret ... failed, using the
    copy read 3s ago for 30s more: HTTPClientError ... 'NoneType' object has no attribute
    'get'") and put the copy back into the closed provider."""
    password = postgres.app.password
    dsn = postgres.dsn(sslmode="disable").replace(f":{password}@", "@")
    # Its copy soon out of date: the caller's login waits (up to STALE_WAIT) for a re-read.
    replaced = _auth(local_aws, await store.create(_credentials(password, "app")), ttl=0.2)
    loop = asyncio.get_running_loop()
    unhandled: list[dict[str, Any]] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _, context: unhandled.append(context))
    try:
        pool = Pool(dsn, min_size=0, max_size=1, credentials=replaced, telemetry=False)
        await pool.open()
        await asyncio.sleep(0.3)
        reads = local_aws.count("GetSecretValue")
        with answering_late(local_aws, 2.0), caplog.at_level(logging.DEBUG):
            caller = asyncio.ensure_future(pool.fetchval("SELECT 1"))
            while local_aws.count("GetSecretValue") == reads:
                await asyncio.sleep(0.01)
            pool.set_connect_args(dsn, credentials=StaticPassword(password))
            if how == "close":
                await pool.close()
            else:
                pool.terminate()
            seen: BaseException | int = (await asyncio.gather(caller, return_exceptions=True))[0]
            await asyncio.sleep(2.5)  # the read's answer comes to the closed client
            gc.collect()  # (asyncio reports an unretrieved exception when its task is collected)
            await asyncio.sleep(0)
        assert isinstance(seen, PoolClosedError), repr(seen)
        assert unhandled == []
        assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
        # Closed with the pool: its client, and the secret (not put back by the read).
        assert replaced._client._client is None
        assert replaced._secret is None
    finally:
        loop.set_exception_handler(previous)


async def test_a_refresh_given_up_by_its_login_still_updates_the_copy(
    store: SecretStore, local_aws: LocalAwsEndpoint
) -> None:
    """After a rotation, a refused login's re-read that outlives the login (AWS slower than
    acquire_timeout) was cancelled with it, and the refused password stayed in use until the
    ttl ran out. The read goes on and its copy is kept for the next login."""
    name = await store.create(_credentials("old-password"))
    auth = _auth(local_aws, name, ttl=3600)
    try:
        assert await auth.password(TARGET) == "old-password"
        await store.put(name, _credentials("new-password"))
        with answering_late(local_aws, 0.6):
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(auth.refresh(TARGET), 0.2)
            await asyncio.sleep(0.8)
        before = local_aws.count("GetSecretValue")
        assert await auth.password(TARGET) == "new-password"
        assert local_aws.count("GetSecretValue") == before  # the kept copy, no new read
    finally:
        await auth.close()


async def test_open_reads_the_secret_within_acquire_timeout(
    store: SecretStore, local_aws: LocalAwsEndpoint
) -> None:
    """open() reads the secret first (warm); an endpoint that does not answer made it wait for
    every retry of the AWS client (11 s measured, past a Lambda INIT's 10 s)."""
    name = await store.create(_credentials("pw"))
    pool = Pool("postgresql://orders_app@127.0.0.1/orders", credentials=_auth(local_aws, name),
                min_size=0, acquire_timeout=1.0, telemetry=False)
    loop = asyncio.get_running_loop()
    started = loop.time()
    try:
        with answering_late(local_aws, 4.0), pytest.raises(
                CredentialsError, match=r"gave no credential within acquire_timeout=1s \(its "
                r"first read, at open\(\)\)"):
            await pool.open()
        # Within acquire_timeout (1 s) and the loop's lag on a loaded machine (1.502 s in a CI
        # run, 2.62 s at a load of 13), before the endpoint's late answer (4 s) or the client's
        # retries (11 s).
        assert loop.time() - started < 3.5
    finally:
        await pool.close()


# -- re-reading after a rejected login -------------------------------------------------------


async def test_refresh_reads_again_and_says_whether_a_retry_can_help(
    store: SecretStore, local_aws: LocalAwsEndpoint
) -> None:
    name = await store.create(_credentials("old-password"))
    auth = _auth(local_aws, name, ttl=3600)
    try:
        assert await auth.password(TARGET) == "old-password"
        await store.put(name, _credentials("new-password"))
        before = local_aws.count("GetSecretValue")
        assert await auth.refresh(TARGET) is True
        assert await auth.password(TARGET) == "new-password"
        # Rejected again with an unchanged secret: one read, and no point retrying.
        assert await auth.refresh(TARGET) is False
        assert local_aws.count("GetSecretValue") - before == 2
    finally:
        await auth.close()


def test_a_provider_kept_across_event_loops_serves_a_burst_on_each(
        aws: None, local_aws: LocalAwsEndpoint) -> None:
    """A module-level provider used by a pool per asyncio.run (tests, Lambda managed
    instances): its lock, waited on under the first loop, refused the second ("bound to a
    different event loop") once logins there contended for a read."""
    import time

    from aiobotocore.session import AioSession

    name = f"test/loops{secrets.token_hex(6)}"
    password = secrets.token_urlsafe(16)

    async def create() -> None:
        async with AioSession().create_client(
                "secretsmanager", region_name=REGION, endpoint_url=local_aws.url) as client:
            await client.create_secret(Name=name, SecretString=json.dumps(_credentials(password)))

    run_sync(create())
    auth = _auth(local_aws, name, ttl=0.01)

    async def burst() -> list[str]:
        try:
            return list(await asyncio.gather(*(auth.password(TARGET) for _ in range(10))))
        finally:
            await auth.close()

    for _ in range(2):
        time.sleep(0.02)  # past the ttl: the burst contends for one read
        assert asyncio.run(burst()) == [password] * 10


async def test_logins_rejected_together_share_one_read(
    store: SecretStore, local_aws: LocalAwsEndpoint
) -> None:
    name = await store.create(_credentials("old-password"))
    auth = _auth(local_aws, name, ttl=3600)
    all_have_passwords = asyncio.Barrier(8)

    async def rejected_login() -> tuple[str, bool, str]:
        used = await auth.password(TARGET)
        await all_have_passwords.wait()
        retry = await auth.refresh(TARGET)
        return used, retry, await auth.password(TARGET)

    try:
        await auth.warm(TARGET)
        await store.put(name, _credentials("new-password"))
        before = local_aws.count("GetSecretValue")
        results = await asyncio.gather(*(rejected_login() for _ in range(8)))
    finally:
        await auth.close()
    assert results == [("old-password", True, "new-password")] * 8
    assert local_aws.count("GetSecretValue") - before == 1


async def test_logins_rejected_together_with_an_unchanged_secret_make_no_retry(
    store: SecretStore, local_aws: LocalAwsEndpoint
) -> None:
    """A single-user rotation sets the new password on the database (setSecret) before it makes
    it AWSCURRENT (finishSecret): logins refused in between re-read the same password. The first
    re-read counted as a newer copy, so every other login refused with it retried with the very
    password just refused. One read, and no retry for any of them."""
    name = await store.create(_credentials("old-password"))
    auth = _auth(local_aws, name, ttl=3600)
    all_have_passwords = asyncio.Barrier(6)

    async def rejected_login() -> bool:
        await auth.password(TARGET)
        await all_have_passwords.wait()
        return await auth.refresh(TARGET)

    try:
        await auth.warm(TARGET)
        before = local_aws.count("GetSecretValue")
        results = await asyncio.gather(*(rejected_login() for _ in range(6)))
    finally:
        await auth.close()
    assert results == [False] * 6
    assert local_aws.count("GetSecretValue") - before == 1


async def test_a_ttl_reread_of_the_same_password_does_not_stop_a_refused_login_reading_again(
    store: SecretStore, local_aws: LocalAwsEndpoint
) -> None:
    """Login A gets the password; the ttl runs out and login B's read finds the same password;
    then the rotation. A's refusal took B's read for a newer copy: no read, a retry with the
    refused password, and an AuthenticationError though the secret held the new one."""
    name = await store.create(_credentials("old-password"))
    auth = _auth(local_aws, name, ttl=0.2)
    a_has_password = asyncio.Event()
    rotated = asyncio.Event()

    async def login_a() -> tuple[str, bool, str]:
        used = await auth.password(TARGET)
        a_has_password.set()
        await rotated.wait()
        retry = await auth.refresh(TARGET)  # refused: the database has the new password
        return used, retry, await auth.password(TARGET)

    async def login_b() -> str:
        await a_has_password.wait()
        await asyncio.sleep(0.3)  # past the ttl
        return await auth.password(TARGET)

    try:
        a = asyncio.ensure_future(login_a())
        assert await asyncio.ensure_future(login_b()) == "old-password"
        await store.put(name, _credentials("new-password"))
        rotated.set()
        assert await a == ("old-password", True, "new-password")
    finally:
        await auth.close()


async def test_a_login_giving_up_its_re_read_leaves_it_to_the_others_refused_with_it(
    store: SecretStore, local_aws: LocalAwsEndpoint
) -> None:
    """The login doing the shared re-read runs out of time (AWS slow): the next one refused with
    it started a read of its own and waited for it too."""
    name = await store.create(_credentials("old-password"))
    auth = _auth(local_aws, name, ttl=3600)
    all_have_passwords = asyncio.Barrier(4)
    order: list[int] = []

    async def rejected_login(i: int) -> tuple[bool, str]:
        await auth.password(TARGET)
        await all_have_passwords.wait()
        order.append(i)
        retry = await auth.refresh(TARGET)
        return retry, await auth.password(TARGET)

    try:
        await auth.warm(TARGET)
        await store.put(name, _credentials("new-password"))
        before = local_aws.count("GetSecretValue")
        with answering_late(local_aws, 0.5):
            logins = [asyncio.ensure_future(rejected_login(i)) for i in range(4)]
            await asyncio.sleep(0.2)
            logins[order[0]].cancel()  # the one whose read it is
            results = await asyncio.gather(*logins, return_exceptions=True)
    finally:
        await auth.close()
    assert isinstance(results.pop(order[0]), asyncio.CancelledError)
    assert results == [(True, "new-password")] * 3
    assert local_aws.count("GetSecretValue") - before == 1


async def test_logins_rejected_together_share_one_failed_read(
    store: SecretStore, local_aws: LocalAwsEndpoint
) -> None:
    """The re-read for logins rejected together fails (the secret is gone; throttling or an
    outage alike): each waiting login made its own read, one after the other, of a service
    already failing, and most ran out of time instead of seeing the error. They share it."""
    name = await store.create(_credentials("old-password"))
    auth = _auth(local_aws, name, ttl=3600)
    all_have_passwords = asyncio.Barrier(8)

    async def rejected_login() -> None:
        await auth.password(TARGET)
        await all_have_passwords.wait()
        await auth.refresh(TARGET)

    try:
        await auth.warm(TARGET)
        await store.client.delete_secret(SecretId=name, ForceDeleteWithoutRecovery=True)
        before = local_aws.count("GetSecretValue")
        results = await asyncio.gather(*(rejected_login() for _ in range(8)),
                                       return_exceptions=True)
        assert all(isinstance(r, CredentialsError) and "no such secret" in str(r)
                   for r in results), results
        assert local_aws.count("GetSecretValue") - before == 1
        # A later rejection reads again.
        with pytest.raises(CredentialsError, match="no such secret"):
            await auth.refresh(TARGET)
        assert local_aws.count("GetSecretValue") - before == 2
    finally:
        await auth.close()


# -- errors ------------------------------------------------------------------------------------


async def test_missing_secret_names_the_secret_and_the_region(
    aws: None, local_aws: LocalAwsEndpoint
) -> None:
    auth = _auth(local_aws, "test/does-not-exist")
    with pytest.raises(CredentialsError) as info:
        await auth.warm(TARGET)
    await auth.close()
    message = str(info.value)
    assert "'test/does-not-exist'" in message
    assert "no such secret in us-east-1" in message
    assert "check the name or ARN and the region" in message


async def test_a_missing_secret_names_the_default_region_it_was_looked_for_in(
    aws: None, local_aws: LocalAwsEndpoint, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_REGION", REGION)
    auth = _auth(local_aws, "test/does-not-exist", region=None)
    with pytest.raises(CredentialsError, match=rf"no such secret in region '{REGION}' \(the "
                                               r"default, from AWS_REGION\)"):
        await auth.warm(TARGET)
    await auth.close()


async def test_wrong_region_does_not_find_the_secret_and_says_to_check_the_region(
    store: SecretStore, local_aws: LocalAwsEndpoint
) -> None:
    password = secrets.token_urlsafe(16)
    name = await store.create(_credentials(password))
    auth = _auth(local_aws, name, region="eu-west-1")
    with pytest.raises(CredentialsError, match=r"no such secret in eu-west-1.*the region"):
        await auth.password(TARGET)
    await auth.close()


def test_region_contradicting_the_arn_is_refused_at_once() -> None:
    arn = "arn:aws:secretsmanager:us-east-1:123456789012:secret:db/orders-AbCdEf"
    with pytest.raises(CredentialsError, match=r"is in 'us-east-1': pass region='us-east-1'"):
        SecretsManagerAuth(arn, region="eu-west-1")
    assert SecretsManagerAuth(arn).region == "us-east-1"


@pytest.mark.parametrize(("arguments", "match"), [
    ({"ttl": float("nan")}, r"ttl=nan: must be a number of seconds > 0"),
    ({"ttl": True}, r"ttl=True: must be a number of seconds > 0"),
    ({"ttl": "300"}, r"ttl='300': must be a number of seconds > 0"),
    ({"ttl": None}, r"ttl=None: must be a number of seconds > 0"),
    ({"secret_id": 5}, r"secret_id=5: must be the secret's name or ARN"),
    ({"secret_id": ""}, r"secret_id='': must be the secret's name or ARN"),
    ({"key": 5}, r"key=5: must be the name of the JSON field"),
    ({"check_username": "false"}, r"check_username='false': must be True or False"),
])
def test_arguments_the_provider_would_misread_are_refused_when_it_is_made(
        arguments: dict[str, Any], match: str) -> None:
    """Taken as they were, NaN kept the first read for ever, True re-read the secret every
    second, "300", None and 5 failed with a bare TypeError (or at the first read), an empty
    name at the first read, and check_username="false" checked the username."""
    given: dict[str, Any] = {"secret_id": "db/orders", "region": REGION, **arguments}
    with pytest.raises(CredentialsError, match=match):
        SecretsManagerAuth(**given)


def test_a_ttl_of_another_number_type_is_kept_as_a_float() -> None:
    """A Decimal was kept, and failed the first read (a float clock plus a Decimal)."""
    from decimal import Decimal

    half: Any = Decimal("0.5")  # (typed float, as the pool's times are; taken as theirs are)
    ttl = SecretsManagerAuth("db/orders", region=REGION, ttl=half).ttl
    assert (type(ttl), ttl) == (float, 0.5)
    assert SecretsManagerAuth("db/orders", region=REGION, ttl=float("inf")).ttl == float("inf")


async def test_secret_that_is_not_json_is_explained_without_quoting_it(
    store: SecretStore, local_aws: LocalAwsEndpoint
) -> None:
    raw = "hunter2-not-json"
    name = await store.create(raw)
    auth = _auth(local_aws, name)
    with pytest.raises(CredentialsError) as info:
        await auth.password(TARGET)
    message = str(info.value)
    assert "is not JSON" in message
    assert "key=None" in message
    assert raw not in message
    assert info.value.__cause__ is None
    # Not chained at all: the decoder's error holds the secret (.doc), its frames too (#23).
    assert info.value.__context__ is None
    assert info.value.__traceback__ is not None
    tb = info.value.__traceback__.tb_next  # (the first frame is this test's)
    while tb is not None:
        assert raw not in repr(tb.tb_frame.f_locals)
        tb = tb.tb_next
    # As the message says: key=None takes the whole string as the password.
    assert await _auth(local_aws, name, key=None).password(TARGET) == raw
    await auth.close()


async def test_missing_field_lists_field_names_not_values(
    store: SecretStore, local_aws: LocalAwsEndpoint
) -> None:
    name = await store.create({"username": TARGET.user, "pwd": "s3cret-value"})
    auth = _auth(local_aws, name)
    with pytest.raises(CredentialsError) as info:
        await auth.password(TARGET)
    await auth.close()
    message = str(info.value)
    assert "no string field 'password'" in message
    assert "fields: pwd, username" in message
    assert "s3cret-value" not in message


async def test_secret_for_another_user_is_refused(
    store: SecretStore, local_aws: LocalAwsEndpoint
) -> None:
    name = await store.create(_credentials("pw-of-someone-else", user="orders_app_clone"))
    auth = _auth(local_aws, name)
    with pytest.raises(CredentialsError) as info:
        await auth.password(TARGET)
    await auth.close()
    message = str(info.value)
    assert "is for user 'orders_app_clone' but the pool logs in as 'orders_app'" in message
    assert "single-user rotation" in message
    assert "pw-of-someone-else" not in message


async def test_no_aws_credentials_says_where_they_come_from(
    monkeypatch: pytest.MonkeyPatch, local_aws: LocalAwsEndpoint
) -> None:
    for name, value in aws_environment(credentials=False).items():
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    auth = _auth(local_aws, "test/anything")
    with pytest.raises(CredentialsError, match=r"no AWS credentials found.*execution role"):
        await auth.warm(TARGET)
    await auth.close()


async def test_no_region_says_how_to_give_one(aws: None, local_aws: LocalAwsEndpoint) -> None:
    auth = SecretsManagerAuth("test/plain-name", endpoint_url=local_aws.url)
    with pytest.raises(CredentialsError, match=re.escape("pass region='...', give the secret's ARN")):
        await auth.warm(TARGET)
    await auth.close()


async def test_unreachable_endpoint_suggests_the_vpc_route(aws: None) -> None:
    auth = SecretsManagerAuth(
        "test/x", region=REGION, endpoint_url=f"http://127.0.0.1:{free_port()}"
    )
    with pytest.raises(CredentialsError, match=r"could not reach AWS in region 'us-east-1'.*VPC"):
        await auth.warm(TARGET)
    await auth.close()


async def test_debug_logging_everywhere_never_shows_the_secret(
    store: SecretStore, local_aws: LocalAwsEndpoint, caplog: pytest.LogCaptureFixture
) -> None:
    password = secrets.token_urlsafe(16)
    name = await store.create(_credentials(password))
    caplog.set_level(logging.DEBUG)  # botocore logs every response body at DEBUG
    auth = _auth(local_aws, name)
    try:
        assert await auth.password(TARGET) == password
    finally:
        await auth.close()
    assert "botocore.parsers" in {r.name for r in caplog.records}  # the records exist, redacted
    assert password not in caplog.text
    assert password not in repr(auth)
    # Nor what would let a log reader replay the signed GetSecretValue request (#23): its
    # Authorization header, signature, session token and canonical request.
    assert "botocore.endpoint" in {r.name for r in caplog.records}
    for revealing in (SESSION_TOKEN, "Signature=", "Authorization", "CanonicalRequest",
                      "StringToSign", "x-amz-security-token"):
        assert revealing not in caplog.text


def test_ttl_must_be_positive() -> None:
    with pytest.raises(CredentialsError, match="ttl=0"):
        SecretsManagerAuth("x", region=REGION, ttl=0)


# -- rotation through the real servers ---------------------------------------------------------
# A rotation Lambda sets the role's new password on the database, then makes it the secret's
# AWSCURRENT version. Connections the pool opens afterwards start with the cached (old) password,
# are refused, read the secret again and retry once.


class Role:
    """A login role of the test PostgreSQL whose password the test rotates."""

    def __init__(self, postgres: PostgresServer) -> None:
        self.postgres = postgres
        self.name = f"rot_{secrets.token_hex(4)}"

    async def set_password(self, password: str, *, create: bool = False) -> None:
        conn = await asyncpg.connect(self.postgres.admin_dsn)
        try:
            verb = "CREATE ROLE" if create else "ALTER ROLE"
            await conn.execute(f"{verb} {self.name} LOGIN PASSWORD '{scram_secret(password)}'")
        finally:
            await conn.close()


@pytest.fixture(scope="module", params=["legacy", "current"])
def auth_query_pgbouncer(
    request: pytest.FixtureRequest, postgres: PostgresServer
) -> Iterator[PgBouncerServer]:
    """A PgBouncer that looks each login's SCRAM secret up in PostgreSQL (auth_query).

    That is how a rotation reaches PgBouncer. Secrets copied into auth_file do not work for
    this: measured on 1.18 and 1.24, after a RELOAD with the new secret PgBouncer kept accepting
    the old password (it caches the SCRAM keys of a user it has logged in) and refused the new.
    """
    binary = system_pgbouncer() if request.param == "legacy" else current_pgbouncer()
    server = PgBouncerServer(
        binary,
        postgres,
        {
            "default_pool_size": 3,
            "max_db_connections": 3,
            "auth_user": postgres.superuser.name,
            "auth_query": "SELECT usename, passwd FROM pg_shadow WHERE usename = $1",
        },
    )
    server.start()
    try:
        # PgBouncer logs in as auth_user with the password itself, not a SCRAM secret.
        assert server.workdir is not None
        userlist = server.workdir / "userlist.txt"
        kept = [
            line for line in userlist.read_text().splitlines()
            if not line.startswith(f'"{postgres.superuser.name}" ')
        ]
        superuser = f'"{postgres.superuser.name}" "{postgres.superuser.password}"'
        userlist.write_text("\n".join([*kept, superuser]) + "\n")
        chown_tree(server.workdir)
        run_sync(server.admin("RELOAD"))
        yield server
    finally:
        server.stop()


async def _rotate_and_connect(
    store: SecretStore, local_aws: LocalAwsEndpoint, role: Role, host: str, port: int
) -> None:
    passwords = [secrets.token_urlsafe(18) for _ in range(4)]
    await role.set_password(passwords[0], create=True)
    name = await store.create(_credentials(passwords[0], user=role.name))
    auth = _auth(local_aws, name, ttl=3600)
    reads = local_aws.count
    pool = Pool(f"postgresql://{role.name}@{host}:{port}/app", credentials=auth, min_size=1,
                max_size=3, telemetry=False)
    async with pool:
        assert await pool.fetchval("SELECT current_user") == role.name
        start = reads("GetSecretValue")
        assert start >= 1

        # Rotation: the next new connection is refused once, reads the secret, gets in.
        await role.set_password(passwords[1])
        await store.put(name, _credentials(passwords[1], user=role.name))
        pool.expire_all()
        assert await pool.fetchval("SELECT current_user") == role.name
        assert reads("GetSecretValue") - start == 1

        # Another rotation hits three new connections at once: all get in, with one read.
        await role.set_password(passwords[2])
        await store.put(name, _credentials(passwords[2], user=role.name))
        pool.expire_all()
        held = await asyncio.gather(*(pool.acquire() for _ in range(3)))
        assert [await c.fetchval("SELECT current_user") for c in held] == [role.name] * 3
        for conn in held:
            await pool.release(conn)
        assert reads("GetSecretValue") - start == 2

        # A rotation that changed the database but never the secret: no retry can help.
        await role.set_password(passwords[3])
        pool.expire_all()
        with pytest.raises(AuthenticationError) as info:
            await pool.fetchval("SELECT 1")
        assert reads("GetSecretValue") - start == 3
    message = str(info.value)
    assert f"the password in secret {name!r}" in message
    assert "was rejected, also after reading the secret again" in message
    assert not any(p in message for p in passwords)


async def test_rotation_on_postgres_is_followed_by_new_connections(
    store: SecretStore, local_aws: LocalAwsEndpoint, postgres: PostgresServer
) -> None:
    await _rotate_and_connect(store, local_aws, Role(postgres), postgres.host, postgres.port)


async def test_rotation_behind_pgbouncer_is_followed_by_new_connections(
    store: SecretStore, local_aws: LocalAwsEndpoint, auth_query_pgbouncer: PgBouncerServer
) -> None:
    bouncer = auth_query_pgbouncer
    await _rotate_and_connect(store, local_aws, Role(bouncer.postgres), bouncer.host, bouncer.port)


class Attempts(PoolObserver):
    """The errors of every connection attempt the pool reports (None: it got in)."""

    def __init__(self) -> None:
        self.errors: list[str | None] = []

    def connect_attempted(self, attempt: ConnectAttempt) -> None:
        self.errors.append(None if attempt.error is None else type(attempt.error).__name__)


async def test_logins_refused_during_a_rotation_are_not_retried_with_the_refused_password(
    store: SecretStore, local_aws: LocalAwsEndpoint, postgres: PostgresServer
) -> None:
    """Between a single-user rotation's setSecret (the database changes) and finishSecret (the
    secret does), logins refused together re-read an unchanged secret: each is refused once, with
    one read for them all; after finishSecret the next login gets in."""
    role = Role(postgres)
    old, new = secrets.token_urlsafe(18), secrets.token_urlsafe(18)
    await role.set_password(old, create=True)
    name = await store.create(_credentials(old, user=role.name))
    auth = _auth(local_aws, name, ttl=3600)
    attempts = Attempts()
    pool = Pool(f"postgresql://{role.name}@{postgres.host}:{postgres.port}/app", credentials=auth,
                min_size=0, max_size=4, acquire_timeout=10, observers=[attempts], telemetry=False)
    async with pool:
        await role.set_password(new)  # setSecret: the secret still says `old`
        before = local_aws.count("GetSecretValue")
        with answering_late(local_aws, 0.3):  # all four refused while the re-read runs
            results = await asyncio.gather(*(pool.fetchval("SELECT 1") for _ in range(4)),
                                           return_exceptions=True)
        assert all(isinstance(r, AuthenticationError) for r in results), results
        assert attempts.errors == ["AuthenticationError"] * 4
        assert local_aws.count("GetSecretValue") - before == 1

        await store.put(name, _credentials(new, user=role.name))  # finishSecret
        assert await pool.fetchval("SELECT current_user") == role.name
        assert attempts.errors[4:] == ["AuthenticationError", None]
        assert local_aws.count("GetSecretValue") - before == 2


@pytest.mark.parametrize(
    ("code", "advice"),
    [
        ("ExpiredTokenException", "the AWS session credentials have expired"),
        ("UnrecognizedClientException", "AWS rejected the credentials"),
        ("AccessDeniedException", "access denied (not allowed here); grant the role"),
        ("ThrottlingException", "AWS said ThrottlingException: not allowed here"),
    ],
)
def test_aws_error_codes_become_advice(code: str, advice: str) -> None:
    """Answers the local endpoint cannot give (it accepts any credentials)."""
    from botocore.exceptions import ClientError

    from asyncpool.credentials.aws_client import aws_error

    exc = ClientError({"Error": {"Code": code, "Message": "not allowed here"}}, "GetSecretValue")
    error = aws_error(exc, "reading secret 'db/orders'", REGION)
    assert str(error).startswith("reading secret 'db/orders': ")
    assert advice in str(error)
