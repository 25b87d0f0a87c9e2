"""Telemetry locks that a forked child gets anew.

The counts, series and checkout-time recorders outlive a fork (a worker's pool of the same
name goes on with them). A thread of the parent (a pool on another loop counting, an exporter
collecting) may hold one of their locks at the fork; the child has no such thread to release
it, and its first ``with`` would wait forever, hanging the pool's event loop.
"""

from __future__ import annotations

import os
import threading
import weakref
from typing import Protocol


class _LockOwner(Protocol):
    _lock: threading.Lock


_OWNERS: weakref.WeakSet[_LockOwner] = weakref.WeakSet()


def fork_safe_lock(owner: _LockOwner) -> threading.Lock:
    """A new lock for ``owner._lock``, which a forked child replaces with a free one."""
    _OWNERS.add(owner)
    return threading.Lock()


def _renew_in_child() -> None:
    # (What a parent's thread was changing under the lock may be half done: a count or a
    # checkout time lost at most.)
    for owner in list(_OWNERS):
        owner._lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_renew_in_child)
