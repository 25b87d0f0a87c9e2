"""A DSN that is not a string is refused where it is given (`Pool()`, `create_pool()`,
`PoolConfig()`, `set_connect_args()`), by a `PoolConfigError` that says what to pass and shows
nothing of the value (bytes or a mapping may hold a password)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

import asyncpool
from asyncpool import Pool, PoolConfig, PoolConfigError

SECRET = "QZXJKVWqzxjkvwQZ"  # pragma: allowlist secret

WRONG = {
    "bytes": (f"postgresql://app:{SECRET}@db/app".encode(), r"\.decode\(\)"),
    "bytearray": (bytearray(f"postgresql://app:{SECRET}@db/app".encode()), r"\.decode\(\)"),
    "dict": ({"host": "db", "user": "app", "password": SECRET}, r"Pool\(host=\.\.\."),
    "Path": (Path(f"/run/{SECRET}"), "servicefile= or passfile="),
    "int": (5432, "port="),
}


def _check(made: Any, why: str, error: PoolConfigError) -> None:
    message = str(error)
    assert f"not a {type(made).__name__}" in message
    assert "postgresql://user@host:port/database" in message
    assert re.search(why, message)
    assert SECRET[:8] not in message
    assert SECRET[:8] not in repr(error.args)


@pytest.mark.parametrize("kind", WRONG)
def test_pool_refuses_a_dsn_that_is_not_a_string(kind: str) -> None:
    made, why = WRONG[kind]
    with pytest.raises(PoolConfigError) as info:
        Pool(made)  # type: ignore[call-overload]
    _check(made, why, info.value)


@pytest.mark.parametrize("kind", WRONG)
def test_create_pool_and_config_refuse_it_too(kind: str) -> None:
    made, why = WRONG[kind]
    for make in (lambda: asyncpool.create_pool(made),  # type: ignore[call-overload]
                 lambda: PoolConfig(dsn=made)):  # type: ignore[arg-type]
        with pytest.raises(PoolConfigError) as info:
            make()
        _check(made, why, info.value)


def test_set_connect_args_refuses_it() -> None:
    pool = Pool("postgresql://app@db/app")
    with pytest.raises(PoolConfigError) as info:
        pool.set_connect_args(WRONG["bytes"][0])  # type: ignore[arg-type]
    _check(WRONG["bytes"][0], WRONG["bytes"][1], info.value)
    assert pool.config.dsn == "postgresql://app@db/app"


def test_a_str_subclass_is_taken() -> None:
    class Dsn(str):
        pass

    assert Pool(Dsn("postgresql://app@db/app")).config.dsn == "postgresql://app@db/app"
