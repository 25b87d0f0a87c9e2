"""Times given as other real number types (numpy's, Decimal, Fraction), per call and as options:
taken as asyncpg takes them, and turned into floats where the pool computes with them (a Decimal
cannot be added to the loop's clock). Fake driver, virtual clock."""

from __future__ import annotations

import math
from decimal import Decimal
from fractions import Fraction
from typing import Any

import pytest

from asyncpool import PoolConfigError, PoolTimeoutError
from asyncpool.config import PoolConfig
from tests.unit.fakes import FakeServer, fake_pool, run


def _numbers(seconds: int) -> list[Any]:
    """`seconds` as the real number types asyncpg reads with ``float()``."""
    np = pytest.importorskip("numpy")
    return [np.int64(seconds), np.float32(seconds), np.float64(seconds), Decimal(seconds),
            Fraction(seconds, 1)]


#: Refused per call as in the options: no number, a bool, NaN, a negative.
_REFUSED: list[Any] = ["1", b"1", True, math.nan, Decimal("NaN"), Decimal("sNaN"), Decimal("-1"),
                       Fraction(-1, 2), -1]


def test_a_call_s_timeout_takes_any_real_number_and_waits_that_long(server: FakeServer) -> None:
    """acquire(timeout=Decimal("1")) and transaction(...) were PoolConfigErrors (only int and
    float passed), though a statement's timeout= takes them, as asyncpg does; the pool now waits
    with them, which needs a float (``loop.time() + Decimal(1)`` is a TypeError)."""
    async def main() -> None:
        async with fake_pool(server, min_size=1, max_size=1) as pool:
            loop = pool._slots.loop
            assert loop is not None
            for t in _numbers(1):
                async with pool.transaction(timeout=t) as conn:
                    assert await conn.fetchval("SELECT 1") == 1
                held = await pool.acquire(timeout=t)  # the only connection, held here
                for call in (pool.acquire, pool.transaction):
                    started = loop.time()
                    with pytest.raises(PoolTimeoutError):
                        async with call(timeout=t):
                            pass
                    assert loop.time() - started == pytest.approx(1, abs=0.05)
                await pool.release(held, timeout=t)
                held = await pool.acquire()
                await held.close(timeout=t)
            assert pool.stats().in_use == 0
            await pool.close(timeout=_numbers(1)[3])

    run(main())


@pytest.mark.parametrize("bad", _REFUSED, ids=repr)
def test_a_call_s_timeout_that_is_no_time_is_still_refused(server: FakeServer, bad: Any) -> None:
    async def main() -> None:
        async with fake_pool(server, min_size=1, max_size=1) as pool:
            with pytest.raises(PoolConfigError, match=r"acquire\(timeout=\.\.\.\)=.*must be a "
                                                      r"number of seconds >= 0"):
                pool.acquire(timeout=bad)
            with pytest.raises(PoolConfigError, match=r"transaction\(timeout=\.\.\.\)="):
                pool.transaction(timeout=bad)
            held = await pool.acquire()
            with pytest.raises(PoolConfigError, match=r"release\(timeout=\.\.\.\)=.*given back"):
                await pool.release(held, timeout=bad)
            assert pool.stats().in_use == 0
            with pytest.raises(PoolConfigError, match=r"close\(timeout=\.\.\.\)="):
                await pool.close(timeout=bad)
            assert pool.closed

    run(main())


def test_the_time_options_take_any_real_number_as_a_float() -> None:
    """The same rule for the options (`PoolConfig`'s docstring): Decimal("2.5") was refused."""
    np = pytest.importorskip("numpy")
    # (Typed as float, as asyncpg types them: a type checker wants float(x) written.)
    given: dict[str, Any] = {
        "acquire_timeout": Decimal("2.5"), "connect_timeout": np.int64(3),
        "max_lifetime": Fraction(600, 1), "lifetime_jitter": Fraction(1, 10),
        "max_idle": np.float32(60), "validate_after": Decimal(0),
        "statement_cache_ttl": np.float64(9), "leak_timeout": np.int64(30),
        "command_timeout": Decimal("0.5")}
    config = PoolConfig(**given)
    got = {name: getattr(config, name) for name in (
        "acquire_timeout", "connect_timeout", "max_lifetime", "lifetime_jitter", "max_idle",
        "validate_after", "statement_cache_ttl", "leak_timeout", "command_timeout")}
    assert got == {"acquire_timeout": 2.5, "connect_timeout": 3.0, "max_lifetime": 600.0,
                   "lifetime_jitter": 0.1, "max_idle": 60.0, "validate_after": 0.0,
                   "statement_cache_ttl": 9.0, "leak_timeout": 30.0, "command_timeout": 0.5}
    assert {type(v) for v in got.values()} == {float}
    infinite: Any = Decimal("Infinity")
    assert PoolConfig(max_idle=infinite).max_idle is None  # inf is no limit
    assert PoolConfig(acquire_timeout=5).acquire_timeout == 5  # an int stays as given
    bads: list[Any] = ["5", True, Decimal("NaN"), Decimal("-1"), Fraction(-1, 2)]
    for bad in bads:
        with pytest.raises(PoolConfigError, match=r"acquire_timeout=.*must be a number of "
                                                  r"seconds > 0"):
            PoolConfig(acquire_timeout=bad)


def test_a_decimal_acquire_timeout_option_times_out(server: FakeServer) -> None:
    async def main() -> None:
        async with fake_pool(server, min_size=1, max_size=1,
                             acquire_timeout=Decimal("0.5")) as pool, pool.acquire():
            loop = pool._slots.loop
            assert loop is not None
            started = loop.time()
            with pytest.raises(PoolTimeoutError):
                await pool.acquire()
            assert loop.time() - started == pytest.approx(0.5, abs=0.05)

    run(main())
