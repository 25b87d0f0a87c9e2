"""Credentials providers replaced by `Pool.set_connect_args`: each is closed once no login that
uses it is in flight. Kept until the pool closed, a process rotating credentials this way piled
up their AWS clients and old passwords."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from asyncpool.connect.connector import close_failure
from asyncpool.pool.state import OPEN

if TYPE_CHECKING:
    from asyncpool.pool.slots import Slots

logger: logging.Logger = logging.getLogger("asyncpool.pool")


def track_login(slots: Slots, attempt: asyncio.Task[Any], provider: Any) -> None:
    """`attempt` logs in with `provider` until it is done (a cancelled login's task may outlive
    its caller's wait: it still awaits the provider until it ends)."""
    if provider is None:
        return
    slots.provider_users[attempt] = provider
    attempt.add_done_callback(functools.partial(_ended, slots))


@contextlib.contextmanager
def in_use(slots: Slots, provider: Any) -> Iterator[None]:
    """`provider` is used meanwhile outside a login (open()'s first read, `warm`)."""
    token = object()
    slots.provider_users[token] = provider
    try:
        yield
    finally:
        _ended(slots, token)


def replace(slots: Slots, old: Any, new: Any) -> None:
    """The logins from now on use `new` instead of `old`: `old` is closed once unused; `new`,
    if it was replaced before and not closed yet, is kept (it is in use again)."""
    pending = slots.replaced_credentials
    pending[:] = [p for p in pending if p is not new]
    if old is not None and old is not new and all(p is not old for p in pending):
        pending.append(old)
    close_unused(slots)


def close_unused(slots: Slots) -> None:
    """Close, once each, the replaced providers that no login uses any more. Only while the
    pool is open: closing, it closes the rest itself (`lifecycle._take_credentials`)."""
    if slots.state is not OPEN or not slots.replaced_credentials:
        return
    used = {id(p) for p in slots.provider_users.values()}
    current = slots.connector.credentials if slots.connector is not None else None
    unused = [p for p in slots.replaced_credentials if id(p) not in used and p is not current]
    if not unused:
        return
    gone = {id(p) for p in unused}
    slots.replaced_credentials = [p for p in slots.replaced_credentials if id(p) not in gone]
    for provider in unused:
        slots._spawn(close_credentials(provider, slots.name))


def _ended(slots: Slots, user: object) -> None:
    if slots.provider_users.pop(user, None) is not None:
        close_unused(slots)


async def close_credentials(creds: Any, name: str) -> None:
    """Close a provider; a failure is logged (without the provider's secrets) and ignored."""
    try:
        await creds.close()
    except Exception as exc:
        logger.warning("pool %r: %s; ignored", name, close_failure(creds, exc))
