"""The `ssl` argument asyncpg gets, built from the pool's `ssl` and `ssl_root_cert` options."""

from __future__ import annotations

import ssl
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from asyncpool.config import PoolConfig
    from asyncpool.dsn import Target


def ssl_argument(config: PoolConfig, target: Target) -> ssl.SSLContext | str | bool | None:
    """None leaves asyncpg's default (the DSN's sslmode); otherwise the mode or a context.

    ``verify-ca`` checks the chain against `ssl_root_cert` (or the system CAs);
    ``verify-full`` also checks that the certificate names the host dialled.
    """
    mode = config.ssl
    if mode is None:
        return None
    if isinstance(mode, ssl.SSLContext):
        return mode
    if mode == "disable":
        return False
    if mode in ("prefer", "require"):
        return mode
    ctx = ssl.create_default_context(cafile=config.ssl_root_cert)
    ctx.check_hostname = mode == "verify-full"
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx
