"""Closing several pools at once within one deadline, for a process about to end (SIGTERM).

Pools are closed together, not one after the other: a shutdown with N pools must fit the time the
process has left once, not N times (Lambda ends the environment 300-500 ms after SIGTERM). The
statements their held connections run are cancelled from a thread of ours, with blocking cancel
requests (`asyncpool.connect.blocking_cancel`), within what is left of the deadline: a request
left to a task of the loop is lost when the process ends first, and the statement runs on in
PostgreSQL with its locks.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, TypeVar

from asyncpool.pool import lifecycle, misuse
from asyncpool.pool.state import CLOSED_STATE

if TYPE_CHECKING:
    from asyncpool.pool.pool import Pool

_T = TypeVar("_T")

#: The part of the time left that held connections get to come back before what they run is
#: cancelled. Held at shutdown, a connection is a timed-out invocation's or a straggler's: there
#: is little point in waiting for it, and the rest of the time goes to the cancel requests.
HOLDERS_SHARE = 0.25


def unfinished(pool: Pool) -> bool:
    """Whether `pool` has connections to close: not closed, or closing (by someone else, its
    held connections still waited for)."""
    return pool._slots.state is not CLOSED_STATE


def terminate_together(pools: Sequence[Pool], deadline: float) -> None:
    """Terminate `pools` now, first cancelling what their held connections run, all requests
    sent at once and waited for until `deadline` (``time.monotonic()``). On the pools' loop's
    thread (a signal handler on top of it), or any thread while that loop is not running."""
    for pool in pools:
        misuse.refuse_running_elsewhere(pool._slots, "terminate()")
        pool._slots.undoing_open = False  # (as Pool.terminate: closed, not new)
    lifecycle.terminate_together([pool._slots for pool in pools], time_left(deadline))


async def close_together(pools: Sequence[Pool], deadline: float, cancels: _Turn | None = None) -> None:
    """Close `pools` on the running loop (theirs) by `deadline` (``time.monotonic()``).

    Held connections get `HOLDERS_SHARE` of the time left to come back; then what they run is
    cancelled from a thread with the rest of the time, while the loop goes on (their holders see
    the error and give them back, idle connections say goodbye). What is still open at
    `deadline` is terminated. With `cancels` (`close_elsewhere`), the requests are sent here
    only if its thread has not given up on this loop and sent them itself.
    """
    loop = asyncio.get_running_loop()
    # (timeout=None: held connections are left to the cancel requests below, not to close(),
    # whose own requests would be tasks of a loop that may not run again.)
    closes = {loop.create_task(pool.close(timeout=None)) for pool in pools}
    _, pending = await asyncio.wait(closes, timeout=time_left(deadline) * HOLDERS_SHARE)
    if pending:
        waiting: set[asyncio.Future[None]] = set(pending)
        if cancels is None or cancels.start():
            targets = lifecycle.running_targets([pool._slots for pool in pools])
            waiting.add(_in_thread(lifecycle.send_cancels, targets, time_left(deadline)))
        _, still = await asyncio.wait(waiting, timeout=time_left(deadline))
        pending = {close for close in pending if close in still}  # (the sender: a daemon thread)
    if not pending:
        return
    for close in pending:
        close.cancel()  # close() cancelled part-way terminates what is left
    await asyncio.wait(pending)
    for pool in pools:
        # (One that only waited for a close() of someone else's was not terminated.)
        pool.terminate()
    await asyncio.sleep(0)  # let the aborted transports close their sockets


def close_elsewhere(pools: Sequence[Pool], loop: asyncio.AbstractEventLoop, deadline: float) -> None:
    """Close `pools`, whose loop runs on another thread, by `deadline` (``time.monotonic()``):
    with `close_together` on that loop if it starts within `HOLDERS_SHARE` of the time left.

    A loop blocked in synchronous code (a CPU-bound handler, a blocking client library) runs
    nothing before the process ends: what the held connections run is then cancelled from this
    thread with the rest of the time, as `close_together` would have done at that point, and the
    pools are terminated on the loop if it ever runs again. So too when the loop is blocked
    after the close began: if it has not reached its cancel step (due once the holders' share
    is spent) within `HOLDERS_SHARE` of the time left after that, this thread sends them.
    """
    turn, cancels = _Turn(), _Turn()
    future = asyncio.run_coroutine_threadsafe(_close_in_turn(pools, deadline, turn, cancels), loop)
    if not turn.started_within(time_left(deadline) * HOLDERS_SHARE):
        _cancel_from_here(pools, deadline)
        return
    holders = time_left(deadline) * HOLDERS_SHARE  # (what `close_together` gives them)
    if not cancels.started_within(holders + (time_left(deadline) - holders) * HOLDERS_SHARE):
        _cancel_from_here(pools, deadline)
    try:
        future.result(time_left(deadline) + 0.1)
    except Exception:
        future.cancel()  # (close() cancelled part-way terminates what is left)
        for pool in pools:
            loop.call_soon_threadsafe(pool.terminate)


def _cancel_from_here(pools: Sequence[Pool], deadline: float) -> None:
    """Cancel what the held connections of `pools` run, from this thread, by `deadline`.
    (Read off the loop's thread: blocked, it changes no pool meanwhile.)"""
    targets = lifecycle.running_targets([pool._slots for pool in pools])
    lifecycle.send_cancels(targets, time_left(deadline))


class _Turn:
    """Whether a step of `close_elsewhere`'s close (its start; its cancel requests) was taken on
    the pools' loop in time, or was given up (done from the other thread): one or the other,
    never both."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._started = threading.Event()
        self._given_up = False

    def start(self) -> bool:
        """On the loop: True if the step may go on (the other thread has not given up on it)."""
        with self._lock:
            if not self._given_up:
                self._started.set()
            return not self._given_up

    def started_within(self, timeout: float) -> bool:
        """On the other thread: whether the step started within `timeout`; if not, it never will."""
        self._started.wait(timeout)
        with self._lock:
            self._given_up = not self._started.is_set()
            return not self._given_up


async def _close_in_turn(pools: Sequence[Pool], deadline: float, turn: _Turn, cancels: _Turn) -> None:
    if turn.start():
        await close_together(pools, deadline, cancels)
        cancels.start()  # (closed with no request to send: the other thread need not wait)
        return
    # Late: the loop was blocked, the cancel requests sent from the other thread.
    for pool in pools:
        pool.terminate()


def _in_thread(send: Callable[[_T, float], None], arg: _T, timeout: float) -> asyncio.Future[None]:
    """Run ``send(arg, timeout)`` on a daemon thread (the process may end under it); a future of
    the running loop's, done when it returns."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()

    def finished() -> None:
        if not done.done():
            done.set_result(None)

    def run() -> None:
        try:
            send(arg, timeout)
        finally:
            with contextlib.suppress(RuntimeError):  # (its loop closed meanwhile)
                loop.call_soon_threadsafe(finished)

    threading.Thread(target=run, name="asyncpool-shutdown-cancel", daemon=True).start()
    return done


def time_left(deadline: float) -> float:
    """Seconds until `deadline` (``time.monotonic()``), 0 once past it."""
    return max(0.0, deadline - time.monotonic())
