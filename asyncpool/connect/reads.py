"""How much a pool connection's plain socket asks for per ``recv()``.

asyncio's socket transport reads with ``sock.recv(max_size)``, 256 KiB by default: CPython
allocates the whole size for each read and then shrinks it to what arrived (a few hundred bytes
for most replies). glibc serves an allocation that large with ``mmap`` unless its dynamic
threshold happens to have been raised earlier in the process (it depends on what the process
allocated and freed before: python/cpython#85451), and then every read costs ``mmap``,
``mremap`` and ``munmap`` around the ``recvfrom``, and a page fault (and ``munmap`` in a
process with more than one thread also flushes the other threads' CPUs' address caches: not
measured separately here). Measured on this project's machine, raw asyncpg: 245 -> 167 µs of
client CPU per query with reads capped (benchmarks/README.md). Below the threshold (128 KiB
unless lowered) reads come from the heap, with no system call.

TLS connections are left alone: asyncio's SSL protocol reads the socket into a buffer it keeps
and decrypts with ``SSLObject.read(256 KiB)``, which allocates that size too, but the second
call of each read finds nothing, and freeing its whole 256 KiB block raises glibc's threshold at
the first reply: measured (``strace -f -c``, 1,000 and 3,000 queries, raw asyncpg over TLS to
PostgreSQL), no memory system call per query with or without a cap, and the same client CPU.
uvloop's transports read into their own buffer: not touched either.
"""

from __future__ import annotations

from asyncio import selector_events
from typing import Any

#: Bytes asked for per ``recv()`` on a pool connection's plain socket: below glibc's default
#: mmap threshold (128 KiB) with room for the bytes object's header. A reply larger than this
#: takes more reads, each of which asyncpg's protocol buffers as before.
READ_SIZE = 64 * 1024

# asyncio's plain socket transport (3.11-3.13); None if a later asyncio renames it.
_PLAIN_SOCKET: type[Any] | None = getattr(selector_events, "_SelectorSocketTransport", None)


def cap_reads(transport: Any) -> bool:
    """Make asyncio's plain socket transport under `transport` (the transport itself, or the one
    asyncpool's transport views stand in front of: their ``real``) read at most `READ_SIZE` per
    ``recv()``. True if it did; any other transport is left as it is."""
    for _ in range(4):  # GuardedTransport, WireTransport: views over one another
        inner = getattr(transport, "real", None)
        if inner is None:
            break
        transport = inner
    if _PLAIN_SOCKET is None or not isinstance(transport, _PLAIN_SOCKET):
        return False
    transport.max_size = min(transport.max_size, READ_SIZE)
    return True
