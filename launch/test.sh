#!/usr/bin/env bash
# Sets the machine up if needed, then runs the whole test suite on the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
export JAX_PLATFORMS=cpu
exec "${SIMCLR_VENV:-.venv}/bin/python" -m pytest -q "$@"
