"""What a caller holds: the asyncpg connection, usable only while its lease is active."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from asyncpool.errors import ConnectionLeakedError, PoolClosedError, PoolError
from asyncpool.lease import Lease, LeaseState

if TYPE_CHECKING:
    import asyncpg


class PooledConnection:
    """Forwards every attribute to the asyncpg connection while the lease is active.

    After release it refuses use, so a stray reference cannot run a query on a connection that
    another task now holds; after a leak reclaim it raises `ConnectionLeakedError`.
    """

    __slots__ = ("_lease", "_pool_name")

    def __init__(self, lease: Lease, pool_name: str) -> None:
        self._lease = lease
        self._pool_name = pool_name

    def __getattr__(self, name: str) -> Any:
        lease = self._lease
        if lease.state is LeaseState.ACTIVE:
            return getattr(lease.record.conn, name)
        raise self._unusable()

    def _unusable(self) -> PoolError:
        state = self._lease.state
        if state is LeaseState.LEAKED:
            return ConnectionLeakedError(
                f"pool {self._pool_name!r}: this connection was held past leak_timeout and "
                "reclaimed; release connections promptly or raise leak_timeout"
            )
        if state is LeaseState.CLOSED:
            return PoolClosedError(f"pool {self._pool_name!r} was closed while this connection was held")
        return PoolError(
            f"pool {self._pool_name!r}: this connection was released back to the pool; "
            "acquire a new one"
        )

    @property
    def raw(self) -> asyncpg.Connection:
        """The underlying asyncpg connection (valid only while held)."""
        lease = self._lease
        if lease.state is LeaseState.ACTIVE:
            return lease.record.conn
        raise self._unusable()

    def __repr__(self) -> str:
        return f"<PooledConnection pool={self._pool_name!r} {self._lease.state.value}>"
