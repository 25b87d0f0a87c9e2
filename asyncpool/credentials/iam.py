"""RDS IAM authentication: a fresh signed token for every new connection."""

from __future__ import annotations

import asyncio
import time
import weakref
from typing import Any

from asyncpool.connect.dsn import Target
from asyncpool.credentials.aws_client import (
    AwsClient,
    ServiceModels,
    aws_error,
    hide_secrets_in_botocore_logs,
    import_sdk,
    region_in_host,
)
from asyncpool.credentials.aws_environment import credentials_fingerprint
from asyncpool.errors import CredentialsError

#: Seconds after a refused login replaced the signing client during which further refusals keep
#: its successor, unless the environment's AWS credentials changed: a role refused for good
#: (no rds-db:connect) would otherwise rebuild it at every wave of logins, each time holding the
#: event loop. Credentials changed elsewhere (a profile's source, `session=`) are read again at
#: the first refusal after this.
REPLACE_INTERVAL = 60.0


def _check(region: object, token_host: object, token_port: object) -> None:
    """Refused when the provider is made: taken as they were, a port of "5432" or 0, or a
    region that is no string, was signed into every token and each login refused as a wrong
    password (RDS checks the token against its own endpoint), or failed inside botocore."""
    for name, value in (("region", region), ("token_host", token_host)):
        if value is not None and (not isinstance(value, str) or not value):
            raise CredentialsError(f"IamAuth {name}={value!r}: must be a non-empty string (or "
                                   "None)")
    if token_port is not None and (isinstance(token_port, bool) or not isinstance(token_port, int)
                                   or not 1 <= token_port <= 65535):
        raise CredentialsError(f"IamAuth token_port={token_port!r}: must be a port number from "
                               "1 to 65535 (or None: the port the pool dials)")


class IamAuth:
    """Log in with an RDS IAM auth token instead of a password (RDS, Aurora or RDS Proxy).

    Each new connection gets a token from aiobotocore's ``generate_db_auth_token`` for the host,
    port and user actually dialled. Signing is local (about 0.1 ms) and a token is valid for 15
    minutes, checked only at login; the client that signs is created once (about 150 ms) and
    kept until a login is refused (`refresh`), at most once a minute unless the environment's
    AWS credentials changed. Pools refuse `IamAuth` without TLS.

    region: the database's region. Default: read from an RDS host name
        (``x.proxy-y.us-east-1.rds.amazonaws.com``), else the AWS session's (``AWS_REGION``).
        A region that contradicts the host name is an error: the token would be rejected.
    profile: AWS profile to take credentials from (default: the usual chain; in Lambda, the
        execution role).
    session: an ``aiobotocore.session.AioSession`` to use instead of a new one.
    token_host, token_port: the endpoint to sign for when the pool dials something else that
        forwards to it (an SSH tunnel on localhost): RDS checks the token against its own name.
    """

    requires_tls = True

    def __init__(
        self,
        region: str | None = None,
        *,
        profile: str | None = None,
        session: Any = None,
        token_host: str | None = None,
        token_port: int | None = None,
    ) -> None:
        _check(region, token_host, token_port)
        self.region = region
        self.token_host = token_host
        self.token_port = token_port
        self._profile = profile
        self._session = session
        self._client: AwsClient | None = None
        self._models = ServiceModels()  # parsed once, for every client this provider makes
        # `credentials_fingerprint()` when the current client was made, and when a refusal
        # last replaced one (see `refresh`).
        self._made_with = ""
        self._replaced_at: float | None = None
        # Which client signed the token each connecting task got (see `refresh`).
        self._signed_with: weakref.WeakKeyDictionary[asyncio.Task[Any], AwsClient] = (
            weakref.WeakKeyDictionary()
        )
        # From now on, not at the first client: the tokens this provider will sign must never be
        # logged, and the application's own botocore calls are redacted from the same moment.
        hide_secrets_in_botocore_logs()

    def __repr__(self) -> str:
        return f"IamAuth(region={self.region!r})"

    async def password(self, target: Target) -> str:
        """A new token for `target` (never cached: each one is signed now)."""
        host, port = self.token_host or target.host, self.token_port or target.port
        region = self._region_for(host)
        signer = self._signer(region)
        client = await signer.get()
        try:
            token: str = await client.generate_db_auth_token(
                DBHostname=host, Port=port, DBUsername=target.user, Region=region
            )
        except Exception as exc:
            failure = aws_error(exc, f"signing an IAM token for {target.user}@{host}:{port}", region)
        else:
            task = asyncio.current_task()
            if task is not None:
                self._signed_with[task] = signer
            return token
        # Outside the except block: botocore's frames (the AWS credentials) are not chained.
        raise failure

    async def refresh(self, target: Target) -> bool:
        """After a refused login: replace the signing client, so the retry signs a new token
        with one that read the credential chain again (without `session=`). Always True: a new
        token helps when the old one expired on the way (a frozen Lambda, a slow connect); a new
        client when the keys it signed with were rotated.

        Logins refused together replace the client once: one whose token came from a client
        already replaced uses the new one. Refused again within `REPLACE_INTERVAL` of that
        replacement, with the environment's credentials unchanged, the client is kept: its
        successor would read the same keys, and a role refused for good would otherwise stall
        the event loop at every wave of logins.
        """
        task = asyncio.current_task()
        signer = self._signed_with.pop(task, None) if task is not None else None
        current = self._client
        if current is None or (signer is not None and signer is not current):
            return True
        now = time.monotonic()
        if (self._replaced_at is not None and now - self._replaced_at < REPLACE_INTERVAL
                and credentials_fingerprint() == self._made_with):
            return True
        self._client, self._replaced_at = None, now
        # Tokens being signed with it meanwhile are unharmed: signing is local, and closing
        # only ends the client's HTTP connections.
        await current.close()
        return True

    def preload(self) -> None:
        """Import aiobotocore now (Lambda INIT) rather than at the first connection."""
        import_sdk()

    async def warm(self, target: Target) -> None:
        """Create the client and sign one token, so missing credentials fail at `open()`."""
        await self.password(target)

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.close()

    def auth_failure_hint(self, target: Target) -> str:
        host = self.token_host or target.host
        region = self.region or region_in_host(host) or "the session's region"
        return (
            f"the IAM token for user {target.user!r} (signed for {host}, {region}) was rejected "
            "twice: check that the role's policy allows rds-db:connect on "
            f"arn:aws:rds-db:<region>:<account>:dbuser:<db-or-proxy-resource-id>/{target.user}, "
            f"that the database user has the rds_iam role (GRANT rds_iam TO {target.user}), that "
            "IAM authentication is enabled on the instance or proxy, and that the pool dials the "
            "endpoint's own name (token_host=... when tunnelling)"
        )

    def _region_for(self, host: str) -> str | None:
        named = region_in_host(host)
        if self.region and named and named != self.region:
            raise CredentialsError(
                f"IamAuth(region={self.region!r}) but host {host!r} is in {named!r}: the token "
                f"would be rejected; pass region={named!r} or leave region out"
            )
        return self.region or named

    def _signer(self, region: str | None) -> AwsClient:
        if self._client is None:
            self._made_with = credentials_fingerprint()
            self._client = AwsClient(
                "rds",
                region=region,
                profile=self._profile,
                session=self._session,
                no_region_hint=(
                    "IamAuth needs the database's AWS region and the host name does not say it: "
                    "pass IamAuth(region='...') or set AWS_REGION"
                ),
                models=self._models,
            )
        return self._client
