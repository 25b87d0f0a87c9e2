"""One aiobotocore client per credentials provider, and AWS errors that say what to fix.

aiobotocore is imported on first use, never by ``import asyncpool``: importing it costs a few
hundred milliseconds and creating a client about 150 ms, so a provider makes one client and keeps
it until the pool closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
from typing import Any

from asyncpool.errors import CredentialsError

# Fail within a Lambda's budget rather than after botocore's 60 s defaults.
CONNECT_TIMEOUT = 2.0
READ_TIMEOUT = 3.0
MAX_ATTEMPTS = 2

_REGION_LABEL = re.compile(r"^[a-z]{2}(?:-[a-z]+)+-\d+$")
# What in a botocore record would let its reader log in or replay a request: a SigV4
# Authorization header or signature, a session token, a presigned URL's signing parts (an IAM
# token), a Secrets Manager answer (the secret's value), AWS credentials themselves.
_REVEALING = re.compile(
    r"authorization|x-amz-security-token|x-amz-signature|x-amz-credential|signature=|"
    r"rds-db(?:/|%2F)aws4_request|secretstring|secretbinary|secretaccesskey|sessiontoken|"
    r"aws_secret_access_key|aws_session_token",
    re.I,
)
# botocore.auth logs the canonical request (session token included), the string to sign and the
# signature of every request and every IAM token: only this line of it is worth keeping.
_AUTH_KEPT = re.compile(r"^Calculating signature using \S+ auth\.?$")
_HIDDEN = (
    "(hidden by asyncpool: this botocore record would reveal a signature, a session or IAM "
    "token, or a secret)"
)
# Loggers that handle AWS requests and answers. Filters on a logger apply only to records made on
# it (not to those of its children), so each gets the filter; getLogger creates the ones not
# imported yet, and every botocore/aiobotocore logger that exists when a client is made gets it.
_AWS_LOGGERS = (
    "botocore.auth", "botocore.endpoint", "botocore.parsers", "botocore.awsrequest",
    "botocore.httpsession", "botocore.hooks", "botocore.retryhandler", "botocore.retries.standard",
    "botocore.credentials", "botocore.client", "botocore.utils", "botocore.signers",
    "aiobotocore.endpoint", "aiobotocore.httpsession", "aiobotocore.credentials",
    "aiobotocore.parsers", "aiobotocore.client", "aiobotocore.signers", "aiobotocore.utils",
)
_AWS_PREFIXES = ("botocore", "aiobotocore", "boto3", "aioboto3", "s3transfer")


class _SecretLogFilter(logging.Filter):
    """Hides every record in which botocore shows request signing (canonical request, string to
    sign, signature, Authorization header, session token), an IAM token or a secret's value.

    The record's message is replaced, not dropped, so a reader still sees that a call was made.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            text = record.getMessage()
        except Exception:  # a record that cannot be formatted shows nothing of its arguments
            text = ""
            hide = True
        else:
            hide = bool(_REVEALING.search(text))
        if record.name == "botocore.auth" and not _AUTH_KEPT.match(text):
            hide = True
        if hide:
            record.msg, record.args = _HIDDEN, None
            record.exc_info = record.exc_text = None
        return True


_SECRET_FILTER = _SecretLogFilter()
_FILTERED: set[str] = set()
_PREFIX_SET = frozenset(_AWS_PREFIXES)
# Whether the record factory that redacts records of loggers created later is installed.
_factory_installed = [False]


