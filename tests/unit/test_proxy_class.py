"""The proxy class a checkout hands out: `PooledConnection` forwards asyncpg's Connection by class
attributes (no ``__getattr__``, which Python 3.11 would make every attribute read on it pay for);
a connection class with attributes of its own gets `AnyAttributeConnection`, which has one."""

from __future__ import annotations

import asyncio
import inspect

import asyncpg

from asyncpool.connect import driver
from asyncpool.pool.connection import AnyAttributeConnection, PooledConnection, proxy_class_for


def _own_names(cls: type) -> list[str]:
    return [name for name in dir(cls) if not (name.startswith("__") and name.endswith("__"))]


def test_the_proxy_has_no_getattr_and_answers_every_attribute_of_asyncpgs_connection() -> None:
    assert not hasattr(PooledConnection, "__getattr__")
    for name in _own_names(asyncpg.Connection):
        original = inspect.getattr_static(asyncpg.Connection, name)
        forwarded = inspect.getattr_static(PooledConnection, name)  # AttributeError: not forwarded
        if inspect.isfunction(original):
            # A method of the proxy's own (the lease checked when it runs), of asyncpg's kind.
            assert inspect.isfunction(forwarded), name
            assert (inspect.iscoroutinefunction(getattr(PooledConnection, name))
                    == inspect.iscoroutinefunction(original)), name
        else:  # asyncpg's slots (``_protocol``...): read from the held connection
            assert isinstance(forwarded, property), name


def test_asyncpgs_class_and_the_pools_own_subclasses_get_the_proxy_without_getattr() -> None:
    class Overriding(asyncpg.Connection):
        __slots__ = ()

        async def fetchval(self, *args: object, **kwargs: object) -> object:
            return await super().fetchval(*args, **kwargs)  # type: ignore[arg-type]

    for cls in (asyncpg.Connection, driver.cancel_aware_class(None, cancels=True),
                driver.cancel_aware_class(None, cancels=False), Overriding,
                driver.cancel_aware_class(Overriding, cancels=True)):
        assert proxy_class_for(cls) is PooledConnection, cls


class _AddsAMethod(asyncpg.Connection):
    __slots__ = ()

    def marker(self) -> str:
        return "mine"


class _AddsASlot(asyncpg.Connection):
    __slots__ = ("mine",)


def test_a_class_with_slots_that_adds_attributes_gets_a_subclass_forwarding_them_too() -> None:
    from asyncpool.unnamed.connection import DescribeCacheConnection

    for cls, added in ((_AddsAMethod, "marker"), (_AddsASlot, "mine"),
                       (DescribeCacheConnection, "describe_cache_stats"),
                       (driver.cancel_aware_class(DescribeCacheConnection, cancels=True),
                        "describe_cache_stats")):
        proxy = proxy_class_for(cls)
        assert proxy_class_for(cls) is proxy  # made once per class
        assert proxy.__mro__[1] is PooledConnection, cls
        assert proxy.__name__ == "PooledConnection"
        assert not hasattr(proxy, "__getattr__")
        assert added in vars(proxy), (cls, added)
        assert not hasattr(PooledConnection, added)  # (the base stays asyncpg's Connection's)
    assert inspect.isfunction(vars(proxy_class_for(_AddsAMethod))["marker"])
    assert isinstance(vars(proxy_class_for(_AddsASlot))["mine"], property)


def test_a_class_whose_instances_may_have_any_attribute_gets_the_proxy_with_getattr() -> None:
    class HasADict(asyncpg.Connection):  # instances may have any attribute
        pass

    class MethodMadeAProperty(asyncpg.Connection):
        __slots__ = ()

        @property
        def get_settings(self) -> object:  # type: ignore[override]
            return "a property"

    for cls in (HasADict, MethodMadeAProperty, object,
                driver.cancel_aware_class(HasADict, cancels=True)):
        assert proxy_class_for(cls) is AnyAttributeConnection, cls
    assert issubclass(AnyAttributeConnection, PooledConnection)
    assert "__getattr__" in vars(AnyAttributeConnection)


def test_a_forwarded_method_looks_like_asyncpgs() -> None:
    method = PooledConnection.get_settings
    assert method.__name__ == "get_settings"
    assert method.__doc__ == asyncpg.Connection.get_settings.__doc__
    assert asyncio.iscoroutinefunction(PooledConnection.reload_schema_state)
    assert inspect.signature(PooledConnection.set_type_codec) == inspect.signature(
        asyncpg.Connection.set_type_codec)
