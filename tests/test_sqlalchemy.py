"""SQLAlchemy's async engine on asyncpool, through real PgBouncers: the ORM, the pool's statement
modes, connections given back and discarded, codecs, errors, leaks."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

pytest.importorskip("sqlalchemy")

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from asyncpool import Pool
from asyncpool.integrations.sqlalchemy import create_async_engine
from asyncpool.testing import PgBouncerServer, PostgresServer

#: (PgBouncer, statement mode) pairs that must work: 1.18 has no prepared statements.
MODES = [("legacy", "off"), ("legacy", "unnamed"), ("current", "on"), ("current", "unnamed")]


class Base(DeclarativeBase):
    pass


class Item(Base):
    __tablename__ = "sqla_items"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(sa.String(50))
    data: Mapped[dict[str, Any] | None] = mapped_column(sa.JSON, nullable=True)
    tags: Mapped[dict[str, Any] | None] = mapped_column(sa.dialects.postgresql.JSONB,
                                                        nullable=True)


@pytest.fixture(scope="module")
async def schema(postgres: PostgresServer) -> None:
    async with Pool(postgres.dsn(), name="sqla-schema", max_size=1, telemetry=False) as pool:
        engine = create_async_engine(pool)
        async with engine.begin() as conn:
            await conn.run_sync(Base.metadata.drop_all)
            await conn.run_sync(Base.metadata.create_all)
        await engine.dispose()


def _pooler(request: pytest.FixtureRequest, name: str) -> PgBouncerServer:
    server: PgBouncerServer = getattr(request.getfixturevalue("stack"), name)
    return server


@pytest.fixture(params=MODES, ids=[f"{'1.18' if p == 'legacy' else 'current'}-{m}"
                                   for p, m in MODES])
async def pool(request: pytest.FixtureRequest, schema: None) -> AsyncIterator[Pool]:
    which, mode = request.param
    server = _pooler(request, which)
    async with Pool(server.dsn(), name=f"sqla-{which}-{mode}", prepared_statements=mode,
                    max_size=5, acquire_timeout=10, telemetry=False) as p:
        yield p


async def _settled(pool: Pool, timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while pool.stats().in_use or pool.stats().waiting:
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"the pool did not settle: {pool.stats()}")
        await asyncio.sleep(0.02)


async def test_orm_insert_query_commit_rollback(pool: Pool) -> None:
    engine = create_async_engine(pool)
    Session = async_sessionmaker(engine, expire_on_commit=False)
    prefix = f"crud-{pool.name}-"
    async with Session() as session, session.begin():
        session.add_all([Item(name=f"{prefix}{i}", data={"i": i}, tags={"t": [i]})
                         for i in range(5)])
    async with Session() as session:
        rows = (await session.scalars(
            sa.select(Item).where(Item.name.like(f"{prefix}%")).order_by(Item.id))).all()
        assert [r.data for r in rows] == [{"i": i} for i in range(5)]
        assert [r.tags for r in rows] == [{"t": [i]} for i in range(5)]
        rows[0].name = f"{prefix}renamed"
        await session.rollback()
        rows[1].name = f"{prefix}committed"
        await session.commit()
    async with Session() as session:
        names = set((await session.scalars(
            sa.select(Item.name).where(Item.name.like(f"{prefix}%")))).all())
        assert f"{prefix}committed" in names
        assert f"{prefix}renamed" not in names
        result = await session.execute(
            sa.update(Item).where(Item.name.like(f"{prefix}%")).values(data=None))
        assert result.rowcount == 5  # type: ignore[attr-defined]
        await session.commit()
    await _settled(pool)
    stats = pool.stats()
    assert stats.in_use == 0
    assert stats.closed_total == 0, "a connection SQLAlchemy gave back was closed"
    await engine.dispose()
