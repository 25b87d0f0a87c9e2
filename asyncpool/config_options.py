"""The typed keyword options of `PoolConfig.replace()` and `PoolConfig.from_env()`: every
`PoolConfig` field, each with its field's type, so that type checkers refuse
``config.replace(max_size="5")`` and a misspelt option, as they do `Pool()`'s
(`asyncpool.options.PoolOptions`, which adds asyncpg's names to `PoolSettings`).

The checks at run time (and their "did you mean" messages) are `PoolConfig`'s own.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, TypedDict

if TYPE_CHECKING:
    import ssl as ssl_module

    from asyncpool.config import (
        CancelRequests,
        InitHook,
        LeakAction,
        PreparedStatements,
        SetupHook,
        SslMode,
    )
    from asyncpool.credentials.provider import CredentialProvider


class PoolSettings(TypedDict, total=False):
    """`PoolConfig`'s fields but ``dsn`` and the hooks (``init``, ``setup``), which `Pool()`
    types by its rows: what `Pool()`, `PoolConfig.replace()` and `from_env()` all take."""

    name: str
    min_size: int
    init_size: int | None
    max_size: int
    acquire_timeout: float | None
    connect_timeout: float
    max_lifetime: float | None
    lifetime_jitter: float
    max_idle: float | None
    validate_after: float | None
    prepared_statements: PreparedStatements
    statement_cache_size: int
    statement_cache_ttl: float | None
    leak_timeout: float | None
    leak_action: LeakAction
    cancel_requests: CancelRequests
    credentials: CredentialProvider | None
    ssl: SslMode | bool | ssl_module.SSLContext | None
    ssl_root_cert: str | os.PathLike[str] | None
    allow_unprotected_credentials: bool
    allow_iam_without_tls: bool
    require_auth: str | None
    server_settings: Mapping[str, str] | None
    command_timeout: float | None
    max_queries: int | None
    connect_kwargs: Mapping[str, Any]
    telemetry: bool


class PoolConfigOptions(PoolSettings, total=False):
    """Every `PoolConfig` field, as `PoolConfig.replace()` and `PoolConfig.from_env()` take
    them (see `PoolConfig` for each)."""

    dsn: str | None
    init: InitHook | None
    setup: SetupHook | None
