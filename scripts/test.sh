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
.venv/bin/pytest -q -p no:cacheprovider "$@" || status=$?
echo "== leftover servers"
.venv/bin/python scripts/check-no-leftover-servers.py --since "$before" || status=1
exit $status
