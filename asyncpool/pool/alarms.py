"""The pool's timers (leak deadline, housekeeping period, a Lambda invocation's time budget),
kept out of the event loop's own heap.

While a timer waits in asyncio's heap (``call_at``, ``asyncio.sleep``), every turn of a stock
asyncio loop works out a select timeout in Python: counted with valgrind, one pending timer adds
about 11,000 instructions (5.6%) to each query of a raw asyncpg connection, and the pool's two
timers are pending nearly all the time, as is an invocation's deadline while it runs
(benchmarks/README.md). On asyncio's own loops they wait
instead in one daemon thread per process, which hands each due deadline to its loop with
``call_soon_threadsafe``: nothing is added to the loop's turns. A loop with a clock of its own
(uvloop, whose timers are C; a test loop with a virtual clock) keeps its timers (``call_at``).

Deadlines are read on `loop_clock(loop)`, the clock the pool uses on that loop.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import math
import os
import threading
import time
from collections.abc import Callable
from types import TracebackType
from typing import Protocol

logger: logging.Logger = logging.getLogger("asyncpool.pool")


def loop_clock(loop: asyncio.AbstractEventLoop) -> Callable[[], float]:
    """What `loop.time()` reads, with one Python call less where that is the same clock."""
    if own_clock(loop):
        return time.monotonic  # BaseEventLoop.time() is `return time.monotonic()`
    return loop.time


def own_clock(loop: asyncio.AbstractEventLoop) -> bool:
    """True for asyncio's own loops (their clock is `time.monotonic`, their timers Python)."""
    return type(loop).time is asyncio.BaseEventLoop.time


class Alarm(Protocol):
    """Calls its callback on its loop once the latest deadline set has passed."""

    def set(self, when: float) -> None:
        """Fire at `when` (on `loop_clock`), instead of any deadline set before."""

    def cancel(self) -> None:
        """Do not fire (until set again)."""


def alarm(loop: asyncio.AbstractEventLoop, callback: Callable[[], None]) -> Alarm:
    """An alarm that calls `callback()` on `loop` (the running one), off the loop's heap where
    that saves the loop work."""
    if own_clock(loop):
        return ThreadAlarm(loop, callback)
    return LoopAlarm(loop, callback)


async def sleep(seconds: float) -> None:
    """``asyncio.sleep(seconds)`` that leaves the loop's heap alone on asyncio's own loops."""
    loop = asyncio.get_running_loop()
    if not own_clock(loop):
        await asyncio.sleep(seconds)
        return
    await _until(loop, time.monotonic() + seconds)


async def tick(period: float) -> None:
    """Sleep until the next multiple of `period` on the monotonic clock (at most `period`): the
    pools of a process that share a period wake together, in one hand-over per loop, rather than
    each at its own moment (with hundreds of pools, a wake-up of thread and loop per pool and
    round cost about 2% of a core). On other loops, ``asyncio.sleep(period)``."""
    loop = asyncio.get_running_loop()
    if not own_clock(loop):
        await asyncio.sleep(period)
        return
    await _until(loop, (math.floor(time.monotonic() / period) + 1) * period)


async def _until(loop: asyncio.AbstractEventLoop, when: float) -> None:
    woken = loop.create_future()

    def wake() -> None:
        if not woken.done():
            woken.set_result(None)

    waiting = ThreadAlarm(loop, wake)
    waiting.set(when)
    try:
        await woken
    finally:
        waiting.cancel()


class Deadline:
    """``asyncio.timeout(seconds)`` (None: no limit) whose timer waits off the loop's heap on
    asyncio's own loops: when it expires, the `asyncio.Timeout` inside is told to expire now,
    so the block ends with `TimeoutError` exactly as it would under ``asyncio.timeout``."""

    __slots__ = ("_alarm", "_seconds", "_timeout")

    def __init__(self, seconds: float | None) -> None:
        self._seconds = seconds
        self._timeout = asyncio.timeout(None)
        self._alarm: ThreadAlarm | None = None

    async def __aenter__(self) -> Deadline:
        await self._timeout.__aenter__()
        if self._seconds is not None:
            loop = asyncio.get_running_loop()
            if own_clock(loop):
                self._alarm = ThreadAlarm(loop, self._expire)
                self._alarm.set(time.monotonic() + self._seconds)
            else:
                self._timeout.reschedule(loop.time() + self._seconds)
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        if self._alarm is not None:
            self._alarm.cancel()  # before the block is left: a late hand-over finds it cancelled
        await self._timeout.__aexit__(exc_type, exc, tb)  # raises TimeoutError if it expired

    def expired(self) -> bool:
        """Whether the deadline passed and cancelled the block (as `asyncio.Timeout.expired`)."""
        return self._timeout.expired()

    def _expire(self) -> None:
        self._timeout.reschedule(asyncio.get_running_loop().time())  # due now: the next turn


