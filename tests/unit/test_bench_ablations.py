"""`benchmarks/bench_overhead.py --ablate` compiles the pool's statement runner from its source
with pieces taken out: each ablation must still find its lines in the runner as it is now, and
the runner it builds must run a statement (else the benchmark measures something else)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import MethodType, ModuleType

import pytest

from tests.unit.fakes import FakeServer, fake_pool

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_overhead.py"


def _bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_overhead", BENCH)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


BENCH_MODULE = _bench()


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
