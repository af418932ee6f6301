#!/usr/bin/env bash
# Set-up and entry point for a fresh machine: `./dev.sh demo` or `./dev.sh test`.
# Each creates .venv and installs what it needs on first use.
set -euo pipefail
cd "$(dirname "$0")"
VENV=.venv
PY=${PYTHON:-python3}

install() {
  local extras=$1 stamp="$VENV/.installed-$1"
  if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --upgrade pip
  fi
  if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    "$VENV/bin/python" -m pip install -q -e ".[$extras]"
    touch "$stamp"
  fi
}

# Debian's packages of these commands, where apt-get can install them and they are missing
debs() {
  local missing=""
  for c in "$@"; do command -v "$c" >/dev/null || missing="$missing $c"; done
  if [ -n "$missing" ] && command -v apt-get >/dev/null; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing) >/dev/null
  fi
}

cmd=${1:-}
shift || true
case "$cmd" in
  demo)
    install "airflow,demo"
    exec "$VENV/bin/migrator" demo "$@"
    ;;
  test)
    install "airflow,demo,test,bench"
    # the browser tests drive Debian's chromium (Playwright downloads no browser here)
    # and the Celery tests start Debian's redis-server as their broker
    debs chromium redis-server
    exec "$VENV/bin/python" -m pytest "$@"
    ;;
  lint)
    install "airflow,demo,test,bench"
    "$VENV/bin/ruff" check .
    "$VENV/bin/ruff" format --check .
    "$VENV/bin/mypy"
    ;;
  bench)
    # --airflow runs the DAG under Airflow, and under the CeleryExecutor with redis-server
    install "airflow,demo,bench"
    debs redis-server
    exec "$VENV/bin/python" -m bench "$@"
    ;;
  *)
    echo "usage: ./dev.sh demo [--users N] [--json] | ./dev.sh test [pytest args] | ./dev.sh lint | ./dev.sh bench [--scale S]" >&2
    exit 2
    ;;
esac
