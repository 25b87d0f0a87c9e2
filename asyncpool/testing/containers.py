"""PostgreSQL and a current PgBouncer in Docker containers (testcontainers), for machines with a
Docker engine but without local server binaries (CI runners, macOS laptops).

The stack is the one compose.yaml describes: the same images, the same PostgreSQL bootstrap script
(deploy/postgres/initdb/10-roles.sh) and the same PgBouncer entrypoint
(deploy/pgbouncer/entrypoint.sh) fed with asyncpool/testing/pgbouncer.ini, so transaction pooling,
SCRAM-SHA-256 and max_prepared_statements match the harness's own servers.

    reason = docker_unavailable_reason()
    if reason is None:
        with ContainerStack.start() as stack:
            stack.dsn()          # app user through PgBouncer
            stack.admin_dsn      # PgBouncer's admin console
            stack.pgbouncer      # an ExternalPgBouncer, the shape the suite's `pooler` fixture uses

testcontainers and docker are imported inside functions only: importing this module costs nothing
and works on machines without them.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from typing import TYPE_CHECKING

from asyncpool.testing.binaries import REPO_ROOT
from asyncpool.testing.external import ExternalPgBouncer
from asyncpool.testing.harness_error import HarnessError
from asyncpool.testing.postgres import Role
from asyncpool.testing.sync import run_sync

if TYPE_CHECKING:
    from testcontainers.core.container import DockerContainer
    from testcontainers.core.network import Network

# Keep in step with compose.yaml (tests/test_containers.py checks that they are the same).
POSTGRES_IMAGE = (
    "postgres:17.6-alpine@sha256:ef257d85f76e48da1c64832459b59fcaba1a4dac97bf5d7450c77753542eee94"
)
# Built from deploy/pgbouncer/Dockerfile (Debian's patched PgBouncer 1.24.1) when not present.
PGBOUNCER_IMAGE = "asyncpool-pgbouncer:1.24.1-deb13u2"
PGBOUNCER_DOCKERFILE_DIR = REPO_ROOT / "deploy" / "pgbouncer"
POSTGRES_COMMAND = ["postgres", "-c", "max_connections=100", "-c", "password_encryption=scram-sha-256"]
PGBOUNCER_PORT = 6432
POSTGRES_ALIAS = "postgres"
# Where passwords are copied inside the containers (files, like Docker secrets; never env values).
SECRETS_DIR = "/tmp"  # noqa: S108 - a directory inside the throwaway containers

ENTRYPOINT_SCRIPT = REPO_ROOT / "deploy" / "pgbouncer" / "entrypoint.sh"
INITDB_SCRIPT = REPO_ROOT / "deploy" / "postgres" / "initdb" / "10-roles.sh"

UNREACHABLE = "no Docker engine reachable: "


def docker_unavailable_reason() -> str | None:
    """None when a Docker engine answers; otherwise why not, starting "no Docker engine reachable: ".

    Uses testcontainers' own client, so DOCKER_HOST, TC_HOST and ~/.testcontainers.properties are
    honoured exactly as when containers are started.
    """
    try:
        from testcontainers.core.docker_client import DockerClient
    except ImportError as exc:
        return f"{UNREACHABLE}testcontainers is not installed ({exc}); pip install -e '.[dev]'"
    try:
        client = DockerClient(timeout=5)
    except Exception as exc:  # docker.errors.DockerException and whatever the transport raises
        return f"{UNREACHABLE}{_one_line(exc)}"
    try:
        client.client.ping()
    except Exception as exc:
        return f"{UNREACHABLE}{_one_line(exc)}"
    finally:
        client.client.close()
    return None


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def shared_settings_text() -> str:
    """asyncpool/testing/pgbouncer.ini, verbatim: what the harness, compose and Terraform run."""
    return resources.files("asyncpool.testing").joinpath("pgbouncer.ini").read_text()


def pgbouncer_environment(
    *,
    db_host: str,
    app: Role,
    admin: Role,
    overrides: dict[str, str | int] | None = None,
    secrets_dir: str = SECRETS_DIR,
) -> dict[str, str]:
    """The environment deploy/pgbouncer/entrypoint.sh gets in the PgBouncer container.

    Passwords are not in it: they are copied into `secrets_dir` as files (*_PASSWORD_FILE), as
    Docker secrets would be.
    """
    env = {
        "PGBOUNCER_SETTINGS": shared_settings_text(),
        "PGBOUNCER_CONF_DIR": f"{SECRETS_DIR}/pgbouncer",
        "PGBOUNCER_LISTEN_ADDR": "0.0.0.0",
        "PGBOUNCER_LISTEN_PORT": str(PGBOUNCER_PORT),
        "DB_HOST": db_host,
        "DB_PORT": "5432",
        "APP_DB_USER": app.name,
        "APP_DB_PASSWORD_FILE": f"{secrets_dir}/app_db_password",
        # The throwaway database container has no TLS; named, as the entrypoint requires.
        "PGBOUNCER_SERVER_TLS_SSLMODE": "disable",
        # Fault tests PAUSE and RESUME this private, loopback-published PgBouncer: an admin user
        # here, named explicitly (deployments get only the read-only pgb_stats).
        "PGBOUNCER_ADMIN_USER": admin.name,
        "PGBOUNCER_ADMIN_PASSWORD_FILE": f"{secrets_dir}/pgbouncer_admin_password",
    }
    if overrides:
        env["PGBOUNCER_OVERRIDES"] = "\n".join(f"{k} = {v}" for k, v in overrides.items())
    return env


def _build_pgbouncer_image() -> None:
    """Build deploy/pgbouncer/Dockerfile as PGBOUNCER_IMAGE unless Docker already has it."""
    import docker  # type: ignore[import-untyped]

    client = docker.from_env()
    try:
        client.images.get(PGBOUNCER_IMAGE)
    except docker.errors.ImageNotFound:
        client.images.build(path=str(PGBOUNCER_DOCKERFILE_DIR), tag=PGBOUNCER_IMAGE, rm=True)


@dataclass
class ContainerStack:
    """PostgreSQL and PgBouncer containers on a private Docker network.

    `pgbouncer` is an `ExternalPgBouncer` (label ``pgbouncer-container``): tests use it like the
    harness's servers. `postgres_dsn` reaches PostgreSQL directly as `app`.
    """

    pgbouncer: ExternalPgBouncer
    postgres_dsn: str = field(repr=False)
    postgres_admin_dsn: str = field(repr=False)
    app: Role = field(repr=False)
    _containers: list[DockerContainer] = field(default_factory=list, repr=False)
    _network: Network | None = field(default=None, repr=False)

    def dsn(self, **params: str) -> str:
        """The app user's DSN through PgBouncer."""
        return self.pgbouncer.dsn(**params)

    @property
    def admin_dsn(self) -> str | None:
        """PgBouncer's admin console (user pgb_admin, database pgbouncer)."""
        return self.pgbouncer.admin_dsn

    @classmethod
    def start(
        cls,
        *,
        pgbouncer_overrides: dict[str, str | int] | None = None,
        startup_timeout: float = 120.0,
    ) -> ContainerStack:
        """Start both containers; raise `HarnessError` (with the reason) when that is impossible."""
        reason = docker_unavailable_reason()
        if reason is not None:
            raise HarnessError(reason)
        for script in (ENTRYPOINT_SCRIPT, INITDB_SCRIPT):
            if not script.is_file():
                raise HarnessError(f"{script} is missing: run from a checkout of the asyncpool repository")

        from testcontainers.core.container import DockerContainer
        from testcontainers.core.network import Network
        from testcontainers.core.wait_strategies import LogMessageWaitStrategy

        superuser = Role("postgres", secrets.token_urlsafe(18))
        app = Role("app", secrets.token_urlsafe(18))
        admin = Role("pgb_admin", secrets.token_urlsafe(18))
        postgres_env = {
            "POSTGRES_USER": superuser.name,
            "POSTGRES_DB": "postgres",
            "POSTGRES_PASSWORD_FILE": f"{SECRETS_DIR}/postgres_password",
            "POSTGRES_INITDB_ARGS": "--auth-host=scram-sha-256 --auth-local=scram-sha-256",
            "APP_DB_USER": app.name,
            "APP_DB_NAME": "app",
            "APP_DB_PASSWORD_FILE": f"{SECRETS_DIR}/app_db_password",
        }
        _build_pgbouncer_image()
        started: list[DockerContainer] = []
        network = Network().create()
        try:
            postgres = (
                DockerContainer(POSTGRES_IMAGE)
                .with_command(POSTGRES_COMMAND)
                .with_network(network)
                .with_network_aliases(POSTGRES_ALIAS)
                .with_exposed_ports(5432)
                .with_envs(**postgres_env)
                .with_copy_into_container(
                    superuser.password.encode(), postgres_env["POSTGRES_PASSWORD_FILE"], 0o444
                )
                .with_copy_into_container(app.password.encode(), postgres_env["APP_DB_PASSWORD_FILE"], 0o444)
                .with_copy_into_container(
                    INITDB_SCRIPT.read_bytes(), "/docker-entrypoint-initdb.d/10-roles.sh", 0o755
                )
                # The image starts a temporary server for the init scripts, then the real one.
                .waiting_for(
                    LogMessageWaitStrategy(
                        "database system is ready to accept connections", times=2
                    ).with_startup_timeout(int(startup_timeout))
                )
            )
            postgres.start()
            started.append(postgres)

            pgbouncer_env = pgbouncer_environment(
                db_host=POSTGRES_ALIAS, app=app, admin=admin, overrides=pgbouncer_overrides
            )
            pgbouncer = (
                DockerContainer(
                    PGBOUNCER_IMAGE,
                    entrypoint=["/bin/sh", "-c", ENTRYPOINT_SCRIPT.read_text(), "pgbouncer-entrypoint"],
                    # max_client_conn = 1000 needs more than the usual 1024 descriptors.
                    ulimits=[{"name": "nofile", "soft": 4096, "hard": 4096}],
                )
                .with_command(["/usr/sbin/pgbouncer"])
                .with_network(network)
                .with_exposed_ports(PGBOUNCER_PORT)
                .with_envs(**pgbouncer_env)
                .with_copy_into_container(app.password.encode(), pgbouncer_env["APP_DB_PASSWORD_FILE"], 0o444)
                .with_copy_into_container(
                    admin.password.encode(), pgbouncer_env["PGBOUNCER_ADMIN_PASSWORD_FILE"], 0o444
                )
                .waiting_for(LogMessageWaitStrategy("process up").with_startup_timeout(int(startup_timeout)))
            )
            pgbouncer.start()
            started.append(pgbouncer)

            pg_host = postgres.get_container_host_ip()
            pg_port = postgres.get_exposed_port(5432)
            pgb_host = pgbouncer.get_container_host_ip()
            pgb_port = pgbouncer.get_exposed_port(PGBOUNCER_PORT)
            stack = cls(
                pgbouncer=ExternalPgBouncer(
                    "pgbouncer-container",
                    app.dsn(pgb_host, pgb_port, "app"),
                    admin.dsn(pgb_host, pgb_port, "pgbouncer"),
                    supports_prepared_statements=True,
                ),
                postgres_dsn=app.dsn(pg_host, pg_port, "app"),
                postgres_admin_dsn=superuser.dsn(pg_host, pg_port, "postgres"),
                app=app,
                _containers=started,
                _network=network,
            )
            _wait_for_login(stack.dsn(), startup_timeout, _logs(started))
        except BaseException:
            _stop(started, network)
            raise
        return stack

    def stop(self) -> None:
        _stop(self._containers, self._network)
        self._containers = []
        self._network = None

    def __enter__(self) -> ContainerStack:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _stop(containers: list[DockerContainer], network: Network | None) -> None:
    # Best effort: testcontainers' Ryuk removes whatever is left when the session ends.
    for container in reversed(containers):
        with contextlib.suppress(Exception):
            container.stop()
    if network is not None:
        with contextlib.suppress(Exception):
            network.remove()


