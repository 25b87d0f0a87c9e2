"""Soak: writers hammer two pools (PgBouncer 1.18 and current) for a few minutes while faults
come and go; then the counts, and a check that nothing was lost. Run by hand, not in CI:

    .venv/bin/python benchmarks/soak.py --minutes 3

Every write inserts a fresh id in one transaction (half in a `pool.transaction()` block, half as
one statement through `pool.execute`) and records what its caller was told
(asyncpool.testing.ledger). Faults rotate: PgBouncer restart and crash, PostgreSQL restart,
PAUSE, and a fault proxy in front of each PgBouncer that stalls, drops, resets or goes
half-open; writers also time out, cancel and leak connections on purpose. Exit status 0 when
every invariant held.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import logging
import random
import sys
import tempfile
import time
import traceback
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

from asyncpool import (
    ConnectError,
    ConnectionLeakedError,
    ConnectionLostError,
    Pool,
    PoolTimeoutError,
)
from asyncpool.testing import PgBouncerServer, PostgresServer, ServerStack
from asyncpool.testing.crash import crash_and_restart
from asyncpool.testing.faultproxy import FaultMode, FaultProxy
from asyncpool.testing.invariants import full_width, pooler_forgets, serves_again, settled
from asyncpool.testing.ledger import Ledger
from asyncpool.testing.process import ServerProcess

# Above the longest a write can hold its connection under these faults (three statements, each
# bounded by command_timeout), so only the leaks made on purpose are reclaimed.
LEAK_TIMEOUT = 8.0
LEAK_EVERY = 15.0
# What a caller may be told during the faults this soak injects.
EXPECTED = (ConnectionLostError, ConnectError, PoolTimeoutError, ConnectionLeakedError,
            TimeoutError, asyncio.CancelledError)


@dataclass
class Lane:
    """One PgBouncer, the fault proxy in front of it, and the pool that goes through both."""

    pooler: PgBouncerServer
    proxy: FaultProxy
    pool: Pool
    opened_at_start: int = 0


@dataclass
class Tally:
    faults: collections.Counter[str] = field(default_factory=collections.Counter)
    leaks_seen: int = 0
    unexpected: list[BaseException] = field(default_factory=list)
    burst_until: float = 0.0


async def writer(lane: Lane, ledger: Ledger, tally: Tally, stop: asyncio.Event,
                 rng: random.Random) -> None:
    loop = asyncio.get_running_loop()
    pool = lane.pool
    while not stop.is_set():
        # Half the writes through a transaction block, half through the query helper (the
        # statement runner's inline checkout and return, and the lease it takes again).
        write = ledger.write if rng.random() < 0.5 else ledger.write_one
        r = rng.random()
        cancel_share = 0.5 if loop.time() < tally.burst_until else 0.08
        try:
            if r < cancel_share:
                # Cancelled at a random await point of the write.
                task = asyncio.create_task(write(pool))
                await asyncio.sleep(rng.uniform(0, 0.02))
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
            elif r < cancel_share + 0.08:
                try:
                    async with asyncio.timeout(rng.uniform(0.001, 0.05)):
                        await write(pool)
                except TimeoutError:
                    pass
            else:
                error = await write(pool)
                if error is not None:
                    await asyncio.sleep(0.01)  # a caller's backoff
        except (PoolTimeoutError, ConnectError, ConnectionLostError, TimeoutError):
            await asyncio.sleep(0.01)
        except Exception as exc:  # the soak reports it rather than stopping
            tally.unexpected.append(exc)


async def leaker(lanes: list[Lane], tally: Tally, stop: asyncio.Event) -> None:
    """Every LEAK_EVERY seconds, hold a connection past leak_timeout: the pool must reclaim it
    and tell the holder."""
    turn = 0
    while not stop.is_set():
        await asyncio.sleep(LEAK_EVERY)
        pool = lanes[turn % len(lanes)].pool
        turn += 1
        try:
            async with pool.acquire() as conn:
                await conn.fetchval("SELECT 1")
                await asyncio.sleep(LEAK_TIMEOUT * 3)
            tally.unexpected.append(AssertionError("a leaked connection was not reclaimed"))
        except ConnectionLeakedError:
            tally.leaks_seen += 1
        except (PoolTimeoutError, ConnectError, ConnectionLostError, TimeoutError):
            pass  # a fault got there first


def fault_plan(stack: ServerStack, lanes: list[Lane], tally: Tally
               ) -> list[tuple[str, Callable[[], Awaitable[None]]]]:
    """The faults, in the order they rotate."""

    async def restart(server: PgBouncerServer) -> None:
        await asyncio.to_thread(server.restart)

    async def crash(server: PgBouncerServer) -> None:
        await asyncio.to_thread(crash_and_restart, server)

    async def restart_postgres() -> None:
        await asyncio.to_thread(stack.postgres.restart)

    async def pause(server: PgBouncerServer) -> None:
        await server.admin("PAUSE app")
        try:
            await asyncio.sleep(3)
        finally:
            await server.admin("RESUME app")

    async def network(mode: FaultMode, seconds: float) -> None:
        for lane in lanes:
            lane.proxy.set_mode(mode)
        try:
            await asyncio.sleep(seconds)
        finally:
            for lane in lanes:
                lane.proxy.set_mode("pass")

    async def burst() -> None:
        tally.burst_until = asyncio.get_running_loop().time() + 3

    legacy, current = stack.legacy, stack.current
    return [
        ("pgbouncer-1.18 restart", lambda: restart(legacy)),
        ("network stall 3s", lambda: network("stall", 3)),
        ("pgbouncer-current crash", lambda: crash(current)),
        ("network drop", lambda: network("drop", 0.5)),
        ("postgres restart", restart_postgres),
        ("pgbouncer-1.18 PAUSE 3s", lambda: pause(legacy)),
        ("network reset", lambda: network("reset", 0.5)),
        ("cancellation burst 3s", burst),
        ("network half-open 3s", lambda: network("half-open", 3)),
        ("pgbouncer-current PAUSE 3s", lambda: pause(current)),
        ("pgbouncer-current restart", lambda: restart(current)),
        ("pgbouncer-1.18 crash", lambda: crash(legacy)),
    ]


async def soak(args: argparse.Namespace) -> int:
    rng = random.Random(args.seed)
    with ServerStack.start(
        max_connections=60,
        pgbouncer_overrides={
            "default_pool_size": 8, "max_db_connections": 8, "max_client_conn": 300,
            "query_wait_timeout": 5, "server_login_retry": 1,
        },
    ) as stack:
        ledger = await Ledger(stack.postgres.dsn(), "soak_ledger").create()
        lanes = []
        for pooler in stack.poolers:
            proxy = await FaultProxy(pooler.host, pooler.port).start()
            pool = Pool(proxy.dsn(pooler.dsn()), name=f"soak-{pooler.label}", min_size=2,
                        max_size=6, acquire_timeout=2, connect_timeout=1, validate_after=0.5,
                        leak_timeout=LEAK_TIMEOUT, connect_kwargs={"command_timeout": 2},
                        telemetry=False)
            await pool.open()
            lanes.append(Lane(pooler, proxy, pool, pool.stats().created_total))
        tally = Tally()
        stop = asyncio.Event()
        writers = [
            asyncio.create_task(writer(lanes[i % 2], ledger, tally, stop, random.Random(rng.random())))
            for i in range(args.writers)
        ]
        leaks = asyncio.create_task(leaker(lanes, tally, stop))
        plan = fault_plan(stack, lanes, tally)
        loop = asyncio.get_running_loop()
        started = loop.time()
        end = started + args.minutes * 60
        next_fault, next_report, step = started + args.fault_every, started + 10, 0
        while loop.time() < end:
            await asyncio.sleep(0.2)
            now = loop.time()
            if now >= next_fault:
                name, inject = plan[step % len(plan)]
                step += 1
                print(f"[{now - started:6.1f}s] fault: {name}", flush=True)
                try:
                    await inject()
                except Exception as exc:  # a harness failure: report it, keep soaking
                    tally.unexpected.append(exc)
                tally.faults[name] += 1
                for process in down(stack):
                    print(f"[{loop.time() - started:6.1f}s] {process.name} is down", flush=True)
                next_fault = loop.time() + args.fault_every
            if now >= next_report:
                print(f"[{now - started:6.1f}s] committed={len(ledger.committed)} "
                      f"failed={len(ledger.failed)} ambiguous={len(ledger.ambiguous)}", flush=True)
                next_report = now + 10
        stop.set()
        leaks.cancel()
        _, hung = await asyncio.wait(writers, timeout=30)
        for task in hung:
            task.cancel()
        elapsed = loop.time() - started
        return await report(args, stack, lanes, ledger, tally, elapsed=elapsed, hung=len(hung))


def down(stack: ServerStack) -> list[ServerProcess]:
    """The servers that are not running (crashed, or did not come back)."""
    servers: list[PostgresServer | PgBouncerServer] = [stack.postgres, *stack.poolers]
    return [s.process for s in servers if s.process is not None and not s.running()]


async def report(args: argparse.Namespace, stack: ServerStack, lanes: list[Lane], ledger: Ledger,
                 tally: Tally, *, elapsed: float, hung: int) -> int:
    violations: list[str] = []

    async def holds(name: str, check: Awaitable[object]) -> None:
        try:
            await check
        except Exception as exc:  # every failed check is reported, none stops the others
            violations.append(f"{name}: {type(exc).__name__}: {exc}")

    if hung:
        violations.append(f"{hung} writers did not finish within 30 s of the stop")
    counts = None
    try:
        counts = await ledger.verify()
    except AssertionError as exc:
        violations.append(f"ledger: {exc}")
    for process in down(stack):
        violations.append(f"{process.name} is not running at the end; its log ends:\n"
                          f"{process.log_tail(3000)}")
    for lane in lanes:
        await holds(f"{lane.pool.name} serves again", serves_again(lane.pool, within=20))
        await holds(f"{lane.pool.name} settles", settled(lane.pool, lane.pooler, within=20))
        await holds(f"{lane.pool.name} full width", full_width(lane.pool))
    stats = [lane.pool.stats() for lane in lanes]
    for lane in lanes:
        await lane.pool.close()
        await holds(f"{lane.pooler.label} forgets our clients", pooler_forgets(lane.pooler, 0))
        await lane.proxy.close()
    unexpected = [e for e in ledger.errors if not isinstance(e, EXPECTED)] + tally.unexpected
    if unexpected:
        violations.append(f"{len(unexpected)} unexpected errors: {unexpected[:5]!r}")
        for error in unexpected[:3]:
            traceback.print_exception(error)

    by_type = collections.Counter(type(e).__name__ for e in ledger.errors)
    attempted = len(ledger.committed) + len(ledger.failed) + len(ledger.ambiguous)
    print()
    print(f"soak: {elapsed:.0f} s, {args.writers} writers over PgBouncer 1.18 and "
          f"{stack.current.version[0]}.{stack.current.version[1]}, a fault every "
          f"{args.fault_every:g} s, seed {args.seed}")
    print(f"  transactions attempted   {attempted}")
    print(f"    committed              {len(ledger.committed)}")
    print(f"    failed (absent)        {len(ledger.failed)}")
    if counts is not None:
        print(f"    ambiguous, present     {counts.ambiguous_present}")
        print(f"    ambiguous, absent      {counts.ambiguous_absent}")
    print("  errors callers saw       " + ", ".join(f"{k} {v}" for k, v in by_type.most_common()))
    reconnects = sum(s.created_total for s in stats) - sum(lane.opened_at_start for lane in lanes)
    print(f"  reconnects               {reconnects}")
    print(f"  leaks reclaimed          {sum(s.leaked_total for s in stats)} "
          f"(holders told: {tally.leaks_seen})")
    print(f"  acquire timeouts         {sum(s.timeouts_total for s in stats)}")
    print(f"  validation failures      {sum(s.validation_failures_total for s in stats)}")
    print("  faults                   " + ", ".join(f"{k} x{v}" for k, v in tally.faults.items()))
    if violations:
        print("INVARIANTS VIOLATED:")
        for v in violations:
            print(f"  - {v}")
        return 1
    print("  invariants               held: every committed id present once, no failed id "
          "present, no id\n"
          "                           duplicated or invented, no slot lost, PgBouncer idle, "
          "servers alive")
    return 0


def main() -> None:
    # Leak reports (with the acquire site) and connect retries go to a file, not the terminal.
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=3.0)
    parser.add_argument("--writers", type=int, default=16)
    parser.add_argument("--fault-every", type=float, default=10.0, help="seconds between faults")
    parser.add_argument("--seed", type=int, default=int(time.time()))
    parser.add_argument("--log", default=str(Path(tempfile.gettempdir()) / "asyncpool-soak.log"))
    args = parser.parse_args()
    logging.basicConfig(filename=args.log, level=logging.INFO, filemode="w",
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    print(f"asyncpool logs (leak reports, retries): {args.log}")
    sys.exit(asyncio.run(soak(args)))


if __name__ == "__main__":
    main()
