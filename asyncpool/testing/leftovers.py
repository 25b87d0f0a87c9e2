"""Find server processes the harness started and did not stop."""

from __future__ import annotations

from pathlib import Path

from asyncpool.testing.process import TEMP_PREFIX


def leftover_servers() -> list[tuple[int, str]]:
    """(pid, command line) of every live process whose command line names a harness temp dir."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if TEMP_PREFIX in cmdline and ("postgres" in cmdline or "pgbouncer" in cmdline):
            found.append((int(proc.name), cmdline.strip()))
    return found
