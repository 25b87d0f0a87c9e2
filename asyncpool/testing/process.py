"""Run server processes as an unprivileged user and make sure none outlives the harness."""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import weakref
from collections.abc import Callable
from pathlib import Path

from asyncpool.testing.harness_error import HarnessError

# Every temp dir the harness makes carries this prefix, so a leftover server can be found by name.
TEMP_PREFIX = "asyncpool-harness-"

_live: weakref.WeakSet[ServerProcess] = weakref.WeakSet()
# Everything this process started, for the leftover check (pids and the workdirs in their args).
started_pids: list[int] = []
started_workdirs: list[str] = []


def _service_user() -> pwd.struct_passwd | None:
    """PostgreSQL and PgBouncer refuse to run as root: pick the `postgres` (or `nobody`) account."""
    if os.geteuid() != 0:
        return None
    for name in (os.environ.get("ASYNCPOOL_TEST_OS_USER", ""), "postgres", "nobody"):
        if not name:
            continue
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    raise HarnessError("running as root but no unprivileged account (postgres, nobody) exists")


def make_workdir(kind: str) -> Path:
    """A private temp dir the server's user owns."""
    path = Path(tempfile.mkdtemp(prefix=f"{TEMP_PREFIX}{kind}-"))
    user = _service_user()
    if user is not None:
        os.chown(path, user.pw_uid, user.pw_gid)
    path.chmod(0o700)
    started_workdirs.append(str(path))
    return path


def chown_tree(path: Path) -> None:
    user = _service_user()
    if user is None:
        return
    for root, dirs, files in os.walk(path):
        for name in [*dirs, *files]:
            os.chown(os.path.join(root, name), user.pw_uid, user.pw_gid)
    os.chown(path, user.pw_uid, user.pw_gid)


def run_as_service(args: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    """Run a short command (initdb) as the service user; raise with its output on failure."""
    user = _service_user()
    out = subprocess.run(
        args,
        capture_output=True,
        text=True,
        check=False,
        user=user.pw_uid if user else None,
        group=user.pw_gid if user else None,
        **kwargs,  # type: ignore[call-overload]
    )
    if out.returncode != 0:
        raise HarnessError(f"{Path(args[0]).name} failed ({out.returncode}): {out.stderr.strip()[-800:]}")
    return out  # type: ignore[no-any-return]


class ServerProcess:
    """A long-running server started by the harness, stopped on `stop()` or at interpreter exit."""

    def __init__(self, name: str, args: list[str], log_path: Path, cwd: Path,
                 death_signal: int = signal.SIGKILL) -> None:
        self.name = name
        self.death_signal = death_signal
        self.args = args
        self.log_path = log_path
        self.cwd = cwd
        self.popen: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        user = _service_user()
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child owns it for its lifetime
        try:
            self.popen = subprocess.Popen(
                self.args,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=self.cwd,
                user=user.pw_uid if user else None,
                group=user.pw_gid if user else None,
                # Own process group: a Ctrl-C in the terminal must not kill servers mid-teardown.
                start_new_session=True,
                # The hook calls only prctl() and getppid(): no lock a forked thread could hold.
                preexec_fn=_die_with_parent(self.death_signal),  # noqa: PLW1509
            )
        finally:
            log.close()
        _live.add(self)
        started_pids.append(self.popen.pid)

    @property
    def pid(self) -> int | None:
        return self.popen.pid if self.popen else None

    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def send(self, sig: int) -> None:
        if self.running():
            assert self.popen is not None
            os.kill(self.popen.pid, sig)

    def stop(self, sig: int = signal.SIGINT, timeout: float = 10.0) -> None:
        """Ask the server to stop (SIGINT: PostgreSQL's fast shutdown, PgBouncer's safe one), then kill."""
        if self.popen is None:
            return
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, sig)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait(5)
        _live.discard(self)

    def log_tail(self, chars: int = 1500) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""


def _die_with_parent(sig: int) -> Callable[[], None] | None:
    """A preexec hook asking Linux to send `sig` to the server when the harness process dies, so
    a harness killed by a timeout or SIGKILL (where atexit never runs) leaves no server behind.

    Linux ties this to the thread that forks, so it is used only from the main thread (a helper
    thread ending would otherwise take its servers with it).
    """
    if not sys.platform.startswith("linux") or threading.current_thread() is not threading.main_thread():
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None
    parent = os.getpid()

    def hook() -> None:
        libc.prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)

    return hook


_PR_SET_PDEATHSIG = 1


def remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


@atexit.register
def _kill_leftovers() -> None:
    for proc in list(_live):
        proc.stop(signal.SIGKILL, timeout=5)
