"""Client CPU per query: a query through the pool against the same query on a raw asyncpg connection.

    .venv/bin/python benchmarks/bench_overhead.py [--rounds 5] [--queries 4000] [--block 50]
        [--instances 500] [--seconds 2] [--warmup 1] [--all]
        [--only python|python-fleet|single|fleet] [--uvloop]
        [--ladder | --floor | --ablate | --ablate-acquire | --compiled-probe]
    .venv/bin/python benchmarks/bench_overhead.py --only instructions [--rounds 3]
        [--instr-queries 500] [--instr-instances 1] [--simulate]
        [--ladder | --ablate | --ablate-acquire | --floor | --compiled-probe] [--all]
        [--uvloop]

`SELECT $1::int + 1`, statement caches off everywhere (asyncpg ``statement_cache_size=0``,
asyncpool ``prepared_statements="off"``: the same messages on the wire), telemetry off, client
CPU measured with ``time.process_time()`` over a window and divided by the queries run in it:
steadier than throughput on a shared machine. Every contender's query is a coroutine function
of its own (``async def query(i)``), raw asyncpg's too: an ``async with pool.acquire()`` block
needs one, and a contender that returned its driver's coroutine directly would skip a level of
the await chain the others pay for (1,700 instructions per query, benchmarks/README.md). The
cases:

- single: one connection (or pool of one) per contender, direct to PostgreSQL, queries back to
  back. All contenders are open at once and take turns in blocks of `--block` queries, raw
  asyncpg's block between the two asyncpool contenders' and the order reversed every pass;
- python: the pool's own cost, without I/O: its connection is swapped for a stub that answers
  at once, and `pool.fetchval` / acquire + fetchval are timed against calling the stub directly
  (no kernel, no server: steady on a busy machine); `--only python-fleet` does the same with
  `--instances` pools (through PgBouncer 1.18), each query going to the next pool in turn, so
  each finds its pool's objects as cold as a process serving hundreds of them would;
- fleet: `--instances` connections (or pools with max_size=1) per contender in one process
  through PgBouncer 1.18, every instance querying in a loop. All contenders' instances are open
  at once and take turns: one contender runs, the others wait at a gate; after `--warmup` (the
  previous contender's queries drain) its client CPU over `--seconds` is one sample.

`--only instructions` (needs valgrind; run only when asked) counts the instructions per query of
each contender of the single case: valgrind's cachegrind runs a child process per contender twice
(`--instr-queries` queries, then three times as many, after the same warm-up) and the difference
is divided by the extra queries. The counts barely move from run to run whatever else the machine
does (a few hundred instructions per query out of ~200,000), so a change too small for the CPU
clock on a shared machine shows; they are not time (user space only, a cache miss costs more than
an instruction), so the targets stay with the CPU cases. `--simulate` adds what cachegrind's
simulated first-level caches and branch predictor miss per query (slower): where a query loses
time that its instruction count does not show. `--instr-instances N` counts the fleet's way
instead: N instances of each contender in the child, through PgBouncer 1.18, all querying at
once, `--instr-queries` queries each (try `--instr-instances 200 --instr-queries 20`); the pools'
housekeeping is left out there, as it comes per second of wall time, which valgrind stretches
about fifty times (`bench_idle.py` measures it).

`--ladder` runs the single case with raw asyncpg, the pool, and stand-ins on the pool's own
connection that each do one more piece of the bookkeeping around a statement (a bare take and
return, clock reads, a lease with its task and context, the table of leases, the state checks):
where the pool's extra goes. `--floor` sets against them an acquire block that does nothing but
take the connection off a list and hand out a proxy forwarding to asyncpg's statement: the least
an ``async with pool.acquire()`` + proxy API can cost, checks and records left out.
`--ablate` (best with `--only instructions`) is the other way round:
the pool's own statement runner with one piece of its bookkeeping taken out each (the context
copy, the holding task, the checks, the lease kept on the record, the count and hooks).
`--ablate-acquire` does the same for ``async with pool.acquire()`` + ``conn.fetchval``
(benchmarks/acquire_ablations.py): the acquire site, the context copy, the holding task, the
checks before taking, in the statement and at the return, the count and hooks, and all at once.
`--compiled-probe` sets against them the same acquire path with its common case in C
(benchmarks/compiled_probe: a throwaway extension, built in place first), with the pool's Python
proxy, with a C proxy whose ``fetchval`` is C, and with that proxy's Python subclass.

Each sample of a contender is paired with raw asyncpg's sample of the same pass (next to it in
time), so a busy neighbour moves both. The report gives medians, the extra µs per query over raw
asyncpg as the median of the paired differences with their interquartile range (targets: <= 3 µs
single, <= 5 µs fleet), and ratios against asyncpg.Pool and psycopg_pool (fleet: with `--all`).
The report also says which of glibc's regimes raw asyncpg ran in (with asyncio's
``recv(256 KiB)`` each read maps and unmaps its buffer in one of them, depending on what the
process allocated before): there, "over raw asyncpg" includes that cost, and only `own` is the
pool's. asyncpool's default mode ("unnamed") is shown too, for information: it sends fewer messages, so
it is not the same work as raw asyncpg.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import statistics
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, ExitStack, asynccontextmanager
from typing import TYPE_CHECKING, Any, cast

from acquire_ablations import ACQUIRE_ABLATIONS, ablated_classes  # (beside this script)

from asyncpool.testing.affinity import PLACEMENTS

if TYPE_CHECKING:
    from asyncpool.config import PreparedStatements

QUERY = "SELECT $1::int + 1"
Query = Callable[[int], Awaitable[Any]]
# An instance: a way to run one query, inside an async context that owns its connection(s).
Instance = Callable[[str], Any]

RAW = "raw asyncpg"
# Raw asyncpg with its socket's reads capped as the pool caps its own connections'
# (`asyncpool.connect.reads`): the pool's extra over this one is its bookkeeping alone.
RAW_CAPPED = "raw asyncpg, reads capped (64 KiB)"
POOL_FETCHVAL = "asyncpool pool.fetchval"
POOL_ACQUIRE = "asyncpool acquire + fetchval"
UNNAMED = "asyncpool pool.fetchval, unnamed (default mode)"
ASYNCPG_POOL = "asyncpg.Pool acquire + fetchval"
PSYCOPG_POOL = "psycopg_pool connection + fetchone"


@asynccontextmanager
async def raw(dsn: str, capped: bool = False) -> AsyncIterator[Query]:
    import asyncpg

    conn = await asyncpg.connect(dsn, statement_cache_size=0)
    if capped:
        from asyncpool.connect import driver
        from asyncpool.connect.reads import cap_reads

        cap_reads(driver.transport_of(conn))
    async def query(i: int) -> Any:
        return await conn.fetchval(QUERY, i)

    try:
        yield query
    finally:
        await conn.close()


@asynccontextmanager
async def asyncpool_instance(dsn: str, *, mode: PreparedStatements, scoped: bool,
                             adjust: Callable[[Any], None] | None = None) -> AsyncIterator[Query]:
    """A pool of one queried with `pool.fetchval`, or an acquire block if `scoped`; `adjust`
    changes the pool once open (the ablations' stand-ins)."""
    import asyncpool

    pool = await asyncpool.create_pool(dsn, min_size=1, max_size=1, prepared_statements=mode,
                                       telemetry=False)
    if adjust is not None:
        adjust(pool)
    try:
        if scoped:
            async def query(i: int) -> Any:
                async with pool.acquire() as conn:
                    return await conn.fetchval(QUERY, i)

            yield query
        else:
            async def query(i: int) -> Any:
                return await pool.fetchval(QUERY, i)

            yield query
    finally:
        await pool.close()


@asynccontextmanager
async def asyncpg_pool(dsn: str) -> AsyncIterator[Query]:
    import asyncpg

    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=1, statement_cache_size=0)

    async def query(i: int) -> Any:
        async with pool.acquire() as conn:
            return await conn.fetchval(QUERY, i)

    try:
        yield query
    finally:
        await pool.close()


