"""compose.yaml: parses, holds no literal secret, and runs the harness's PgBouncer settings.

No Docker engine here, so compose is checked by its structure, and its PgBouncer is checked by
running the container's entrypoint (deploy/pgbouncer/entrypoint.sh) with the environment compose
gives it, on the harness's current PgBouncer, then reading SHOW CONFIG back.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import secrets
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import yaml

from asyncpool.testing import PostgresServer
from asyncpool.testing.admin import admin_command
from asyncpool.testing.binaries import current_pgbouncer
from asyncpool.testing.pgbouncer import shared_settings
from asyncpool.testing.ports import free_port, wait_for_port
from asyncpool.testing.postgres import Role
from asyncpool.testing.process import ServerProcess, chown_tree, make_workdir, remove_tree

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "compose.yaml"
ENV_EXAMPLE = ROOT / ".env.example"
ENTRYPOINT = ROOT / "deploy" / "pgbouncer" / "entrypoint.sh"
SHARED_INI = ROOT / "asyncpool" / "testing" / "pgbouncer.ini"

CREDENTIAL = re.compile(r"PASSWORD|SECRET|TOKEN|PRIVATE_KEY|API_KEY", re.IGNORECASE)
INTERPOLATION = re.compile(r"\$\{([A-Z_][A-Z0-9_]*)(?::?([-?])([^}]*))?\}")


def load_compose() -> dict[str, Any]:
    doc = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(doc, dict)
    return doc


def env_example() -> dict[str, str]:
    values = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            values[key.strip()] = value.strip()
    return values


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {str(k): str(v) for k, v in env.items()}


def interpolate(value: str, env: dict[str, str]) -> str:
    """Compose's ${VAR}, ${VAR:-default} and ${VAR:?error}, from `env`."""

    def sub(match: re.Match[str]) -> str:
        name, op, arg = match.group(1), match.group(2), match.group(3)
        if env.get(name):
            return env[name]
        if op == "-":
            return arg
        raise KeyError(f"{name} is required ({arg})")

    return INTERPOLATION.sub(sub, value)


def mounts(service: dict[str, Any]) -> dict[str, str]:
    """Container path -> host source (bind mounts only, relative to the repository)."""
    found = {}
    for volume in service.get("volumes", []):
        parts = volume.split(":") if isinstance(volume, str) else [volume["source"], volume["target"]]
        if parts[0].startswith("."):
            found[parts[1]] = parts[0]
    return found


def image_version(image: str) -> tuple[int, ...]:
    match = re.search(r":v?(\d+(?:\.\d+)+)", image)
    assert match, f"{image} is not pinned to a version"
    return tuple(int(p) for p in match.group(1).split("."))


# -- the checks ---------------------------------------------------------------------------------


def secret_problems(doc: dict[str, Any], example: dict[str, str]) -> list[str]:
    """Credentials reach containers only as Docker secrets whose values come from .env."""
    problems = _declared_secret_problems(doc, example)
    for sname, service in doc["services"].items():
        problems += _service_secret_problems(sname, service, doc.get("secrets") or {})
    text = COMPOSE.read_text()
    for name in re.findall(r"\$\{([A-Z_]*(?:PASSWORD|SECRET|TOKEN)[A-Z_]*)", text):
        problems.append(f"{name} is interpolated into compose.yaml (use a secret)")
    return problems


def _declared_secret_problems(doc: dict[str, Any], example: dict[str, str]) -> list[str]:
    problems = []
    declared = doc.get("secrets") or {}
    for name, spec in declared.items():
        source = spec.get("environment")
        if not source:
            problems.append(f"secret {name} is not read from an environment variable (.env)")
        elif source not in example:
            problems.append(f"secret {name} reads {source}, which .env.example does not list")
        elif example[source]:
            problems.append(f".env.example gives {source} a value: leave it empty")
    return problems


