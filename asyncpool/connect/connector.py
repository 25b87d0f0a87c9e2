"""Opening one connection: credentials, then `asyncpg.connect`, with errors made clear."""

from __future__ import annotations

import asyncio
import os
import time
from typing import TYPE_CHECKING, Any

import asyncpg

from asyncpool.config import PoolConfig
from asyncpool.connect.dsn import Target, dsn_password, parse_target
from asyncpool.connect.failures import is_auth_failure, translate
from asyncpool.connect.tls import require_tls, ssl_argument
from asyncpool.credentials.provider import CredentialProvider, StaticPassword, auth_failure_hint
from asyncpool.observer import ConnectAttempt, PoolObserver

if TYPE_CHECKING:
    from asyncpool.unnamed import CacheTotals


class CutShort:
    """Set by whoever stops a login part-way (the pool, at connect_timeout, close() or the end
    of the caller's acquire_timeout) to the error class its caller is given, so that the
    attempt is reported with that error rather than as a bare cancellation."""

    __slots__ = ("caller_error",)

    def __init__(self) -> None:
        self.caller_error: type[BaseException] = asyncio.CancelledError


class Connector:
    """Knows how to open a connection for one pool; holds nothing but settings."""

    def __init__(self, config: PoolConfig, observer: PoolObserver) -> None:
        self.config = config
        self.observer = observer
        kw = dict(config.connect_kwargs)
        self.target: Target = parse_target(
            config.dsn,
            host=kw.get("host"),
            port=kw.get("port"),
            user=kw.get("user"),
            database=kw.get("database"),
        )
        self.credentials: CredentialProvider | None = config.credentials or _default_credentials(
            config, kw.pop("password", None)
        )
        if self.credentials is not None and self.credentials.requires_tls:
            require_tls(config)
        #: The description cache's counts over all connections ("unnamed" mode only).
        self.statement_cache: CacheTotals | None = None
        #: Connections are opened through an InterceptingLoop (the one-round-trip path).
        self._intercept = False
        self._kwargs = self._driver_kwargs(kw)

    def _driver_kwargs(self, kw: dict[str, Any]) -> dict[str, Any]:
        cfg = self.config
        kw.setdefault("timeout", cfg.connect_timeout)
        if cfg.prepared_statements == "on":
            kw["statement_cache_size"] = cfg.statement_cache_size
            kw["max_cached_statement_lifetime"] = cfg.statement_cache_ttl or 0
        else:
            # "unnamed" too: it keeps unnamed statements itself, never asyncpg's named ones.
            kw["statement_cache_size"] = 0
        if cfg.prepared_statements == "unnamed":
            from asyncpool.unnamed import CacheTotals, describe_cache_connection_class

            self.statement_cache = CacheTotals()
            kw["connection_class"] = describe_cache_connection_class(cfg, self.statement_cache)
            self._intercept = True
        ssl_arg = ssl_argument(cfg, self.target)
        if ssl_arg is not None:
            kw["ssl"] = ssl_arg
        if cfg.server_settings:
            kw["server_settings"] = dict(cfg.server_settings)
        # The pool manages the target through the DSN; explicit host/port/user stay as given.
        return kw

    async def connect(self, cut_short: CutShort | None = None) -> asyncpg.Connection:
        """One new connection; on an authentication failure, refresh credentials and retry once.

        `cut_short` tells, if this login is cancelled, what its caller was told instead."""
        try:
            return await self._attempt(cut_short)
        except asyncpg.PostgresError as exc:
            if (
                self.credentials is None
                or not is_auth_failure(exc)
                or not await self.credentials.refresh(self.target)
            ):
                raise self._translate(exc) from exc
        try:
            return await self._attempt(cut_short)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
            raise self._translate(exc) from exc

    def _translate(self, exc: BaseException) -> Exception:
        hint = auth_failure_hint(self.credentials, self.target) if self.credentials else None
        return translate(exc, self.target, self.config.name, self.config.connect_timeout, hint)

    async def _attempt(self, cut_short: CutShort | None) -> asyncpg.Connection:
        cred_times: list[int] = []
        provider = self.credentials
        kwargs = self._kwargs
        if provider is not None:
            target = self.target

            async def password() -> str:
                cred_times.append(time.time_ns())
                try:
                    return await provider.password(target)
                finally:
                    cred_times.append(time.time_ns())

            kwargs = {**kwargs, "password": password}
        if self._intercept:
            from asyncpool.unnamed.wire import InterceptingLoop

            kwargs = {**kwargs, "loop": InterceptingLoop(asyncio.get_running_loop())}
        started = time.time_ns()
        error: BaseException | None = None
        caller_error: type[BaseException] | None = None
        try:
            conn: asyncpg.Connection = await asyncpg.connect(self.config.dsn, **kwargs)
            return conn
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
            error = exc
            translated = self._translate(exc)
            # A refused login (PostgresError) goes up as it is, for connect() to retry once, and
            # is translated there: either way the caller is given `translated`'s class.
            caller_error = type(translated)
            if isinstance(exc, OSError | TimeoutError | asyncpg.InterfaceError):
                raise translated from exc
            raise
        except asyncio.CancelledError as exc:
            error = exc
            caller_error = cut_short.caller_error if cut_short is not None else type(exc)
            raise
        except BaseException as exc:
            error = exc
            caller_error = type(exc)
            raise
        finally:
            self.observer.connect_attempted(
                ConnectAttempt(
                    target=self.target,
                    started_ns=started,
                    ended_ns=time.time_ns(),
                    credentials_started_ns=cred_times[0] if cred_times else None,
                    credentials_ended_ns=cred_times[1] if len(cred_times) > 1 else None,
                    error=error,
                    caller_error=caller_error,
                )
            )


def _default_credentials(config: PoolConfig, explicit: str | None) -> CredentialProvider | None:
    """The DSN's (or `connect_kwargs`', or PGPASSWORD's) password as a provider, if any."""
    password = explicit or dsn_password(config.dsn) or os.environ.get("PGPASSWORD")
    return StaticPassword(password) if password else None