@asynccontextmanager
async def psycopg_pool(dsn: str) -> AsyncIterator[Query]:
    from psycopg_pool import AsyncConnectionPool

    # prepare_threshold=None: no server-side prepared statements (PgBouncer 1.18 cannot keep them).
    pool = AsyncConnectionPool(dsn, min_size=1, max_size=1, open=False,
                               kwargs={"prepare_threshold": None, "autocommit": True})
    await pool.open(wait=True)

    async def query(i: int) -> Any:
        async with pool.connection() as conn:
            cur = await conn.execute("SELECT %s::int + 1", (i,))
            return (await cur.fetchone())[0]  # type: ignore[index]

    try:
        yield query
    finally:
        await pool.close()


CONTENDERS: dict[str, Instance] = {
    RAW: raw,
    RAW_CAPPED: lambda dsn: raw(dsn, capped=True),
    POOL_FETCHVAL: lambda dsn: asyncpool_instance(dsn, mode="off", scoped=False),
    POOL_ACQUIRE: lambda dsn: asyncpool_instance(dsn, mode="off", scoped=True),
    UNNAMED: lambda dsn: asyncpool_instance(dsn, mode="unnamed", scoped=False),
    ASYNCPG_POOL: asyncpg_pool,
    PSYCOPG_POOL: psycopg_pool,
}


# `--ladder`: stand-ins on the pool's own connection, each doing one more piece of the bookkeeping
# the statement runner does around a statement, from bare take-and-return up (where the extra goes).
LADDER = (
    "ladder 0: take + return (a list), nothing else",
    "ladder 1: + a clock read at each end",
    "ladder 2: + a Lease (holding task, context copy)",
    "ladder 3: + the table of leases",
    "ladder 4: + is_closed() / is_in_transaction()",
)


def _ladder_step(step: int) -> Instance:
    @asynccontextmanager
    async def instance(dsn: str) -> AsyncIterator[Query]:
        from contextvars import copy_context

        import asyncpool
        from asyncpool.pool.lease import RELEASED, Lease, task_of
        from asyncpool.pool.record import ConnectionRecord

        pool = await asyncpool.create_pool(dsn, min_size=1, max_size=1, prepared_statements="off",
                                           telemetry=False)
        slots = pool._slots
        idle = [slots.idle[0]]
        clock = slots.clock
        leases: dict[ConnectionRecord, Lease] = {}

        async def query(i: int) -> Any:
            record = idle.pop()
            conn = record.conn
            now = clock() if step >= 1 else 0.0
            lease = Lease(record, now, None, task_of(asyncio.get_running_loop()), copy_context()) \
                if step >= 2 else None
            if step >= 3:
                assert lease is not None
                leases[record] = lease
            if step >= 4 and conn.is_closed():
                raise RuntimeError("closed")
            try:
                result = await conn.fetchval(QUERY, i)
            finally:
                if step >= 1:
                    now = clock()
                if step >= 4 and conn.is_in_transaction():
                    raise RuntimeError("in a transaction")
                if step >= 3:
                    del leases[record]
                if lease is not None:
                    lease.state = RELEASED
                idle.append(record)
            return result

        try:
            yield query
        finally:
            await pool.close()

    return instance


