"""Report PostgreSQL / PgBouncer servers started by the asyncpool test harness that are still running.

`--save FILE` records the ones running now (before the suite); `--since FILE` then exits 1 if any
server not in that record is running (after the suite), so stale servers from an earlier, killed
run on the same machine neither hide nor fake a leak of this run.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from asyncpool.testing.leftovers import leftover_servers

parser = argparse.ArgumentParser()
parser.add_argument("--save", type=Path)
parser.add_argument("--since", type=Path)
args = parser.parse_args()

running = leftover_servers(everyone=True)
if args.save:
    args.save.write_text("".join(f"{pid}\n" for pid, _ in running))
    sys.exit(0)
before = set()
if args.since and args.since.exists():
    before = {int(line) for line in args.since.read_text().split()}
left = [(pid, cmd) for pid, cmd in running if pid not in before]
for pid, cmd in left:
    print(f"left running: pid {pid}: {cmd}")
if before & {pid for pid, _ in running}:
    print(f"(ignored {len(before & {pid for pid, _ in running})} that were running before the suite)")
print(f"harness servers left running: {len(left)}")
sys.exit(1 if left else 0)
