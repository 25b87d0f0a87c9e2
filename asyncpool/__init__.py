"""asyncpool: an asyncio PostgreSQL pool for serverless code behind transaction-mode poolers."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from asyncpool.config import PoolConfig
from asyncpool.connect.dsn import Target
from asyncpool.credentials.provider import CredentialProvider, StaticPassword
from asyncpool.errors import (
    AuthenticationError,
    AuthMethodRefusedError,
    ConnectError,
    ConnectionLeakedError,
    ConnectionLostError,
    CredentialsError,
    CredentialsUnavailableError,
    PoolClosedError,
    PoolConfigError,
    PoolerExhaustedError,
    PoolError,
    PoolTimeoutError,
    StaleStatementError,
    TransactionRolledBackError,
)
from asyncpool.observer import PoolObserver
from asyncpool.pool import Pool, create_pool
from asyncpool.pool.connection import PooledConnection
from asyncpool.stats import PoolStats, StatementCacheStats

if TYPE_CHECKING:
    from asyncpool.credentials.iam import IamAuth
    from asyncpool.credentials.secrets_manager import SecretsManagerAuth

__version__ = "0.1.0"

__all__ = [
    "AuthMethodRefusedError",
    "AuthenticationError",
    "ConnectError",
    "ConnectionLeakedError",
    "ConnectionLostError",
    "CredentialProvider",
    "CredentialsError",
    "CredentialsUnavailableError",
    "IamAuth",
    "Pool",
    "PoolClosedError",
    "PoolConfig",
    "PoolConfigError",
    "PoolError",
    "PoolObserver",
    "PoolStats",
    "PoolTimeoutError",
    "PooledConnection",
    "PoolerExhaustedError",
    "SecretsManagerAuth",
    "StaleStatementError",
    "StatementCacheStats",
    "StaticPassword",
    "Target",
    "TransactionRolledBackError",
    "create_pool",
]

# AWS providers pull in aiobotocore (hundreds of ms): import them only when named.
_LAZY = {
    "IamAuth": "asyncpool.credentials.iam",
    "SecretsManagerAuth": "asyncpool.credentials.secrets_manager",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'asyncpool' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
