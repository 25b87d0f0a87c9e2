"""FastAPI: a dependency yielding a pooled connection, and a lifespan that survives Mangum.

::

    pool = asyncpool.Pool(config=lambda_config(function_timeout=10))
    app = FastAPI(lifespan=pool_lifespan(pool))
    Conn = Annotated[PooledConnection, Depends(pool_connection(pool), scope="function")]

    @app.get("/items/{item_id}")
    async def read_item(item_id: int, conn: Conn) -> dict[str, Any]:
        row = await conn.fetchrow("SELECT ...", item_id)
        if row is None:
            raise HTTPException(status_code=404)
        return dict(row)

    handler = Mangum(LambdaDeadline(app))

Mangum runs the ASGI lifespan, startup and shutdown, around every invocation; a lifespan that
opened and closed the pool would reconnect on every request. `pool_lifespan` keeps the pool open
across those cycles on Lambda and closes it when the environment shuts down. `LambdaDeadline`
ends a request `timeout_margin` seconds before the Lambda timeout with a 504, its connections
back in the pool, rather than letting Lambda kill the environment with them checked out.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import weakref
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from typing import Any, TypeVar

import asyncpg

from asyncpool.errors import PoolClosedError, PoolConfigError, missing_dependency
from asyncpool.integrations.aws_lambda import close_on_shutdown, running_on_lambda
from asyncpool.integrations.invocation import ColdStart, invocation_scope
from asyncpool.integrations.lambda_deadline import (
    TIMEOUT_MARGIN,
    HandlerTimeoutError,
    checked_margin,
    invocation_deadline,
    settle_timeout,
)
from asyncpool.pool import Pool
from asyncpool.pool.connection import PooledConnection
from asyncpool.pool.resets import settle
from asyncpool.pool.state import NEW

try:
    from starlette.requests import Request
    from starlette.types import ASGIApp, Message, Receive, Scope, Send
except ModuleNotFoundError as exc:
    raise missing_dependency(exc, __name__, "'asyncpool-pg[fastapi]'") from exc

logger: logging.Logger = logging.getLogger("asyncpool.integrations.fastapi")

Lifespan = Callable[[Any], AbstractAsyncContextManager[None]]

#: The pool's record class, kept on the connections the dependency yields. A TypeVar at run time
#: too: FastAPI reads the dependency's annotations.
RowT = TypeVar("RowT", bound=asyncpg.Record)


def pool_connection(
    pool: Pool[RowT], *, transaction: bool = False
) -> Callable[[Request], AsyncIterator[PooledConnection[RowT]]]:
    """A dependency yielding a connection from `pool`, released after the endpoint even if it
    raises. With `transaction`, the endpoint's work is committed when it returns and rolled back
    when it raises.

    Give it to FastAPI with ``Depends(pool_connection(pool), scope="function")``: with the
    default scope FastAPI ends the dependency after the response is sent, so a COMMIT that
    fails would reach the client as success, and the connection is held while the response is
    sent. With `transaction`, the first request refuses any other scope (`PoolConfigError`).
    A `StreamingResponse` takes its connection with the default scope instead (and opens its
    transaction in the body's generator): the request then gives the connection back even when
    its generator is never closed, as under a ``@app.middleware("http")`` once the client
    leaves (docs/serverless.md).

    Opens the pool on first use if no lifespan did (``Mangum(app, lifespan="off")``). Under
    Mangum, the request's Lambda invocation is stamped on asyncpool's logs and spans.
    """
    # The routes (by id: FastAPI's are unhashable, and live as long as the app) found to
    # give this dependency the function scope.
    scoped: set[int] = set()

    async def connection(request: Request) -> AsyncIterator[PooledConnection[RowT]]:
        if transaction:
            _check_scope(request, connection, scoped)
        await pool.open(wait=False)  # no-op once open
        await _after_pause(request, pool)
        checkout = pool.transaction() if transaction else pool.acquire()
        with _invocation_of(request, pool):
            async with checkout as conn:
                yield conn

    return connection


def _check_scope(request: Request, dependency: object, scoped: set[int]) -> None:
    """Refuse a transaction dependency that FastAPI would end after the response is sent (its
    default scope): a failed COMMIT would then reach the client as success."""
    route = request.scope.get("route")
    if id(route) in scoped:
        return
    dependant = getattr(route, "dependant", None)
    if dependant is None:
        return  # not FastAPI's routing (a Starlette app calling it directly): nothing to check
    overrides = getattr(getattr(request, "app", None), "dependency_overrides", None) or {}
    scopes = {getattr(d, "scope", None) for d in _uses(dependant, dependency, overrides)}
    if scopes and scopes != {"function"}:
        raise PoolConfigError(
            f"route {getattr(route, 'path', '?')!r}: pool_connection(pool, transaction=True) is "
            "used with FastAPI's default dependency scope, which commits after the response is "
            "sent: a COMMIT that fails would reach the client as success. Declare it as "
            "Depends(pool_connection(pool, transaction=True), scope=\"function\") (FastAPI "
            ">= 0.121)"
        )
    scoped.add(id(route))


def _uses(dependant: Any, dependency: object, overrides: Any) -> list[Any]:
    """Every place in `dependant`'s tree that calls `dependency`, itself or as the override
    (``app.dependency_overrides``) of what the tree names, whose scope FastAPI keeps."""
    found = []
    stack = list(getattr(dependant, "dependencies", ()))
    while stack:
        sub = stack.pop()
        call = getattr(sub, "call", None)
        if call is dependency or (call is not None and overrides.get(call) is dependency):
            found.append(sub)
        stack.extend(getattr(sub, "dependencies", ()))
    return found


# One per pool, so every dependency on a pool agrees which request was the environment's first.
_cold_starts: weakref.WeakKeyDictionary[Pool, ColdStart] = weakref.WeakKeyDictionary()
# The Lambda request each pool last served, to tell when a new invocation (after a pause) begins.
_last_request: weakref.WeakKeyDictionary[Pool, str] = weakref.WeakKeyDictionary()
# Its Lambda context, for the time left when the lifespan ends (`_settle`).
_last_context: weakref.WeakKeyDictionary[Pool, Any] = weakref.WeakKeyDictionary()
# Pools `pool_lifespan` checked (or opened) at this invocation's start, for `_after_pause`.
_checked_by_lifespan: weakref.WeakSet[Pool] = weakref.WeakSet()
#: How long `_settle` waits when no request of the invocation said how much time is left.
_UNKNOWN_TIME_WAIT = 1.0


async def _after_pause(request: Request, pool: Pool) -> None:
    """First use of `pool` in a new Lambda invocation: the environment may have been frozen, and
    its clock may not show it. Let the loop read what arrived meanwhile (a connection the pooler
    closed is then replaced without a round trip) and check every connection before its use."""
    context = request.scope.get("aws.context")
    request_id = getattr(context, "aws_request_id", None)
    if request_id is None or _last_request.get(pool) == request_id:
        return
    _last_context[pool] = context
    _last_request[pool] = request_id
    if pool in _checked_by_lifespan:
        _checked_by_lifespan.discard(pool)
        return
    await _thawed(pool)


async def _settle(pool: Pool) -> None:
    """At the end of a Lambda invocation (Mangum's lifespan shutdown, before the response goes):
    let resets holders left running end, within the invocation's time (`resets.settle`)."""
    # (LambdaRunner's default margin is left for the response)
    _checked_by_lifespan.discard(pool)  # (an invocation that did not use it)
    timeout = settle_timeout(_last_context.pop(pool, None), TIMEOUT_MARGIN, _UNKNOWN_TIME_WAIT)
    await settle([pool._slots], timeout, closes_within=TIMEOUT_MARGIN / 2)


async def _thawed(pool: Pool) -> None:
    """Let the loop read what arrived during a pause (a connection the pooler closed is then
    replaced without a round trip) and check every connection before its next use."""
    for _ in range(3):
        await asyncio.sleep(0)
    pool.mark_stale()


def _invocation_of(request: Request, pool: Pool) -> contextlib.AbstractContextManager[object]:
    context = request.scope.get("aws.context")
    if context is None:
        return contextlib.nullcontext()
    cold_start = _cold_starts.setdefault(pool, ColdStart())
    return invocation_scope(context, cold_start)


def pool_lifespan(pool: Pool, *, keep_open: bool | None = None) -> Lifespan:
    """A FastAPI/Starlette lifespan that opens `pool` at startup.

    `keep_open` (default: True on Lambda, detected by ``AWS_LAMBDA_FUNCTION_NAME``) leaves the
    pool open at lifespan shutdown, because Mangum shuts the lifespan down after every
    invocation; the pool is instead closed on SIGTERM or at interpreter exit
    (`close_on_shutdown`). Pass ``keep_open=True`` to run Mangum outside Lambda (local scripts,
    tests). Otherwise (uvicorn and other servers) the pool is closed at shutdown.

    On Lambda the pool is opened without connecting: the first request connects, so a database
    that is down fails that request rather than every lifespan startup. Each later startup
    (Mangum starts the lifespan for every invocation) marks the pool's connections to be
    checked before their next use, as `pool_connection` does: the environment may have been
    frozen meanwhile, and a connection the pooler dropped is replaced, not handed out.

    Testing: ``with TestClient(app) as client:`` runs this lifespan, and every request of the
    block, on one event loop; once the block ends the pool is closed, so keep one client for the
    test session or build the app per client (docs/serverless.md, "Testing a FastAPI app").
    """
    keep = running_on_lambda() if keep_open is None else keep_open
    hooked = False
    closed_here = False  # by an earlier run of this lifespan, not by code outside the app

    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        nonlocal hooked, closed_here
        if not keep:
            if pool.closed and not closed_here:
                raise PoolClosedError(
                    f"pool {pool.name!r} was closed before this app's lifespan started, by code "
                    "outside the app (`async with pool:` or `pool.close()`, such as a test's "
                    "table set-up), and a pool cannot be reopened: give such work a pool of its "
                    "own and leave the app's pool to its lifespan"
                )
            if pool.closed:
                raise PoolClosedError(
                    f"pool {pool.name!r} was closed when this app's previous lifespan ended (a "
                    "previous `with TestClient(app)` block, or a previous invocation of Mangum "
                    "outside Lambda, say), and a pool cannot be reopened: keep one TestClient "
                    "for the test session (a session-scoped fixture), build the app and its "
                    "pool anew for each client, or, for Mangum outside Lambda, pass "
                    "pool_lifespan(pool, keep_open=True)"
                )
            try:
                async with pool:
                    yield
            finally:
                closed_here = True
            return
        if hooked:
            # A later start: Mangum runs the lifespan around each invocation, and the
            # environment may have been frozen since the last one (its clock may not show it).
            # Checked here, whatever uses the pool in the invocation (SQLAlchemy sessions too).
            await _thawed(pool)
        if hooked or pool._slots.state is NEW:
            # Checked now, or opened now: the invocation's first `pool_connection` need not
            # check again (that gave up the refill this open(wait=False) had just begun).
            _checked_by_lifespan.add(pool)
        await pool.open(wait=False)
        if not hooked:
            close_on_shutdown(pool, asyncio.get_running_loop())
            hooked = True
        yield
        # The shutdown Mangum runs after each invocation, before the response goes: resets that
        # holders left early (a streaming response cut short) end here, not after the thaw.
        await _settle(pool)

    return lifespan


class LambdaDeadline:
    """ASGI middleware: under Mangum, end each request `timeout_margin` seconds (default 0.5)
    before the Lambda timeout, as `LambdaRunner` ends an invocation::

        handler = Mangum(LambdaDeadline(app))    # or app.add_middleware(LambdaDeadline)

    Lambda kills an environment whose invocation runs past its timeout: connections still
    checked out die with it, mid-statement or mid-transaction, and the server runs the
    statement on. Here the request is cancelled in time instead (the Lambda context is
    Mangum's ``aws.context`` scope entry): its connections are rolled back, cancelled on the
    server if a statement runs, and returned (tasks it started and left holding one too)
    before the invocation ends, and the client gets ``504 Gateway Timeout`` whose ``detail``
    says the deadline margin was reached.

    Mangum sends nothing before the app is done, so the response is held here until complete:
    a streaming response cut short also becomes the 504, not a truncated 200. Work the app does
    after its response is complete (Starlette's background tasks) is cut short the same way,
    and the response stands. Requests without a Lambda context (uvicorn) pass through as is.
    """

    def __init__(self, app: ASGIApp, *, timeout_margin: float = TIMEOUT_MARGIN) -> None:
        self.app: ASGIApp = app
        self.timeout_margin: float = checked_margin(timeout_margin)
        self._cold_start = ColdStart()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        context = scope.get("aws.context") if scope["type"] == "http" else None
        if getattr(context, "get_remaining_time_in_millis", None) is None:
            await self.app(scope, receive, send)
            return
        response = _HeldResponse(send)
        with invocation_scope(context, self._cold_start) as invocation:
            try:
                async with invocation_deadline(context, self.timeout_margin,
                                               invocation.request_id):
                    await self.app(scope, receive, response.hold)
            except HandlerTimeoutError as exc:
                if response.complete:
                    logger.warning("%s (after its response was complete: the response stands)",
                                   exc)
                    return
                logger.warning("%s", exc)
                await response.gateway_timeout(
                    f"the Lambda deadline margin was reached: {scope.get('method', '')} "
                    f"{scope.get('path', '')} was cut short {self.timeout_margin:g}s before "
                    "the function timeout, its database work rolled back")


class _HeldResponse:
    """The app's response messages, passed on once the body is complete."""

    __slots__ = ("_held", "_send", "complete")

    def __init__(self, send: Send) -> None:
        self._send = send
        self._held: list[Message] = []
        self.complete = False

    async def hold(self, message: Message) -> None:
        if self.complete:
            await self._send(message)
            return
        self._held.append(message)
        if message["type"] == "http.response.body" and not message.get("more_body", False):
            self.complete = True
            held, self._held = self._held, []
            for each in held:
                await self._send(each)

    async def gateway_timeout(self, detail: str) -> None:
        body = json.dumps({"detail": detail}).encode()
        await self._send({"type": "http.response.start", "status": 504, "headers": [
            (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await self._send({"type": "http.response.body", "body": body})
