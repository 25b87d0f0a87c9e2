"""asyncpg's COPY keyword options, typed once for the held connection and the pool's helpers.

Each is what asyncpg passes to the server's ``COPY ... WITH (...)`` (None: the server's default),
plus the call's ``timeout``; the required argument of each method (``output``, ``source``,
``records``) stays in its signature.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal, TypedDict


class CopyFormatOptions(TypedDict, total=False):
    """``copy_from_query``'s options, shared by the table copies."""

    timeout: float | None
    format: str | None
    oids: bool | None
    delimiter: str | None
    null: str | None
    header: bool | Literal["match"] | None  # "match": COPY FROM only (PostgreSQL 15)
    quote: str | None
    escape: str | None
    force_quote: bool | Iterable[str] | None
    encoding: str | None


class CopyFromTableOptions(CopyFormatOptions, total=False):
    """``copy_from_table``'s options: a column list and a schema as well."""

    columns: Iterable[str] | None
    schema_name: str | None


class CopyToTableOptions(CopyFromTableOptions, total=False):
    """``copy_to_table``'s options: those of a ``COPY ... FROM`` as well."""

    freeze: bool | None
    # Column names only: asyncpg takes True (every column) for force_quote alone.
    force_not_null: Iterable[str] | None
    force_null: Iterable[str] | None
    where: str | None


class CopyRecordsOptions(TypedDict, total=False):
    """``copy_records_to_table``'s options (binary format: no text settings)."""

    columns: Iterable[str] | None
    schema_name: str | None
    timeout: float | None
    where: str | None