def _service_secret_problems(sname: str, service: dict[str, Any], declared: dict[str, Any]) -> list[str]:
    problems = []
    for key, value in environment(service).items():
        if not CREDENTIAL.search(key):
            continue
        if key.endswith(("_FILE", "__FILE")):
            target = value.removeprefix("/run/secrets/")
            if not value.startswith("/run/secrets/") or target not in (service.get("secrets") or []):
                problems.append(f"{sname}: {key}={value} is not one of its Docker secrets")
            elif target not in declared:
                problems.append(f"{sname}: secret {target} is not declared")
        else:
            problems.append(f"{sname}: {key} is passed as a plain environment value")
    for part in [*map(str, service.get("command") or []), *map(str, service.get("entrypoint") or [])]:
        key, eq, _ = part.partition("=")
        if eq and re.search(r"(PASSWORD|SECRET|TOKEN)$", key, re.IGNORECASE):
            problems.append(f"{sname}: a credential on the command line: {key}=...")
    return problems


def interpolation_problems(text: str, example: dict[str, str]) -> list[str]:
    problems = []
    for match in INTERPOLATION.finditer(text):
        name, op = match.group(1), match.group(2)
        if op != "-" and name not in example:
            problems.append(f"${{{name}}} has no default and is not in .env.example")
    return problems


def pgbouncer_problems(doc: dict[str, Any]) -> list[str]:
    problems = []
    service = doc["services"]["pgbouncer"]
    env = environment(service)
    if image_version(service["image"])[:2] < (1, 21):
        problems.append(f"{service['image']} is older than PgBouncer 1.21 (no max_prepared_statements)")
    volume_of = mounts(service)
    settings_path = env.get("PGBOUNCER_SETTINGS_FILE", "")
    if (ROOT / volume_of.get(settings_path, "missing")).resolve() != SHARED_INI.resolve():
        problems.append(f"PGBOUNCER_SETTINGS_FILE={settings_path} is not asyncpool/testing/pgbouncer.ini")
    entrypoint = service.get("entrypoint") or []
    script = entrypoint[-1] if entrypoint else ""
    if (ROOT / volume_of.get(script, "missing")).resolve() != ENTRYPOINT.resolve():
        problems.append("the entrypoint is not deploy/pgbouncer/entrypoint.sh")
    if "PGBOUNCER_SETTINGS" in env or "PGBOUNCER_OVERRIDES" in env:
        problems.append("compose changes the shared settings (PGBOUNCER_SETTINGS/_OVERRIDES)")
    if (service.get("depends_on") or {}).get("postgres", {}).get("condition") != "service_healthy":
        problems.append("pgbouncer does not wait for a healthy postgres")
    nofile = ((service.get("ulimits") or {}).get("nofile") or {}).get("soft", 1024)
    if nofile <= int(shared_settings()["max_client_conn"]) + int(shared_settings()["max_db_connections"]):
        problems.append(f"nofile {nofile} is too low for max_client_conn")
    return problems


def health_and_port_problems(doc: dict[str, Any]) -> list[str]:
    problems = []
    for name in ("postgres", "pgbouncer", "prometheus", "grafana"):
        test = (doc["services"][name].get("healthcheck") or {}).get("test")
        if not test or test[0] not in ("CMD", "CMD-SHELL"):
            problems.append(f"{name} has no healthcheck")
    for name, service in doc["services"].items():
        for port in service.get("ports", []):
            if not str(port).startswith("127.0.0.1:"):
                problems.append(f"{name} publishes {port} beyond the loopback interface")
    return problems


# -- structure ----------------------------------------------------------------------------------


def test_compose_parses_with_the_expected_services() -> None:
    doc = load_compose()
    assert set(doc["services"]) == {"postgres", "pgbouncer", "otel-collector", "prometheus", "grafana"}
    for name in ("postgres", "pgbouncer"):
        assert "profiles" not in doc["services"][name], f"{name} must start by default"
    for name in ("otel-collector", "prometheus", "grafana"):
        assert doc["services"][name]["profiles"] == ["observability"]
    assert image_pin_problems(doc) == []


DIGEST = re.compile(r"@sha256:[0-9a-f]{64}$")
DOCKERFILE = ROOT / "deploy" / "pgbouncer" / "Dockerfile"


