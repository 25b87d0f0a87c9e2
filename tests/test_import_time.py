"""`import asyncpool` stays light: the AWS providers' aiobotocore is imported only when used, and no
optional dependency at all on the bare import."""

from __future__ import annotations

import subprocess
import sys


def _run(code: str, *flags: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *flags, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )


def test_importing_asyncpool_imports_no_aws_sdk() -> None:
    out = _run("import asyncpool", "-X", "importtime")
    imported = {line.split("|")[-1].strip() for line in out.stderr.splitlines() if "|" in line}
    assert "asyncpool" in imported  # the report is real, and lists modules by name
    assert not {m for m in imported if m.split(".")[0] in ("aiobotocore", "botocore", "boto3")}


def test_importing_asyncpool_imports_only_the_base_installs_packages() -> None:
    """No integration's framework, OpenTelemetry SDK or benchmark driver: for a user without that
    extra, any of them would make `import asyncpool` an ImportError."""
    code = "import sys\nbefore = set(sys.modules)\nimport asyncpool\nprint(*set(sys.modules) - before)\n"
    loaded = _run(code).stdout.split()
    # cython_runtime is the module Cython's extensions (asyncpg's) register, not a package.
    third_party = {m.split(".")[0] for m in loaded} - set(sys.stdlib_module_names) - {"cython_runtime"}
    third_party = {m for m in third_party if not m.startswith("_")}
    assert "asyncpool" in third_party
    # asyncpool-pg's own dependencies (pyproject.toml), and of OpenTelemetry the API only.
    assert third_party - {"asyncpool"} <= {"asyncpg", "opentelemetry"}
    assert [m for m in loaded if m.startswith("opentelemetry.sdk")] == []


def test_naming_and_building_the_aws_providers_still_imports_no_aws_sdk() -> None:
    code = (
        "import sys, asyncpool\n"
        "asyncpool.IamAuth(region='us-east-1')\n"
        "asyncpool.SecretsManagerAuth('db/orders', region='us-east-1')\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('aiobotocore', 'botocore')))\n"
    )
    assert _run(code).stdout.strip() == "[]"


def test_first_use_imports_aiobotocore() -> None:
    code = (
        "import asyncio, os, sys, asyncpool\n"
        "os.environ.update(AWS_ACCESS_KEY_ID='AKIDASYNCPOOLTEST', AWS_SECRET_ACCESS_KEY='x',\n"
        "                  AWS_CONFIG_FILE=os.devnull, AWS_SHARED_CREDENTIALS_FILE=os.devnull)\n"
        "auth = asyncpool.IamAuth(region='us-east-1')\n"
        "target = asyncpool.Target('db.example', 5432, 'app', 'app')\n"
        "async def main():\n"
        "    await auth.warm(target)\n"
        "    await auth.close()\n"
        "asyncio.run(main())\n"
        "print('aiobotocore' in sys.modules)\n"
    )
    assert _run(code).stdout.strip() == "True"
