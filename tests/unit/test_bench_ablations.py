"""`benchmarks/bench_overhead.py --ablate` compiles the pool's statement runner from its source
with pieces taken out (`--ablate-acquire`: its acquire path): each ablation must still find its
lines in the code as it is now, and what it builds must run a statement (else the benchmark
measures something else)."""

from __future__ import annotations

from types import MethodType

import pytest

from tests.script_support import REPO, load_script
from tests.unit.fakes import FakeServer, fake_pool

BENCH_MODULE = load_script(REPO / "benchmarks" / "bench_overhead.py", "bench_overhead")


@pytest.mark.parametrize("name", list(BENCH_MODULE.ABLATIONS))
async def test_each_ablation_applies_to_the_runner_as_it_is_and_runs_a_statement(
        server: FakeServer, name: str) -> None:
    runner = BENCH_MODULE.ablated_runner(name)
    async with fake_pool(server, max_size=1) as pool:
        fetchval = MethodType(runner, pool._slots)
        assert await fetchval("SELECT 1") == 1
        assert await fetchval("SELECT 1") == 1
        assert pool.stats().idle == 1


def test_an_ablation_whose_lines_are_gone_says_so() -> None:
    BENCH_MODULE.ABLATIONS["not in the runner"] = [("no such line", "")]
    try:
        with pytest.raises(SystemExit, match="statement runner changed"):
            BENCH_MODULE.ablated_runner("not in the runner")
    finally:
        del BENCH_MODULE.ABLATIONS["not in the runner"]


async def test_the_fleet_child_runs_every_instance_at_once_without_housekeeping(
        server: FakeServer, monkeypatch: pytest.MonkeyPatch) -> None:
    # `--only instructions --instr-instances N`: the counts divide by N x queries, so every
    # instance must run exactly its share; housekeeping is parked (valgrind stretches wall time).
    from contextlib import asynccontextmanager

    from asyncpool.pool import housekeeping

    monkeypatch.setattr(housekeeping, "run", housekeeping.run)  # restored after the test
    ran: list[int] = []
    housekeepers: list[str] = []

    @asynccontextmanager
    async def instance(dsn: str):  # type: ignore[no-untyped-def]
        async with fake_pool(server, min_size=1, max_size=1) as pool:
            assert pool._slots.housekeeper is not None
            housekeepers.append(repr(pool._slots.housekeeper.get_coro()))
            index = len(ran)
            ran.append(0)

            async def query(i: int) -> object:
                ran[index] += 1
                return await pool.fetchval("SELECT 1")

            yield query

    monkeypatch.setitem(BENCH_MODULE.CONTENDERS, "fake", instance)
    frozen: list[bool] = []
    monkeypatch.setattr(BENCH_MODULE.gc, "freeze", lambda: frozen.append(True))  # not this process
    args = BENCH_MODULE.argparse.Namespace(child="fake", dsn="unused", instances=3, queries=5)
    await BENCH_MODULE.child(args)
    assert ran == [25, 25, 25]  # 20 of warm-up, then --queries each
    assert len(housekeepers) == 3
    assert all("_child_fleet.<locals>.parked" in coro for coro in housekeepers)
    assert frozen == [True]


def test_the_report_says_which_glibc_regime_raw_asyncpg_ran_in(
        capsys: pytest.CaptureFixture[str]) -> None:
    """raw asyncpg's lead over the capped client decides what "over raw asyncpg" means: the
    report names the regime from it (a raw client as fast as the capped one is outside it)."""
    bench = BENCH_MODULE
    names = [bench.RAW, bench.RAW_CAPPED, bench.POOL_FETCHVAL, bench.POOL_ACQUIRE]
    for raw, regime in ((98.0, "ran in glibc's mmap regime (+44.0"),
                        (54.5, "ran outside glibc's mmap regime (+0.5")):
        samples = bench.Samples(names)
        samples.add_pass(dict(zip(names, [raw, 54.0, 58.0, 63.0], strict=True)))
        bench.report("single", samples, 3.0)
        assert regime in capsys.readouterr().out


@pytest.mark.parametrize("name", list(BENCH_MODULE.ACQUIRE_ABLATIONS))
async def test_each_acquire_ablation_applies_to_the_path_as_it_is_and_runs_a_block(
        server: FakeServer, name: str) -> None:
    """`--ablate-acquire` swaps a pool's classes for ones compiled from the acquire path's source
    with pieces taken out (benchmarks/acquire_ablations.py): the blocks it times run through them."""
    swap = BENCH_MODULE.ablated_classes(name)
    async with fake_pool(server, max_size=1) as pool:
        swap(pool)
        for _ in range(2):
            context = pool.acquire()
            async with context as conn:
                assert await conn.fetchval("SELECT 1") == 1
                held = context._lease
                assert held is not None
                site = held.frame
            assert (type(pool).__name__, type(context).__name__, type(conn).__name__) == (
                "AblatedPool", "AblatedContext", "AblatedConnection")
            without_site = name in ("acquire without the acquire site",
                                    "acquire without all of the above")
            assert (site is None) is without_site
        assert pool.stats().idle == 1


def test_an_acquire_ablation_whose_lines_are_gone_says_so() -> None:
    BENCH_MODULE.ACQUIRE_ABLATIONS["not in the path"] = [("exit", "no such line", "")]
    try:
        with pytest.raises(SystemExit, match=r"AcquireContext\.__aexit__ changed"):
            BENCH_MODULE.ablated_classes("not in the path")
    finally:
        del BENCH_MODULE.ACQUIRE_ABLATIONS["not in the path"]
