"""terraform/: every .tf parses, and the pooler invariants hold (no Terraform binary needed).

The checks are functions returning a list of problems, run on the real files and on mutated
copies, so each one is shown to fail when the invariant it guards is broken.

The parser is the `hcl2` module checkov installs (its python-hcl2 fork): attribute values come
wrapped in one-element lists, blocks as lists of dicts, expressions as "${...}" strings.
"""

from __future__ import annotations

import ast
import configparser
import json
import math
import re
from collections.abc import Callable, Iterator
from importlib import resources
from pathlib import Path
from typing import Any

import pytest
from hcl2.api import loads as hcl_loads

from asyncpool.testing.pgbouncer import shared_settings

ROOT = Path(__file__).resolve().parents[1]
TERRAFORM = ROOT / "terraform"
RDS_PROXY = TERRAFORM / "modules" / "rds-proxy"
PGBOUNCER = TERRAFORM / "modules" / "pgbouncer-fargate"
EXAMPLE = TERRAFORM / "examples" / "lambda"
MODULE_DIRS = [RDS_PROXY, PGBOUNCER, EXAMPLE]

Doc = dict[str, Any]

# -- reading HCL ---------------------------------------------------------------------------------


def tf_files() -> list[Path]:
    return sorted(TERRAFORM.rglob("*.tf"))


def load(path: Path) -> Doc:
    doc: Doc = hcl_loads(path.read_text())
    return doc


def load_dir(directory: Path, replace: dict[str, tuple[str, str]] | None = None) -> Doc:
    """All .tf files of a module merged; `replace` maps a file name to (old, new) text to mutate."""
    merged: Doc = {}
    for path in sorted(directory.glob("*.tf")):
        text = path.read_text()
        if replace and path.name in replace:
            old, new = replace[path.name]
            assert old in text, f"mutation target not found in {path.name}: {old!r}"
            text = text.replace(old, new)
        for key, value in hcl_loads(text).items():
            merged.setdefault(key, []).extend(value)
    return merged


def attr(block: Doc, key: str, default: Any = None) -> Any:
    """An attribute's value (the fork wraps each one in a one-element list)."""
    if key not in block:
        return default
    value = block[key]
    return value[0] if isinstance(value, list) and len(value) == 1 else value


def blocks(block: Doc, key: str) -> list[Doc]:
    value = block.get(key, [])
    return [b for b in value if isinstance(b, dict)]


def resources_of(doc: Doc, rtype: str) -> dict[str, Doc]:
    found: dict[str, Doc] = {}
    for entry in doc.get("resource", []):
        for name, body in entry.get(rtype, {}).items():
            found[name] = body
    return found


def data_of(doc: Doc, dtype: str) -> dict[str, Doc]:
    found: dict[str, Doc] = {}
    for entry in doc.get("data", []):
        for name, body in entry.get(dtype, {}).items():
            found[name] = body
    return found


def named(doc: Doc, kind: str) -> dict[str, Doc]:
    """Variables or outputs by name."""
    found: dict[str, Doc] = {}
    for entry in doc.get(kind, []):
        found.update(entry)
    return found


def locals_of(doc: Doc) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for entry in doc.get("locals", []):
        for key, value in entry.items():
            if not key.startswith("__"):
                found[key] = value[0] if isinstance(value, list) and len(value) == 1 else value
    return found


def defaults(doc: Doc) -> dict[str, Any]:
    return {name: attr(body, "default") for name, body in named(doc, "variable").items()}


