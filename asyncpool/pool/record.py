"""Bookkeeping for one open connection: where it is, when it was made, when it must be checked
or go."""

from __future__ import annotations

import enum
import math
import random
import weakref
from typing import TYPE_CHECKING, Any

from asyncpool.connect.driver import DriverConnection, Probe, probe, queries_count

if TYPE_CHECKING:

    from asyncpool.pool.checkout import Checkouts
    from asyncpool.pool.connection import PooledConnection
    from asyncpool.pool.lease import Lease, LeaseState


class Place(enum.Enum):
    """Where a connection is. Only the slot owner (`Slots`) moves a record between places."""

    IDLE = "idle"  # in the pool's idle deque
    LEASED = "leased"  # held by a caller, or being reset after release (see `lease`)
    CHECKING = "checking"  # being validated for a caller, who holds its slot
    MOVING = "moving"  # between two places inside one synchronous step of the owner
    RETIRED = "retired"  # closed (or closing) and counted; gone from the pool


# Module constants: an Enum member lookup costs ~70 ns and the checkout path compares places.
IDLE = Place.IDLE
LEASED = Place.LEASED
CHECKING = Place.CHECKING
MOVING = Place.MOVING
RETIRED = Place.RETIRED


class ConnectionRecord:
    """One pooled connection. Times come from the event loop's monotonic clock."""

    __slots__ = ("__weakref__", "check_at", "conn", "created_at", "ended", "expires_at",
                 "last_used", "lease", "owner", "place", "probe", "proxy_class", "spare", "stale",
                 "sync_after")

    def __init__(self, conn: DriverConnection, now: float, max_lifetime: float | None,
                 jitter: float, owner: Checkouts, *,
                 proxy_class: type[PooledConnection[Any]]) -> None:
        self.conn: DriverConnection = conn
        # What a checkout hands out for it: `PooledConnection`, or its subclass with a
        # __getattr__ for a connection class that adds attributes (`proxy_class_for`).
        self.proxy_class: type[PooledConnection[Any]] = proxy_class
        # The pool's slots owner, for a held connection's statements: the proxy's own `_owner`
        # is, on `AnyAttributeConnection`, a read on a class with a __getattr__, which Python
        # 3.11 does not specialize (~325 instructions per read; this one is a slot read:
        # benchmarks/README.md).
        self.owner: Checkouts = owner
        # What the checkout fast path asks of the connection on every query, without a Python
        # call: `is_connected()` and `is_in_transaction()` (asyncpool.connect.driver.probe).
        self.probe: Probe = probe(conn)
        self.created_at: float = now
        self.expires_at: float = expiry(now, max_lifetime, jitter)
        self.last_used: float = now
        # The checkout path makes one comparison: before `check_at` a connection is handed out as
        # it is; from then on it is validated, or retired if expired (see `touch`).
        self.check_at: float = math.inf
        self.place: Place = MOVING
        # The checkout holding it while `LEASED` (None otherwise): kept here rather than in a
        # table of the pool's, which every checkout and return would write (a hashed insert and
        # delete, and two more objects to touch per query).
        self.lease: Lease | None = None
        # How the checkout it was retired under ended, if it was held then (`Slots.retire`):
        # what the prepared statements and cursors made through it are refused with
        # (`loop_bound`) while the connection waits for the pool's cancel request to close.
        # (The state, not the lease: that would hold the holder's task and frame.)
        self.ended: LeaseState | None = None
        # The last lease on this connection that ended cleanly, in a statement runner or at
        # the end of an `async with pool.acquire()` block (whose proxy no longer refers to it:
        # `GIVEN_BACK`): the next checkout takes it instead of making one (`spare_lease`).
        self.spare: Lease | None = None
        # Validate before the next checkout whatever the clock says (a thaw or a restore, where
        # the monotonic clock is not known to have advanced): `check_at` stays at minus infinity,
        # a return included, until a validation clears it.
        self.stale: bool = False
        # Non-zero: a Parse may have been left without a Sync (`note_unsynced_parse`), 1 + the
        # connection's query count then. A transaction-mode pooler keeps the server connection
        # assigned to this client until one comes: if no statement has sent one by the return,
        # the return does (`parse_unsynced`, `driver.reset`).
        self.sync_after: int = 0
        _RECORDS[id(conn)] = self

    def note_unsynced_parse(self) -> None:
        """A Parse may have been left without a Sync (a ``prepare()``, a refused cursor, a
        statement cancelled while described): outside a transaction, the return ends it unless
        a statement has since (`sync_after`). Not on the query path: on those calls only."""
        probe = self.probe  # (asyncpg's own methods fail once the connection is closed)
        if probe.is_connected() and not probe.is_in_transaction():
            self.sync_after = 1 + queries_count(self.conn)

    def parse_unsynced(self) -> bool:
        """Whether a Parse noted by `note_unsynced_parse` has had no statement after it."""
        return bool(self.sync_after) and queries_count(self.conn) + 1 == self.sync_after

    def touch(self, now: float, validate_after: float) -> None:
        """Note a use at `now`, and when the next checkout must look at the connection
        (`validate_after` seconds on, infinite for never, or at `expires_at` if sooner; at once
        if `stale`)."""
        self.last_used = now
        check_at = now + validate_after
        expires_at = self.expires_at
        self.check_at = (-math.inf if self.stale
                         else check_at if check_at < expires_at else expires_at)

    def expired(self, now: float) -> bool:
        return now >= self.expires_at

    def usable(self) -> bool:
        return not self.conn.is_closed()


# Each open connection's record, for what reaches only the connection (asyncpg's prepared
# statements: `record_of`). By id, held weakly: a record holds its connection, so the id is not
# reused while the entry is there.
_RECORDS: weakref.WeakValueDictionary[int, ConnectionRecord] = weakref.WeakValueDictionary()


def record_of(conn: Any) -> ConnectionRecord | None:
    """The record of the pool connection `conn`, if it is one."""
    record = _RECORDS.get(id(conn))
    return record if record is not None and record.conn is conn else None


def expiry(now: float, max_lifetime: float | None, jitter: float) -> float:
    """When a connection made `now` must be retired (infinite: never): up to `jitter` of the
    lifetime earlier, at random, so connections opened together (a cold start) do not all
    reconnect together."""
    if max_lifetime is None:
        return math.inf
    return now + max_lifetime * (1.0 - jitter * random.random())
