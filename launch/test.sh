#!/usr/bin/env bash
# Sets the machine up if needed, checks the code style (ruff), then runs the test suite on the CPU:
# the whole suite, or with --fast the fast loop (every test not marked slow: no whole training runs,
# subprocesses, notebook, multi-process or launcher tests). Other arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
VENV="${SIMCLR_VENV:-.venv}"
"$VENV/bin/ruff" check .
"$VENV/bin/ruff" format --check .
export JAX_PLATFORMS=cpu
# One pytest worker per core (pytest-xdist), whole test files per worker: the tests are mostly XLA
# compiles, one core each, so two cores take about half the time. SIMCLR_TEST_WORKERS=0 runs them
# in this process.
args=()
for arg in "$@"; do
  if [ "$arg" = "--fast" ]; then args+=(-m "not slow"); else args+=("$arg"); fi
done
exec "$VENV/bin/python" -m pytest -q -n "${SIMCLR_TEST_WORKERS:-auto}" --dist loadfile "${args[@]}"
