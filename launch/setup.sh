#!/usr/bin/env bash
# Sets up a machine for simclrv2_jax: the Fashion-MNIST Debian package (where apt is available),
# a virtual environment in .venv with the pinned packages, and the project installed in it.
# Safe to run again: it only does what is missing. SIMCLR_VENV overrides the environment's path.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${SIMCLR_VENV:-.venv}"
PYTHON="${PYTHON:-python3}"

fmnist=/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
if [ ! -f "$fmnist" ] && command -v apt-get >/dev/null 2>&1; then
  SUDO=""
  if [ "$(id -u)" != 0 ]; then SUDO="sudo -n"; fi
  echo "[setup] installing the Debian package dataset-fashion-mnist (offline Fashion-MNIST)"
  if ! { $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq dataset-fashion-mnist; } >/tmp/simclr-apt.log 2>&1; then
    echo "[setup] warning: could not install dataset-fashion-mnist (see /tmp/simclr-apt.log);" \
         "the default job needs it or --config.data_dir pointing at the four IDX files." >&2
  fi
fi

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating the virtual environment $VENV"
  "$PYTHON" -m venv "$VENV"
fi
stamp="$VENV/.simclr-installed"
want="$(cat requirements.txt setup.cfg | sha256sum | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "[setup] installing the pinned packages (requirements.txt) and the project"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q -r requirements.txt
  "$VENV/bin/python" -m pip install -q --no-deps -e .
  echo "$want" > "$stamp"
fi
