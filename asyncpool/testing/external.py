"""Servers provided from outside (environment variables) instead of started by the harness."""

from __future__ import annotations

import os
from dataclasses import dataclass
from urllib.parse import urlsplit

from asyncpool.testing.admin import AdminConsole


@dataclass
class ExternalPgBouncer(AdminConsole):
    """A PgBouncer somebody else runs: it can be queried, not restarted."""

    label: str
    url: str
    admin_dsn: str | None
    supports_prepared_statements: bool
    controllable = False

    def dsn(self, **params: str) -> str:
        if not params:
            return self.url
        sep = "&" if "?" in self.url else "?"
        return self.url + sep + "&".join(f"{k}={v}" for k, v in params.items())

    @property
    def host(self) -> str:
        return urlsplit(self.url).hostname or "localhost"

    @property
    def port(self) -> int:
        return urlsplit(self.url).port or 5432


def external_poolers() -> list[ExternalPgBouncer] | None:
    """PgBouncers named by ASYNCPOOL_TEST_PGBOUNCER_DSN / _CURRENT_DSN (with _ADMIN_DSN variants)."""
    found = []
    for var, label, prepared in (
        ("ASYNCPOOL_TEST_PGBOUNCER_DSN", "pgbouncer-external", False),
        ("ASYNCPOOL_TEST_PGBOUNCER_CURRENT_DSN", "pgbouncer-external-current", True),
    ):
        url = os.environ.get(var)
        if url:
            admin = os.environ.get(var.replace("_DSN", "_ADMIN_DSN"))
            found.append(ExternalPgBouncer(label, url, admin, prepared))
    return found or None
