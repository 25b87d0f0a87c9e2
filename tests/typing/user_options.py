# mypy: ignore-errors
"""Options a type checker refuses: a `PoolConfig`'s ``replace()`` and ``from_env()`` take
`PoolConfig`'s fields with their types (`PoolConfigOptions`), as `Pool()` takes its options,
and ``loop=`` (asyncpg's) is an event loop.

Each line ending with ``# error: <mypy error code> / <pyright rule>`` must fail under
``mypy --strict`` (tests/typing/test_typing.py: with asyncpg's types and without) and pyright's
strict mode (tests/typing/test_pyright.py), on that line; no other line may fail. What is right
is in user_code.py. Not run. The first line keeps the project's own mypy run quiet; the test
removes it.
"""

from __future__ import annotations

import asyncpool
from asyncpool import Pool, PoolConfig

DSN = "postgresql://app@db/app"


def replaced(config: PoolConfig) -> None:
    config.replace(max_size="5")  # error: arg-type / reportArgumentType
    config.replace(max_szie=5)  # error: call-arg / reportCallIssue
    config.replace(prepared_statements="maybe")  # error: arg-type / reportArgumentType
    config.replace(validate_after="1s")  # error: arg-type / reportArgumentType
    config.replace(timeout=3)  # error: call-arg / reportCallIssue


def from_the_environment() -> None:
    PoolConfig.from_env(max_size="5")  # error: arg-type / reportArgumentType
    PoolConfig.from_env({}, max_szie=5)  # error: call-arg / reportCallIssue
    PoolConfig.from_env(leak_action="warn")  # error: arg-type / reportArgumentType


async def loops() -> None:
    Pool(DSN, loop="main")  # error: call-overload / reportArgumentType
    await asyncpool.create_pool(DSN, loop=1)  # error: call-overload / reportArgumentType
