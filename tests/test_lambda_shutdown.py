"""Shutdown of a Lambda environment: the pool says goodbye to the pooler on SIGTERM.

Lambda may destroy an environment without its sockets ever closing, leaving the pooler holding the
client slot; with an extension registered it sends SIGTERM first. The example handler registers
`close_on_shutdown`, so on SIGTERM its connection must end with a Terminate message (PgBouncer
logs "client close request"), not by the socket vanishing ("client unexpected eof").
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from asyncpool import Pool
from asyncpool.integrations.aws_lambda import close_on_shutdown
from asyncpool.testing import PgBouncerServer, PostgresServer
from asyncpool.testing.binaries import system_pgbouncer
from tests.lambda_env import POWERTOOLS_EXAMPLE, HandlerProcess, app_clients, load_event
from tests.lambda_runtime.support import departures
from tests.script_support import REPO

HELLO = load_event(POWERTOOLS_EXAMPLE / "events" / "hello.json")
CLEAN_CLOSE = "client close request"
VANISHED = "client unexpected eof"


def script_env(**values: str) -> dict[str, str]:
    """The environment for a script of these tests run as a process of its own: this checkout
    importable (the Python 3.12/3.13 venvs do not install the package) and `values`."""
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, **values}


def run_script(script: Path, source: str, dsn: str) -> subprocess.CompletedProcess[str]:
    """`source` written to `script` and run to its end (30 s at most) with ASYNCPOOL_DSN=`dsn`."""
    script.write_text(source)
    return subprocess.run([sys.executable, str(script)], env=script_env(ASYNCPOOL_DSN=dsn),
                          capture_output=True, text=True, timeout=30, check=False)


@pytest.fixture
def own_pgbouncer(postgres: PostgresServer) -> Iterator[PgBouncerServer]:
    """A PgBouncer whose log holds only this test's clients."""
    with PgBouncerServer(system_pgbouncer(), postgres) as server:
        yield server


def app_disconnects(server: PgBouncerServer) -> list[str]:
    """PgBouncer's log lines about `app` clients leaving (not the admin console's own logins)."""
    assert server.process is not None
    lines = server.process.log_path.read_text(errors="replace").splitlines()
    return [line for line in lines if " app/app@" in line and "closing because" in line]


async def start_warm(server: PgBouncerServer, stderr: Path) -> HandlerProcess:
    proc = HandlerProcess(server.dsn(), stderr)
    result = await proc.invoke(HELLO)
    assert result["error"] is None, proc.stderr_tail()
    assert len(await app_clients(server)) == 1
    return proc


async def test_sigterm_closes_the_pool_cleanly_and_ends_the_process(
    own_pgbouncer: PgBouncerServer, tmp_path: Path
) -> None:
    proc = await start_warm(own_pgbouncer, tmp_path / "handler.stderr")
    try:
        proc.signal(signal.SIGTERM)
        # The hook hands the signal on to the default action: the process still dies of SIGTERM.
        assert await proc.wait() == -signal.SIGTERM
    finally:
        proc.stop()
    assert await app_clients(own_pgbouncer) == []
    [goodbye] = app_disconnects(own_pgbouncer)
    assert CLEAN_CLOSE in goodbye


async def test_without_a_goodbye_pgbouncer_sees_the_socket_vanish(
    own_pgbouncer: PgBouncerServer, tmp_path: Path
) -> None:
    """The control: what the log says when no hook can run (SIGKILL)."""
    proc = await start_warm(own_pgbouncer, tmp_path / "handler.stderr")
    try:
        proc.signal(signal.SIGKILL)
        assert await proc.wait() == -signal.SIGKILL
    finally:
        proc.stop()
    # (PgBouncer logs the client's departure a moment after the process is gone: waited for.)
    [gone] = await departures(own_pgbouncer)
    assert VANISHED in gone


def test_undo_restores_the_previous_sigterm_handler_but_not_over_a_newer_one() -> None:
    def earlier(signum: int, frame: object) -> None: ...

    def later(signum: int, frame: object) -> None: ...

    original = signal.signal(signal.SIGTERM, earlier)
    loop = asyncio.new_event_loop()
    try:
        undo = close_on_shutdown(Pool(min_size=0), loop)
        assert signal.getsignal(signal.SIGTERM) not in (earlier, original)
        undo()
        assert signal.getsignal(signal.SIGTERM) is earlier

        undo = close_on_shutdown(Pool(min_size=0), loop)
        signal.signal(signal.SIGTERM, later)
        undo()
        assert signal.getsignal(signal.SIGTERM) is later
    finally:
        signal.signal(signal.SIGTERM, original)
        loop.close()


