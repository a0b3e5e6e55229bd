#!/usr/bin/env bash
# Sets up a machine for simclrv2_jax: the Fashion-MNIST Debian package (where apt is available),
# a virtual environment in .venv with the pinned packages, and the project installed in it.
# Safe to run again: it only does what is missing. SIMCLR_VENV overrides the environment's path.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${SIMCLR_VENV:-.venv}"

# The pinned set is tested on Python 3.12 (JAX 0.11 and later need it); take one where the machine has
# it (on the PATH or installed by pyenv), else python3 (3.11 takes the pins' older JAX). PYTHON overrides.
pick_python() {
  if [ -n "${PYTHON:-}" ]; then echo "$PYTHON"; return; fi
  local candidate
  for candidate in python3.12 "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.12*/bin/python3.12; do
    # A pyenv shim exists on the PATH even where it has no such version: run it to know.
    if "$candidate" -c "import venv" >/dev/null 2>&1; then echo "$candidate"; return; fi
  done
  echo python3
}
PYTHON="$(pick_python)"
python_version="$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
if [ -x "$VENV/bin/python" ] && [ "$("$VENV/bin/python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')" != "$python_version" ]; then
  echo "[setup] $VENV has another Python than $PYTHON ($python_version): creating it afresh"
  rm -rf "$VENV"
fi

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
  echo "[setup] creating the virtual environment $VENV (Python $python_version)"
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