def walk(node: Any) -> Iterator[tuple[str, Any]]:
    """Every (key, value) pair anywhere in a parsed document."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield key, value
            yield from walk(value)
    elif isinstance(node, list):
        for item in node:
            yield from walk(item)


# -- evaluating the arithmetic of locals --------------------------------------------------------

_FUNCS: dict[str, Callable[..., float]] = {"ceil": math.ceil, "floor": math.floor, "min": min, "max": max}


def evaluate(expr: str, names: dict[str, float]) -> float:
    """A Terraform arithmetic expression ("${ceil(100 * var.a / local.b)}") with `names` bound."""
    text = expr.strip()
    if text.startswith("${") and text.endswith("}"):
        text = text[2:-1]
    text = re.sub(r"\b(var|local)\.([a-z_][a-z0-9_]*)", r"\1__\2", text)
    tree = ast.parse(text, mode="eval")

    def ev(node: ast.AST) -> float:
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, int | float):
            return node.value
        if isinstance(node, ast.Name):
            kind, _, name = node.id.partition("__")
            return names[f"{kind}.{name}"]
        if isinstance(node, ast.BinOp):
            left, right = ev(node.left), ev(node.right)
            ops: dict[type[ast.operator], Callable[[float, float], float]] = {
                ast.Add: lambda a, b: a + b,
                ast.Sub: lambda a, b: a - b,
                ast.Mult: lambda a, b: a * b,
                ast.Div: lambda a, b: a / b,
            }
            return ops[type(node.op)](left, right)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            return float(_FUNCS[node.func.id](*(ev(a) for a in node.args)))
        raise ValueError(f"cannot evaluate {ast.dump(node)} in {expr!r}")

    return ev(tree)


# -- the invariants -----------------------------------------------------------------------------


def rds_proxy_problems(doc: Doc) -> list[str]:
    proxies = resources_of(doc, "aws_db_proxy")
    if len(proxies) != 1:
        return [f"expected one aws_db_proxy, found {len(proxies)}"]
    return [
        *_proxy_problems(next(iter(proxies.values()))),
        *_proxy_pool_problems(doc),
        *_proxy_credentials_problems(doc),
        *_proxy_connect_problems(doc),
    ]


def _proxy_problems(proxy: Doc) -> list[str]:
    problems: list[str] = []
    if attr(proxy, "engine_family") != "POSTGRESQL":
        problems.append("engine_family is not POSTGRESQL")
    if attr(proxy, "require_tls") is not True:
        problems.append("require_tls is not true")
    if attr(proxy, "debug_logging") is not False:
        problems.append("debug_logging must be false (it logs SQL text)")
    idle = attr(proxy, "idle_client_timeout")
    if idle != "${var.idle_client_timeout}":
        problems.append(f"idle_client_timeout is {idle!r}, not var.idle_client_timeout")
    auths = blocks(proxy, "auth")
    if len(auths) != 1:
        problems.append(f"expected one auth block, found {len(auths)}")
    for auth in auths:
        expected = {
            "auth_scheme": "SECRETS",
            "iam_auth": "REQUIRED",
            "client_password_auth_type": "POSTGRES_SCRAM_SHA_256",  # pragma: allowlist secret
            "secret_arn": "${aws_secretsmanager_secret.db.arn}",
        }
        for key, want in expected.items():
            if attr(auth, key) != want:
                problems.append(f"auth.{key} is {attr(auth, key)!r}, not {want!r}")
    return problems


def _proxy_pool_problems(doc: Doc) -> list[str]:
    """No pinning filter (EXCLUDE_VARIABLE_SETS is for MySQL only); sizes and timeouts set."""
    problems: list[str] = []
    for group in resources_of(doc, "aws_db_proxy_default_target_group").values():
        for config in blocks(group, "connection_pool_config"):
            if "session_pinning_filters" in config:
                problems.append("session_pinning_filters is set on a PostgreSQL proxy")
            if attr(config, "connection_borrow_timeout") != "${var.connection_borrow_timeout}":
                problems.append("connection_borrow_timeout is not var.connection_borrow_timeout")
            for key in ("max_connections_percent", "max_idle_connections_percent"):
                if key not in config:
                    problems.append(f"connection_pool_config.{key} is not set")
    if "EXCLUDE_VARIABLE_SETS" in json.dumps(doc):
        problems.append("EXCLUDE_VARIABLE_SETS appears in the configuration")
    return problems


def _proxy_credentials_problems(doc: Doc) -> list[str]:
    """The proxy's own credentials: KMS-encrypted, write-only password, rotated."""
    problems: list[str] = []
    secrets = resources_of(doc, "aws_secretsmanager_secret")
    if not secrets or any(attr(s, "kms_key_id") != "${var.kms_key_arn}" for s in secrets.values()):
        problems.append("the credentials secret is not encrypted with var.kms_key_arn")
    for version in resources_of(doc, "aws_secretsmanager_secret_version").values():
        if "secret_string" in version or "secret_string_wo" not in version:
            problems.append("the secret's value must be written with secret_string_wo (not in state)")
    if resources_of(doc, "random_password"):
        problems.append("random_password as a resource stores the password in state; use ephemeral")
    if not resources_of(doc, "aws_secretsmanager_secret_rotation"):
        problems.append("the credentials secret is not rotated")
    return problems


def _proxy_connect_problems(doc: Doc) -> list[str]:
    """Least privilege: rds-db:connect on this proxy's user only."""
    problems: list[str] = []
    connect = data_of(doc, "aws_iam_policy_document").get("connect")
    if connect is None:
        problems.append("no rds-db:connect policy document")
    else:
        for statement in blocks(connect, "statement"):
            if attr(statement, "actions") != ["rds-db:connect"]:
                problems.append(f"connect policy actions are {attr(statement, 'actions')!r}")
            for resource in attr(statement, "resources") or []:
                if not re.fullmatch(
                    r"arn:\$\{data\.aws_partition\.current\.partition\}:rds-db:\$\{local\.region\}:"
                    r"\$\{data\.aws_caller_identity\.current\.account_id\}:dbuser:"
                    r"\$\{local\.proxy_resource_id\}/\$\{var\.db_username\}",
                    resource,
                ):
                    problems.append(f"connect policy resource {resource!r} is not this proxy's user")
    proxy_id = locals_of(doc).get("proxy_resource_id", "")
    if "aws_db_proxy.this.arn" not in proxy_id:
        problems.append("proxy_resource_id is not derived from the proxy's ARN")
    return problems


