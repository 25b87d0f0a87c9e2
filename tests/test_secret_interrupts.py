"""A BaseException that is not an Exception (Ctrl-C's KeyboardInterrupt, a SystemExit, a
cancellation) raised during a login goes up as it is, but without asyncpg's frames: their locals
hold the connection parameters, password included, and an error tracker (or a crash report
with locals) records them.

asyncio lets KeyboardInterrupt and SystemExit out of the loop, so each scenario runs in an event
loop of its own, against the real local PostgreSQL."""

from __future__ import annotations

import asyncio
import secrets
import traceback
from typing import Any
from urllib.parse import quote

import pytest

from asyncpool import Pool
from tests.provider_support import QuietProvider
from tests.secret_support import exposed, leaks

_ALPHABET = "QZXJKVWqzxjkvw"  # letters no message of ours is made of


def _secret() -> str:
    rng = secrets.SystemRandom()
    return "".join(rng.choice(_ALPHABET) for _ in range(16))


def _interrupted_login(dsn: str, raised: type[BaseException], **options: Any) -> BaseException:
    """What a login to `dsn` raises when `raised` comes out of the dial (inside asyncpg)."""

    async def scenario() -> None:
        loop = asyncio.get_running_loop()

        async def dial(*args: Any, **kwargs: Any) -> Any:
            raise raised

        loop.create_connection = dial  # type: ignore[method-assign]
        pool = Pool(dsn, min_size=0, acquire_timeout=5, connect_timeout=4, telemetry=False,
                    **options)
        await pool.open()
        try:
            await pool.fetchval("SELECT 1")
        finally:
            await pool.close()

    with pytest.raises(raised) as caught:
        asyncio.run(scenario())
    return caught.value


@pytest.mark.parametrize("raised", [KeyboardInterrupt, SystemExit])
def test_an_interrupt_during_a_login_carries_no_piece_of_the_password(
        raised: type[BaseException]) -> None:
    password = _secret()
    dsn = f"postgresql://postgres:{quote(password)}@127.0.0.1:5432/postgres?sslmode=disable"
    error = _interrupted_login(dsn, raised, allow_unprotected_credentials=True)
    assert type(error) is raised
    assert leaks(exposed(error), [password]) == []


class _Interrupting(QuietProvider):
    async def password(self, target: object) -> str:
        raise KeyboardInterrupt


def test_an_interrupt_from_a_provider_keeps_the_providers_frames() -> None:
    # Pointless to cut: what the provider did when interrupted is the caller's to debug.
    error = _interrupted_login("postgresql://postgres@127.0.0.1:5432/postgres?sslmode=disable",
                               KeyboardInterrupt, credentials=_Interrupting(),
                               allow_unprotected_credentials=True)
    functions = [frame.name for frame in traceback.extract_tb(error.__traceback__)]
    assert "password" in functions
