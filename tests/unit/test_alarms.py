"""The pool's timers off the event loop's heap (`asyncpool.pool.alarms`): real loops, real time
(deadlines of tens of milliseconds)."""

from __future__ import annotations

import asyncio
import functools
import math
import os
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from asyncpool.pool import alarms
from asyncpool.pool.alarms import LoopAlarm, ThreadAlarm
from asyncpool.pool.leaks import LeakTracker, grain
from tests.unit.fakes import FakeServer, VirtualClockLoop, fake_pool
from tests.waiting import until


def pending_timers(loop: asyncio.AbstractEventLoop) -> list[Any]:
    """The timers waiting in a stock asyncio loop's own heap (cancelled ones left out)."""
    return [h for h in loop._scheduled if not h.cancelled()]  # type: ignore[attr-defined]


def only_on_asyncios_loop() -> None:
    """Skip under ``ASYNCPOOL_TEST_LOOP=uvloop``: the alarm thread serves asyncio's own loops
    only; uvloop keeps the pool's timers on its own C heap (`test_uvloop_keeps_its_timers`)."""
    if not alarms.own_clock(asyncio.get_running_loop()):
        pytest.skip("the alarm thread exists on asyncio's own loops only: uvloop keeps its timers")


async def test_an_alarm_fires_on_its_loop_after_its_deadline_and_not_from_the_loops_heap() -> None:
    only_on_asyncios_loop()
    loop = asyncio.get_running_loop()
    fired: list[tuple[float, int]] = []
    done = asyncio.Event()

    def callback() -> None:
        fired.append((time.monotonic(), threading.get_ident()))
        done.set()

    alarm = alarms.alarm(loop, callback)
    assert isinstance(alarm, ThreadAlarm)
    deadline = time.monotonic() + 0.05
    alarm.set(deadline)
    assert pending_timers(loop) == []
    await asyncio.wait_for(done.wait(), 5)
    assert len(fired) == 1
    assert fired[0][0] >= deadline
    assert fired[0][1] == threading.get_ident()


async def test_setting_again_replaces_the_deadline() -> None:
    loop = asyncio.get_running_loop()
    fired: list[float] = []
    alarm = alarms.alarm(loop, lambda: fired.append(time.monotonic()))
    alarm.set(time.monotonic() + 0.02)
    later = time.monotonic() + 0.15
    alarm.set(later)
    # Past both deadlines: one firing, at the second (a loaded machine may wake this task
    # late, so nothing is read between them).
    await asyncio.sleep(0.3)
    assert len(fired) == 1
    assert fired[0] >= later


async def test_a_cancelled_alarm_does_not_fire_until_set_again() -> None:
    loop = asyncio.get_running_loop()
    fired: list[float] = []
    alarm = alarms.alarm(loop, lambda: fired.append(time.monotonic()))
    alarm.set(time.monotonic() + 0.02)
    alarm.cancel()
    await asyncio.sleep(0.1)
    assert fired == []
    alarm.set(time.monotonic() + 0.02)
    await asyncio.sleep(0.2)
    assert len(fired) == 1


async def test_earlier_deadlines_added_later_wake_the_thread_in_time() -> None:
    loop = asyncio.get_running_loop()
    order: list[str] = []
    late = alarms.alarm(loop, lambda: order.append("late"))
    early = alarms.alarm(loop, lambda: order.append("early"))
    late.set(time.monotonic() + 0.3)
    await asyncio.sleep(0.01)  # the thread is asleep until the late deadline now
    started = time.monotonic()
    early.set(started + 0.03)
    while not order:
        await asyncio.sleep(0.005)
    assert order == ["early"]
    assert time.monotonic() - started < 0.25
    await asyncio.sleep(0.4)
    assert order == ["early", "late"]