def sizing_problems(doc: Doc, db_max_connections: int) -> list[str]:
    """~50 backend connections out of the database's max_connections, idle share within it."""
    local = locals_of(doc)
    names = {f"var.{k}": v for k, v in defaults(doc).items() if isinstance(v, int | float)}
    names["var.db_max_connections"] = db_max_connections
    percent = evaluate(local["max_connections_percent"], names)
    names["local.max_connections_percent"] = percent
    idle = evaluate(local["max_idle_connections_percent"], names)
    backends = math.floor(db_max_connections * percent / 100)
    problems = []
    if not 1 <= percent <= 100:
        problems.append(f"max_connections_percent {percent} is outside 1..100")
    if not 0 <= idle <= percent:
        problems.append(f"max_idle_connections_percent {idle} is outside 0..{percent}")
    if not 50 <= backends < 60:
        problems.append(f"{backends} backend connections for max_connections={db_max_connections}")
    return problems


def pgbouncer_problems(doc: Doc, text: str) -> list[str]:
    """`text`: main.tf of the module (the container definition is a jsonencode() expression)."""
    return [
        *_pgb_settings_problems(doc),
        *_pgb_sizing_problems(doc),
        *_pgb_tls_and_secret_problems(doc, text),
        *_pgb_runtime_problems(doc, text),
    ]


def _pgb_settings_problems(doc: Doc) -> list[str]:
    """The shared tuning file is the repository's, read by the same entrypoint compose runs."""
    problems: list[str] = []
    local = locals_of(doc)
    settings_path = str(local.get("settings_path", ""))
    match = re.search(r'\$\{path\.module\}/([^"]+?)"\)', settings_path)
    if (
        not match
        or (PGBOUNCER / match.group(1)).resolve()
        != Path(str(resources.files("asyncpool.testing").joinpath("pgbouncer.ini"))).resolve()
    ):
        problems.append(f"settings_path {settings_path!r} is not asyncpool/testing/pgbouncer.ini")
    entry = re.search(r'\$\{path\.module\}/([^"]+?)"\)', str(local.get("entrypoint_script", "")))
    if not entry or (PGBOUNCER / entry.group(1)).resolve() != ROOT / "deploy/pgbouncer/entrypoint.sh":
        problems.append("entrypoint_script is not deploy/pgbouncer/entrypoint.sh")
    condition = " ".join(
        str(attr(v, "condition")) for v in blocks(named(doc, "variable")["settings_overrides"], "validation")
    )
    if not all(re.search(rf"['\"]{key}['\"]", condition) for key in ("pool_mode", "auth_type")):
        problems.append("settings_overrides may replace pool_mode or auth_type")
    return problems


def _pgb_sizing_problems(doc: Doc) -> list[str]:
    """Server pool divided between tasks: about 50 in all, never more; 500+ clients at min_tasks."""
    problems: list[str] = []
    values = defaults(doc)
    local = locals_of(doc)
    names = {f"var.{k}": v for k, v in values.items() if isinstance(v, int | float)}
    per_task = evaluate(local["per_task_pool"], names)
    total = per_task * values["max_tasks"]
    if not 40 <= total <= 50 or values["server_pool_total"] > 50:
        problems.append(f"{total} server connections at max_tasks (want about 50, at most 50)")
    overrides = str(local.get("overrides", ""))
    for key in ("default_pool_size", "max_db_connections"):
        if not re.search(rf"{key}\W+(\$\{{)?tostring\(local\.per_task_pool\)", overrides):
            problems.append(f"{key} is not set to the per-task pool")
    clients = int(shared_settings()["max_client_conn"]) * values["min_tasks"]
    if clients < 500 or values["min_client_capacity"] < 500:
        problems.append(f"{clients} client connections at min_tasks (want 500+)")
    return problems


