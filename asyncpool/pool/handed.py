"""Whether a running task may still give back a connection another task acquired.

A lease names the task that took the connection (and the last one that ran a statement on it),
not one it was handed to: ``conn = await pool.acquire()`` then ``create_task(finish(conn))``.
At a Lambda invocation's end such a task may still give it back, an unrelated one never will
(`asyncpool.pool.stragglers.end_kept_checkouts`). Told apart by what the task's suspended
coroutines refer to: their locals (arguments and closure variables included, even before the
task first runs), and what those hold a few steps down (a list, a queue, an object's
attributes). Module globals are not followed: everything running reaches them.
"""

from __future__ import annotations

import asyncio
import collections
import gc
import types
from typing import Any

from asyncpool.pool.connection import PooledConnection
from asyncpool.pool.lease import Lease, task_frames

#: How many references down from a frame's locals the connection is looked for.
_DEPTH = 4
#: Objects looked at per task at most; past that the task is taken to refer to it (unsure:
#: left to give it back, as before this was looked at).
_MOST = 5_000
_CONTAINERS = (list, tuple, set, frozenset, collections.deque)
# Not followed: what every task reaches (the loop, other tasks and their coroutines, code,
# modules, classes) and the pool's own state (it holds every connection).
_OPAQUE = (types.ModuleType, type, types.FrameType, types.CodeType, types.CoroutineType,
           types.GeneratorType, types.AsyncGeneratorType, asyncio.AbstractEventLoop,
           asyncio.Future)


def refers_to(task: asyncio.Task[Any], lease: Lease) -> bool:
    """True if `task`'s suspended coroutines hold the connection `lease` is for (its
    `PooledConnection`), or may: more is held than is worth looking through."""
    layer: list[Any] = [value for frame in task_frames(task) for value in frame.f_locals.values()]
    seen: set[int] = set()
    for _ in range(_DEPTH):
        below: list[Any] = []
        for obj in layer:
            if id(obj) in seen or isinstance(obj, _OPAQUE):
                continue
            seen.add(id(obj))
            if len(seen) > _MOST:
                return True
            if isinstance(obj, PooledConnection):
                if obj._lease is lease:
                    return True
                continue
            below.extend(_referents(obj))
        layer = below
    return False


def _referents(obj: Any) -> list[Any]:
    """What `obj` holds that a task could reach the connection through."""
    if isinstance(obj, dict):
        return [*obj.keys(), *obj.values()]
    if isinstance(obj, _CONTAINERS):
        return list(obj)
    if isinstance(obj, types.FunctionType):
        # A callback it will call: its closure, not its globals.
        return [cell.cell_contents for cell in obj.__closure__ or ()
                if _filled(cell)] + list(obj.__defaults__ or ())
    if type(obj).__module__.startswith("asyncpool.pool"):
        return []  # (a pool, its records: they hold every connection)
    # An object's attributes (its __dict__, its slots), a bound method's object.
    return [value for value in gc.get_referents(obj) if not isinstance(value, type)]


def _filled(cell: types.CellType) -> bool:
    try:
        _ = cell.cell_contents
    except ValueError:  # (a closure variable not assigned yet)
        return False
    return True
