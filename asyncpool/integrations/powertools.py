"""A Powertools for AWS Lambda middleware that hands each invocation a pooled connection.

::

    from aws_lambda_powertools import Logger, Metrics

    pool = asyncpool.Pool(config=lambda_config(function_timeout=10))

    @logger.inject_lambda_context
    @metrics.log_metrics
    @pooled_connection(pool)
    async def handler(event, context):
        conn = current_connection()          # current_connection(pool): typed by its rows
        return {"statusCode": 200, "body": str(await conn.fetchval("SELECT 1"))}

Powertools middlewares are synchronous, so this one drives the invocation on a
`asyncpool.integrations.lambda_runner.LambdaRunner` (one loop for the environment's life) and must sit
innermost, directly on the ``async def``: a synchronous decorator below it gets the coroutine, not
the invocation's work. Powertools' Tracer and Metrics decorators there are refused (a TypeError at
import): their subsegment, or their flush, would end before the work began.

The connection is released in a ``finally`` whatever the handler does: returns, raises, is
cancelled at the time limit, or keeps a reference (which then refuses use).
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Coroutine, Mapping
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any, Concatenate, ParamSpec, Protocol, TypeVar, cast, overload

from asyncpool.errors import PoolError, missing_dependency
from asyncpool.integrations.lambda_runner import LambdaRunner, get_runner
from asyncpool.pool import Pool
from asyncpool.pool.connection import PooledConnection

if TYPE_CHECKING:
    import asyncpg

    from asyncpool.pool.connection import RecordT

try:
    from aws_lambda_powertools.middleware_factory import lambda_handler_decorator
except ModuleNotFoundError as exc:
    raise missing_dependency(exc, __name__, "'asyncpool-pg[lambda]'") from exc

logger: logging.Logger = logging.getLogger("asyncpool.integrations.powertools")

#: The invocation's pool and the connection taken from it.
_connection: ContextVar[tuple[Pool[Any], PooledConnection[Any]] | None] = ContextVar(
    "asyncpool_invocation_connection", default=None
)


@overload
def current_connection() -> PooledConnection[asyncpg.Record]: ...
@overload
def current_connection(pool: Pool[RecordT]) -> PooledConnection[RecordT]: ...
def current_connection(pool: Pool[Any] | None = None) -> PooledConnection[Any]:
    """The connection `pooled_connection` took for the invocation being served.

    Typed ``PooledConnection[asyncpg.Record]``; given the decorator's `pool`, typed by its
    rows (``current_connection(pool)`` of a ``Pool[Row]`` is a ``PooledConnection[Row]``),
    and checked to be that pool's (`PoolError` otherwise)."""
    held = _connection.get()
    if held is None:
        raise PoolError(
            "no pooled connection here: current_connection() works inside a handler decorated "
            "with @pooled_connection(pool)"
        )
    served, conn = held
    if pool is not None and pool is not served:
        if not isinstance(pool, Pool):
            raise TypeError(
                f"current_connection() takes an asyncpool.Pool, not {type(pool).__name__}")
        raise PoolError(
            f"current_connection(pool): pool {pool.name!r} is not the one this handler is "
            f"decorated with (@pooled_connection of pool {served.name!r}), whose connection "
            "the invocation holds")
    return conn


P = ParamSpec("P")
T = TypeVar("T")
# The handler's own event and context types, kept (not widened to Any).
E = TypeVar("E")
C = TypeVar("C")


class HandlerDecorator(Protocol):
    """What `pooled_connection` returns: a handler ``(event, context, ...)``, asynchronous or
    not, becomes the synchronous handler Lambda calls, returning what it returns."""

    @overload
    def __call__(self, handler: Callable[Concatenate[E, C, P], Coroutine[Any, Any, T]], /
                 ) -> Callable[Concatenate[E, C, P], T]: ...

    @overload
    def __call__(self, handler: Callable[Concatenate[E, C, P], T], /
                 ) -> Callable[Concatenate[E, C, P], T]: ...


def pooled_connection(
    pool: Pool,
    *,
    runner: LambdaRunner | None = None,
    transaction: bool = False,
    check_each_invocation: bool = True,
) -> HandlerDecorator:
    """Middleware: each invocation gets a connection from `pool` (see `current_connection`).

    The pool is opened on the first invocation, without connecting up front, so a database that
    is down fails that invocation only. With `transaction`, the handler runs in a transaction
    committed when it returns and rolled back when it raises. `runner` defaults to the process's
    `get_runner()`; the pool is attached to it (`LambdaRunner.attach`, with
    `check_each_invocation`): its connections are checked at every invocation boundary.
    """
    if not isinstance(pool, Pool):
        raise TypeError(f"pooled_connection() takes an asyncpool.Pool, not {type(pool).__name__}")
    (runner or get_runner()).attach(pool, check_each_invocation=check_each_invocation)
    middleware = _pooled_connection(pool=pool, runner=runner, transaction=transaction)

    def decorate(handler: Callable[..., Any]) -> Callable[..., Any]:
        _refuse_timing_decorators_below(handler)
        wrapped: Callable[..., Any] = middleware(handler)
        return wrapped

    return cast(HandlerDecorator, decorate)


