"""The testcontainers backend: PostgreSQL + PgBouncer >= 1.21 in Docker, configured like compose.

Tests marked `docker` need a Docker engine and skip, saying why, when none answers. The others
run everywhere: they check the backend's wiring and its behaviour without an engine.
"""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest
import yaml

from asyncpool.testing.admin import admin_command
from asyncpool.testing.containers import (
    ENTRYPOINT_SCRIPT,
    PGBOUNCER_DOCKERFILE_DIR,
    PGBOUNCER_IMAGE,
    POSTGRES_COMMAND,
    POSTGRES_IMAGE,
    ContainerStack,
    docker_unavailable_reason,
    pgbouncer_environment,
)
from asyncpool.testing.external import ExternalPgBouncer
from asyncpool.testing.harness_error import HarnessError
from asyncpool.testing.pgbouncer import shared_settings
from asyncpool.testing.ports import free_port
from asyncpool.testing.postgres import Role

ROOT = Path(__file__).resolve().parents[1]


# -- without Docker -----------------------------------------------------------------------------


def test_importing_the_backend_needs_neither_docker_nor_testcontainers() -> None:
    code = (
        "import sys, asyncpool.testing.containers\n"
        "loaded = [m for m in sys.modules if m.split('.')[0] in ('docker', 'testcontainers')]\n"
        "assert not loaded, loaded\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_an_unreachable_engine_is_reported_with_its_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TC_HOST", raising=False)
    monkeypatch.setenv("TESTCONTAINERS_HOST_OVERRIDE", "127.0.0.1")
    monkeypatch.setenv("DOCKER_HOST", f"tcp://127.0.0.1:{free_port()}")  # nothing listens there
    reason = docker_unavailable_reason()
    assert reason is not None
    assert reason.startswith("no Docker engine reachable: "), reason
    assert len(reason) > len("no Docker engine reachable: ") + 10, "the cause must be in the reason"
    with pytest.raises(HarnessError, match="no Docker engine reachable: "):
        ContainerStack.start()


def test_the_backend_runs_what_compose_runs() -> None:
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    assert compose["services"]["postgres"]["image"] == POSTGRES_IMAGE
    assert compose["services"]["pgbouncer"]["image"] == PGBOUNCER_IMAGE
    assert (ROOT / compose["services"]["pgbouncer"]["build"]).resolve() == PGBOUNCER_DOCKERFILE_DIR
    assert [str(c) for c in compose["services"]["postgres"]["command"]] == POSTGRES_COMMAND
    version = re.search(r":v?(\d+)\.(\d+)", PGBOUNCER_IMAGE)
    assert version is not None
    assert (int(version.group(1)), int(version.group(2))) >= (1, 21)
    # Same entrypoint script; every variable handed to it is one it reads.
    assert ENTRYPOINT_SCRIPT == ROOT / "deploy" / "pgbouncer" / "entrypoint.sh"
    script = ENTRYPOINT_SCRIPT.read_text()
    via_value = set(re.findall(r"value ([A-Z][A-Z0-9_]*)", script))  # NAME or NAME_FILE
    read = set(re.findall(r"\$\{?([A-Z][A-Z0-9_]*)", script)) | via_value | {f"{n}_FILE" for n in via_value}
    env = pgbouncer_environment(
        db_host="postgres",
        app=Role("app", "x"),
        admin=Role("pgb_admin", "y"),
        overrides={"default_pool_size": 5},
    )
    assert set(env) <= read, set(env) - read
    # The settings are the shared file, verbatim; passwords travel as files, not values.
    parsed = dict(
        line.split("=", 1)
        for line in env["PGBOUNCER_SETTINGS"].splitlines()
        if re.match(r"^[a-z_]+\s*=", line)
    )
    assert {k.strip(): v.strip() for k, v in parsed.items()} == shared_settings()
    assert env["PGBOUNCER_OVERRIDES"] == "default_pool_size = 5"
    for key, value in env.items():
        assert value not in {"x", "y"}, f"{key} carries a password"
        if "PASSWORD" in key:
            assert key.endswith("_FILE"), key


# -- with Docker --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def container_stack() -> Iterator[ContainerStack]:
    reason = docker_unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    with ContainerStack.start() as stack:
        yield stack


@pytest.mark.docker
def test_container_pooler_has_the_harness_shape(container_stack: ContainerStack) -> None:
    pooler = container_stack.pgbouncer
    assert isinstance(pooler, ExternalPgBouncer)
    assert pooler.supports_prepared_statements
    assert not pooler.controllable
    assert container_stack.dsn().startswith("postgresql://app:")
    assert container_stack.admin_dsn is not None
    assert container_stack.admin_dsn.endswith("/pgbouncer")
    assert pooler.port > 0


@pytest.mark.docker
async def test_container_pgbouncer_runs_the_shared_settings(container_stack: ContainerStack) -> None:
    assert container_stack.admin_dsn is not None
    rows = await admin_command(container_stack.admin_dsn, "SHOW CONFIG")
    running = {row["key"]: str(row["value"] if row["value"] is not None else "") for row in rows}
    mismatched = {k: (v, running.get(k)) for k, v in shared_settings().items() if running.get(k) != v}
    assert mismatched == {}
    version = await admin_command(container_stack.admin_dsn, "SHOW VERSION")
    found = re.search(r"(\d+)\.(\d+)", str(version[0]["version"]))
    assert found is not None
    assert (int(found.group(1)), int(found.group(2))) >= (1, 21)


@pytest.mark.docker
async def test_container_pgbouncer_pools_transactions_with_named_statements(
    container_stack: ContainerStack,
) -> None:
    async def client(n: int) -> int:
        conn = await asyncpg.connect(container_stack.dsn())  # statement cache on
        try:
            total = 0
            for i in range(20):
                async with conn.transaction():
                    total += await conn.fetchval("SELECT $1::int + $2::int", n, i)
            return total
        finally:
            await conn.close()

    results = await asyncio.gather(*(client(n) for n in range(30)))
    assert results == [20 * n + 190 for n in range(30)]
    assert container_stack.admin_dsn is not None
    pools = await admin_command(container_stack.admin_dsn, "SHOW POOLS")
    app = [p for p in pools if p["database"] == "app" and p["user"] == "app"]
    assert app
    assert app[0]["pool_mode"] == "transaction"


@pytest.mark.docker
async def test_container_pgbouncer_rejects_a_wrong_password(container_stack: ContainerStack) -> None:
    pooler = container_stack.pgbouncer
    wrong = Role("app", "not-the-password").dsn(pooler.host, pooler.port, "app")
    with pytest.raises(
        (asyncpg.InvalidPasswordError, asyncpg.ProtocolViolationError), match="authentication failed"
    ):
        await asyncpg.connect(wrong)