def _pgb_tls_and_secret_problems(doc: Doc, text: str) -> list[str]:
    """Clients must use TLS; the backend link is never plain text; credentials come from Secrets
    Manager only, none from plain environment variables."""
    problems: list[str] = []
    values = defaults(doc)
    if '{ name = "PGBOUNCER_CLIENT_TLS_SSLMODE", value = "require" }' not in text:
        problems.append("clients are not required to use TLS")
    for key in ("PGBOUNCER_TLS_CERT", "PGBOUNCER_TLS_KEY"):
        if f'{{ name = "{key}", valueFrom = "${{var.tls_secret_arn}}' not in text:
            problems.append(f"{key} does not come from the TLS secret")
    mode_rule = " ".join(
        str(attr(v, "condition")) for v in blocks(named(doc, "variable")["server_tls_sslmode"], "validation")
    )
    allowed = set(re.findall(r"['\"]([a-z-]+)['\"]", mode_rule))
    if not allowed or not allowed <= {"verify-ca", "verify-full"}:
        problems.append(
            f"server_tls_sslmode lets PgBouncer log in to an unverified database: {sorted(allowed)}"
        )
    if values["server_tls_sslmode"] != "verify-full":
        problems.append(f"server_tls_sslmode defaults to {values['server_tls_sslmode']!r}, not verify-full")
    if "default" in named(doc, "variable")["server_tls_ca_pem"]:
        problems.append("server_tls_ca_pem is optional: the database's CA must be given")
    if '{ name = "PGBOUNCER_SERVER_TLS_CA", value = var.server_tls_ca_pem }' not in text:
        problems.append("the database's CA is not passed to PgBouncer")
    if "PGBOUNCER_ADMIN" in text:
        problems.append("an admin user (PAUSE, KILL, SHUTDOWN) is configured on the client listener")
    if '{ name = "PGBOUNCER_STATS_USER", value = ' not in text:
        problems.append("no read-only console user for doctor and exporters")
    env_names = re.findall(r'\{ name = "([A-Z_]+)", value = ', text)
    secret_names = re.findall(r'\{ name = "([A-Z_]+)", valueFrom = "\$\{var\.[a-z_]+_secret_arn\}', text)
    if any("PASSWORD" in n or n.endswith("_KEY") for n in env_names):
        problems.append(f"a credential is a plain environment variable: {env_names}")
    if "APP_DB_PASSWORD" not in secret_names:
        problems.append("APP_DB_PASSWORD does not come from Secrets Manager")
    return problems


def _pgb_runtime_problems(doc: Doc, text: str) -> list[str]:
    """A pinned PgBouncer >= 1.21; health checks, an internal NLB, autoscaling, and deployments
    that never exceed the pool budget."""
    problems: list[str] = []
    image_variable = named(doc, "variable")["image"]
    if "default" in image_variable:
        problems.append(
            f"image has a default ({attr(image_variable, 'default')!r}): it must be given, by digest"
        )
    rule = " ".join(str(attr(v, "condition")) for v in blocks(image_variable, "validation"))
    pattern = re.search(r'regex\("((?:[^"\\]|\\.)*)",\s*var\.image\)', rule)
    digest = "123456789012.dkr.ecr.eu-west-1.amazonaws.com/pgbouncer@sha256:" + "ab" * 32
    tagged = (
        "edoburu/pgbouncer:v1.24.1-p1",
        "pgbouncer:1.24.1",
        "pgbouncer:latest",
        f"pgbouncer:1.24@sha256:{'ab' * 31}",
    )
    if (
        not pattern
        or not re.search(_hcl_string(pattern.group(1)), digest)
        or any(re.search(_hcl_string(pattern.group(1)), image) for image in tagged)
    ):
        problems.append("image is not required to be pinned by digest")
    if '"CMD", "pg_isready"' not in text:
        problems.append("the container has no pg_isready health check")
    for group in resources_of(doc, "aws_lb_target_group").values():
        checks = blocks(group, "health_check")
        if not checks or attr(checks[0], "protocol") != "TCP":
            problems.append("the target group has no TCP health check")
    for lb in resources_of(doc, "aws_lb").values():
        if attr(lb, "internal") is not True or attr(lb, "load_balancer_type") != "network":
            problems.append("the load balancer is not an internal NLB")
    if "readonlyRootFilesystem = true" not in text:
        problems.append("the root file system is writable")
    return problems + _pgb_scaling_problems(doc) + _pgb_cancel_problems(doc)


def _pgb_cancel_problems(doc: Doc) -> list[str]:
    """Cancel requests reach the task holding the query: source-IP stickiness on the NLB target
    group (task addresses change, so no PgBouncer peering; docs/poolers.md)."""
    problems: list[str] = []
    for name, group in resources_of(doc, "aws_lb_target_group").items():
        sticky = blocks(group, "stickiness")
        if not sticky or attr(sticky[0], "type") != "source_ip" or attr(sticky[0], "enabled") is False:
            problems.append(f"target group {name}: no source-IP stickiness, so cancel requests "
                            "land on tasks that do not hold the query")
    return problems