def test_each_alarm_fires_on_its_own_loop_and_a_closed_loop_stops_nothing() -> None:
    fired: dict[str, int] = {}

    def run_loop(name: str, delay: float, close_first: bool) -> None:
        loop = asyncio.new_event_loop()
        try:
            alarm = alarms.alarm(loop, lambda: fired.__setitem__(name, threading.get_ident()))
            alarm.set(time.monotonic() + delay)
            if close_first:
                return  # closed (below) before its deadline: the thread's hand-over finds it closed
            loop.run_until_complete(asyncio.sleep(delay + 0.3))
            fired.setdefault(name + " thread", threading.get_ident())
        finally:
            loop.close()

    closed = threading.Thread(target=run_loop, args=("closed", 0.02, True))
    closed.start()
    closed.join()
    threads = [threading.Thread(target=run_loop, args=(name, 0.05 + i * 0.02, False))
               for i, name in enumerate(("a", "b"))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert "closed" not in fired
    assert fired["a"] == fired["a thread"]
    assert fired["b"] == fired["b thread"]
    assert fired["a"] != fired["b"]


async def test_sleep_waits_off_the_heap_and_a_cancelled_sleep_leaves_nothing() -> None:
    loop = asyncio.get_running_loop()
    errors: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _, context: errors.append(context))
    started = time.monotonic()
    sleeper = asyncio.create_task(alarms.sleep(0.05))
    await asyncio.sleep(0)
    if alarms.own_clock(loop):  # uvloop's heap (C) holds the timer instead
        assert pending_timers(loop) == []
    await sleeper
    assert time.monotonic() - started >= 0.05

    cancelled = asyncio.create_task(alarms.sleep(0.05))
    await asyncio.sleep(0)
    cancelled.cancel()
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    await asyncio.sleep(0.15)  # past its deadline: nothing is handed over
    assert errors == []


def test_a_loop_with_its_own_clock_keeps_its_timers() -> None:
    loop = VirtualClockLoop()
    try:
        fired: list[float] = []
        alarm = alarms.alarm(loop, lambda: fired.append(loop.time()))
        assert isinstance(alarm, LoopAlarm)
        assert alarms.loop_clock(loop) == loop.time
        alarm.set(10.0)
        loop.run_until_complete(asyncio.sleep(5))
        alarm.set(20.0)
        loop.run_until_complete(alarms.sleep(30))  # virtual: the loop's own asyncio.sleep
        assert fired == [20.0]
        assert loop.time() >= 35.0
    finally:
        loop.close()


def test_uvloop_keeps_its_timers() -> None:
    uvloop = pytest.importorskip("uvloop")
    loop = uvloop.new_event_loop()
    try:
        fired: list[float] = []
        alarm = alarms.alarm(loop, lambda: fired.append(loop.time()))
        assert isinstance(alarm, LoopAlarm)
        alarm.set(loop.time() + 0.02)
        loop.run_until_complete(asyncio.sleep(0.1))
        assert len(fired) == 1
    finally:
        loop.close()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_a_forked_child_has_an_alarm_thread_of_its_own() -> None:
    # The parent's thread exists (and may hold its lock): the child starts its own.
    parent_loop = asyncio.new_event_loop()
    try:
        fired: list[bool] = []
        alarms.alarm(parent_loop, lambda: fired.append(True)).set(time.monotonic() + 0.02)
        parent_loop.run_until_complete(asyncio.sleep(0.1))
        assert fired == [True]
    finally:
        parent_loop.close()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through its exit code
        code = 1
        try:
            loop = asyncio.new_event_loop()
            child_fired: list[bool] = []
            alarms.alarm(loop, lambda: child_fired.append(True)).set(time.monotonic() + 0.02)
            loop.run_until_complete(asyncio.sleep(0.5))
            code = 0 if child_fired == [True] else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


async def test_a_deadline_handed_over_just_as_it_was_cancelled_or_replaced_is_dropped() -> None:
    # The thread hands a due entry to the loop while the loop may be cancelling or setting the
    # alarm again: `due` runs the callback only for the entry still in force.
    loop = asyncio.get_running_loop()
    fired: list[int] = []
    alarm = ThreadAlarm(loop, lambda: fired.append(1))
    alarm.set(time.monotonic() + 60)
    handed = alarm.entry
    assert handed is not None
    alarm.cancel()
    alarm.due(handed)
    alarm.set(time.monotonic() + 60)
    alarm.due(handed)
    assert fired == []
    current = alarm.entry
    assert current is not None
    alarm.due(current)
    alarm.due(current)
    assert fired == [1]
    alarm.cancel()


