"""Does the installed asyncpg have what describe-cache builds on? Checked when a pool opens."""

from __future__ import annotations

import inspect

import asyncpg
from asyncpg.prepared_stmt import PreparedStatement
from asyncpg.protocol import protocol as asyncpg_protocol

from asyncpool.errors import PoolConfigError

TESTED_ASYNCPG = "0.32"

# Connection._do_execute(query, executor, timeout, retry, *, ignore_custom_codec, record_class)
# is where every fetch/execute/executemany with arguments meets its statement.
_DO_EXECUTE_PARAMS = ("query", "executor", "timeout", "retry", "ignore_custom_codec",
                      "record_class")
_STATEMENT_API = ("_get_attributes", "_get_parameters", "_init_codecs", "_init_types",
                  "mark_unprepared", "prepared", "query")
_PROTOCOL_API = ("_is_cancelling", "get_settings", "is_in_transaction", "prepare")


def missing_asyncpg_features() -> list[str]:
    """What describe-cache needs from asyncpg and does not find (empty when all is there)."""
    missing: list[str] = []
    connect_params = inspect.signature(asyncpg.connect).parameters
    missing += [f"asyncpg.connect({p}=...)" for p in ("connection_class", "loop")
                if p not in connect_params]
    if getattr(asyncpg.Connection, "_introspect_types", None) is None:
        missing.append("Connection._introspect_types")
    executemany = getattr(asyncpg.Connection, "_executemany", None)
    if executemany is None or "return_rows" not in inspect.signature(executemany).parameters:
        missing.append("Connection._executemany(return_rows=)")
    do_execute = getattr(asyncpg.Connection, "_do_execute", None)
    if do_execute is None:
        missing.append("Connection._do_execute")
    else:
        params = inspect.signature(do_execute).parameters
        missing += [f"Connection._do_execute({p}=)" for p in _DO_EXECUTE_PARAMS if p not in params]
    if getattr(asyncpg.Connection, "_drop_local_statement_cache", None) is None:
        missing.append("Connection._drop_local_statement_cache")
    # An unnamed prepare()'s statement: built by `_prepare`, its fetch, fetchrow and fetchval all
    # end in the private `__bind_execute` (overridden: without it they would run unchecked).
    prepare = getattr(asyncpg.Connection, "_prepare", None)
    if prepare is None or "name" not in inspect.signature(prepare).parameters:
        missing.append("Connection._prepare(name=)")
    if getattr(PreparedStatement, "_PreparedStatement__bind_execute", None) is None:
        missing.append("PreparedStatement.__bind_execute")
    statement = getattr(asyncpg_protocol, "PreparedStatementState", None)
    missing += [f"PreparedStatementState.{name}" for name in _STATEMENT_API
                if not hasattr(statement, name)]
    protocol = getattr(asyncpg_protocol, "Protocol", None)
    missing += [f"Protocol.{name}" for name in _PROTOCOL_API if not hasattr(protocol, name)]
    return missing


def require_asyncpg_features(pool_name: str) -> None:
    missing = missing_asyncpg_features()
    if missing:
        raise PoolConfigError(
            f"pool {pool_name!r}: prepared_statements='unnamed' needs asyncpg internals "
            f"that asyncpg {asyncpg.__version__} lacks ({', '.join(missing)}); it is tested with "
            f"asyncpg {TESTED_ASYNCPG}. Install a tested asyncpg or use "
            "prepared_statements='off'"
        )


def unsupported_transport_error(pool_name: str | None, transport: object) -> PoolConfigError:
    kind = f"{type(transport).__module__}.{type(transport).__qualname__}"
    whose = f"pool {pool_name!r}: " if pool_name is not None else ""
    return PoolConfigError(
        f"{whose}this connection class reads replies through the transport the pool gives "
        f"asyncpg when it connects, and takes the pool's settings from the loop it connects "
        f"with; it got a {kind}: open the connection through the pool (prepared_statements="
        '"unnamed")'
    )