def _pgb_scaling_problems(doc: Doc) -> list[str]:
    """Autoscaling between min_tasks and max_tasks; deployments never add tasks."""
    problems: list[str] = []
    policies = resources_of(doc, "aws_appautoscaling_policy")
    targets = resources_of(doc, "aws_appautoscaling_target")
    if not policies or not targets:
        problems.append("no autoscaling")
    for target in targets.values():
        if (
            attr(target, "min_capacity") != "${var.min_tasks}"
            or attr(target, "max_capacity") != "${var.max_tasks}"
        ):
            problems.append("autoscaling bounds are not min_tasks..max_tasks")
    for service in resources_of(doc, "aws_ecs_service").values():
        if attr(service, "deployment_maximum_percent") != 100:
            problems.append("deployments may run extra tasks (and extra server connections)")
        network = blocks(service, "network_configuration")
        if not network or attr(network[0], "assign_public_ip") is not False:
            problems.append("tasks get public IPs")
    return problems


def network_problems(doc: Doc) -> list[str]:
    """Ingress only from security groups; egress to addresses only for HTTPS."""
    problems: list[str] = []
    for name, sg in resources_of(doc, "aws_security_group").items():
        if "ingress" in sg or "egress" in sg:
            problems.append(f"security group {name} has inline rules (use rule resources)")
    for name, rule in resources_of(doc, "aws_vpc_security_group_ingress_rule").items():
        if "referenced_security_group_id" not in rule:
            problems.append(f"ingress rule {name} is not limited to a security group")
    for name, rule in resources_of(doc, "aws_vpc_security_group_egress_rule").items():
        https = attr(rule, "from_port") == 443 and attr(rule, "to_port") == 443
        if "referenced_security_group_id" not in rule and not https:
            problems.append(f"egress rule {name} opens more than HTTPS to addresses")
    return problems


def _statements(policy: Doc) -> Iterator[Doc]:
    """A policy document's statements, the dynamic ones' content included."""
    yield from blocks(policy, "statement")
    for dynamic in blocks(policy, "dynamic"):
        body = dynamic.get("statement")
        if isinstance(body, dict):
            yield from blocks(body, "content")


def iam_problems(doc: Doc) -> list[str]:
    """No wildcard action; Resource "*" only for ecr:GetAuthorizationToken (no resource-level
    permission exists for it). The example's KMS key policy is exempt: its "*" is the key."""
    problems: list[str] = []
    for doc_name, policy in data_of(doc, "aws_iam_policy_document").items():
        if doc_name == "kms":
            continue
        for statement in _statements(policy):
            actions = attr(statement, "actions") or []
            for action in actions:
                if action == "*" or action.endswith(":*"):
                    problems.append(f"{doc_name}: wildcard action {action}")
            if "*" in (attr(statement, "resources") or []) and actions != ["ecr:GetAuthorizationToken"]:
                problems.append(f"{doc_name}: Resource * for {actions}")
    return problems


def network_and_iam_problems(doc: Doc) -> list[str]:
    return [*network_problems(doc), *iam_problems(doc)]


def secret_problems(doc: Doc) -> list[str]:
    """No password, secret or token literal; no credential variable with a default."""
    problems = []
    for name, body in named(doc, "variable").items():
        lowered = name.lower()
        if any(w in lowered for w in ("password", "token", "private_key")) and not lowered.endswith(
            ("_version", "_arn")
        ):
            problems.append(f"variable {name} holds a credential: pass a secret ARN instead")
        if ("secret" in lowered and not lowered.endswith("_arn")) and attr(body, "default") is not None:
            problems.append(f"variable {name} has a default")
    for key, value in walk(doc):
        if key in ("password", "master_password", "secret_string") and isinstance(value, list):
            literal = [v for v in value if isinstance(v, str) and "${" not in v]
            if literal:
                problems.append(f"literal {key}")
    return problems


def interface_problems(doc: Doc) -> list[str]:
    problems = []
    outputs = named(doc, "output")
    for needed in ("endpoint", "port", "user", "region"):
        if needed not in outputs:
            problems.append(f"no output {needed}")
    for name, body in outputs.items():
        if not attr(body, "description"):
            problems.append(f"output {name} has no description")
    for name, body in named(doc, "variable").items():
        if not attr(body, "description"):
            problems.append(f"variable {name} has no description")
        kind = attr(body, "type")
        if kind not in ("${bool}", "${map(string)}") and not blocks(body, "validation"):
            problems.append(f"variable {name} has no validation")
    return problems


# -- the tests ----------------------------------------------------------------------------------


def test_every_tf_file_parses() -> None:
    files = tf_files()
    assert len(files) >= 12, files
    for path in files:
        doc = load(path)
        assert doc, f"{path} parsed to nothing"


def test_the_layout_is_two_modules_and_an_example() -> None:
    for directory in MODULE_DIRS:
        names = {p.name for p in directory.glob("*.tf")}
        assert {"main.tf", "variables.tf", "outputs.tf", "versions.tf"} <= names, directory
    example = load_dir(EXAMPLE)
    sources = {attr(body, "source") for entry in example["module"] for body in entry.values()}
    assert sources == {"../../modules/rds-proxy", "../../modules/pgbouncer-fargate"}
    functions = resources_of(example, "aws_lambda_function")
    assert list(functions) == ["this"]


