"""`asyncpool bench`'s own logins (the contenders and the samplers) follow the pool's credential
rules: a fake server on 127.0.0.1 that refuses TLS or offers a self-signed certificate, then asks
for a cleartext password or an MD5 hash, is sent nothing by any driver; a password for another
machine without verified TLS is refused before anything is dialled."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest
from psycopg_pool import PoolTimeout

from asyncpool.errors import AuthMethodRefusedError, PoolConfigError
from asyncpool.load.clients import make_client
from asyncpool.load.logins import GuardedLogin
from asyncpool.load.sampler import PgBouncerSampler, PostgresSampler, Sampler
from asyncpool.load.spec import LoadSpec
from asyncpool.testing.mitm import FakeServer

SECRET = "pw/with:every@special?#&%char s+é"  # pragma: allowlist secret
ESCAPED = "pw%2Fwith%3Aevery%40special%3F%23%26%25char%20s%2B%C3%A9"


def _dsn(port: int) -> str:
    return f"postgresql://app:{ESCAPED}@127.0.0.1:{port}/app"


@pytest.mark.parametrize("driver", ["asyncpg", "asyncpg-capped", "asyncpg-pool", "psycopg-pool"])
@pytest.mark.parametrize("auth", ["password", "md5"])
@pytest.mark.parametrize("tls", ["refuse", "self-signed"])
async def test_a_contender_gives_an_impostor_nothing(driver: str, auth: str, tls: str) -> None:
    async with FakeServer(tls=tls, auth=auth) as fake:  # type: ignore[arg-type]
        spec = LoadSpec(_dsn(fake.port), clients=1, processes=1, driver=driver,  # type: ignore[arg-type]
                        pool_size=1, acquire_timeout=1.0)
        client = make_client(spec, 0)
        await client.open()
        # psycopg_pool retries a refused login until its timeout (libpq's require_auth refused it).
        expected = PoolTimeout if driver == "psycopg-pool" else AuthMethodRefusedError
        try:
            with pytest.raises(expected) as info:
                await client.query((1,))
        finally:
            await client.close()
    assert fake.logins, "the fake server was never dialled: the test proves nothing"
    assert fake.received == []
    assert SECRET.encode() not in fake.raw_bytes_received
    if isinstance(info.value, AuthMethodRefusedError):
        assert info.value.method == auth
    assert SECRET not in str(info.value)


@pytest.mark.parametrize("auth", ["password", "md5"])
async def test_the_samplers_give_an_impostor_nothing(auth: str) -> None:
    async with FakeServer(tls="self-signed", auth=auth) as fake:  # type: ignore[arg-type]
        samplers: list[tuple[Sampler, type[Exception]]] = [
            (PgBouncerSampler(_dsn(fake.port), "app", "app"), psycopg.OperationalError),
            (PostgresSampler(_dsn(fake.port), "app", "app", beyond_baseline=False),
             AuthMethodRefusedError),
        ]
        for sampler, expected in samplers:
            with pytest.raises(expected) as info:
                await asyncio.wait_for(sampler.open(), 10)
            assert SECRET not in str(info.value)
    assert len(fake.logins) >= 2
    assert fake.received == []


def test_a_password_for_another_machine_needs_verified_tls() -> None:
    with pytest.raises(PoolConfigError) as info:
        GuardedLogin(f"postgresql://app:{ESCAPED}@db.example.com:5432/app?sslmode=require")
    message = str(info.value)
    assert "verify-full" in message
    assert "allow_unprotected_credentials" in message
    assert SECRET not in message
    assert ESCAPED not in message


def test_bench_refuses_it_before_starting_anything() -> None:
    for flag in ("--dsn", "--admin-dsn", "--postgres-dsn"):
        dsns = {"--dsn": "postgresql://app@127.0.0.1:1/app"}
        dsns[flag] = f"postgresql://app:{ESCAPED}@db.example.com:5432/app"
        argv = [a for pair in dsns.items() for a in pair]
        done = subprocess.run([sys.executable, "-m", "asyncpool.cli", "bench", *argv, "--clients",
                               "1", "--duration", "1"], capture_output=True, text=True,
                              timeout=60, check=False)
        assert done.returncode == 2, (flag, done.stderr)
        assert "over TLS that verifies the server" in done.stderr, (flag, done.stderr)
        for piece in (SECRET, ESCAPED, "pw/with", "pw%2Fwith"):
            assert piece not in done.stderr + done.stdout, flag


def test_psycopg_gets_the_resolved_setting(monkeypatch: pytest.MonkeyPatch,
                                           tmp_path: Path) -> None:
    """libpq enforces what asyncpg's guard does: sslmode and root from every spelling (here the
    environment), SCRAM only where the server is not verified."""
    bundle = tmp_path / "rds.pem"
    bundle.write_text("")
    monkeypatch.setenv("ASYNCPOOL_SSL", "verify-full")
    monkeypatch.setenv("ASYNCPOOL_SSL_ROOT_CERT", str(bundle))
    conninfo, kwargs = GuardedLogin("postgresql://app:pw@db.example.com/app").psycopg_args()
    assert kwargs["sslmode"] == "verify-full"
    assert kwargs["sslrootcert"] == str(bundle)
    assert "require_auth" not in kwargs
    assert kwargs["password"] == "pw"  # pragma: allowlist secret
    assert "pw" not in conninfo.replace("app", "")
    monkeypatch.delenv("ASYNCPOOL_SSL")
    monkeypatch.delenv("ASYNCPOOL_SSL_ROOT_CERT")
    _, local = GuardedLogin("postgresql://app:pw@127.0.0.1/app").psycopg_args()
    assert local["require_auth"] == "gss,none,scram-sha-256,sspi"
    # libpq reads an empty require_auth as "any method": nothing allowed stays nothing.
    monkeypatch.setenv("ASYNCPOOL_REQUIRE_AUTH", "!password,!md5,!scram-sha-256,!gss,!sspi,!none")
    _, none = GuardedLogin("postgresql://app:pw@127.0.0.1/app").psycopg_args()
    assert none["require_auth"] == "!gss,!md5,!none,!password,!scram-sha-256,!sspi"


async def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``python -m asyncpool.cli ...`` off the event loop (the fake server runs on it)."""
    return await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "asyncpool.cli", *args], capture_output=True,
        text=True, timeout=120, check=False, env=env)