class LoopAlarm:
    """An `Alarm` on the loop's own timers."""

    __slots__ = ("_callback", "_handle", "_loop")

    def __init__(self, loop: asyncio.AbstractEventLoop, callback: Callable[[], None]) -> None:
        self._loop = loop
        self._callback = callback
        self._handle: asyncio.TimerHandle | None = None

    def set(self, when: float) -> None:
        if self._handle is not None:
            self._handle.cancel()
        self._handle = self._loop.call_at(when, self._fire)

    def cancel(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _fire(self) -> None:
        self._handle = None
        self._callback()


# (deadline, order of setting, alarm): the order breaks ties, so alarms are never compared.
_Entry = tuple[float, int, "ThreadAlarm"]


class ThreadAlarm:
    """An `Alarm` waited for by the process's alarm thread (`_Waiter`)."""

    __slots__ = ("_callback", "entry", "loop")

    def __init__(self, loop: asyncio.AbstractEventLoop, callback: Callable[[], None]) -> None:
        self.loop: asyncio.AbstractEventLoop = loop
        self._callback = callback
        #: The deadline in force (None: none); the thread skips any other entry of this alarm.
        self.entry: _Entry | None = None

    def set(self, when: float) -> None:
        _WAITER.add(self, when)

    def cancel(self) -> None:
        self.entry = None  # the thread drops the stale entry when it reaches it

    def due(self, entry: _Entry) -> None:
        """Handed over by the thread; the callback runs unless set again or cancelled since."""
        if self.entry is entry:
            self.entry = None
            self._callback()


#: Alarms a loop runs per turn when many fall due together (hundreds of pools' housekeeping
#: rounds, about 20 µs each): the rest wait for the next turns, so the loop's other work (a
#: request's replies) waits for a few dozen rounds at most, not for all of them.
PER_TURN = 32


def _deliver(entries: list[_Entry], start: int = 0) -> None:
    """On a loop: the alarms of `entries`, handed over together, are due. Runs `PER_TURN` of
    them and leaves the rest to the next turn; an alarm cancelled or set again meanwhile is
    skipped (`ThreadAlarm.due`). A callback that raises is reported to the loop's exception
    handler, as a callback of its own would be, and stops none of the others."""
    loop = asyncio.get_running_loop()
    end = start + PER_TURN
    if end < len(entries):
        loop.call_soon(_deliver, entries, end)
    for i in range(start, min(end, len(entries))):
        entry = entries[i]
        try:
            entry[2].due(entry)
        except Exception as exc:  # as a callback of its own would: reported, the others run
            loop.call_exception_handler({"message": "asyncpool: an alarm's callback failed",
                                         "exception": exc})


#: The heap's size from which stale entries are dropped when an alarm is set (`_Waiter.add`).
_COMPACT_FROM = 64

#: The longest the thread sleeps at once (it looks again after): any longer timeout may
#: overflow the platform's time_t.
_LONGEST_WAIT = 3600.0


class _Waiter:
    """The thread that waits for every `ThreadAlarm` of the process: a heap of deadlines under
    a lock, slept on until the earliest (or until an earlier one is added)."""

    def __init__(self) -> None:
        self.forget()

    def forget(self) -> None:
        """Start afresh (after a fork, in the child: the thread is not there, and its lock may
        have been held at the fork)."""
        self._changed = threading.Condition(threading.Lock())
        self._heap: list[_Entry] = []
        self._order = itertools.count()
        self._thread: threading.Thread | None = None
        self._compact_at = _COMPACT_FROM

    def add(self, alarm: ThreadAlarm, when: float) -> None:
        if math.isnan(when):  # never due nor later than anything: it would spin the thread
            raise ValueError("an alarm's deadline must be a number, not NaN")
        with self._changed:
            entry = (when, next(self._order), alarm)
            alarm.entry = entry  # before the thread can see it: any other entry is stale now
            heap = self._heap
            if len(heap) >= self._compact_at:
                # Stale entries (cancelled, or set again) leave the heap only when they reach its
                # top: behind a live later deadline they kept their alarm, its callback and loop
                # (a closed pool's leak tracker) alive for up to a leak_timeout. Dropped here
                # once the heap has doubled: amortized, a constant cost per alarm set.
                heap[:] = [e for e in heap if e[2].entry is e]
                heapq.heapify(heap)
                self._compact_at = max(_COMPACT_FROM, 2 * len(heap))
            heapq.heappush(heap, entry)
            if self._thread is None:  # the first alarm, or the thread stopped (`_run`)
                self._thread = threading.Thread(target=self._run, name="asyncpool-alarms",
                                                daemon=True)
                self._thread.start()
            elif self._heap[0] is entry:
                self._changed.notify()

    def _run(self) -> None:
        try:
            self._serve()
        except Exception:
            # Not expected (every failure known to come from a loop is handled in `_serve`), but
            # this thread serves every alarm of the process: the next alarm set starts another,
            # which finds the deadlines still waiting (a pool sets one every housekeeping round).
            with self._changed:
                if self._thread is threading.current_thread():
                    self._thread = None
            logger.exception("asyncpool: the alarm thread stopped; the next alarm set restarts it")

    def _serve(self) -> None:
        heap = self._heap
        with self._changed:
            while True:
                while heap and heap[0][2].entry is not heap[0]:
                    heapq.heappop(heap)  # cancelled, or set again since
                if not heap:
                    self._changed.wait()
                    continue
                now = time.monotonic()
                delay = heap[0][0] - now
                if delay > 0:
                    # Capped: a far deadline (leak_timeout=inf) would overflow the lock's timeout
                    # and end the thread, and with it every alarm of the process.
                    self._changed.wait(min(delay, _LONGEST_WAIT))
                    continue
                # Everything due, one hand-over per loop: each wakes its loop (a write to its
                # self-pipe), and hundreds of pools in one process often fall due together.
                batches: dict[asyncio.AbstractEventLoop, list[_Entry]] = {}
                while heap and heap[0][0] <= now:
                    entry = heapq.heappop(heap)
                    if entry[2].entry is entry:
                        batches.setdefault(entry[2].loop, []).append(entry)
                for loop, entries in batches.items():
                    try:
                        loop.call_soon_threadsafe(_deliver, entries)
                    except RuntimeError:  # a closed loop gets nothing
                        pass
                    except Exception:
                        # This thread serves every loop of the process: one loop that fails to
                        # take its alarms loses them, the others go on.
                        logger.exception("asyncpool: could not hand %d alarm(s) to %r",
                                         len(entries), loop)


_WAITER = _Waiter()  # its thread starts with the first alarm set


os.register_at_fork(after_in_child=_WAITER.forget)
