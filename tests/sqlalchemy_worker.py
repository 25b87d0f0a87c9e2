"""One process of the concurrent SQLAlchemy test: `sessions` ORM sessions at once on one pool.

Run as ``python -m tests.sqlalchemy_worker`` with ASYNCPOOL_TEST_DSN (never on the command line:
it holds a password), SQLA_MODE and SQLA_SESSIONS set; prints one JSON line with its results.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from typing import cast

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import async_sessionmaker

from asyncpool import Pool
from asyncpool.config import PreparedStatements
from asyncpool.integrations.sqlalchemy import create_async_engine
from tests.test_sqlalchemy import Item


async def main() -> dict[str, object]:
    mode = os.environ["SQLA_MODE"]
    sessions = int(os.environ["SQLA_SESSIONS"])
    tag = f"conc-{mode}-{os.getpid()}"
    errors: list[str] = []
    committed = 0
    async with Pool(os.environ["ASYNCPOOL_TEST_DSN"], name=tag,
                    prepared_statements=cast("PreparedStatements", mode),
                    max_size=5, acquire_timeout=60, telemetry=False) as pool:
        engine = create_async_engine(pool)
        Session = async_sessionmaker(engine, expire_on_commit=False)
        start = asyncio.Event()

        async def one(i: int) -> None:
            nonlocal committed
            await start.wait()
            try:
                async with Session() as session:
                    item = Item(name=f"{tag}-{i}", data={"i": i})
                    session.add(item)
                    await session.flush()
                    found = await session.scalar(sa.select(Item.data).where(Item.id == item.id))
                    assert found == {"i": i}, found
                    if i % 5 == 0:
                        await session.rollback()
                    else:
                        await session.commit()
                        committed += 1
            except Exception as exc:
                errors.append(f"{type(exc).__name__}: {exc}")

        tasks = [asyncio.create_task(one(i)) for i in range(sessions)]
        await asyncio.sleep(0.05)
        start.set()
        await asyncio.gather(*tasks)
        async with Session() as session:
            stored = await session.scalar(
                sa.select(sa.func.count()).select_from(Item).where(Item.name.like(f"{tag}-%")))
        stats = pool.stats()
        await engine.dispose()
        return {"errors": errors[:5], "error_count": len(errors), "committed": committed,
                "stored": stored, "in_use": stats.in_use, "closed_total": stats.closed_total,
                "size": stats.size}


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main())))
    sys.exit(0)