def image_pin_problems(doc: dict[str, Any]) -> list[str]:
    """Every image is pinned by digest, or built here from a Dockerfile whose base is."""
    problems = []
    for name, service in doc["services"].items():
        image = str(service.get("image", ""))
        image_version(image)  # and named by its version, for people
        if "build" in service:
            dockerfile = ROOT / str(service["build"]) / "Dockerfile"
            bases = re.findall(r"^FROM\s+(\S+)", dockerfile.read_text(), re.MULTILINE)
            problems += [
                f"{name}: base {base} is not pinned by digest" for base in bases if not DIGEST.search(base)
            ]
        elif not DIGEST.search(image):
            problems.append(f"{name}: {image} is not pinned by digest")
    return problems


def test_image_pin_check_catches_a_tag() -> None:
    doc = load_compose()
    doc["services"]["grafana"]["image"] = "grafana/grafana:11.5.0"
    assert image_pin_problems(doc) == ["grafana: grafana/grafana:11.5.0 is not pinned by digest"]


def test_pgbouncer_image_is_the_patched_debian_build() -> None:
    """The Dockerfile installs Debian's PgBouncer and refuses a build without the 2026 CVE fixes,
    the same package (1.24.1-1+deb13u2 or later) the harness's current PgBouncer is."""
    service = load_compose()["services"]["pgbouncer"]
    assert (ROOT / str(service["build"])).resolve() == DOCKERFILE.parent
    text = DOCKERFILE.read_text()
    assert re.search(r"dpkg --compare-versions \"\$installed\" ge 1\.24\.1-1\+deb13u2", text)
    changelog = (
        Path(current_pgbouncer().command[0]).parent / "root/usr/share/doc/pgbouncer/changelog.Debian.gz"
    )
    if changelog.exists():  # the harness's own copy, unpacked from the same archive
        import gzip

        first = gzip.decompress(changelog.read_bytes()).decode().splitlines()[0]
        version = re.search(r"\(([^)]+)\)", first).group(1)  # type: ignore[union-attr]
        assert (
            subprocess.run(
                ["dpkg", "--compare-versions", version, "ge", "1.24.1-1+deb13u2"], check=False
            ).returncode
            == 0
        )
    assert "PGBOUNCER_ADMIN_USER" not in service["environment"]


