"""The asyncpg connection class of the one-round-trip path: reuses described statements safely."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import asyncpg
from asyncpg import exceptions as pg_exceptions
from asyncpg.protocol import protocol as asyncpg_protocol

from asyncpool.errors import StaleStatementError
from asyncpool.unnamed.check import CHANGED, FAILED, MATCH, REJECTED, UNREADABLE, Check
from asyncpool.unnamed.convert import Conversion, conversion
from asyncpool.unnamed.entries import (
    CacheTotals,
    DescribeCacheStats,
    Description,
    DescriptionCache,
    Key,
)
from asyncpool.unnamed.fits import fits
from asyncpool.unnamed.messages import (
    DATA_ROW,
    PARSE_COMPLETE_MESSAGE,
    SYNC_MESSAGE,
    Column,
    bind_result_formats,
    row_columns,
    row_formats,
    rows_in_formats,
)
from asyncpool.unnamed.prepared import DISCARD as _DISCARD
from asyncpool.unnamed.prepared import MANY_ROWS as _MANY_ROWS
from asyncpool.unnamed.prepared import PLAIN as _PLAIN
from asyncpool.unnamed.prepared import ROWS as _ROWS
from asyncpool.unnamed.prepared import CheckedPreparedStatement
from asyncpool.unnamed.support import unsupported_transport_error
from asyncpool.unnamed.wire import InterceptingLoop, WireTransport, drive

logger: logging.Logger = logging.getLogger("asyncpool.unnamed")

RETIRE_REASON = "unreadable or undecodable reply to a reused statement"
UNSYNCED_REASON = "no reply to the Sync sent after a refused argument"
#: What `_decode_again` gives for rows it does not decode again (a prepared ``fetchmany``).
UNDECODED: Any = object()


@dataclass(frozen=True, slots=True)
class Policy:
    pool_name: str
    max_size: int
    ttl: float | None
    totals: CacheTotals


# The private methods this class overrides and calls are not in asyncpg's types (asyncpg-stubs).
_AsyncpgConnection: Any = asyncpg.Connection


class DescribeCacheConnection(_AsyncpgConnection):  # type: ignore[misc]
    """Keeps each described unnamed statement and reuses it in one round trip.

    A reuse sends Parse (with the cached parameter types) + Describe + Bind + Execute + Sync in
    one write. The reply's description is read before asyncpg decodes a row; when it differs,
    asyncpg's call completes without rows and the recorded rows are decoded again with the new
    description (after introspecting any type the connection has not seen). A statement the
    server refuses before running it is described afresh and run by asyncpg's own path, outside
    a transaction block.
    """

    # The pool's policy comes with the loop it opened the connection with, not with the class:
    # one class for every pool of the process (CPython's attribute caches and specialized
    # bytecode are keyed by class; hundreds of classes made asyncpg's code take the slow lookups).
    __slots__ = ("_call", "_describe_cache", "_enums", "_policy", "_wire", "retire_reason")

    def __init__(self, protocol: Any, transport: Any, loop: Any, *args: Any,
                 **kwargs: Any) -> None:
        policy = None
        if isinstance(loop, InterceptingLoop):
            policy, loop = loop.policy, loop.real
        super().__init__(protocol, transport, loop, *args, **kwargs)
        if policy is None or not isinstance(transport, WireTransport):
            transport.abort()
            raise unsupported_transport_error(policy.pool_name if policy else None, transport)
        self._policy: Policy = policy
        self.retire_reason: str | None = None
        self._call = _ROWS
        self._describe_cache = DescriptionCache(
            self._policy.max_size, self._policy.ttl, self._policy.totals
        )
        self._wire = transport.wire
        self._wire.on_verdict = self._on_verdict
        self._enums: set[int] = set()  # OIDs of the enum types this connection introspected

    def describe_cache_stats(self) -> DescribeCacheStats:
        """Hits, misses, changed descriptions and evictions of this connection's cache."""
        return self._describe_cache.stats()

    # -- asyncpg hooks -------------------------------------------------------------------------

    async def _executemany(self, query: str, args: Any, timeout: float | None,
                           return_rows: bool = False, record_class: type | None = None) -> Any:
        # fetchmany(): its rows are not kept to decode again, so it takes asyncpg's own path.
        self._call = _PLAIN if return_rows else _DISCARD
        try:
            return await super()._executemany(query, args, timeout, return_rows=return_rows,
                                              record_class=record_class)
        finally:
            self._call = _ROWS

    async def _do_execute(self, query: str, executor: Any, timeout: float | None,
                          retry: bool = True, *, ignore_custom_codec: bool = False,
                          record_class: type | None = None) -> tuple[Any, Any]:
        call, self._call = self._call, _ROWS
        key: Key = (query, record_class or self._protocol.get_record_class(), ignore_custom_codec)
        if call != _PLAIN:
            entry = self._describe_cache.get(key)
            # While asyncpg still waits for a cancelled query to finish, take its own path.
            # executemany sends many Binds: an enum parameter sent as text would need each one
            # rewritten, so such a statement takes asyncpg's own path there.
            # In a transaction block, a statement whose Bind names each result column's
            # format (or may: not bound since it was decoded again from a changed reply) is
            # described afresh too: once the number of its columns changed (a column added
            # under SELECT *) the server refuses that Bind, and the refusal would abort the
            # transaction; the describe's locks keep the new description true.
            if (entry is not None and not self._protocol._is_cancelling()
                    and not (call == _DISCARD and entry.text_params)
                    and not (entry.per_column_formats is not False
                             and self._protocol.is_in_transaction())):
                if entry.guards is None or fits(entry.guards, executor, call == _DISCARD):
                    check = Check(entry, key, replay=call == _ROWS)
                    return await self._reuse(check, executor, timeout, retry)
                # An argument the cached type would convert with a loss (`fits`): described
                # afresh, as without a cache (and, as after any fresh description, not again).
                self._describe_cache.count_miss()
                return await self._describe_and_run(key, executor, timeout, False, call)
        return await self._describe_and_run(key, executor, timeout, retry, call)

    async def _prepare(self, query: str, *, name: str | None = None,
                       timeout: float | None = None, use_cache: bool = False,
                       record_class: type | None = None) -> Any:
        # A named statement stays asyncpg's (the server keeps its plan; after a schema change
        # it fails with InvalidCachedStatementError). An unnamed one is described afresh, as
        # asyncpg does, and its executions are checked reuses (its cursors describe afresh:
        # `CheckedPreparedStatement.cursor`).
        if name is not None or use_cache:
            return await super()._prepare(query, name=name, timeout=timeout,
                                          use_cache=use_cache, record_class=record_class)
        self._check_open()
        key: Key = (query, record_class or self._protocol.get_record_class(), False)
        generation = self._describe_cache.generation()
        statement = await self._get_statement(query, timeout, named=False, use_cache=False,
                                              record_class=record_class)
        return CheckedPreparedStatement(self, query, statement,
                                        self._description_of(key, statement, generation))

    async def _get_statement(self, query: str, timeout: float | None, *,
                             named: str | bool | None = False, use_cache: bool = True,
                             ignore_custom_codec: bool = False,
                             record_class: type | None = None) -> Any:
        # Cursors ask for a name (``named=True``, asyncpg's cursor.py). Behind PgBouncer >= 1.21
        # a name maps to the statement of that text already prepared on the server connection,
        # which after a result-changing migration fails with InvalidCachedStatementError until
        # PgBouncer closes it. The unnamed statement is described afresh everywhere; the
        # cursor's portal outlives it, and its transaction's locks keep the description true.
        if named is True:
            named = False
        return await super()._get_statement(query, timeout, named=named, use_cache=use_cache,
                                            ignore_custom_codec=ignore_custom_codec,
                                            record_class=record_class)

    async def _introspect_types(self, typeoids: Any, timeout: float | None) -> Any:
        types, statement = await super()._introspect_types(typeoids, timeout)
        self._enums.update(t["oid"] for t in types if t["kind"] == b"e")
        return types, statement

    def _drop_local_statement_cache(self) -> None:
        # asyncpg calls this when codecs or types change (set_type_codec, reload_schema_state).
        super()._drop_local_statement_cache()
        self._describe_cache.clear()

    # -- describing, reusing -------------------------------------------------------------------

    async def _describe_and_run(self, key: Key, executor: Any, timeout: float | None,
                                retry: bool, call: int) -> tuple[Any, Any]:
        """Describe (one round trip, plus asyncpg's introspection of types it has not seen),
        keep the description, then run the call as a reuse: the reply's description is checked
        like any other, so a change between describing and running cannot be misdecoded (as it
        can on asyncpg's own path, when introspection ends the describe's transaction)."""
        query, record_class, ignore_custom_codec = key
        if call == _PLAIN:
            result: tuple[Any, Any] = await super()._do_execute(
                query, executor, timeout, retry, ignore_custom_codec=ignore_custom_codec,
                record_class=record_class)
            return result
        cache = self._describe_cache
        generation = cache.generation()
        started = time.monotonic()
        statement = await self._get_statement(query, timeout, record_class=record_class,
                                              ignore_custom_codec=ignore_custom_codec)
        if timeout is not None:
            timeout -= time.monotonic() - started
        if self._cacheable(statement):
            self._keep(key, statement, generation)
        entry = cache.peek(key)
        if entry is None or entry.statement is not statement:  # not cacheable, or invalidated
            return await executor(statement, timeout), statement
        return await self._reuse(Check(entry, key, replay=call != _DISCARD), executor, timeout,
                                 retry, call == _MANY_ROWS)

    def _description_of(self, key: Key, statement: Any, generation: int) -> Description | None:
        """What a prepared statement's executions are checked against: the cached description
        of `statement` (kept now if it can be), or one of its own; None for a statement asyncpg
        runs unchecked (a named or server-prepared one)."""
        entry = self._describe_cache.peek(key)
        if (entry is None or entry.statement is not statement) and self._cacheable(statement):
            self._keep(key, statement, generation)
            entry = self._describe_cache.peek(key)
        if entry is not None and entry.statement is statement:
            return entry
        if statement.name or statement.prepared:
            return None
        try:
            return Description(statement, None, self._enums)
        except pg_exceptions.InternalClientError:  # a codec went missing meanwhile
            return None

    async def _run_prepared(self, prepared: CheckedPreparedStatement, executor: Any,
                            timeout: float | None, call: int) -> Any:
        """Run one execution of `prepared` (``executor(statement, timeout)``, as for
        `_do_execute`) as a reuse of its description: a changed reply is decoded with its own
        description, a refused one is described afresh and run outside a transaction block,
        and `prepared` takes the statement that served it."""
        statement = prepared._state
        description = prepared._description
        # Unchecked, as in `_do_execute`: while asyncpg still waits for a cancelled query, and
        # executemany's enum parameters (each Bind would need rewriting).
        if (description is None or self._protocol._is_cancelling()
                or (call != _ROWS and description.text_params)):
            try:
                return await executor(statement, timeout)
            except pg_exceptions.OutdatedSchemaCacheError:
                await self.reload_schema_state()  # as asyncpg's PreparedStatement does
                statement.mark_closed()
                raise
            except (pg_exceptions.PostgresError, pg_exceptions.InterfaceError):
                # Arguments refused before anything was sent, right after prepare()'s
                # describe (Parse, Describe, Flush): its Sync, as `_reuse` sends (no-op if
                # anything was written since).
                await self._end_describe(timeout)
                raise
        key: Key = (statement.query, statement.record_class, statement.ignore_custom_codec)
        check = Check(description, key, replay=call != _DISCARD)
        generation = self._describe_cache.generation()
        try:
            if description.guards is None or fits(description.guards, executor,
                                                  call in (_DISCARD, _MANY_ROWS)):
                result, served = await self._reuse(check, executor, timeout, True,
                                                   call == _MANY_ROWS)
            else:
                # An argument its parameter's type would convert with a loss (`fits`):
                # described afresh, as on the connection's own path.
                self._describe_cache.count_miss()
                result, served = await self._describe_and_run(key, executor, timeout, False, call)
        except pg_exceptions.OutdatedSchemaCacheError:
            statement.mark_closed()  # (`_reuse` reloaded the schema)
            raise
        if served is not statement:
            prepared._adopt(served, self._description_of(key, served, generation))
        if result is UNDECODED:
            error = StaleStatementError(
                f"pool {self._policy.pool_name!r}: {_cause(check)}. fetchmany() of a prepared "
                "statement does not decode rows again: the statement ran and its rows were not "
                "returned. The statement now has the new columns: the next call returns them."
            )
            error.may_have_run = True
            error.query = statement.query
            raise error
        return result

    def _keep(self, key: Key, statement: Any, generation: int) -> None:
        try:
            self._describe_cache.put(key, statement, generation, self._enums)
        except pg_exceptions.InternalClientError:  # a codec went missing meanwhile
            logger.debug("pool %r: statement not cached", self._policy.pool_name, exc_info=True)

    def _cacheable(self, statement: Any) -> bool:
        limit = self._config.max_cacheable_statement_size
        return (
            statement.name == ""
            and not statement.prepared
            and not (limit and len(statement.query) > limit)
        )

    async def _reuse(self, check: Check, executor: Any, timeout: float | None,
                     retry: bool, many: bool = False) -> tuple[Any, Any]:
        wire = self._wire
        generation = self._describe_cache.generation()
        started = time.monotonic() if timeout is not None else 0.0
        wire.arm(check)
        try:
            result = await executor(check.description.statement, timeout)
        except pg_exceptions.OutdatedSchemaCacheError:
            # A composite type changed under its codec: as asyncpg does, reload and re-raise.
            await self.reload_schema_state()
            raise
        except (pg_exceptions.PostgresError, pg_exceptions.InterfaceError) as exc:
            wire.disarm()
            if not (retry and self._did_not_run(check, exc)):
                if check.sent is None:
                    await self._end_describe(_left(timeout, started))
                raise
        else:
            if check.verdict == CHANGED and check.replay:
                try:
                    return await self._decode_again(check, executor, timeout, generation, many)
                except pg_exceptions.OutdatedSchemaCacheError:
                    # The same, met decoding the changed reply again: without the reload every
                    # later statement reading that type failed too, where asyncpg's next works.
                    await self.reload_schema_state()
                    raise
            return result, check.description.statement
        finally:
            wire.disarm()
        # Described afresh: what asyncpg's own path gives for this call, in what is left of
        # its time.
        self._describe_cache.count_miss()
        return await self._describe_and_run(check.key, executor, _left(timeout, started), False,
                                            _MANY_ROWS if many else
                                            _ROWS if check.replay else _DISCARD)

    def _did_not_run(self, check: Check, exc: Exception) -> bool:
        """Whether a failed reuse left no trace, so asyncpg's own path may run the call."""
        if check.sent is None:
            # asyncpg refused before sending (an argument its cached codec cannot encode, e.g.
            # a value too large for a column since widened): describe afresh and let it decide.
            self._describe_cache.discard(check.key)
            return not self.is_closed()
        if not isinstance(exc, pg_exceptions.PostgresError):
            return False
        # In a transaction block the refusal aborted the transaction: nothing can run again.
        return check.verdict == REJECTED and not self._protocol.is_in_transaction()

    async def _end_describe(self, timeout: float | None) -> None:
        """After asyncpg refused a call's arguments before sending it: a Sync for the describe
        before it, if nothing was written since (Parse, Describe, Flush, then nothing, as in
        asyncpg's own path). Until a Sync the server holds the locks its Parse took (a migration
        waits on them) and a transaction pooler holds the server connection.

        Its ReadyForQuery is waited for (one round trip, on this failure only): PgBouncer 1.18
        lost the reply to a describe written before the ReadyForQuery of a Sync came back
        (measured: the caller's next statement waited forever). A connection whose Sync was
        not answered (timeout, cancellation, lost) is retired: it may be out of step.
        """
        wire = self._wire
        if not wire.flushed or self.is_closed():
            return
        waiter = wire.side(SYNC_MESSAGE)
        try:
            await asyncio.wait_for(asyncio.shield(waiter), timeout)
        except (TimeoutError, ConnectionError):
            self.retire_reason = UNSYNCED_REASON
        except asyncio.CancelledError:
            self.retire_reason = UNSYNCED_REASON
            raise

    def _on_verdict(self, check: Check) -> None:
        """Called by the Wire as soon as the reply's head is read, even if the caller has been
        cancelled since: the cache and the connection's fate must not depend on it."""
        verdict = check.verdict
        if verdict in {MATCH, FAILED}:
            return
        cache = self._describe_cache
        cache.discard(check.key)
        if verdict == UNREADABLE:
            cache.clear()
            self.retire_reason = RETIRE_REASON
            logger.warning("pool %r: the reply to a reused statement was not the one the "
                           "protocol promises; the connection was closed",
                           self._policy.pool_name)
            return
        cache.count_stale()
        logger.info("pool %r: %s", self._policy.pool_name, _cause(check))

    async def _decode_again(self, check: Check, executor: Any, timeout: float | None,
                            generation: int, many: bool = False) -> tuple[Any, Any]:
        """Decode the recorded reply with the description it arrived with.

        asyncpg builds the statement from the reply's own ParameterDescription and
        RowDescription (`_statement_from_reply`), and then decodes the recorded rows (fed to
        the same executor, nothing is sent). Rows of `many` argument sets (a prepared
        statement's ``fetchmany``) are not decoded again (asyncpg may wait for the socket
        between its writes): `UNDECODED` is returned with the new statement.

        A column asyncpg now reads in the other format than the rows came in (the old Bind
        asked for it): turned here where the binary form is the text (`rows_in_formats`),
        otherwise by the server (`convert`: one round trip), and the rows fed again.
        """
        started = time.monotonic()
        statement = await self._statement_from_reply(check, timeout)
        if many:
            if self._cacheable(statement):
                self._keep(check.key, statement, generation)
            return UNDECODED, statement
        columns = len(statement._get_attributes())
        recorded: list[bytes] | None = check.recorded
        to_turn: Conversion | None = None

        def rows(wanted: tuple[int, ...] | None) -> list[bytes] | None:
            # The rows to feed, given the result formats asyncpg's Bind asked for (`wanted`).
            nonlocal to_turn
            sent = row_formats(check.row_reply)  # the formats the rows arrived in
            if recorded is not check.recorded or sent == wanted:
                return recorded
            if wanted is None or len(sent) != columns:
                return None
            types = [oid for _, oid in row_columns(check.row_reply)]
            turned = rows_in_formats(check.recorded, types, sent, wanted)
            if turned is None:
                to_turn = conversion(check.recorded, types, sent, wanted)
                if to_turn is None:  # only NULLs to turn
                    return check.recorded
            return turned

        result, decodable = self._feed_again(statement, executor, timeout, check, rows,
                                             columns=columns)
        if not decodable and to_turn is not None:
            timeout = _left(timeout, started)
            recorded = await self._turned_by_server(to_turn, check.recorded, timeout)
            if recorded is not None:
                result, decodable = self._feed_again(statement, executor, timeout, check, rows,
                                                     columns=columns)
        if not decodable:
            self.retire_reason = RETIRE_REASON
            error = StaleStatementError(
                f"pool {self._policy.pool_name!r}: {_cause(check)}, and asyncpg decodes the new "
                "columns in a format other than the one the server was asked for, and the "
                "server did not turn them. The statement ran; its rows were not decoded. The "
                "next call describes it afresh."
            )
            error.may_have_run = True
            error.query = check.key[0]
            raise error
        if self._cacheable(statement):
            self._keep(check.key, statement, generation)
        return result, statement

    def _feed_again(self, statement: Any, executor: Any, timeout: float | None, check: Check,
                    rows: Callable[[tuple[int, ...] | None], list[bytes] | None], *,
                    columns: int) -> tuple[Any, bool]:
        """Run `executor` on `statement` (of `columns` result columns) with its writes
        swallowed, fed `check`'s reply with the rows `rows` gives for the result formats its
        Bind asks for (none when it gives None: asyncpg's call returns no rows, and False says
        they were not decoded)."""
        wire = self._wire
        decodable = True

        def deliver() -> None:
            nonlocal decodable
            recorded = rows(bind_result_formats(b"".join(wire.swallowed), columns))
            decodable = recorded is not None
            if recorded is None:  # rows in a format the new codecs do not read: drop them
                recorded = [m for m in check.recorded if m[0] != DATA_ROW]
            wire.feed(b"".join(recorded))

        wire.swallowing = True
        try:
            result = drive(executor(statement, timeout), deliver)
        finally:
            wire.swallowing = False
            wire.swallowed.clear()
        return result, decodable

    async def _turned_by_server(self, to_turn: Conversion, recorded: list[bytes],
                                timeout: float | None) -> list[bytes] | None:
        """`recorded` with the values `to_turn` names turned by the server (`convert`); None
        if it refused, or did not answer in `timeout` (its reply is still taken off the
        stream when it comes: the connection stays in step). A connection lost meanwhile
        raises asyncpg's own error for it, which the pool reports as `ConnectionLostError`
        (`checkout.end_checkout`): "the server did not turn them" hid a network failure."""
        waiter = self._wire.side(to_turn.request)
        try:
            reply = await asyncio.wait_for(asyncio.shield(waiter), timeout)
        except TimeoutError:
            return None
        except ConnectionError as exc:
            raise pg_exceptions.ConnectionDoesNotExistError(
                "connection was closed in the middle of operation (while the server was "
                "turning a retyped column's values; the statement had run)") from exc
        return to_turn.rows(recorded, reply)

    async def _statement_from_reply(self, check: Check, timeout: float | None) -> Any:
        """asyncpg's statement built from a changed reply's own descriptions (fed to its
        prepare, nothing is sent), after introspecting the types it does not know (the one
        extra round trip, only for a type new to this connection)."""
        wire = self._wire
        protocol = self._protocol
        query, record_class, ignore_custom_codec = check.key
        described = PARSE_COMPLETE_MESSAGE + check.description.param_message + check.row_reply
        wire.swallowing = True
        try:
            statement = drive(
                protocol.prepare("", query, timeout, ignore_custom_codec=ignore_custom_codec,
                                 record_class=record_class),
                lambda: wire.feed(described),
            )
        finally:
            wire.swallowing = False
            wire.swallowed.clear()
        for _ in range(5):
            missing = statement._init_types()
            if not missing:
                break
            types, _ = await self._introspect_types(missing, timeout)
            protocol.get_settings().register_data_types(types)
        else:
            raise pg_exceptions.InternalClientError(
                "could not resolve the result types of a changed statement")
        statement._init_codecs()
        statement.mark_unprepared()
        return statement