def _logs(containers: list[DockerContainer]) -> Callable[[], str]:
    """A callable giving the containers' log tails, for error messages."""

    def tail() -> str:
        parts = []
        for container in containers:
            try:
                out, err = container.get_logs()
            except Exception as exc:
                parts.append(f"{container.image}: logs unavailable ({exc})")
                continue
            text = (out + err).decode(errors="replace")[-1500:]
            parts.append(f"--- {container.image}\n{text}")
        return "\n".join(parts)

    return tail


def _wait_for_login(dsn: str, timeout: float, logs: Callable[[], str]) -> None:
    """PgBouncer is up before PostgreSQL accepts its logins: wait for a real query through it."""
    import asyncpg

    async def probe() -> str | None:
        deadline = time.monotonic() + timeout
        last = "no attempt"
        while time.monotonic() < deadline:
            try:
                conn = await asyncpg.connect(dsn, timeout=5, statement_cache_size=0)
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                last = _one_line(exc)
                await asyncio.sleep(0.25)
                continue
            try:
                await conn.execute("SELECT 1")
            finally:
                await conn.close()
            return None
        return last

    error = run_sync(probe())
    if error is not None:
        raise HarnessError(
            f"no login through the PgBouncer container in {timeout:.0f} s ({error}):\n{logs()}"
        )
