"""`bench_overhead.py --ablate-acquire`: the pool's ``async with pool.acquire()`` + ``conn.fetchval``
path with one piece of its bookkeeping taken out each.

The path's five functions (`Pool.acquire`, `AcquireContext.__aenter__` and `__aexit__`,
`Slots.checkout_nowait`, the proxy's statement method made by `connection._statement`) are
compiled again from their source with that piece's lines replaced, and a pool's classes are
swapped for subclasses holding them (`__class__` assignment: same layout). The control,
"acquire path compiled again, whole", is built the same way with nothing replaced: compare the
others with it, not with the pool. Most pieces are guarantees the pool keeps; this measures
them, it does not propose to drop them.
"""

from __future__ import annotations

import inspect
import textwrap
from collections.abc import Callable
from typing import Any

from asyncpool.pool import checkout, connection, pool, slots

# Where each piece lives: (module, the function's dotted place in it).
_SOURCES: dict[str, tuple[Any, str]] = {
    "acquire": (pool, "Pool.acquire"),
    "enter": (checkout, "AcquireContext.__aenter__"),
    "exit": (checkout, "AcquireContext.__aexit__"),
    "take": (slots, "Slots.checkout_nowait"),
    "statement": (connection, "_statement"),
}

# name -> [(function, old text, new text)]
ACQUIRE_ABLATIONS: dict[str, list[tuple[str, str, str]]] = {
    "acquire path compiled again, whole": [],
    "acquire without the acquire site": [
        ("acquire", "context._frame = sys._getframe(1)", "context._frame = None")],
    "acquire without the context copy": [
        ("take", "copy_context() if self.track_leaks else None", "None")],
    "acquire without the holding task": [
        ("take", "lease.task = task_of(loop)", "lease.task = None")],
    "acquire without the checks before taking": [
        ("take", "if (now >= record.check_at or not record.probe.is_connected()\n"
                 "                or not (loop._thread_id == get_ident() if self.loop_has_thread_id"
                 "  # type: ignore[union-attr]\n"
                 "                        else get_running_loop() is loop)):",
         "if False:")],
    "acquire without the statement's checks": [
        ("statement", "        if lease.state is not ACTIVE:\n            raise self._unusable()\n", ""),
        ("statement", "        if not (loop._thread_id == get_ident() if owner.loop_has_thread_id"
                      "  # type: ignore[union-attr]\n"
                      "                else get_running_loop() is loop):\n"
                      "            owner.refuse_other_loop()\n", ""),
        ("statement", "            if not record.probe.is_connected():\n"
                      "                conn._check_open()  # asyncpg's own error for a closed "
                      "connection\n", "")],
    "acquire without the statement's try block": [
        ("statement", "except Exception as raised:", "except ZeroDivisionError as raised:")],
    "acquire without the checks at the return": [
        ("exit", "if (proxy is not None and owner.fast_statements and not lease.reported\n"
                 "                    and not lease.running and now < expires_at and not record.stale\n"
                 "                    and not record.sync_after\n"
                 "                    and not (owner._may_retire and conn.retire_reason)\n"
                 "                    and returned(conn) == CLEAN):",
         "if proxy is not None:")],
    "acquire without the count, leak timer and hooks": [
        ("take", "        if self.leak_timer_unarmed:\n            self.leaks.arm(now)\n", ""),
        ("take", "        self.acquired_total += 1\n", ""),
        ("take", "        if self.on_acquired is not None:\n            self.on_acquired(0.0)\n", ""),
        ("exit", "                if owner.on_released is not None:\n"
                 "                    owner.on_released(now - lease.acquired_at)\n", "")],
}
# All of the above at once: what the pieces measured here add up to together.
ACQUIRE_ABLATIONS["acquire without all of the above"] = [
    edit for edits in ACQUIRE_ABLATIONS.values() for edit in edits]


def _compile(part: str, edits: list[tuple[str, str]], names: dict[str, Any]) -> Any:
    module, place = _SOURCES[part]
    target: Any = module
    for attr in place.split("."):
        target = getattr(target, attr)
    source = inspect.getsource(target)  # (indented as in its file, as the edits are)
    for old, new in edits:
        if old not in source:
            raise SystemExit(f"{place} changed: update ACQUIRE_ABLATIONS ({old.strip()[:50]!r})")
        source = source.replace(old, new)
    source = textwrap.dedent(source)
    built: dict[str, Any] = {}
    namespace = {**vars(module), **names}
    exec(compile(source, module.__file__, "exec"), namespace, built)  # noqa: S102
    return built[place.rsplit(".", 1)[-1]]


def ablated_classes(name: str) -> Callable[[Any], None]:
    """A function that swaps a pool's classes for ones whose acquire path has `ACQUIRE_ABLATIONS[name]`
    applied (the pool, its slots, and the contexts and proxies it hands out)."""
    edits: dict[str, list[tuple[str, str]]] = {part: [] for part in _SOURCES}
    for part, old, new in ACQUIRE_ABLATIONS[name]:
        edits[part].append((old, new))
    fetchval = _compile("statement", edits["statement"], {})("fetchval")
    # By the proxy class each connection had (`PooledConnection`, or its subclass with a
    # __getattr__ for a connection class with attributes of its own: `proxy_class_for`).
    connection_classes: dict[type, type] = {}

    def ablated_connection(proxy_class: type) -> type:
        made = connection_classes.get(proxy_class)
        if made is None:
            made = connection_classes[proxy_class] = type(
                "AblatedConnection", (proxy_class,), {"__slots__": (), "fetchval": fetchval})
        return made

    context_class = type("AblatedContext", (checkout.AcquireContext,), {
        "__slots__": (),
        "__aenter__": _compile("enter", edits["enter"], {}),
        "__aexit__": _compile("exit", edits["exit"], {}),
    })
    slots_class = type("AblatedSlots", (slots.Slots,), {
        "__slots__": (), "checkout_nowait": _compile("take", edits["take"], {})})
    pool_class = type("AblatedPool", (pool.Pool,), {
        "acquire": _compile("acquire", edits["acquire"], {"AcquireContext": context_class})})

    def swap(target: Any) -> None:
        target.__class__ = pool_class
        target._slots.__class__ = slots_class
        for record in target._slots.records:  # (the proxies its checkouts hand out)
            record.proxy_class = ablated_connection(record.proxy_class)

    return swap
