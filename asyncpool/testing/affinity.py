"""Pinning the benchmarks' client and servers to CPUs (Linux), so every contender runs under the
same placement.

Measured on the 2-vCPU machines here: with the kernel free to place processes, the client CPU
one query costs depends on where the PostgreSQL backend of that connection happens to run, and
stays that way for the connection's life: 40 µs when it shares the client's CPU, about 105 µs
when it runs on the other one (the client's own wake-ups across CPUs are what costs). Two
connections opened side by side can land differently, which is a bigger difference than any
pool's own cost. Pinned, every connection costs the same.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

PLACEMENTS = ("same", "split", "none")


def available() -> bool:
    return hasattr(os, "sched_setaffinity") and Path("/proc/self/task").is_dir()


def descendants(pid: int) -> set[int]:
    """`pid`, its threads, and every process below it (read from /proc)."""
    parents: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue  # ended meanwhile
        # "pid (comm) state ppid ...": comm may hold spaces and parentheses
        ppid = int(text[text.rindex(")") + 2 :].split()[1])
        parents.setdefault(ppid, []).append(int(stat.parent.name))
    found: set[int] = set()
    todo = [pid]
    while todo:
        current = todo.pop()
        if current in found:
            continue
        found.add(current)
        tasks = Path(f"/proc/{current}/task")
        if tasks.is_dir():
            found.update(int(t.name) for t in tasks.iterdir())
        todo.extend(parents.get(current, []))
    return found


def pin(pids: Iterable[int], cpus: set[int]) -> int:
    """Pin each of `pids` with its threads and descendants (and the processes they start later,
    which inherit it) to `cpus`; returns how many tasks were pinned."""
    pinned = 0
    for pid in pids:
        for task in descendants(pid):
            try:
                os.sched_setaffinity(task, cpus)
            except (ProcessLookupError, PermissionError):
                continue
            pinned += 1
    return pinned


def place(placement: str, server_pids: Iterable[int]) -> str:
    """Pin this process and the servers for `placement` ("same": all on one CPU, "split": the
    client on one, the servers on another, "none": leave it to the kernel); describes it."""
    if placement == "none" or not available():
        return "not pinned (the kernel places client and servers)"
    cpus = sorted(os.sched_getaffinity(0))
    client = cpus[0]
    servers = client if placement == "same" or len(cpus) < 2 else cpus[1]
    os.sched_setaffinity(0, {client})
    count = pin(server_pids, {servers})
    where = "the same CPU" if servers == client else f"CPU {servers}"
    return f"client pinned to CPU {client}, servers ({count} tasks) to {where}"