def test_rds_proxy_invariants() -> None:
    assert rds_proxy_problems(load_dir(RDS_PROXY)) == []


@pytest.mark.parametrize(
    ("file", "old", "new", "expected"),
    [
        ("main.tf", "require_tls            = true", "require_tls            = false", "require_tls"),
        ("main.tf", 'iam_auth                  = "REQUIRED"', 'iam_auth = "DISABLED"', "iam_auth"),
        (
            "main.tf",
            '"POSTGRES_SCRAM_SHA_256"',
            '"POSTGRES_MD5"',
            "client_password_auth_type",
        ),
        (
            "main.tf",
            "connection_borrow_timeout    = var.connection_borrow_timeout",
            "connection_borrow_timeout    = var.connection_borrow_timeout\n"
            '    session_pinning_filters      = ["EXCLUDE_VARIABLE_SETS"]',
            "session_pinning_filters",
        ),
        ("main.tf", 'actions = ["rds-db:connect"]', 'actions = ["rds-db:*"]', "connect policy actions"),
        ("main.tf", "secret_string_wo = jsonencode", "secret_string = jsonencode", "secret_string_wo"),
        ("main.tf", 'engine_family          = "POSTGRESQL"', 'engine_family = "MYSQL"', "engine_family"),
    ],
)
def test_rds_proxy_invariants_catch_a_regression(file: str, old: str, new: str, expected: str) -> None:
    problems = rds_proxy_problems(load_dir(RDS_PROXY, {file: (old, new)}))
    assert any(expected in p for p in problems), problems


def test_rds_proxy_pool_serves_500_functions_with_about_50_backends() -> None:
    proxy = load_dir(RDS_PROXY)
    example = load_dir(EXAMPLE)
    example_defaults = defaults(example)
    # The example's database: 50 of its 100 connections, exactly.
    assert sizing_problems(proxy, example_defaults["db_max_connections"]) == []
    assert (
        math.floor(
            example_defaults["db_max_connections"]
            * evaluate(
                locals_of(proxy)["max_connections_percent"],
                {
                    "var.target_backend_connections": 50,
                    "var.db_max_connections": example_defaults["db_max_connections"],
                },
            )
            / 100
        )
        == 50
    )
    # Any database size in the usual range lands on about 50 too.
    for max_connections in (100, 150, 200, 300, 500, 700, 1000):
        assert sizing_problems(proxy, max_connections) == [], max_connections
    # 500 functions, one connection each, go through those ~50 backend connections.
    env = str(locals_of(example)["function_environment"])
    assert "'ASYNCPOOL_MAX_SIZE': '1'" in env
    assert example_defaults["reserved_concurrency"] >= 500
    # A client waits for a backend less long than its function may run.
    assert defaults(proxy)["connection_borrow_timeout"] < example_defaults["lambda_timeout"]
    assert 1 <= defaults(proxy)["idle_client_timeout"] <= 28800


def test_rds_proxy_sizing_catches_a_bad_formula() -> None:
    broken = load_dir(
        RDS_PROXY,
        {
            "main.tf": (
                "ceil(100 * var.target_backend_connections",
                "ceil(200 * var.target_backend_connections",
            )
        },
    )
    assert sizing_problems(broken, 100)


def test_pgbouncer_module_invariants() -> None:
    assert pgbouncer_problems(load_dir(PGBOUNCER), (PGBOUNCER / "main.tf").read_text()) == []


