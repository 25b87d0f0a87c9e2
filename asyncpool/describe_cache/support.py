"""Does the installed asyncpg have what describe-cache builds on? Checked when a pool opens."""

from __future__ import annotations

import inspect

import asyncpg
from asyncpg.protocol import protocol as asyncpg_protocol

from asyncpool.errors import PoolConfigError

TESTED_ASYNCPG = "0.29 to 0.32"

# Connection._do_execute(query, executor, timeout, retry, *, ignore_custom_codec, record_class)
# is where every fetch/execute/executemany with arguments meets its statement.
_DO_EXECUTE_PARAMS = ("query", "executor", "timeout", "retry", "ignore_custom_codec",
                      "record_class")
_STATEMENT_API = ("_get_attributes", "_get_parameters", "mark_unprepared", "prepared", "query")


def missing_asyncpg_features() -> list[str]:
    """What describe-cache needs from asyncpg and does not find (empty when all is there)."""
    missing: list[str] = []
    if "connection_class" not in inspect.signature(asyncpg.connect).parameters:
        missing.append("asyncpg.connect(connection_class=...)")
    do_execute = getattr(asyncpg.Connection, "_do_execute", None)
    if do_execute is None:
        missing.append("Connection._do_execute")
    else:
        params = inspect.signature(do_execute).parameters
        missing += [f"Connection._do_execute({p}=)" for p in _DO_EXECUTE_PARAMS if p not in params]
    if getattr(asyncpg.Connection, "_drop_local_statement_cache", None) is None:
        missing.append("Connection._drop_local_statement_cache")
    statement = getattr(asyncpg_protocol, "PreparedStatementState", None)
    missing += [f"PreparedStatementState.{name}" for name in _STATEMENT_API
                if not hasattr(statement, name)]
    if not hasattr(getattr(asyncpg_protocol, "Protocol", None), "_is_cancelling"):
        missing.append("Protocol._is_cancelling")
    return missing


def require_asyncpg_features(pool_name: str) -> None:
    missing = missing_asyncpg_features()
    if missing:
        raise PoolConfigError(
            f"pool {pool_name!r}: prepared_statements='describe-cache' needs asyncpg internals "
            f"that asyncpg {asyncpg.__version__} lacks ({', '.join(missing)}); it is tested with "
            f"asyncpg {TESTED_ASYNCPG}. Install a tested asyncpg or use "
            "prepared_statements='off'"
        )


def unsupported_transport_error(pool_name: str, transport: object) -> PoolConfigError:
    kind = f"{type(transport).__module__}.{type(transport).__qualname__}"
    return PoolConfigError(
        f"pool {pool_name!r}: prepared_statements='describe-cache' reads replies through the "
        f"asyncio transport, and {kind} does not allow it (uvloop's transports do not); run on "
        "asyncio's default event loop or use prepared_statements='off'"
    )
