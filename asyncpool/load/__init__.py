"""The load engine behind `asyncpool demo` and `asyncpool bench`.

Simulated function instances, each with its own small pool, run in several OS processes (as
Lambda execution environments do) against PgBouncer or PostgreSQL. Not imported by
`import asyncpool`.
"""

from asyncpool.load.result import LoadResult, ServerUse
from asyncpool.load.runner import LoadError, LoadTarget, Progress, run_load
from asyncpool.load.spec import DEFAULT_QUERY, DRIVERS, LoadSpec, LoadSpecError

__all__ = [
    "DEFAULT_QUERY",
    "DRIVERS",
    "LoadError",
    "LoadResult",
    "LoadSpec",
    "LoadSpecError",
    "LoadTarget",
    "Progress",
    "ServerUse",
    "run_load",
]
