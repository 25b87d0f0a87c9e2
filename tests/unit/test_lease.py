"""The query helpers' inline lease and the record's connection probes (the helpers' fast path)."""

from __future__ import annotations

import asyncio
import sys
from contextvars import ContextVar
from typing import Any

from asyncpool.connect import driver
from asyncpool.pool.checkout import AcquireContext
from asyncpool.pool.lease import ACTIVE, Lease
from asyncpool.pool.record import ConnectionRecord
from asyncpool.pool.slots import UNSET
from tests.unit.fakes import FakeServer, fake_pool, run

_SPAN: ContextVar[str] = ContextVar("_SPAN", default="none")


def _slots_of(lease: Lease) -> dict[str, Any]:
    return {name: getattr(lease, name) for name in Lease.__slots__}


def test_the_helpers_lease_sets_every_slot_as_the_constructor_would(server: FakeServer) -> None:
    # The statement runner builds its lease without Lease.__init__: a slot added to Lease and forgotten
    # there would be unset (AttributeError in a leak report) or hold another value.
    async def main() -> None:
        async with fake_pool(server, min_size=1, max_size=1) as pool:
            slots = pool._slots
            _SPAN.set("caller's span")
            statement = asyncio.create_task(pool.fetchval("SELECT pg_sleep(1)"))
            await asyncio.sleep(0.01)
            (record,) = slots.leased()
            lease = record.lease
            assert lease is not None
            made = _slots_of(lease)  # every slot is set, or this raises AttributeError
            expected = _slots_of(Lease(record, lease.acquired_at, None, statement,
                                       lease.context))
            expected["scoped"] = True  # a helper's statement ends with the helper
            assert made == expected
            assert lease.state is ACTIVE
            assert lease.task is statement
            assert lease.context is not None
            assert lease.context[_SPAN] == "caller's span"
            await statement
            assert not slots.leased()
            assert record.lease is None

    run(main())


def test_the_probes_follow_the_connection(server: FakeServer) -> None:
    async def main() -> None:
        async with fake_pool(server, min_size=1, max_size=1) as pool:
            record: ConnectionRecord = pool._slots.idle[0]
            assert record.connected()
            assert not record.in_transaction()
            async with pool.acquire() as conn:
                await conn.execute("BEGIN")
                assert record.in_transaction()
                await conn.execute("ROLLBACK")
            assert not record.in_transaction()
            record.conn.terminate()
            assert not record.connected()
            # The helper does not hand out the closed connection: it opens another.
            assert await pool.fetchval("SELECT 1") is not None
            assert pool.stats().created_total == 2

    run(main())


def test_the_probes_of_an_asyncpg_without_its_internals_use_the_public_api() -> None:
    class Public:
        closed = False
        in_tx = False

        def is_closed(self) -> bool:
            return self.closed

        def is_in_transaction(self) -> bool:
            return self.in_tx

    conn = Public()
    connected, in_transaction = driver.probes(conn)  # no _protocol: the public methods
    assert connected()
    assert not in_transaction()
    conn.closed, conn.in_tx = True, True
    assert not connected()
    assert in_transaction()


def test_the_acquire_paths_context_lease_and_proxy_set_every_slot_as_the_constructors_would(
        server: FakeServer) -> None:
    # `pool.acquire()` builds its context, `checkout_nowait` the lease and the context the proxy
    # without their __init__ too.
    async def main() -> None:
        async with fake_pool(server, min_size=1, max_size=1) as pool:
            slots = pool._slots
            _SPAN.set("holder's span")
            context = pool.acquire()
            made_context = {name: getattr(context, name) for name in AcquireContext.__slots__}
            assert made_context == {"_owner": slots, "_timeout": UNSET,
                                    "_frame": sys._getframe(), "_lease": None}
            reference = AcquireContext(slots, UNSET, sys._getframe())
            assert made_context == {name: getattr(reference, name) for name in AcquireContext.__slots__}
            async with context as conn:
                (record,) = slots.leased()
                lease = record.lease
                assert lease is not None
                made = _slots_of(lease)  # every slot is set, or this raises AttributeError
                task = asyncio.current_task()
                expected = _slots_of(Lease(record, lease.acquired_at, lease.frame, task,
                                           lease.context))
                # The acquire site's instruction was read at acquire(); the frame has run on.
                assert made.pop("lasti") <= expected.pop("lasti")
                expected["scoped"] = True  # taken by `async with`
                assert made["frame"] is sys._getframe()  # the acquire site: this function
                assert made == expected
                assert lease.context is not None
                assert lease.context[_SPAN] == "holder's span"
                assert {name: getattr(conn, name) for name in ("_lease", "_owner")} == {
                    "_lease": lease, "_owner": slots}
                assert await conn.fetchval("SELECT 1") == 1
            assert not slots.leased()
            assert record.lease is None

    run(main())