# `--floor`: what the shape of ``async with pool.acquire() as conn: await conn.fetchval(...)``
# costs by itself: a context object whose __aenter__ pops the pool's one connection off a list and
# hands out a proxy object, whose fetchval runs asyncpg's statement (`_execute`, as the pool's
# proxy does), and whose __aexit__ puts it back. Nothing checked, nothing recorded: no pool could
# do less behind that API, so its extra over raw asyncpg is the least an acquire path can cost.
FLOOR = "floor: async with + proxy, no bookkeeping"


class _FloorProxy:
    __slots__ = ("_conn",)
    _conn: Any

    async def fetchval(self, query: str, *args: Any) -> Any:
        rows = await self._conn._execute(query, args, 1, None)
        return rows[0][0] if rows else None


class _FloorContext:
    __slots__ = ("_idle", "_record")
    _idle: deque[Any]
    _record: Any

    async def __aenter__(self) -> _FloorProxy:
        record = self._record = self._idle.pop()
        proxy = object.__new__(_FloorProxy)
        proxy._conn = record.conn
        return proxy

    async def __aexit__(self, *exc_info: object) -> None:
        self._idle.append(self._record)


@asynccontextmanager
async def _floor(dsn: str) -> AsyncIterator[Query]:
    import asyncpool

    pool = await asyncpool.create_pool(dsn, min_size=1, max_size=1, prepared_statements="off",
                                       telemetry=False)
    idle = pool._slots.idle

    def acquire() -> _FloorContext:
        context = object.__new__(_FloorContext)
        context._idle = idle
        return context

    async def query(i: int) -> Any:
        async with acquire() as conn:
            return await conn.fetchval(QUERY, i)

    try:
        yield query
    finally:
        await pool.close()


# `--compiled-probe`: the pool's acquire path with its common case in C (benchmarks/compiled_probe,
# a throwaway extension built in place: its README.md): would a compiled acquire path meet the
# 3 µs target? The context's __aenter__/__aexit__ do the Python path's bookkeeping without a
# Python frame; the block's connection is the pool's Python proxy, or a C one whose fetchval is C
# (as it is, and as a Python subclass that is an asyncpg.Connection for isinstance).
PROBES = {
    "compiled probe: C context, Python proxy": "python",
    "compiled probe: C context, C proxy fetchval": "c",
    "compiled probe: C context, C proxy + Python subclass": "c-subclass",
}


def _compiled_probe(proxy: str) -> Instance:
    def adjust(pool: Any) -> None:
        import os
        import sys

        sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "compiled_probe"))
        try:
            import probe  # (built in place: see its setup.py)
        except ImportError as exc:
            raise SystemExit(f"--compiled-probe: build benchmarks/compiled_probe first ({exc})") from exc
        probe.install(pool, proxy=proxy)

    return lambda dsn: asyncpool_instance(dsn, mode="off", scoped=True, adjust=adjust)


# `--ablate`: the pool's own statement runner (`Slots.one`) with one piece of its bookkeeping
# taken out each, compiled from its source with that piece's lines replaced: what each piece costs
# against the whole runner compiled the same way (most pieces are guarantees the pool keeps: this
# measures them, it does not propose to drop them).
ABLATIONS: dict[str, list[tuple[str, str]]] = {
    # The control: compiled the same way, nothing taken out (compare the others with this one).
    "runner compiled again, whole": [],
    "runner without the context copy": [
        ("copy_context() if self.track_leaks else None", "None")],
    "runner without the holding task": [
        ("lease.task = task_of(loop)", "lease.task = None")],
    "runner without the checks before taking": [
        ("if (self.fast_statements and idle and", "if (idle and"),
        (" is loop)\n                and record.probe.is_connected()):", " is loop)):")],
    "runner without the checks at the return": [
        ("if (lease.state is ACTIVE and self.fast_statements and not lease.reported\n"
         "                    and not (self._may_retire and conn.retire_reason) and now < expires_at\n"
         "                    and not record.probe.is_in_transaction() and not record.stale):",
         "if lease.state is ACTIVE:")],
    "runner without the lease on the record": [
        ("            record.lease = lease\n", ""), ("                record.lease = None\n", "")],
    "runner without the count and observer hooks": [
        ("            self.acquired_total += 1\n", ""),
        ("            if self.on_acquired is not None:\n                self.on_acquired(0.0)\n", ""),
        ("                if on_released is not None:\n"
         "                    on_released(now - lease.acquired_at)\n", "")],
}


