"""A FastAPI app with SQLAlchemy's ORM on asyncpool, served on Lambda through Mangum.

One pool per execution environment, created at import and kept across invocations (Mangum runs
the ASGI lifespan around every invocation; `pool_lifespan` keeps the pool open through it and
closes it on SIGTERM). SQLAlchemy keeps no pool of its own: each request's session borrows the
pool's connection and gives it back when the session closes. `LambdaDeadline` ends a request
just before the Lambda timeout, its session rolled back.

Configure with ASYNCPOOL_DSN (and any other ASYNCPOOL_* variable, e.g.
ASYNCPOOL_PREPARED_STATEMENTS=on behind PgBouncer >= 1.21). Create the table once with
``python -c "import asyncio, notes_app; asyncio.run(notes_app.create_tables())"`` (or your
migrations); try it with run_locally.py, or serve it with ``uvicorn notes_app:app``. No database
at hand? ``asyncpool local-pgbouncer`` runs PostgreSQL and PgBouncer until Ctrl-C and writes
ASYNCPOOL_DSN to ``.env.asyncpool``; load it first with ``set -a; . ./.env.asyncpool; set +a``
(docs/cli.md).
"""

# No `from __future__ import annotations`: FastAPI and SQLAlchemy read these annotations at runtime.

from collections.abc import AsyncIterator
from typing import Annotated, Any

import sqlalchemy as sa
from fastapi import Depends, FastAPI, HTTPException
from mangum import Mangum
from pydantic import BaseModel
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from asyncpool import Pool
from asyncpool.integrations.aws_lambda import lambda_config
from asyncpool.integrations.fastapi import LambdaDeadline, pool_lifespan
from asyncpool.integrations.sqlalchemy import create_async_engine

pool = Pool(config=lambda_config(function_timeout=10, name="notes-api"))
engine = create_async_engine(pool)
Session = async_sessionmaker(engine, expire_on_commit=False)


class Base(DeclarativeBase):
    pass


class Note(Base):
    __tablename__ = "example_notes"

    id: Mapped[int] = mapped_column(primary_key=True)
    title: Mapped[str] = mapped_column(sa.String(200))
    tags: Mapped[list[str]] = mapped_column(JSONB, default=list)


class NoteIn(BaseModel):
    title: str
    tags: list[str] = []


async def create_tables() -> None:
    """Create the example's table (run once, outside the handler). Through a pool of its own,
    closed at the end: the app's `pool` is left to the app's lifespan, so a test can call this
    before (or within) ``with TestClient(app)``."""
    async with Pool(config=lambda_config(name="notes-setup", max_size=1)) as setup_pool:
        setup_engine = create_async_engine(setup_pool)
        async with setup_engine.begin() as conn:
            await conn.run_sync(Base.metadata.create_all)
        await setup_engine.dispose()


async def get_session() -> AsyncIterator[AsyncSession]:
    """One session per request: its connection goes back to the pool when the endpoint returns
    (``scope="function"``: not after the response is sent), and what the endpoint did not commit
    is rolled back."""
    async with Session() as session:
        yield session


SessionDep = Annotated[AsyncSession, Depends(get_session, scope="function")]

app = FastAPI(lifespan=pool_lifespan(pool))


@app.post("/notes", status_code=201)
async def add_note(note: NoteIn, session: SessionDep) -> dict[str, Any]:
    row = Note(title=note.title, tags=note.tags)
    session.add(row)
    await session.commit()
    return {"id": row.id, "title": row.title, "tags": row.tags}


@app.get("/notes/{note_id}")
async def read_note(note_id: int, session: SessionDep) -> dict[str, Any]:
    row = await session.get(Note, note_id)
    if row is None:
        raise HTTPException(status_code=404, detail="no such note")
    return {"id": row.id, "title": row.title, "tags": row.tags}


@app.get("/notes")
async def find_notes(session: SessionDep, tag: str) -> list[dict[str, Any]]:
    rows = await session.scalars(
        sa.select(Note).where(Note.tags.contains([tag])).order_by(Note.id).limit(100))
    return [{"id": r.id, "title": r.title, "tags": r.tags} for r in rows]


# A request still running 0.5 s before the Lambda timeout ends with a 504, its session's
# transaction rolled back and its connection back in the pool (not killed with the environment).
handler = Mangum(LambdaDeadline(app))
