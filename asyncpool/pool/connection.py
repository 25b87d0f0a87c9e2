"""What a caller holds: the asyncpg connection, usable only while its lease is active."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from asyncpool.errors import ConnectionLeakedError, PoolClosedError, PoolError
from asyncpool.pool.lease import ACTIVE, CLOSED, LEAKED, Lease

if TYPE_CHECKING:
    import asyncpg

    from asyncpool.pool.checkout import Checkouts


class _Forwarded:
    """A connection method the proxy hands over without going through `__getattr__`.

    `__getattr__` runs only after normal lookup has failed with an AttributeError, which costs
    ~0.6 µs; the query methods, used on nearly every checkout, get this descriptor instead.
    """

    __slots__ = ("name",)

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, proxy: PooledConnection | None, owner: type) -> Any:
        if proxy is None:
            return self
        return getattr(proxy.raw, self.name)


class PooledConnection:
    """Forwards every attribute to the asyncpg connection while the lease is active.

    After release it refuses use, so a stray reference cannot run a query on a connection that
    another task now holds; after a leak reclaim it raises `ConnectionLeakedError`. Prepared
    statements, cursors and transactions obtained through it stop working on release too (asyncpg
    raises `InterfaceError`), and listeners it added are removed.
    """

    __slots__ = ("_lease", "_owner")

    execute = _Forwarded()
    executemany = _Forwarded()
    fetch = _Forwarded()
    fetchval = _Forwarded()
    fetchrow = _Forwarded()
    fetchmany = _Forwarded()
    prepare = _Forwarded()
    transaction = _Forwarded()
    cursor = _Forwarded()

    def __init__(self, lease: Lease, owner: Checkouts) -> None:
        self._lease = lease
        self._owner = owner

    @property
    def _pool_name(self) -> str:
        return self._owner.name

    async def close(self, *, timeout: float | None = None) -> None:
        """Give the connection back to the pool, as `pool.release(conn)` does.

        The server connection stays open for the next holder: the pool alone decides when a
        connection goes (code written for asyncpg's pool, or SQLAlchemy's ``NullPool`` with an
        ``async_creator``, calls close() to give a connection back). A no-op once released.
        `timeout` is accepted for asyncpg's signature and unused.
        """
        lease = self._lease
        if lease.state is not ACTIVE:
            return
        owner = self._owner
        if owner.checkin_nowait(lease):
            await owner.checkin(lease)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.raw, name)

    def _unusable(self) -> PoolError:
        state = self._lease.state
        if state is LEAKED:
            return ConnectionLeakedError(
                f"pool {self._pool_name!r}: this connection was held past leak_timeout and "
                "reclaimed; release connections promptly or raise leak_timeout"
            )
        if state is CLOSED:
            return PoolClosedError(f"pool {self._pool_name!r} was closed while this connection was held")
        return PoolError(
            f"pool {self._pool_name!r}: this connection was released back to the pool; "
            "acquire a new one"
        )

    @property
    def raw(self) -> asyncpg.Connection:
        """The underlying asyncpg connection (valid only while held)."""
        lease = self._lease
        if lease.state is ACTIVE:
            return lease.record.conn
        raise self._unusable()

    def __repr__(self) -> str:
        return f"<PooledConnection pool={self._pool_name!r} {self._lease.state.value}>"
