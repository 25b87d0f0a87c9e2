"""A process holding a pool, driven by JSON lines on stdin, so a test can SIGSTOP and SIGCONT it.

Freezing a whole process stops its event loop and timers as a Lambda freeze does, which the
test process cannot do to itself. Commands: ``open`` (dsn, options), ``write`` (table, id:
insert in one transaction), ``stats``, ``close``. Each gets one JSON line back.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import sys
from typing import Any

import asyncpool


async def _write(pool: asyncpool.Pool, table: str, ident: int) -> dict[str, Any]:
    sent_commit = False
    try:
        async with pool.transaction() as conn:
            await conn.execute(f"INSERT INTO {table} (id) VALUES ($1)", ident)
            sent_commit = True
    except Exception as exc:
        return {"outcome": "ambiguous" if sent_commit else "failed", "error": repr(exc)}
    return {"outcome": "committed"}


async def main() -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    pool: asyncpool.Pool | None = None
    while line := await reader.readline():
        command = json.loads(line)
        op = command["op"]
        reply: dict[str, Any]
        if op == "open":
            pool = await asyncpool.create_pool(command["dsn"], **command["options"])
            reply = {"ok": True}
        elif op == "write":
            assert pool is not None
            reply = await _write(pool, command["table"], command["id"])
        elif op == "stats":
            assert pool is not None
            reply = dataclasses.asdict(pool.stats())
        else:
            if pool is not None:
                await pool.close()
            reply = {"ok": True}
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()
        if op == "close":
            return


if __name__ == "__main__":
    asyncio.run(main())
