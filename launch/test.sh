#!/usr/bin/env bash
# Sets the machine up if needed, checks the code style (ruff), then runs the whole test suite on the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
VENV="${SIMCLR_VENV:-.venv}"
"$VENV/bin/ruff" check .
"$VENV/bin/ruff" format --check .
export JAX_PLATFORMS=cpu
exec "$VENV/bin/python" -m pytest -q "$@"