# Where Powertools defines the decorators that time or flush around the call they wrap
# (Tracer.capture_lambda_handler, Metrics.log_metrics and its providers'): below
# pooled_connection they would wrap the creation of a coroutine, not the invocation.
_AROUND_THE_CALL = ("aws_lambda_powertools.tracing.", "aws_lambda_powertools.metrics.")


def _refuse_timing_decorators_below(handler: Callable[..., Any]) -> None:
    """Raise TypeError if Powertools' Tracer or Metrics decorates the ``async def`` below us.

    Other synchronous decorators there (Logger's, the parser's) act before the call and keep
    working, so only these are refused. Runs once, when the handler is decorated.
    """
    offender = None
    layer: Any = handler
    seen: set[int] = set()
    while not inspect.iscoroutinefunction(layer):
        module = getattr(layer, "__globals__", {}).get("__name__", "")
        if offender is None and module.startswith(_AROUND_THE_CALL):
            offender = layer
        seen.add(id(layer))
        layer = getattr(layer, "__wrapped__", None)
        if layer is None or id(layer) in seen:
            # A synchronous handler all the way down: every decorator sees the work. (Or a
            # `__wrapped__` that leads back to itself, where inspect.unwrap gives up too.)
            return
    if offender is not None:
        code = getattr(offender, "__code__", None)
        where = code.co_qualname.split(".<locals>")[0] if code is not None else repr(offender)
        name = getattr(handler, "__qualname__", None) or repr(handler)
        raise TypeError(
            f"{where} is below @pooled_connection on {name}: it would see only the coroutine, "
            "not the invocation (its subsegment or metrics flush ends before the handler runs). "
            "Put @pooled_connection directly on the async def and Powertools' decorators above it."
        )


def _serve_pooled(
    handler: Callable[..., Any],
    event: Any,
    context: Any,
    *,
    pool: Pool,
    runner: LambdaRunner | None,
    transaction: bool,
    **handler_kwargs: Any,
) -> Any:
    async def serve() -> Any:
        # No-op after the first invocation.
        await pool.open(wait=False)
        checkout = pool.transaction() if transaction else pool.acquire()
        try:
            async with checkout as conn:
                token = _connection.set((pool, conn))
                try:
                    result = handler(event, context, **handler_kwargs)
                    if inspect.isawaitable(result):
                        result = await result
                finally:
                    _connection.reset(token)
                if transaction and is_error_response(result):
                    raise _RollBack
        except _RollBack:
            pass
        _report_still_held(pool)
        return result

    return (runner or get_runner()).invoke(serve, context)


# Powertools names the middleware by this in its logs and, with POWERTOOLS_TRACE_MIDDLEWARES=true,
# in the X-Ray subsegment it opens around it ("## pooled_connection").
_serve_pooled.__qualname__ = "pooled_connection"
_pooled_connection = lambda_handler_decorator(_serve_pooled)


class _RollBack(Exception):
    """Ends the invocation's transaction block with a rollback, the response going out as it is."""


def is_error_response(result: object) -> bool:
    """Whether a handler's result is an HTTP error response (``statusCode`` 400 or more), as
    Powertools' event handlers return for the errors they turn into responses (a raised
    ``BadRequestError``, ``NotFoundError``, an ``exception_handler``'s answer): the work of
    such an invocation is rolled back, as it would be had the error reached the middleware."""
    if not isinstance(result, Mapping):
        return False
    status = result.get("statusCode")
    return isinstance(status, int) and not isinstance(status, bool) and status >= 400


def _report_still_held(pool: Pool) -> None:
    """An invocation is over: any connection still checked out was leaked by the handler."""
    held = pool.stats().in_use
    if held:
        config = pool.config
        if config.leak_timeout is None:
            what = "nothing frees them (leak_timeout=None)"
        elif config.leak_action == "log":
            what = "the invocation's end names them and leaves them (leak_action='log')"
        else:
            what = ("the invocation's end frees them: a task still holding one is given a "
                    "moment, then cancelled; a block no task runs (an async generator kept past "
                    "the invocation), or a connection acquired without `async with` and not "
                    "released, is closed")
        logger.warning(
            "pool %r: %d connection(s) still checked out after the invocation returned; %s. "
            "Release every connection the handler acquires.",
            pool.name,
            held,
            what,
            extra={"asyncpool_pool": pool.name, "asyncpool_in_use": held},
        )
