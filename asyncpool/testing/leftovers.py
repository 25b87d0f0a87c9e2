"""Find server processes the harness started and did not stop."""

from __future__ import annotations

from pathlib import Path

from asyncpool.testing.process import TEMP_PREFIX, started_pids, started_workdirs


def leftover_servers(everyone: bool = False) -> list[tuple[int, str]]:
    """(pid, command line) of live servers this process started (`everyone`: any harness's)."""
    ours = set(started_pids)
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state == "Z":
            continue  # exited, waiting to be reaped: not running
        pid = int(proc.name)
        mine = pid in ours or any(workdir in cmdline for workdir in started_workdirs)
        if mine or (everyone and TEMP_PREFIX in cmdline):
            found.append((pid, cmdline.strip()))
    return found