def _redact_later_loggers() -> None:
    """Wrap the log record factory so that a record of any logger under `_AWS_PREFIXES` is
    redacted as it is made: a logger created after the filters were placed (``import boto3``
    after the provider: boto3.resources.action logs a response's SecretAccessKey) is covered
    at once, not at asyncpool's next AWS call. The factory in place is kept and called first
    (OpenTelemetry's logging instrumentation installs one too); the filters stay for a later
    factory that does not chain."""
    if _factory_installed[0]:
        return
    previous = logging.getLogRecordFactory()

    def make_record(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        if isinstance(record.name, str) and record.name.partition(".")[0] in _PREFIX_SET:
            _SECRET_FILTER.filter(record)
        return record

    logging.setLogRecordFactory(make_record)
    _factory_installed[0] = True
# How many loggers existed at the last look (one more: look again).
_loggers_seen = [-1]


def hide_secrets_in_botocore_logs() -> None:
    """Put the redacting filter on botocore's and aiobotocore's loggers (each once).

    Applications that turn on DEBUG logging everywhere would otherwise log, for every AWS call
    this library makes, a request a log reader could replay, every IAM token and every secret.
    Its scope: from the creation of the first `IamAuth` or `SecretsManagerAuth` (each calls it)
    for the rest of the process, the application's own botocore calls included; never before
    (asyncpool without an AWS provider leaves botocore's logging alone). Called again before
    and after a client is made and before each call, for loggers created meanwhile (modules
    imported since); it costs a length check when no logger was created since. Loggers made
    between those calls are covered by the record factory (`_redact_later_loggers`).
    """
    _redact_later_loggers()
    if len(logging.Logger.manager.loggerDict) == _loggers_seen[0]:
        return
    names = set(_AWS_LOGGERS)
    names.update(
        name for name in list(logging.Logger.manager.loggerDict)
        if name.split(".", 1)[0] in _AWS_PREFIXES
    )
    for name in names - _FILTERED:
        logging.getLogger(name).addFilter(_SECRET_FILTER)
        _FILTERED.add(name)
    _loggers_seen[0] = len(logging.Logger.manager.loggerDict)


def region_in_host(host: str) -> str | None:
    """The region named in an AWS endpoint (``db.xyz.us-east-1.rds.amazonaws.com``), if any.

    Read where AWS puts it, just before the service's label (``<region>.rds``) or as the last
    label (``secretsmanager.<region>``): an instance, cluster or proxy named like a region
    (``pg-prod-1``, ``my-proxy-2``) comes first in the name and must not be taken for it."""
    name = host.lower().rstrip(".")
    for suffix in (".amazonaws.com", ".amazonaws.com.cn"):
        if name.endswith(suffix):
            labels = name[: -len(suffix)].split(".")
            break
    else:
        return None
    for label in reversed(labels[-2:]):
        if _REGION_LABEL.match(label):
            return label
    return None


def import_sdk() -> None:
    """Import what the first client imports (aiobotocore's session and config: 240-330 ms
    measured), now: `preload_for_open` calls it during Lambda's INIT phase, where the first
    invocation would otherwise pay for it. Without aiobotocore it does nothing (the first client
    says what to install)."""
    with contextlib.suppress(ImportError):
        import aiobotocore.config
        import aiobotocore.session  # noqa: F401


class LoopLock:
    """An `asyncio.Lock` for the running loop. A provider can outlive its loop (a module-level
    one used by a pool per ``asyncio.run``), and a lock waited on in one loop refuses the next:
    a burst of logins on the second loop failed with "bound to a different event loop"."""

    __slots__ = ("_lock", "_loop")

    def __init__(self) -> None:
        self._lock: asyncio.Lock | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def __call__(self) -> asyncio.Lock:
        loop = asyncio.get_running_loop()
        if self._lock is None or self._loop is not loop:
            self._lock, self._loop = asyncio.Lock(), loop
        return self._lock


class ServiceModels:
    """botocore's data loader (service models and endpoint rules, parsed from JSON) kept for the
    next session this library creates: a new session's first client otherwise parses them again,
    50-250 ms of the event loop's time, against about 8 ms with them kept. Only the credentials
    are read anew, which is what a new session is made for."""

    __slots__ = ("_data_path", "_loader")

    def __init__(self) -> None:
        self._loader: Any = None
        self._data_path: object = None

    def share(self, session: Any) -> None:
        """Give `session` (a new ``AioSession``) the loader kept, or keep its own."""
        # AWS_DATA_PATH (extra model directories) changed: the kept models may be wrong.
        data_path = session.get_config_variable("data_path")
        if self._loader is not None and data_path == self._data_path:
            session.register_component("data_loader", self._loader)
        else:
            self._loader, self._data_path = session.get_component("data_loader"), data_path


class AwsClient:
    """A lazily created aiobotocore client for one service, reused until `close()`.

    `session` is an ``aiobotocore.session.AioSession`` to take credentials and settings from;
    by default a new one reads the usual chain (environment, profile, Lambda execution role),
    with the service models of the previous one (`models`, shared by the clients given it).
    """

    def __init__(
        self,
        service: str,
        *,
        region: str | None = None,
        profile: str | None = None,
        session: Any = None,
        endpoint_url: str | None = None,
        no_region_hint: str | None = None,
        models: ServiceModels | None = None,
    ) -> None:
        self.service = service
        self.no_region_hint = no_region_hint
        self.region = region
        self.profile = profile
        self.endpoint_url = endpoint_url
        self._session = session
        self._models = models or ServiceModels()
        self._client: Any = None
        self._stack: contextlib.AsyncExitStack | None = None
        self._lock = LoopLock()

    async def get(self) -> Any:
        """The client, created on the first call (concurrent first calls share one)."""
        hide_secrets_in_botocore_logs()
        if self._client is not None:
            return self._client
        async with self._lock():
            if self._client is None:
                self._client = await self._create()
        return self._client

    async def _create(self) -> Any:
        try:
            from aiobotocore.config import AioConfig
            from aiobotocore.session import AioSession
        except ImportError:
            raise CredentialsError(
                f"AWS {self.service} needs aiobotocore: pip install 'asyncpool-pg[iam]'"
            ) from None
        hide_secrets_in_botocore_logs()
        config = AioConfig(
            connect_timeout=CONNECT_TIMEOUT,
            read_timeout=READ_TIMEOUT,
            retries={"max_attempts": MAX_ATTEMPTS, "mode": "standard"},
        )
        stack = contextlib.AsyncExitStack()
        try:
            session = self._session
            if session is None:
                session = AioSession(profile=self.profile)
                self._models.share(session)
            client = await stack.enter_async_context(
                session.create_client(
                    self.service,
                    # botocore itself reads only AWS_DEFAULT_REGION; Lambda sets both.
                    region_name=self.region or os.environ.get("AWS_REGION") or None,
                    endpoint_url=self.endpoint_url,
                    config=config,
                )
            )
        except Exception as exc:
            failure = aws_error(exc, f"creating the AWS {self.service} client", self.region,
                                self.no_region_hint)
        else:
            self._stack = stack
            hide_secrets_in_botocore_logs()
            return client
        # Raised outside the except block: botocore's exception (its frames hold the AWS
        # credentials and signed requests) is neither cause nor context.
        await stack.aclose()
        raise failure

    async def close(self) -> None:
        """Close the client; a later `get()` makes a new one. A client being created (its
        credentials fetched from the network: ECS, IMDS) is waited for and closed too: left
        to finish after this, it would be kept by an object nobody closes again."""
        async with self._lock():
            stack, self._stack, self._client = self._stack, None, None
        if stack is not None:
            await stack.aclose()


def region_text(region: str | None) -> str:
    """Where a call went, for a message: the region given, else the environment's default."""
    if region:
        return f"region {region!r}"
    for variable in ("AWS_REGION", "AWS_DEFAULT_REGION"):
        default = os.environ.get(variable)
        if default:
            return f"region {default!r} (the default, from {variable})"
    return "the default region"


def aws_error(
    exc: BaseException, doing: str, region: str | None, no_region_hint: str | None = None
) -> CredentialsError:
    """A `CredentialsError` naming what failed and what to change; never carries a secret."""
    import botocore.exceptions as bx

    where = region_text(region)
    if isinstance(exc, bx.NoCredentialsError | bx.PartialCredentialsError):
        hint = (
            "no AWS credentials found: in Lambda give the function an execution role; elsewhere "
            "set AWS_PROFILE, or AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
        )
    elif isinstance(exc, bx.NoRegionError):
        hint = no_region_hint or "no AWS region: pass region='...' or set AWS_REGION"
    elif isinstance(exc, bx.InvalidRegionError):
        hint = f"{region!r} is not a valid AWS region name (e.g. 'us-east-1')"
    elif isinstance(exc, bx.ProfileNotFound):
        hint = f"{exc}; check AWS_PROFILE or the profile= argument"
    elif isinstance(exc, bx.EndpointConnectionError | bx.ConnectTimeoutError | bx.ReadTimeoutError):
        hint = (
            f"could not reach AWS in {where} ({type(exc).__name__}); a Lambda in a VPC needs a "
            "NAT gateway or an interface VPC endpoint for the service"
        )
    elif isinstance(exc, bx.ClientError):
        hint = _client_error_hint(exc, where)
    else:
        hint = f"{type(exc).__name__}: {exc}"
    return CredentialsError(f"{doing}: {hint}")


def _client_error_hint(exc: Any, where: str) -> str:
    error = exc.response.get("Error", {})
    code = error.get("Code", "")
    message = error.get("Message", "")
    if code in ("UnrecognizedClientException", "InvalidClientTokenId", "InvalidSignatureException"):
        return (
            f"AWS rejected the credentials ({code}); check the access key pair or profile, and "
            "that the clock is right"
        )
    if code in ("ExpiredTokenException", "ExpiredToken", "RequestExpired"):
        return f"the AWS session credentials have expired ({code}); refresh them (aws sso login...)"
    if code in ("AccessDeniedException", "AccessDenied"):
        return f"access denied ({message}); grant the role the permission named there"
    return f"AWS said {code}: {message} ({where})"
