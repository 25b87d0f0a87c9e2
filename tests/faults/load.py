"""Writers that keep a pool busy with ledger transactions while a fault is injected."""

from __future__ import annotations

import asyncio

from asyncpool import Pool
from asyncpool.testing.ledger import Ledger


class Load:
    """`writers` tasks, each writing one ledger id after another until `stop()`.

    After a failure a writer waits `pause_after_error` before the next write, as a client with
    any backoff would; without it a dead pooler turns two shared cores into a busy loop.
    """

    def __init__(self, pool: Pool, ledger: Ledger, writers: int = 8, *,
                 pause_after_error: float = 0.02) -> None:
        self.pool = pool
        self.ledger = ledger
        self.writers = writers
        self.pause_after_error = pause_after_error
        self._stopping = asyncio.Event()
        self._progress = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._failed_writers: set[int] = set()

    def start(self) -> Load:
        self._tasks = [asyncio.create_task(self._writer(i), name=f"writer-{i}")
                       for i in range(self.writers)]
        return self

    async def _writer(self, number: int) -> None:
        while not self._stopping.is_set():
            error = await self.ledger.write(self.pool)
            if error is not None:
                self._failed_writers.add(number)
            self._progress.set()
            if error is not None:
                await asyncio.sleep(self.pause_after_error)

    async def commits(self, count: int, within: float) -> None:
        """Wait until `count` more writes have committed; fail if that takes over `within` s."""
        goal = len(self.ledger.committed) + count
        async with asyncio.timeout(within):
            while len(self.ledger.committed) < goal:
                self._progress.clear()
                await self._progress.wait()

    async def every_writer_fails(self, within: float) -> None:
        """Wait until each writer has seen a failure from now on: none is stuck in a call."""
        self._failed_writers.clear()
        async with asyncio.timeout(within):
            while len(self._failed_writers) < self.writers:
                self._progress.clear()
                await self._progress.wait()

    async def stop(self, within: float = 20.0) -> None:
        """Let every writer finish its current write; fail if one hangs."""
        self._stopping.set()
        done, hung = await asyncio.wait(self._tasks, timeout=within)
        for task in hung:
            task.cancel()
        await asyncio.gather(*hung, return_exceptions=True)
        assert not hung, f"{len(hung)} writers still stuck after {within}s: {hung}"
        for task in done:
            task.result()  # a writer's own bug (not a recorded outcome) surfaces here
