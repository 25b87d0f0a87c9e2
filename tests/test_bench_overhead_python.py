"""`benchmarks/bench_overhead.py --only python` swaps the pool's connection for a stub that
answers at once: the stub must have what the pool reads on a checkout and a return, or the case
fails (it did once the return read asyncpg's statement lock), and the pool must be given its own
connection back."""

from __future__ import annotations

import argparse
from types import ModuleType

from asyncpool.testing import PostgresServer
from tests.script_support import REPO, load_script

BENCH = REPO / "benchmarks" / "bench_overhead.py"


def _bench() -> ModuleType:
    return load_script(BENCH, "bench_overhead_under_test")


async def test_the_python_case_runs_against_the_pool_as_it_is(postgres: PostgresServer) -> None:
    bench = _bench()
    samples = await bench.python_case(postgres.dsn(), argparse.Namespace(rounds=1, block=1),
                                      instances=2)
    assert set(samples.cpu) == {bench.RAW, bench.POOL_FETCHVAL, bench.POOL_ACQUIRE}
    assert all(len(cpu) == 6 and min(cpu) > 0 for cpu in samples.cpu.values())


async def test_the_floor_contender_answers_as_the_pool_does(postgres: PostgresServer) -> None:
    # `--floor`'s acquire block runs asyncpg's statement itself: it must answer what the pool's
    # acquire block answers, or its cost says nothing about the pool's.
    bench = _bench()
    contenders = {bench.FLOOR: bench._floor, bench.POOL_ACQUIRE: bench.CONTENDERS[bench.POOL_ACQUIRE],
                  bench.RAW: bench.CONTENDERS[bench.RAW]}
    answers = {}
    for name, contender in contenders.items():
        async with contender(postgres.dsn()) as query:
            answers[name] = [await query(i) for i in range(3)]
    assert answers[bench.FLOOR] == answers[bench.POOL_ACQUIRE] == answers[bench.RAW] == [1, 2, 3]
