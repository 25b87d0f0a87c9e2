"""Exit 1 if any PostgreSQL or PgBouncer started by the asyncpool test harness is still running."""

from __future__ import annotations

import sys

from asyncpool.testing.leftovers import leftover_servers

left = leftover_servers(everyone=True)
for pid, cmd in left:
    print(f"left running: pid {pid}: {cmd}")  # noqa: T201
print(f"harness servers left running: {len(left)}")  # noqa: T201
sys.exit(1 if left else 0)