async def test_a_deadline_ends_its_block_with_timeout_error_without_a_timer_on_the_loop() -> None:
    loop = asyncio.get_running_loop()
    started = time.monotonic()
    deadline = alarms.Deadline(0.05)
    with pytest.raises(TimeoutError):
        async with deadline:
            if alarms.own_clock(loop):  # uvloop's heap (C) holds the timer instead
                assert pending_timers(loop) == []
            await asyncio.sleep(0)
            await alarms.sleep(5)  # waits off the heap too: only the deadline can end it
    assert deadline.expired()
    assert time.monotonic() - started >= 0.05

    kept = alarms.Deadline(0.05)
    async with kept:
        await asyncio.sleep(0)
    await asyncio.sleep(0.1)  # past the deadline: the task is not cancelled afterwards
    assert not kept.expired()
    assert asyncio.current_task().cancelling() == 0  # type: ignore[union-attr]

    async with alarms.Deadline(None) as unlimited:
        await asyncio.sleep(0.01)
    assert not unlimited.expired()


def test_a_deadline_on_a_loop_with_its_own_clock_is_asyncio_timeout() -> None:
    loop = VirtualClockLoop()

    async def overrun() -> bool:
        deadline = alarms.Deadline(30)
        with pytest.raises(TimeoutError):
            async with deadline:
                await asyncio.sleep(3600)
        return deadline.expired()

    try:
        assert loop.run_until_complete(overrun())
        assert 30 <= loop.time() < 31
    finally:
        loop.close()


async def test_ticks_wake_on_multiples_of_their_period_together_in_one_hand_over(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """`tick(period)` ends at the next multiple of `period` on the monotonic clock, so ticks
    begun at different moments of a period end together; all of a loop's ticks that fall due at
    once reach it in one ``call_soon_threadsafe`` (hundreds of pools' housekeeping: one wake-up
    of thread and loop, not hundreds)."""
    only_on_asyncios_loop()
    loop = asyncio.get_running_loop()
    period = 0.3
    await asyncio.sleep(period - time.monotonic() % period + 0.005)  # just after a multiple
    begun = time.monotonic()
    due = (int(begun / period) + 1) * period
    handed: list[Any] = []
    real = loop.call_soon_threadsafe

    def counting(callback: Any, *args: Any, **kwargs: Any) -> Any:
        handed.append(args)
        return real(callback, *args, **kwargs)

    monkeypatch.setattr(loop, "call_soon_threadsafe", counting)
    woke: list[float] = []

    async def pool_housekeeping(k: int) -> None:
        await asyncio.sleep(k % 5 * 0.02)  # pools begin their rounds at different moments
        await alarms.tick(period)
        woke.append(time.monotonic())

    await asyncio.gather(*(pool_housekeeping(k) for k in range(50)))
    assert len(woke) == 50
    assert all(due <= t < due + 0.1 for t in woke), (due, sorted(woke)[::10])
    assert pending_timers(loop) == []
    assert len(handed) == 1
    [(entries,)] = handed
    assert len(entries) == 50


def test_a_tick_on_a_loop_with_its_own_clock_is_asyncio_sleep() -> None:
    loop = VirtualClockLoop()
    try:
        loop.run_until_complete(asyncio.sleep(3.3))
        loop.run_until_complete(alarms.tick(5))
        assert 8.3 <= loop.time() < 8.4  # the loop's own sleep, not aligned to a multiple
    finally:
        loop.close()


async def test_alarms_due_together_run_a_few_dozen_per_turn_of_the_loop_in_deadline_order() -> None:
    """Hundreds of alarms handed over together (a process's pools keeping house at the same
    multiple of their period) run over successive turns of the loop, `PER_TURN` at most in each:
    what else the loop has to do (a request's replies) waits for one share, not for all."""
    loop = asyncio.get_running_loop()
    count = 5 * alarms.PER_TURN + 3
    turn = 0
    fired: list[tuple[int, int]] = []  # (alarm, turn of the loop it ran in)

    def spin() -> None:  # counts the loop's turns while the alarms run
        nonlocal turn
        turn += 1
        if len(fired) < count:
            loop.call_soon(spin)

    def firing(k: int) -> Callable[[], None]:
        return lambda: fired.append((k, turn))

    # Far enough that every alarm is set before it passes, even on a loaded machine (at 0.05 s
    # the last ones were once set after it, and came in a hand-over of their own).
    deadline = time.monotonic() + 0.5
    for k in range(count):
        ThreadAlarm(loop, firing(k)).set(deadline)
    assert time.monotonic() < deadline, "setting the alarms outlasted the premise"
    loop.call_soon(spin)
    await until(lambda: len(fired) == count)
    assert [k for k, _ in fired] == list(range(count))  # all of them, in the order set
    per_turn: dict[int, int] = {}
    for _, t in fired:
        per_turn[t] = per_turn.get(t, 0) + 1
    assert max(per_turn.values()) <= alarms.PER_TURN
    assert len(per_turn) >= count // alarms.PER_TURN


async def test_a_failing_alarm_callback_is_reported_and_stops_none_of_the_others() -> None:
    loop = asyncio.get_running_loop()
    errors: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _, context: errors.append(context))
    fired: list[int] = []

    def callback(k: int) -> None:
        fired.append(k)
        if k == 1:
            raise RuntimeError("callback 1 broke")

    deadline = time.monotonic() + 0.05
    for k in range(3):
        ThreadAlarm(loop, functools.partial(callback, k)).set(deadline)
    await until(lambda: len(fired) == 3 and errors)
    assert fired == [0, 1, 2]
    assert [str(e.get("exception")) for e in errors] == ["callback 1 broke"]


