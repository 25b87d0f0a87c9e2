#!/usr/bin/env bash
# Sets up (scripts/setup.sh), then runs every check: ruff, mypy --strict, the docs site (MkDocs,
# strict: warnings are errors), the test suite against real PostgreSQL + PgBouncer 1.18 +
# PgBouncer >= 1.21, and a check that no server was left running.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
echo "== ruff" && .venv/bin/ruff check --no-cache .
echo "== mypy --strict" && .venv/bin/mypy
echo "== docs (mkdocs build --strict: warnings are errors)"
.venv/bin/mkdocs build --strict --site-dir .cache/site
before=$(mktemp)
trap 'rm -f "$before"' EXIT
.venv/bin/python scripts/check-no-leftover-servers.py --save "$before"
echo "== pytest"
status=0
# Several workers: most of the suite waits on servers, timeouts and sleeps rather than on the CPU
# (4 workers: about 4.5 instead of 10 minutes on a 2-core machine). ASYNCPOOL_TEST_WORKERS=0 runs
# everything in one process.
workers=${ASYNCPOOL_TEST_WORKERS:-4}
.venv/bin/pytest -q -p no:cacheprovider -n "$workers" "$@" || status=$?
if [ $# -eq 0 ] && [ -x .cache/sqlalchemy-2.0/bin/python ]; then
  echo "== SQLAlchemy 2.0 (the integration's tests; .venv has 2.1)"
  .cache/sqlalchemy-2.0/bin/python -m pytest -q -p no:cacheprovider tests/test_sqlalchemy.py \
    tests/test_sqlalchemy_example.py || status=$?
fi
# The Lambda and core suites again on Python 3.12 and 3.13 (the current Lambda runtimes, the only
# ones with SnapStart), in the small venvs scripts/setup.sh builds, with the modules whose code paths
# differ between Python versions: asyncio cancellation (Task.cancelling/uncancel, wait_for), the
# lease's task lookup, and the transports that the read path, the login guard, TLS and the unnamed
# mode wrap; and SQLAlchemy's async engine, FastAPI and Mangum, which Lambda functions on those
# versions run the pool under. Both versions run at once, in 2 pytest workers each (the suites
# mostly wait on servers and subprocesses), with the model test at 200 examples instead of 1,000:
# about 2.5 minutes in all (4 in one worker each). The whole suite passes there too, but takes 6 minutes per version in 2 workers on a 2-core
# machine, and needs the whole dev environment: too long for every run. Only for a whole-suite run;
# ASYNCPOOL_TEST_MATRIX=0 skips them.
matrix_tests=(tests/unit tests/test_asyncpg_pool_api.py tests/lambda_runtime tests/test_lambda_runner.py
              tests/test_lambda_powertools.py
              tests/test_lambda_shutdown.py tests/test_lambda_config.py tests/test_freeze_thaw.py
              tests/test_pool_api.py tests/test_cancel_delivery.py tests/faults/test_cancellation.py
              tests/test_leaks.py tests/test_driver.py tests/test_reads.py tests/test_authguard_transport.py
              tests/test_tls.py tests/test_unnamed_wire.py tests/test_unnamed_prepare.py
              tests/test_unnamed_changes.py tests/test_unnamed_tls.py
              tests/test_sqlalchemy.py tests/test_sqlalchemy_example.py tests/test_fastapi_mangum.py
              tests/test_fastapi_testing.py)
if [ $# -eq 0 ] && [ "${ASYNCPOOL_TEST_MATRIX:-1}" != 0 ]; then
  pids=()
  logs=$(mktemp -d)
  for v in 3.12 3.13; do
    venv=.venv${v/./}
    if [ ! -x "$venv/bin/python" ]; then
      echo "== pytest on Python $v: skipped ($venv missing: no Python $v for scripts/setup.sh)"
      continue
    fi
    ASYNCPOOL_MODEL_EXAMPLES=${ASYNCPOOL_MODEL_EXAMPLES:-200} "$venv/bin/python" -m pytest -q \
      -n 2 -p no:cacheprovider "${matrix_tests[@]}" > "$logs/python$v.log" 2>&1 &
    pids+=("$v:$!")
  done
  for entry in "${pids[@]}"; do
    v=${entry%%:*}
    echo "== pytest on Python $v (Lambda and core suites)"
    wait "${entry#*:}" || status=$?
    tail -n 30 "$logs/python$v.log"
  done
  rm -rf "$logs"
fi
echo "== leftover servers"
.venv/bin/python scripts/check-no-leftover-servers.py --since "$before" || status=1
exit $status
