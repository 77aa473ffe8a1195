#!/usr/bin/env bash
# Set everything up (idempotent), then run the linter and the test suite. Extra arguments
# go to pytest, e.g.  bash scripts/test.sh -m slow   (the long tests)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
VENV=${REGDROP_VENV:-.venv}
"$VENV/bin/ruff" check .
exec "$VENV/bin/python" -m pytest "$@"
