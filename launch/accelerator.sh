#!/usr/bin/env bash
# Every accelerator figure (benchmarks/accelerator.py) on a GPU host without network or TensorFlow.
#
#   bash launch/accelerator.sh prepare        # here, with pip's registry: fills .accel/ (gitignored)
#   bash launch/accelerator.sh run [ARGS...]  # there, with .accel/ beside the code: writes the JSON
#
# prepare: the wheels such a host lacks (ml_collections, clu, dm-pix; about 0.5 MB, for Python 3.12),
# Fashion-MNIST's four IDX files (30 MB) and the PyTorch peer (../shared/bench/torch_peer.py).
# run: installs those wheels beside the host's own JAX, flax, optax and orbax (never over them), then
# runs the benchmark; ARGS go to it (--parts=..., --out=FOLDER_OR_FILE, --budget_s=...).
set -euo pipefail
cd "$(dirname "$0")/.."
ACCEL=.accel
case "${1:-}" in
  prepare)
    mkdir -p "$ACCEL/wheels" "$ACCEL/fashion-mnist"
    PY="${PYTHON:-python3}"
    for wheel in ml_collections==1.1.0 clu==0.0.12 dm-pix==0.4.5; do
      "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_17_x86_64 --platform any -d "$ACCEL/wheels" "$wheel"
    done
    cp /usr/share/datasets/fashion-mnist/*-ubyte.gz "$ACCEL/fashion-mnist/"
    cp ../shared/bench/torch_peer.py "$ACCEL/"
    du -sh "$ACCEL"
    ;;
  run)
    shift
    PY="${PYTHON:-python3}"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/accel-site "$ACCEL"/wheels/*.whl
    export PYTHONPATH="/tmp/accel-site:$PWD" PYTHONUNBUFFERED=1
    exec "$PY" -m benchmarks.accelerator --data_dir="$ACCEL/fashion-mnist" \
      --torch_peer_script="$ACCEL/torch_peer.py" "$@"
    ;;
  *)
    echo "usage: bash launch/accelerator.sh prepare | run [--parts=... --out=...]" >&2
    exit 2
    ;;
esac