def ablated_runner(name: str, method: str = "fetchval") -> Callable[..., Awaitable[Any]]:
    """The pool's statement runner for `method`, compiled from its source with `ABLATIONS[name]`
    applied (tests/unit/test_bench_ablations.py checks each still applies and runs)."""
    import inspect
    import textwrap

    from asyncpool.pool import runner as module

    source = textwrap.dedent(inspect.getsource(module.statement_runner))
    for old, new in ABLATIONS[name]:
        if old not in source:
            raise SystemExit(f"{name}: the statement runner changed; update ABLATIONS")
        source = source.replace(old, new)
    built: dict[str, Any] = {}
    exec(compile(source, module.__file__, "exec"), dict(vars(module)), built)  # noqa: S102
    runner: Callable[..., Awaitable[Any]] = built["statement_runner"](method)
    return runner


def _ablated(name: str) -> Instance:
    """A pool whose `pool.fetchval` is its statement runner with `ABLATIONS[name]` applied."""
    from types import MethodType

    runner = ablated_runner(name)

    def adjust(pool: Any) -> None:
        # Bound on the instance as the pool binds its own (the same lookup per query).
        pool.fetchval = MethodType(runner, pool._slots)

    return lambda dsn: asyncpool_instance(dsn, mode="off", scoped=False, adjust=adjust)


def _acquire_ablated(name: str) -> Instance:
    """A pool whose acquire path has `ACQUIRE_ABLATIONS[name]` applied, queried as the pool's
    acquire contender is."""
    swap = ablated_classes(name)
    return lambda dsn: asyncpool_instance(dsn, mode="off", scoped=True, adjust=swap)


def _order(names: list[str]) -> list[str]:
    """Raw asyncpg between the two asyncpool contenders the targets are about, the others after:
    reversed every pass, raw asyncpg's block is always next to theirs."""
    first = [n for n in (POOL_FETCHVAL, RAW, POOL_ACQUIRE, RAW_CAPPED) if n in names]
    return first + [n for n in names if n not in first]