def test_the_hooks_of_closed_or_dropped_pools_are_let_go() -> None:
    """A hook held its pool (and the pool's loop) for the process's life: a process making pool
    after pool (per tenant, per asyncio.run, per test) kept every one. Held weakly now, and
    dropped from the list once its pool is closed or collected."""
    import gc
    import weakref

    from asyncpool.integrations.aws_lambda import _shutdown

    loop = asyncio.new_event_loop()
    undo = []
    try:
        pools = [Pool("postgresql://app@db/app", min_size=0) for _ in range(5)]
        refs = [weakref.ref(pool) for pool in pools]
        undo += [close_on_shutdown(pool, loop) for pool in pools]
        for pool in pools[:3]:
            loop.run_until_complete(pool.close())
        del pools, pool
        gc.collect()
        survivor = Pool("postgresql://app@db/app", min_size=0)
        undo.append(close_on_shutdown(survivor, loop))
        assert all(ref() is None for ref in refs)
        assert [hook.pool for hook in _shutdown.hooks] == [survivor]
    finally:
        for step in undo:
            step()
        loop.close()


@pytest.mark.parametrize("bad", [-1.0, float("nan"), float("inf")])
def test_a_budget_that_is_no_number_of_seconds_is_refused_up_front(bad: float) -> None:
    """A negative or NaN budget was taken, then raised ValueError inside the SIGTERM handler on
    top of the running loop (``terminate(cancel_within=budget)`` refuses it) and an infinite
    one OverflowError (``Event.wait``): the pool was never closed."""
    loop = asyncio.new_event_loop()
    try:
        with pytest.raises(ValueError, match=f"budget={bad!r}"):
            close_on_shutdown(Pool("postgresql://app@db/app", min_size=0), loop, budget=bad)
    finally:
        loop.close()


#: A process that ends normally while its pool, on a loop in a thread of its own, has a connection
#: held (by a task that runs no statement: nothing ends it before the budget does).
EXITING_WITH_A_HELD_CONNECTION = """
import asyncio, atexit, os, sys, threading
from asyncpool import Pool
from asyncpool.integrations.aws_lambda import close_on_shutdown

loop = asyncio.new_event_loop()
threading.Thread(target=loop.run_forever, name="pools-loop", daemon=True).start()
pool = Pool(os.environ["ASYNCPOOL_DSN"], min_size=0, max_size=1, telemetry=False)
close_on_shutdown(pool, loop, budget=float(os.environ["BUDGET"]))
held = threading.Event()

async def hold():
    await pool.open()
    async with pool.acquire() as conn:
        await conn.fetchval("SELECT 1")
        held.set()
        await asyncio.sleep(60)

asyncio.run_coroutine_threadsafe(hold(), loop)
assert held.wait(10)
atexit.register(lambda: print("exiting", file=sys.stderr, flush=True))  # runs before ours
"""


def test_sigterm_while_the_exit_hook_closes_the_pools_ends_the_process(
    postgres: PostgresServer, tmp_path: Path
) -> None:
    """SIGTERM while the exit hook waited for the pools' loop (another thread) to close them: our
    handler ran on the main thread inside the hook, and waited for the lock the hook held, for
    good (the process hung until SIGKILL). It now waits for the close, within the budget."""
    import time

    budget = 1.0
    script = tmp_path / "exiting.py"
    script.write_text(EXITING_WITH_A_HELD_CONNECTION)
    env = script_env(ASYNCPOOL_DSN=postgres.dsn(), BUDGET=str(budget))
    proc = subprocess.Popen([sys.executable, str(script)], env=env, stderr=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stderr is not None
        assert proc.stderr.readline().strip() == "exiting", proc.stderr.read()
        time.sleep(0.3)  # the exit hook is closing the pool, waiting for its loop
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        try:
            status = proc.wait(budget + 5)
        except subprocess.TimeoutExpired:
            pytest.fail(f"still running {budget + 5:g}s after SIGTERM")
        took = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()
    assert took < budget + 1.5, f"{took:.2f}s after SIGTERM"
    # Python 3.11 runs our handler inside the exit hook (the process then ends by the signal);
    # 3.12 and later leave it, as the process is already exiting: it ends normally once closed.
    assert status in (-signal.SIGTERM, 0), status


#: A pool being closed (its close() waiting for a connection that runs a statement) when another
#: pool is given to `close_on_shutdown`; then it waits for SIGTERM on the running loop.
CLOSING_WHEN_ANOTHER_POOL_IS_HOOKED = """
import asyncio, os, sys
from asyncpool import Pool
from asyncpool.integrations.aws_lambda import close_on_shutdown

async def main():
    loop = asyncio.get_running_loop()
    dsn = os.environ["ASYNCPOOL_DSN"]
    closing = Pool(dsn, min_size=0, max_size=1, telemetry=False, name="closing")
    await closing.open()
    close_on_shutdown(closing, loop, budget=1.0)

    async def stall():
        async with closing.acquire() as conn:
            await conn.execute("SELECT pg_sleep(30) /* " + os.environ["TAG"] + " */")

    stalled = asyncio.create_task(stall())
    await asyncio.sleep(0.2)
    close = asyncio.create_task(closing.close())  # waits for the statement, 10 s
    await asyncio.sleep(0.1)
    later = Pool(dsn, min_size=0, telemetry=False, name="later")
    close_on_shutdown(later, loop, budget=1.0)
    print("ready", file=sys.stderr, flush=True)
    await asyncio.gather(stalled, close, return_exceptions=True)

asyncio.run(main())
"""


async def test_sigterm_cancels_the_statement_of_a_pool_being_closed_when_another_was_hooked(
    postgres: PostgresServer, tmp_path: Path
) -> None:
    """A pool whose close() was under way counted as closed: hooking another pool dropped its
    hook, and SIGTERM left its statement running on the server after the process was gone."""
    import time
    import uuid

    tag = f"closing-{uuid.uuid4().hex[:10]}"
    script = tmp_path / "closing.py"
    script.write_text(CLOSING_WHEN_ANOTHER_POOL_IS_HOOKED)
    env = script_env(ASYNCPOOL_DSN=postgres.dsn(), TAG=tag)
    proc = await asyncio.create_subprocess_exec(sys.executable, str(script), env=env,
                                                stderr=asyncio.subprocess.PIPE)
    try:
        assert proc.stderr is not None
        line = await asyncio.wait_for(proc.stderr.readline(), 20)
        assert line.strip() == b"ready", line + await proc.stderr.read()
        assert await postgres.running_statements(tag) == 1
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 5) == -signal.SIGTERM
        deadline = time.monotonic() + 1.0
        while (left := await postgres.running_statements(tag)) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert left == 0, "the closing pool's statement runs on after the process ended"
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        await postgres.end_statements(tag)


