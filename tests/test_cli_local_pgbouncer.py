"""`asyncpool local-pgbouncer`: real servers up until a signal, the DSN only in a 0600 env file,
nothing left behind."""

from __future__ import annotations

import asyncio
import os
import re
import shlex
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import asyncpg
import pytest

from asyncpool.cli.local_pgbouncer import DSN_VARIABLE, write_env_file
from tests.script_support import REPO

_START_TIMEOUT = 60.0


def _start(*args: str, cwd: Path) -> subprocess.Popen[str]:
    # Run from `cwd` (the default env file's folder), importing this checkout's asyncpool.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, "-m", "asyncpool.cli", "local-pgbouncer", *args],
                            cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def _wait_for_file(path: Path, proc: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + _START_TIMEOUT
    while not path.exists():
        if proc.poll() is not None:
            pytest.fail(f"exited {proc.returncode} before writing {path}: {proc.communicate()}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"no {path} after {_START_TIMEOUT:g}s: {proc.communicate()}")
        time.sleep(0.1)


def _started_with(env_file: Path, cwd: Path) -> subprocess.Popen[str]:
    """The command started with `env_file`, once it has written it. A port the kernel gave as
    free taken by another test's server before PostgreSQL bound it (the harness's servers pick
    theirs the same way, in parallel workers) is a race of the machine, not of the command:
    started again, at most twice."""
    for attempt in range(3):
        proc = _start("--env-file", str(env_file), cwd=cwd)
        deadline = time.monotonic() + _START_TIMEOUT
        while not env_file.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        if proc.poll() is not None and not env_file.exists():
            out, err = proc.communicate()
            if "Address already in use" in err and attempt < 2:
                continue
            pytest.fail(f"exited {proc.returncode} before writing {env_file}: {(out, err)}")
        _wait_for_file(env_file, proc)
        return proc
    raise AssertionError("unreachable")


def _children(pid: int) -> list[int]:
    """Live processes whose parent is `pid` (the servers the command started)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[1] == str(pid) and fields[0] != "Z":
            found.append(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _read_env(path: Path) -> dict[str, str]:
    values = {}
    for line in path.read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.partition("=")
            values[name] = shlex.split(value)[0]
    return values


async def _through(dsn: str) -> tuple[int, str]:
    conn = await asyncpg.connect(dsn, statement_cache_size=0)
    try:
        port: int = await conn.fetchval("SELECT inet_server_port()")
        user: str = await conn.fetchval("SELECT current_user")
    finally:
        await conn.close()
    return port, user


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM])
def test_serves_until_a_signal_with_the_dsn_only_in_a_private_file(
        tmp_path: Path, stop: signal.Signals) -> None:
    env_file = tmp_path / "local.env"
    proc = _started_with(env_file, cwd=tmp_path)
    try:
        assert stat.S_IMODE(env_file.stat().st_mode) == 0o600
        dsn = _read_env(env_file)[DSN_VARIABLE]
        servers = _children(proc.pid)
        assert len(servers) == 2, servers  # PostgreSQL's postmaster and PgBouncer
        workdirs = [Path(p) for p in re.findall(r"/\S*asyncpool-harness-\S+?-\w+(?=/)",
                                                " ".join(_cmdline(pid) for pid in servers))]
        assert len(workdirs) == 2, workdirs
        assert all(w.exists() for w in workdirs)

        server_port, user = asyncio.run(_through(dsn))
        # PostgreSQL answered on a port other than the DSN's: a pooler sits in between.
        assert user == "app"
        assert server_port != int(re.findall(r":(\d+)/", dsn)[-1])

        proc.send_signal(stop)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    password = re.findall(r"//[^:]+:([^@]+)@", dsn)[0]
    assert password not in out + err
    assert f"{DSN_VARIABLE}=postgresql://app:***@" in out
    assert str(env_file) in out
    assert not env_file.exists()
    assert not [pid for pid in servers if _alive(pid)]
    assert not [w for w in workdirs if w.exists()]


def _cmdline(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()


def test_refuses_to_overwrite_a_file_it_did_not_write(tmp_path: Path) -> None:
    env_file = tmp_path / ".env.asyncpool"
    env_file.write_text("MY_OWN=1\n")
    proc = _start(cwd=tmp_path)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 2
    assert "was not written by this command" in err
    assert env_file.read_text() == "MY_OWN=1\n"
    assert "Starting" not in out


def test_an_env_file_of_its_own_is_replaced_private(tmp_path: Path) -> None:
    env_file = tmp_path / "local.env"
    old = "postgresql://app:old@127.0.0.1:1/app"  # pragma: allowlist secret
    write_env_file(env_file, {DSN_VARIABLE: old})
    env_file.chmod(0o644)
    write_env_file(env_file, {DSN_VARIABLE: "postgresql://app:n w'@127.0.0.1:2/app"})
    assert stat.S_IMODE(env_file.stat().st_mode) == 0o600
    # Quoted for a shell: `set -a; . FILE` reads back the exact value.
    shell = subprocess.run(["sh", "-c", f'set -a; . "{env_file}"; printf %s "${DSN_VARIABLE}"'],
                           capture_output=True, text=True, check=True, env={"PATH": os.defpath})
    assert shell.stdout == "postgresql://app:n w'@127.0.0.1:2/app"


def test_an_env_file_in_a_folder_that_does_not_exist_is_refused_before_starting(
        tmp_path: Path) -> None:
    """The servers were started, then writing the file failed with a FileNotFoundError
    traceback (and the servers stopped again)."""
    env_file = tmp_path / "no-such-folder" / ".env.asyncpool"
    proc = _start("--env-file", str(env_file), cwd=tmp_path)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 2
    assert f"{env_file.parent} is not a folder" in err
    assert "Traceback" not in err
    assert "Starting" not in out


def test_the_env_file_appears_whole(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A script waiting for the file (as the tests above do) never reads it half written: it
    is not at its path while its lines are written (a loaded run read it empty: KeyError)."""
    path = tmp_path / "local.env"
    seen_while_writing: list[bool] = []
    quote = shlex.quote

    def quote_and_look(text: str) -> str:
        seen_while_writing.append(path.exists())
        return quote(text)

    monkeypatch.setattr("asyncpool.cli.local_pgbouncer.shlex.quote", quote_and_look)
    write_env_file(path, {DSN_VARIABLE: "postgresql://app@127.0.0.1:6432/app"})
    assert seen_while_writing == [False]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert "ASYNCPOOL_DSN=postgresql://app@127.0.0.1:6432/app\n" in path.read_text()
    assert [p.name for p in tmp_path.iterdir()] == ["local.env"]  # (no draft left)


def test_the_doctor_run_in_the_env_files_shell_checks_the_pooler(tmp_path: Path) -> None:
    """The shell the command tells you to set up (`set -a; . FILE; set +a`) runs `asyncpool
    doctor` with every check: the file held only the app's DSN, whose user PgBouncer's admin
    console refuses, so the doctor left the pooler unchecked (exit 3) and asked for an
    --admin-dsn nobody had been given. Pools made in that shell are not warned about the
    admin console's variable."""
    env_file = tmp_path / "local.env"
    proc = _started_with(env_file, cwd=tmp_path)
    try:
        values = _read_env(env_file)
        env = {"PATH": os.defpath,
               "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
        script = (f'set -a; . "{env_file}"; set +a; '
                  '"$0" -W error -c "import asyncpool; asyncpool.PoolConfig.from_env()" && '
                  'exec "$0" -m asyncpool.cli doctor')
        doctor = subprocess.run(["sh", "-c", script, sys.executable], cwd=tmp_path, env=env,
                                capture_output=True, text=True, timeout=60, check=False)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    report = doctor.stdout + doctor.stderr
    assert doctor.returncode == 0, report
    assert re.search(r"ok +pooler +PgBouncer [\d.]+: pool_mode=transaction", doctor.stdout), report
    assert "No problems found." in doctor.stdout
    passwords = [re.findall(r"//[^:]+:([^@]+)@", dsn)[0] for dsn in values.values()]
    assert len(passwords) == 2  # the app's and the admin console's
    assert not [p for p in passwords if p in report + out + err]
    assert "ASYNCPOOL_ADMIN_DSN=postgresql://pgb_admin:***@" in out
