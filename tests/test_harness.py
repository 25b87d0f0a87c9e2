"""The harness really starts PostgreSQL and both PgBouncers, and stops every process it starts."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import stat
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from asyncpool.testing import PgBouncerServer, PostgresServer, ServerStack
from asyncpool.testing.binaries import (
    current_pgbouncer,
    postgres_bindir,
    postgres_version,
    system_pgbouncer,
    untrusted_paths,
)
from asyncpool.testing.faultproxy import FaultMode, FaultProxy
from asyncpool.testing.harness_error import HarnessError
from asyncpool.testing.leftovers import leftover_servers
from asyncpool.testing.pgbouncer import shared_settings


async def test_postgres_uses_scram(postgres: PostgresServer) -> None:
    conn = await asyncpg.connect(postgres.admin_dsn)
    try:
        secret = await conn.fetchval("SELECT rolpassword FROM pg_authid WHERE rolname = 'app'")
        hba = await conn.fetch("SELECT DISTINCT auth_method FROM pg_hba_file_rules")
        max_conn = await conn.fetchval("SHOW max_connections")
    finally:
        await conn.close()
    assert secret.startswith("SCRAM-SHA-256$")
    assert {r["auth_method"] for r in hba} == {"scram-sha-256"}
    assert int(max_conn) == 60


async def test_wrong_password_is_refused(postgres: PostgresServer) -> None:
    dsn = postgres.dsn().replace(postgres.app.password, "not-the-password")
    with pytest.raises(asyncpg.InvalidPasswordError):
        await asyncpg.connect(dsn)


async def test_both_pgbouncer_versions_run_in_transaction_mode(stack: ServerStack) -> None:
    assert stack.legacy.version < (1, 21) <= stack.current.version
    for pooler in stack.poolers:
        config = {row["key"]: row["value"] for row in await pooler.admin("SHOW CONFIG")}
        assert config["pool_mode"] == "transaction"
        assert config["auth_type"] == "scram-sha-256"
        version = (await pooler.admin("SHOW VERSION"))[0]
        assert pooler.binary.version_text in str(next(iter(version.values())))
    current_config = {r["key"]: r["value"] for r in await stack.current.admin("SHOW CONFIG")}
    assert int(current_config["max_prepared_statements"]) > 0


def test_shared_settings_are_the_ones_in_use() -> None:
    settings = shared_settings()
    assert settings["pool_mode"] == "transaction"
    assert int(settings["max_client_conn"]) >= 1000
    assert int(settings["default_pool_size"]) == 50


def test_stopped_servers_leave_no_process() -> None:
    postgres = PostgresServer(max_connections=20).start()
    bouncer = PgBouncerServer(system_pgbouncer(), postgres).start()
    current = PgBouncerServer(current_pgbouncer(), postgres).start()
    servers: list[PostgresServer | PgBouncerServer] = [postgres, bouncer, current]
    pids = [s.process.pid for s in servers if s.process is not None]
    workdirs = [s.workdir for s in servers]
    assert len(pids) == 3
    assert all(_alive(pid) for pid in pids if pid is not None)
    for server in reversed(servers):
        server.stop()
    assert not any(_alive(pid) for pid in pids if pid is not None)
    assert not any(path is not None and path.exists() for path in workdirs)
    assert not [pid for pid, _ in leftover_servers() if pid in pids]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead for our purposes.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except OSError:
        return False


async def test_direct_clients_refused_but_pgbouncer_serves_them_all(stack: ServerStack) -> None:
    """The reason this project exists: N > max_connections clients, direct vs through PgBouncer."""
    clients = 80  # max_connections is 60, three of which are reserved for superusers
    pooler = stack.legacy
    direct = await asyncio.gather(
        *[asyncpg.connect(stack.postgres.dsn(), timeout=10) for _ in range(clients)],
        return_exceptions=True,
    )
    opened = [c for c in direct if isinstance(c, asyncpg.Connection)]
    refused = [e for e in direct if isinstance(e, asyncpg.TooManyConnectionsError)]
    try:
        assert refused, "every direct client got in: max_connections is not being enforced"
        assert len(opened) + len(refused) == clients
        assert len(opened) <= 60
    finally:
        await asyncio.gather(*[c.close() for c in opened])

    peak = 0

    async def client(i: int) -> int:
        conn = await asyncpg.connect(pooler.dsn(), statement_cache_size=0, timeout=20)
        try:
            async with conn.transaction():
                value: int = await conn.fetchval("SELECT $1::int FROM pg_sleep(0.05)", i)
                return value
        finally:
            await conn.close()

    async def watch() -> None:
        nonlocal peak
        while True:
            peak = max(peak, await pooler.server_connections())
            await asyncio.sleep(0.02)

    watcher = asyncio.create_task(watch())
    try:
        results = await asyncio.gather(*[client(i) for i in range(clients)])
    finally:
        watcher.cancel()
    assert sorted(results) == list(range(clients))
    assert 0 < peak <= pooler.pool_size


def test_servers_die_with_a_killed_harness() -> None:
    """A harness killed outright (a CI timeout, SIGKILL: no atexit runs) leaves no server behind."""
    script = (
        "import time\n"
        "from asyncpool.testing import ServerStack\n"
        "s = ServerStack.start(max_connections=20)\n"
        "print(' '.join(map(str, s.pids())), flush=True)\n"
        "time.sleep(120)\n"
    )
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None
        pids = [int(p) for p in child.stdout.readline().split()]
        assert len(pids) == 3
        assert all(_alive(pid) for pid in pids)
    finally:
        child.kill()
        child.wait(10)
    deadline = time.monotonic() + 10
    while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [pid for pid in pids if _alive(pid)]


# -- the cached PgBouncer is run as root: only if nobody else could have changed it ------------

SCRIPT = os.path.join(os.path.dirname(__file__), "..", "scripts", "get-pgbouncer-current.sh")
FAKE_LAUNCHER = '#!/bin/sh\n[ -n "$MARK" ] && touch "$MARK"\necho "PgBouncer 1.24.1"\n'


def plant_cache(folder: Path, mode: int = 0o755) -> Path:
    cache = folder / "pgbouncer-trixie"
    (cache / "root").mkdir(parents=True)
    launcher = cache / "pgbouncer"
    launcher.write_text(FAKE_LAUNCHER)
    launcher.chmod(mode)
    return cache


def run_script(cache: Path, mark: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "ASYNCPOOL_PGBOUNCER_CACHE": str(cache), "MARK": str(mark)}
    return subprocess.run(["bash", SCRIPT], capture_output=True, text=True, env=env, check=False, timeout=30)


def test_untrusted_paths_names_what_others_could_change(tmp_path: Path) -> None:
    base = tmp_path / "base"
    base.mkdir(mode=0o755)
    cache = plant_cache(base)
    assert untrusted_paths(cache) == []
    (cache / "root" / "lib.so").write_text("x")
    (cache / "root" / "lib.so").chmod(0o664)
    assert untrusted_paths(cache) == [f"{cache / 'root' / 'lib.so'}: writable by group or others (mode 664)"]
    (cache / "root" / "lib.so").chmod(0o644)
    if os.geteuid() == 0:  # only root can give a file away
        os.chown(cache / "pgbouncer", 65534, 65534)
        assert untrusted_paths(cache) == [f"{cache / 'pgbouncer'}: owned by uid 65534, not by root or uid 0"]
        os.chown(cache / "pgbouncer", 0, 0)
    base.chmod(0o777)  # a folder above, writable by anyone and not sticky: the cache can be swapped
    assert untrusted_paths(cache) == [f"{base}: writable by group or others (mode 777)"]
    base.chmod(0o1777)  # sticky, as /tmp: others cannot rename what is ours
    assert untrusted_paths(cache) == []


@pytest.mark.skipif(os.geteuid() != 0, reason="the check guards running the cache as root")
def test_harness_refuses_a_cache_others_can_change(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = plant_cache(tmp_path, mode=0o777)
    monkeypatch.delenv("ASYNCPOOL_PGBOUNCER_CURRENT", raising=False)
    monkeypatch.setenv("ASYNCPOOL_PGBOUNCER_CACHE", str(cache))
    mark = tmp_path / "ran"
    monkeypatch.setenv("MARK", str(mark))
    with pytest.raises(
        HarnessError, match=r"refusing to run the cached PgBouncer .* writable by group or others"
    ):
        current_pgbouncer()
    assert not mark.exists()


def test_fetch_script_refuses_a_cache_others_can_change_without_running_it(tmp_path: Path) -> None:
    cache = plant_cache(tmp_path, mode=0o777)
    mark = tmp_path / "ran"
    out = run_script(cache, mark)
    assert out.returncode == 1
    assert "writable by group or others" in out.stderr
    assert not mark.exists(), "the script ran a launcher anyone could have replaced"


def test_fetch_script_leaves_an_overridden_cache_parent_alone(tmp_path: Path) -> None:
    parent = tmp_path / "mine"
    parent.mkdir()
    parent.chmod(0o700)
    cache = plant_cache(parent)
    mark = tmp_path / "ran"
    out = run_script(cache, mark)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(cache / "pgbouncer")
    assert mark.exists()
    assert stat.S_IMODE(parent.stat().st_mode) == 0o700


# -- PostgreSQL 17 (scripts/get-postgres-17.sh): cached, and refused when others could change it ----

PG17_SCRIPT = os.path.join(os.path.dirname(__file__), "..", "scripts", "get-postgres-17.sh")
FAKE_PG = '#!/bin/sh\n[ -n "$MARK" ] && touch "$MARK"\necho "$(basename "$0") (PostgreSQL) 17.12"\n'


def plant_pg17_cache(folder: Path, mode: int = 0o755) -> tuple[Path, Path]:
    cache = folder / "postgresql-17-trixie"
    bindir = cache / "root" / "usr" / "lib" / "postgresql" / "17" / "bin"
    bindir.mkdir(parents=True)
    for name in ("postgres", "initdb"):
        (bindir / name).write_text(FAKE_PG)
        (bindir / name).chmod(mode)
    return cache, bindir


def run_pg17_script(cache: Path, mark: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "ASYNCPOOL_PG17_CACHE": str(cache), "MARK": str(mark)}
    return subprocess.run(["bash", PG17_SCRIPT], capture_output=True, text=True, env=env, check=False,
                          timeout=30)


def test_pg17_script_uses_its_cache_without_fetching(tmp_path: Path) -> None:
    cache, bindir = plant_pg17_cache(tmp_path)
    mark = tmp_path / "ran"
    out = run_pg17_script(cache, mark)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(bindir)
    assert mark.exists()
    assert (bindir / "postgres").read_text() == FAKE_PG, "a cached run fetched it again"
    assert sorted(p.name for p in cache.iterdir()) == ["root"]


def test_pg17_script_refuses_a_cache_others_can_change_without_running_it(tmp_path: Path) -> None:
    cache, _ = plant_pg17_cache(tmp_path, mode=0o777)
    mark = tmp_path / "ran"
    out = run_pg17_script(cache, mark)
    assert out.returncode == 1
    assert "writable by group or others" in out.stderr
    assert not mark.exists(), "the script ran a program anyone could have replaced"


async def test_postgres_is_the_version_in_the_bindir(postgres: PostgresServer) -> None:
    """The servers run what postgres_bindir() names: with ASYNCPOOL_PG_BINDIR set to
    scripts/get-postgres-17.sh's folder, PostgreSQL 17 (the launchers start the real server)."""
    conn = await asyncpg.connect(postgres.admin_dsn)
    try:
        number = int(await conn.fetchval("SHOW server_version_num"))
    finally:
        await conn.close()
    assert (number // 10000, number % 10000) == postgres_version(postgres_bindir())


@pytest.mark.parametrize("mode", ["drop", "reset"])
async def test_fault_proxy_spares_cancel_requests_from_drops(mode: FaultMode) -> None:
    """`spare_cancels`: a drop or reset closes every connection but a CancelRequest's, which
    still reaches the server. (Cut in flight, one crashes PgBouncer 1.18: docs/faults.md.)"""
    arrived: list[tuple[bytes, asyncio.StreamWriter]] = []

    async def upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            arrived.append((await reader.readexactly(8), writer))
            await reader.read()  # until the client or the proxy closes

    server = await asyncio.start_server(upstream, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with FaultProxy("127.0.0.1", port) as proxy:
            proxy.spare_cancels = True
            plain_r, plain_w = await asyncio.open_connection(proxy.host, proxy.port)
            plain_w.write(struct.pack("!ii", 8, 196608))  # a startup packet's head
            cancel_r, cancel_w = await asyncio.open_connection(proxy.host, proxy.port)
            cancel_w.write(struct.pack("!iiii", 16, 80877102, 1234, 5678))  # a CancelRequest
            async with asyncio.timeout(5):
                while len(arrived) < 2:
                    await asyncio.sleep(0.01)
            proxy.set_mode(mode)
            async with asyncio.timeout(5):
                with contextlib.suppress(ConnectionResetError):
                    assert await plain_r.read() == b""
            # The cancel request's connection is still open at both ends...
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.3):
                    await cancel_r.read(1)
            # ...and ends when the server ends it, as PgBouncer does once it has forwarded it.
            server_end = next(w for first, w in arrived if first[4:8] == struct.pack("!i", 80877102))
            server_end.close()
            async with asyncio.timeout(5):
                assert await cancel_r.read() == b""
            assert proxy.cancels_seen == 1
            plain_w.close()
            cancel_w.close()
    finally:
        server.close()


@pytest.mark.parametrize("option", ["spare_cancels", "drop_cancels", "strip_backend_key"])
async def test_fault_proxy_reading_the_first_packet_passes_it_on_whole(
        stack: ServerStack, option: str) -> None:
    """With a protocol-aware option the proxy reads the client's first packet: it must send it
    on in one piece, as PgBouncer 1.18 ends a login whose startup packet comes in two ("client
    sent partial pkt in startup phase")."""
    pooler = stack.legacy
    async with FaultProxy(pooler.host, pooler.port) as proxy:
        setattr(proxy, option, True)
        for _ in range(5):
            conn = await asyncpg.connect(proxy.dsn(pooler.dsn()), statement_cache_size=0)
            try:
                assert await conn.fetchval("SELECT 1") == 1
            finally:
                await conn.close()


@pytest.mark.parametrize("option", ["spare_cancels", "drop_cancels", "strip_backend_key"])
async def test_fault_proxy_takes_a_client_reset_before_its_first_packet_quietly(
        option: str) -> None:
    """A client that resets its connection before sending anything (a pool terminated while it
    logs in) must not reach the loop's exception handler: the cancellation hunt counts what does."""
    loop = asyncio.get_running_loop()
    errors: list[dict[str, Any]] = []
    old = loop.get_exception_handler()
    loop.set_exception_handler(lambda _, context: errors.append(context))
    try:
        async with FaultProxy("127.0.0.1", 9) as proxy:  # (nothing is dialled: no packet came)
            setattr(proxy, option, True)
            for _ in range(3):
                _, writer = await asyncio.open_connection(proxy.host, proxy.port)
                writer.write(b"\0\0")  # part of a first packet, then a reset
                await writer.drain()
                await asyncio.sleep(0.05)
                writer.get_extra_info("socket").setsockopt(
                    socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                writer.transport.abort()
            await asyncio.sleep(0.2)
    finally:
        loop.set_exception_handler(old)
    assert errors == []


async def test_fault_proxy_holds_requests_after_a_budget() -> None:
    """`hold_requests(after=n)`: the client's next `n` bytes reach the server, then nothing more
    (the proxy stops reading: the client's writes back up, its replies still arrive) until
    `release_requests`, which forwards the rest in order."""
    received = bytearray()
    got = asyncio.Event()
    server_writer: list[asyncio.StreamWriter] = []

    async def upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        server_writer.append(writer)
        with contextlib.suppress(OSError):
            while data := await reader.read(65536):
                received.extend(data)
                got.set()

    async def received_at_least(n: int) -> None:
        async with asyncio.timeout(5):
            while len(received) < n:
                got.clear()
                await got.wait()

    server = await asyncio.start_server(upstream, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with FaultProxy("127.0.0.1", port) as proxy:
            reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
            writer.write(b"hello")
            await received_at_least(5)
            proxy.hold_requests(after=3)
            backlog = b"abc" + b"x" * (16 * 1024 * 1024)
            writer.write(backlog)
            await received_at_least(8)
            # Replies still flow while requests are held: once one has come back, the proxy
            # has had every chance to forward more, and has not.
            server_writer[0].write(b"reply")
            async with asyncio.timeout(5):
                assert await reader.readexactly(5) == b"reply"
            assert bytes(received) == b"helloabc"
            assert writer.transport.get_write_buffer_size() > 0  # (backed up in the client)
            proxy.release_requests()
            await received_at_least(5 + len(backlog))
            assert bytes(received) == b"hello" + backlog
            writer.close()
    finally:
        server.close()
