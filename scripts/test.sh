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
echo "== leftover servers"
.venv/bin/python scripts/check-no-leftover-servers.py --since "$before" || status=1
exit $status
