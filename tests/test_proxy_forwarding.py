"""What the proxy forwards of the held connection, against a real server, for each proxy class a
checkout can hand out: `PooledConnection` (asyncpg's attributes as class attributes) and
`AnyAttributeConnection` (a connection class with attributes of its own, the "unnamed" mode's)."""

from __future__ import annotations

from typing import Any

import asyncpg
import pytest

import asyncpool
from asyncpool import Pool
from asyncpool.config import PreparedStatements
from asyncpool.pool.connection import AnyAttributeConnection, PooledConnection
from asyncpool.testing import PgBouncerServer


class _Marked(asyncpg.Connection):
    __slots__ = ()

    def marker(self) -> str:
        return "mine"


class _Open(asyncpg.Connection):  # no __slots__: its instances may have any attribute
    def marker(self) -> str:
        return "mine"


# mode, connection_class, whether the proxy's class has a __getattr__
CASES: dict[str, tuple[PreparedStatements, type | None, bool]] = {
    "off": ("off", None, False),
    "unnamed": ("unnamed", None, False),
    "off, a connection_class with a method of its own": ("off", _Marked, False),
    "unnamed, a connection_class with a method of its own": ("unnamed", _Marked, False),
    "off, a connection_class without __slots__": ("off", _Open, True),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
async def test_asyncpgs_attributes_reach_the_held_connection_and_are_refused_after_release(
        legacy: PgBouncerServer, case: tuple[PreparedStatements, type | None, bool]) -> None:
    mode, connection_class, with_getattr = case
    kwargs: dict[str, Any] = {} if connection_class is None else {
        "connection_class": connection_class}
    async with Pool(legacy.dsn(), max_size=1, prepared_statements=mode, telemetry=False,
                    connect_kwargs=kwargs) as pool:
        async with pool.acquire() as conn:
            assert isinstance(conn, PooledConnection)
            assert (type(conn) is AnyAttributeConnection) is with_getattr
            assert hasattr(type(conn), "__getattr__") is with_getattr
            raw: Any = conn.raw
            # A method the proxy does not name itself, a slot of asyncpg's, a private method.
            assert conn.get_server_pid() == raw.get_server_pid()
            assert conn._stmt_cache_enabled is raw._stmt_cache_enabled  # type: ignore[attr-defined]
            assert conn._protocol is raw._protocol  # type: ignore[attr-defined]
            assert conn.get_settings() is raw.get_settings()
            await conn.reload_schema_state()  # a coroutine method, checked when it runs
            kept = conn.get_server_pid
            if connection_class is not None:
                assert conn.marker() == "mine"  # type: ignore[attr-defined]
        # A method kept from the block, an attribute read and a method looked up after it.
        with pytest.raises(asyncpool.PoolError, match="released back to the pool"):
            kept()
        with pytest.raises(asyncpool.PoolError, match="released back to the pool"):
            _ = conn._protocol  # type: ignore[attr-defined]
        with pytest.raises(asyncpool.PoolError, match="released back to the pool"):
            conn.get_server_pid()
        if connection_class is not None:
            with pytest.raises(asyncpool.PoolError, match="released back to the pool"):
                conn.marker()  # type: ignore[attr-defined]
        assert await pool.fetchval("SELECT 2") == 2


async def test_describe_cache_stats_only_in_the_unnamed_mode(legacy: PgBouncerServer) -> None:
    async with Pool(legacy.dsn(), max_size=1, prepared_statements="off",
                    telemetry=False) as pool, pool.acquire() as conn:
        with pytest.raises(AttributeError):
            conn.describe_cache_stats()
        assert not hasattr(conn, "describe_cache_stats")
    async with Pool(legacy.dsn(), max_size=1, prepared_statements="unnamed",
                    telemetry=False) as pool, pool.acquire() as conn:
        assert conn.describe_cache_stats().hits == 0