def _left(timeout: float | None, started: float) -> float | None:
    """What is left of `timeout` (None: no limit) since `started` (`time.monotonic()`), at
    least a millisecond so that a call still gets its own timeout error."""
    return None if timeout is None else max(timeout - (time.monotonic() - started), 0.001)


def _cause(check: Check) -> str:
    description = check.description
    names = description.type_names
    if check.verdict == REJECTED:
        return (f"the server refused a cached statement (SQLSTATE {check.sqlstate}): its "
                "parameter types no longer fit the schema; it is described afresh")
    found = check.found if check.found is not None else row_columns(check.row_reply)
    return (f"the result columns of a cached statement changed since it was described: "
            f"{_changes(description.columns, found, names)} (was "
            f"{_columns(description.columns, names)}; now {_columns(found, names)})")


def _changes(before: tuple[Column, ...], after: tuple[Column, ...], names: dict[int, str]) -> str:
    old, new = dict(before), dict(after)
    changes = [f"column {name!r} added" for name, _ in after if name not in old]
    for name, oid in before:
        if name not in new:
            changes.append(f"column {name!r} dropped")
        elif new[name] != oid:
            changes.append(f"column {name!r} retyped from {_type(oid, names)} to "
                           f"{_type(new[name], names)}")
    return "; ".join(changes) or "columns reordered"


def _columns(columns: tuple[Column, ...], names: dict[int, str]) -> str:
    return "(" + ", ".join(f"{name} {_type(oid, names)}" for name, oid in columns) + ")"


def _type(oid: int, names: dict[int, str]) -> str:
    name = names.get(oid) or asyncpg_protocol.BUILTIN_TYPE_OID_MAP.get(oid)
    return str(name) if name else f"type {oid}"
