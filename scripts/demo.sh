#!/usr/bin/env bash
# Sets up (scripts/setup.sh), then runs the main job: `asyncpool demo` — local PostgreSQL +
# PgBouncer, 500+ simulated Lambda instances through ~50 server connections, and the same load
# sent straight to PostgreSQL for contrast. Extra arguments go to `asyncpool demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/asyncpool demo "$@"
