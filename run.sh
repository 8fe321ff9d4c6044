#!/usr/bin/env bash
# The two set-up commands of the README:
#   ./run.sh demo [--out DIR]   install, then run `unicodebook demo` (the main job)
#   ./run.sh test [pytest args] install, lint (ruff), then run the test suite (what .ci/run calls)
# The CPU build of PyTorch on this machine is pinned first, so nothing pulls a CUDA build.
set -euo pipefail
cd "$(dirname "$0")"
what="${1:-}"; shift || true
PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q torch==2.13.0
.venv/bin/python -m pip install -q -e ".[dev]"
case "$what" in
  demo) exec .venv/bin/unicodebook demo "$@" ;;
  test) .venv/bin/ruff check . && .venv/bin/ruff format --check . && exec .venv/bin/python -m pytest -q "$@" ;;
  *) echo "usage: ./run.sh demo|test [args]" >&2; exit 2 ;;
esac
