"""Exit 1 if any PostgreSQL or PgBouncer started by the asyncpool test harness is still running."""

from __future__ import annotations

import sys

from asyncpool.testing.leftovers import leftover_servers

left = leftover_servers(everyone=True)
for pid, cmd in left:
    print(f"left running: pid {pid}: {cmd}")
print(f"harness servers left running: {len(left)}")
sys.exit(1 if left else 0)
