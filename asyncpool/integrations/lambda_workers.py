"""Lambda Managed Instances workers end with the runtime process that forked them.

With ``AWS_LAMBDA_MAX_CONCURRENCY`` set, awslambdaric's process forks one worker per concurrency
slot (``multiprocessing``, fork context) and waits for them; each worker imports the handler, so
each has its own pools and its own `close_on_shutdown` hooks. A SIGTERM sent to the runtime's
process ends that process (awslambdaric installs no handler there) and nothing reaches the
workers: orphaned, they kept their pools open, the pooler holding their client slots, until
the environment was killed (measured under awslambdaric 4.2: both workers still logged in to
PgBouncer 1.5 s after the SIGTERM). So a worker asks the kernel for a SIGTERM of its own when its
parent ends (Linux ``PR_SET_PDEATHSIG``), and its hooks close its pools as on any SIGTERM.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from collections.abc import Mapping

# <linux/prctl.h>
PR_SET_PDEATHSIG = 1

# The processes that asked already (a worker's pools share one request).
_asked_in: list[int] = []


def managed_instance_parent(environ: Mapping[str, str] | None = None) -> int | None:
    """The pid of the runtime process that forked this one, if this is an awslambdaric
    managed-instance worker (``AWS_LAMBDA_MAX_CONCURRENCY`` set, a ``multiprocessing`` child);
    None otherwise."""
    env = os.environ if environ is None else environ
    if not env.get("AWS_LAMBDA_MAX_CONCURRENCY"):
        return None
    import multiprocessing  # (only here: a few milliseconds of INIT otherwise)

    parent = multiprocessing.parent_process()
    return None if parent is None else parent.pid


def sigterm_when_parent_ends(environ: Mapping[str, str] | None = None) -> bool:
    """In a managed-instance worker on Linux, have the kernel send this process SIGTERM when the
    runtime process that forked it ends; True if it was asked (now or before)."""
    if os.getpid() in _asked_in:
        return True
    parent = managed_instance_parent(environ)
    if parent is None or not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        asked = libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False
    if not asked:
        return False
    _asked_in.append(os.getpid())
    if os.getppid() != parent:
        # It ended before the request was made: no signal will come.
        with contextlib.suppress(OSError):
            os.kill(os.getpid(), signal.SIGTERM)
    return True
