"""Which running tasks may give back a connection another task acquired (`refers_to`)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from asyncpool.pool.connection import PooledConnection
from asyncpool.pool.handed import refers_to
from tests.unit.fakes import FakeServer, fake_pool, run


@dataclass(slots=True)
class Job:
    conn: PooledConnection


def test_a_task_holding_the_connection_refers_to_it_an_unrelated_one_does_not(
    server: FakeServer
) -> None:
    async def main() -> dict[str, bool]:
        async with fake_pool(server, min_size=0, max_size=2) as pool:
            conn = await pool.acquire()
            other = await pool.acquire()
            lease = conn._lease
            go = asyncio.Event()
            queue: asyncio.Queue[PooledConnection] = asyncio.Queue()
            queue.put_nowait(conn)

            async def closure() -> None:
                await go.wait()
                await pool.release(conn)

            async def argument(c: PooledConnection) -> None:
                await go.wait()

            async def nested(jobs: list[Job]) -> None:
                await go.wait()

            async def queued(q: asyncio.Queue[PooledConnection]) -> None:
                await go.wait()

            async def callback(then: Any) -> None:
                await go.wait()

            async def unrelated(c: PooledConnection, p: Any) -> None:
                await go.wait()  # (another connection, and the pool that holds every one)

            def give_back() -> Any:
                return pool.release(conn)

            tasks = {
                "closure": closure(), "argument": argument(conn), "nested": nested([Job(conn)]),
                "queued": queued(queue), "callback": callback(give_back),
                "unrelated": unrelated(other, pool),
            }
            running = {name: asyncio.create_task(coro) for name, coro in tasks.items()}
            before = {name: refers_to(task, lease) for name, task in running.items()}
            await asyncio.sleep(0)  # (started, suspended inside their awaits)
            after = {name: refers_to(task, lease) for name, task in running.items()}
            assert before == after
            go.set()
            await asyncio.gather(*running.values())
            await pool.release(other)
            return after

    assert run(main()) == {"closure": True, "argument": True, "nested": True, "queued": True,
                           "callback": True, "unrelated": False}
