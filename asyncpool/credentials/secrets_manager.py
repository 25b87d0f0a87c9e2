"""A password read from AWS Secrets Manager, cached, and re-read when a rotation makes it stale."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import json
import logging
import re
import time
import weakref
from dataclasses import dataclass, field
from typing import Any

from asyncpool.config import as_number
from asyncpool.connect.dsn import Target
from asyncpool.credentials.aws_client import (
    AwsClient,
    LoopLock,
    aws_error,
    hide_secrets_in_botocore_logs,
    import_sdk,
    region_text,
)
from asyncpool.errors import CredentialsError

logger: logging.Logger = logging.getLogger("asyncpool.credentials")

_ARN_REGION = re.compile(r"^arn:aws[a-z-]*:secretsmanager:(?P<region>[a-z0-9-]+):")
# A failed re-read leaves the cached password in use this long before trying AWS again, so an
# outage costs one slow call per window rather than one per new connection.
STALE_GRACE = 30.0
# With a copy held, a login waits this long for a re-read before using the copy meanwhile: a
# Secrets Manager that hangs (botocore gives up after its own timeouts, longer than a short
# acquire_timeout) must not stop every new connection while the copy still works.
STALE_WAIT = 1.0



def _checked(secret_id: object, ttl: object, key: object, check_username: object) -> float:
    """`ttl` in seconds, as the pool takes its times (`as_number`), once the arguments are
    checked here: taken as they were, NaN kept the first read for ever (no time is past it),
    ``True`` re-read the secret every second, ``"300"`` failed with a bare TypeError, a
    ``Decimal`` at the first read, a key that is no string found no password in any secret,
    and ``check_username="false"`` checked it."""
    if not isinstance(secret_id, str) or not secret_id:
        raise CredentialsError(f"SecretsManagerAuth secret_id={secret_id!r}: must be the "
                               "secret's name or ARN, a non-empty string")
    seconds = as_number(ttl)
    if seconds is None or not seconds > 0:  # (NaN is not)
        raise CredentialsError(f"SecretsManagerAuth ttl={ttl!r}: must be a number of seconds > "
                               "0 (how long a read is trusted; inf: until a login is refused)")
    if key is not None and not isinstance(key, str):
        raise CredentialsError(f"SecretsManagerAuth key={key!r}: must be the name of the JSON "
                               "field that holds the password (a string), or None when the "
                               "whole secret string is the password")
    if not isinstance(check_username, bool):
        raise CredentialsError(f"SecretsManagerAuth check_username={check_username!r}: must be "
                               "True or False")
    return seconds


@dataclass(frozen=True)
class _Secret:
    password: str = field(repr=False)
    version_id: str
    fetched_at: float
    expires_at: float
    # Counts the passwords read (a re-read that finds the same one keeps it), so a refused
    # login can tell whether another password has been read since it got its own.
    generation: int


class SecretsManagerAuth:
    """The password of each new connection, from a Secrets Manager secret.

    The secret is read once and cached for `ttl` seconds. When the server rejects a login (the
    secret was rotated since it was read), the secret is read again and, if it changed, the
    login is retried once. Logins rejected together share one read; if AWS cannot be reached
    when the cache expires, the cached password stays in use (30 s at a time) until it is
    rejected.

    secret_id: the secret's name or ARN.
    key: the JSON field holding the password (``"password"``, as RDS-managed secrets have);
        None when the whole secret string is the password.
    ttl: seconds a read is trusted (default 300; ``float("inf")``: until a login is refused).
        A rotation is also caught by the retry.
    region: the secret's region. Default: from the ARN, else the AWS session's (``AWS_REGION``).
    version_stage: which version to read (default ``AWSCURRENT``).
    check_username: refuse a secret whose ``username`` field is not the user the pool logs in as
        (an alternating-users rotation changes it; point the pool at a single-user secret).
    profile, session, endpoint_url: where AWS credentials and the service come from.
    """

    requires_tls = False

    def __init__(
        self,
        secret_id: str,
        *,
        key: str | None = "password",
        ttl: float = 300.0,
        region: str | None = None,
        version_stage: str = "AWSCURRENT",
        check_username: bool = True,
        profile: str | None = None,
        session: Any = None,
        endpoint_url: str | None = None,
    ) -> None:
        ttl = _checked(secret_id, ttl, key, check_username)
        arn = _ARN_REGION.match(secret_id)
        if arn and region and arn["region"] != region:
            raise CredentialsError(
                f"SecretsManagerAuth(region={region!r}) but secret {secret_id!r} is in "
                f"{arn['region']!r}: pass region={arn['region']!r} or leave region out"
            )
        hide_secrets_in_botocore_logs()  # from now on, as IamAuth's (see there)
        self.secret_id = secret_id
        self.key = key
        self.ttl = ttl
        self.region: str | None = region or (arn["region"] if arn else None)
        self.version_stage = version_stage
        self.check_username = check_username
        self._client = AwsClient(
            "secretsmanager",
            region=self.region,
            profile=profile,
            session=session,
            endpoint_url=endpoint_url,
            no_region_hint=(
                f"SecretsManagerAuth needs the region of secret {secret_id!r}: pass region='...', "
                "give the secret's ARN, or set AWS_REGION"
            ),
        )
        self._secret: _Secret | None = None
        self._reads = 0
        # Counts close() calls: a read under way at one (its client closed under it) is not kept,
        # nor its failure taken for the service's.
        self._closes = 0
        self._lock = LoopLock()
        self._reading: asyncio.Task[_Secret] | None = None  # the read logins wait for, if any
        self._slow: asyncio.Task[_Secret] | None = None  # a read that took over STALE_WAIT
        # The re-read after a refused login, if one is under way (`refresh`).
        self._refreshing: asyncio.Task[_Secret] | None = None
        # When the last re-read after a rejected login failed, and its message (`refresh`).
        self._refresh_failed: tuple[float, str] | None = None
        # Which read each connecting task got its password from (see `refresh`).
        self._given: weakref.WeakKeyDictionary[asyncio.Task[Any], int] = (
            weakref.WeakKeyDictionary()
        )

    def __repr__(self) -> str:
        return f"SecretsManagerAuth({self.secret_id!r}, region={self.region!r}, ttl={self.ttl:g})"

    async def password(self, target: Target) -> str:
        secret = self._secret
        if secret is None or time.monotonic() >= secret.expires_at:
            secret = await self._load(target)
        task = asyncio.current_task()
        if task is not None:
            self._given[task] = secret.generation
        return secret.password

    async def refresh(self, target: Target) -> bool:
        """Read the secret again after this task's login was rejected; True: worth a retry.

        If another login already read a newer copy since this task got its password, that copy
        is used without a read. False when the secret has not changed: retrying would fail alike.
        """
        task = asyncio.current_task()
        given = self._given.pop(task, None) if task is not None else None
        asked = time.monotonic()
        async with self._lock():
            cached = self._secret
            if cached is not None and given is not None:
                if cached.generation > given:
                    return True  # another login read a new password since
                if cached.generation == given and cached.fetched_at >= asked:
                    # Read again since this login was refused, and unchanged (a rotation has
                    # set the database's password and not yet the secret's): no retry with the
                    # refused password, no read of its own for each login refused with it.
                    return False
            failed = self._refresh_failed
            if failed is not None and failed[0] >= asked:
                # A read for a login rejected at the same time failed while this one waited:
                # its error, without another read of a service that is failing (throttling).
                raise CredentialsError(failed[1])
            # In a task of its own, kept when it ends: a login whose time runs out while AWS is
            # slow (past acquire_timeout) must not leave the refused password in use until the
            # ttl runs out; the next login finds the fresh copy. Under way still: its login gave
            # up (the lock is free again); the logins refused with it wait for that read, rather
            # than make another and wait for it too.
            loop = asyncio.get_running_loop()
            fetch = self._refreshing
            if fetch is None or fetch.done() or fetch.get_loop() is not loop:
                fetch = self._refreshing = loop.create_task(self._fetch(target))
                fetch.add_done_callback(functools.partial(self._keep_fresh, self._closes))
            try:
                fresh = await asyncio.shield(fetch)
            except CredentialsError as exc:
                self._refresh_failed = (time.monotonic(), str(exc))
                raise
            self._refresh_failed = None
            return cached is None or fresh.password != cached.password

    def _keep_fresh(self, closes: int, fetch: asyncio.Task[_Secret]) -> None:
        if fetch.cancelled() or fetch.exception() is not None or closes != self._closes:
            return
        fresh = fetch.result()
        if self._secret is None or fresh.generation >= self._secret.generation:
            self._secret = fresh

    def preload(self) -> None:
        """Import aiobotocore now (Lambda INIT) rather than at the first connection."""
        import_sdk()

    async def warm(self, target: Target) -> None:
        """Read the secret now, so a missing secret or permission fails at `open()`."""
        await self.password(target)

    async def close(self) -> None:
        """Close the AWS client and forget the secret; a later `password()` reads it again
        (with a new client), as after a SnapStart restore."""
        self._secret = None
        # A read under way is left to end (another pool sharing this provider may wait for it);
        # new logins start their own. What it reads is not kept: the secret stays forgotten.
        self._reading = self._refreshing = None
        self._closes += 1
        await self._client.close()

    def auth_failure_hint(self, target: Target) -> str:
        version = self._secret.version_id if self._secret else "unknown"
        return (
            f"the password in secret {self.secret_id!r} (version {version}, stage "
            f"{self.version_stage}) was rejected, also after reading the secret again: it does "
            "not match the database; check the last rotation (its Lambda's logs) and that the "
            f"secret belongs to user {target.user!r}"
        )

    async def _load(self, target: Target) -> _Secret:
        """The cached secret if still good, else a fresh read: one read at a time, shared by
        every login that needs it, and going on if they give up (a login's own time limit).
        With a copy held, a login waits at most `STALE_WAIT` for it and then uses the copy."""
        while True:
            cached = self._secret
            if cached is not None and time.monotonic() < cached.expires_at:
                return cached
            loop = asyncio.get_running_loop()
            reading = self._reading
            if reading is None or reading.done() or reading.get_loop() is not loop:
                reading = self._reading = loop.create_task(self._read(target))
                reading.add_done_callback(_retrieve)
            try:
                return await self._wait_for(reading, cached)
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if not reading.cancelled() or (task is not None and task.cancelling()):
                    raise
                # The shared read was cancelled, not this login (its loop ending, say): read again.
            except CredentialsError:
                if self._reading is reading:
                    raise
                # The provider was closed under the read (another pool sharing it closed, and its
                # client with it): read again, with a new client.

    async def _wait_for(self, reading: asyncio.Task[_Secret], cached: _Secret | None) -> _Secret:
        if cached is None:
            return await asyncio.shield(reading)
        if reading is self._slow:
            return cached  # already known to be slow: no login waits for it again
        try:
            async with asyncio.timeout(STALE_WAIT):
                return await asyncio.shield(reading)
        except TimeoutError:
            if self._slow is not reading:
                self._slow = reading
                logger.warning("reading secret %r takes longer than %gs: using the copy read "
                               "%.0fs ago meanwhile", self.secret_id, STALE_WAIT,
                               time.monotonic() - cached.fetched_at)
            return cached

    async def _read(self, target: Target) -> _Secret:
        async with self._lock():
            cached = self._secret
            now = time.monotonic()
            if cached is not None and now < cached.expires_at:
                return cached
            closes = self._closes
            try:
                secret = await self._fetch(target)
            except CredentialsError as exc:
                if cached is None or closes != self._closes:
                    # (Closed meanwhile, its client under this read: the waiting logins, if
                    # any, read again; no warning of a failure that is not the service's.)
                    raise
                # The server has not refused the copy we hold: better than no connection.
                now = time.monotonic()
                logger.warning(
                    "reading secret %r failed, using the copy read %.0fs ago for %.0fs more: %s",
                    self.secret_id, now - cached.fetched_at, STALE_GRACE, exc,
                )
                secret = dataclasses.replace(cached, expires_at=now + STALE_GRACE)
            if closes == self._closes:
                self._secret = secret
            return secret

    async def _fetch(self, target: Target) -> _Secret:
        """A fresh read. Every error is raised outside ``except`` blocks and from frames that no
        longer hold the answer: botocore's frames and exceptions (signed requests, the JSON
        decoder's input) are not chained to it, and error trackers record frame locals."""
        doing = f"reading secret {self.secret_id!r}"
        client = await self._client.get()
        failure: CredentialsError | None = None
        try:
            reply = await client.get_secret_value(
                SecretId=self.secret_id, VersionStage=self.version_stage
            )
        except Exception as exc:
            failure = self._aws_error(exc, doing)
        if failure is not None:
            raise failure
        text = reply.get("SecretString")
        version = str(reply.get("VersionId", ""))
        del reply
        if text is None:
            raise CredentialsError(
                f"{doing}: it holds binary data, not a string; store the password as "
                'SecretString (JSON like {"username": ..., "password": ...})'
            )
        found = self._password_from(text, target, doing)
        del text
        if isinstance(found, CredentialsError):
            raise found
        now = time.monotonic()
        current = self._secret
        if current is not None and current.password == found:
            generation = current.generation
        else:
            self._reads += 1
            generation = self._reads
        return _Secret(found, version, now, now + self.ttl, generation)

    def _password_from(self, text: str, target: Target, doing: str) -> str | CredentialsError:
        """The password in `text`, or the error to raise (returned, not raised here: this
        frame holds the secret)."""
        if self.key is None:
            return text
        try:
            document = json.loads(text)
        except ValueError:
            # The decoder's message can quote the secret: say only where it broke.
            return CredentialsError(
                f"{doing}: the secret is not JSON, so it has no {self.key!r} field; store "
                '{"username": ..., "password": ...} or pass key=None if the whole secret is the '
                "password"
            )
        if not isinstance(document, dict):
            return CredentialsError(f"{doing}: the secret is JSON but not an object")
        password = document.get(self.key)
        if not isinstance(password, str) or not password:
            fields = ", ".join(sorted(map(str, document))) or "none"
            return CredentialsError(
                f"{doing}: no string field {self.key!r} in the secret (fields: {fields}); pass "
                "key='<field>'"
            )
        user = document.get("username")
        if self.check_username and isinstance(user, str) and user != target.user:
            return CredentialsError(
                f"{doing}: the secret is for user {user!r} but the pool logs in as "
                f"{target.user!r}; fix the DSN's user, use the right secret (an alternating-users "
                "rotation switches users: use single-user rotation), or check_username=False"
            )
        return password

    def _aws_error(self, exc: Exception, doing: str) -> CredentialsError:
        # botocore errors without an answer (HTTPClientError...) have response=None.
        code = (getattr(exc, "response", None) or {}).get("Error", {}).get("Code")
        where = self.region or region_text(None)
        if code == "ResourceNotFoundException":
            return CredentialsError(
                f"{doing}: no such secret in {where} (or no version staged "
                f"{self.version_stage}); check the name or ARN and the region"
            )
        if code == "DecryptionFailure":
            return CredentialsError(
                f"{doing}: the secret's KMS key cannot be used; grant the role kms:Decrypt on it"
            )
        if code == "InvalidRequestException":
            message = exc.response["Error"].get("Message", "")  # type: ignore[attr-defined]
            return CredentialsError(f"{doing}: {message} (a secret scheduled for deletion?)")
        return aws_error(exc, doing, self.region)


def _retrieve(task: asyncio.Task[Any]) -> None:
    """A shared read whose every waiter gave up: its error is theirs to see, not asyncio's
    "exception was never retrieved"."""
    if not task.cancelled():
        task.exception()