async def test_leak_deadlines_within_one_grain_are_checked_in_one_hand_over(
        server: FakeServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """A leak deadline is rounded up to a multiple of `leaks.grain(leak_timeout)` (a tenth of
    this 1 s timeout): pools whose connections were taken within that grain have them checked in
    one hand-over of the alarm thread, each no earlier than `leak_timeout` and at most a grain
    (plus the hand-over) after."""
    only_on_asyncios_loop()
    loop = asyncio.get_running_loop()
    # 8 pools taken 2 ms apart fit in the 0.1 s grain with room for a loaded machine (12 taken
    # 4 ms apart once took 0.088 s under the full suite).
    timeout, count = 1.0, 8
    step = grain(timeout)
    handed: list[list[Any]] = []
    real = loop.call_soon_threadsafe

    def counting(callback: Any, *args: Any, **kwargs: Any) -> Any:
        entries = args[0] if args else []
        leak_alarms = [e for e in entries if isinstance(getattr(e[2]._callback, "__self__", None),
                                                        LeakTracker)]
        if leak_alarms:
            handed.append(leak_alarms)
        return real(callback, *args, **kwargs)

    pools = [fake_pool(server, name=f"p{k}", min_size=1, max_size=1, leak_timeout=timeout)
             for k in range(count)]
    for pool in pools:
        await pool.open()
    monkeypatch.setattr(loop, "call_soon_threadsafe", counting)
    try:
        await asyncio.sleep(step - time.monotonic() % step + 0.005)  # just after a multiple
        taken: list[float] = []
        for pool in pools:
            await pool.acquire()  # never released
            taken.append(time.monotonic())
            await asyncio.sleep(0.002)  # taken at different moments of the grain
        assert taken[-1] - taken[0] < step - 0.02
        await asyncio.sleep(taken[0] + timeout - 0.02 - time.monotonic())
        assert [pool.stats().leaked_total for pool in pools] == [0] * count  # none early
        await until(lambda: all(pool.stats().leaked_total == 1 for pool in pools), 3.0)
        noticed = time.monotonic()
        assert [pool.stats().leaked_total for pool in pools] == [1] * count
        assert noticed - taken[-1] < timeout + step + 0.15
        assert [len(entries) for entries in handed] == [count]
    finally:
        for pool in pools:
            await pool.close()


async def test_a_deadline_at_infinity_never_fires_and_stops_no_other_alarm() -> None:
    """``leak_timeout=float("inf")`` sets an alarm at infinity: the thread must keep serving the
    others (an uncapped wait overflowed the lock's timeout and ended the thread)."""
    loop = asyncio.get_running_loop()
    fired: list[str] = []
    ThreadAlarm(loop, lambda: fired.append("never")).set(math.inf)
    await asyncio.sleep(0.05)  # the thread is asleep on the infinite deadline
    ThreadAlarm(loop, lambda: fired.append("soon")).set(time.monotonic() + 0.05)
    await until(lambda: fired, 3.0)
    assert fired == ["soon"]
    assert any(t.name == "asyncpool-alarms" for t in threading.enumerate())


async def test_a_pool_whose_leak_timeout_is_infinite_works_and_reports_no_leak(
        server: FakeServer) -> None:
    async with fake_pool(server, max_size=1, leak_timeout=math.inf) as pool:
        conn = await pool.acquire()
        assert await conn.fetchval("SELECT 1") == 1
        await alarms.sleep(0.05)  # the process's alarms still work
        await pool.release(conn)
        assert await pool.fetchval("SELECT 1") == 1
        assert pool.stats().leaked_total == 0


async def test_a_loop_that_fails_to_take_its_alarms_loses_them_and_stops_no_other(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """The thread serves every loop of the process: a hand-over that fails (a loop whose
    ``call_soon_threadsafe`` raises) is logged and the thread goes on."""
    loop = asyncio.get_running_loop()
    real = loop.call_soon_threadsafe
    refused: list[int] = []

    def refusing_once(callback: Any, *args: Any, **kwargs: Any) -> Any:
        if not refused:
            refused.append(1)
            raise ValueError("this loop refuses its first hand-over")
        return real(callback, *args, **kwargs)

    monkeypatch.setattr(loop, "call_soon_threadsafe", refusing_once)
    fired: list[str] = []
    ThreadAlarm(loop, lambda: fired.append("lost")).set(time.monotonic() + 0.02)
    await until(lambda: refused, 3.0)
    ThreadAlarm(loop, lambda: fired.append("later")).set(time.monotonic() + 0.02)
    await until(lambda: fired, 3.0)
    assert fired == ["later"]
    assert any("could not hand 1 alarm(s)" in r.getMessage() and r.exc_info for r in caplog.records)


async def test_a_nan_deadline_is_refused_where_it_is_set() -> None:
    """NaN compares false with everything: in the thread's heap it would never fall due and
    keep the thread spinning. It is refused at `set`, where the caller sees it."""
    loop = asyncio.get_running_loop()
    with pytest.raises(ValueError, match="NaN"):
        ThreadAlarm(loop, lambda: None).set(math.nan)
    fired = asyncio.Event()
    ThreadAlarm(loop, fired.set).set(time.monotonic() + 0.02)
    await asyncio.wait_for(fired.wait(), 5)


async def test_a_stopped_alarm_thread_is_restarted_by_the_next_alarm_and_loses_no_deadline(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """Anything unforeseen that ends the thread is logged, and the next alarm set starts
    another, which delivers the deadlines that were waiting (a pool sets one every round)."""
    loop = asyncio.get_running_loop()
    real_monotonic = time.monotonic
    stopped: list[str] = []
    # A waiter of the test's own: the process's one also serves whatever else in this process
    # sets alarms, which would restart its thread (or be the thread that fails) at any moment.
    waiter = alarms._Waiter()

    class FailingOnce:
        @staticmethod
        def monotonic() -> float:
            if threading.current_thread() is waiter._thread and not stopped:
                stopped.append(threading.current_thread().name)
                raise MemoryError("unforeseen")
            return real_monotonic()

    fired: list[str] = []
    monkeypatch.setattr(alarms, "time", FailingOnce)
    # A deadline earlier than any other wakes the thread, which then fails reading the clock.
    waiter.add(ThreadAlarm(loop, lambda: fired.append("before")), real_monotonic() - 1000)
    await until(lambda: stopped, 3.0)
    # (The thread lets its place go, then logs: a restart need not wait for the log.)
    await until(lambda: any("alarm thread stopped" in r.getMessage() and r.exc_info
                            for r in caplog.records), 3.0)
    assert waiter._thread is None
    assert not fired
    waiter.add(ThreadAlarm(loop, lambda: fired.append("after")), real_monotonic() + 0.02)
    await until(lambda: len(fired) == 2, 3.0)
    assert fired == ["before", "after"]


async def test_cancelled_alarms_behind_a_later_deadline_do_not_pile_up() -> None:
    """A stale entry (cancelled, or set again) left the heap only when it reached the top:
    behind a live deadline far off (another pool's leak alarm) every closed pool's alarm kept
    its callback and loop alive. The heap is compacted once it has doubled."""
    loop = asyncio.get_running_loop()
    keeper = ThreadAlarm(loop, lambda: None)
    keeper.set(time.monotonic() + 3600)
    for _ in range(2000):
        alarm = ThreadAlarm(loop, lambda: None)
        alarm.set(time.monotonic() + 3000)
        alarm.cancel()
    live = [e for e in alarms._WAITER._heap if e[2].entry is e]
    assert keeper.entry in live
    assert len(alarms._WAITER._heap) <= 2 * max(alarms._COMPACT_FROM, len(live)) + 1
    keeper.cancel()
