#!/usr/bin/env bash
# Sets up a fresh machine for asyncpool: PostgreSQL and PgBouncer binaries (apt), a current
# PgBouncer (>= 1.21) and PostgreSQL 17 (unpacked from Debian trixie; see get-pgbouncer-current.sh
# and get-postgres-17.sh), and the Python venv in .venv
# with every extra. Safe to run again: each step is skipped when already done.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
pg_ok=false
for d in /usr/lib/postgresql/*/bin; do
  [ -x "$d/initdb" ] && [ -x "$d/postgres" ] && pg_ok=true
done
$pg_ok || need_apt+=(postgresql)
command -v pgbouncer >/dev/null 2>&1 || [ -x /usr/sbin/pgbouncer ] || need_apt+=(pgbouncer)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "setup: installing ${need_apt[*]} with apt-get" >&2
  if [ "$(id -u)" -ne 0 ]; then sudo=sudo; else sudo=; fi
  $sudo apt-get update -qq
  # policy-rc.d keeps the packages from starting their own system services.
  DEBIAN_FRONTEND=noninteractive RUNLEVEL=1 $sudo apt-get install -y -qq "${need_apt[@]}" >&2
fi

# Prometheus (for the dashboard test): only its binary is run, by the tests; the package's own
# service is not started (no systemd here; RUNLEVEL=1 keeps invoke-rc.d from starting it).
if ! command -v prometheus >/dev/null 2>&1 && [ ! -x /usr/bin/prometheus ]; then
  echo "setup: installing prometheus with apt-get" >&2
  if [ "$(id -u)" -ne 0 ]; then sudo=sudo; else sudo=; fi
  if [ ${#need_apt[@]} -eq 0 ]; then $sudo apt-get update -qq; fi
  DEBIAN_FRONTEND=noninteractive RUNLEVEL=1 $sudo apt-get install -y -qq --no-install-recommends \
    prometheus >&2 || echo "setup: prometheus could not be installed; its test will skip" >&2
fi

bash scripts/get-pgbouncer-current.sh >/dev/null
# PostgreSQL 17 (what RDS also runs; bookworm has only 15) for scripts/test.sh's PostgreSQL 17 run,
# unpacked from Debian trixie the same way (see get-postgres-17.sh). A failed fetch fails the setup,
# as the PgBouncer's does: the run would be missing, not skipped.
bash scripts/get-postgres-17.sh >/dev/null

py=${PYTHON:-python3}

# The venvs other than .venv do not depend on it or on each other: each one that needs building
# builds in the background, its output kept in a log of its own and printed when it is over, while
# .venv installs in the foreground: one after the other they kept one core of two busy. Measured on
# the 2-core machine with other work keeping its load at 8 to 12 (2026-12-07): 231 and 233 s, the
# same as one after the other (233 s; checkov, resolved without a lock, took 82 s of it), as pip
# was then short of CPU either way; an idle machine's second core was not measured. A failed build
# fails the setup, after its log.
jobs_dir=$(mktemp -d)
job_names=()
job_pids=()
# An early failure still waits for the builds under way (no half-built venv left being written).
trap 'wait; rm -rf "$jobs_dir"' EXIT
in_background() {  # in_background NAME COMMAND...: run COMMAND in the background, logged as NAME
  local name=$1
  shift
  ( SECONDS=0; "$@"; echo "setup: $name built in ${SECONDS} s" ) > "$jobs_dir/$name.log" 2>&1 &
  job_names+=("$name")
  job_pids+=("$!")
}
wait_background() {  # waits for every in_background build; prints each log; fails if one failed
  local i failed=()
  for i in "${!job_pids[@]}"; do
    if ! wait "${job_pids[$i]}"; then
      failed+=("${job_names[$i]}")
      echo "setup: building ${job_names[$i]} FAILED; its output:" >&2
    fi
    cat "$jobs_dir/${job_names[$i]}.log" >&2
  done
  if [ ${#failed[@]} -gt 0 ]; then
    echo "setup: failed: ${failed[*]}" >&2
    exit 1
  fi
}

# Python 3.12 and 3.13 (the current Lambda runtimes, the only ones with SnapStart): small venvs with
# what the Lambda and core suites need (requirements/matrix.lock), which scripts/test.sh runs there.
# The interpreters come from pyenv (PYTHON312 / PYTHON313 override); without one, that run is skipped.
build_matrix_venv() {  # build_matrix_venv INTERPRETER VENV STAMP
  rm -rf "$2"
  "$1" -m venv "$2"
  "$2/bin/python" -m pip install -q --upgrade pip
  "$2/bin/python" -m pip install -q --require-hashes -r requirements/matrix.lock
  echo "$3" > "$2/.asyncpool-deps"
}
for v in 3.12 3.13; do
  var=PYTHON${v/./}
  interp=${!var:-}
  if [ -z "$interp" ]; then
    root=$(pyenv root 2>/dev/null || echo "$HOME/.pyenv")
    interp=$(ls -d "$root"/versions/"$v".*/bin/python"$v" 2>/dev/null | sort -V | tail -1 || true)
  fi
  venv=.venv${v/./}
  if [ -z "$interp" ] || [ ! -x "$interp" ]; then
    echo "setup: no Python $v found (pyenv, or $var=...): its test run will be skipped" >&2
    continue
  fi
  want=$(sha256sum requirements/matrix.lock | cut -d' ' -f1)
  if [ "$(cat "$venv/.asyncpool-deps" 2>/dev/null)" != "$want" ]; then
    echo "setup: building $venv with $interp (in the background)" >&2
    in_background "$venv" build_matrix_venv "$interp" "$venv" "$want"
  fi
