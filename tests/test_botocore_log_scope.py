"""When asyncpool redacts botocore's DEBUG records: from the moment an `IamAuth` or a
`SecretsManagerAuth` exists (the tokens and secrets it will fetch must never be logged), for the
application's own botocore calls too; before that, never (a pool without an AWS provider leaves
the application's logging alone).

Each case runs in a fresh interpreter: the filter, once on a logger, stays for the process."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit

import pytest

from asyncpool.testing.aws_endpoint import aws_environment
from tests.secret_support import leaks

_ROOT = Path(__file__).parent.parent

# The application's own call, made after the provider (if any) was created: botocore signs an
# IAM token locally (no network) and logs its canonical request, string to sign and signature.
_SCRIPT = """
import io, logging, sys
stream = io.StringIO()
logging.basicConfig(level=logging.DEBUG, stream=stream)
import botocore.session
import asyncpool
from asyncpool.credentials.secrets_manager import SecretsManagerAuth
made = {"IamAuth": lambda: asyncpool.IamAuth("us-east-1"),
        "SecretsManagerAuth": lambda: SecretsManagerAuth("app/db", region="us-east-1"),
        "none": lambda: asyncpool.PoolConfig(dsn="postgresql://app@db/app")}[sys.argv[1]]()
client = botocore.session.get_session().create_client("rds", region_name="us-east-1")
token = client.generate_db_auth_token("db.example.com", 5432, "app")
sys.stdout.write(token + "\\n" + stream.getvalue())
"""


def _run(made: str) -> tuple[str, str]:
    """The token the application signed and everything logged, after making `made`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "BOTO_"))}
    env.update({k: v for k, v in aws_environment(region="us-east-1").items() if v is not None})
    rng = secrets.SystemRandom()  # (the fixed fake token holds words any log has)
    env["AWS_SESSION_TOKEN"] = "".join(rng.choice("QZXJKVWqzxjkvw") for _ in range(40))
    env["PYTHONPATH"] = str(_ROOT)
    done = subprocess.run([sys.executable, "-c", _SCRIPT, made], env=env, capture_output=True,
                          text=True, timeout=60, check=True)
    token, _, logged = done.stdout.partition("\n")
    return token, logged


def _secret_parts(token: str) -> list[str]:
    query = dict(parse_qsl(urlsplit("https://" + token).query))
    return [query["X-Amz-Signature"], query["X-Amz-Security-Token"]]


@pytest.mark.parametrize("made", ["IamAuth", "SecretsManagerAuth"])
def test_once_an_aws_provider_exists_the_applications_botocore_calls_are_redacted(
        made: str) -> None:
    token, logged = _run(made)
    # (Booleans: a failure must not print the log, which holds the signature.)
    signing_logged, hidden = "botocore.auth" in logged, "hidden by asyncpool" in logged
    assert signing_logged
    assert hidden
    assert leaks([("log", logged)], _secret_parts(token)) == []


def test_without_an_aws_provider_asyncpool_leaves_botocore_logging_alone() -> None:
    token, logged = _run("none")
    hidden = "hidden by asyncpool" in logged
    assert not hidden
    assert leaks([("log", logged)], _secret_parts(token)) != []  # botocore's own behaviour


# boto3 imported only after the provider: its loggers did not exist when the filters were placed,
# and asyncpool makes no AWS call afterwards (an IamAuth signs only at a login). A resource
# action logs the response, here an access key pair's SecretAccessKey (IAM mocked by moto).
_LATER_SCRIPT = """
import io, logging, sys
stream = io.StringIO()
logging.basicConfig(level=logging.DEBUG, stream=stream)
import asyncpool
from asyncpool.credentials.secrets_manager import SecretsManagerAuth
made = {"IamAuth": lambda: asyncpool.IamAuth("us-east-1"),
        "SecretsManagerAuth": lambda: SecretsManagerAuth("app/db", region="us-east-1")}[sys.argv[1]]()
assert "boto3" not in sys.modules
import boto3
from moto import mock_aws
with mock_aws():
    user = boto3.resource("iam", region_name="us-east-1").create_user(UserName="app")
    secret = user.create_access_key_pair().secret_access_key
sys.stdout.write(secret + "\\n" + stream.getvalue())
"""


@pytest.mark.parametrize("made", ["IamAuth", "SecretsManagerAuth"])
def test_loggers_created_after_the_provider_are_redacted_at_once(made: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "BOTO_"))}
    env.update({k: v for k, v in aws_environment(region="us-east-1").items() if v is not None})
    env["PYTHONPATH"] = str(_ROOT)
    done = subprocess.run([sys.executable, "-c", _LATER_SCRIPT, made], env=env,
                          capture_output=True, text=True, timeout=120, check=True)
    secret, _, logged = done.stdout.partition("\n")
    # (Booleans: a failure must not print the log, which may hold the secret.)
    action_logged = "boto3.resources.action" in logged
    hidden = "hidden by asyncpool" in logged
    assert action_logged
    assert hidden
    assert leaks([("log", logged)], [secret]) == []