#: Two pools given to `close_on_shutdown` with an exit handler of the program's registered in
#: between (one that would close the loop or flush what the pools report, say).
EXIT_HANDLER_BETWEEN_TWO_POOLS = """
import asyncio, atexit, os, sys, threading
from asyncpool import Pool
from asyncpool.integrations.aws_lambda import close_on_shutdown

loop = asyncio.new_event_loop()
threading.Thread(target=loop.run_forever, name="pools-loop", daemon=True).start()
dsn = os.environ["ASYNCPOOL_DSN"]
first = Pool(dsn, min_size=0, telemetry=False, name="first")
second = Pool(dsn, min_size=0, telemetry=False, name="second")
for pool in (first, second):
    asyncio.run_coroutine_threadsafe(pool.open(), loop).result(10)
close_on_shutdown(first, loop, budget=1.0)
atexit.register(lambda: print("pools closed:", first.closed, second.closed, file=sys.stderr,
                              flush=True))
close_on_shutdown(second, loop, budget=1.0)
"""


def test_the_pools_close_before_an_exit_handler_registered_before_the_last_of_them(
    postgres: PostgresServer, tmp_path: Path
) -> None:
    """atexit runs the latest handler first. With one handler per pool, each pool closed before
    whatever the program registered before it; the shared handler keeps that for the newest pool
    (it was registered once, with the first, and the program's handler ran with both open)."""
    done = run_script(tmp_path / "exit_handler.py", EXIT_HANDLER_BETWEEN_TWO_POOLS, postgres.dsn())
    assert done.returncode == 0, done.stderr
    assert "pools closed: True True" in done.stderr, done.stderr


#: SIGTERM ignored before the pools' hooks (SIG_IGN: the process goes on after it), then a new
#: pool, then a normal exit with its connection held for a moment; prints how it left.
A_SIGTERM_THE_PROCESS_OUTLIVES = """
import asyncio, os, signal, sys, threading, time
from asyncpool import Pool, PoolObserver
from asyncpool.integrations.aws_lambda import close_on_shutdown

class Reasons(PoolObserver):
    def connection_closed(self, reason):
        print("second:", reason, file=sys.stderr, flush=True)

signal.signal(signal.SIGTERM, signal.SIG_IGN)
loop = asyncio.new_event_loop()
threading.Thread(target=loop.run_forever, name="pools-loop", daemon=True).start()
dsn = os.environ["ASYNCPOOL_DSN"]
first = Pool(dsn, min_size=1, telemetry=False, name="first")
asyncio.run_coroutine_threadsafe(first.open(), loop).result(10)
close_on_shutdown(first, loop, budget=0.5)
os.kill(os.getpid(), signal.SIGTERM)
time.sleep(2.5)  # the handler closes `first`, the signal is ignored as before; time goes by
assert first.closed
second = Pool(dsn, min_size=1, telemetry=False, name="second", observers=[Reasons()])
asyncio.run_coroutine_threadsafe(second.open(), loop).result(10)
close_on_shutdown(second, loop, budget=2.0)

async def hold():
    async with second.acquire():
        await asyncio.sleep(0.3)  # back well within a quarter of the budget

asyncio.run_coroutine_threadsafe(hold(), loop)
time.sleep(0.05)
print("exiting", file=sys.stderr, flush=True)
"""


def test_a_shutdown_the_process_outlived_leaves_the_next_one_its_own_budget(
    postgres: PostgresServer, tmp_path: Path
) -> None:
    """A SIGTERM the process survives (ignored, or handled without exiting) began a shutdown
    whose start the next one took as its own: at exit, the budget was long spent and the pool
    was terminated, its held connection not waited for, instead of closed."""
    done = run_script(tmp_path / "outlived.py", A_SIGTERM_THE_PROCESS_OUTLIVES, postgres.dsn())
    assert done.returncode == 0, done.stderr
    assert "exiting" in done.stderr, done.stderr
    assert "second: pool closed" in done.stderr, done.stderr
