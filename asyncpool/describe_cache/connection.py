"""The asyncpg connection class of describe-cache mode: reuses described statements safely."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import asyncpg
from asyncpg import exceptions as pg_exceptions
from asyncpg.protocol import protocol as asyncpg_protocol

from asyncpool.describe_cache.entries import CacheTotals, DescribeCacheStats, DescriptionCache, Key
from asyncpool.describe_cache.inspector import Check, ReplyInspector, Verdict
from asyncpool.describe_cache.messages import Column
from asyncpool.describe_cache.support import unsupported_transport_error
from asyncpool.describe_cache.writer import ParseSwap
from asyncpool.errors import StaleStatementError

logger = logging.getLogger("asyncpool.describe_cache")

RETIRE_REASON = "stale statement description"
# SQLSTATE classes of a refusal to parse a statement that parsed before: the schema it names
# changed (42: undefined or retyped column, table, function, operator...; 3F: schema).
_SCHEMA_CLASSES = ("42", "3F")


@dataclass(frozen=True, slots=True)
class Policy:
    pool_name: str
    max_size: int
    ttl: float | None
    totals: CacheTotals


class DescribeCacheConnection(asyncpg.Connection):  # type: ignore[misc]
    """Keeps each described unnamed statement and reuses it in one round trip.

    A reuse sends Parse (with the cached parameter types) + Describe + Bind + Execute + Sync in
    one write, and the reply's description is checked against the cached one before any row is
    decoded (see `ReplyInspector`). `retire_reason` is set once a stale description is found:
    the pool then closes the connection when it comes back.
    """

    __slots__ = ("_describe_cache", "_inspector", "_swap", "retire_reason")
    _policy: Policy

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        transport = self._transport
        if not ParseSwap.supported(transport):
            transport.abort()
            raise unsupported_transport_error(self._policy.pool_name, transport)
        self.retire_reason: str | None = None
        self._describe_cache = DescriptionCache(
            self._policy.max_size, self._policy.ttl, self._policy.totals
        )
        self._inspector = ReplyInspector(self._protocol, transport, self._on_verdict)
        transport.set_protocol(self._inspector)
        self._swap = ParseSwap(transport, self._inspector.expect)

    def describe_cache_stats(self) -> DescribeCacheStats:
        """Hits, misses, stale descriptions and evictions of this connection's cache."""
        return self._describe_cache.stats()

    # -- asyncpg hooks -------------------------------------------------------------------------

    async def _do_execute(self, query: str, executor: Any, timeout: float | None,
                          retry: bool = True, *, ignore_custom_codec: bool = False,
                          record_class: type | None = None) -> tuple[Any, Any]:
        cache = self._describe_cache
        key: Key = (query, record_class or self._protocol.get_record_class(), ignore_custom_codec)
        entry = cache.get(key)
        # While asyncpg still waits for a cancelled query to finish, take its own path.
        if entry is not None and not self._protocol._is_cancelling():
            return await self._reuse(Check(entry, key), executor, timeout), entry.statement
        generation = cache.generation()
        result, statement = await super()._do_execute(
            query, executor, timeout, retry, ignore_custom_codec=ignore_custom_codec,
            record_class=record_class,
        )
        if entry is None and self._cacheable(statement):
            try:
                cache.put(key, statement, generation)
            except pg_exceptions.InternalClientError:  # a codec went missing meanwhile
                logger.debug("pool %r: statement not cached", self._policy.pool_name,
                             exc_info=True)
        return result, statement

    def _drop_local_statement_cache(self) -> None:
        # asyncpg calls this when codecs or types change (set_type_codec, reload_schema_state).
        super()._drop_local_statement_cache()
        self._describe_cache.clear()

    # -- reuse ---------------------------------------------------------------------------------

    def _cacheable(self, statement: Any) -> bool:
        limit = self._config.max_cacheable_statement_size
        return (
            statement.name == ""
            and not statement.prepared
            and not (limit and len(statement.query) > limit)
        )

    async def _reuse(self, check: Check, executor: Any, timeout: float | None) -> Any:
        self._swap.arm(check)
        try:
            result = await executor(check.description.statement, timeout)
        except pg_exceptions.OutdatedSchemaCacheError:
            # A composite type changed under its codec: as asyncpg does, reload and re-raise.
            await self.reload_schema_state()
            raise
        except Exception as exc:
            if _is_stale(check):
                raise self._stale_error(check, exc) from exc
            raise
        finally:
            self._swap.disarm()
        if _is_stale(check):
            raise self._stale_error(check)
        return result

    def _on_verdict(self, check: Check) -> None:
        """Called by the inspector as soon as the reply's head is read, even if the caller has
        been cancelled since: the cache and the connection's fate must not depend on it."""
        verdict = check.verdict
        if verdict is Verdict.MATCH:
            return
        cache = self._describe_cache
        cache.discard(check.key)
        if not _is_stale(check):
            return
        cache.clear()  # one changed table usually means several stale statements
        cache.count_stale()
        self.retire_reason = RETIRE_REASON
        logger.warning("pool %r: %s", self._policy.pool_name, _cause(check))

    def _stale_error(self, check: Check, exc: Exception | None = None) -> StaleStatementError:
        may_have_run = check.verdict is not Verdict.REJECTED
        outcome = (
            "It was sent and may have run (in an open transaction, roll back); its rows were "
            "not decoded, and it was not re-run."
            if may_have_run else "It did not run."
        )
        error = StaleStatementError(
            f"pool {self._policy.pool_name!r}: {_cause(check, exc)}. {outcome} The description was "
            "dropped and this connection will be replaced when released: call again if "
            "repeating the statement is safe. After a migration, call "
            "pool.invalidate_statement_cache()."
        )
        error.may_have_run = may_have_run
        error.query = check.description.statement.query
        return error


def _is_stale(check: Check) -> bool:
    verdict = check.verdict
    if verdict is Verdict.REJECTED:
        return (check.sqlstate or "")[:2] in _SCHEMA_CLASSES
    return verdict is Verdict.CHANGED or verdict is Verdict.UNREADABLE


def _cause(check: Check, exc: Exception | None = None) -> str:
    description = check.description
    if check.verdict is Verdict.UNREADABLE:
        return ("the reply to a reused statement was not the one the protocol promises, so its "
                "description could not be checked; the connection was closed")
    if check.verdict is Verdict.REJECTED:
        refusal = f"{type(exc).__name__}: {exc}" if exc is not None else f"SQLSTATE {check.sqlstate}"
        return ("a cached statement no longer fits the schema: parsed with its cached parameter "
                f"types, the server refused it ({refusal})")
    names = description.type_names
    if check.found is None:
        return ("the parameter types of a cached statement changed since it was described "
                "(the schema changed)")
    return (f"the result columns of a cached statement changed since it was described: "
            f"{_changes(description.columns, check.found, names)} (was "
            f"{_columns(description.columns, names)}; now {_columns(check.found, names)})")


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
