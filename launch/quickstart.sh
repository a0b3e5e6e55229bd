#!/usr/bin/env bash
# The default job on a fresh machine: set-up (virtual environment, pinned packages, the Debian
# Fashion-MNIST package where apt is available), then the whole pipeline -- pretrain, fine-tune on 1%
# of the labels (600 images), distill -- and a supervised-only baseline on the same 600 labels.
# Extra arguments go to the pipeline, e.g. --finetune.label_fraction=0.1. WORKDIR sets the output.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
export JAX_PLATFORMS="${JAX_PLATFORMS:-}"
exec "${SIMCLR_VENV:-.venv}/bin/python" -m simclrv2_jax.run_all \
  --workdir="${WORKDIR:-runs/fashion_mnist_1pct}" "$@"