@pytest.mark.parametrize(
    ("file", "old", "new", "expected"),
    [
        (
            "variables.tf",
            '@sha256:[0-9a-f]{64}$", var.image))',
            '(@sha256:[0-9a-f]{64}|:v?[0-9.]+)$", var.image))',
            "pinned by digest",
        ),
        (
            "variables.tf",
            'variable "image" {\n',
            'variable "image" {\n  default = "edoburu/pgbouncer:v1.24.1-p1"\n',
            "must be given",
        ),
        ("variables.tf", 'default     = "verify-full"', 'default     = "verify-ca"', "not verify-full"),
        (
            "variables.tf",
            'contains(["verify-ca", "verify-full"], var.server_tls_sslmode)',
            'contains(["require", "verify-ca", "verify-full"], var.server_tls_sslmode)',
            "unverified database",
        ),
        (
            "variables.tf",
            'variable "server_tls_ca_pem" {\n',
            'variable "server_tls_ca_pem" {\n  default = null\n',
            "CA must be given",
        ),
        (
            "main.tf",
            '{ name = "PGBOUNCER_STATS_USER", value = "pgb_stats" },',
            '{ name = "PGBOUNCER_ADMIN_USER", value = "pgb_admin" },',
            "admin user",
        ),
        ("variables.tf", "default     = 50\n", "default     = 200\n", "server connections"),
        (
            "main.tf",
            "deployment_maximum_percent         = 100",
            "deployment_maximum_percent = 200",
            "extra tasks",
        ),
        ("main.tf", 'value = "require" }', 'value = "disable" }', "TLS"),
        ("main.tf", "internal                         = true", "internal = false", "internal NLB"),
        ("main.tf", '"CMD", "pg_isready"', '"CMD", "true"', "pg_isready"),
        ("main.tf", "assign_public_ip = false", "assign_public_ip = true", "public IPs"),
        (
            "main.tf",
            '{ name = "APP_DB_USER", value = var.db_username },',
            '{ name = "APP_DB_USER", value = var.db_username },\n'
            '      { name = "APP_DB_PASSWORD", value = "x" },',
            "plain environment variable",
        ),
        ("main.tf", "asyncpool/testing/pgbouncer.ini", "deploy/pgbouncer.ini", "settings_path"),
        ("main.tf", '    type    = "source_ip"\n', '    type    = "lb_cookie"\n', "source-IP stickiness"),
        ("main.tf", "    enabled = true\n    type", "    enabled = false\n    type", "source-IP stickiness"),
        ("main.tf", "  stickiness {\n    enabled = true\n    type    = \"source_ip\"\n  }\n", "",
         "source-IP stickiness"),
    ],
)
def test_pgbouncer_invariants_catch_a_regression(file: str, old: str, new: str, expected: str) -> None:
    doc = load_dir(PGBOUNCER, {file: (old, new)})
    text = (PGBOUNCER / "main.tf").read_text()
    if file == "main.tf":
        text = text.replace(old, new)
    problems = pgbouncer_problems(doc, text)
    assert any(expected in p for p in problems), problems


def test_pgbouncer_module_reads_the_shared_settings_like_configparser() -> None:
    """Terraform parses pgbouncer.ini with a regex; it must agree with the harness's parser."""
    local = locals_of(load_dir(PGBOUNCER))
    pattern = re.search(r'regexall\("(.+?)",\s*line\)', str(local["shared_settings"]))
    assert pattern, local["shared_settings"]
    regex = pattern.group(1).replace("\\\\", "\\").replace("[[:space:]]", r"\s")
    text = resources.files("asyncpool.testing").joinpath("pgbouncer.ini").read_text()
    parsed = {}
    for line in text.split("\n"):
        if re.search(regex, line):
            key, _, value = line.partition("=")
            parsed[key.strip()] = value.strip()
    assert parsed == shared_settings()
    parser = configparser.ConfigParser(interpolation=None)
    parser.read_string(text)
    assert parser.sections() == ["pgbouncer"], "the shared file must hold the [pgbouncer] section only"


def test_pgbouncer_module_environment_is_what_the_entrypoint_reads() -> None:
    script = (ROOT / "deploy/pgbouncer/entrypoint.sh").read_text()
    via_value = set(re.findall(r"value ([A-Z][A-Z0-9_]*)", script))  # NAME or NAME_FILE
    read = set(re.findall(r"\$\{?([A-Z][A-Z0-9_]*)", script)) | via_value | {f"{n}_FILE" for n in via_value}
    text = (PGBOUNCER / "main.tf").read_text()
    passed = set(re.findall(r'\{ name = "([A-Z][A-Z0-9_]*)", value(?:From)? = ', text))
    assert passed, "no container environment found"
    assert passed <= read, f"the entrypoint ignores {sorted(passed - read)}"


def test_network_and_iam_are_least_privilege() -> None:
    for directory in MODULE_DIRS:
        assert network_and_iam_problems(load_dir(directory)) == [], directory


def test_network_check_catches_an_open_ingress() -> None:
    doc = load_dir(
        RDS_PROXY,
        {"main.tf": ("referenced_security_group_id = each.value", 'cidr_ipv4 = "0.0.0.0/0"')},
    )
    assert any("not limited" in p for p in network_and_iam_problems(doc))
    doc = load_dir(
        RDS_PROXY,
        {"main.tf": ('actions   = ["secretsmanager:GetSecretValue"]', 'actions = ["secretsmanager:*"]')},
    )
    assert any("wildcard" in p for p in network_and_iam_problems(doc))


def test_no_default_or_literal_passwords() -> None:
    for directory in MODULE_DIRS:
        assert secret_problems(load_dir(directory)) == [], directory
    assert not re.search(r"(?i)password\s*=\s*\"[^$\"]", "\n".join(p.read_text() for p in tf_files()))


def test_secret_check_catches_a_password_variable() -> None:
    doc = load_dir(
        EXAMPLE,
        {
            "variables.tf": (
                'variable "db_name" {',
                'variable "db_password" {\n  default = "hunter2hunter2"\n}\n\nvariable "db_name" {',
            )
        },
    )
    assert any("db_password" in p for p in secret_problems(doc))