def single_case(dsn: str, args: argparse.Namespace) -> Samples:
    """µs of client CPU per query for each contender, one instance each, queries back to back.

    All contenders are open at once and take turns in short blocks (`--block` queries), order
    reversed every pass, so load from elsewhere on the machine falls on them alike; each block is
    one sample, and each pass gives one paired difference per contender (its block minus raw
    asyncpg's block of the same pass). Each contender has an event loop of its own, run only for
    its blocks: what one leaves pending on its loop (asyncpg.Pool's timer per idle connection,
    say, which makes every turn of an asyncio loop dearer) is not billed to the others.
    """
    samples = Samples(list(CONTENDERS))
    clock = time.process_time

    async def block(query: Query, n: int) -> float:
        started = clock()
        for i in range(n):
            await query(i)
        return (clock() - started) / n * 1e6

    with ExitStack() as closing:
        runners: dict[str, asyncio.Runner] = {}
        queries: dict[str, Query] = {}
        for name, make in CONTENDERS.items():
            runners[name] = runner = closing.enter_context(asyncio.Runner())
            opened = AsyncExitStack()
            queries[name] = runner.run(opened.enter_async_context(make(dsn)))
            closing.callback(runner.run, opened.aclose())  # before its runner closes
            runner.run(block(queries[name], 200))  # warm-up: first executions, allocator, caches
        order = _order(list(queries))
        passes = max(1, args.queries // args.block)
        for r in range(args.rounds):
            for _ in range(passes):
                measured: dict[str, float] = {}
                for name in order:
                    measured[name] = runners[name].run(block(queries[name], args.block))
                samples.add_pass(measured)
                order.reverse()
            print(f"  [single {r + 1}/{args.rounds}] " + samples.last(passes), flush=True)
    return samples


async def open_instances(make: Instance, dsn: str, count: int, opened: AsyncExitStack,
                         at_once: int) -> list[Query]:
    """`count` instances of a contender, entered on `opened`, `at_once` logins at a time (not
    hundreds at once)."""
    queries: list[Query] = []
    for chunk in range(0, count, at_once):
        n = min(at_once, count - chunk)
        queries += await asyncio.gather(*(opened.enter_async_context(make(dsn)) for _ in range(n)))
    return queries


def fleet_case(dsn: str, args: argparse.Namespace) -> Samples:
    """µs of client CPU per query, `--instances` instances of each contender querying at once.

    Every contender's instances are opened up front (one process, all through the same PgBouncer),
    each contender on an event loop of its own, and take turns: one contender's loop runs while
    the others' wait, their instances parked at a gate; after a warm-up the client CPU and the
    queries completed over `--seconds` make one sample. The order is reversed every pass.
    """
    names = [n for n in CONTENDERS if args.all or n not in (ASYNCPG_POOL, PSYCOPG_POOL)]
    samples = Samples(names)
    counts = dict.fromkeys(names, 0)
    in_flight = dict.fromkeys(names, 0)
    gates: dict[str, asyncio.Event] = {}
    drained: dict[str, asyncio.Event] = {}  # set whenever none of a contender's queries is in flight
    stopping = False

    async def worker(name: str, query: Query) -> None:
        gate = gates[name]
        i = 0
        while True:
            if not gate.is_set():
                await gate.wait()
            if stopping:
                return
            in_flight[name] += 1
            await query(i)
            in_flight[name] -= 1
            if not in_flight[name]:
                drained[name].set()
            i += 1
            counts[name] += 1

    async def open_all(name: str, opened: AsyncExitStack) -> list[asyncio.Task[None]]:
        gates[name], drained[name] = asyncio.Event(), asyncio.Event()
        queries = await open_instances(CONTENDERS[name], dsn, args.instances, opened, 100)
        return [asyncio.create_task(worker(name, q)) for q in queries]

    async def turn(name: str) -> float:
        gates[name].set()
        await asyncio.sleep(args.warmup)
        gc.collect()
        done = counts[name]
        started = time.process_time()
        await asyncio.sleep(args.seconds)
        used = time.process_time() - started
        total = counts[name] - done
        # Parked at the gate before the loop stops: a statement left half-way on a paused loop
        # keeps its PgBouncer server from everyone else.
        gates[name].clear()
        if in_flight[name]:
            drained[name].clear()
            await drained[name].wait()
        print(f"  [fleet] {name}: {used / total * 1e6:.1f} µs/query ({total / args.seconds:,.0f} q/s)",
              flush=True)
        return used / total * 1e6

    async def finish(name: str, tasks: list[asyncio.Task[None]]) -> None:
        gates[name].set()
        await asyncio.gather(*tasks, return_exceptions=True)

    with ExitStack() as closing:
        runners: dict[str, asyncio.Runner] = {}
        for name in names:
            runners[name] = runner = closing.enter_context(asyncio.Runner())
            opened = AsyncExitStack()
            tasks = runner.run(open_all(name, opened))
            closing.callback(runner.run, opened.aclose())
            closing.callback(runner.run, finish(name, tasks))  # runs first: workers end, then pools close
            print(f"  [fleet] opened {args.instances} x {name}", flush=True)
        order = _order(names)
        try:
            for _ in range(args.rounds):
                samples.add_pass({name: runners[name].run(turn(name)) for name in order})
                order.reverse()
        finally:
            stopping = True
    return samples


#: What cachegrind counts, by the name it prints: instructions, and with `--simulate` the misses
#: of its simulated first-level caches and branch predictor (where a CPU loses time that the
#: instruction count does not show).
EVENTS = ("I refs",)
SIMULATED = ("I refs", "I1 misses", "D1 misses", "Mispredicts")


#: glibc malloc settings for the counted children: no trimming or mmap of asyncpg's buffers.
_STEADY_MALLOC = ("glibc.malloc.trim_threshold=16777216:glibc.malloc.mmap_threshold=16777216:"
                  "glibc.malloc.top_pad=4194304")


def instructions_case(dsn: str, args: argparse.Namespace) -> dict[str, dict[str, list[float]]]:
    """Instructions per query (and with `--simulate` cache misses and branch mispredictions:
    per event, per contender, one value per round), counted by valgrind's cachegrind in a child
    process per contender: one run with `--instr-queries` queries and one with three times as
    many, after the same warm-up; their difference over the extra queries leaves out start-up,
    imports and connecting. Counts are nearly the same from run to run whatever the machine is
    doing, so a change of a few hundred instructions per query shows; they are not time (a cache
    miss costs more than an instruction), so the CPU cases stay the measure of the targets."""
    import os
    import re
    import shutil
    import subprocess
    import sys

    valgrind = shutil.which("valgrind")
    if valgrind is None:
        raise SystemExit("--only instructions needs valgrind (Debian package valgrind)")
    names = [n for n in CONTENDERS if args.all or n not in (ASYNCPG_POOL, PSYCOPG_POOL)]
    # glibc's heap trimming at each of asyncpg's 64 KiB read buffers depends on the package's
    # allocation history: unpinned, contenders whose code did not change moved by up to 1,800
    # instructions per query between two trees; pinned, within about 500.
    env = {**os.environ, "PYTHONHASHSEED": "0", "GLIBC_TUNABLES": _STEADY_MALLOC}
    small, large = args.instr_queries, 3 * args.instr_queries

    events = SIMULATED if args.simulate else EVENTS
    simulate = "yes" if args.simulate else "no"

    def count(name: str, queries: int) -> dict[str, int]:
        cmd = [valgrind, "--tool=cachegrind", f"--cache-sim={simulate}", f"--branch-sim={simulate}",
               "--cachegrind-out-file=/dev/null",
               sys.executable, __file__, "--child", name, "--dsn", dsn, "--queries", str(queries),
               "--instances", str(args.instr_instances)]
        if args.uvloop:
            cmd.append("--uvloop")
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
        found = {event: re.search(event.replace(" ", r"\s+") + r":\s+([\d,]+)", done.stderr)
                 for event in events}
        if done.returncode != 0 or not all(found.values()):
            raise SystemExit(f"{name}: the child failed ({done.returncode}):\n{done.stderr[-2000:]}")
        return {event: int(m.group(1).replace(",", "")) for event, m in found.items() if m}

    per_query: dict[str, dict[str, list[float]]] = {e: {n: [] for n in names} for e in events}
    for r in range(args.rounds):
        for name in names if r % 2 == 0 else reversed(names):
            few, many = count(name, small), count(name, large)
            for event in events:
                per_query[event][name].append(
                    (many[event] - few[event]) / ((large - small) * args.instr_instances))
        print(f"  [instructions {r + 1}/{args.rounds}] "
              + ", ".join(f"{n}: {v[-1]:,.0f}" for n, v in per_query["I refs"].items()), flush=True)
    return per_query


async def child(args: argparse.Namespace) -> None:
    """`--child`: one contender, 200 queries of warm-up, then `--queries` queries (for valgrind);
    with `--instances` > 1, that many instances of it querying at once, 20 and then `--queries`
    queries each, without the pools' housekeeping (see `--instr-instances`)."""
    if args.instances > 1:
        await _child_fleet(args)
        return
    async with CONTENDERS[args.child](args.dsn) as query:
        for i in range(200):
            await query(i)
        gc.collect()
        gc.freeze()  # the warm-up's objects are not traversed again by the measured queries' GC
        for i in range(args.queries):
            await query(i)


async def _child_fleet(args: argparse.Namespace) -> None:
    from asyncpool.pool import housekeeping

    async def parked(ref: object, period: float) -> None:
        await asyncio.Event().wait()

    housekeeping.run = parked  # read when a pool opens

    async def worker(query: Query, n: int) -> None:
        for i in range(n):
            await query(i)

    async with AsyncExitStack() as opened:
        # Ten logins at a time: under valgrind a hundred at once outlast the pool's connect_timeout.
        queries = await open_instances(CONTENDERS[args.child], args.dsn, args.instances, opened, 10)
        await asyncio.gather(*(worker(query, 20) for query in queries))
        gc.collect()
        gc.freeze()
        await asyncio.gather(*(worker(query, args.queries) for query in queries))


def report_instructions(counted: dict[str, dict[str, list[float]]], instances: int) -> None:
    med = statistics.median
    where = (f"; {instances} instances of each at once through PgBouncer 1.18, housekeeping left out"
             if instances > 1 else "")
    for event, per_query in counted.items():
        base = med(per_query[RAW])
        what = "instructions" if event == "I refs" else f"{event} (simulated)"
        print(f"\n== {what} per query (valgrind), median (min-max) of {len(per_query[RAW])} runs "
              f"each; extra over raw asyncpg{where}")
        for name, values in per_query.items():
            print(f"  {name:<48} {med(values):9,.0f} ({min(values):,.0f}-{max(values):,.0f})  "
                  f"extra {med(values) - base:+8,.0f} ({(med(values) - base) / base:+.1%})")


class _Instant:
    """Stands in for the pool's asyncpg connection in the `python` case: answers at once, and has
    what the pool reads on a return (nothing to reset)."""

    class _Protocol:
        def _is_cancelling(self) -> bool:
            return False

        def is_in_transaction(self) -> bool:
            return False

        def is_connected(self) -> bool:
            return True

    class _Section:  # asyncpg's lock over a statement: never held here (the pool's busy check)
        _acquired = False

    def __init__(self) -> None:
        self._protocol = self._Protocol()
        self._stmt_exclusive_section = self._Section()
        self._aborted = False
        self._top_xact = None
        self._listeners: dict[str, Any] = {}
        self._log_listeners: set[Any] = set()
        self._termination_listeners: set[Any] = set()
        self._query_loggers: set[Any] = set()
        self._pool_release_ctr = 0

    def is_closed(self) -> bool:
        return False

    def is_in_transaction(self) -> bool:
        return False

    async def fetchval(self, query: str, *args: Any, column: int = 0, timeout: float | None = None) -> Any:
        return 1


async def python_case(dsn: str, args: argparse.Namespace, instances: int = 1) -> Samples:
    """The pool's own Python cost: its connection swapped for one that answers at once (no I/O,
    no kernel), `pool.fetchval` and acquire + fetchval against calling that stub directly.

    With several `instances` (``python-fleet``), each query goes to the next pool (or stub) in
    turn, so each finds its pool's objects as cold as in a process serving hundreds of them."""
    import asyncpool
    from asyncpool.connect.driver import probe

    # No checkout check nor expiry: the stub cannot run one, and opening 500 pools takes a while.
    pools = [await asyncpool.create_pool(dsn, min_size=1, max_size=1, prepared_statements="off",
                                         telemetry=False, name=f"python-{n}", validate_after=None,
                                         max_lifetime=None)
             for n in range(instances)]
    records = [pool._slots.idle[0] for pool in pools]
    reals = [record.conn for record in records]
    stubs = [_Instant() for _ in records]
    for record, stub in zip(records, stubs, strict=True):
        record.conn = cast(Any, stub)
        record.probe = probe(stub)

    async def acquire(i: int) -> Any:
        async with pools[i % instances].acquire() as conn:
            return await conn.fetchval(QUERY, i)

    async def direct(i: int) -> Any:
        return await stubs[i % instances].fetchval(QUERY, i)

    async def fetchval(i: int) -> Any:
        return await pools[i % instances].fetchval(QUERY, i)

    queries: dict[str, Query] = {RAW: direct, POOL_FETCHVAL: fetchval, POOL_ACQUIRE: acquire}
    samples = Samples(list(queries))
    block = max(args.block * 40, instances * 4)
    try:
        for query in queries.values():
            for i in range(block):
                await query(i)
        order = _order(list(queries))
        for _ in range(args.rounds * 6):
            measured = {}
            for name in order:
                query = queries[name]
                started = time.process_time()
                for i in range(block):
                    await query(i)
                measured[name] = (time.process_time() - started) / block * 1e6
            samples.add_pass(measured)
            order.reverse()
    finally:
        for record, real in zip(records, reals, strict=True):
            record.conn = real
            record.probe = probe(real)
        for pool in pools:
            await pool.close()
    return samples


class Samples:
    """Per contender: µs of client CPU per query for each sample, and per pass its difference to
    raw asyncpg's sample of the same pass (next to it in time)."""

    def __init__(self, names: list[str]) -> None:
        self.cpu: dict[str, list[float]] = {n: [] for n in names}
        self.extra: dict[str, list[float]] = {n: [] for n in names}

    def add_pass(self, measured: dict[str, float]) -> None:
        base = measured[RAW]
        for name, cpu in measured.items():
            self.cpu[name].append(cpu)
            self.extra[name].append(cpu - base)

    def last(self, passes: int) -> str:
        return ", ".join(f"{n}: {statistics.median(v[-passes:]):.1f}" for n, v in self.cpu.items())


def asyncpool_build() -> str:
    """Which asyncpool this run measures (``PYTHONPATH`` may point at another copy) and which of
    its modules are compiled extensions (a mypyc or Cython build) rather than Python source:
    printed with the figures, so that a run is not taken for the other kind. Read from the
    folder, importing nothing more."""
    import importlib.machinery
    import os
    import sys

    import asyncpool

    folder = os.path.dirname(asyncpool.__file__)
    compiled = sorted(
        os.path.relpath(os.path.join(where, name), folder).split(".")[0].replace(os.sep, ".")
        for where, _, names in os.walk(folder) for name in names
        if name.endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES)))
    kind = f"compiled: {', '.join(compiled)}" if compiled else "Python source"
    return f"asyncpool from {folder} ({kind}), Python {sys.version.split()[0]}"