done
# checkov (tests/test_infra_checkov.py), in a venv of its own: it pins urllib3 1.26, which has
# known vulnerabilities, so it stays out of the development environment.
checkov_version=3.2.459
ck=.cache/checkov-$checkov_version
install_checkov() {
  "$py" -m venv "$ck"
  "$ck/bin/python" -m pip install -q "checkov==$checkov_version"
}
if [ ! -x "$ck/bin/checkov" ]; then
  echo "setup: installing checkov $checkov_version into $ck (in the background)" >&2
  in_background checkov install_checkov
fi
# Yelp's detect-secrets, the one pre-commit runs (.pre-commit-config.yaml), in a venv of its own:
# checkov installs a fork (bc-detect-secrets) over the same module in .venv. tests/test_secrets_scan.py
# checks .secrets.baseline with both.
ds_version=$(sed -n 's/^ *rev: v\([0-9.]*\) *# detect-secrets$/\1/p' .pre-commit-config.yaml)
ds=.cache/detect-secrets-$ds_version
install_detect_secrets() {
  "$py" -m venv "$ds"
  "$ds/bin/python" -m pip install -q "detect-secrets==$ds_version"
}
if [ ! -x "$ds/bin/detect-secrets-hook" ]; then
  echo "setup: installing detect-secrets $ds_version into $ds (in the background)" >&2
  in_background detect-secrets install_detect_secrets
fi
# pyright (tests/typing/test_pyright.py: user code as Pylance users check it), in a venv of its own,
# from its lock (requirements/pyright.lock); Node.js comes as a wheel with it, so it runs offline.
pyright_version=$(sed -n 's/^pyright\[nodejs\]==\([0-9.]*\)$/\1/p' requirements/pyright.in)
pr=.cache/pyright-$pyright_version
install_pyright() {
  "$py" -m venv "$pr"
  "$pr/bin/python" -m pip install -q --require-hashes -r requirements/pyright.lock
}
if [ ! -x "$pr/bin/pyright" ]; then
  echo "setup: installing pyright $pyright_version into $pr (in the background)" >&2
  in_background pyright install_pyright
fi

if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv" >&2
  "$py" -m venv .venv
fi
stamp=.venv/.asyncpool-deps
want=$(cat pyproject.toml requirements/dev.lock | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "setup: installing Python dependencies into .venv" >&2
  .venv/bin/python -m pip install -q --upgrade pip >&2
  # The distribution was renamed asyncpool -> asyncpool-pg: drop an older editable install of it.
  .venv/bin/python -m pip uninstall -q -y asyncpool >/dev/null 2>&1 || true
  # checkov now lives in its own venv (above); an older .venv still has it and its urllib3 pin.
  .venv/bin/python -m pip uninstall -q -y checkov >/dev/null 2>&1 || true
  # First the locked development environment (every file checked against its hash), then the
  # project itself, which finds its dependencies there.
  .venv/bin/python -m pip install -q --require-hashes -r requirements/dev.lock >&2
  .venv/bin/python -m pip install -q -e '.[dev]' >&2
  echo "$want" > "$stamp"
fi
# SQLAlchemy 2.0 for asyncpool.integrations.sqlalchemy's tests (.venv has 2.1): a venv holding only
# SQLAlchemy 2.0, with .venv's packages behind it (a .pth file), so built after .venv.
# docs/sqlalchemy.md has the command.
sa20_version=2.0.58
sa20=.cache/sqlalchemy-2.0
sa20_site=$sa20/lib/$(.venv/bin/python -c 'import sys; print(f"python{sys.version_info[0]}.{sys.version_info[1]}")')/site-packages
if [ ! -f "$sa20_site/sqlalchemy-$sa20_version.dist-info/METADATA" ]; then
  echo "setup: installing SQLAlchemy $sa20_version into $sa20" >&2
  .venv/bin/python -m venv --without-pip "$sa20"
  .venv/bin/python -m pip install -q --no-deps --upgrade --target "$sa20_site" "sqlalchemy==$sa20_version" >&2
  .venv/bin/python -c 'import os, sysconfig; print(os.path.realpath(sysconfig.get_path("purelib")))' \
    > "$sa20_site/_asyncpool_dev_venv.pth"
fi
wait_background
echo "setup: ready" >&2