@pytest.mark.parametrize("auth", ["password", "md5"])
async def test_pgbench_gives_an_impostor_nothing(auth: str) -> None:
    """pgbench gets the pool's rules as libpq settings (``require_auth`` here, where TLS does
    not verify the server): it sends no password; a pgbench whose libpq is older than 16 cannot
    take the setting, and the run says so."""
    async with FakeServer(tls="refuse", auth=auth) as fake:  # type: ignore[arg-type]
        done = await _cli("bench", "--dsn", _dsn(fake.port), "--driver", "asyncpool",
                          "--pgbench", "--clients", "1", "--duration", "1")
    assert done.returncode != 0
    assert "pgbench" in done.stderr
    assert fake.received == []
    assert SECRET.encode() not in fake.raw_bytes_received
    for piece in (SECRET, ESCAPED):
        assert piece not in done.stdout + done.stderr


async def test_pgbench_gets_the_dsns_tls_setting(tmp_path: Path) -> None:
    """``sslmode=verify-full`` in the DSN reaches pgbench: against a server that refuses TLS
    it does not fall back to a plain connection (libpq's default, ``prefer``, would, and then
    send the password to whoever asks for it in clear)."""
    from asyncpool.testing.mitm import write_self_signed

    ca, _ = write_self_signed(tmp_path)
    async with FakeServer(tls="refuse", auth="password") as fake:
        dsn = f"{_dsn(fake.port)}?sslmode=verify-full&sslrootcert={ca}"
        done = await _cli("bench", "--dsn", dsn, "--driver", "asyncpool", "--pgbench",
                          "--clients", "1", "--duration", "1")
    assert done.returncode != 0
    # pgbench's own error: it dialled, asked for TLS, was refused, and stopped there.
    assert "server does not support SSL, but SSL was required" in done.stderr
    assert fake.received == []
    assert SECRET.encode() not in fake.raw_bytes_received


@pytest.mark.parametrize("auth", ["password", "md5"])
async def test_plan_reads_limits_under_the_pools_rules(auth: str) -> None:
    """``asyncpool plan --dsn`` logs in as a pool would: the impostor is sent nothing and the
    plan says why the limits stayed unknown; a password for another machine without verified
    TLS is refused before anything is dialled."""
    async with FakeServer(tls="refuse", auth=auth) as fake:  # type: ignore[arg-type]
        done = await _cli("plan", "--instances", "10", "--max-size", "1", "--dsn",
                          _dsn(fake.port))
    assert fake.logins, "the fake server was never dialled: the test proves nothing"
    assert fake.received == []
    assert "AuthMethodRefusedError" in done.stdout
    remote = await _cli("plan", "--instances", "10", "--max-size", "1", "--dsn",
                        f"postgresql://app:{ESCAPED}@db.example.com:5432/app")
    assert "over TLS that verifies the server" in remote.stdout
    for piece in (SECRET, ESCAPED):
        assert piece not in done.stdout + done.stderr + remote.stdout + remote.stderr


def _pgbench_libpq_major() -> int:
    """The major version of the libpq pgbench runs with (the one it was built with on Debian)."""
    from asyncpool.load.pgbench import pgbench_binary

    done = subprocess.run([pgbench_binary(), "--version"], capture_output=True, text=True,
                          check=True, timeout=30)
    return int(done.stdout.split()[2].split(".")[0])


@pytest.mark.skipif(_pgbench_libpq_major() >= 16, reason="a libpq >= 16 reads sslrootcert=system")
@pytest.mark.parametrize("root", ["sslrootcert=system", "no sslrootcert"])
async def test_pgbench_without_the_system_cas_says_how_to_name_them(
    root: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The pool verifies against the system CAs for ``sslrootcert=system`` and where no root
    certificate is named; a pgbench with libpq 15 reads "system" as a file name, and looks for
    ~/.postgresql/root.crt otherwise. The run says to name the CA bundle, and sends nothing."""
    from asyncpool.load.pgbench import PgbenchError, run_pgbench

    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.postgresql/root.crt
    query = "sslmode=verify-full" + ("&sslrootcert=system" if root == "sslrootcert=system" else "")
    async with FakeServer(tls="self-signed", auth="password") as fake:
        with pytest.raises(PgbenchError) as info:
            await run_pgbench(f"{_dsn(fake.port)}?{query}", target="fake", clients=1,
                              duration=1, query="SELECT 1", prepared_statements="off")
    message = str(info.value)
    assert "pgbench failed" not in message  # not libpq's bare words
    assert "Give sslrootcert the path of a CA bundle" in message
    assert "libpq >= 16" in message
    assert fake.received == []
    assert SECRET not in message
