"""The `ssl` argument asyncpg gets, built from the pool's `ssl` and `ssl_root_cert` options.

Modes follow libpq's ``sslmode``: ``disable``, ``prefer`` (TLS if offered, unverified),
``require`` (TLS, unverified), ``verify-ca`` (the chain must lead to `ssl_root_cert`, or the
system CAs without it) and ``verify-full`` (also the certificate must name the host dialled).
"""

from __future__ import annotations

import os
import ssl
from typing import TYPE_CHECKING

from asyncpool.errors import PoolConfigError

if TYPE_CHECKING:
    from asyncpool.config import PoolConfig
    from asyncpool.connect.dsn import Target

_VERIFYING = ("verify-ca", "verify-full")
# Modes that send nothing an eavesdropper could not read or an impostor could not collect.
_UNSAFE_FOR_TOKENS = (None, "disable", "allow", "prefer")


def effective_mode(config: PoolConfig) -> str | ssl.SSLContext | None:
    """The mode connections will use: the `ssl` option, else the DSN's ``sslmode``, else
    ``PGSSLMODE``; with only `ssl_root_cert` given, ``verify-full``. None: asyncpg's default
    (``prefer``)."""
    if config.ssl is not None:
        return config.ssl
    mode = _dsn_sslmode(config.dsn) or os.environ.get("PGSSLMODE") or None
    if mode is None and config.ssl_root_cert is not None:
        return "verify-full"
    return mode


def ssl_argument(config: PoolConfig, target: Target) -> ssl.SSLContext | str | bool | None:
    """None leaves asyncpg to read the DSN and environment; otherwise the mode or a context."""
    mode = effective_mode(config)
    if isinstance(mode, ssl.SSLContext):
        return mode
    if config.ssl is None and config.ssl_root_cert is None:
        return None
    if mode in _VERIFYING:
        return verifying_context(config.ssl_root_cert, check_hostname=mode == "verify-full")
    if mode == "require" and config.ssl_root_cert is not None:
        # libpq: with a root certificate at hand, require checks the chain as verify-ca does.
        return verifying_context(config.ssl_root_cert, check_hostname=False)
    if mode == "disable":
        return False
    return mode


def verifying_context(cafile: str | None, *, check_hostname: bool) -> ssl.SSLContext:
    """A client context that requires a certificate chaining to `cafile` (or the system CAs)."""
    try:
        ctx = ssl.create_default_context(cafile=cafile)
    except (OSError, ssl.SSLError) as exc:
        raise PoolConfigError(
            f"ssl_root_cert={cafile!r} could not be loaded as a PEM CA bundle ({exc})"
        ) from None
    ctx.check_hostname = check_hostname
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def require_tls(config: PoolConfig) -> None:
    """Refuse a mode that would send an IAM token in clear text (or to an unverified server
    that asked for it unencrypted), unless `allow_iam_without_tls` says this is a local test."""
    if config.allow_iam_without_tls:
        return
    mode = effective_mode(config)
    if isinstance(mode, ssl.SSLContext) or mode not in _UNSAFE_FOR_TOKENS:
        return
    raise PoolConfigError(
        f"pool {config.name!r}: IAM authentication sends a token that must not travel in clear "
        f"text, but the ssl mode is {mode!r}; set ssl='verify-full' with ssl_root_cert (RDS: the "
        "RDS CA bundle; RDS Proxy: the Amazon root CAs), or allow_iam_without_tls=True for a "
        "local test"
    )


def _dsn_sslmode(dsn: str | None) -> str | None:
    # The one DSN parser (a repeated sslmode is an error there, not "first one wins").
    from asyncpool.connect.dsn import parse_dsn

    return parse_dsn(dsn).params.get("sslmode") if dsn else None