def glibc_regime(raw: float, over_capped: float) -> str:
    """Which of glibc's regimes raw asyncpg ran in, from its CPU per query (`raw`) and its
    extra over the capped client (`over_capped`): asyncio's ``recv(256 KiB)`` maps and unmaps
    its buffer on every read in one of them, and which one a process is in depends on what it
    allocated before, so the "over raw asyncpg" figures mean different things in each."""
    if over_capped > 0.15 * raw:
        return (f"raw asyncpg ran in glibc's mmap regime ({over_capped:+.1f} µs/query over the "
                "capped client): 'extra' includes that cost, 'own' is the pool's own")
    return (f"raw asyncpg ran outside glibc's mmap regime ({over_capped:+.1f} µs/query over the "
            "capped client): 'extra' and 'own' both measure the pool's own cost")


def report(case: str, samples: Samples, target: float) -> bool:
    """Print one case; True when both asyncpool contenders met `target`."""
    med = statistics.median
    base = med(samples.cpu[RAW])
    capped = samples.extra.get(RAW_CAPPED)
    print(f"\n== {case}: client CPU µs per query, median (min-max) of {len(samples.cpu[RAW])} "
          "samples; extra = median of the paired differences to raw asyncpg (interquartile range)"
          + ("; own = the same to raw asyncpg with reads capped as the pool's" if capped else ""))
    for name, values in samples.cpu.items():
        diffs = samples.extra[name]
        q = statistics.quantiles(diffs, n=4) if len(diffs) >= 2 else [diffs[0]] * 3
        own = (f"  own {med([d - c for d, c in zip(diffs, capped, strict=True)]):+6.1f}"
               if capped and name not in (RAW, RAW_CAPPED) else "")
        print(f"  {name:<48} {med(values):7.1f} ({min(values):.1f}-{max(values):.1f})  "
              f"extra {med(diffs):+6.1f} ({q[0]:+.1f}..{q[2]:+.1f}){own}")
    if capped:
        print("  " + glibc_regime(base, -med(capped)))
    met = True
    for name in (POOL_FETCHVAL, POOL_ACQUIRE):
        extra = med(samples.extra[name])
        verdict = "met" if extra <= target else "MISSED"
        met = met and extra <= target
        print(f"  {name}: {extra:+.1f} µs/query over raw asyncpg (target <= {target:g}): {verdict}; "
              f"raw / it = {base / med(samples.cpu[name]):.3f}x")
    for other in (ASYNCPG_POOL, PSYCOPG_POOL):
        if other in samples.cpu:
            print(f"  {POOL_ACQUIRE} / {other}: "
                  f"{med(samples.cpu[POOL_ACQUIRE]) / med(samples.cpu[other]):.2f}x the CPU per query")
    return met


def _drop_missing_libraries() -> None:
    """Leave out psycopg_pool where it is not installed (the Python 3.12 and 3.13 venvs
    scripts/setup.sh builds for the Lambda runtimes have asyncpg only), and say so."""
    import importlib.util

    if PSYCOPG_POOL in CONTENDERS and importlib.util.find_spec("psycopg_pool") is None:
        del CONTENDERS[PSYCOPG_POOL]
        print(f"{PSYCOPG_POOL}: left out (psycopg_pool is not installed in this Python)")


def _add_stand_ins(args: argparse.Namespace) -> None:
    """`--ladder`, `--ablate`, `--ablate-acquire`, `--floor` and `--compiled-probe`: their
    contenders replace the others but raw asyncpg and the pool, in the single case unless
    instructions are counted."""
    stand_ins: dict[str, Instance] = {}
    if args.floor or args.child == FLOOR:
        stand_ins[FLOOR] = _floor
    if args.ladder or args.child in LADDER:
        stand_ins.update({name: _ladder_step(step) for step, name in enumerate(LADDER)})
    if args.ablate or args.child in ABLATIONS:
        stand_ins.update({name: _ablated(name) for name in ABLATIONS})
    if args.compiled_probe or args.child in PROBES:
        stand_ins.update({name: _compiled_probe(proxy) for name, proxy in PROBES.items()})
    if args.ablate_acquire or args.child in ACQUIRE_ABLATIONS:
        stand_ins.update({name: _acquire_ablated(name) for name in ACQUIRE_ABLATIONS})
    if not stand_ins:
        return
    for other in (UNNAMED, ASYNCPG_POOL, PSYCOPG_POOL):
        del CONTENDERS[other]
    CONTENDERS.update(stand_ins)
    if args.only != "instructions":
        args.only = "single"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--queries", type=int, default=4000, help="single: queries per round")
    parser.add_argument("--block", type=int, default=50, help="single: queries per sample")
    parser.add_argument("--instances", type=int, default=500, help="fleet: instances per process")
    parser.add_argument("--seconds", type=float, default=2.0, help="fleet: measured window per turn")
    parser.add_argument("--warmup", type=float, default=1.0,
                        help="fleet: seconds a contender runs before its window (the last one drains)")
    parser.add_argument("--all", action="store_true",
                        help="fleet: asyncpg.Pool and psycopg_pool too (1,000 more connections)")
    parser.add_argument("--only", choices=["single", "fleet", "python", "python-fleet", "instructions"],
                        help="one case; instructions (needs valgrind) runs only when named")
    parser.add_argument("--instr-queries", type=int, default=500,
                        help="instructions: queries in the shorter of each contender's two runs")
    parser.add_argument("--instr-instances", type=int, default=1,
                        help="instructions: instances of each contender querying at once, through "
                             "PgBouncer 1.18 (--instr-queries each), as in the fleet")
    parser.add_argument("--simulate", action="store_true",
                        help="instructions: also the misses of cachegrind's simulated caches and "
                             "branch predictor (I1, D1, mispredictions)")
    parser.add_argument("--child", choices=[*CONTENDERS, *LADDER, *ABLATIONS, *ACQUIRE_ABLATIONS, FLOOR,
                                        *PROBES],
                        help=argparse.SUPPRESS)
    parser.add_argument("--dsn", help=argparse.SUPPRESS)
    parser.add_argument("--uvloop", action="store_true", help="run every contender on uvloop")
    parser.add_argument("--ladder", action="store_true",
                        help="single: raw asyncpg and the pool against stand-ins doing a part of "
                             "the pool's bookkeeping each (replaces the other contenders)")
    parser.add_argument("--floor", action="store_true",
                        help="raw asyncpg and the pool against an acquire block that does no "
                             "bookkeeping at all: the least that API costs (replaces the others)")
    parser.add_argument("--ablate", action="store_true",
                        help="raw asyncpg and the pool against the pool's statement runner with one "
                             "piece of its bookkeeping taken out each (replaces the other contenders)")
    parser.add_argument("--ablate-acquire", action="store_true",
                        help="raw asyncpg and the pool against its acquire path with one piece of "
                             "its bookkeeping taken out each (benchmarks/acquire_ablations.py)")
    parser.add_argument("--compiled-probe", action="store_true",
                        help="raw asyncpg and the pool against its acquire path's common case in C "
                             "(benchmarks/compiled_probe, built in place first; replaces the others)")
    parser.add_argument("--pin", choices=PLACEMENTS, default="same",
                        help="CPU placement of client and servers (asyncpool/testing/affinity.py)")
    args = parser.parse_args()
    _add_stand_ins(args)
    _drop_missing_libraries()
    if args.uvloop:
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    if args.child is not None:
        asyncio.run(child(args))
        return

    from asyncpool.testing import ServerStack
    from asyncpool.testing.affinity import place

    stack = ServerStack.start(max_connections=80,
                              pgbouncer_overrides={"max_client_conn": args.instances * 6 + 200})
    try:
        # Before any connection: a server's backends inherit the placement.
        print(f"placement: {place(args.pin, stack.pids())}", flush=True)
        print(asyncpool_build(), flush=True)
        results = {}
        if args.only in (None, "python", "python-fleet"):
            many = args.only == "python-fleet"  # many pools: through PgBouncer, as the fleet
            results[args.only or "python"] = asyncio.run(python_case(
                (stack.legacy if many else stack.postgres).dsn(), args, args.instances if many else 1))
        if args.only in (None, "single"):
            results["single"] = single_case(stack.postgres.dsn(), args)
        if args.only in (None, "fleet"):
            results["fleet"] = fleet_case(stack.legacy.dsn(), args)
        if args.only == "instructions":
            fleet = args.instr_instances > 1  # through PgBouncer, as the fleet case
            counted = instructions_case((stack.legacy if fleet else stack.postgres).dsn(), args)
    finally:
        stack.stop()
    titles = {"python": "the pool's Python alone: connection swapped for a stub that answers at once",
              "python-fleet": f"the pool's Python alone, {args.instances} pools taking turns query by query",
              "single": "1 pool, direct to PostgreSQL",
              "fleet": f"{args.instances} pools per process through PgBouncer 1.18"}
    targets = {"python": 3.0, "python-fleet": 5.0, "single": 3.0, "fleet": 5.0}
    for case, samples in results.items():
        report(f"{case} ({titles[case]})", samples, targets[case])
    if args.only == "instructions":
        report_instructions(counted, args.instr_instances)


if __name__ == "__main__":
    main()