def test_compose_holds_no_literal_secret() -> None:
    doc = load_compose()
    example = env_example()
    assert secret_problems(doc, example) == []
    assert interpolation_problems(COMPOSE.read_text(), example) == []
    for key, value in example.items():
        if CREDENTIAL.search(key):
            assert value == "", f".env.example gives {key} a value"
    ignored = subprocess.run(["git", "check-ignore", "-q", ".env"], cwd=ROOT, check=False)
    assert ignored.returncode == 0, ".env must be gitignored"
    tracked = subprocess.run(
        ["git", "ls-files", ".env"], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert tracked.stdout.strip() == "", ".env is tracked by git"


@pytest.mark.parametrize(
    ("service", "key", "value", "expected"),
    [
        ("postgres", "POSTGRES_PASSWORD", "s3cr3t-in-compose", "plain environment value"),
        ("pgbouncer", "APP_DB_PASSWORD", "${APP_DB_PASSWORD}", "plain environment value"),
        ("grafana", "GF_SECURITY_ADMIN_PASSWORD__FILE", "/etc/grafana/pw", "not one of its Docker secrets"),
    ],
)
def test_secret_check_catches_a_literal(service: str, key: str, value: str, expected: str) -> None:
    doc = load_compose()
    doc["services"][service]["environment"][key] = value
    problems = secret_problems(doc, env_example())
    assert any(expected in p for p in problems), problems


def test_secret_check_catches_a_secret_from_a_file_or_a_filled_example() -> None:
    doc = load_compose()
    doc["secrets"]["postgres_password"] = {"file": "./postgres_password.txt"}
    assert any("not read from an environment variable" in p for p in secret_problems(doc, env_example()))
    example = {**env_example(), "APP_DB_PASSWORD": "change-me"}  # pragma: allowlist secret
    assert any("gives APP_DB_PASSWORD a value" in p for p in secret_problems(load_compose(), example))


def test_pgbouncer_service_runs_the_shared_settings() -> None:
    assert pgbouncer_problems(load_compose()) == []
    settings = shared_settings()
    # The settings the issue asks for live in that one file.
    assert settings["pool_mode"] == "transaction"
    assert settings["auth_type"] == "scram-sha-256"
    assert int(settings["max_prepared_statements"]) > 0
    assert int(settings["max_client_conn"]) >= 1000
    assert 40 <= int(settings["default_pool_size"]) <= 50
    assert int(settings["max_db_connections"]) <= 50


def test_pgbouncer_check_catches_drift() -> None:
    doc = load_compose()
    doc["services"]["pgbouncer"]["image"] = "asyncpool-pgbouncer:1.18.0"
    assert any("older than PgBouncer 1.21" in p for p in pgbouncer_problems(doc))
    doc = load_compose()
    doc["services"]["pgbouncer"]["environment"]["PGBOUNCER_OVERRIDES"] = "pool_mode = session"
    assert any("changes the shared settings" in p for p in pgbouncer_problems(doc))
    doc = load_compose()
    doc["services"]["pgbouncer"]["volumes"][1] = "./deploy/pgbouncer.ini:/opt/asyncpool/pgbouncer.ini:ro"
    assert any("is not asyncpool/testing/pgbouncer.ini" in p for p in pgbouncer_problems(doc))


def test_postgres_has_room_for_the_pool() -> None:
    service = load_compose()["services"]["postgres"]
    command = " ".join(map(str, service["command"]))
    max_connections = int(re.search(r"max_connections=(\d+)", command).group(1))  # type: ignore[union-attr]
    assert max_connections >= int(shared_settings()["max_db_connections"]) + 10
    assert "password_encryption=scram-sha-256" in command
    assert "scram-sha-256" in environment(service)["POSTGRES_INITDB_ARGS"]
    assert mounts(service)["/docker-entrypoint-initdb.d"] == "./deploy/postgres/initdb"


def test_healthchecks_and_loopback_ports() -> None:
    doc = load_compose()
    assert health_and_port_problems(doc) == []
    doc["services"]["pgbouncer"]["ports"] = ["6432:6432"]
    del doc["services"]["postgres"]["healthcheck"]
    problems = health_and_port_problems(doc)
    assert any("beyond the loopback" in p for p in problems)
    assert any("postgres has no healthcheck" in p for p in problems)


def test_observability_profile_is_wired_to_the_dashboard() -> None:
    doc = load_compose()
    grafana = doc["services"]["grafana"]
    volume_of = mounts(grafana)
    dashboards = [target for target, source in volume_of.items() if source.endswith("grafana-dashboard.json")]
    assert volume_of[dashboards[0]] == "./examples/telemetry/grafana-dashboard.json"
    provisioning = ROOT / volume_of["/etc/grafana/provisioning"]
    provider = yaml.safe_load((provisioning / "dashboards" / "asyncpool.yaml").read_text())
    assert Path(dashboards[0]).parent == Path(provider["providers"][0]["options"]["path"])
    datasource = yaml.safe_load((provisioning / "datasources" / "prometheus.yaml").read_text())
    assert datasource["datasources"][0]["url"] == "http://prometheus:9090"

    collector = yaml.safe_load(
        (ROOT / mounts(doc["services"]["otel-collector"])["/etc/otelcol/config.yaml"]).read_text()
    )
    exporter_port = collector["exporters"]["prometheus"]["endpoint"].rsplit(":", 1)[1]
    assert collector["service"]["pipelines"]["metrics"]["exporters"] == ["prometheus"]
    assert "otlp" in collector["service"]["pipelines"]["metrics"]["receivers"]
    prometheus = yaml.safe_load(
        (ROOT / mounts(doc["services"]["prometheus"])["/etc/prometheus/prometheus.yml"]).read_text()
    )
    targets = [
        t for job in prometheus["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]
    ]
    assert f"otel-collector:{exporter_port}" in targets
    assert {"127.0.0.1:4317:4317", "127.0.0.1:4318:4318"} <= {
        str(p).split("#")[0].strip() for p in doc["services"]["otel-collector"]["ports"]
    }


# -- the real thing: compose's PgBouncer environment on a real PgBouncer >= 1.21 ---------------


@pytest.fixture(scope="module")
def compose_pgbouncer() -> Iterator[tuple[PostgresServer, str, Role]]:
    """PostgreSQL from the harness, and PgBouncer started by the compose entrypoint with the
    compose service's environment (container paths and addresses mapped to loopback ones)."""
    if os.environ.get("ASYNCPOOL_TEST_POSTGRES_DSN"):
        pytest.skip("ASYNCPOOL_TEST_POSTGRES_DSN is set: tests that need harness-controlled servers skip")
    binary = current_pgbouncer()  # HarnessError says how to get one: a missing binary fails the test
    postgres = PostgresServer(max_connections=80)
    postgres.start()
    workdir = make_workdir("pgbouncer")
    process: ServerProcess | None = None
    try:
        service = load_compose()["services"]["pgbouncer"]
        env = {k: interpolate(v, {}) for k, v in environment(service).items()}
        volume_of = mounts(service)
        port = free_port()
        secrets_dir = workdir / "secrets"
        secrets_dir.mkdir()
        stats = Role("pgb_stats", secrets.token_hex(18))
        passwords = {"app_db_password": postgres.app.password, "pgbouncer_stats_password": stats.password}
        mapped = {}
        for key, value in env.items():
            if value in volume_of:  # a mounted file: use the repository's copy
                copy = workdir / Path(value).name
                shutil.copyfile(ROOT / volume_of[value], copy)
                mapped[key] = str(copy)
            elif value.startswith("/run/secrets/"):
                name = value.removeprefix("/run/secrets/")
                (secrets_dir / name).write_text(passwords[name] + "\n")
                mapped[key] = str(secrets_dir / name)
            else:
                mapped[key] = value
        mapped.update(
            PGBOUNCER_CONF_DIR=str(workdir / "conf"),
            PGBOUNCER_LISTEN_ADDR=postgres.host,
            PGBOUNCER_LISTEN_PORT=str(port),
            DB_HOST=postgres.host,
            DB_PORT=str(postgres.port),
        )
        assert set(mapped) == set(env), "the test must not add settings compose does not give"
        assert mapped["APP_DB_USER"] == postgres.app.name
        assert env["PGBOUNCER_STATS_USER"] == stats.name
        chown_tree(workdir)
        script = workdir / "entrypoint.sh"
        shutil.copyfile(ENTRYPOINT, script)
        process = ServerProcess(
            "compose-pgbouncer",
            [
                "env",
                "-i",
                "PATH=/usr/bin:/bin",
                *(f"{k}={v}" for k, v in mapped.items()),
                "sh",
                str(script),
                *binary.command,
            ],
            workdir / "pgbouncer.log",
            workdir,
        )
        chown_tree(workdir)
        process.start()
        if not wait_for_port(postgres.host, port, 20):
            raise AssertionError(f"PgBouncer did not start:\n{process.log_tail()}")
        yield postgres, f"{postgres.host}:{port}", stats
    finally:
        if process is not None:
            process.stop()
        remove_tree(workdir)
        postgres.stop()


def test_compose_pgbouncer_runs_exactly_the_harness_settings(
    compose_pgbouncer: tuple[PostgresServer, str, Role],
) -> None:
    _, address, admin = compose_pgbouncer
    host, port = address.split(":")
    rows = asyncio.run(admin_command(admin.dsn(host, int(port), "pgbouncer"), "SHOW CONFIG"))
    running = {row["key"]: str(row["value"] if row["value"] is not None else "") for row in rows}
    expected = shared_settings()
    mismatched = {k: (v, running.get(k)) for k, v in expected.items() if running.get(k) != v}
    assert mismatched == {}, mismatched
    assert running["listen_port"] == port
    version = asyncio.run(admin_command(admin.dsn(host, int(port), "pgbouncer"), "SHOW VERSION"))
    major, minor = re.search(r"(\d+)\.(\d+)", str(version[0]["version"])).groups()  # type: ignore[union-attr]
    assert (int(major), int(minor)) >= (1, 21)


def test_compose_pgbouncer_does_scram_and_named_prepared_statements(
    compose_pgbouncer: tuple[PostgresServer, str, Role],
) -> None:
    postgres, address, _ = compose_pgbouncer
    host, port = address.split(":")
    dsn = postgres.app.dsn(host, int(port), postgres.database)

    async def client(n: int) -> int:
        # asyncpg's statement cache on: named prepared statements through transaction pooling.
        conn = await asyncpg.connect(dsn)
        try:
            total = 0
            for i in range(20):
                async with conn.transaction():
                    total += await conn.fetchval("SELECT $1::int + $2::int", n, i)
            return total
        finally:
            await conn.close()

    async def main() -> list[int]:
        return await asyncio.gather(*(client(n) for n in range(20)))

    assert asyncio.run(main()) == [20 * n + 190 for n in range(20)]

    async def wrong_password() -> None:
        await asyncpg.connect(
            Role(postgres.app.name, "not-the-password").dsn(host, int(port), postgres.database)
        )

    # PgBouncer reports a bad SCRAM proof as 08P01 "SASL authentication failed".
    with pytest.raises(
        (asyncpg.InvalidPasswordError, asyncpg.ProtocolViolationError), match="authentication failed"
    ):
        asyncio.run(wrong_password())


def test_secret_check_catches_a_password_on_the_command_line() -> None:
    doc = load_compose()
    doc["services"]["postgres"]["command"] += ["-c", "PGPASSWORD=oops"]
    assert any("command line" in p for p in secret_problems(doc, env_example()))


def dashboard_datasource_problems(dashboard: dict[str, Any], uid: str) -> list[str]:
    """Every datasource the dashboard names is `uid`, or a Prometheus datasource variable."""
    problems = []
    variables = {
        v["name"]: v for v in dashboard.get("templating", {}).get("list", []) if v.get("type") == "datasource"
    }
    refs = {json.dumps(ds, sort_keys=True) for ds in _datasources(dashboard)}
    if not refs:
        problems.append("the dashboard names no datasource")
    for ref in map(json.loads, refs):
        ds_uid = ref.get("uid", "") if isinstance(ref, dict) else ref
        name = re.fullmatch(r"\$\{?(\w+)\}?", ds_uid or "")
        if name:
            variable = variables.get(name.group(1))
            if variable is None or variable.get("query") != "prometheus":
                problems.append(f"{ds_uid} is not a Prometheus datasource variable")
        elif ds_uid != uid:
            problems.append(f"datasource {ref} is not the provisioned {uid!r}")
    return problems


def test_the_dashboard_uses_the_provisioned_datasource() -> None:
    """compose mounts examples/telemetry/grafana-dashboard.json: its queries must reach the
    Prometheus datasource provisioned next to it (by uid, or through a datasource variable)."""
    dashboard_path = ROOT / "examples" / "telemetry" / "grafana-dashboard.json"
    assert dashboard_path.is_file(), "compose.yaml mounts a dashboard that does not exist"
    dashboard = json.loads(dashboard_path.read_text())
    provisioned = yaml.safe_load(
        (ROOT / "deploy/grafana/provisioning/datasources/prometheus.yaml").read_text()
    )
    uid = provisioned["datasources"][0]["uid"]
    assert dashboard_datasource_problems(dashboard, uid) == []
    broken = {"panels": [{"datasource": {"type": "prometheus", "uid": "elsewhere"}}]}
    assert dashboard_datasource_problems(broken, uid) == [
        f"datasource {{'type': 'prometheus', 'uid': 'elsewhere'}} is not the provisioned {uid!r}"
    ]


def _datasources(node: Any) -> Iterator[Any]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "datasource" and value:
                yield value
            else:
                yield from _datasources(value)
    elif isinstance(node, list):
        for item in node:
            yield from _datasources(item)


def test_compose_console_user_reads_but_cannot_stop_anything(
    compose_pgbouncer: tuple[PostgresServer, str, Role],
) -> None:
    """pgb_stats is a stats user: SHOW works; PAUSE, KILL_CLIENT (CVE-2026-6667 in unpatched
    1.24) and SHUTDOWN are refused, so a client network that reaches the listener cannot stop it."""
    _, address, stats = compose_pgbouncer
    host, port = address.split(":")
    dsn = stats.dsn(host, int(port), "pgbouncer")
    assert asyncio.run(admin_command(dsn, "SHOW POOLS")) is not None
    for command in ("PAUSE", "KILL_CLIENT 1", "SHUTDOWN"):
        with pytest.raises(Exception, match="admin access needed"):
            asyncio.run(admin_command(dsn, command))
    assert asyncio.run(admin_command(dsn, "SHOW VERSION"))  # still up