def test_variables_are_described_and_validated_and_outputs_serve_the_sdk() -> None:
    for directory in MODULE_DIRS:
        assert interface_problems(load_dir(directory)) == [], directory


def test_interface_check_catches_a_missing_output() -> None:
    doc = load_dir(RDS_PROXY, {"outputs.tf": ('output "region" {', 'output "aws_region" {')})
    assert "no output region" in interface_problems(doc)


def test_example_wires_the_function_for_each_pooler() -> None:
    example = load_dir(EXAMPLE)
    env = str(locals_of(example)["function_environment"])
    for key in ("ASYNCPOOL_DSN", "ASYNCPOOL_SSL", "ASYNCPOOL_PREPARED_STATEMENTS", "ASYNCPOOL_SSL_ROOT_CERT"):
        assert key in env
    assert "@" in env
    assert "password" not in env.lower()
    function = resources_of(example, "aws_lambda_function")["this"]
    assert blocks(function, "vpc_config"), "the function must run in the VPC to reach the pooler"
    assert attr(function, "reserved_concurrent_executions") == "${var.reserved_concurrency}"
    # IAM auth for the proxy: the module's connect policy is attached to the function's role.
    attachment = resources_of(example, "aws_iam_role_policy_attachment")["function_connect"]
    assert attr(attachment, "policy_arn") == "${module.rds_proxy[0].connect_policy_arn}"
    # Prepared-statement modes: unnamed through RDS Proxy, on through PgBouncer >= 1.21.
    proxy_out = str(named(load_dir(RDS_PROXY), "output")["asyncpool_settings"])
    pgb_out = str(named(load_dir(PGBOUNCER), "output")["asyncpool_settings"])
    assert "'ASYNCPOOL_PREPARED_STATEMENTS': 'unnamed'" in proxy_out
    assert "'ASYNCPOOL_PREPARED_STATEMENTS': 'on'" in pgb_out
    for out in (proxy_out, pgb_out):
        assert "'ASYNCPOOL_SSL': 'verify-full'" in out


def _hcl_string(text: str) -> str:
    return text.replace("\\\\", "\\").replace('\\"', '"')


def default_validation_problems(doc: Doc) -> list[str]:
    """Defaults must pass their own regex(...) and contains([...]) validations (the forms used)."""
    problems = []
    checked = 0
    for name, body in named(doc, "variable").items():
        default = attr(body, "default")
        if default is None or isinstance(default, bool | dict | list):
            continue
        for validation in blocks(body, "validation"):
            condition = str(attr(validation, "condition"))
            for pattern in re.findall(rf'regex\("((?:[^"\\]|\\.)*)",\s*var\.{name}\)', condition):
                checked += 1
                regex = _hcl_string(pattern).replace("[[:space:]]", r"\s")
                if not re.search(regex, str(default)):
                    problems.append(f"{name}: default {default!r} fails its regex {regex!r}")
            for negated, options in re.findall(rf"(!?)contains\(\[([^\]]*)\],\s*var\.{name}\)", condition):
                checked += 1
                listed = [o.strip().strip("'\"") for o in options.split(",")]
                inside = str(default) in listed
                if inside == bool(negated):
                    problems.append(f"{name}: default {default!r} {'in' if negated else 'not in'} {listed}")
    if checked == 0:
        problems.append("no regex/contains validation with a default was found")
    return problems


def test_defaults_pass_their_own_validations() -> None:
    for directory in MODULE_DIRS:
        assert default_validation_problems(load_dir(directory)) == [], directory


def test_default_validation_check_catches_a_bad_default() -> None:
    doc = load_dir(PGBOUNCER, {"variables.tf": ('default     = "verify-full"', 'default     = "require"')})
    assert any("server_tls_sslmode" in p for p in default_validation_problems(doc))
    doc = load_dir(EXAMPLE, {"variables.tf": ('default     = "python3.12"', 'default     = "python3.9"')})
    assert any("lambda_runtime" in p for p in default_validation_problems(doc))


def test_iam_check_reads_dynamic_statements() -> None:
    doc = load_dir(
        PGBOUNCER,
        {
            "main.tf": (
                'actions   = ["ecr:BatchGetImage", "ecr:GetDownloadUrlForLayer"]',
                'actions = ["ecr:*"]',
            )
        },
    )
    assert any("wildcard action ecr:*" in p for p in iam_problems(doc))
    doc = load_dir(
        PGBOUNCER,
        {
            "main.tf": (
                'actions   = ["ecr:GetAuthorizationToken"]',
                'actions = ["ecr:GetAuthorizationToken", "s3:GetObject"]',
            )
        },
    )
    assert any("Resource *" in p for p in iam_problems(doc))
